"""``python -m meddl`` runs the CLI (the guard keeps spawned child processes from re-running it)."""

import sys

from meddl.cli import main

if __name__ == "__main__":
    sys.exit(main())
