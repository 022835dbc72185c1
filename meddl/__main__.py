"""``python -m meddl`` runs the CLI (the guard keeps spawned child processes from re-running it)."""

from meddl.cli import command

if __name__ == "__main__":
    command()
