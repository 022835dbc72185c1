"""``python -m meddl.worker``."""

import os
import sys

from meddl.worker.server import main

code = main()
# Everything is flushed and every output file was written atomically; skipping the interpreter's teardown
# of torch and MONAI (seconds on a busy machine) lets a client that restarts the worker wait less.
sys.stderr.flush()
os._exit(code)
