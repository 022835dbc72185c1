"""Drive the meddl worker from any Python, Slicer's GUI process included: pure standard library.

The client starts ``python -m meddl.worker`` (Slicer's ``PythonSlicer`` inside Slicer, ``sys.executable``
elsewhere), sends requests and turns the worker's replies into :class:`Job` updates and callbacks. A
reader thread only moves reply lines into a queue; callbacks run in whichever thread calls
:meth:`WorkerClient.poll`, so a GUI can call it from a timer and never block::

    client = WorkerClient()
    client.start()
    job = client.submit("segment", {"model": model_dir, "input": "ct.nrrd", "output": "seg.nrrd"},
                        on_progress=lambda fraction, message: print(f"{fraction:.0%} {message}"),
                        on_done=lambda job: print(job.state, job.result or job.error))
    # in a QTimer callback, every 100 ms:
    client.poll()

or, in a script, ``client.call("segment", {...})`` blocks and returns the result (raising
:class:`~meddl.errors.InputError`, :class:`~meddl.errors.ModelError`, :class:`~meddl.errors.Cancelled` ...).

If the worker dies, every pending job fails with a :class:`~meddl.protocol.WorkerExited` error that names
the exit code and the log file; the next :meth:`WorkerClient.submit` starts a new worker and calls
``on_restart``.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from meddl import __version__
from meddl.errors import Cancelled, MedDLError
from meddl.protocol import (
    ACCEPTED,
    ERROR,
    PROGRESS,
    PROTOCOL_VERSION,
    RESULT,
    ProtocolError,
    WorkerExited,
    decode,
    default_log_path,
    encode,
    error_from_dict,
    request,
)

__all__ = ["Job", "WorkerClient", "JOB_STATES"]

logger = logging.getLogger("meddl.client")

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
ProgressCallback = Callable[[float, str], None]
DoneCallback = Callable[["Job"], None]
RestartCallback = Callable[[str], None]
_FINISHED = ("done", "failed", "cancelled")


class Job:
    """A request the client sent, updated by :meth:`WorkerClient.poll` as replies arrive.

    Attributes:
        id: the request id (unique within a client).
        method, params: what was asked.
        state: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        progress: fraction in [0, 1]; ``message``: the latest progress text.
        queue_position: jobs ahead of this one (0 once it runs), or None before the worker accepted it.
        result: the result dict once ``done``; ``error``: a :class:`MedDLError` once ``failed``/``cancelled``.
    """

    def __init__(
        self,
        job_id: str,
        method: str,
        params: Dict[str, Any],
        on_progress: Optional[ProgressCallback] = None,
        on_done: Optional[DoneCallback] = None,
    ) -> None:
        self.id = job_id
        self.method = method
        self.params = params
        self.state = "queued"
        self.progress = 0.0
        self.message = "sent"
        self.queue_position: Optional[int] = None
        self.result: Optional[Dict[str, Any]] = None
        self.error: Optional[MedDLError] = None
        self.submitted = time.monotonic()
        self.finished: Optional[float] = None
        self.on_progress = on_progress
        self.on_done = on_done

    @property
    def done(self) -> bool:
        """True once the job is ``done``, ``failed`` or ``cancelled``."""
        return self.state in _FINISHED

    @property
    def elapsed(self) -> float:
        """Seconds from submission to completion (or to now)."""
        return (self.finished or time.monotonic()) - self.submitted

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.method!r}, state={self.state!r}, progress={self.progress:.2f})"


class WorkerClient:
    """Start, talk to, and restart one meddl worker process.

    Args:
        python_executable: interpreter that runs the worker (default ``sys.executable``; in Slicer pass
            ``shutil.which("PythonSlicer")``).
        env: environment for the worker (default: this process's). The folder holding the ``meddl`` package
            the client came from is added to ``PYTHONPATH`` so the worker runs the same engine.
        log_path: the worker's log file (its stderr goes there too); default under the user cache folder.
        startup_timeout: seconds to wait for the worker's ``hello`` before giving up.
        on_restart: called with a one-line reason whenever the client starts a replacement worker.
        worker_args: extra command-line arguments for ``python -m meddl.worker``.
    """

    def __init__(
        self,
        python_executable: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        log_path: Optional[Union[str, os.PathLike]] = None,
        startup_timeout: float = 120.0,
        on_restart: Optional[RestartCallback] = None,
        worker_args: Optional[List[str]] = None,
    ) -> None:
        self.python_executable = python_executable or sys.executable
        self.env = env
        self.log_path = Path(log_path) if log_path else default_log_path()
        self.startup_timeout = float(startup_timeout)
        self.on_restart = on_restart
        self.worker_args = list(worker_args or [])
        self.hello: Optional[Dict[str, Any]] = None
        self.restarts = 0
        self._process: Optional[subprocess.Popen] = None
        self._replies: queue.Queue[tuple] = queue.Queue()
        self._jobs: Dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._generation = 0
        self._write_lock = threading.Lock()
        self._log_handle = None
        self._stopping = False
        self._exit_seen = False
        self._log_offset = 0

    # -- life cycle -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """True while the worker process runs."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def start(self, wait: bool = True) -> Optional[Dict[str, Any]]:
        """Spawn the worker and send ``hello``.

        With ``wait`` (default) block until the hello arrives and return it (versions, device, GPU). With
        ``wait=False`` return at once: requests sent meanwhile queue up in the worker, :attr:`hello` is
        filled by :meth:`poll`, and a failed start fails the pending jobs (for GUI threads).
        """
        if self.alive:
            return self.hello
        self.hello = None
        self._spawn()
        job = self._send(
            "hello",
            {"client": f"meddl.client {__version__}", "protocol_version": PROTOCOL_VERSION},
            on_done=self._on_hello,
        )
        if not wait:
            return None
        try:
            self.wait(job, timeout=self.startup_timeout)
        except TimeoutError:
            self._kill(reason="the worker did not start")
            raise MedDLError(
                f"the worker did not answer within {self.startup_timeout:.0f} s of starting; see log {self.log_path}"
            ) from None
        if job.state != "done" or self.hello is None:
            raise job.error or MedDLError(f"the worker failed to start; see log {self.log_path}")
        return self.hello

    def _on_hello(self, job: Job) -> None:
        if job.state != "done":
            return
        hello = job.result or {}
        if hello.get("protocol_version") != PROTOCOL_VERSION:
            problem = (
                f"the worker at {self.python_executable} speaks protocol {hello.get('protocol_version')} but this "
                f"client speaks {PROTOCOL_VERSION}; install the same meddl version in both"
            )
            job.error = ProtocolError(problem)
            job.state = "failed"
            self._kill(reason=problem)
            return
        self.hello = hello
        logger.info("worker pid %s ready: device %s", self.pid, hello.get("device"))

    def restart(self, reason: str = "restart requested", wait: bool = True) -> Optional[Dict[str, Any]]:
        """Stop the current worker (pending jobs fail) and start a new one."""
        self._kill(reason=f"the worker was restarted ({reason})")
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(reason)
        return self.start(wait=wait)

    def shutdown(self, timeout: float = 10.0) -> Optional[int]:
        """Ask the worker to stop (cancelling its jobs), wait for it, kill it if it does not; returns its code."""
        if self._process is None:
            return None
        process = self._process
        if self.alive:
            self._stopping = True
            try:
                self._send("shutdown", {})
            except MedDLError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the worker did not stop within %.0f s; killing it", timeout)
            deadline = time.monotonic() + 2.0
            while not self._exit_seen and time.monotonic() < deadline:
                self.poll(timeout=0.05)  # deliver the worker's last replies (cancelled jobs)
        self._kill(reason="the worker was shut down")
        return process.returncode

    def __enter__(self) -> WorkerClient:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # -- requests -------------------------------------------------------------------------------------
    def submit(
        self,
        method: str,
        params: Optional[Dict[str, Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
        on_done: Optional[DoneCallback] = None,
    ) -> Job:
        """Send a request; returns at once with a :class:`Job` that :meth:`poll` keeps up to date.

        ``on_progress(fraction, message)`` and ``on_done(job)`` run inside :meth:`poll`. A worker that died
        since the last request is restarted first (``on_restart`` is told why).
        """
        self.poll()  # apply replies that arrived, so a dead worker's jobs fail with its exit code
        if not self.alive:
            if self._process is not None:
                reason = self._exit_problem(self._process.poll())
                self._kill(reason=reason)
                self.restarts += 1
                if self.on_restart is not None:
                    self._callback(self.on_restart, reason)
            # Without waiting: the request queues behind hello in the worker; poll() delivers both.
            self.start(wait=False)
        return self._send(method, params or {}, on_progress, on_done)

    def call(
        self,
        method: str,
        params: Optional[Dict[str, Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Submit and wait; returns the result or raises the job's error (InputError, ModelError, Cancelled ...).

        On ``timeout`` the job is cancelled and :class:`TimeoutError` raised. Not for a GUI thread.
        """
        job = self.submit(method, params, on_progress=on_progress)
        try:
            self.wait(job, timeout)
        except TimeoutError:
            self.cancel(job)
            raise
        if job.state == "done":
            return job.result or {}
        raise job.error or MedDLError(f"job {job.id} ({method}) ended in state {job.state}")

    def wait(self, job: Job, timeout: Optional[float] = None) -> Job:
        """Poll until ``job`` is finished; :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job.id} ({job.method}) did not finish within {timeout} s")
            self.poll(timeout=0.1 if remaining is None else min(0.1, remaining))
        return job

    def cancel(self, job: Union[Job, str]) -> None:
        """Ask the worker to cancel a job; it ends as ``cancelled`` once the worker confirms."""
        target = self._jobs.get(job) if isinstance(job, str) else job
        if target is None or target.done or not self.alive:
            return
        self._send("cancel", {"id": target.id})

    def status(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The worker's jobs, loaded models and memory (answered even while a job runs)."""
        return self.call("status", {}, timeout=timeout)

    @property
    def jobs(self) -> List[Job]:
        """Jobs sent and not finished yet."""
        return [job for job in self._jobs.values() if not job.done]

    # -- replies --------------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> int:
        """Apply the replies that arrived (waiting up to ``timeout`` s for the first); fires callbacks.

        Returns the number of messages handled. Call it from one thread (e.g. a Qt ``QTimer``).
        """
        handled = 0
        block = timeout > 0
        while True:
            try:
                kind, generation, payload = self._replies.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return handled
            block = False
            handled += 1
            if generation != self._generation:
                continue  # left over from a worker that was replaced
            if kind == "line":
                self._handle_line(payload)
            elif kind == "exit":
                self._handle_exit(payload)

    def _handle_line(self, line: str) -> None:
        try:
            message = decode(line)
        except ProtocolError:
            # Not ours (a library printed before the worker took over stdout): log it, never act on it.
            logger.warning("ignored a non-protocol line from the worker: %r", line[:200])
            return
        job = self._jobs.get(str(message.get("id")))
        event = message.get("event")
        if job is None:
            if event == ERROR:
                logger.warning("worker error without a job: %s", (message.get("error") or {}).get("message"))
            return
        if event == ACCEPTED:
            job.queue_position = int(message.get("queue_position", 0))
            ahead = job.queue_position
            job.message = "running" if ahead == 0 else f"queued: {ahead} job{'s' if ahead != 1 else ''} ahead"
        elif event == PROGRESS:
            position = message.get("queue_position")
            if position is not None:
                job.queue_position = int(position)
            if position == 0 and job.state == "queued":
                job.state = "running"
            job.progress = float(message.get("fraction", job.progress))
            job.message = str(message.get("message", ""))
            if job.on_progress is not None:
                self._callback(job.on_progress, job.progress, job.message)
        elif event == RESULT:
            job.result = message.get("result") or {}
            job.progress = 1.0
            self._finish(job, "done")
        elif event == ERROR:
            job.error = error_from_dict(message.get("error"))
            self._finish(job, "cancelled" if isinstance(job.error, Cancelled) else "failed")

    def _handle_exit(self, code: Optional[int]) -> None:
        self._exit_seen = True
        problem = self._exit_problem(code)
        if not self._stopping:
            logger.error(problem)
        for job in list(self._jobs.values()):
            if not job.done:
                job.error = self._exited(problem, code)
                self._finish(job, "failed")

    def _exit_problem(self, code: Optional[int]) -> str:
        if self._stopping:
            return "the worker was shut down"
        cause = self._last_error_line()
        cause = f": {cause}" if cause else ""
        return f"worker process exited unexpectedly (code {code}){cause}; see log {self.log_path}"

    @staticmethod
    def _exited(problem: str, code: Optional[int]) -> WorkerExited:
        """The error pending jobs get; ``returncode`` 3 means torch/MONAI are missing (offer to install them)."""
        error = WorkerExited(problem)
        error.returncode = code
        return error

    def _last_error_line(self) -> str:
        """The last error this worker wrote to the log (a missing torch, a Python exception), if any."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(self._log_offset, os.path.getsize(self.log_path) - 8192))
                lines = log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        # After start-up only a fatal error is quoted: a job's earlier, handled error is not why the process died.
        started = any(" ready (pid " in line for line in lines)
        for line in reversed(lines):
            text = line.strip()
            if text.startswith("Fatal Python error"):
                return text[:300]
            if started:
                continue
            if " ERROR " in text or " CRITICAL " in text:
                return text.split(": ", 1)[-1][:300]  # drop the time stamp and logger name
            if (
                text
                and text.split(":", 1)[0].replace(".", "").isidentifier()
                and text.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt", "Exit"))
            ):
                return text[:300]
        return ""

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.monotonic()
        self._jobs.pop(job.id, None)
        if job.on_done is not None:
            self._callback(job.on_done, job)

    @staticmethod
    def _callback(function: Callable, *args: Any) -> None:
        # A failing GUI callback must not leave the client's bookkeeping half-updated or stop the timer.
        try:
            function(*args)
        except Exception:  # noqa: BLE001
            logger.exception("a meddl.client callback raised")

    # -- process plumbing -----------------------------------------------------------------------------
    def _worker_env(self) -> Dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        # Run the engine this client belongs to, even from an interpreter where meddl is not installed.
        # (A source checkout or a Slicer module folder; an installed site-packages is never put on another
        # interpreter's path, whose compiled packages may not match.)
        package_root = Path(__file__).resolve().parent.parent
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if package_root.name not in ("site-packages", "dist-packages") and str(package_root) not in paths:
            env["PYTHONPATH"] = os.pathsep.join([str(package_root), *paths])
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def _spawn(self) -> None:
        self._kill(reason="the worker was replaced")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # this worker's part
        self._log_handle = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in _kill
        command = [self.python_executable, "-m", "meddl.worker", "--log-file", str(self.log_path), *self.worker_args]
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform.startswith("win") else 0
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_handle,
                env=self._worker_env(),
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                creationflags=flags,
            )
        except OSError as problem:
            self._close_log()
            raise MedDLError(f"cannot start the worker ({problem})", self.python_executable) from None
        self._stopping = False
        self._exit_seen = False
        self._generation += 1
        reader = threading.Thread(
            target=self._read,
            args=(self._process, self._generation),
            name=f"meddl-client-reader-{self._generation}",
            daemon=True,
        )
        reader.start()
        logger.info("started worker pid %d: %s", self._process.pid, " ".join(command))

    def _read(self, process: subprocess.Popen, generation: int) -> None:
        """Reader thread: move reply lines into the queue; the exit code last."""
        try:
            for line in process.stdout:
                if line.strip():
                    self._replies.put(("line", generation, line))
        except (OSError, ValueError):
            pass
        self._replies.put(("exit", generation, process.wait()))

    def _send(
        self,
        method: str,
        params: Dict[str, Any],
        on_progress: Optional[ProgressCallback] = None,
        on_done: Optional[DoneCallback] = None,
    ) -> Job:
        job = Job(f"{method}-{next(self._ids)}", method, params, on_progress, on_done)
        line = encode(request(job.id, method, params))
        process = self._process
        if process is None or process.poll() is not None:
            raise WorkerExited(f"the worker is not running; see log {self.log_path}")
        self._jobs[job.id] = job
        try:
            with self._write_lock:
                process.stdin.write(line)
                process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            # The reader thread reports the exit; the job fails with the exit code when poll() sees it.
            logger.warning("could not send %s: the worker's stdin is closed", method)
        return job

    def _kill(self, reason: str = "the worker was stopped") -> None:
        process = self._process
        code: Optional[int] = None
        if process is not None:
            if process.poll() is not None and not self._stopping:
                code = process.returncode
                reason = self._exit_problem(code)  # it died on its own: say so
            elif process.poll() is None:
                process.kill()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover - the OS did not reap it
                    logger.error("worker pid %d did not die after kill", process.pid)
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._process = None
        self._generation += 1  # replies still queued from the old worker are ignored
        for job in list(self._jobs.values()):
            if not job.done:
                job.error = self._exited(reason, code)
                self._finish(job, "failed")
        self._jobs.clear()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
