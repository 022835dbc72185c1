"""The worker protocol: JSON lines over stdin/stdout (specification: ``docs/protocol.md``).

Pure Python (no torch, no MONAI) so that ``meddl.client`` can use it inside Slicer's GUI process.

A request is one line ``{"id": ..., "method": ..., "params": {...}}``; every reply is one line
``{"id": ..., "event": ...}`` where ``event`` is ``accepted``, ``progress``, ``result`` or ``error``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from meddl.errors import EXIT_USAGE, Cancelled, InputError, MedDLError, ModalityError, ModelError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_LINE_BYTES",
    "QUICK_METHODS",
    "INFERENCE_METHODS",
    "LONG_METHODS",
    "METHODS",
    "REQUIRED_PARAMS",
    "EVENTS",
    "ACCEPTED",
    "PROGRESS",
    "RESULT",
    "ERROR",
    "ProtocolError",
    "NotAvailable",
    "WorkerExited",
    "encode",
    "decode",
    "decode_request",
    "request",
    "accepted",
    "progress",
    "result",
    "error",
    "error_from_dict",
    "default_log_path",
]

# Raised whenever a message changes in a way an older peer would misread. The client refuses a worker
# that speaks another version (e.g. an old engine installed in Slicer's Python) with a clear message.
PROTOCOL_VERSION = 1

# A request line longer than this is refused (and skipped) rather than buffered without bound.
MAX_LINE_BYTES = 1 << 20

# Answered at once by the worker's reader thread, even while a job runs.
QUICK_METHODS = ("hello", "status", "cancel", "shutdown")
# One at a time, in order, on the inference queue (the GPU is used by one job at a time).
INFERENCE_METHODS = ("load_model", "segment", "classify", "submit_correction")
# Long jobs (continual updates) run on their own queue at a lower priority, so inference never waits on them.
LONG_METHODS = ("update",)
METHODS = QUICK_METHODS + INFERENCE_METHODS + LONG_METHODS
# Parameters a request must carry (all path strings, except cancel's job id); checked before a job is queued.
REQUIRED_PARAMS = {
    "cancel": ("id",),
    "load_model": ("model",),
    "segment": ("model", "input", "output"),
    "classify": ("model", "input"),
    "submit_correction": ("model", "image"),  # plus 'labelmap' (segmentation) or 'label' (a class name)
    "update": ("model",),
}

ACCEPTED = "accepted"
PROGRESS = "progress"
RESULT = "result"
ERROR = "error"
EVENTS = (ACCEPTED, PROGRESS, RESULT, ERROR)


class ProtocolError(MedDLError):
    """A request the worker cannot parse or does not know (malformed JSON, unknown method, bad params)."""

    exit_code = EXIT_USAGE
    kind = "bad_request"


class NotAvailable(MedDLError):
    """The method exists in the protocol but this engine install lacks the part that implements it."""

    kind = "not_available"


class WorkerExited(MedDLError):
    """The worker process ended while jobs were pending (crash, kill, out of memory).

    ``returncode`` is the process's exit code when known (3: torch or MONAI could not be imported; negative:
    killed by that signal on POSIX).
    """

    kind = "worker_exited"
    returncode: Optional[int] = None


_ERROR_KINDS = {
    cls.kind: cls
    for cls in (MedDLError, InputError, ModalityError, ModelError, Cancelled, ProtocolError, NotAvailable, WorkerExited)
}


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: send them as null rather than produce a line a strict parser refuses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(message: Dict[str, Any]) -> str:
    """One message as one line of JSON (with the trailing newline). Paths and other objects become strings."""
    return json.dumps(_finite(message), default=_default, allow_nan=False, separators=(",", ":")) + "\n"


def _default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars, without importing numpy
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return str(value)


def decode(line: Union[str, bytes]) -> Dict[str, Any]:
    """Parse one line into a message object; :class:`ProtocolError` when it is not a JSON object."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError(f"line of {len(line)} bytes is longer than the {MAX_LINE_BYTES}-byte limit")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("line is not valid UTF-8") from None
    text = line.strip()
    try:
        message = json.loads(text)
    except json.JSONDecodeError as problem:
        detail = f"{problem.msg} at column {problem.colno}"
        raise ProtocolError(f"line is not valid JSON ({detail}): {text[:60]!r}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


def decode_request(message: Dict[str, Any]) -> tuple:
    """Check a decoded request; returns ``(id, method, params)`` or raises :class:`ProtocolError`."""
    request_id = message.get("id")
    if request_id is None or not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ProtocolError("a request needs an 'id' (string or integer)")
    method = message.get("method")
    if not isinstance(method, str):
        raise ProtocolError("a request needs a 'method' (string)")
    if method not in METHODS:
        raise ProtocolError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(f"'params' of '{method}' must be an object")
    for name in REQUIRED_PARAMS.get(method, ()):
        value = params.get(name)
        if value is None:
            raise ProtocolError(f"'{method}' needs the parameter '{name}'")
        wanted = (str, int) if name == "id" else (str,)
        if not isinstance(value, wanted) or isinstance(value, bool) or value == "":
            kind = "a job id" if name == "id" else "a non-empty path string"
            raise ProtocolError(f"parameter '{name}' of '{method}' must be {kind}")
    return request_id, method, params


def request(request_id: Union[str, int], method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"id": request_id, "method": method, "params": dict(params or {})}


def accepted(request_id: Union[str, int], queue: str, queue_position: int) -> Dict[str, Any]:
    """The job is queued; ``queue_position`` jobs are ahead of it (0: it runs now)."""
    return {"id": request_id, "event": ACCEPTED, "queue": queue, "queue_position": int(queue_position)}


def progress(
    request_id: Union[str, int], fraction: float, message: str, queue_position: Optional[int] = None
) -> Dict[str, Any]:
    reply = {
        "id": request_id,
        "event": PROGRESS,
        "fraction": round(min(max(float(fraction), 0.0), 1.0), 4),
        "message": str(message),
    }
    if queue_position is not None:
        reply["queue_position"] = int(queue_position)
    return reply


def result(request_id: Union[str, int, None], value: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": request_id, "event": RESULT, "result": value}


def error(request_id: Union[str, int, None], problem: MedDLError) -> Dict[str, Any]:
    return {"id": request_id, "event": ERROR, "error": problem.to_dict()}


def error_from_dict(data: Any) -> MedDLError:
    """Rebuild the error a worker sent as the matching :class:`MedDLError` subclass (by ``kind``)."""
    if not isinstance(data, dict):
        return MedDLError(f"worker sent a malformed error: {data!r}")
    cls = _ERROR_KINDS.get(str(data.get("kind")), MedDLError)
    problem = data.get("problem") or data.get("message") or "unknown error"
    built = cls(problem, data.get("path"))
    if cls is MedDLError and data.get("kind"):
        built.kind = str(data["kind"])  # keep e.g. "internal" for the caller to see
    return built


def default_log_path(pid: Optional[int] = None) -> Path:
    """``<user cache>/meddl/logs/worker-<pid>.log`` (XDG cache, ``%LOCALAPPDATA%``, else the temp folder)."""
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "meddl" / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "meddl-logs"
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"worker-{pid if pid is not None else os.getpid()}.log"
