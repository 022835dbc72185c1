"""The model home: immutable model versions, the champion pointer, the corrections index and the audit log.

Layout of a home folder::

    registry.sqlite        versions, champion history, corrections index, locked regression/replay cases
    audit.jsonl            hash-chained audit log (see :mod:`meddl.continual.audit`)
    versions/<version>/    immutable model packages (model.json + weights.safetensors)
    corrections/<id>/      one submitted correction (volumes + correction.json with checksums)
    cases/<id>/            locked regression cases and replay cases (earlier training data)
    updates/               checkpoints of an update in progress (resumable after a kill)

SQLite runs in WAL mode with ``synchronous=FULL``: a committed row survives a kill or power loss, and
readers (inference resolving the champion) never wait for a writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from meddl.continual.audit import AuditLog, utc_now
from meddl.errors import InputError, ModelError
from meddl.fsutil import fsync_dir

__all__ = [
    "DEFAULT_GATE",
    "ModelHome",
    "is_home",
    "resolve_model",
    "sha256_file",
    "fsync_dir",
]

PathLike = Union[str, os.PathLike]
REGISTRY_DB = "registry.sqlite"

# The validation gate's rules, written into every version's model.json ("gate") so that the change-control
# plan travels with the model. Dice values are fractions (0.01 = 1 Dice point).
DEFAULT_GATE: Dict[str, Any] = {
    "metric": "mean foreground Dice",
    "max_regression_drop": 0.01,
    "min_correction_gain": 0.0,
    "require_regression_set": True,
    "holdout_every": 5,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY, parent TEXT, status TEXT NOT NULL, created TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL, report TEXT);
CREATE TABLE IF NOT EXISTS champion_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, time TEXT NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS corrections (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, model_version TEXT, created TEXT NOT NULL,
    status TEXT NOT NULL, split TEXT NOT NULL, files TEXT NOT NULL, excluded_reason TEXT);
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('regression', 'replay')), site TEXT NOT NULL,
    created TEXT NOT NULL, files TEXT NOT NULL);
"""


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_home(path: PathLike) -> bool:
    return (Path(path) / REGISTRY_DB).is_file()


def resolve_model(path: PathLike) -> Path:
    """The champion's package folder when ``path`` is a model home, else ``path`` itself."""
    if is_home(path):
        return ModelHome(path).champion_dir()
    return Path(path)


class ModelHome:
    """A model home folder. Cheap to construct; every method opens its own short SQLite connection,
    so one object can be used from several threads and several processes can share the home."""

    def __init__(self, path: PathLike, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not is_home(self.path):
            raise ModelError(f"not a model home (no {REGISTRY_DB}; create one with `meddl models init`)", self.path)
        self.versions_dir = self.path / "versions"
        self.corrections_dir = self.path / "corrections"
        self.cases_dir = self.path / "cases"
        self.updates_dir = self.path / "updates"
        self.audit_log = AuditLog(self.path / "audit.jsonl")
        if create:
            for folder in (self.path, self.versions_dir, self.corrections_dir, self.cases_dir, self.updates_dir):
                folder.mkdir(parents=True, exist_ok=True)
            db = self.connect()
            try:
                db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS, in its own implicit transaction
            finally:
                db.close()

    # -- SQLite -------------------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path / REGISTRY_DB), timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed as a whole or not at all."""
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def query(self, sql: str, params: tuple = ()) -> List[sqlite3.Row]:
        db = self.connect()
        try:
            return list(db.execute(sql, params))
        finally:
            db.close()

    def meta(self, key: str, default: Optional[str] = None) -> Optional[str]:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    # -- audit ----------------------------------------------------------------------------------------------
    def audit(self, event: str, **fields: Any) -> Dict[str, Any]:
        """Append to the audit log and anchor its head in the registry (detects a truncated log)."""
        entry = self.audit_log.append(event, **fields)
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'audit_anchor'").fetchone()
            if row is None or json.loads(row["value"])[0] < entry["seq"]:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_anchor', ?)",
                    (json.dumps([entry["seq"], entry["hash"]]),),
                )
        return entry

    def verify_audit(self):
        anchor = self.meta("audit_anchor")
        return self.audit_log.verify(tuple(json.loads(anchor)) if anchor else None)

    # -- versions -------------------------------------------------------------------------------------------
    def version_dir(self, version: str) -> Path:
        return self.versions_dir / version

    def versions(self) -> List[Dict[str, Any]]:
        champion = self.champion()
        rows = self.query("SELECT * FROM versions ORDER BY created, version")
        return [
            {**{k: row[k] for k in row.keys() if k != "report"}, "champion": row["version"] == champion} for row in rows
        ]

    def version(self, version: str) -> Dict[str, Any]:
        rows = self.query("SELECT * FROM versions WHERE version = ?", (str(version),))
        if not rows:
            known = ", ".join(v["version"] for v in self.versions()) or "none"
            raise ModelError(f"unknown model version '{version}' (known: {known})", self.path)
        row = dict(rows[0])
        row["report"] = json.loads(row["report"]) if row["report"] else None
        row["champion"] = row["version"] == self.champion()
        return row

    def next_version_name(self) -> str:
        numbers = [int(v["version"][1:]) for v in self.versions() if v["version"][1:].isdigit()]
        taken = {p.name for p in self.versions_dir.iterdir()} if self.versions_dir.exists() else set()
        number = max(numbers, default=0) + 1
        while f"v{number}" in taken:  # a folder left by a killed update that never got its row
            number += 1
        return f"v{number}"

    def register_version(
        self, version: str, parent: Optional[str], status: str, report: Optional[Dict[str, Any]] = None
    ) -> None:
        folder = self.version_dir(version)
        weights = folder / "weights.safetensors"
        if not weights.is_file():
            raise ModelError("version folder has no weights.safetensors", folder)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO versions (version, parent, status, created, weights_sha256, report) VALUES (?,?,?,?,?,?)",
                (version, parent, status, utc_now(), sha256_file(weights), json.dumps(report) if report else None),
            )

    def set_version_status(self, version: str, status: str, report: Optional[Dict[str, Any]] = None) -> None:
        with self.transaction() as db:
            if report is None:
                db.execute("UPDATE versions SET status = ? WHERE version = ?", (status, version))
            else:
                db.execute(
                    "UPDATE versions SET status = ?, report = ? WHERE version = ?",
                    (status, json.dumps(report), version),
                )

    def champion(self) -> Optional[str]:
        rows = self.query("SELECT version FROM champion_log ORDER BY seq DESC LIMIT 1")
        return rows[0]["version"] if rows else None

    def champion_dir(self) -> Path:
        champion = self.champion()
        if champion is None:
            raise ModelError("the model home has no champion version", self.path)
        return self.version_dir(champion)

    def champion_history(self) -> List[Dict[str, Any]]:
        return [dict(row) for row in self.query("SELECT * FROM champion_log ORDER BY seq")]

    def _set_champion(self, version: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO champion_log (version, time, reason) VALUES (?, ?, ?)", (version, utc_now(), reason)
            )

    def promote(self, version: str, reason: str = "manual promotion", by: str = "user") -> Dict[str, Any]:
        """Make ``version`` the champion (one row; instant) and audit it."""
        row = self.version(version)
        previous = self.champion()
        if previous == version:
            return {"champion": version, "previous": previous, "changed": False}
        self.verify_version_files(version)
        self._set_champion(version, reason)
        if row["status"] != "champion":
            self.set_version_status(version, "champion")
        self.audit("promoted", version=version, previous=previous, reason=reason, by=by)
        return {"champion": version, "previous": previous, "changed": True}

    def rollback(self, version: Optional[str] = None, reason: str = "rollback", by: str = "user") -> Dict[str, Any]:
        """Point the champion back to ``version`` (default: the champion before the current one)."""
        current = self.champion()
        if version is None:
            earlier = [h["version"] for h in self.champion_history() if h["version"] != current]
            if not earlier:
                raise ModelError(f"nothing to roll back to: '{current}' is the only champion there has been", self.path)
            version = earlier[-1]
        self.version(version)
        self.verify_version_files(version)
        self._set_champion(version, reason)
        self.audit("rolled_back", version=version, previous=current, reason=reason, by=by)
        return {"champion": version, "previous": current, "changed": version != current}

    def verify_version_files(self, version: str) -> None:
        """Refuse a version whose weights changed on disk since it was registered."""
        row = self.query("SELECT weights_sha256 FROM versions WHERE version = ?", (version,))[0]
        weights = self.version_dir(version) / "weights.safetensors"
        if not weights.is_file():
            raise ModelError(f"version '{version}' has no weights on disk", weights)
        if sha256_file(weights) != row["weights_sha256"]:
            raise ModelError(f"version '{version}' weights do not match their registered checksum", weights)

    # -- cases -------------------------------------------------------------------------------------------
    def cases(self, kind: str, site: Optional[str] = None) -> List[Dict[str, Any]]:
        sql, params = "SELECT * FROM cases WHERE kind = ?", (kind,)
        if site is not None:
            sql, params = sql + " AND site = ?", (kind, site)
        # In the order they were added (ids order by the second only, then by a random suffix).
        rows = self.query(sql + " ORDER BY created, id", params)
        return [{**dict(row), "files": json.loads(row["files"])} for row in rows]

    def gate_rules(self, version: Optional[str] = None) -> Dict[str, Any]:
        from meddl.models import load_spec

        spec = load_spec(self.version_dir(version or self.champion()))
        return {**DEFAULT_GATE, **dict(spec.raw.get("gate") or {})}


def check_case_files(folder: Path, files: Dict[str, str]) -> None:
    """Raise InputError naming the first file that is missing or whose checksum changed."""
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise InputError("file is missing", path)
        if sha256_file(path) != digest:
            raise InputError("checksum mismatch: the file changed on disk after it was stored", path)


def load_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read JSON ({error})", path) from None
