"""Evaluation: pair images with reference labelmaps, segment (or take given predictions), score, report.

:func:`evaluate` is what ``meddl evaluate`` runs; the writers put the same numbers into a CSV (one row per
case and label), a JSON file (per case, summary, failures) and a Markdown summary (mean ± sd per label,
then every case), plus an overlay PNG of the worst case. Every figure in them is measured here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import Cancelled, InputError, MedDLError
from meddl.fsutil import split_volume_suffix, write_text_atomic
from meddl.metrics import METRIC_NAMES, json_safe, segmentation_metrics, summarize
from meddl.progress import CancelToken, ProgressCallback, no_progress, scaled

__all__ = [
    "case_name",
    "list_volumes",
    "match_cases",
    "check_same_grid",
    "evaluate",
    "write_csv",
    "write_json",
    "write_markdown",
]

PathLike = Union[str, os.PathLike]
# Name endings that tie a labelmap (or an nnU-Net channel file) to its image: "case1_seg.nii.gz" ↔ "case1".
_LABEL_TAGS = re.compile(r"([_-](seg|segmentation|label|labels|labelmap|mask|gt|ref|reference|pred|prediction))$", re.I)
_CHANNEL_TAG = re.compile(r"_\d{4}$")


def case_name(path: Path) -> str:
    """A path's case name: its file name without the volume extension (a folder keeps its name)."""
    return split_volume_suffix(path.name)[0]


def _match_key(name: str) -> str:
    return _CHANNEL_TAG.sub("", _LABEL_TAGS.sub("", name)).lower()


def list_volumes(path: Path) -> List[Path]:
    """``[path]`` for a file; the volume files (and series sub-folders) of a folder, sorted."""
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_file():
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    volumes = [p for p in entries if p.is_file() and split_volume_suffix(p.name)[1]]
    return volumes + [p for p in entries if p.is_dir()]


def match_cases(
    images: Sequence[Path], labels: Sequence[Path]
) -> Tuple[List[Tuple[str, Path, Path]], List[Path], List[Path]]:
    """Pair images and labelmaps by name: ``case1.nii.gz`` ↔ ``case1.nii.gz``, ``case1_seg.nrrd``,
    ``case1_mask.nii.gz``; nnU-Net's ``case1_0000.nii.gz`` ↔ ``case1.nii.gz``. One of each makes one pair.

    Returns:
        ``(pairs [(case, image, label)], images without a label, labels without an image)``.
    """
    if len(images) == 1 and len(labels) == 1:
        return [(case_name(images[0]), images[0], labels[0])], [], []
    by_key: Dict[str, List[Path]] = {}
    for label in labels:
        by_key.setdefault(_match_key(case_name(label)), []).append(label)
    pairs, lonely_images, used = [], [], set()
    for image in images:
        exact = [lb for lb in labels if case_name(lb) == case_name(image) and lb not in used]
        candidates = exact or [lb for lb in by_key.get(_match_key(case_name(image)), []) if lb not in used]
        if candidates:
            used.add(candidates[0])
            pairs.append((case_name(image), image, candidates[0]))
        else:
            lonely_images.append(image)
    return pairs, lonely_images, [lb for lb in labels if lb not in used]


def check_same_grid(image, image_path: Path, labelmap, label_path: Path) -> None:
    """Refuse a labelmap that is not on its image's grid, naming both files and what differs."""
    if labelmap.same_grid(image):
        return
    differences = []
    if labelmap.array.shape != image.array.shape:
        differences.append(f"size {list(labelmap.size)} vs {list(image.size)}")
    if not np.allclose(labelmap.spacing, image.spacing, atol=1e-4):
        differences.append(f"spacing {_rounded(labelmap.spacing)} vs {_rounded(image.spacing)}")
    if not np.allclose(labelmap.origin, image.origin, atol=1e-3):
        differences.append(f"origin {_rounded(labelmap.origin)} vs {_rounded(image.origin)}")
    if not np.allclose(labelmap.direction, image.direction, atol=1e-4):
        differences.append(f"direction {labelmap.orientation_code} vs {image.orientation_code}")
    raise InputError(
        f"geometry differs from image {image_path} ({'; '.join(differences) or 'grid'}); resample it first",
        label_path,
    )


def _rounded(values: Sequence[float]) -> List[float]:
    return [round(float(v), 3) for v in values]


def evaluate(
    images: PathLike,
    labels: PathLike,
    output_dir: PathLike,
    model: Optional[PathLike] = None,
    predictions: Optional[PathLike] = None,
    device: Optional[str] = None,
    tta: Optional[bool] = None,
    force_modality: bool = False,
    label_names: Optional[Mapping[int, str]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    save_predictions: bool = True,
    overlay: bool = True,
) -> Dict:
    """Score a model (or existing predictions) against reference labelmaps and write the reports.

    Args:
        images: an image file or a folder of them (DICOM series as sub-folders).
        labels: the reference labelmap file or folder; matched to images by name (:func:`match_cases`).
        output_dir: where ``metrics.csv``, ``metrics.json``, ``summary.md``, ``worst_case.png`` and (when
            segmenting) ``predictions/`` go.
        model: a model package folder; needed unless ``predictions`` is given; gives label names/colours.
        predictions: a folder (or file) of labelmaps to score instead of segmenting; matched by name.
        device, tta, force_modality: as for :func:`meddl.infer.segment_image`.
        label_names: value -> name of the labels to score when there is no model (default: every
            non-zero value found in the references, named ``label <value>``).
        progress, cancel: progress reporting and cooperative cancellation.
        save_predictions: keep the labelmaps the model produced under ``predictions/``.
        overlay: write the worst case's overlay PNG.

    Returns:
        The JSON report (also written to ``metrics.json``): model, cases, summary, worst case, failures.

    Raises:
        InputError: nothing to evaluate (no pairs), or an unreadable folder; per-case problems are
            collected in ``failures`` instead.
    """
    from meddl.io import read_image, write_image

    progress = progress or no_progress
    output_dir = Path(output_dir)
    images_path, labels_path = Path(images), Path(labels)
    pairs, lonely_images, lonely_labels = match_cases(list_volumes(images_path), list_volumes(labels_path))
    if not pairs:
        raise InputError(f"no image in {images_path} has a labelmap of the same name in {labels_path}", labels_path)
    prediction_files: Dict[str, Path] = {}
    if predictions is not None:
        found, _, _ = match_cases([image for _, image, _ in pairs], list_volumes(Path(predictions)))
        prediction_files = {case: prediction for case, _, prediction in found}

    package = None
    colours: Dict[int, List[float]] = {}
    names: Dict[int, str] = dict(label_names or {})
    if model is not None:
        from meddl.models import load_model

        package = load_model(model)
        names = names or {lb.value: lb.name for lb in package.spec.foreground_labels}
        colours = {lb.value: lb.color for lb in package.spec.labels}
    elif predictions is None:
        raise InputError("give a model to segment with, or --predictions to score existing labelmaps", images_path)

    output_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict] = {}
    timings: Dict[str, Dict[str, float]] = {}
    failures: List[Dict] = [
        {"case": case_name(p), "error": InputError("no labelmap of the same name", p).to_dict()} for p in lonely_images
    ]
    worst: Optional[Tuple[float, str, Path, Path, Optional[Path]]] = None
    started_all = time.perf_counter()
    for index, (case, image_path, label_path) in enumerate(pairs):
        report = scaled(progress, index / len(pairs), (index + 1) / len(pairs))
        report(0.0, f"{case}: reading")
        try:
            image = read_image(image_path)
            reference = read_image(label_path)
            check_same_grid(image, image_path, reference, label_path)
            reference_labels = (
                np.rint(reference.array).astype(np.int64) if reference.array.dtype.kind == "f" else reference.array
            )
            case_names = names or {int(v): f"label {int(v)}" for v in np.unique(reference_labels) if v != 0}
            started = time.perf_counter()
            if predictions is not None:
                if case not in prediction_files:
                    raise InputError(f"no prediction of the same name in {predictions}", image_path)
                prediction_path: Optional[Path] = prediction_files[case]
                prediction = read_image(prediction_path)
                check_same_grid(image, image_path, prediction, prediction_path)
                predicted = prediction.array
                drawn: Dict = {
                    "edge_contrast": None,
                    "intensity_spread": None,
                    "cut_axes": None,
                    "seen_edge_contrast": None,
                }
            else:
                from meddl.infer import segment_image

                if force_modality:
                    image.metadata["force"] = True
                result = segment_image(image, package, device, tta, scaled(report, 0.05, 0.85), cancel)
                predicted = result.labelmap.array
                drawn = {
                    "edge_contrast": result.edge_contrast,
                    "intensity_spread": result.intensity_spread,
                    "cut_axes": result.cut_axes,
                    "seen_edge_contrast": result.seen_edge_contrast,
                }
                prediction_path = None
                if save_predictions:
                    prediction_path = write_image(result.labelmap, output_dir / "predictions" / f"{case}.nii.gz")
                timings[case] = {k: round(v, 4) for k, v in result.timings.items()}
            segment_seconds = time.perf_counter() - started
            report(0.9, f"{case}: scoring")
            started = time.perf_counter()
            scores = segmentation_metrics(predicted, reference_labels, case_names, image.spacing)
            timings.setdefault(case, {})["segment_total"] = round(segment_seconds, 4)
            timings[case]["metrics"] = round(time.perf_counter() - started, 4)
            results[case] = {
                "image": str(image_path),
                "label": str(label_path),
                "prediction": str(prediction_path) if prediction_path else None,
                "metrics": scores,
                **drawn,  # meddl.infer.drawn_anatomy's figures; None for given predictions
            }
            mean_dice = float(np.mean([s["dice"] for s in scores.values()])) if scores else 1.0
            if worst is None or mean_dice < worst[0]:
                worst = (mean_dice, case, image_path, label_path, prediction_path)
                worst_arrays = (image, reference, predicted)
        except Cancelled:
            raise
        except MedDLError as error:
            failures.append({"case": case, "error": error.to_dict()})
        if cancel:
            cancel.check()

    summary = summarize(entry["metrics"] for entry in results.values())
    report_json: Dict = {
        "model": None
        if package is None
        else {"name": package.spec.name, "version": package.spec.version, "path": str(package.path)},
        "images": str(images_path),
        "labels": str(labels_path),
        "predictions": str(predictions) if predictions is not None else None,
        "cases": results,
        "summary": summary,
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started_all, 3),
        "failures": failures,
        "unmatched_labels": [str(p) for p in lonely_labels],
        "worst_case": None,
        "files": {},
    }
    if worst is not None:
        report_json["worst_case"] = {"case": worst[1], "mean_dice": worst[0]}
        if overlay:
            from meddl.viz import save_overlay_png

            image, reference, predicted = worst_arrays
            png = save_overlay_png(
                image,
                image.with_array(np.asarray(predicted)),
                output_dir / "worst_case.png",
                colors=colours or None,
                title=f"worst case: {worst[1]} (mean Dice {worst[0]:.3f}); dashed: reference",
                names=names or None,
                reference=reference.with_array((np.asarray(reference.array) > 0).astype(np.uint8)),
            )
            report_json["files"]["worst_case_png"] = str(png)
    report_json["files"]["csv"] = str(write_csv(results, output_dir / "metrics.csv"))
    report_json["files"]["markdown"] = str(write_markdown(report_json, output_dir / "summary.md"))
    report_json["files"]["json"] = str(output_dir / "metrics.json")
    write_json(report_json, output_dir / "metrics.json")
    progress(1.0, f"evaluated {len(results)} cases")
    return report_json


def _csv_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")
    return str(value)


def write_csv(results: Mapping[str, Mapping], path: PathLike) -> Path:
    """One row per case and label: case, label, the metrics, voxel counts and status (inf/nan spelled out)."""
    import io

    columns = ["case", "label", *METRIC_NAMES, "pred_voxels", "ref_voxels", "status"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for case, entry in results.items():
        for label, scores in entry["metrics"].items():
            writer.writerow([case, label, *(_csv_value(scores[c]) for c in columns[2:])])
    return write_text_atomic(Path(path), buffer.getvalue())


def write_json(report: Mapping, path: PathLike) -> Path:
    """Strict JSON (non-finite numbers as null)."""
    return write_text_atomic(Path(path), json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


def _format(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:.2f}" if metric.endswith("_mm") else f"{value:.3f}"


def write_markdown(report: Mapping, path: PathLike) -> Path:
    """A summary a person reads: mean ± sd per label and metric, then one line per case, then failures."""
    model = report.get("model")
    lines = ["# Evaluation summary", ""]
    lines.append(f"- model: {model['name']} {model['version']} ({model['path']})" if model else "- model: none")
    if report.get("predictions"):
        lines.append(f"- predictions: {report['predictions']}")
    lines.append(f"- images: {report['images']}")
    lines.append(f"- labels: {report['labels']}")
    lines.append(f"- cases scored: {len(report['cases'])}; failed: {len(report['failures'])}")
    if report.get("worst_case"):
        worst = report["worst_case"]
        lines.append(f"- worst case: {worst['case']} (mean Dice {worst['mean_dice']:.3f}), overlay `worst_case.png`")
    lines += ["", "## Mean ± sd per label", ""]
    header = "| label | n | " + " | ".join(METRIC_NAMES) + " |"
    lines += [header, "|" + " --- |" * (len(METRIC_NAMES) + 2)]
    for label, metrics in report["summary"].items():
        cells = []
        for metric in METRIC_NAMES:
            stats = metrics[metric]
            cell = f"{_format(stats['mean'], metric)} ± {_format(stats['sd'], metric)}"
            if stats["n_nonfinite"]:
                cell += f" ({stats['n_nonfinite']} undefined)"
            cells.append(cell)
        lines.append(f"| {label} | {metrics['dice']['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Distances in mm. An empty label in both prediction and reference scores Dice 1 and distance 0;",
        "empty in only one scores Dice 0 and an undefined (infinite) distance, left out of mean ± sd.",
        "",
    ]
    lines += [
        "## Cases",
        "",
        "| case | label | dice | iou | hd95_mm | asd_mm | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, entry in report["cases"].items():
        for label, scores in entry["metrics"].items():
            cells = " | ".join(_format(scores[m], m) for m in ("dice", "iou", "hd95_mm", "asd_mm"))
            lines.append(f"| {case} | {label} | {cells} | {scores['status']} |")
    if report["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- {failure['error']['message']}" for failure in report["failures"]]
    return write_text_atomic(Path(path), "\n".join(lines) + "\n")
