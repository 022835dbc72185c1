"""Durable corrections and locked cases: validated, written atomically, checksummed, indexed, audited.

Order of a submission (the invariant "a correction is on disk, checksummed, before anything else uses
it"): validate → write every file into a temporary folder and ``fsync`` it → rename the folder into
place and ``fsync`` its parent → insert the index row (SQLite WAL, ``synchronous=FULL``) → audit.
A kill between the rename and the index row leaves a complete folder that :func:`recover` adopts; a
kill before the rename leaves only a temporary folder that :func:`recover` removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.continual.audit import utc_now
from meddl.continual.registry import (
    DEFAULT_GATE,
    ModelHome,
    check_case_files,
    fsync_dir,
    load_json,
    sha256_file,
)
from meddl.errors import InputError, ModelError
from meddl.io import Image, read_image, write_image
from meddl.models import ModelSpec, load_model, load_spec, save_model

__all__ = [
    "StoredCase",
    "init_home",
    "add_case",
    "submit_correction",
    "exclude_correction",
    "list_corrections",
    "load_correction",
    "load_case",
    "recover",
    "check_home",
]

PathLike = Union[str, os.PathLike]
ImageLike = Union[PathLike, Image]
CORRECTION_JSON = "correction.json"


@dataclass
class StoredCase:
    """A correction or a locked case read back from the home, checksums verified."""

    id: str
    site: str
    image: Image
    label: Optional[Image]  # None for a classification correction: the class is in ``meta["label"]``
    prediction: Optional[Image]
    meta: Dict[str, Any]


def _read(value: ImageLike, role: str) -> Tuple[Image, str]:
    if isinstance(value, Image):
        return value, str(value.metadata.get("source") or f"<{role} array>")
    return read_image(value), str(value)


def _validate(
    image: Image, image_name: str, label: Image, label_name: str, allowed: Sequence[int], role: str
) -> np.ndarray:
    """Geometry and label checks; returns the labelmap as an integer array."""
    if not label.same_grid(image):
        raise InputError(
            f"{role} does not lie on the image {image_name} (labelmap size {label.size} spacing "
            f"{tuple(round(s, 4) for s in label.spacing)} origin {tuple(round(o, 2) for o in label.origin)}; image "
            f"size {image.size} spacing {tuple(round(s, 4) for s in image.spacing)} origin "
            f"{tuple(round(o, 2) for o in image.origin)})",
            label_name,
        )
    array = label.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError(f"{role} holds non-integer values; a labelmap holds label numbers", label_name)
    values = sorted(int(v) for v in np.unique(array))
    unknown = [v for v in values if v not in set(allowed)]
    if unknown:
        raise InputError(
            f"{role} has label values {unknown} that the model does not have (its labels: {sorted(allowed)})",
            label_name,
        )
    dtype = np.uint8 if max(allowed) < 256 else np.uint16
    return array.astype(dtype)


def _write_json(data: Dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _store_folder(
    final: Path,
    image: Image,
    label: Optional[np.ndarray],
    prediction: Optional[np.ndarray],
    record: Dict[str, Any],
) -> Dict[str, str]:
    """Write image/label/prediction and the record into ``final`` atomically; returns name → sha256.

    A classification correction has no label volume (``label`` None): its class is in ``record``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".tmp-{final.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write_image(image, staging / "image.nii.gz")
        if label is not None:
            write_image(image.with_array(label), staging / "label.nii.gz", labelmap=True)
        if prediction is not None:
            write_image(image.with_array(prediction), staging / "prediction.nii.gz", labelmap=True)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        _write_json({**record, "files": files}, staging / CORRECTION_JSON)
        files[CORRECTION_JSON] = sha256_file(staging / CORRECTION_JSON)
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return files


def _new_id(prefix: str) -> str:
    stamp = utc_now().replace("-", "").replace(":", "").replace(".", "")[:15]
    return f"{prefix}{stamp}-{uuid.uuid4().hex[:8]}"


def _model_label_values(home: ModelHome, version: Optional[str] = None) -> Tuple[List[int], str]:
    version = version or home.champion()
    spec = load_spec(home.version_dir(version))
    return [label.value for label in spec.labels], version


def _split_for(model_home: ModelHome, version: str, site: str) -> str:
    """Every ``holdout_every``-th correction of a site is held out for the gate, never trained on."""
    every = int(model_home.gate_rules(version).get("holdout_every") or 0)
    earlier = model_home.query("SELECT COUNT(*) AS n FROM corrections WHERE site = ?", (site,))[0]["n"]
    return "holdout" if every > 1 and earlier % every == every - 1 else "train"


def _register_correction(
    model_home: ModelHome,
    folder: Path,
    files: Dict[str, str],
    record: Dict[str, Any],
    audit_fields: Dict[str, Any],
) -> None:
    """Index row (one transaction), then the audit entry: the correction is on disk before either."""
    try:
        with model_home.transaction() as db:
            db.execute(
                "INSERT INTO corrections (id, site, model_version, created, status, split, files) "
                "VALUES (?, ?, ?, ?, 'active', ?, ?)",
                (
                    record["id"],
                    record["site"],
                    record["model_version"],
                    record["created"],
                    record["split"],
                    json.dumps(files),
                ),
            )
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)  # not acknowledged: leave nothing half-registered
        raise
    model_home.audit(
        "correction_submitted",
        id=record["id"],
        site=record["site"],
        split=record["split"],
        model_version=record["model_version"],
        files=files,
        **audit_fields,
    )


def _probabilities(spec: ModelSpec, probabilities: Dict[str, Any], where: str) -> Dict[str, float]:
    classes = [label.name for label in sorted(spec.labels, key=lambda label: label.value)]
    if not isinstance(probabilities, dict) or set(probabilities) != set(classes):
        raise InputError(f"probabilities must give one value for each class ({', '.join(classes)})", where)
    values = {name: probabilities[name] for name in classes}
    if not all(isinstance(v, (int, float)) and np.isfinite(v) and 0.0 <= v <= 1.0 for v in values.values()):
        raise InputError("probabilities must be numbers between 0 and 1", where)
    return {name: float(v) for name, v in values.items()}


def _submit_class_label(
    model_home: ModelHome,
    spec: ModelSpec,
    version: str,
    image: ImageLike,
    label: str,
    site: str,
    predicted: Optional[str],
    probabilities: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
    """A classification correction: the image and the right class name (see :func:`submit_correction`)."""
    from meddl.classify import class_value, read_classification_input
    from meddl.classify.preprocess import check_classification_input

    where = str(model_home.path)
    value = class_value(spec, label, where)  # unknown name: one line listing the model's classes
    if predicted is not None:
        class_value(spec, predicted, where)
    probabilities = _probabilities(spec, probabilities, where) if probabilities is not None else None
    if isinstance(image, Image):
        source_image, image_name = image, str(image.metadata.get("source") or "<image array>")
    else:
        source_image, image_name = read_classification_input(image), str(image)
    # Dimensions, channels, NaN, constant: the same checks as classification, so a stored pair is usable.
    check_classification_input(source_image, spec)
    record = {
        "id": _new_id("c"),
        "kind": "correction",
        "task": "classification",
        "site": site,
        "split": _split_for(model_home, version, site),
        "model_version": version,
        "created": utc_now(),
        "label": {"name": str(label), "value": value},
        "prediction": {"predicted": predicted, "probabilities": probabilities},
        "sources": {
            "image": image_name,
            "image_sha256": sha256_file(image_name) if Path(image_name).is_file() else None,
        },
        "geometry": source_image.geometry(),
    }
    folder = model_home.corrections_dir / record["id"]
    files = _store_folder(folder, source_image, None, None, record)
    _register_correction(
        model_home, folder, files, record, {"image": image_name, "label": str(label), "predicted": predicted}
    )
    return {
        "id": record["id"],
        "task": "classification",
        "site": site,
        "split": record["split"],
        "model_version": version,
        "folder": str(folder),
        "files": files,
        "label": str(label),
        "label_value": value,
        "predicted": predicted,
        "changed_voxels": None,
    }


def submit_correction(
    home: PathLike,
    image: ImageLike,
    labelmap: Optional[ImageLike] = None,
    prediction: Optional[ImageLike] = None,
    site: str = "default",
    model_version: Optional[str] = None,
    label: Optional[str] = None,
    predicted: Optional[str] = None,
    probabilities: Optional[Dict[str, float]] = None,
) -> Dict[str, Any]:
    """Store a user's correction for ``image`` in the model home.

    A segmentation home takes a corrected ``labelmap`` (and the ``prediction`` it corrects); a classifier
    home takes the right class name ``label`` (and the model's ``predicted`` class and ``probabilities``).

    Args:
        home: model home folder.
        image: the volume or 2D image (path or :class:`Image`).
        labelmap: segmentation: the corrected labelmap, on the image's grid, with the model's label values only.
        prediction: segmentation: the labelmap the model produced (same rules); lets the update weight changed
            voxels.
        site: site or source tag (scanner, hospital); the replay buffer and the gate balance over it.
        model_version: version that made the prediction (default: the current champion).
        label: classification: the right class name (one of the model's classes).
        predicted: classification: the class the model predicted, if known.
        probabilities: classification: the model's class probabilities (class name → value), if known.

    Returns:
        ``{"id", "site", "split", "model_version", "folder", "files", "changed_voxels"}`` (classification adds
        ``task``, ``label``, ``label_value``, ``predicted``).

    Raises:
        InputError: unreadable file, geometry mismatch (naming both files), label values or class name not the
            model's, an image the classifier cannot take, a labelmap for a classifier or a class for a segmenter.
        ModelError: ``home`` is not a model home or ``model_version`` is unknown.
    """
    model_home = ModelHome(home)
    if model_version is not None:
        model_home.version(model_version)
    version = model_version or model_home.champion()
    spec = load_spec(model_home.version_dir(version))
    site = str(site or "default").strip() or "default"
    if spec.task == "classification":
        if labelmap is not None or prediction is not None:
            raise InputError(
                f"model '{spec.name}' is a classifier: give the right class name (label), not a labelmap", home
            )
        if label is None:
            raise InputError(f"model '{spec.name}' is a classifier: give the right class name (label)", home)
        return _submit_class_label(model_home, spec, version, image, label, site, predicted, probabilities)
    if label is not None or predicted is not None or probabilities is not None:
        raise InputError(
            f"model '{spec.name}' is a {spec.task} model: give a corrected labelmap, not a class name", home
        )
    if labelmap is None:
        raise InputError(f"model '{spec.name}' is a {spec.task} model: give the corrected labelmap", home)
    allowed = [entry.value for entry in spec.labels]
    source_image, image_name = _read(image, "image")
    if source_image.array.ndim != 3:
        raise InputError("expected a 3D volume", image_name)
    corrected, label_name = _read(labelmap, "labelmap")
    label_array = _validate(source_image, image_name, corrected, label_name, allowed, "the corrected labelmap")
    prediction_array = None
    prediction_name = None
    if prediction is not None:
        predicted, prediction_name = _read(prediction, "prediction")
        prediction_array = _validate(source_image, image_name, predicted, prediction_name, allowed, "the prediction")
    split = _split_for(model_home, version, site)
    correction_id = _new_id("c")
    changed = int((label_array != prediction_array).sum()) if prediction_array is not None else None
    record = {
        "id": correction_id,
        "kind": "correction",
        "site": site,
        "split": split,
        "model_version": version,
        "created": utc_now(),
        "sources": {
            "image": image_name,
            "labelmap": label_name,
            "prediction": prediction_name,
            "image_sha256": sha256_file(image_name) if Path(image_name).is_file() else None,
        },
        "changed_voxels": changed,
        "geometry": source_image.geometry(),
    }
    folder = model_home.corrections_dir / correction_id
    files = _store_folder(folder, source_image, label_array, prediction_array, record)
    _register_correction(
        model_home, folder, files, record, {"image": image_name, "labelmap": label_name, "changed_voxels": changed}
    )
    return {
        "id": correction_id,
        "site": site,
        "split": split,
        "model_version": version,
        "folder": str(folder),
        "files": files,
        "changed_voxels": changed,
    }


def exclude_correction(home: PathLike, correction_id: str, reason: str, delete: bool = False) -> Dict[str, Any]:
    """Exclude a correction from future updates (kept on disk), or delete its files too; audited either way."""
    model_home = ModelHome(home)
    rows = model_home.query("SELECT * FROM corrections WHERE id = ?", (correction_id,))
    if not rows:
        raise InputError(f"unknown correction '{correction_id}'", model_home.corrections_dir)
    status = "deleted" if delete else "excluded"
    with model_home.transaction() as db:
        db.execute(
            "UPDATE corrections SET status = ?, excluded_reason = ? WHERE id = ?", (status, reason, correction_id)
        )
    if delete:
        folder = model_home.corrections_dir / correction_id
        trash = model_home.corrections_dir / f".deleted-{correction_id}"
        if folder.exists():
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
    model_home.audit(f"correction_{status}", id=correction_id, reason=reason)
    return {"id": correction_id, "status": status, "reason": reason}


def list_corrections(home: PathLike, status: Optional[str] = "active") -> List[Dict[str, Any]]:
    model_home = ModelHome(home)
    sql, params = "SELECT * FROM corrections", ()
    if status:
        sql, params = sql + " WHERE status = ?", (status,)
    return [
        {**dict(row), "files": json.loads(row["files"])}
        for row in model_home.query(sql + " ORDER BY created, id", params)
    ]


def _load_folder(folder: Path, files: Dict[str, str], case_id: str, site: str) -> StoredCase:
    if not folder.is_dir():
        raise InputError("stored folder is missing", folder)
    check_case_files(folder, files)
    meta = load_json(folder / CORRECTION_JSON)
    image = read_image(folder / "image.nii.gz")
    label = read_image(folder / "label.nii.gz") if (folder / "label.nii.gz").is_file() else None
    prediction = read_image(folder / "prediction.nii.gz") if (folder / "prediction.nii.gz").is_file() else None
    return StoredCase(case_id, site, image, label, prediction, meta)


def load_correction(home: PathLike, correction_id: str) -> StoredCase:
    """Read a stored correction; InputError naming the file when a checksum does not match."""
    model_home = home if isinstance(home, ModelHome) else ModelHome(home)
    rows = model_home.query("SELECT * FROM corrections WHERE id = ?", (correction_id,))
    if not rows:
        raise InputError(f"unknown correction '{correction_id}'", model_home.corrections_dir)
    row = rows[0]
    return _load_folder(model_home.corrections_dir / correction_id, json.loads(row["files"]), row["id"], row["site"])


def load_case(home: Union[PathLike, ModelHome], case: Dict[str, Any]) -> StoredCase:
    model_home = home if isinstance(home, ModelHome) else ModelHome(home)
    return _load_folder(model_home.cases_dir / case["id"], case["files"], case["id"], case["site"])


def add_case(home: PathLike, image: ImageLike, label: ImageLike, kind: str, site: str = "default") -> Dict[str, Any]:
    """Add a locked regression case (never used for training) or a replay case (earlier training data)."""
    if kind not in ("regression", "replay"):
        raise InputError(f"case kind must be 'regression' or 'replay', not '{kind}'")
    model_home = home if isinstance(home, ModelHome) else ModelHome(home)
    allowed, version = _model_label_values(model_home)
    if load_spec(model_home.version_dir(version)).task != "segmentation":
        raise InputError(
            "locked regression and replay cases are labelmaps; a classifier home does not take them yet",
            model_home.path,
        )
    source_image, image_name = _read(image, "image")
    reference, label_name = _read(label, "label")
    label_array = _validate(source_image, image_name, reference, label_name, allowed, f"the {kind} label")
    case_id = _new_id("r" if kind == "regression" else "p")
    record = {
        "id": case_id,
        "kind": kind,
        "site": site,
        "created": utc_now(),
        "sources": {"image": image_name, "label": label_name},
    }
    files = _store_folder(model_home.cases_dir / case_id, source_image, label_array, None, record)
    with model_home.transaction() as db:
        db.execute(
            "INSERT INTO cases (id, kind, site, created, files) VALUES (?, ?, ?, ?, ?)",
            (case_id, kind, site, record["created"], json.dumps(files)),
        )
    model_home.audit(f"{kind}_case_added", id=case_id, site=site, image=image_name, label=label_name, files=files)
    return {"id": case_id, "kind": kind, "site": site, "files": files}


def init_home(
    package: PathLike,
    home: PathLike,
    regression: Sequence[Tuple[ImageLike, ImageLike, str]] = (),
    replay: Sequence[Tuple[ImageLike, ImageLike, str]] = (),
    gate: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Create a model home whose first version (``v1``, the champion) is a copy of ``package``.

    ``regression`` and ``replay`` are ``(image, label, site)`` triples: locked regression cases for the
    validation gate, and earlier training data for the replay buffer.
    """
    home = Path(home)
    if (home / "registry.sqlite").exists():
        raise ModelError("a model home already exists here", home)
    if home.exists() and any(home.iterdir()):
        raise ModelError("folder is not empty; a model home needs a new or empty folder", home)
    source = load_model(package)
    if source.spec.task == "classification":
        from meddl.classify import load_classifier

        load_classifier(source)  # refuses a package that is not a usable classifier, naming it
        if regression or replay:
            raise ModelError(
                "locked regression and replay cases are labelmaps; a classifier home does not take them yet",
                package,
            )
    elif source.spec.task != "segmentation":
        raise ModelError(f"continual learning does not support '{source.spec.task}' models", package)
    existed = home.exists()
    try:
        model_home = ModelHome(home, create=True)
        spec = source.spec
        spec.raw["imported_from"] = {
            "path": str(Path(package).resolve()),
            "version": spec.version,
            "weights_sha256": sha256_file(Path(package) / "weights.safetensors"),
        }
        # A classifier home is gated on its corrections by true-class probability and accuracy.
        task_gate = {"metric": "accuracy"} if spec.task == "classification" else {}
        spec.raw["gate"] = {**DEFAULT_GATE, **task_gate, **dict(spec.raw.get("gate") or {}), **dict(gate or {})}
        spec.raw["parent"] = None
        spec.raw.setdefault("training_data", [])
        spec.version = "v1"
        save_model(spec, source.network, model_home.version_dir("v1"))
        model_home.register_version("v1", None, "champion")
        model_home.audit("home_created", package=str(package), version="v1", gate=spec.raw["gate"])
        model_home._set_champion("v1", "initial version")
        model_home.audit("promoted", version="v1", previous=None, reason="initial version", by="init")
        for image, label, site in regression:
            add_case(model_home, image, label, "regression", site)
        for image, label, site in replay:
            add_case(model_home, image, label, "replay", site)
    except BaseException:
        # A home is created whole or not at all: a refused case must not leave a half-made home behind.
        if existed:
            for child in home.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(home, ignore_errors=True)
        raise
    return {"home": str(home), "champion": "v1", "regression_cases": len(regression), "replay_cases": len(replay)}


def recover(home: Union[PathLike, ModelHome]) -> Dict[str, Any]:
    """Finish what a kill interrupted: adopt complete correction folders without an index row (and audit
    them), audit indexed corrections whose audit entry never got written, remove temporary folders."""
    model_home = home if isinstance(home, ModelHome) else ModelHome(home)
    adopted, audited, removed = [], [], []
    indexed = {row["id"]: row for row in model_home.query("SELECT id, files, site, split FROM corrections")}
    for folder in sorted(model_home.corrections_dir.iterdir()) if model_home.corrections_dir.exists() else []:
        if folder.name.startswith("."):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
            continue
        if folder.name in indexed or not folder.is_dir():
            continue
        record = load_json(folder / CORRECTION_JSON)
        files = dict(record.get("files", {}))
        check_case_files(folder, files)
        files[CORRECTION_JSON] = sha256_file(folder / CORRECTION_JSON)
        with model_home.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO corrections (id, site, model_version, created, status, split, files) "
                "VALUES (?, ?, ?, ?, 'active', ?, ?)",
                (
                    folder.name,
                    record["site"],
                    record.get("model_version"),
                    record["created"],
                    record["split"],
                    json.dumps(files),
                ),
            )
        adopted.append(folder.name)
    for folder in sorted(model_home.cases_dir.iterdir()) if model_home.cases_dir.exists() else []:
        if folder.name.startswith("."):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    seen = {
        e.get("id")
        for e in model_home.audit_log.entries()
        if e.get("event") in ("correction_submitted", "correction_recovered")
    }
    for row in model_home.query("SELECT * FROM corrections ORDER BY created"):
        if row["id"] not in seen:
            model_home.audit(
                "correction_recovered",
                id=row["id"],
                site=row["site"],
                split=row["split"],
                files=json.loads(row["files"]),
            )
            audited.append(row["id"])
    return {"adopted": adopted, "audited": audited, "removed_temporary": removed}


def check_home(home: PathLike) -> Dict[str, Any]:
    """Consistency report: every version's weights match their checksum, the champion exists, every
    active correction and case has all its files with valid checksums. Problems name the file."""
    model_home = ModelHome(home)
    problems: List[str] = []
    champion = model_home.champion()
    if champion is None:
        problems.append(f"{model_home.path}: no champion")
    for version in model_home.versions():
        try:
            model_home.verify_version_files(version["version"])
        except ModelError as error:
            problems.append(str(error))
    corrections = list_corrections(home, status=None)
    for row in corrections:
        if row["status"] == "deleted":
            continue
        try:
            check_case_files(model_home.corrections_dir / row["id"], row["files"])
        except InputError as error:
            problems.append(str(error))
    for kind in ("regression", "replay"):
        for case in model_home.cases(kind):
            try:
                check_case_files(model_home.cases_dir / case["id"], case["files"])
            except InputError as error:
                problems.append(str(error))
    return {
        "ok": not problems,
        "champion": champion,
        "versions": len(model_home.versions()),
        "corrections": len(corrections),
        "problems": problems,
    }
