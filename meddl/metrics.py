"""Segmentation metrics in physical units, computed with MONAI's metric functions.

One call scores every label of a predicted labelmap against a reference on the same grid:
Dice, IoU (Jaccard), 95th-percentile Hausdorff distance and average symmetric surface distance in
millimetres, sensitivity, specificity and precision.

Conventions (explicit, because libraries disagree on them):

* ``spacing`` is in the engine's ``(i, j, k)`` order, as :attr:`meddl.io.Image.spacing` gives it; the
  arrays are ``(k, j, i)`` as :attr:`meddl.io.Image.array`. The spacing is reversed once, here, before
  MONAI sees it (MONAI wants spacing in array-axis order).
* A label absent from **both** prediction and reference scores ``dice = iou = 1`` and
  ``hd95_mm = asd_mm = 0`` (nothing to find, nothing wrongly found); its ``status`` is ``"both_empty"``.
* A label present in only one of them scores ``dice = iou = 0`` and ``hd95_mm = asd_mm = inf`` (there
  is no surface to measure a distance to); ``status`` is ``"pred_empty"`` or ``"ref_empty"``.
* Sensitivity, specificity and precision are NaN when their denominator is zero (sensitivity with an
  empty reference, precision with an empty prediction, specificity when the label fills the volume).
* Non-finite values become ``None`` in JSON (see :func:`json_safe`); the ``status`` field keeps the reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["METRIC_NAMES", "segmentation_metrics", "summarize", "json_safe"]

METRIC_NAMES = ("dice", "iou", "hd95_mm", "asd_mm", "sensitivity", "specificity", "precision")

ArrayOrImage = Union[np.ndarray, "object"]  # an ndarray or a meddl.io.Image


def _array_and_spacing(value: ArrayOrImage) -> Tuple[np.ndarray, Optional[Tuple[float, ...]]]:
    array = getattr(value, "array", value)
    spacing = getattr(value, "spacing", None)
    return np.asarray(array), spacing


def _union_box(pred: np.ndarray, ref: np.ndarray) -> Optional[Tuple[slice, ...]]:
    """The bounding box of ``pred | ref`` grown by one voxel (clipped to the array), or None when both are empty.

    Cropping there first changes no metric (MONAI crops the same way before finding edges) but keeps the
    float copies MONAI makes small on large volumes.
    """
    box = []
    for axis in range(pred.ndim):
        others = tuple(a for a in range(pred.ndim) if a != axis)
        present = np.flatnonzero(pred.any(axis=others) | ref.any(axis=others))
        if present.size == 0:
            return None
        box.append(slice(max(0, int(present[0]) - 1), min(pred.shape[axis], int(present[-1]) + 2)))
    return tuple(box)


def _label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_kji: Sequence[float]) -> Dict[str, object]:
    """Metrics for one binary pair (boolean arrays of equal shape)."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        get_confusion_matrix,
    )

    total = int(pred.size)
    box = _union_box(pred, ref)
    if box is None:
        # Nothing predicted, nothing to predict: a perfect answer by definition; no positives to score.
        return {
            "dice": 1.0,
            "iou": 1.0,
            "hd95_mm": 0.0,
            "asd_mm": 0.0,
            "sensitivity": math.nan,
            "specificity": 1.0,
            "precision": math.nan,
            "pred_voxels": 0,
            "ref_voxels": 0,
            "status": "both_empty",
        }
    pred_box, ref_box = pred[box], ref[box]
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_box))[None, None].float()
    y_ref = torch.from_numpy(np.ascontiguousarray(ref_box))[None, None].float()

    confusion = get_confusion_matrix(y_pred, y_ref, include_background=True)
    # Voxels outside the crop are true negatives (neither mask has any there).
    confusion[..., 2] += float(total - pred_box.size)
    result: Dict[str, object] = {
        "sensitivity": float(compute_confusion_matrix_metric("sensitivity", confusion)),
        "specificity": float(compute_confusion_matrix_metric("specificity", confusion)),
        "precision": float(compute_confusion_matrix_metric("precision", confusion)),
        "pred_voxels": int(pred_box.sum()),
        "ref_voxels": int(ref_box.sum()),
    }
    if result["pred_voxels"] == 0 or result["ref_voxels"] == 0:
        result.update(dice=0.0, iou=0.0, hd95_mm=math.inf, asd_mm=math.inf)
        result["status"] = "pred_empty" if result["pred_voxels"] == 0 else "ref_empty"
        return result
    spacing = [float(s) for s in spacing_kji]
    result["dice"] = float(compute_dice(y_pred, y_ref, include_background=True, ignore_empty=False))
    result["iou"] = float(compute_iou(y_pred, y_ref, include_background=True, ignore_empty=False))
    with warnings.catch_warnings():
        # MONAI's distance functions call one of its own deprecated arguments internally; not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        result["hd95_mm"] = float(
            compute_hausdorff_distance(y_pred, y_ref, include_background=True, percentile=95, spacing=spacing)
        )
        result["asd_mm"] = float(
            compute_average_surface_distance(y_pred, y_ref, include_background=True, symmetric=True, spacing=spacing)
        )
    result["status"] = "ok"
    return result


def segmentation_metrics(
    pred: ArrayOrImage,
    ref: ArrayOrImage,
    labels: Mapping[int, str],
    spacing: Optional[Sequence[float]] = None,
) -> Dict[str, Dict[str, object]]:
    """Score each label of ``pred`` against ``ref``.

    Args:
        pred: predicted labelmap, an integer array ``(k, j, i)`` or a :class:`meddl.io.Image`.
        ref: reference labelmap on the same grid (same shape; the caller checks the geometry).
        labels: label value -> name, the labels to score (usually the foreground ones).
        spacing: voxel size in mm in ``(i, j, k)`` order (``Image.spacing``); taken from ``pred`` when it is
            an Image and ``spacing`` is None; 1 mm when neither gives one.

    Returns:
        ``{name: {dice, iou, hd95_mm, asd_mm, sensitivity, specificity, precision, pred_voxels, ref_voxels,
        status}}`` with distances in mm (see the module docstring for empty labels).

    Raises:
        ValueError: when the arrays differ in shape or the spacing does not fit them.
    """
    pred_array, pred_spacing = _array_and_spacing(pred)
    ref_array, _ = _array_and_spacing(ref)
    if pred_array.shape != ref_array.shape:
        raise ValueError(f"prediction shape {pred_array.shape} differs from reference shape {ref_array.shape}")
    spacing = spacing if spacing is not None else pred_spacing
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred_array.ndim
    if len(spacing) != pred_array.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} does not fit an array of {pred_array.ndim} dimensions")
    spacing_kji = spacing[::-1]
    return {
        str(name): _label_metrics(pred_array == value, ref_array == value, spacing_kji)
        for value, name in labels.items()
    }


def summarize(per_case: Iterable[Mapping[str, Mapping[str, Mapping[str, object]]]]) -> Dict[str, Dict[str, Dict]]:
    """Mean, sd, min, max and count per label and metric over cases (``{case: segmentation_metrics(...)}``).

    Non-finite values (an empty label's infinite distance, an undefined sensitivity) are left out of mean
    and sd and counted in ``n_nonfinite``; sd is the sample standard deviation (ddof=1; 0 for one case).
    """
    collected: Dict[str, Dict[str, List[float]]] = {}
    for case in per_case:
        for label, values in case.items():
            for metric in METRIC_NAMES:
                collected.setdefault(label, {}).setdefault(metric, []).append(float(values[metric]))
    summary: Dict[str, Dict[str, Dict]] = {}
    for label, metrics in collected.items():
        summary[label] = {}
        for metric, values in metrics.items():
            array = np.asarray(values, dtype=np.float64)
            finite = array[np.isfinite(array)]
            summary[label][metric] = {
                "mean": float(finite.mean()) if finite.size else math.nan,
                "sd": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else math.nan),
                "min": float(array.min()) if array.size else math.nan,
                "max": float(array.max()) if array.size else math.nan,
                "n": int(array.size),
                "n_nonfinite": int(array.size - finite.size),
            }
    return summary


def json_safe(value):
    """``value`` with every non-finite float replaced by None, so ``json.dumps`` writes strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
