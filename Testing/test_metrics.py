"""Metrics against cases whose answer follows from the geometry (cubes, single voxels) with anisotropic spacing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from meddl.metrics import json_safe, segmentation_metrics, summarize

torch.set_num_threads(1)

# (i, j, k) spacing as Image.spacing gives it; arrays are (k, j, i).
SPACING_IJK = (0.8, 1.1, 2.5)


def cube(shape, corner, size, value=1):
    array = np.zeros(shape, dtype=np.uint8)
    k, j, i = corner
    array[k : k + size, j : j + size, i : i + size] = value
    return array


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_cubes_dice_iou_and_hd95_follow_from_the_geometry(axis, shift):
    size = 12
    ref = cube((32, 32, 32), (8, 8, 8), size)
    corner = [8, 8, 8]
    corner[axis] += shift
    pred = cube((32, 32, 32), tuple(corner), size)

    scores = segmentation_metrics(pred, ref, {1: "cube"}, SPACING_IJK)["cube"]

    overlap = (size - shift) * size * size
    assert scores["dice"] == pytest.approx(2 * overlap / (2 * size**3))
    assert scores["iou"] == pytest.approx(overlap / (2 * size**3 - overlap))
    # Every surface voxel of one cube has its shifted twin on the other surface, `shift` voxels away along
    # `axis`; the leading face (size**2 voxels) has nothing nearer. That face is more than 5 % of the surface,
    # so the 95th percentile equals the maximum: shift times the spacing of that array axis.
    surface_voxels = size**3 - (size - 2) ** 3
    assert size**2 / surface_voxels > 0.05
    spacing_of_axis = SPACING_IJK[::-1][axis]
    assert scores["hd95_mm"] == pytest.approx(shift * spacing_of_axis, rel=1e-5)
    assert 0 < scores["asd_mm"] < scores["hd95_mm"]
    # Voxel counts: the prediction gains a slab of shift * size**2 voxels that the reference lacks.
    assert scores["sensitivity"] == pytest.approx(overlap / size**3)
    assert scores["precision"] == pytest.approx(overlap / size**3)
    negatives = 32**3 - size**3
    assert scores["specificity"] == pytest.approx((negatives - (size**3 - overlap)) / negatives)


def test_single_voxels_give_the_physical_distance_with_axis_order_respected():
    ref = np.zeros((20, 20, 20), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[5, 5, 5] = 1
    dk, dj, di = 4, 2, 7
    pred[5 + dk, 5 + dj, 5 + di] = 1
    scores = segmentation_metrics(pred, ref, {1: "dot"}, SPACING_IJK)["dot"]
    sx, sy, sz = SPACING_IJK
    distance = math.sqrt((di * sx) ** 2 + (dj * sy) ** 2 + (dk * sz) ** 2)
    assert scores["hd95_mm"] == pytest.approx(distance, rel=1e-5)
    assert scores["asd_mm"] == pytest.approx(distance, rel=1e-5)
    assert scores["dice"] == 0.0 and scores["iou"] == 0.0
    assert scores["sensitivity"] == 0.0 and scores["precision"] == 0.0


def test_identical_masks_score_perfectly_and_spacing_comes_from_an_image(fsl_brain_mask_2mm):
    from meddl.io import read_image

    mask = read_image(fsl_brain_mask_2mm)
    labels = mask.with_array((mask.array > 0.5).astype(np.uint8))
    scores = segmentation_metrics(labels, labels, {1: "brain"})["brain"]
    assert scores["dice"] == 1.0 and scores["iou"] == 1.0
    assert scores["hd95_mm"] == 0.0 and scores["asd_mm"] == 0.0
    assert scores["sensitivity"] == 1.0 and scores["specificity"] == 1.0 and scores["precision"] == 1.0
    assert scores["ref_voxels"] == int((mask.array > 0.5).sum())

    # Shift the real brain mask one slice up: HD95 is one slice thickness of this 2 mm grid.
    shifted = np.zeros_like(labels.array)
    shifted[1:] = labels.array[:-1]
    moved = segmentation_metrics(labels.with_array(shifted), labels, {1: "brain"})["brain"]
    assert moved["hd95_mm"] == pytest.approx(mask.spacing[2], rel=1e-5)
    assert 0.9 < moved["dice"] < 1.0


def test_empty_labels_are_defined_explicitly():
    ref = cube((16, 16, 16), (4, 4, 4), 5, value=1)
    pred = ref.copy()
    pred[pred == 1] = 2  # label 1 predicted as 2: label 1 missing from pred, label 2 missing from ref
    scores = segmentation_metrics(pred, ref, {1: "one", 2: "two", 3: "three"}, SPACING_IJK)

    assert scores["one"]["status"] == "pred_empty"
    assert scores["one"]["dice"] == 0.0 and math.isinf(scores["one"]["hd95_mm"]) and math.isinf(scores["one"]["asd_mm"])
    assert scores["one"]["sensitivity"] == 0.0 and math.isnan(scores["one"]["precision"])
    assert scores["two"]["status"] == "ref_empty"
    assert scores["two"]["dice"] == 0.0 and math.isinf(scores["two"]["hd95_mm"])
    assert math.isnan(scores["two"]["sensitivity"]) and scores["two"]["precision"] == 0.0
    assert scores["three"]["status"] == "both_empty"
    assert scores["three"]["dice"] == 1.0 and scores["three"]["hd95_mm"] == 0.0 and scores["three"]["asd_mm"] == 0.0

    # Strict JSON: non-finite values become null, the status keeps the reason.
    text = json.dumps(json_safe(scores), allow_nan=False)
    assert json.loads(text)["one"]["hd95_mm"] is None


def test_mismatched_shapes_and_bad_spacing_are_refused():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), {1: "x"}, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), {1: "x"}, (1, 0, 1))


def test_summary_gives_mean_and_sample_sd_over_cases():
    ref = cube((24, 24, 24), (6, 6, 6), 10)
    cases = {}
    for shift in (0, 1, 2):
        pred = cube((24, 24, 24), (6 + shift, 6, 6), 10)
        cases[f"case{shift}"] = segmentation_metrics(pred, ref, {1: "cube"}, SPACING_IJK)
    dice = [cases[c]["cube"]["dice"] for c in cases]
    summary = summarize(cases.values())["cube"]
    assert summary["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
    assert summary["dice"]["n"] == 3 and summary["dice"]["n_nonfinite"] == 0
    assert summary["hd95_mm"]["max"] == pytest.approx(2 * SPACING_IJK[2], rel=1e-5)


def test_summary_leaves_infinite_distances_out_of_the_mean():
    ref = cube((16, 16, 16), (4, 4, 4), 6)
    empty = np.zeros_like(ref)
    cases = [segmentation_metrics(ref, ref, {1: "c"}, SPACING_IJK), segmentation_metrics(empty, ref, {1: "c"})]
    summary = summarize(cases)["c"]
    assert summary["hd95_mm"]["mean"] == 0.0 and summary["hd95_mm"]["n_nonfinite"] == 1
    assert summary["dice"]["mean"] == pytest.approx(0.5)
