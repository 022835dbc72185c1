"""Append-only, hash-chained audit log (``audit.jsonl`` in a model home).

Each line is one JSON object: ``seq``, ``time`` (UTC ISO 8601), ``event``, the event's fields,
``prev`` (the previous entry's hash) and ``hash`` = SHA-256 of the canonical JSON of everything else.
Editing, inserting or deleting any line breaks the chain; deleting lines at the end is caught by the
anchor (last ``seq`` and ``hash``) that the registry keeps beside its own data.

Appends take an exclusive ``flock`` (several processes may write: the CLI, the worker, an update job),
write one line and ``fsync``. A line torn by a kill mid-write was never acknowledged; the next append
drops it and records that it did.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from meddl.continual.locks import file_lock

__all__ = ["AuditLog", "AuditReport", "GENESIS", "entry_hash"]

PathLike = Union[str, os.PathLike]
GENESIS = "0" * 64


def _canonical(data: Dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode("utf-8")


def entry_hash(entry: Dict[str, Any]) -> str:
    """SHA-256 of the entry without its own ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class AuditReport:
    """What :meth:`AuditLog.verify` found."""

    ok: bool
    entries: int
    head: str
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "problems": self.problems,
            "notes": self.notes,
        }


class AuditLog:
    """The audit log of one model home."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def _locked(self):
        return file_lock(self.path.with_name(self.path.name + ".lock"))

    def _tail(self) -> Tuple[int, str, int]:
        """(last seq, last hash, byte length of the intact part) of the file."""
        if not self.path.exists():
            return 0, GENESIS, 0
        data = self.path.read_bytes()
        intact = data.rfind(b"\n") + 1  # anything after the last newline is a torn, unacknowledged line
        if intact == 0:
            return 0, GENESIS, 0
        previous_end = data.rfind(b"\n", 0, intact - 1) + 1
        last = json.loads(data[previous_end:intact])
        return int(last["seq"]), str(last["hash"]), intact

    def append(self, event: str, **fields: Any) -> Dict[str, Any]:
        """Append one event; returns the written entry (with ``seq`` and ``hash``)."""
        with self._locked():
            seq, previous, intact = self._tail()
            torn_bytes = self.path.stat().st_size - intact if self.path.exists() else 0
            torn = torn_bytes > 0
            with open(self.path, "r+b" if self.path.exists() else "wb") as handle:
                if torn:
                    handle.truncate(intact)
                handle.seek(intact)
                entries = []
                if torn:
                    entries.append({"event": "audit_torn_line_dropped", "bytes": torn_bytes})
                entries.append({"event": event, **fields})
                for body in entries:
                    seq += 1
                    entry = {"seq": seq, "time": utc_now(), **body, "prev": previous}
                    entry["hash"] = entry_hash(entry)
                    previous = entry["hash"]
                    handle.write(_canonical(entry) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            return entry

    def entries(self) -> List[Dict[str, Any]]:
        """Every complete entry, in order (a torn last line is skipped)."""
        if not self.path.exists():
            return []
        result = []
        lines = self.path.read_bytes().split(b"\n")
        for line in lines[:-1]:  # the part after the last newline is a torn, unacknowledged write
            if line.strip():
                try:
                    result.append(json.loads(line))
                except json.JSONDecodeError:
                    result.append({"unparsable": line.decode("utf-8", "replace")})
        return result

    def verify(self, anchor: Optional[Tuple[int, str]] = None) -> AuditReport:
        """Recompute the chain; ``anchor`` = (seq, hash) that must still be in the log (catches truncation)."""
        problems: List[str] = []
        notes: List[str] = []
        previous = GENESIS
        head = GENESIS
        count = 0
        by_seq: Dict[int, str] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            lines = data.split(b"\n")
            torn = lines.pop()  # b"" when the file ends with a newline
            if torn:
                notes.append(
                    f"{self.path}: last line is incomplete ({len(torn)} bytes of an interrupted write, "
                    "never acknowledged; the next append drops it)"
                )
            for number, line in enumerate(lines, start=1):
                where = f"{self.path}:{number}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    problems.append(f"{where}: not a JSON line")
                    previous = "?"
                    continue
                count += 1
                if not isinstance(entry, dict) or "hash" not in entry:
                    problems.append(f"{where}: entry has no hash")
                    continue
                if entry.get("seq") != number:
                    problems.append(f"{where}: sequence number {entry.get('seq')} where {number} was expected")
                if entry.get("prev") != previous:
                    problems.append(f"{where}: chain broken (prev does not match the hash of the line before)")
                if entry_hash(entry) != entry["hash"]:
                    problems.append(f"{where}: content does not match its hash (the line was edited)")
                previous = entry["hash"]
                head = entry["hash"]
                by_seq[number] = entry["hash"]
        if anchor and anchor[0] > 0:
            seq, expected = anchor
            if seq not in by_seq:
                problems.append(f"{self.path}: entry {seq} recorded in the registry is missing (log truncated)")
            elif by_seq[seq] != expected:
                problems.append(f"{self.path}: entry {seq} differs from the hash recorded in the registry")
        return AuditReport(ok=not problems, entries=count, head=head, problems=problems, notes=notes)
