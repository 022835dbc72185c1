"""One worker job at a time, driven by a GUI timer: the state machine behind the modules' buttons, without Qt.

The widget calls :meth:`JobRunner.begin` from a button and :meth:`JobRunner.tick` from a ``qt.QTimer``; nothing
here blocks longer than one tick's ``timeout`` (a few milliseconds), not even the worker's cold start, which runs
in the background. Being Qt-free, it is tested headless against the real worker.
"""

from __future__ import annotations

from typing import Callable, Optional

from meddl.errors import Cancelled
from MedDLSegmentLib.session import EngineSession

__all__ = ["JobRunner"]


class JobRunner:
    """Start the worker if needed, submit, follow progress, finish.

    Attributes:
        job: the running :class:`meddl.client.Job`, or None.
        progress, message: what to show in the progress bar and status line.
        error: why the last job failed or was cancelled (None after success).
    """

    def __init__(self, session: EngineSession) -> None:
        self.session = session
        self.job = None
        self.progress = 0.0
        self.message = ""
        self.error: Optional[BaseException] = None
        self._submit: Optional[Callable[[], object]] = None
        self._on_done: Optional[Callable[[object], Optional[str]]] = None
        self._cancel_before_start = False

    @property
    def busy(self) -> bool:
        return self._submit is not None or self.job is not None

    def begin(self, submit: Callable[[], object], on_done: Callable[[object], Optional[str]]) -> None:
        """Queue ``submit()`` (returns a client Job) for when the worker is up; ``on_done(job)`` runs on success and
        may return the status line to show.

        Raises:
            RuntimeError: a job is already running.
        """
        if self.busy:
            raise RuntimeError("a MedDL job is already running; wait for it or cancel it")
        self._submit, self._on_done = submit, on_done
        self.progress, self.error, self._cancel_before_start = 0.0, None, False
        self.message = "Submitting..."
        if not self.session.worker_running:
            self.session.start_worker_in_background()
            self.message = "Starting the engine (first time only)..."

    def cancel(self) -> None:
        """Cancel the job (or the submission waiting for the worker to start)."""
        if self._submit is not None:
            self._cancel_before_start = True  # the worker keeps starting; the job is never sent
        elif self.job is not None:
            self.session.cancel(self.job)
            self.message = "Cancelling..."

    def tick(self, timeout: float = 0.01) -> Optional[str]:
        """Advance by at most ``timeout`` seconds of waiting.

        Returns:
            ``"done"``, ``"failed"`` or ``"cancelled"`` once, when the job ends (``error`` says why it failed);
            None while it runs or when idle.
        """
        if not self.busy:
            return None
        if self._cancel_before_start:
            return self._end("cancelled", Cancelled("cancelled before it started"))
        if self._submit is not None:
            try:
                if self.session.worker_starting(timeout):
                    return None
                submit, self._submit = self._submit, None
                self.job = submit()
            except Exception as error:
                return self._end("failed", error)
        self.session.poll(timeout)
        job = self.job
        self.progress = float(job.progress)
        if job.state == "queued" and job.queue_position:
            self.message = f"Waiting: {job.queue_position} job(s) ahead"
        else:
            self.message = job.message
        if not job.done:
            return None
        if job.state != "done":
            return self._end(job.state, job.error)
        try:
            summary = self._on_done(job)
        except Exception as error:
            return self._end("failed", error)
        state = self._end("done", None)
        self.message = summary if isinstance(summary, str) else "Done."
        return state

    def _end(self, state: str, error: Optional[BaseException]) -> str:
        self.job, self._submit, self._on_done = None, None, None
        self.error, self._cancel_before_start = error, False
        if state == "done":
            self.progress = 1.0
        elif state == "cancelled":
            self.message = "Cancelled."
        else:
            self.message = f"Failed: {error}"
        return state
