"""The worker process: a reader loop on stdin, job queues on their own threads, replies on the real stdout.

Threads:

* the main thread reads requests and answers ``hello``, ``status``, ``cancel`` and ``shutdown`` at once,
  so the worker stays responsive while a job runs;
* the *inference* queue thread runs ``load_model``, ``segment``, ``classify`` and ``submit_correction``
  one at a time (one GPU job at a time);
* the *long* queue thread runs ``update`` at a lower OS priority, so an update never makes a segmentation
  wait.

Only protocol messages reach the real stdout: at start-up file descriptor 1 is re-pointed at stderr, so
stray prints from any library (Python or C) end up in the log instead of corrupting the stream.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import threading
import time
import traceback
from typing import IO, Any, Callable, Deque, Dict, List, Optional, Union

from meddl import __version__
from meddl.errors import Cancelled, MedDLError
from meddl.progress import CancelToken
from meddl.protocol import (
    LONG_METHODS,
    MAX_LINE_BYTES,
    ProtocolError,
    accepted,
    decode,
    decode_request,
    default_log_path,
    encode,
    error,
    progress,
    result,
)
from meddl.worker.cache import ModelCache
from meddl.worker.handlers import Handlers, capabilities, memory_usage

__all__ = ["Worker", "JobQueue", "WorkerJob", "main", "default_num_threads", "EXIT_MISSING_DEPENDENCY"]

logger = logging.getLogger("meddl.worker")
RequestId = Union[str, int]
# Exit code when torch/MONAI cannot be imported (distinct from a crash, so a client can offer to install them).
EXIT_MISSING_DEPENDENCY = 3
# Progress events of one job are sent at most this often (the last one of a message always goes out).
PROGRESS_INTERVAL_S = 0.1


def default_num_threads() -> int:
    """``MEDDL_NUM_THREADS`` if set, else all cores but one (left to the GUI), at most 8."""
    value = os.environ.get("MEDDL_NUM_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            logger.warning("ignoring MEDDL_NUM_THREADS=%r (not an integer)", value)
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class WorkerJob:
    """One queued or running request."""

    def __init__(self, request_id: RequestId, method: str, params: Dict[str, Any], queue: str) -> None:
        self.id = request_id
        self.method = method
        self.params = params
        self.queue = queue
        self.state = "queued"
        self.fraction = 0.0
        self.message = "queued"
        self.cancel = CancelToken()
        self.created = time.time()
        self.started: Optional[float] = None
        self._last_sent = 0.0

    def describe(self, queue_position: Optional[int]) -> Dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "queue": self.queue,
            "state": self.state,
            "queue_position": queue_position,
            "fraction": round(self.fraction, 4),
            "message": self.message,
            "elapsed_s": round(time.time() - (self.started or self.created), 3),
        }


class JobQueue:
    """A FIFO of jobs served by one thread; reports each waiting job's place when it changes."""

    def __init__(
        self, name: str, run: Callable[[WorkerJob], None], send: Callable[[Dict], None], nice: int = 0
    ) -> None:
        self.name = name
        self._run = run
        self._send = send
        self._nice = nice
        self._waiting: Deque[WorkerJob] = collections.deque()
        self._running: Optional[WorkerJob] = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"meddl-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, job: WorkerJob) -> int:
        """Queue ``job``; returns how many jobs are ahead of it (0: it starts now)."""
        with self._condition:
            ahead = len(self._waiting) + (1 if self._running is not None else 0)
            self._waiting.append(job)
            self._condition.notify()
        return ahead

    def remove(self, job: WorkerJob) -> bool:
        """Take a job that has not started off the queue; False when it already runs (or ran)."""
        with self._condition:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
        self._announce_positions()
        return True

    def position(self, job: WorkerJob) -> Optional[int]:
        with self._condition:
            if job is self._running:
                return 0
            if job in self._waiting:
                return list(self._waiting).index(job) + (1 if self._running is not None else 0)
        return None

    def jobs(self) -> List[WorkerJob]:
        with self._condition:
            return ([self._running] if self._running is not None else []) + list(self._waiting)

    def stop(self) -> List[WorkerJob]:
        """Stop taking jobs; returns the ones still waiting (the caller cancels them)."""
        with self._condition:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._condition.notify_all()
        if running is not None:
            running.cancel.cancel()
        return waiting

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _announce_positions(self) -> None:
        with self._condition:
            offset = 1 if self._running is not None else 0
            waiting = list(self._waiting)
        for index, job in enumerate(waiting):
            ahead = index + offset
            if ahead == 0:
                continue  # about to start: its "started" progress follows at once
            job.message = f"queued: {ahead} job{'s' if ahead != 1 else ''} ahead"
            self._send(progress(job.id, 0.0, job.message, queue_position=ahead))

    def _serve(self) -> None:
        if self._nice:
            _lower_thread_priority(self._nice)
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                job.state = "running"  # under the lock: status never shows the running job as queued
                job.started = time.time()
                self._running = job
            self._announce_positions()
            final = None
            try:
                final = self._run(job)
            finally:
                # Free the slot before the final reply goes out, so a request sent in answer to it is never
                # told that this finished job is still ahead of it.
                with self._condition:
                    self._running = None
                if final is not None:
                    self._send(final)


def _release_cached_gpu_memory() -> None:
    """Hand the blocks a finished job cached back to the driver (Slicer's renderer shares the GPU); the loaded
    models stay."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _lower_thread_priority(nice: int) -> None:
    """Lower this thread's CPU priority (Linux schedules threads individually); elsewhere a no-op."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as problem:
            logger.debug("cannot lower the priority of the long-job thread: %s", problem)


class Worker:
    """Serves requests from ``requests`` (binary lines) and writes replies to ``replies`` (text)."""

    def __init__(
        self,
        requests: IO[bytes],
        replies: IO[str],
        log_file: Optional[str] = None,
        num_threads: int = 1,
        cache_size: int = 2,
    ) -> None:
        self._requests = requests
        self._replies = replies
        self._write_lock = threading.Lock()
        self.log_file = log_file
        self.num_threads = num_threads
        self.cache = ModelCache(cache_size)
        self.handlers = Handlers(self.cache)
        self._jobs: Dict[RequestId, WorkerJob] = {}
        self._jobs_lock = threading.Lock()
        self.inference = JobQueue("inference", self._run_job, self.send)
        self.long = JobQueue("long", self._run_job, self.send, nice=10)
        self._started = time.time()
        self._capabilities: Optional[Dict[str, Any]] = None
        self._stream_broken = False

    # -- output ---------------------------------------------------------------------------------------
    def send(self, message: Dict[str, Any]) -> None:
        """Write one reply line; a closed stdout (client gone) is noted, not raised."""
        try:
            line = encode(message)
        except (TypeError, ValueError, RecursionError) as problem:  # a result that is not JSON-able
            line = encode(error(message.get("id"), self._internal(problem)))
        with self._write_lock:
            if self._stream_broken:
                return
            try:
                self._replies.write(line)
                self._replies.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._stream_broken = True
                logger.warning("the client closed the protocol stream; stopping")

    # -- main loop ------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Answer requests until ``shutdown`` or end of input; returns the process exit code."""
        self._capabilities = capabilities(self.num_threads, self.log_file)
        self.inference.start()
        self.long.start()
        logger.info(
            "worker %s ready (pid %d, device %s, %d threads)",
            __version__,
            os.getpid(),
            self._capabilities["device"],
            self.num_threads,
        )
        try:
            while not self._stream_broken:
                line = self._read_line()
                if line is None:
                    logger.info("end of input; stopping")
                    break
                if not line.strip():
                    continue
                if self.handle_line(line) == "shutdown":
                    logger.info("shutdown requested; stopping")
                    break
        finally:
            self._stop()
        return 0

    def _read_line(self) -> Optional[bytes]:
        """Next request line; an over-long line is skipped to its end and answered with an error."""
        line = self._requests.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:
                rest = self._requests.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            self.send(error(None, ProtocolError(f"request line longer than {MAX_LINE_BYTES} bytes; skipped")))
            return b"\n"
        return line

    def handle_line(self, line: bytes) -> Optional[str]:
        """Dispatch one request line; never raises for a bad request (it gets an error reply)."""
        request_id: Optional[RequestId] = None
        try:
            message = decode(line)
            raw_id = message.get("id")
            request_id = raw_id if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
            request_id, method, params = decode_request(message)
            if method == "hello":
                self.send(result(request_id, self._capabilities or {}))
            elif method == "status":
                self.send(result(request_id, self.status()))
            elif method == "cancel":
                self.send(result(request_id, self.cancel(params.get("id"))))
            elif method == "shutdown":
                self.send(result(request_id, {"stopping": True}))
                return "shutdown"
            else:
                self._enqueue(request_id, method, params)
        except MedDLError as problem:
            logger.warning("request %r refused: %s", request_id, problem)
            self.send(error(request_id, problem))
        except Exception as problem:  # noqa: BLE001 - a bad request must never stop the worker
            self.send(error(request_id, self._internal(problem)))
        return None

    def _enqueue(self, request_id: RequestId, method: str, params: Dict[str, Any]) -> None:
        with self._jobs_lock:
            if request_id in self._jobs:
                raise ProtocolError(f"request id {request_id!r} is already in use by a pending job")
            queue = self.long if method in LONG_METHODS else self.inference
            job = WorkerJob(request_id, method, params, queue.name)
            self._jobs[request_id] = job
        # 'accepted' goes out before the job can start, so the client always sees it first.
        with self._write_lock:
            ahead = queue.put(job)
            line = encode(accepted(request_id, queue.name, ahead))
            if not self._stream_broken:
                try:
                    self._replies.write(line)
                    self._replies.flush()
                except (BrokenPipeError, OSError, ValueError):
                    self._stream_broken = True
        logger.info("job %r (%s) accepted on the %s queue, %d ahead", request_id, method, queue.name, ahead)

    # -- jobs -----------------------------------------------------------------------------------------
    def _run_job(self, job: WorkerJob) -> Dict[str, Any]:
        """Run one job; returns its final reply (the queue sends it once the job has left the queue)."""
        job.message = "started"

        def report(fraction: float, message: str) -> None:
            job.fraction = float(fraction)
            now = time.monotonic()
            if message == job.message and now - job._last_sent < PROGRESS_INTERVAL_S and fraction < 1.0:
                return
            job.message = message
            job._last_sent = now
            self.send(progress(job.id, fraction, message, queue_position=0))

        report(0.0, "started")
        try:
            job.cancel.check()
            value = self.handlers.run(job.method, job.params, report, job.cancel)
            job.state = "done"
            logger.info("job %r (%s) done in %.3f s", job.id, job.method, time.time() - job.started)
            return result(job.id, value)
        except Cancelled as problem:
            job.state = "cancelled"
            logger.info("job %r (%s) cancelled", job.id, job.method)
            return error(job.id, problem)
        except MedDLError as problem:
            job.state = "failed"
            logger.warning("job %r (%s) failed: %s", job.id, job.method, problem)
            return error(job.id, problem)
        except Exception as problem:  # noqa: BLE001 - one failing job must not stop the worker
            job.state = "failed"
            return error(job.id, self._internal(problem))
        finally:
            with self._jobs_lock:
                self._jobs.pop(job.id, None)
            _release_cached_gpu_memory()

    def _internal(self, problem: BaseException) -> MedDLError:
        logger.error(
            "internal error:\n%s", "".join(traceback.format_exception(type(problem), problem, problem.__traceback__))
        )
        text = f"{type(problem).__name__}: {problem}"
        if "out of memory" in str(problem).lower():
            text += " (try device 'cpu' or a smaller volume)"
        where = f"; traceback in {self.log_file}" if self.log_file else ""
        internal = MedDLError(f"internal error: {text}{where}")
        internal.kind = "internal"
        return internal

    def cancel(self, target: Any) -> Dict[str, Any]:
        """Cancel a queued job (it is dropped) or a running one (it stops at its next check)."""
        if target is None:
            raise ProtocolError("'cancel' needs the parameter 'id' (the id of the job to cancel)")
        with self._jobs_lock:
            job = self._jobs.get(target)
        if job is None:
            return {"id": target, "state": "unknown", "cancelled": False}
        queue = self.long if job.queue == "long" else self.inference
        if queue.remove(job):
            job.state = "cancelled"
            with self._jobs_lock:
                self._jobs.pop(job.id, None)
            self.send(error(job.id, Cancelled("cancelled before it started")))
            return {"id": target, "state": "cancelled", "cancelled": True}
        job.cancel.cancel()
        return {"id": target, "state": "cancelling", "cancelled": True}

    def status(self) -> Dict[str, Any]:
        jobs = []
        for queue in (self.inference, self.long):
            for job in queue.jobs():
                if job.state in ("done", "failed", "cancelled"):
                    continue  # its final reply is out; the queue thread is just clearing it
                jobs.append(job.describe(queue.position(job)))
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 3),
            "jobs": jobs,
            "models": self.cache.describe(),
            "memory": memory_usage(),
            "log_file": self.log_file,
        }

    def _stop(self) -> None:
        for queue in (self.inference, self.long):
            for job in queue.stop():
                job.state = "cancelled"
                self.send(error(job.id, Cancelled("the worker is shutting down")))
        for queue in (self.inference, self.long):
            if not queue.join(timeout=10.0):
                logger.warning("the %s job did not stop within 10 s of being cancelled", queue.name)


def _claim_protocol_streams() -> tuple:
    """Keep private handles to the real stdin/stdout and point fds 0/1 elsewhere.

    Afterwards ``print`` (and any C library writing to fd 1) lands on stderr, and nothing but the worker
    can read protocol lines from stdin.
    """
    sys.stdout.flush()
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    protocol_in = os.fdopen(os.dup(0), "rb")  # buffered: readline returns as soon as a line is complete
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return protocol_in, protocol_out


def _same_file(stream: IO, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):
        return False


def _configure_logging(log_file: Optional[str], debug: bool) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers: List[logging.Handler] = []
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    # The client may point our stderr at the log file itself; then one handler is enough.
    if not (log_file and _same_file(sys.stderr, log_file)):
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.captureWarnings(True)


def _warm_up_imports(num_threads: int) -> None:
    """Import the heavy engine now, so the cold start pays for it and the first request does not."""
    # The engine reads MEDDL_NUM_THREADS on every job; pin it so that jobs keep the worker's choice.
    os.environ["MEDDL_NUM_THREADS"] = str(num_threads)
    from meddl.startup import import_engine

    import_engine()
    from meddl.infer import configure_threads

    configure_threads(num_threads)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meddl.worker",
        description="meddl background worker: JSON-lines requests on stdin, replies on stdout (docs/protocol.md).",
    )
    parser.add_argument(
        "--log-file",
        default=None,
        help="log file (default: <user cache>/meddl/logs/worker-<pid>.log; 'none' for stderr only)",
    )
    parser.add_argument(
        "--cache-size",
        type=int,
        default=int(os.environ.get("MEDDL_MODEL_CACHE_SIZE", "2")),
        help="how many loaded models to keep (default 2)",
    )
    parser.add_argument("--debug", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    protocol_in, protocol_out = _claim_protocol_streams()
    log_file: Optional[str] = args.log_file
    if log_file is None:
        log_file = str(default_log_path())
    elif log_file.lower() == "none":
        log_file = None
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        log_file = os.path.abspath(log_file)
    _configure_logging(log_file, args.debug)
    num_threads = default_num_threads()
    started = time.perf_counter()
    try:
        _warm_up_imports(num_threads)
    except ImportError as problem:
        # The usual first-run problem inside Slicer: torch or MONAI not installed in this interpreter. One line
        # (the client quotes it in its error), then exit.
        logger.error(
            "%s: cannot import the engine's dependencies (%s); install torch and MONAI into this Python",
            sys.executable,
            problem,
        )
        return EXIT_MISSING_DEPENDENCY
    logger.info("engine imported in %.2f s", time.perf_counter() - started)
    worker = Worker(protocol_in, protocol_out, log_file=log_file, num_threads=num_threads, cache_size=args.cache_size)
    code = worker.serve()
    logging.shutdown()
    try:
        protocol_out.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
