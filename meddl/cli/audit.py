"""``meddl audit``: print a model home's audit log and verify its hash chain."""

from __future__ import annotations

import argparse
import json

from meddl.cli import emit

__all__ = ["register", "run"]

EXIT_TAMPERED = 3


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="print and verify the audit log of a model home",
        description="Every correction, update, gate decision, promotion and rollback, hash-chained.",
    )
    parser.add_argument("--model", "--home", dest="home", required=True, help="model home folder")
    parser.add_argument("--verify", action="store_true", help="only verify the chain (exit 3 when it is broken)")
    parser.add_argument("--tail", type=int, default=0, help="print only the last N entries")
    parser.set_defaults(func=run)


def _describe(entry: dict) -> str:
    details = {k: v for k, v in entry.items() if k not in ("seq", "time", "event", "prev", "hash", "files")}
    text = json.dumps(details, default=str, separators=(",", ":"))
    return f"{entry.get('seq', '?'):>5} {entry.get('time', '?')} {entry.get('event', '?'):26} {text[:160]}"


def run(args: argparse.Namespace) -> int:
    from meddl.continual import ModelHome

    home = ModelHome(args.home)
    report = home.verify_audit()
    status = f"audit log {home.audit_log.path}: {report.entries} entries, chain " + (
        "intact" if report.ok else "BROKEN"
    )
    lines = [status] + report.problems + report.notes
    result = {"verify": report.to_dict()}
    if not args.verify:
        entries = home.audit_log.entries()
        if args.tail:
            entries = entries[-args.tail :]
        result["entries"] = entries
        lines = [_describe(e) for e in entries] + lines
    emit(args, result, "\n".join(lines))
    return 0 if report.ok else EXIT_TAMPERED
