"""The warm background worker: ``python -m meddl.worker`` speaks JSON lines over stdin/stdout.

Slicer never runs torch in its GUI process. It starts one long-lived worker (through
:class:`meddl.client.WorkerClient`), which keeps models loaded between requests, runs one compute job at
a time, streams progress and honours cancel requests while a job runs. The protocol is specified in
``docs/protocol.md`` and its constants live in :mod:`meddl.protocol`.
"""

from meddl.worker.cache import ModelCache
from meddl.worker.server import Worker, main

__all__ = ["ModelCache", "Worker", "main"]
