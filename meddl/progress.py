"""Progress reporting and cooperative cancellation shared by the CLI, the worker and long jobs.

Long functions take ``progress: ProgressCallback`` (fraction in [0, 1] and a short message) and
``cancel: CancelToken``; they call ``cancel.check()`` between units of work.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from meddl.errors import Cancelled

__all__ = ["ProgressCallback", "CancelToken", "no_progress", "scaled"]

ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that ignores everything."""


def scaled(progress: Optional[ProgressCallback], start: float, stop: float) -> ProgressCallback:
    """Map a sub-task's [0, 1] progress into [start, stop] of the parent's callback."""
    parent = progress or no_progress

    def report(fraction: float, message: str) -> None:
        parent(start + (stop - start) * min(max(fraction, 0.0), 1.0), message)

    return report


class CancelToken:
    """Set from another thread (the worker's reader, a signal handler); checked by the job."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` when cancellation was requested."""
        if self._event.is_set():
            raise Cancelled()
