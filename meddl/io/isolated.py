"""Decode an untrusted file in a child process, so that a decoder crash or hang costs one error line.

The child is a fresh interpreter (``python -m meddl.io.isolated``), not a fork: it shares no state with
the worker, runs under an address-space limit, and is killed after a timeout. It reads the file with
:func:`meddl.io.read_image` (``isolate=False``) and hands back the voxels as ``.npy`` plus geometry and
metadata as JSON in a private temporary folder, or an error as JSON. A signal, a non-zero exit without an
error file, or the timeout become an :class:`~meddl.errors.InputError` naming the file.

Run as a script::

    python -m meddl.io.isolated INPUT OUTPUT_FOLDER [--series-uid UID]   # the child's job
    python -m meddl.io.isolated --measure FILE [FILE ...]                # what isolation costs, measured
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from meddl.errors import InputError, MedDLError
from meddl.io.image import Image

__all__ = ["read_in_child", "run_child", "measure_overhead", "DEFAULT_TIMEOUT_S", "main"]

PathLike = Union[str, os.PathLike]
DEFAULT_TIMEOUT_S = float(os.environ.get("MEDDL_READ_TIMEOUT", "300"))
# Address-space limit of the child: the voxel-count limit (2^31) at 8 bytes, plus the interpreter.
CHILD_MEMORY_BYTES = int(float(os.environ.get("MEDDL_READER_MEMORY_GB", "20")) * 2**30)


def run_child(arguments: List[str], path: PathLike, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run ``python -m meddl.io.isolated *arguments`` (or another ``-m`` module); map crash/timeout to InputError."""
    timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        completed = subprocess.run(
            [sys.executable, *arguments], capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise InputError(f"reading did not finish within {timeout:g} s; the reader was stopped", path) from None
    if completed.returncode < 0:
        try:
            name = signal.Signals(-completed.returncode).name
        except ValueError:
            name = f"signal {-completed.returncode}"
        raise InputError(f"the image decoder crashed on this file ({name}); the file is malformed or hostile", path)
    return completed


def read_in_child(path: PathLike, series_uid: Optional[str] = None, timeout: Optional[float] = None) -> Image:
    """Read ``path`` like :func:`meddl.io.read_image`, but in a child process."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix="meddl-read-"))
    try:
        arguments = ["-m", "meddl.io.isolated", str(path), str(folder)]
        if series_uid:
            arguments += ["--series-uid", series_uid]
        completed = run_child(arguments, path, timeout)
        error_file = folder / "error.json"
        if error_file.is_file():
            error = json.loads(error_file.read_text())
            raise InputError(error["problem"], path)
        if completed.returncode != 0 or not (folder / "image.json").is_file():
            tail = completed.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = tail[-1][:200] if tail else f"exit code {completed.returncode}"
            raise InputError(f"the image reader failed on this file ({detail})", path)
        facts = json.loads((folder / "image.json").read_text())
        array = np.load(folder / "array.npy", allow_pickle=False)
        metadata = facts["metadata"]
        metadata["isolated"] = True
        return Image(array, facts["spacing"], facts["origin"], np.array(facts["direction"]), metadata)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_overhead(path: PathLike, repeats: int = 5) -> dict:
    """Median wall time of reading ``path`` in this process and in a child process (seconds)."""
    import statistics
    import time

    from meddl.io.readers import read_image

    timings = {}
    for label, isolate in (("in_process_s", False), ("child_process_s", True)):
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            read_image(path, isolate=isolate)
            samples.append(time.perf_counter() - started)
        timings[label] = statistics.median(samples)
    timings["overhead_s"] = timings["child_process_s"] - timings["in_process_s"]
    return {"path": str(path), "repeats": repeats, **timings}


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # not on every platform; the timeout still applies
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """Child entry point: read one file, write ``array.npy`` + ``image.json`` or ``error.json``."""
    parser = argparse.ArgumentParser(prog="python -m meddl.io.isolated")
    parser.add_argument("paths", nargs="+", metavar="INPUT OUTPUT_FOLDER | FILE ...")
    parser.add_argument("--series-uid")
    parser.add_argument("--measure", action="store_true", help="time in-process vs child-process reads of FILEs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.measure:
        for path in args.paths:
            print(json.dumps(measure_overhead(path, args.repeats)))
        return 0
    if len(args.paths) != 2:
        parser.error("expected INPUT OUTPUT_FOLDER")
    args.input, output = args.paths[0], Path(args.paths[1])
    _limit_memory()
    from meddl.io.readers import read_image

    try:
        image = read_image(args.input, series_uid=args.series_uid, isolate=False)
    except MedDLError as error:
        (output / "error.json").write_text(json.dumps({"problem": error.problem}))
        return 3
    except MemoryError:
        (output / "error.json").write_text(json.dumps({"problem": "decoding needs more memory than allowed"}))
        return 3
    np.save(output / "array.npy", image.array, allow_pickle=False)
    facts = {
        "spacing": list(image.spacing),
        "origin": list(image.origin),
        "direction": image.direction.tolist(),
        "metadata": {key: value for key, value in image.metadata.items() if _json_safe(value)},
    }
    (output / "image.json").write_text(json.dumps(facts))
    return 0


def _json_safe(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
