"""One engine session shared by the MedDL modules: dependency check and install, the worker client, waiting.

Slicer-specific actions (pip install, processing GUI events, installing torch through PyTorch Utils) are passed in
as callables, so this module needs neither Qt nor ``slicer.app`` and runs headless against the real worker.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from MedDLSegmentLib import engine

__all__ = ["EngineSession", "pypi_reachable"]

PathLike = Union[str, os.PathLike]
ProgressCallback = Callable[[float, str], None]


def pypi_reachable(timeout: float = 3.0) -> bool:
    """True when pypi.org accepts a connection (installing is possible)."""
    try:
        with socket.create_connection(("pypi.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


class EngineSession:
    """The worker and its Python, seen from a Slicer module.

    Args:
        module_dir: the module's folder (finds the engine beside it).
        python: the worker's interpreter (default: :func:`engine.worker_python`).
    """

    def __init__(self, module_dir: PathLike, python: Optional[str] = None) -> None:
        self.module_dir = Path(module_dir)
        self.engine_root = engine.find_engine_root(self.module_dir)
        self._python = python
        self.dependencies_ready = False
        self._work_directory: Optional[Path] = None
        self._starter: Optional[threading.Thread] = None
        self._start_error: Optional[BaseException] = None

    @property
    def python(self) -> str:
        if self._python is None:
            self._python = engine.worker_python()
        return self._python

    def work_directory(self) -> Path:
        """A per-session folder for the files exchanged with the worker."""
        if self._work_directory is None:
            self._work_directory = Path(tempfile.mkdtemp(prefix="MedDL-"))
        return self._work_directory

    def new_job_folder(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=str(self.work_directory())))

    # -- dependencies ---------------------------------------------------------------------------------------
    def missing_dependencies(self) -> List[str]:
        """pip requirements the worker's Python lacks (asked in a subprocess: torch never enters this process)."""
        missing = engine.missing_requirements(engine.check_dependencies(self.python, self.engine_root))
        self.dependencies_ready = not missing
        return missing

    def install_dependencies(
        self,
        missing: List[str],
        pip_install: Callable[[List[str]], object],
        numpy_version: Optional[str],
        install_torch: Optional[Callable[[], object]] = None,
        online: Optional[Callable[[], bool]] = None,
    ) -> None:
        """Install ``missing`` without changing numpy (pinned to ``numpy_version`` by a constraint file).

        Args:
            pip_install: ``slicer.util.pip_install`` inside Slicer.
            install_torch: installs torch another way (PyTorch Utils), or None to use pip.
            online: tells whether installing can reach the package index (default: :func:`pypi_reachable`).

        Raises:
            RuntimeError: offline, or installing failed; the message says how to install by hand.
        """
        manual = f"{self.python} -m pip install " + " ".join(f'"{r}"' for r in missing)
        if not (online or pypi_reachable)():
            raise RuntimeError(
                "Cannot reach pypi.org, so the engine's dependencies cannot be installed now. Connect to the "
                f"internet and retry, or install them from a shell:\n{manual}"
            )
        requirements = list(missing)
        torch_requirement = next((r for r in requirements if r.split(">")[0].split("=")[0] == "torch"), None)
        try:
            if torch_requirement and install_torch is not None:
                install_torch()
                requirements.remove(torch_requirement)
            if requirements:
                constraint = self.work_directory() / "numpy-constraint.txt"
                pip_install(engine.pip_install_arguments(requirements, numpy_version, constraint))
        except Exception as error:  # pip's and PyTorch Utils' failures come in many types
            raise RuntimeError(f"Installing failed ({error}). Install from a shell:\n{manual}") from None
        still = self.missing_dependencies()
        if still:
            raise RuntimeError(f"Still missing after installing: {', '.join(still)}. Install from a shell:\n{manual}")

    # -- worker ---------------------------------------------------------------------------------------------
    def client(self):
        """The shared worker client (not started)."""
        return engine.shared_client(self.python, self.engine_root)

    @property
    def worker_running(self) -> bool:
        return self.client().alive

    def start_worker(self) -> Dict:
        """Start the shared worker if needed (blocks until it is ready); returns its hello."""
        client = self.client()
        return client.hello if client.alive and client.hello else client.start()

    def start_worker_in_background(self) -> None:
        """Begin starting the worker and return at once; :meth:`worker_starting` tells when it is ready.

        The cold start (importing torch and MONAI in the worker) takes seconds; a GUI must not freeze for it.
        """
        client = self.client()
        if client.alive or (self._starter is not None and self._starter.is_alive()):
            return
        self._start_error = None

        def start() -> None:
            try:
                client.start()
            except BaseException as error:  # reported to the GUI thread by worker_starting()
                self._start_error = error

        self._starter = threading.Thread(target=start, name="meddl-worker-start", daemon=True)
        self._starter.start()

    def worker_starting(self, timeout: float = 0.01) -> bool:
        """True while a background start is under way (waits up to ``timeout``, releasing the GIL).

        Raises:
            The start's error (e.g. the worker's Python lacks torch), once.
        """
        if self._starter is None:
            return False
        self._starter.join(timeout)
        if self._starter.is_alive():
            return True
        self._starter = None
        error, self._start_error = self._start_error, None
        if error is not None:
            raise error
        return False

    def ensure_started(self, process_events: Optional[Callable[[], object]] = None) -> Dict:
        """Start the worker if needed, calling ``process_events`` while it starts (blocking for the caller, not for
        the GUI); returns its hello."""
        self.start_worker_in_background()
        while self.worker_starting(0.05):
            if process_events is not None:
                process_events()
        return self.client().hello or {}

    def started_client(self):
        client = self.client()
        if not client.alive:
            client.start()
        return client

    def submit(self, method: str, params: Dict):
        return self.started_client().submit(method, params)

    def poll(self, timeout: float = 0.01) -> None:
        """Apply the worker's replies (for a GUI timer).

        Waits up to ``timeout`` for the first reply: a blocking wait releases Python's GIL, which gives the client's
        reader thread a chance to run even in an embedded interpreter whose main thread otherwise holds the GIL
        between timer ticks (PythonQt). 10 ms every 100 ms keeps the GUI fluid.
        """
        self.client().poll(timeout)

    def cancel(self, job) -> None:
        self.client().cancel(job)

    def wait(
        self, job, progress: Optional[ProgressCallback] = None, process_events: Optional[Callable[[], object]] = None
    ) -> Dict:
        """Wait for ``job``, calling ``process_events`` (``slicer.app.processEvents``) so the GUI stays live.

        Returns:
            The job's result.

        Raises:
            The job's error (InputError, ModelError, Cancelled, WorkerExited ...).
        """
        client = self.client()
        while not job.done:
            client.poll(0.05)
            if process_events is not None:
                process_events()
            if progress is not None:
                progress(job.progress, job.message)
        if job.state != "done":
            raise job.error or RuntimeError(f"{job.method} ended in state {job.state}")
        return job.result or {}
