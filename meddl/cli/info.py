"""``meddl info PATH``: what a volume, DICOM folder or model package is.

For a volume or DICOM series: size, spacing, origin, direction, orientation code, dtype, modality and the
intensity range (min, max, percentiles). For a DICOM folder holding several series: the list of series,
so that one can be picked with ``--series-uid``. For a model package (or a model home, whose champion
is described): name, version, task, labels, input spec, provenance and metrics.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from meddl.errors import InputError

__all__ = ["register", "run", "describe_path", "describe_image", "describe_model", "intensity_summary"]

PathLike = Union[str, os.PathLike]
# Percentiles of a huge volume are computed on a regular subsample of at most this many voxels: the
# figures are for reading, and an exact sort of 10^8 voxels would take seconds.
PERCENTILE_SAMPLE = 8_000_000
PERCENTILES = (0.5, 1, 5, 50, 95, 99, 99.5)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a volume, DICOM folder or model package",
        description="Describe a volume (NRRD, NIfTI, MetaImage), a DICOM series folder or file, or a model "
        "package: geometry, dtype, modality and intensity range; for a model its labels, input spec, "
        "provenance and metrics.",
    )
    parser.add_argument("path", help="file, DICOM folder, or model package folder")
    parser.add_argument("--series-uid", help="which DICOM series to describe when the folder holds several")
    # Also accepted after the sub-command (`meddl info PATH --json`); SUPPRESS keeps the global flag's value.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meddl.cli import emit

    result = describe_path(args.path, series_uid=getattr(args, "series_uid", None))
    emit(args, result, format_text(result))
    return 0


def describe_path(path: PathLike, series_uid: Optional[str] = None) -> Dict[str, Any]:
    """A JSON-able description of whatever ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    model_dir = _model_folder(path)
    if model_dir is not None:
        return describe_model(model_dir, home=path if model_dir != path and path.is_dir() else None)
    if path.is_dir() and series_uid is None:
        from meddl.io.dicom import list_series

        series = list_series(path)
        images = [summary for summary in series if summary["is_image"]]
        if len(images) > 1:
            return {"kind": "dicom_folder", "path": str(path), "series": series}
    from meddl.io import read_image

    return describe_image(read_image(path, series_uid=series_uid))


def _model_folder(path: Path) -> Optional[Path]:
    if path.is_file() and path.name == "model.json":
        return path.parent
    if not path.is_dir():
        return None
    if (path / "model.json").is_file():
        return path
    try:
        from meddl.continual import resolve_model
    except ImportError:  # the continual-learning package is optional for `info`
        return None
    resolved = Path(resolve_model(path))
    return resolved if resolved != path and (resolved / "model.json").is_file() else None


def intensity_summary(array: np.ndarray) -> Dict[str, Any]:
    """min, max, mean, percentiles of the finite voxels, and how many voxels are NaN or infinite."""
    values = array
    non_finite = 0
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        non_finite = int(finite.size - np.count_nonzero(finite))
        values = array[finite] if non_finite else array
    if values.size == 0:
        return {"min": None, "max": None, "mean": None, "percentiles": {}, "non_finite_voxels": non_finite}
    flat = values.ravel()
    stride = max(1, flat.size // PERCENTILE_SAMPLE)
    sample = flat[::stride].astype(np.float64)
    percentiles = np.percentile(sample, PERCENTILES)
    return {
        "min": _number(values.min()),
        "max": _number(values.max()),
        "mean": float(np.mean(values, dtype=np.float64)),
        "percentiles": {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, percentiles)},
        "percentiles_sampled": stride > 1,
        "non_finite_voxels": non_finite,
        "nonzero_fraction": float(np.count_nonzero(values) / values.size),
    }


def _number(value: Any) -> Union[int, float]:
    return int(value) if np.issubdtype(type(value), np.integer) else float(value)


def describe_image(image) -> Dict[str, Any]:
    """Geometry, dtype, modality and intensity summary of an :class:`~meddl.io.Image`."""
    metadata = image.metadata
    return {
        "kind": "volume",
        "path": metadata.get("source"),
        "format": metadata.get("format"),
        **image.geometry(),
        "dtype": str(image.array.dtype),
        "modality": metadata.get("modality"),
        "series_uid": metadata.get("series_uid"),
        "series_description": metadata.get("series_description"),
        "voxels": int(image.array.size),
        "physical_extent_mm": [float(n * s) for n, s in zip(image.size, image.spacing)],
        "intensity": intensity_summary(image.array),
    }


def describe_model(folder: PathLike, home: Optional[PathLike] = None) -> Dict[str, Any]:
    """Name, version, task, labels, input spec, provenance and metrics of a model package."""
    from meddl.models import load_spec

    folder = Path(folder)
    spec = load_spec(folder)
    weights = folder / "weights.safetensors"
    raw = spec.raw
    return {
        "kind": "model",
        "path": str(folder),
        "model_home": str(home) if home else None,
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "architecture": {"name": spec.architecture, "args": spec.architecture_args},
        "labels": [{"value": lb.value, "name": lb.name, "color": lb.color} for lb in spec.labels],
        "input": spec.input,
        "postprocess": spec.postprocess,
        "inference": spec.inference,
        "provenance": raw.get("provenance"),
        "metrics": raw.get("metrics"),
        "parent": raw.get("parent"),
        "weights_bytes": weights.stat().st_size if weights.is_file() else None,
    }


# --- text ------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return "-" if value is None else str(value)


def _rows(pairs: List[tuple]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"  {key.ljust(width)}  {value}" for key, value in pairs)


def format_text(result: Dict[str, Any]) -> str:
    """The human-readable form of a :func:`describe_path` result."""
    kind = result["kind"]
    if kind == "volume":
        intensity = result["intensity"]
        p = intensity.get("percentiles", {})
        direction = result["direction"]
        pairs = [
            ("format", _fmt(result["format"])),
            ("size", " x ".join(map(str, result["size"])) + "  (i, j, k)"),
            ("spacing", " x ".join(_fmt(s) for s in result["spacing"]) + " mm"),
            ("origin", _fmt(result["origin"]) + " mm, LPS"),
            ("direction", "  ".join(_fmt([row[c] for row in direction]) for c in range(3)) + "  (i, j, k axes)"),
            ("orientation", result["orientation"]),
            ("extent", " x ".join(f"{e:.1f}" for e in result["physical_extent_mm"]) + " mm"),
            ("dtype", result["dtype"]),
            ("modality", _fmt(result["modality"])),
        ]
        if result.get("series_uid"):
            pairs.append(("series", f"{result['series_uid']}  {result.get('series_description') or ''}".rstrip()))
        if intensity["min"] is not None:
            pairs.append(("intensity", f"min {_fmt(intensity['min'])}, max {_fmt(intensity['max'])}, "
                                       f"mean {_fmt(intensity['mean'])}"))  # fmt: skip
            pairs.append(("percentiles", ", ".join(f"{k} {_fmt(v)}" for k, v in p.items())
                          + ("  (sampled)" if intensity.get("percentiles_sampled") else "")))  # fmt: skip
        if intensity["non_finite_voxels"]:
            pairs.append(("non-finite", f"{intensity['non_finite_voxels']} NaN/inf voxels"))
        return f"{result['path']}\n{_rows(pairs)}"
    if kind == "dicom_folder":
        lines = [f"{result['path']}: {len(result['series'])} DICOM series (pick one with --series-uid)"]
        for series in result["series"]:
            text = f"  {series['series_uid']}  {series['modality'] or '?'}  {series['files']} files"
            if series["frames"] != series["files"]:
                text += f" ({series['frames']} frames)"
            text += f"  {series['kind']}"
            if series["description"]:
                text += f"  '{series['description']}'"
            lines.append(text)
        return "\n".join(lines)
    # model
    pairs = [
        ("name", result["name"]),
        ("version", result["version"]),
        ("task", result["task"]),
        ("architecture", f"{result['architecture']['name']} {result['architecture']['args']}"),
    ]
    if result.get("model_home"):
        pairs.insert(0, ("model home", f"{result['model_home']} (champion shown)"))
    spec_input = result["input"]
    pairs.append(("input", ", ".join(f"{k} {_fmt(v)}" for k, v in spec_input.items() if k != "normalization")))
    if "normalization" in spec_input:
        pairs.append(("normalization", ", ".join(f"{k} {_fmt(v)}" for k, v in spec_input["normalization"].items())))
    for label in result["labels"]:
        colour = "#" + "".join(f"{round(c * 255):02x}" for c in label["color"])
        pairs.append((f"label {label['value']}", f"{label['name']}  {colour}"))
    for section in ("provenance", "metrics"):
        value = result.get(section)
        if isinstance(value, dict):
            for key, item in value.items():
                pairs.append((f"{section}.{key}", _fmt(item) if not isinstance(item, dict) else _inline(item)))
        elif value is not None:
            pairs.append((section, _fmt(value)))
    if result.get("weights_bytes") is not None:
        pairs.append(("weights", f"{result['weights_bytes'] / 1e6:.2f} MB"))
    return f"{result['path']}\n{_rows(pairs)}"


def _inline(mapping: Dict[str, Any]) -> str:
    parts = []
    for key, value in mapping.items():
        parts.append(f"{key} {_inline(value) if isinstance(value, dict) else _fmt(value)}")
    return "{" + ", ".join(parts) + "}"
