"""Finding and preparing the engine from inside Slicer: which Python runs the worker, where ``meddl`` lives,
and whether torch, MONAI and the engine's other dependencies are installed there.

Pure Python (no slicer, no Qt), so it is tested here with real interpreters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

__all__ = [
    "MIN_PYTHON",
    "ENGINE_REQUIREMENTS",
    "python_too_old",
    "find_engine_root",
    "worker_python",
    "worker_environment",
    "check_dependencies",
    "missing_requirements",
    "pip_install_arguments",
    "shared_client",
    "shutdown_shared_client",
    "describe_worker",
]

PathLike = Union[str, os.PathLike]

# The worker needs Python 3.10+ (Slicer 5.10 and newer); the GUI-side code also loads on Slicer 5.8 (3.9).
MIN_PYTHON = (3, 10)

# import name -> pip requirement the engine needs in the worker's Python. Kept equal to pyproject.toml's
# runtime dependencies (a test checks it). numpy is deliberately absent: Slicer ships its own, and the engine
# must never upgrade it.
ENGINE_REQUIREMENTS: Dict[str, str] = {
    "torch": "torch>=2.2",
    "monai": "monai>=1.4",
    "scipy": "scipy>=1.11",
    "SimpleITK": "SimpleITK>=2.3",
    "nrrd": "pynrrd>=1.0",
    "nibabel": "nibabel>=5.0",
    "pydicom": "pydicom>=2.4",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.8",
    "sklearn": "scikit-learn>=1.3",
}

# Run in the worker's Python: which modules are importable, and their versions. find_spec is used rather than
# importing (torch and MONAI take seconds to import); the worker's hello reports real import failures later.
_PROBE = """
import importlib.util, json, sys
names = json.loads(sys.argv[1])
found = {}
for name, dist in names:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        found[name] = None
        continue
    try:
        from importlib import metadata
        found[name] = metadata.version(dist)
    except Exception:
        found[name] = "unknown"
print(json.dumps({"python": list(sys.version_info[:3]), "modules": found}))
"""


def python_too_old(version_info: Sequence[int] = tuple(sys.version_info[:2])) -> Optional[str]:
    """A one-line explanation when this Python cannot run the engine, else None."""
    if tuple(version_info[:2]) >= MIN_PYTHON:
        return None
    return (
        f"MedDL's engine needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer (Slicer 5.10 or newer); this Slicer "
        f"has Python {version_info[0]}.{version_info[1]}. Please install a newer Slicer."
    )


def find_engine_root(module_dir: PathLike) -> Optional[Path]:
    """The folder that contains the ``meddl`` package for a module folder.

    In a source checkout ``meddl/`` is beside the module folders; in a built or installed extension it is
    installed into the scripted-modules folder beside the modules' ``.py`` files.
    """
    module_dir = Path(module_dir).resolve()
    for candidate in (module_dir, module_dir.parent, module_dir.parent.parent):
        if (candidate / "meddl" / "__init__.py").is_file():
            return candidate
    return None


def worker_python(executable: Optional[str] = None) -> str:
    """The interpreter that runs the worker: Slicer's ``PythonSlicer`` when there is one, else this Python.

    Raises:
        FileNotFoundError: inside an application whose ``sys.executable`` is not a Python interpreter and no
            ``PythonSlicer`` is found.
    """
    executable = executable or sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = Path(executable).parent / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if beside.is_file():
        return str(beside)
    if Path(executable).name.lower().startswith("python"):
        return executable
    raise FileNotFoundError(f"cannot find PythonSlicer (looked on PATH and beside {executable})")


def worker_environment(engine_root: Optional[PathLike], base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The worker's environment: ``base`` (default: this process's) with the engine first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    if engine_root is not None:
        parts = [str(engine_root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_dependencies(python: str, engine_root: Optional[PathLike] = None, timeout: float = 60.0) -> Dict[str, object]:
    """Ask ``python`` (in a subprocess) which engine dependencies it has.

    Returns:
        ``{"python": [major, minor, micro], "modules": {import name: version or None}}``; ``meddl`` and
        ``numpy`` are reported too.

    Raises:
        RuntimeError: the interpreter cannot be started or does not answer (one line, naming it).
    """
    # (import name, distribution name): the distribution's version is what pip installed.
    names = [("meddl", "meddl"), ("numpy", "numpy")] + [
        (name, re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for name, spec in ENGINE_REQUIREMENTS.items()
    ]
    try:
        completed = subprocess.run(
            [python, "-c", _PROBE, json.dumps(names)],
            env=worker_environment(engine_root),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"{python}: cannot run the dependency check ({error})") from None
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{python}: dependency check failed ({last})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def missing_requirements(report: Dict[str, object]) -> List[str]:
    """pip requirements for the engine dependencies ``report`` (from :func:`check_dependencies`) lacks."""
    modules = report.get("modules", {})
    return [requirement for name, requirement in ENGINE_REQUIREMENTS.items() if not modules.get(name)]


def pip_install_arguments(
    requirements: Sequence[str], numpy_version: Optional[str], constraint_file: PathLike
) -> List[str]:
    """Arguments for ``pip install`` (``slicer.util.pip_install``) that never change Slicer's numpy.

    Writes ``constraint_file`` pinning numpy to ``numpy_version`` (the version Slicer ships) and passes it with
    ``-c``, so a dependency that wants another numpy makes pip fail instead of replacing Slicer's.
    """
    arguments = list(requirements)
    if numpy_version:
        Path(constraint_file).write_text(f"numpy=={numpy_version}\n", encoding="utf-8")
        arguments += ["-c", str(constraint_file)]
    return arguments


_shared_client = None


def shared_client(python: Optional[str] = None, engine_root: Optional[PathLike] = None, log_path=None):
    """The one worker client both MedDL modules use (one warm worker, one copy of torch in memory).

    Created on first use, not started: call ``.start()`` (blocks until the worker says hello).
    """
    global _shared_client
    if _shared_client is None:
        from meddl.client import WorkerClient

        _shared_client = WorkerClient(
            python_executable=python or worker_python(), env=worker_environment(engine_root), log_path=log_path
        )
    return _shared_client


def shutdown_shared_client() -> None:
    """Stop the shared worker (Slicer exit, module reload)."""
    global _shared_client
    if _shared_client is not None:
        _shared_client.shutdown()
        _shared_client = None


def describe_worker(hello: Optional[Dict[str, object]]) -> str:
    """One line for the device display, from the worker's hello: device, GPU name and memory, versions."""
    if not hello:
        return "engine not started"
    device = str(hello.get("device", "?"))
    gpu = hello.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        memory = gpu.get("memory_mb")
        device += f" - {gpu['name']}" + (f" ({float(memory) / 1024:.0f} GiB)" if memory else "")
    versions = ", ".join(
        f"{name} {hello[key]}"
        for name, key in (("torch", "torch_version"), ("MONAI", "monai_version"))
        if hello.get(key)
    )
    return f"{device}; {versions}" if versions else device
