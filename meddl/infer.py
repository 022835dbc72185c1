"""Segmentation inference: model grid → MONAI sliding window → probabilities back on the input grid.

Memory stays bounded on large volumes (a 512x512x400 CT runs in well under 4 GB): probabilities live on
the (usually coarser) model grid, and are brought back to the input grid one slab of slices at a time,
all classes of a slab together, so that the arg-max is taken on interpolated probabilities (no
staircase on anisotropic inputs) while no full-size float map is ever held. Post-processing works on
the labels' bounding box only.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import InputError, ModalityError, ModelError
from meddl.io import Image, read_image, validate_for_inference, write_image
from meddl.models import FIELD_TERMS, ModelPackage, ModelSpec, load_model
from meddl.progress import CancelToken, ProgressCallback, no_progress, scaled
from meddl.transforms import (
    bounding_box,
    crop_box,
    crop_to_foreground,
    fill_holes,
    foreground_object,
    frame_cut_base,
    frame_cut_sides,
    frame_cut_top,
    head_object,
    keep_largest_component,
    normalize_intensity,
    resample_to_grid,
    scanned_air_level,
    to_model_grid,
    volume_faces,
)

__all__ = [
    "SegmentationResult",
    "select_device",
    "configure_threads",
    "check_input",
    "hounsfield_air_fraction",
    "quiet_noisy_air",
    "predict_probabilities",
    "probabilities_to_labels",
    "segment_image",
    "NetworkPass",
    "PassRunner",
    "segment_file",
    "postprocess_labelmap",
    "trim_to_tissue",
    "peel_enhanced_rim",
    "fill_deep_pocket",
    "model_input",
    "whole_model_input",
    "cropped_input",
    "crop_threshold",
    "FoundObject",
    "object_points_and_cut",
    "coil_profile_slope",
    "without_coil_profile",
    "intensity_gradient",
    "without_intensity_gradient",
    "gradient_passes",
    "GradientPasses",
    "head_size_factor",
    "head_pose_rotation",
    "head_offset_mm",
    "head_lies_upright",
    "least_sure_upright",
    "face_reach_mm",
    "pass_confidence",
    "upright_pass",
    "brain_base_offset_mm",
    "TurnedPass",
    "AXIS_TURNS",
    "TURN_ABOUT_VERTICAL",
    "turned_world",
    "turned_grid",
    "object_widths",
    "object_tilt_deg",
    "open_mm",
    "squared_distance_outside",
    "keep_largest_component",
    "edge_contrast",
    "intensity_spread",
    "cut_axes",
    "DrawnAnatomy",
    "drawn_anatomy",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# Voxels of the input grid resampled per slab when probabilities go back to the input grid: 8 M voxels
# is 32 MB of float32 per class, small next to the volume itself and large enough that ITK's
# per-call overhead does not show.
SLAB_VOXELS = 8_000_000
# A volume with this share of voxels at or below -500, and as large a share above, is a CT in Hounsfield units (air
# -1000 around a body), not an MR.
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.05
# The opening after thresholding runs on a grid no finer than this (mm): its distance transforms cost 7 s each on
# a 0.5 mm head, and the mask they shape comes from a 2 mm grid. (On a 2 mm grid, a 1 mm head's opening lost some of
# its bite: 21 of the 95 stress probes' HD95 got worse, by up to 1.8 mm; docs/brain-model.md.)
OPENING_FINEST_MM = 1.0
# Squared distances within this share of the radius squared count as at the radius: float32 rounding must not decide
# whether a voxel exactly 6 mm (five 1.2 mm slices) from the background is eroded.
RADIUS_TOLERANCE = 1e-5
# How far fill_deep_pocket takes a head on past a face of the field of view that cuts it (mm).
POCKET_FACE_PAD_MM = 40.0
# The 23 rotations (LPS) that turn a head by quarter turns: a header that lost or garbled the orientation (Analyze, a
# conversion that dropped it) shows the head to the network in one of these or as it is.
AXIS_TURNS = [
    turn
    for order in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
    for turn in [np.eye(3)[list(order)] * np.asarray(signs)[:, None]]
    if np.linalg.det(turn) > 0 and not np.array_equal(turn, np.eye(3))
]
# Half a turn about the vertical (LPS): a head's twin, with the same top and the face the other way.
TURN_ABOUT_VERTICAL = np.diag([-1.0, -1.0, 1.0])
# Where a head's top or face points, in words: along LPS +x/-x, +y/-y, +z/-z.
DIRECTION_WORDS = (("to the left", "to the right"), ("back", "forward"), ("up", "down"))


@dataclass
class SegmentationResult:
    """A labelmap on the input's grid, the time each step took (seconds), label volumes and window count."""

    labelmap: Image
    timings: Dict[str, float] = field(default_factory=dict)
    label_volumes_ml: Dict[str, float] = field(default_factory=dict)
    windows: int = 0
    size_scale: float = 1.0  # the model grid's spacing factor when size normalisation ran another pass
    tilt_correction_deg: float = 0.0  # how far the pose normalisation's pass turned the grid (degrees)
    # Where the header had the head when the orientation check turned it ("top down, face back"); "none": not turned.
    orientation_turn: str = "none"
    air_quieted: bool = False  # the input's air was noise (MP2RAGE-like) and was blanked outside the head
    coil_gain: float = 1.0  # the receive coil's profile a pass removed: brightness at its radius over the centre
    # The intensity gradient passes removed (log intensity per 100 mm along LPS); zeros: none.
    gradient_removed: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    neck_trimmed_mm: float = 0.0  # how much of the scan below the brain the last pass left out (mm; 0: none)
    air_above_cut_mm: float = 0.0  # air the last pass had above a head the field of view cuts at the top (mm)
    air_beside_cut_mm: float = 0.0  # ... and beyond a side of the head it cuts (mm, over both grid axes)
    air_below_cut_mm: float = 0.0  # ... and below a head it cuts at the base (mm)
    # What was drawn before a cut base is framed, where the package checks it (:func:`drawn_anatomy`): the image's
    # step across its surface, the spread of its values inside it, the axes at whose ends the field of view cuts it.
    edge_contrast: Optional[float] = None
    intensity_spread: Optional[float] = None
    cut_axes: int = 0
    # The step the check of a drawing cut along two axes read, on the image as the last pass saw it (a coil's or a
    # gradient's field taken out); None where that check did not run.
    seen_edge_contrast: Optional[float] = None
    # Why that is no anatomy the model learnt, where one of the checks says so: segmented only because forced.
    unlike_anatomy: Optional[str] = None
    tissue_trimmed: float = 0.0  # the share of the brain drawn on CSF round it that the tissue trim took off (0: none)
    rim_peeled_mm: float = 0.0  # how deep a bright rim on the brain's surface (contrast agent) was peeled (0: none)
    # What the pocket fill drew as brain: a bite out of the brain deeper under the scalp than its surface (ml; 0: none).
    pocket_filled_ml: float = 0.0


def select_device(device: Optional[str] = None) -> str:
    """``device`` if given, else CUDA when present, else CPU."""
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device '{device}' was requested but no CUDA GPU is available")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's and ITK's thread count: ``threads``, else ``$MEDDL_NUM_THREADS``, else ``os.cpu_count()``.

    Returns the count in use. A shared machine (several workers, CI) sets ``MEDDL_NUM_THREADS`` so that
    processes do not oversubscribe the cores.
    """
    import SimpleITK as sitk
    import torch

    if threads is None:
        value = os.environ.get("MEDDL_NUM_THREADS", "").strip()
        try:
            threads = int(value) if value else (os.cpu_count() or 1)
        except ValueError:
            logger.warning("MEDDL_NUM_THREADS=%r is not a number; using all cores", value)
            threads = os.cpu_count() or 1
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return threads


def check_input(image: Image, package: ModelPackage) -> None:
    """Refuse inputs the model cannot take, naming the file: wrong dimensions, NaN/inf, constant, wrong modality,
    thinner than the model's ``input.min_extent_mm``."""
    source = image.metadata.get("source")
    validate_for_inference(image)
    if min(image.array.shape) < 1:
        raise InputError("the volume is empty", source)
    spec = package.spec
    expected, found = spec.modality, image.metadata.get("modality")
    if expected and not image.metadata.get("force"):
        if found and str(found).upper() != str(expected).upper():
            raise ModalityError(f"the file's modality is {found} but model '{spec.name}' expects {expected}", source)
        air = hounsfield_air_fraction(image.array) if not found and str(expected).upper() == "MR" else 0.0
        if CT_AIR_FRACTION <= air <= 1 - CT_AIR_FRACTION:
            raise ModalityError(
                f"the file names no modality, but {100 * air:.0f} % of its voxels are at {CT_AIR_HU:g} or below, as "
                f"air in a CT in Hounsfield units; model '{spec.name}' expects {expected}",
                source,
            )
    extents = [size * spacing for size, spacing in zip(image.size, image.spacing)]
    thinnest = int(np.argmin(extents))
    if extents[thinnest] < spec.min_extent_mm:
        raise InputError(
            f"the volume spans only {extents[thinnest]:.1f} mm along its {'ijk'[thinnest]} axis "
            f"({image.size[thinnest]} voxels of {image.spacing[thinnest]:g} mm); model '{spec.name}' needs at least "
            f"{spec.min_extent_mm:g} mm along every axis",
            source,
        )


def hounsfield_air_fraction(array: np.ndarray) -> float:
    """The fraction of voxels at or below ``CT_AIR_HU``: air in a CT stored in Hounsfield units (-1000).

    Magnitude MR is never negative, so a volume with a few per cent of such voxels, around a few per cent of body
    above them, is a CT whatever its file says (NIfTI and NRRD carry no modality; Slicer converts DICOM CT to
    Hounsfield units on load). Where nearly every voxel is that low there is no body in Hounsfield units: an image
    stored with an offset, which the percentile normalisation takes as it is.
    """
    return float(np.count_nonzero(array <= CT_AIR_HU)) / max(1, array.size)


def predict_probabilities(
    model_image: Image,
    package: ModelPackage,
    device: str = "cpu",
    tta: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    normalized: bool = False,
    counter: Optional[List[int]] = None,
) -> np.ndarray:
    """Softmax probabilities ``[C, k, j, i]`` (float32 numpy) for an image already on the model grid.

    Args:
        model_image: the image on the model grid (see :func:`meddl.transforms.to_model_grid`).
        package: the loaded model.
        device: ``"cpu"`` or a CUDA device; on CUDA the network runs under float16 autocast.
        tta: average over the identity and a flip along each axis the package declares (``flip_axes``).
        progress, cancel: progress reporting and cooperative cancellation (checked before every window).
        normalized: ``model_image`` is already intensity-normalised as the package asks.
        counter: when given, ``counter[0]`` is increased by the number of network windows run.
    """
    import torch
    from monai.inferers import sliding_window_inference

    spec = package.spec
    if spec.in_channels != 1:
        raise ModelError(
            f"model '{spec.name}' needs {spec.in_channels} input channels; this volume has 1", package.path
        )
    network = package.network.to(device)
    progress = progress or no_progress
    data = model_image.array if normalized else normalize_intensity(model_image.array, spec.normalization)
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None].to(device)
    flips = [()] + ([(2 + axis,) for axis in spec.flip_axes] if tta else [])  # tensor dims: batch, channel, k, j, i
    cuda = str(device).startswith("cuda")
    # Mixed precision on the GPU: convolutions in float16, blending and softmax in float32.
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
    overlap = float(spec.inference.get("overlap", 0.25))
    batch = int(spec.inference.get("sw_batch_size", 1))
    counter = counter if counter is not None else [0]
    total = len(flips) * _window_count(model_image.array.shape, spec.patch_size, overlap)
    first = counter[0]

    def forward(window):
        if cancel:
            cancel.check()
        counter[0] += int(window.shape[0])
        done = counter[0] - first
        progress(min(1.0, done / total), f"window {min(done, total)}/{total}")
        return network(window)

    with torch.inference_mode(), autocast:
        summed = None
        for axes in flips:
            flipped = torch.flip(tensor, axes) if axes else tensor
            logits = sliding_window_inference(
                flipped,
                roi_size=spec.patch_size,
                sw_batch_size=batch,
                predictor=forward,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=0.0,
            )
            probabilities = torch.softmax(logits.float(), dim=1)
            del logits
            if axes:
                probabilities = torch.flip(probabilities, axes)
            summed = probabilities if summed is None else summed.add_(probabilities)
            del probabilities
        if len(flips) > 1:
            summed /= len(flips)
        result = summed[0].float().cpu().numpy()
    return np.ascontiguousarray(result, dtype=np.float32)


def _window_count(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits on ``shape`` (for progress reporting only)."""
    count = 1
    for size, roi in zip(shape, patch):
        if size > roi:
            step = max(1, int(roi * (1 - overlap)))
            count *= math.ceil((size - roi) / step) + 1
    return max(1, count)


def probabilities_to_labels(
    probabilities: np.ndarray,
    model_grid: Image,
    target: Image,
    label_values: Sequence[int],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """Arg-max labels on ``target``'s grid from class probabilities ``[C, k, j, i]`` on ``model_grid``.

    Each class's probability is linearly interpolated onto the target voxels before the arg-max, so the
    boundary follows the interpolated probability (smooth on anisotropic or oblique targets, no voxel
    staircase). Three things keep this cheap on a large target, none of which changes a single label:

    * Only the target's index box that can see a non-background model voxel is resampled. Elsewhere every
      interpolation neighbour has class 0 as its arg-max, and a weighted mean of such voxels keeps
      class 0 on top (ties go to the first class, as ``np.argmax`` does), so those voxels are class 0.
    * The box is processed in slabs of whole slices (``SLAB_VOXELS``): one slab of floats per class at a time.
    * With two classes, ``p1 > 1/2`` replaces the arg-max (interpolation keeps ``p0 + p1 = 1``): one resample.
    """
    import SimpleITK as sitk

    progress = progress or no_progress
    dtype = np.uint8 if max(label_values) < 256 else np.uint16
    values = np.asarray(label_values, dtype=dtype)
    labels = np.full(target.array.shape, values[0], dtype=dtype)
    box = bounding_box(np.argmax(probabilities, axis=0))
    if box is None:
        progress(1.0, "no foreground")
        return labels
    (k0, k1), (j0, j1), (i0, i1) = _target_box(box, model_grid, target)
    channels = [1] if len(values) == 2 else list(range(len(values)))
    sources = []
    for channel in channels:
        source = sitk.GetImageFromArray(np.ascontiguousarray(probabilities[channel]))
        source.SetSpacing(model_grid.spacing)
        source.SetOrigin(model_grid.origin)
        source.SetDirection(model_grid.direction.flatten().tolist())
        sources.append(source)
    axes = target.direction * np.asarray(target.spacing)  # columns: one voxel step along i, j, k in mm
    slab = max(1, min(k1 - k0, SLAB_VOXELS // max(1, (j1 - j0) * (i1 - i0))))
    identity = sitk.Transform()
    for start in range(k0, k1, slab):
        if cancel:
            cancel.check()
        stop = min(k1, start + slab)
        reference = sitk.Image([i1 - i0, j1 - j0, stop - start], sitk.sitkUInt8)
        reference.SetSpacing(target.spacing)
        reference.SetOrigin(tuple(np.asarray(target.origin) + axes @ np.array([i0, j0, start], dtype=np.float64)))
        reference.SetDirection(target.direction.flatten().tolist())
        region = labels[start:stop, j0:j1, i0:i1]
        if len(sources) == 1:
            resampled = sitk.Resample(sources[0], reference, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            # A view, not a copy: `resampled` must stay referenced while it is read.
            region[sitk.GetArrayViewFromImage(resampled) > 0.5] = values[1]
            del resampled
        else:
            best = best_index = None
            for channel, source in enumerate(sources):
                # Outside the model grid (only rounding at its very edge: it covers the target) is background.
                default = 1.0 if channel == 0 else 0.0
                score = sitk.GetArrayFromImage(
                    sitk.Resample(source, reference, identity, sitk.sitkLinear, default, sitk.sitkFloat32)
                )
                if best is None:
                    best, best_index = score, np.zeros(score.shape, dtype=np.uint8)
                    continue
                better = score > best
                best_index[better] = channel
                np.maximum(best, score, out=best)
            region[...] = values[best_index]
        progress((stop - k0) / (k1 - k0), f"labels for slices {start}-{stop - 1}")
    return labels


def _target_box(box: Tuple[slice, ...], model_grid: Image, target: Image) -> List[Tuple[int, int]]:
    """``(start, stop)`` per target array axis (k, j, i) covering every target voxel whose position lies in
    the model-grid index box ``box`` (a (k, j, i) slice tuple; corners at voxel centres)."""
    corners_kji = np.array(
        [
            [k, j, i]
            for k in (box[0].start, box[0].stop - 1)
            for j in (box[1].start, box[1].stop - 1)
            for i in (box[2].start, box[2].stop - 1)
        ],
        dtype=np.float64,
    )
    physical = (model_grid.affine[:3, :3] @ corners_kji[:, ::-1].T).T + np.asarray(model_grid.origin)
    to_index = np.linalg.inv(target.affine[:3, :3])
    index_ijk = (to_index @ (physical - np.asarray(target.origin)).T).T
    low = np.floor(index_ijk.min(axis=0) - 1e-6).astype(int)
    high = np.ceil(index_ijk.max(axis=0) + 1e-6).astype(int) + 1
    size_ijk = np.asarray(target.size)
    low, high = np.clip(low, 0, size_ijk), np.clip(high, 0, size_ijk)
    return [(int(low[a]), int(max(low[a], high[a]))) for a in (2, 1, 0)]


def postprocess_labelmap(labels: np.ndarray, options: Dict, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Open each label, keep its largest connected component and/or fill its holes, as the package asks.

    Options (``model.json`` ``postprocess``): ``opening_mm`` (a morphological opening by a ball of that radius
    in mm: parts of the label thinner than twice the radius, such as a bridge from the brain into the orbit,
    are cut off, so the largest-component step below can drop what they joined), ``largest_component``,
    ``fill_holes``. ``spacing`` is the voxel size in mm in ``(i, j, k)`` order (``Image.spacing``), which the
    opening needs; 1 mm when not given.

    Works in place on the bounding box of the foreground (grown by one voxel, so background surrounds
    every label there exactly as in the whole volume); returns ``labels``. Components are numbered in
    uint16 when they fit (half the memory of scipy's default int32 on a large box).
    """
    opening_mm = float(options.get("opening_mm", 0) or 0)
    largest = bool(options.get("largest_component", False))
    fill = bool(options.get("fill_holes", False))
    if not (opening_mm > 0 or largest or fill):
        return labels
    box = bounding_box(labels)
    if box is None:
        return labels
    view = labels[box]  # a view: edits land in `labels`
    spacing_kji = tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0)))[::-1]
    for value in np.unique(view):
        if value == 0:
            continue
        mask = view == value
        if opening_mm > 0:
            opened = open_mm(mask, spacing_kji, opening_mm)
            if opened.any():  # a label thinner than the ball everywhere is kept as it is rather than erased
                view[mask & ~opened] = 0
                mask = opened
        if largest and keep_largest_component(mask):
            view[(view == value) & ~mask] = 0
        if fill:
            filled = fill_holes(mask)
            filled &= view == 0
            view[filled] = value
            del filled
    return labels


def open_mm(
    mask: np.ndarray, spacing_kji: Sequence[float], radius_mm: float, finest_mm: float = OPENING_FINEST_MM
) -> np.ndarray:
    """Morphological opening of ``mask`` by a ball of ``radius_mm``, in mm on anisotropic grids.

    Erosion keeps the voxels farther than the radius from the background; dilation then takes back every voxel
    within the radius of what is left. Both are Euclidean distance transforms, so the cost does not grow with the
    ball's size as a structuring element's would. ``mask`` must have background on every face (a grown box).

    Along axes finer than ``finest_mm`` the distances are taken on a grid coarser by a whole factor (a coarse voxel
    is in the mask when at least half of its voxels are) and interpolated back (:func:`upsample_linear`), with half
    a coarse voxel of slack for that rounding; the result is never more than ``mask``. The mask comes from
    probabilities on a 2 mm grid, so this loses nothing that was there, at a fraction of the exact transform's cost
    on a 0.5 mm head.
    """
    factors = [max(1, int(finest_mm // s)) for s in spacing_kji]
    exact = factors == [1, 1, 1]
    grid, spacing = mask, list(spacing_kji)
    if not exact:
        grid = np.pad(block_mean(mask, factors) >= 0.5, 1)  # background on every face
        spacing = [s * f for s, f in zip(spacing_kji, factors)]
    at_radius = radius_mm**2 * (1.0 + RADIUS_TOLERANCE)
    eroded = squared_distance_outside(grid, spacing) > at_radius
    if not eroded.any():
        return np.zeros(mask.shape, dtype=bool)
    squared = squared_distance_outside(~eroded, spacing)
    if exact:
        return squared <= at_radius
    distance = upsample_linear(np.sqrt(np.maximum(squared[1:-1, 1:-1, 1:-1], 0.0)), factors, mask.shape)
    slack = max(spacing) / 2.0
    return mask & (distance <= radius_mm + slack)


def block_mean(array: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The float32 mean of ``array`` over blocks of ``factors`` voxels per axis (the last blocks padded with zeros)."""
    padded = np.pad(array, [(0, -n % f) for n, f in zip(array.shape, factors)])
    blocks = [n // f for n, f in zip(padded.shape, factors)]
    share = padded.reshape(blocks[0], factors[0], blocks[1], factors[1], blocks[2], factors[2])
    return share.mean(axis=(1, 3, 5), dtype=np.float32)


def local_mean(values: np.ndarray, mask: np.ndarray, spacing_kji: Sequence[float], sigma_mm: float) -> np.ndarray:
    """The mean of ``values`` over ``mask`` about each voxel, in Gaussian weights of ``sigma_mm`` (a normalised
    convolution; 0 far from ``mask``). Taken on a grid about ``sigma_mm / 4`` coarse and interpolated back, so that a
    wide filter does not run over every fine voxel."""
    from scipy import ndimage

    factors = [max(1, int(sigma_mm / 4.0 // s)) for s in spacing_kji]
    sigmas = [sigma_mm / (s * f) for s, f in zip(spacing_kji, factors)]
    weighted = ndimage.gaussian_filter(block_mean(np.where(mask, values, 0).astype(np.float32), factors), sigmas)
    weights = ndimage.gaussian_filter(block_mean(mask, factors), sigmas)
    coarse = np.where(weights > 1e-3, weighted / np.maximum(weights, 1e-3), 0.0).astype(np.float32)
    return upsample_linear(coarse, factors, mask.shape)


def upsample_linear(coarse: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Float32 ``coarse`` interpolated linearly onto the grid ``factors`` times finer per axis (voxel centres aligned
    as block means place them; values held at the edges), cut to ``shape``.

    As scipy's ``zoom`` (order 1, grid mode) but on torch's threads: a tenth of its time on a head's bounding box.
    """
    import torch

    grid = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None, None]
    fine = torch.nn.functional.interpolate(grid, scale_factor=tuple(factors), mode="trilinear", align_corners=False)
    return fine[0, 0, : shape[0], : shape[1], : shape[2]].numpy()


def dark_level(image: Image) -> float:
    """The image's dark level, its 0.5th percentile: intensity ratios count above it, so that an image stored about
    zero (MP2RAGE "UNI" images from -0.5 to 0.5) reads as its magnitude would."""
    # Percentiles of one voxel in 27 are as good here as in quiet_noisy_air, and ten times cheaper.
    return float(np.percentile(image.array[::3, ::3, ::3], 0.5))


def trim_to_tissue(image: Image, labels: np.ndarray, options: Dict) -> float:
    """Drop the voxels of ``options["label"]`` (default 1) that lie outside the envelope of its tissue; in place.

    An older brain sits in a band of CSF that young heads, and so the templates, barely have; the network draws part
    of that band as brain (Colin27 with its brain shrunk to 0.93x on the skull base and the gap at 0.4 of the brain's
    level: 40 % of the band, Dice 0.934). Tissue is where the image, smoothed by ``smoothing_mm``, is at least
    ``min_ratio`` times the label's own level about it (:func:`local_mean` over ``level_mm``, so that a coil that
    darkens the brain's base does not read as CSF); its largest piece closed by a ball of ``closing_mm`` keeps the
    sulci and the fissure between the hemispheres, and what of the label lies outside that envelope goes. Only where
    that is at least ``min_removed`` of the label (a band of CSF all round, not the partial voxels of a young brain's
    surface) and takes at least ``min_surface_share`` of its surface voxels (a band follows the surface; a dark
    lesion at the cortex, which the ratio cannot tell from CSF, is a bite in one place) is anything changed. The
    ratio is taken above the image's :func:`dark_level`.

    Returns the share of the label's voxels removed (0.0: none).
    """
    from scipy import ndimage

    value = int(options.get("label", 1))
    radius = float(options.get("closing_mm", 4.0))
    found = labels == value
    box = bounding_box(found, (0, 0, 0))
    if box is None:
        return 0.0
    spacing_kji = tuple(float(s) for s in image.spacing[::-1])
    # Room for the closing on every side, beyond the grid's faces too: a brain the field of view cuts stays whole.
    margin = [(int(math.ceil(radius / s)) + 1,) * 2 for s in spacing_kji]
    mask = np.pad(found[box], margin)
    values = np.pad(image.array[box].astype(np.float32) - np.float32(dark_level(image)), margin, mode="edge")
    smoothing = float(options.get("smoothing_mm", 1.0))
    if smoothing > 0:
        values = ndimage.gaussian_filter(values, [smoothing / s for s in spacing_kji])
    level = local_mean(values, mask, spacing_kji, float(options.get("level_mm", 15.0)))
    core = mask & (values >= float(options.get("min_ratio", 0.5)) * level)
    del values, level
    if not core.any():
        return 0.0
    keep_largest_component(core)
    least_removed = float(options.get("min_removed", 0.0))
    drawn = float(mask.sum())
    # What is kept below holds the core whole (one piece inside the envelope), so at most the rest can go: most young
    # heads stop here, before the closing's distance maps.
    if 1.0 - float(core.sum()) / drawn < least_removed:
        return 0.0
    at_radius = radius**2 * (1.0 + RADIUS_TOLERANCE)
    grown = core | (squared_distance_outside(~core, spacing_kji) <= at_radius)
    envelope = fill_holes((squared_distance_outside(grown, spacing_kji) > at_radius) | core)
    kept = mask & envelope
    keep_largest_component(kept)
    kept = fill_holes(kept)
    removed = 1.0 - float(kept.sum()) / drawn
    if removed < least_removed:
        return 0.0
    least_surface = float(options.get("min_surface_share", 0.0))
    if least_surface > 0:
        surface = mask & ~ndimage.binary_erosion(mask)
        if float((surface & ~kept).sum()) < least_surface * float(surface.sum()):
            return 0.0
    inner = tuple(slice(before, n - after) for (before, after), n in zip(margin, mask.shape))
    view = labels[box]
    view[mask[inner] & ~kept[inner]] = 0
    return removed


def peel_enhanced_rim(image: Image, labels: np.ndarray, options: Dict) -> float:
    """Drop the bright shell that contrast agent lays on the surface of ``options["label"]`` (default 1); in place.

    On a post-contrast T1 the dura, the venous sinuses and the cortical veins round the brain enhance; where the CSF
    between them and the cortex is thin, the network takes the rim for cortex (nimare's copy under a 2 mm rim at 0.8x
    its white matter: the whole rim drawn, HD95 5.39 mm). A brain's own profile only brightens from its surface
    inwards: partial voxels, grey matter, then the white matter under it. So the label's median is taken in layers
    ``step_mm`` thick (the finest spacing where that is coarser) by depth under its surface; where the darkest layer
    within ``max_depth_mm`` is darker than a layer above it (their ratio, above the image's :func:`dark_level`, at
    least ``min_ratio``), the layers above it are a rim, and of them the voxels at least as bright as that layer go.
    The rest keeps its largest piece, holes filled.

    Returns the depth peeled in mm (0.0: none).
    """
    value = int(options.get("label", 1))
    found = labels == value
    box = bounding_box(found, (1, 1, 1))
    if box is None:
        return 0.0
    spacing_kji = tuple(float(s) for s in image.spacing[::-1])
    step = max(float(options.get("step_mm", 1.0)), min(spacing_kji))
    layers = max(1, int(float(options.get("max_depth_mm", 3.0)) / step + 1e-6))
    mask = found[box]
    depth = np.sqrt(np.maximum(squared_distance_outside(mask, spacing_kji), 0.0))
    values = image.array[box].astype(np.float32) - np.float32(dark_level(image))
    # Layer n holds the voxels deeper than n steps and no deeper than n + 1 (the surface's own voxels lie at 1 step).
    shells = [mask & (depth > n * step) & (depth <= (n + 1) * step + 1e-3) for n in range(layers + 1)]
    if any(not shell.any() for shell in shells):
        return 0.0
    medians = np.array([float(np.median(values[shell])) for shell in shells])
    darkest = 1 + int(np.argmin(medians[1:]))
    if medians[:darkest].max() < float(options.get("min_ratio", 1.0)) * medians[darkest]:
        return 0.0
    peeled_mm = darkest * step
    rim = mask & (depth <= peeled_mm + 1e-3) & (values >= medians[darkest])
    kept = mask & ~rim
    keep_largest_component(kept)
    kept = fill_holes(kept)
    view = labels[box]
    view[mask & ~kept] = 0
    return peeled_mm


def fill_deep_pocket(image: Image, labels: np.ndarray, options: Dict, spec: ModelSpec) -> float:
    """Draw as ``options["label"]`` (default 1) a pocket of its hull that lies deeper under the scalp than its surface
    does; in place.

    A large dark lesion that reaches the cortex (a cyst, an old infarct, a necrotic tumour: CSF-dark on T1) is left
    out of the brain by the network, which reads it as the CSF round the brain; the tissue trim cannot tell it from
    CSF either. The scalp can: over a lesion it runs on at its usual distance, so the bite lies deeper under it than
    the brain's surface does elsewhere, while the CSF, skull and scalp over a healthy brain lie shallower.

    On a grid of about ``grid_mm`` (block means): the head is the crop's bright object (holes filled); the depth
    under its surface is measured with the field of view's faces taken as no surface (a cut head runs on). A pocket
    is what of the label's convex hull lies deeper than the label's median surface depth plus ``margin_mm``, is not
    the label, and holds a ball of ``min_radius_mm`` (the hollows of a healthy skull base between the temporal lobes
    and the brainstem hold none of 12 mm in any stress case or probe; the 50 mm lesion probes' bites one of 15-17 mm,
    docs/brain-model.md): the union of such balls,
    grown by up to ``grow_mm`` through what of the hull lies deeper than the ``surface_percentile`` of the surface
    depths (the bite's rim, shallower than the pocket), then the label's holes filled. Most heads stop after the
    depth map, with no ball anywhere.

    Returns the volume added in ml (0.0: none).
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull, Delaunay, QhullError

    value = int(options.get("label", 1))
    spacing_kji = tuple(float(s) for s in image.spacing[::-1])
    factors = [max(1, int(float(options.get("grid_mm", 2.0)) // s)) for s in spacing_kji]
    spacing = np.array([s * f for s, f in zip(spacing_kji, factors)])
    brain = block_mean(labels == value, factors) >= 0.5
    surface = brain & ~ndimage.binary_erosion(brain)
    if surface.sum() < 4:
        return 0.0
    values = normalize_intensity(block_mean(image.array, factors), spec.normalization)
    head = fill_holes(foreground_object(values, crop_threshold(spec)))
    del values
    if head.all():  # a block cut from inside a head has no scalp to measure from
        return 0.0
    # The field of view's faces are no scalp: the head runs on past them, as far as this pad reaches.
    pad = [(int(math.ceil(POCKET_FACE_PAD_MM / s)),) * 2 for s in spacing]
    inner = tuple(slice(before, -after) for before, after in pad)
    depth = np.sqrt(np.maximum(squared_distance_outside(np.pad(head, pad, mode="edge"), spacing), 0.0))[inner]
    surface_depths = depth[surface]
    deep = (depth > float(np.median(surface_depths)) + float(options.get("margin_mm", 2.0))) & ~brain
    points = np.argwhere(surface) * spacing
    try:
        hull = Delaunay(points[ConvexHull(points).vertices])
    except QhullError:  # a flat drawing has no hull to hold a pocket
        return 0.0

    def within_hull(mask: np.ndarray) -> np.ndarray:
        voxels = np.argwhere(mask)
        inside = np.zeros_like(mask)
        inside[tuple(voxels[hull.find_simplex(voxels * spacing) >= 0].T)] = True
        return inside

    # The balls that fit: an opening, with no deep voxel beyond the grid's faces.
    pocket = open_mm(np.pad(within_hull(deep), 1), spacing, float(options.get("min_radius_mm", 12.0)))[1:-1, 1:-1, 1:-1]
    if not pocket.any():
        return 0.0
    rim_depth = float(np.percentile(surface_depths, float(options.get("surface_percentile", 25.0))))
    grow = float(options.get("grow_mm", 12.0))
    rim = within_hull((depth > rim_depth) & ~brain) & (squared_distance_outside(~pocket, spacing) <= grow * grow)
    pieces, _ = ndimage.label(rim)
    touched = np.unique(pieces[pocket])
    pocket |= np.isin(pieces, touched[touched > 0])
    added = (upsample_linear(pocket.astype(np.float32), factors, labels.shape) >= 0.5) & (labels == 0)
    labels[added] = value
    added |= fill_holes(labels == value) & (labels == 0)
    labels[added] = value
    return float(added.sum()) * float(np.prod(spacing_kji)) / 1000.0


def squared_distance_outside(mask: np.ndarray, spacing_kji: Sequence[float]) -> np.ndarray:
    """Squared Euclidean distance in mm² (float32) from each voxel of boolean ``mask`` to the nearest voxel outside
    it; 0 or less outside ``mask``, which must not fill the whole grid.

    ITK's Maurer transform, exact as scipy's ``distance_transform_edt`` is, but on ITK's threads and without
    scipy's index arrays: a quarter of the time on a head's bounding box with 2 threads.
    """
    import SimpleITK as sitk

    outside = sitk.GetImageFromArray((~mask).astype(np.uint8))
    outside.SetSpacing(tuple(float(s) for s in spacing_kji[::-1]))
    squared = sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False, squaredDistance=True, useImageSpacing=True)
    return sitk.GetArrayFromImage(squared)


@dataclass(frozen=True, eq=False)
class NetworkPass:
    """One look of the network at the input: what it looked at, on which grid, and the class probabilities it gave.

    ``seen`` is the input as the pass saw it (noisy air blanked, a coil's or a gradient's field taken out) and
    ``placed`` the input's own voxels in the world the pass saw (turned where the header had the head on its side):
    the labelmap is drawn on ``placed``. What the pass found, and how sure it is, are measured once, when first asked.
    """

    seen: Image
    placed: Image
    model_image: Image
    probabilities: np.ndarray
    spec: ModelSpec
    label: int  # the label whose largest object the later passes measure (the brain)

    @cached_property
    def found(self) -> FoundObject:
        """The largest object of ``label`` and where the edge of what was imaged cuts it
        (:func:`object_points_and_cut`)."""
        return object_points_and_cut(self.probabilities, self.model_image, self.placed, self.label)

    @cached_property
    def confidence(self) -> float:
        """How sure the pass is over the head (:func:`pass_confidence`)."""
        return pass_confidence(self.model_image, self.probabilities, self.spec)


class PassRunner:
    """Runs the network's passes over one input: the package, device and flips they share, the cancel token each
    window checks, and the count of windows they took (``windows[0]``)."""

    def __init__(
        self, package: ModelPackage, device: str, tta: bool, label: int, cancel: Optional[CancelToken] = None
    ) -> None:
        self.package, self.device, self.tta, self.label, self.cancel = package, device, tta, label, cancel
        self.windows = [0]

    def look(
        self, seen: Image, placed: Image, model_image: Image, progress: Optional[ProgressCallback] = None
    ) -> NetworkPass:
        """The pass over ``model_image``: ``seen`` on the model grid, already normalised (:func:`model_input`)."""
        probabilities = predict_probabilities(
            model_image,
            self.package,
            self.device,
            self.tta,
            progress,
            self.cancel,
            normalized=True,
            counter=self.windows,
        )
        return NetworkPass(seen, placed, model_image, probabilities, self.package.spec, self.label)


def segment_image(
    image: Image,
    package: ModelPackage,
    device: Optional[str] = None,
    tta: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> SegmentationResult:
    """Segment ``image`` with ``package``; the labelmap lies exactly on ``image``'s grid.

    Raises:
        InputError: the image is not a finite 3D volume, or its modality is not the model's.
        ModelError: the model is not a segmentation model or cannot take one channel.
        Cancelled: ``cancel`` was set.
    """
    progress = progress or no_progress
    device = select_device(device)
    configure_threads()
    spec = package.spec
    if spec.task != "segmentation":
        raise ModelError(f"model '{spec.name}' is a {spec.task} model, not a segmentation model", package.path)
    check_input(image, package)
    timings: Dict[str, float] = {}

    started = time.perf_counter()
    # The network's input: the image itself, or with noisy air blanked (the labels still go onto `image`).
    seen, air_quieted = image, False
    if spec.input.get("noisy_air") is not None:
        settings = spec.input["noisy_air"]
        # quiet_noisy_air's defaults stand for any setting the package leaves out.
        seen = quiet_noisy_air(
            image, **{key: float(settings[key]) for key in ("face_median", "calm_std") if key in settings}
        )
        air_quieted = seen is not image
        if air_quieted:
            progress(0.01, "the air around the head is noise (as in MP2RAGE): blanked outside the head")
    progress(0.02, "resampling to the model grid")
    whole_grid = whole_model_input(seen, spec, spec.target_spacing)  # the orientation check turns it (upright_pass)
    model_image = cropped_input(whole_grid, spec)
    timings["preprocess"] = time.perf_counter() - started
    if cancel:
        cancel.check()

    started = time.perf_counter()
    tta = bool(spec.inference.get("tta_flips", False)) if tta is None else tta
    sizing = _calibrated(spec.input.get("size_normalization"), "reference_extent_mm")
    posing = _calibrated(spec.input.get("pose_normalization"), "reference_tilt_deg")
    coil = _calibrated(spec.input.get("coil_normalization"), "reference_slope")
    grading = _calibrated(spec.input.get("gradient_normalization"), "reference_gradient")
    orienting = spec.input.get("orientation_check")
    runner = PassRunner(package, device, tta, int((sizing or posing or orienting or {}).get("label", 1)), cancel)
    # Each later pass has its own stretch of the bar (the turns 0.3-0.4, where the gradient passes a turn is weighed
    # against hold it at 0.4, coil 0.4-0.45, gradient 0.45-0.5, size 0.5-0.6, pose 0.6-0.85), so that it never steps
    # back; without any, the first pass has them all.
    later_passes = sizing or posing or coil or grading or orienting
    first = runner.look(seen, image, model_image, scaled(progress, 0.1, 0.3 if later_passes else 0.85))
    current = first  # the latest pass: each later one looks again at what this one shows
    # The network learnt heads upright in the world: a header that lies about the orientation (an Analyze file, a
    # conversion that lost it) shows it a head on its side or upside down. Where the first pass's brain does not sit
    # high in its head, or the network is unsure of it (a neck taken for brain sits high), look at the head turned
    # each way and keep the turn the network is surest of.
    orientation_turn = "none"
    unsure = bool(orienting) and first.confidence < least_sure_upright(first.found, orienting)
    graded = None  # the gradient passes (below), where the check ran them already
    lies_upright = not orienting or head_lies_upright(first.found, first.model_image, spec, orienting)
    if orienting and (unsure or not lies_upright):
        turned = upright_pass(
            first, whole_grid, runner, orienting, scaled(progress, 0.3, 0.4), first_upright=lies_upright
        )
        over_turn = orienting.get("min_gradient_pass_gain")
        if turned is not None and grading and over_turn is not None:
            # A coil only behind the head darkens the front of the brain: the first pass is unsure and off-centre, and
            # a wrong turn looks surer than it, though far less sure than the head as it lies with the coil's gradient
            # taken out. A head a lost header turned is the other way round.
            graded = gradient_passes(first, runner, scaled(progress, 0.4, 0.4))
            if graded is not None and graded.last.confidence >= turned.result.confidence + float(over_turn):
                progress(0.4, "with its intensity gradient taken out, the head is surest as it lies: no turn")
                turned, current = None, graded.last
            else:
                graded = None  # measured on the head as it lay: the turned one has its own
        if turned is not None:
            orientation_turn, current = turned.description, turned.result
            progress(0.4, f"the header had the head {orientation_turn}: the passes see it upright")
    del whole_grid  # as big as the field of view: no later pass reads it
    # The network learnt bias-corrected heads: a receive coil's profile left in the scan (a brighter surface) makes it
    # draw an orbit as brain. Take the profile out of the image and look again.
    coil_gain = 1.0
    if coil:
        corrected, coil_gain = without_coil_profile(current.seen, current.model_image, current.probabilities, coil)
        if corrected is not None:
            progress(0.4, f"the scan is {coil_gain:.2f}x as bright at its surface: a pass with that taken out")
            model_image = model_input(corrected, spec, spec.target_spacing)
            current = runner.look(corrected, current.placed, model_image, scaled(progress, 0.4, 0.45))
    # ... and a phased-array coil's elements sit around and above the head, none under the chin: the base of the brain
    # reads darker than the network ever saw (gradient_passes).
    if grading and graded is None:
        graded = gradient_passes(current, runner, scaled(progress, 0.45, 0.5))
        if graded is not None:
            current = graded.last
    gradient_removed = graded.removed if graded is not None else np.zeros(3)
    # The network learnt one head size and pose, the template's: look again at a head of another size, then at
    # one tilted away from that pose, on a grid that shows it as the template was shown.
    size_scale = head_size_factor(current.found, sizing) if sizing else 1.0
    spacing = [s * size_scale for s in spec.target_spacing]
    if size_scale != 1.0:
        progress(0.5, f"the head is {size_scale:.2f}x the size the model learnt: a pass on a grid to match")
        model_image = model_input(current.seen, spec, spacing, height_scale=size_scale)
        current = runner.look(current.seen, current.placed, model_image, scaled(progress, 0.5, 0.6))
    # The pose from the latest pass, the size pass's where it ran: a small head's first pass can take its neck for
    # brain, which stands the axis upright.
    rotation = head_pose_rotation(current.found, posing) if posing else None
    tilt = _rotation_angle_deg(rotation)
    if rotation is not None:
        progress(0.6, f"the head is pitched {tilt:.0f} deg from the pose the model learnt: a pass on a turned grid")
        model_image = model_input(current.seen, spec, spacing, height_scale=size_scale, direction=rotation.T)
        current = runner.look(current.seen, current.placed, model_image, scaled(progress, 0.6, 0.85))
    # A scan that runs down the neck sits the head higher in the window than the template's field of view did: look
    # again with no more below the brain than the package allows.
    below_mm = (spec.input.get("crop_foreground") or {}).get("max_below_object_mm")
    trimmed = None
    if below_mm is not None:
        trimmed = trim_below_object(current.model_image, current.probabilities, runner.label, below_mm)
    neck_trimmed_mm = 0.0
    if trimmed is not None:
        rows_left_out = current.model_image.array.shape[0] - trimmed.array.shape[0]
        neck_trimmed_mm = float(rows_left_out) * current.model_image.spacing[2]
        progress(
            0.85,
            f"the scan runs {neck_trimmed_mm:.0f} mm further down the neck than the model learnt: a pass without it",
        )
        model_image = framed_cuts(trimmed, spec, size_scale)  # the trim keeps the top: a cut one stays framed
        current = runner.look(current.seen, current.placed, model_image, scaled(progress, 0.85, 0.86))
    timings["forward"] = time.perf_counter() - started

    started = time.perf_counter()
    progress(0.86, "resampling probabilities to the input grid")
    labels = labels_on_input(
        current.probabilities, current.model_image, current.placed, spec, scaled(progress, 0.86, 0.93), cancel
    )
    drawn = drawn_anatomy(image, labels, spec, seen=current.seen)
    timings["postprocess"] = time.perf_counter() - started
    # A cut base framed with air: only where what the model drew looks like its anatomy. Framed, a volume with no head
    # in it (a head CT stored without its Hounsfield offset) can show the network enough of a head to draw one.
    framed = current.model_image if drawn.unlike else framed_base(current.model_image, spec, size_scale)
    if framed is not current.model_image:
        started = time.perf_counter()
        below_mm = float(framed.metadata["air_below_cut_mm"])
        progress(0.93, f"the field of view cuts the base of the head: a pass with {below_mm:.0f} mm of air below it")
        current = runner.look(current.seen, current.placed, framed, scaled(progress, 0.93, 0.95))
        timings["forward"] += time.perf_counter() - started
        started = time.perf_counter()
        labels = labels_on_input(
            current.probabilities, current.model_image, current.placed, spec, scaled(progress, 0.95, 0.98), cancel
        )
        timings["postprocess"] += time.perf_counter() - started
    if drawn.unlike and not image.metadata.get("force"):
        names = " and ".join(label.name for label in spec.foreground_labels)
        kind = f"{spec.modality} images" if spec.modality else "images"
        raise ModalityError(
            f"model '{spec.name}' found no {names} here: {drawn.unlike}, so this does not look like the {kind} the "
            "model was made for",
            image.metadata.get("source"),
        )
    trimming = spec.postprocess.get("tissue_trim")
    tissue_trimmed = 0.0
    if trimming and not drawn.unlike:
        started = time.perf_counter()
        tissue_trimmed = trim_to_tissue(image, labels, trimming)
        timings["postprocess"] += time.perf_counter() - started
    peeling = spec.postprocess.get("rim_peel")
    rim_peeled_mm = 0.0
    if peeling and not drawn.unlike:
        started = time.perf_counter()
        rim_peeled_mm = peel_enhanced_rim(image, labels, peeling)
        timings["postprocess"] += time.perf_counter() - started
        if rim_peeled_mm:
            progress(0.98, f"a bright rim on the brain's surface (contrast agent?): {rim_peeled_mm:g} mm peeled off")
    pocket_filling = spec.postprocess.get("pocket_fill")
    pocket_filled_ml = 0.0
    if pocket_filling and not drawn.unlike:
        started = time.perf_counter()
        pocket_filled_ml = fill_deep_pocket(image, labels, pocket_filling, spec)
        timings["postprocess"] += time.perf_counter() - started
        if pocket_filled_ml:
            progress(0.98, f"{pocket_filled_ml:.0f} ml deep under the scalp, inside the brain's hull: drawn as brain")
    progress(0.98, "done")

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label.value for label in spec.labels) + 1)
    volumes = {lb.name: float(counts[lb.value]) * voxel_ml for lb in spec.foreground_labels}
    labelmap = image.with_array(labels, model=spec.name, model_version=spec.version)
    return SegmentationResult(
        labelmap=labelmap,
        timings=timings,
        label_volumes_ml=volumes,
        windows=runner.windows[0],
        size_scale=size_scale,
        tilt_correction_deg=tilt,
        orientation_turn=orientation_turn,
        air_quieted=air_quieted,
        coil_gain=coil_gain,
        gradient_removed=tuple(round(float(v), 3) for v in gradient_removed),
        neck_trimmed_mm=neck_trimmed_mm,
        air_above_cut_mm=float(current.model_image.metadata.get("air_above_cut_mm", 0.0)),
        air_beside_cut_mm=float(current.model_image.metadata.get("air_beside_cut_mm", 0.0)),
        air_below_cut_mm=float(current.model_image.metadata.get("air_below_cut_mm", 0.0)),
        edge_contrast=drawn.edge_contrast,
        intensity_spread=drawn.intensity_spread,
        cut_axes=len(drawn.cut_axes),
        seen_edge_contrast=drawn.seen_edge_contrast,
        unlike_anatomy=drawn.unlike,
        tissue_trimmed=tissue_trimmed,
        rim_peeled_mm=rim_peeled_mm,
        pocket_filled_ml=pocket_filled_ml,
    )


def labels_on_input(
    probabilities: np.ndarray,
    model_image: Image,
    image: Image,
    spec: ModelSpec,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """The labelmap on ``image``'s grid from ``probabilities`` on ``model_image``'s, post-processed as ``spec`` asks."""
    values = [label.value for label in spec.labels]
    labels = probabilities_to_labels(probabilities, model_image, image, values, progress, cancel)
    return postprocess_labelmap(labels, spec.postprocess, image.spacing)


class DrawnAnatomy(NamedTuple):
    """What :func:`drawn_anatomy` measured of a model's foreground; a figure is None (axes empty) where the package
    sets no check on it."""

    edge_contrast: Optional[float]
    intensity_spread: Optional[float]
    cut_axes: Tuple[int, ...]
    unlike: Optional[str]  # why it is no anatomy the model learnt (a clause); None where every check passes
    seen_edge_contrast: Optional[float] = None  # the step the cut-twice check read on ``seen``; None: it did not run


def drawn_anatomy(image: Image, labels: np.ndarray, spec: ModelSpec, seen: Optional[Image] = None) -> DrawnAnatomy:
    """Whether the foreground of ``labels`` looks like the anatomy the model learnt, by the package's postprocess
    checks: the image steps up into it by ``min_edge_contrast`` (:func:`edge_contrast`), its values inside spread by
    ``min_intensity_spread`` (:func:`intensity_spread`), the field of view cuts it along at most ``max_cut_axes``
    of the array's axes (:func:`cut_axes`), and where it cuts it along two, the step is ``min_edge_contrast_cut_twice``
    at least on ``seen``: ``image`` as the last pass saw it, the same voxels with a coil's or a gradient's field taken
    out (default: ``image``). A coil only behind the head leaves its front so dark that the step on the input falls to
    noise's (+0.07 to +0.12 on heads cut twice), and that field is what the passes took out.

    A network draws a brain into anything. Into noise it draws one along no edge; into a cylinder of even intensity
    one along its edge, even inside (no grey and white matter); into smooth noise one that runs out of the volume on
    three sides, or on two along an edge a little stronger than noise has, where the field of view cuts a head's brain
    on one or two (top and base, or a side) and its brain steps up clearly.
    """
    settings = spec.postprocess
    mask = labels > 0
    least_step, least_spread = settings.get("min_edge_contrast"), settings.get("min_intensity_spread")
    most_axes, least_step_cut_twice = settings.get("max_cut_axes"), settings.get("min_edge_contrast_cut_twice")
    measure_step = least_step is not None or least_step_cut_twice is not None
    step = edge_contrast(image, mask, spec.normalization) if measure_step else None
    spread = intensity_spread(image, mask, spec.normalization) if least_spread is not None else None
    measure_axes = most_axes is not None or least_step_cut_twice is not None
    axes = cut_axes(mask, image.spacing) if measure_axes else ()
    unlike = None
    if least_step is not None and step is not None and step < float(least_step):
        unlike = (
            f"what it drew follows no edge in the image (intensity step {step:+.2f} across its surface, where the "
            f"model needs {float(least_step):.2f})"
        )
    elif spread is not None and spread < float(least_spread):
        unlike = (
            f"the image is even inside what it drew (its 10th to 90th percentile span {spread:.2f} of its median, "
            f"where the model needs {float(least_spread):.2f})"
        )
    elif most_axes is not None and len(axes) > int(most_axes):
        unlike = (
            f"what it drew runs out of the field of view along {len(axes)} of its 3 axes, where the model's "
            f"anatomy is cut along {int(most_axes)} at most"
        )
    seen_step = None
    if unlike is None and least_step_cut_twice is not None and len(axes) >= 2:
        # A turned world keeps the input's voxels (turned_world): only a field taken out or air blanked changes them.
        same_voxels = seen is None or seen.array is image.array
        seen_step = step if same_voxels else edge_contrast(seen, mask, spec.normalization)
        if seen_step is not None and seen_step < float(least_step_cut_twice):
            unlike = (
                f"what it drew runs out of the field of view along {len(axes)} of its 3 axes and follows a faint edge "
                f"(intensity step {seen_step:+.2f} across its surface, where the model's anatomy cut along two axes "
                f"needs {float(least_step_cut_twice):.2f})"
            )
    return DrawnAnatomy(step, spread, axes, unlike, seen_step)


def _every_2mm(image: Image) -> Tuple[slice, ...]:
    """Strides that take ``image``'s array about every 2 mm along each axis (the checks' figures, cheap on any grid)."""
    return tuple(slice(None, None, max(1, int(round(2.0 / s)))) for s in image.spacing[::-1])


def intensity_spread(image: Image, mask: np.ndarray, normalization: Dict, core_mm: float = 4.0) -> Optional[float]:
    """How uneven ``image`` is inside ``mask``: its 90th minus its 10th percentile over its median, normalised as the
    package normalises it, at least ``core_mm`` inside the surface, every ~2 mm.

    A brain holds grey and white matter, CSF and vessels (brain-t1 2.3.19's weights on the stress set's heads: 0.41 and
    up; a head remapped to nearly flat grey-white contrast 0.23); a cylinder of even intensity that a network drew a
    brain into, 0.07. None where the core is empty or its median is not above zero.
    """
    from scipy import ndimage

    sample = _every_2mm(image)
    core = ndimage.binary_erosion(np.asarray(mask, dtype=bool)[sample], iterations=max(1, int(round(core_mm / 2.0))))
    if not core.any():
        return None
    values = normalize_intensity(image.array[sample], normalization)[core]
    low, median, high = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return (high - low) / median if median > 0 else None


def cut_axes(mask: np.ndarray, spacing: Sequence[float], min_face_mm2: float = 200.0) -> Tuple[int, ...]:
    """The array axes at an end of which ``mask`` meets the volume's face over at least ``min_face_mm2``: where the
    field of view cuts it (``spacing`` x, y, z, as :class:`Image` has it; the array is k, j, i)."""
    spacing_kji = spacing[::-1]
    axes = []
    for axis in range(3):
        face_mm2 = float(np.prod([spacing_kji[other] for other in range(3) if other != axis]))
        ends = (np.take(mask, 0, axis=axis), np.take(mask, mask.shape[axis] - 1, axis=axis))
        if any(float(np.count_nonzero(end)) * face_mm2 >= min_face_mm2 for end in ends):
            axes.append(axis)
    return tuple(axes)


def edge_contrast(image: Image, mask: np.ndarray, normalization: Dict, shell_mm: float = 4.0) -> Optional[float]:
    """How much brighter ``image`` is just inside ``mask``'s surface than just outside it, in normalised units.

    The median of a shell about ``shell_mm`` thick inside the surface minus the median of one outside it, on the
    image normalised as the package normalises it and taken every ~2 mm (cheap on any grid). A segmentation of the
    anatomy a model learnt lies on an edge of the image (brain-t1 2.3.10 on the stress set's heads: 0.23-0.73); what
    a network draws into an image that holds no such anatomy mostly does not (2.3.10 on noise, a cylinder, a torso, a
    CT stored without its Hounsfield offset: -0.031 to +0.015; other weights drew into that CT along an edge of
    +0.068). None where either shell is empty, such as a mask that fills the grid.
    """
    from scipy import ndimage

    sample = _every_2mm(image)
    inside = np.asarray(mask, dtype=bool)[sample]
    if not inside.any():
        return None
    rings = max(1, int(round(shell_mm / 2.0)))
    inner = inside & ~ndimage.binary_erosion(inside, iterations=rings)
    outer = ndimage.binary_dilation(inside, iterations=rings) & ~inside
    if not inner.any() or not outer.any():
        return None
    values = normalize_intensity(image.array[sample], normalization)
    return float(np.median(values[inner]) - np.median(values[outer]))


def quiet_noisy_air(image: Image, face_median: float = 0.1, calm_std: float = 0.24) -> Image:
    """``image`` with its air blanked when the air is noise over the intensity range, else ``image`` itself.

    MP2RAGE "UNI" images and some reconstructions fill the air with noise as bright as tissue. The crop to the
    head (an intensity threshold) then takes in the whole field of view, and the network, which learnt dark air,
    draws the brain's edge wrong or not at all. Intensities are measured from the 1st percentile (the darkest air)
    over the span to the 99th, so that a volume stored with an offset, or as UNI images often are, from -0.5 to
    0.5, is judged as the same volume from zero. The air counts as noisy when the volume's six faces (air in a head
    scan, whatever the field of view cuts) are bright, their median above ``face_median`` times the span, and
    rough, their median standard deviation over 3×3×3 voxels above ``calm_std`` times it (a block cut from inside a
    head is bright but smooth). The head is then where the intensity is calm (white noise is rough, tissue smooth):
    opened, largest component, closed and filled; what lies outside it is set to the 1st percentile.
    """
    from scipy import ndimage

    # Every input passes this test: percentiles of one voxel in 27 are as good a threshold and ten times cheaper.
    floor, top = (float(value) for value in np.percentile(image.array[::3, ::3, ::3], [1, 99]))
    span = top - floor
    if span <= 0 or float(np.median(volume_faces(image.array))) - floor <= face_median * span:
        return image
    values = image.array.astype(np.float32) - np.float32(floor)  # near zero: E[x²] - E[x]² keeps its precision
    mean = ndimage.uniform_filter(values, 3)
    variance = ndimage.uniform_filter(values * values, 3) - mean * mean
    del mean
    limit = (calm_std * span) ** 2
    if float(np.median(volume_faces(variance))) <= limit:
        return image
    calm = ndimage.binary_opening(variance < limit, iterations=2)
    del variance
    if not calm.any():  # nothing calm anywhere: no head to keep, so leave the volume as it came
        return image
    keep_largest_component(calm)
    head = fill_holes(ndimage.binary_closing(calm, iterations=3) | calm)  # closing erodes at faces
    return image.with_array(np.where(head, image.array, floor).astype(image.array.dtype))


def model_input(
    image: Image,
    spec: ModelSpec,
    spacing: Optional[Sequence[float]],
    height_scale: float = 1.0,
    direction: Optional[np.ndarray] = None,
) -> Image:
    """``image`` resampled to the model grid at ``spacing`` (axes turned by ``direction``, see
    :func:`meddl.transforms.model_grid`), normalised and cropped as the package asks, with the crop's
    ``max_height_mm`` times ``height_scale`` (a head of another size keeps the same framing)."""
    return cropped_input(whole_model_input(image, spec, spacing, direction), spec, height_scale)


def whole_model_input(
    image: Image, spec: ModelSpec, spacing: Optional[Sequence[float]], direction: Optional[np.ndarray] = None
) -> Image:
    """``image`` resampled to the model grid at ``spacing`` (axes turned by ``direction``) and normalised, not yet
    cropped (:func:`cropped_input`)."""
    model_image = to_model_grid(image, spacing, direction=direction)
    model_image = model_image.with_array(normalize_intensity(model_image.array, spec.normalization))
    # Where the grid runs beyond the scan (turned to the head's pose, or square over an oblique acquisition), the crop
    # and the checks that find the head measure the air only where the scan is.
    scanned = to_model_grid(image.with_array(np.ones(image.array.shape[:3], np.uint8)), spacing, "nearest", direction)
    if not scanned.array.all():
        level = scanned_air_level(model_image.array, scanned.array > 0)
        if level is not None:
            model_image.metadata["air_level"] = level
    return model_image


def cropped_input(
    model_image: Image, spec: ModelSpec, height_scale: float = 1.0, head: Optional[np.ndarray] = None
) -> Image:
    """A whole model grid (:func:`whole_model_input`) cropped to the head as the package's ``crop_foreground`` asks,
    its ``max_height_mm`` times ``height_scale``, and framed where the field of view cuts the head
    (:func:`framed_cuts`). ``head`` is the head's object on it, where the caller has it."""
    crop = spec.input.get("crop_foreground")
    if crop:
        height = crop.get("max_height_mm")
        model_image = crop_to_foreground(
            model_image,
            crop_threshold(spec),
            float(crop.get("margin_mm", 10)),
            float(height) * height_scale if height is not None else None,
            head,
        )
    return framed_cuts(model_image, spec, height_scale)


def crop_threshold(spec: ModelSpec) -> float:
    """The normalised intensity above which the package's ``crop_foreground`` counts a voxel as the head (0.1)."""
    return float((spec.input.get("crop_foreground") or {}).get("threshold", 0.1))


def framed_cuts(model_image: Image, spec: ModelSpec, height_scale: float = 1.0) -> Image:
    """``model_image`` framed where the field of view cuts the head, as the package's ``crop_foreground`` asks (sizes
    times ``height_scale``): air above a cut top up to ``cut_top_height_mm`` and no more below it than
    ``cut_top_max_height_mm`` (:func:`meddl.transforms.frame_cut_top`) and air beyond a cut side up to
    ``cut_side_extent_mm`` (:func:`meddl.transforms.frame_cut_sides`). A cut base is framed by one last pass
    (:func:`framed_base`)."""
    crop = spec.input.get("crop_foreground") or {}
    threshold = crop_threshold(spec)
    if crop.get("cut_top_height_mm") is not None:
        max_height = crop.get("cut_top_max_height_mm")
        model_image = frame_cut_top(
            model_image,
            threshold,
            float(crop.get("cut_top_min_area_mm2", 10000.0)),
            float(crop["cut_top_height_mm"]) * height_scale,
            float(max_height) * height_scale if max_height is not None else None,
        )
    if crop.get("cut_side_extent_mm") is not None:
        extents = [float(extent) * height_scale for extent in crop["cut_side_extent_mm"]]
        model_image = frame_cut_sides(
            model_image, threshold, float(crop.get("cut_side_min_area_mm2", 10000.0)), extents
        )
    return model_image


def framed_base(model_image: Image, spec: ModelSpec, height_scale: float = 1.0) -> Image:
    """``model_image`` with air below a cut base up to the package's ``crop_foreground.cut_base_height_mm`` times
    ``height_scale`` (:func:`meddl.transforms.frame_cut_base`); ``model_image`` itself where the package does not set
    it or nothing is cut."""
    crop = spec.input.get("crop_foreground") or {}
    if crop.get("cut_base_height_mm") is None:
        return model_image
    return frame_cut_base(
        model_image,
        crop_threshold(spec),
        float(crop.get("cut_base_min_area_mm2", 10000.0)),
        float(crop["cut_base_height_mm"]) * height_scale,
    )


def largest_object(probabilities: np.ndarray, label: int) -> Optional[np.ndarray]:
    """The largest connected object of ``label`` where its probability is above 0.5 (what a pass found), or None."""
    mask = probabilities[label] > 0.5
    if not mask.any():
        return None
    keep_largest_component(mask)
    return mask


def trim_below_object(
    model_image: Image, probabilities: np.ndarray, label: int, max_below_mm: float
) -> Optional[Image]:
    """``model_image`` without its rows more than ``max_below_mm`` under the base of the largest object of
    ``label`` in ``probabilities``, or None when it has none to drop (or nothing was found).

    The crop to the head keeps ``max_height_mm`` below the top of the head, enough for a tall or tilted head; a
    scan that runs down the neck then frames the head higher in the window than the template's field of view did.
    The base is the height with 1 % of the object below it: a brainstem drawn on down the cord does not move it.
    Rows are the model grid's k axis, which points superior.
    """
    mask = largest_object(probabilities, label)
    if mask is None or model_image.direction[2, 2] <= 0:
        return None
    rows = np.cumsum(mask.sum(axis=(1, 2)))
    base = int(np.searchsorted(rows, 0.01 * rows[-1]))
    drop = base - int(math.ceil(max_below_mm / model_image.spacing[2]))
    return crop_box(model_image, (slice(drop, None), slice(None), slice(None))) if drop > 0 else None


def object_tilt_deg(points: np.ndarray) -> float:
    """Elevation (degrees, LPS; positive: up) of the posterior end of an object's longest principal axis.

    For a brain that axis runs front to back (its spread along it, 41 mm, is well above the other two, 31-33 mm,
    which are too close to each other to give an axis), so its elevation is the head's pitch: how far it is
    tilted forward (chin down) or back (chin up) whatever its turn about the vertical.
    """
    return math.degrees(math.asin(float(np.clip(_front_back_axis(points)[2], -1.0, 1.0))))


def _inner_voxels(model_image: Image, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The LPS positions (mm) and intensities of ``mask`` less its outer voxel layer, where partial volume with CSF
    would darken the brain's profile: what :func:`coil_profile_slope` and :func:`intensity_gradient` measure."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask)
    return _lps_points(model_image, inner), model_image.array[inner].astype(np.float64)


def coil_profile_slope(model_image: Image, mask: np.ndarray, radius_mm: float) -> Tuple[float, np.ndarray]:
    """How the brain's brighter tissue brightens towards its surface, and the brain's centre (LPS mm).

    The slope (log intensity per unit of ``(r / radius_mm)²``, ``r`` the distance from the brain's centre) of the
    75th percentile of log intensity in ten bins of that squared distance, over ``mask`` less its outer voxel layer
    (partial volume with CSF). Bias-corrected heads read about -0.1 (grey matter lies outside the white); a coil
    profile ``gain`` times brighter at ``radius_mm`` adds about ln(gain) (docs/brain-model.md).
    """
    points, values = _inner_voxels(model_image, mask)
    if len(points) < 1000:
        return 0.0, np.zeros(3)
    centre = points.mean(axis=0)
    squared = ((points - centre) ** 2).sum(axis=1) / radius_mm**2
    keep = values > 0
    logs, bins = np.log(values[keep]), np.minimum((squared[keep] * 10).astype(int), 9)
    filled = [b for b, count in enumerate(np.bincount(bins, minlength=10)) if count > 50]
    levels = [(b + 0.5) / 10 for b in filled]
    upper = [float(np.percentile(logs[bins == b], 75)) for b in filled]
    if len(levels) < 3:
        return 0.0, centre
    return float(np.polyfit(levels, upper, 1)[0]), centre


def without_coil_profile(
    image: Image, model_image: Image, probabilities: np.ndarray, coil: Dict
) -> Tuple[Optional[Image], float]:
    """``image`` with the receive coil's profile the first pass shows taken out, and that profile's gain at
    ``radius_mm``; (None, 1.0) when its slope (:func:`coil_profile_slope`) is within ``min_change`` of
    ``reference_slope`` (the model's own first pass on its training template) or nothing was found.

    The profile removed is ``exp(excess * min((r / radius_mm)², 1.5))`` about the brain's centre, ``excess`` the slope
    over the reference: the form of a phased-array coil's sensitivity, brighter towards the surface.
    """
    mask = largest_object(probabilities, int(coil.get("label", 1)))
    if mask is None:
        return None, 1.0
    radius = float(coil.get("radius_mm", 80.0))
    slope, centre = coil_profile_slope(model_image, mask, radius)
    excess = slope - float(coil["reference_slope"])
    if abs(excess) <= float(coil.get("min_change", 0.2)):
        return None, 1.0
    squared = np.zeros(image.array.shape, np.float32)  # every input voxel's squared distance from the centre
    for offset in _voxel_offsets(image, centre):
        squared += np.square(offset, out=offset)
    squared *= np.float32(1.0 / radius**2)
    np.minimum(squared, 1.5, out=squared)
    squared *= np.float32(-excess)
    profile_removed = _times_exp(image.array, squared)
    if profile_removed is None:
        return None, 1.0
    return image.with_array(profile_removed), float(math.exp(excess))


def _times_exp(values: np.ndarray, log_field: np.ndarray) -> Optional[np.ndarray]:
    """``values`` in float32 times ``exp(log_field)`` (computed in ``log_field``'s memory), or None where that runs
    past float32: a field fitted to what is no brain (a later look at a head CT stored without its Hounsfield offset,
    by a network trained without synthesis, gave the image inf and NaN), which the passes then do not take out."""
    with np.errstate(over="ignore", invalid="ignore"):
        product = values.astype(np.float32) * np.exp(log_field, out=log_field)
    return product if np.isfinite(product).all() else None


def intensity_gradient(
    model_image: Image, mask: np.ndarray, block_mm: float = 16.0, surface: str = "linear"
) -> Tuple[np.ndarray, np.ndarray]:
    """How the brain's brighter tissue brightens along each LPS axis (log intensity per 100 mm) and its centre (LPS mm).

    The least-squares plane through the 75th percentile of log intensity in ``block_mm`` cubes (those holding at least
    200 mm³) of ``mask`` less its outer voxel layer. Bias-corrected heads read about +0.1 upwards (the template's own
    anatomy); a phased-array coil whose elements sit around and above the head, none under the chin, adds a gradient
    up towards them (docs/brain-model.md). With ``surface`` "quadratic" or "cubic", a surface of that degree instead,
    its coefficients in the order of ``meddl.models.FIELD_TERMS`` (a coil's field bends: its elements are nearer the
    crown and the sides than the middle). Zeros where no more cubes are filled than there are terms.
    """
    positions, levels, centre = _brain_cube_levels(model_image, mask, block_mm)
    return _fitted_field(positions, levels, surface), centre


def _brain_cube_levels(
    model_image: Image, mask: np.ndarray, block_mm: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cubes :func:`intensity_gradient` fits: each filled cube's position (LPS, in 100 mm about the brain's
    centre) and the 75th percentile of its log intensity, and that centre (LPS mm). No cubes where fewer than 1000
    voxels of ``mask`` less its outer layer are above zero."""
    points, values = _inner_voxels(model_image, mask)
    keep = values > 0
    points, logs = points[keep], np.log(values[keep])
    if len(logs) < 1000:
        return np.zeros((0, 3)), np.zeros(0), points.mean(axis=0) if len(points) else np.zeros(3)
    centre = points.mean(axis=0)
    cells = np.floor((points - points.min(axis=0)) / block_mm).astype(np.int64)
    keys = (cells[:, 0] * 4096 + cells[:, 1]) * 4096 + cells[:, 2]
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(keys[order]) != 0])
    least = 200.0 / float(np.prod(model_image.spacing))
    positions, levels = [], []
    for block in np.split(order, starts[1:]):
        if len(block) >= least:
            positions.append((points[block].mean(axis=0) - centre) / 100.0)
            levels.append(float(np.percentile(logs[block], 75)))
    return np.reshape(positions, (-1, 3)), np.asarray(levels), centre


def _fitted_field(positions: np.ndarray, levels: np.ndarray, surface: str) -> np.ndarray:
    """The least-squares ``surface`` (``meddl.models.FIELD_TERMS``) through the cubes' ``levels`` at ``positions``
    (:func:`_brain_cube_levels`), less its constant; zeros where there are no more cubes than terms."""
    terms = len(FIELD_TERMS[surface])
    if len(positions) <= terms:
        return np.zeros(terms)
    design = np.column_stack([np.ones(len(positions)), *_field_terms(positions.T, surface)])
    return np.linalg.lstsq(design, levels, rcond=None)[0][1:]


def _field_terms(position: Sequence[np.ndarray], surface: str) -> Iterator[np.ndarray]:
    """The terms of ``surface`` at ``position`` (L, P and S in 100 mm about the centre), one array at a time: on a
    full-resolution volume each is as large as the image."""
    axis = dict(zip("LPS", position))
    for name in FIELD_TERMS[surface]:
        term = axis[name[0]]
        for letter in name[1:]:
            term = term * axis[letter]
        yield term


def without_intensity_gradient(
    image: Image,
    model_image: Image,
    probabilities: np.ndarray,
    gradient: Dict,
    min_change: Optional[float] = None,
    min_edge_contrast: Optional[float] = None,
) -> Tuple[Optional[Image], np.ndarray]:
    """``image`` with the intensity gradient the pass shows over the brain taken out, and that gradient's excess
    (log intensity per 100 mm along LPS) over ``reference_gradient`` (the model's own first pass on its training
    template); (None, zeros) when the excess is within ``min_change`` (default: the setting's), when nothing was
    found, or when what was found follows no edge: a step into it (:func:`edge_contrast` on the model grid) below
    ``min_edge_contrast``. A volume with no head in it has no brain to measure a gradient on (a head CT stored without
    its Hounsfield offset: step -0.005, then drawn along an edge once its gradient was taken out).

    The field removed is ``exp(excess · (x - centre) / 100 mm)`` about the brain's centre, with ``x`` held to
    ``max_distance_mm`` from it along each axis (the neck and the far air need no more). Where the setting's
    ``field`` is ``"quadratic"`` or ``"cubic"``, the plane still decides, but the field removed is that surface's
    excess over ``reference_field`` (the template's own, :func:`intensity_gradient` with that ``surface``).
    """
    mask = largest_object(probabilities, int(gradient.get("label", 1)))
    if mask is None:
        return None, np.zeros(3)
    positions, levels, centre = _brain_cube_levels(model_image, mask, float(gradient.get("block_mm", 16.0)))
    excess = _fitted_field(positions, levels, "linear") - np.asarray(gradient["reference_gradient"], np.float64)
    if float(np.linalg.norm(excess)) <= (float(gradient.get("min_change", 0.2)) if min_change is None else min_change):
        return None, np.zeros(3)
    if min_edge_contrast is not None:  # measured last: most inputs stop at the excess
        step = edge_contrast(model_image, mask, {"kind": "none"})  # the model grid is normalised already
        if step is None or step < min_edge_contrast:
            return None, np.zeros(3)
    surface = gradient.get("field", "linear")
    field_excess = excess
    if surface != "linear":  # the same cubes, fitted with a surface
        field_excess = _fitted_field(positions, levels, surface) - np.asarray(gradient["reference_field"], np.float64)
    reach = float(gradient.get("max_distance_mm", 120.0))
    position = []  # each LPS axis's position in 100 mm, held to the reach
    for offset in _voxel_offsets(image, centre):
        np.clip(offset, -reach, reach, out=offset)
        position.append(np.multiply(offset, np.float32(0.01), out=offset))
    log_field = np.zeros(image.array.shape, np.float32)
    for coefficient, term in zip(field_excess, _field_terms(position, surface)):
        log_field += np.float32(-coefficient) * term
    corrected = _times_exp(image.array, log_field)
    if corrected is None:
        return None, np.zeros(3)
    return image.with_array(corrected), excess


def head_on_input(image: Image, spec: ModelSpec, margin_mm: float, threshold: Optional[float] = None) -> np.ndarray:
    """The head on ``image``'s own grid, as the crop finds it on the model grid (:func:`meddl.transforms.head_object`
    of the image normalised as the package asks, above ``threshold``, else :func:`crop_threshold`), its holes filled
    and grown by about ``margin_mm`` (whole voxels along the finest axis), as a boolean mask.

    Where the air is noisy, :func:`meddl.transforms.foreground_object` raises a lower ``threshold`` over the air's
    level, so a low one reaches dim tissue without taking in noise."""
    from scipy import ndimage

    normalised = image.with_array(normalize_intensity(image.array, spec.normalization))
    head = fill_holes(head_object(normalised, crop_threshold(spec) if threshold is None else threshold))
    del normalised
    steps = int(round(margin_mm / min(image.spacing)))
    return ndimage.binary_dilation(head, iterations=steps) if steps > 0 and head.any() else head


class GradientPasses(NamedTuple):
    """What :func:`gradient_passes` ran: its last pass, on the input with the field taken out, and that field."""

    last: NetworkPass
    removed: np.ndarray  # the excess gradient taken out over all looks (log intensity per 100 mm along LPS)


def gradient_passes(
    first: NetworkPass, runner: PassRunner, progress: Optional[ProgressCallback] = None
) -> Optional[GradientPasses]:
    """Up to ``gradient_normalization.max_passes`` looks at ``first.seen``, each with the brain's intensity gradient
    over the template's taken out (:func:`without_intensity_gradient`) of what the look before showed; None where the
    ``first`` look gives nothing to take out.

    A phased-array coil's elements sit around and above the head, none under the chin: the base of the brain reads
    darker than the network ever saw, and it left the lowest 20-30 mm out. A look that missed the dark base measures
    short, so later looks take out what is left beyond the smaller ``min_follow_change``. Only where the first look
    found a brain that follows an edge (``postprocess.min_edge_contrast``): a volume with no head has no gradient.
    A look is kept only where the network is at least as sure of it as of the look before, and where its crop box cuts
    the brain along at most ``max_crop_cut_growth_mm2`` (1000) more than the look before's; else the passes end there.
    Where the package sets ``head_margin_mm``, the field is taken out of the head alone (:func:`head_on_input`, grown
    by that margin, found above ``head_threshold`` where the package sets it), the air keeping its values: fitted over
    the brain, the field brightens the grid's far corners, where noisy air then rose over the crop's threshold, the
    crop took in the air, and the framing dropped the cerebellum (docs/brain-model.md, "The gradient field kept off the
    air"). Under a coil behind the head the front of the brain reads at a tenth of its back: found above the crop's
    threshold (0.1), the head left that front out, it kept its dark values, and five probes missed; the head is
    therefore found above a lower ``head_threshold`` (0.03).
    """
    progress = progress or no_progress  # 0 to 1 over each look
    spec = runner.package.spec
    grading = spec.input["gradient_normalization"]
    most_crop_cut_growth = float(grading.get("max_crop_cut_growth_mm2", 1000.0))
    head_margin_mm = float(grading["head_margin_mm"]) if grading.get("head_margin_mm") is not None else None
    removed, done, latest, head = np.zeros(3), None, first, None
    for look in range(int(grading.get("max_passes", 3))):
        least_change = None if look == 0 else float(grading.get("min_follow_change", grading.get("min_change", 0.2)))
        least_edge = spec.postprocess.get("min_edge_contrast") if look == 0 else None
        corrected, excess = without_intensity_gradient(
            latest.seen, latest.model_image, latest.probabilities, grading, least_change, least_edge
        )
        if corrected is None:
            break
        if head_margin_mm is not None:  # the head found once, and only where there is a field to take out
            if head is None:
                head = head_on_input(first.seen, spec, head_margin_mm, grading.get("head_threshold"))
            corrected = corrected.with_array(np.where(head, corrected.array, latest.seen.array.astype(np.float32)))
        strength = float(np.linalg.norm(removed + excess))
        progress(0.0, f"the brain brightens {strength:.2f} (log) per 100 mm across it: a pass with that taken out")
        looked = runner.look(corrected, latest.placed, model_input(corrected, spec, spec.target_spacing), progress)
        # A field fitted on a brain drawn in the wrong place keeps finding more gradient, and the brain it is fitted on
        # drifts further at each look: the network grows less sure (docs/brain-model.md, "A gradient look kept where
        # the network is surer").
        if looked.confidence < latest.confidence:
            progress(1.0, "the network is less sure with that taken out: the look before is kept")
            break
        # A surer look may still frame the brain elsewhere, its crop box cutting what the look before held whole
        # (docs/brain-model.md, "A gradient look kept where its crop holds the brain").
        if looked.found.crop_cut_mm2 > latest.found.crop_cut_mm2 + most_crop_cut_growth:
            progress(1.0, "the crop with that taken out cuts the brain: the look before is kept")
            break
        removed, latest = removed + excess, looked
        done = GradientPasses(latest, removed)
    return done


def head_size_factor(found: FoundObject, sizing: Dict) -> float:
    """The factor for the model grid's spacing that brings this head to the size the model learnt, or 1.0.

    ``found`` is the brain a pass found (:func:`object_points_and_cut`). The size is the geometric mean of its widths
    (:func:`object_widths`) over ``reference_extent_mm`` (the model's own first pass on its training template). 1.0
    when the field of view cuts it on more than ``max_cut_except_top_mm2`` anywhere but its top
    (:meth:`FoundObject.cut_except_top_mm2`: a cut vertex leaves the widths as they were; on a cut base the pass did
    more harm than good, docs/brain-model.md), or, in a package that does not give that limit, anywhere on more than
    ``max_cut_mm2``; when the factor is within ``min_change`` of 1 (nothing to gain from another pass) or when
    nothing was found. Clipped to ``limits``.
    """
    limit = sizing.get("max_cut_except_top_mm2")
    if limit is not None:
        cut_mm2, limit = found.cut_except_top_mm2(), float(limit)
    else:
        cut_mm2, limit = found.cut_mm2, float(sizing.get("max_cut_mm2", 1000.0))
    if len(found.points) < 2 or cut_mm2 > limit:
        return 1.0
    width_i, width_j = object_widths(found.points)
    reference_i, reference_j = (float(v) for v in sizing["reference_extent_mm"])
    low, high = sizing.get("limits", [0.75, 1.25])
    factor = float(np.clip(math.sqrt(width_i * width_j / (reference_i * reference_j)), low, high))
    return factor if abs(factor - 1.0) > float(sizing.get("min_change", 0.07)) else 1.0


def head_pose_rotation(found: FoundObject, posing: Dict) -> Optional[np.ndarray]:
    """The LPS rotation that brings this head to the pitch the model learnt, or None.

    ``found`` is the brain a pass found (:func:`object_points_and_cut`). Its pitch is :func:`object_tilt_deg`
    against ``reference_tilt_deg`` (the model's own first pass on its training template); beyond ``min_change_deg``
    the head is turned about the horizontal axis across its front-back axis. None when the object meets the edge
    of what was imaged on more than ``max_cut_mm2`` (a cut anywhere changes its axes), when the change would exceed
    ``max_change_deg`` (that axis is not a brain's front-back axis: a neck taken for brain stands it upright) or
    when nothing was found.
    """
    if len(found.points) < 2 or found.cut_mm2 > float(posing.get("max_cut_mm2", 1000.0)):
        return None
    change = float(posing["reference_tilt_deg"]) - object_tilt_deg(found.points)
    if not float(posing.get("min_change_deg", 15.0)) < abs(change) <= float(posing.get("max_change_deg", 45.0)):
        return None
    return _pitch_rotation(found.points, math.radians(change))


def head_offset_mm(model_image: Image, brain_points: np.ndarray, threshold: float) -> np.ndarray:
    """LPS vector (mm) from the centre of the head (:func:`meddl.transforms.head_object` of the normalised
    model grid at ``threshold``, as the crop finds it) to the centre of ``brain_points``.

    An upright head holds its brain high and back, face, jaw and neck below and in front: on the stress set's whole
    heads the vector runs 8-15 mm, 0.72-0.98 of it superior. A brain with no head around it (skull-stripped) reads
    under 1 mm.
    """
    head = head_object(model_image, threshold)
    if not head.any() or len(brain_points) == 0:
        return np.zeros(3)
    return brain_points.mean(axis=0) - _lps_points(model_image, head).mean(axis=0)


def head_lies_upright(found: FoundObject, model_image: Image, spec: ModelSpec, orienting: Dict) -> bool:
    """Whether the brain a pass found (:func:`object_points_and_cut`) on ``model_image`` sits where an upright head
    holds it, so no other orientation needs a look.

    True when the head offset (:func:`head_offset_mm`) is shorter than ``min_offset_mm`` (no head around the brain to
    tell up from) or points up (its superior part at least ``upright_share`` of its length). Where the field of view
    cuts the brain below its centre on more than ``max_cut_base_mm2``, the head's centre moves up and the offset
    points down (the stress set's cerebellum cuts: 0.48-0.97 of it down): then pointing down by ``cut_base_down_share``
    counts as upright too. A head turned onto its side or face up by its header reads -0.42 to 0.46 (nimare's 1 mm copy
    and Colin27, whose fields of view end close to the brain). With ``cut_base_max_tilt_deg``, only a cut whose plane
    lies within so many degrees of the horizontal (:func:`_cut_tilt_deg`) is a cut base: the lower half of a cut
    front or back that a lost header turned upside down points down too, but stands upright (90 against the
    cerebellum cuts' 0, docs/brain-model.md 2.3.14). An offset whose superior part is at least
    ``posed_upright_share`` of its length once :func:`head_pose_rotation` turns the head to the learnt pitch counts as
    upright too: a head tilted back 40° reads 0.43 up, 0.91 turned. The pose pass turns none of the heads a lost
    header turned: upside down or on a side their front-back axes lie within 15° of the learnt pitch, face up 80-86°
    from it (docs/brain-model.md, 2.9.25). With ``posed_min_up_share``, only an offset at least that much up as it lies
    is turned so: with 80 mm of neck, a head a lost header shows face up or on its side reads 0.15 up and 0.66-0.73
    turned, and the check never ran (docs/brain-model.md, "A miss the check did not see"). With
    ``cut_base_max_offset_mm``, only an offset that short counts as upright by a cut base: an upright head cut at its
    base holds its brain 4.6-8.5 mm off the head's centre, a head cut at the back that a lost header shows face up
    11.6-17.3 mm, its face high above the brain (docs/brain-model.md, "A cut back shown face up").
    """
    if len(found.points) < 2:
        return True
    offset = head_offset_mm(model_image, found.points, crop_threshold(spec))
    length = float(np.linalg.norm(offset))
    if length < float(orienting.get("min_offset_mm", 2.0)):
        return True
    up_share = float(offset[2]) / length
    if up_share >= float(orienting.get("upright_share", 0.5)):
        return True
    posing = _calibrated(spec.input.get("pose_normalization"), "reference_tilt_deg")
    posed_share = orienting.get("posed_upright_share")
    # A head on its side or face up with a neck sits too little up for the pose pass to stand its offset up.
    posable = posing and posed_share is not None and up_share >= float(orienting.get("posed_min_up_share", -1.0))
    rotation = head_pose_rotation(found, posing) if posable else None
    if rotation is not None and float((rotation @ offset)[2]) / length >= float(posed_share):
        return True  # a head tilted back or forward: upright once the pose pass turns it to the learnt pitch
    below_centre = found.cut_points[found.cut_points[:, 2] < found.points[:, 2].mean()]
    cut_base = len(below_centre) * found.voxel_face_mm2
    if cut_base <= float(orienting.get("max_cut_base_mm2", 1000.0)):
        return False
    flattest = orienting.get("cut_base_max_tilt_deg")
    if flattest is not None and _cut_tilt_deg(below_centre) > float(flattest):
        return False  # the lower half of a cut at a side, the front or the back: a head on its side or upside down
    longest = orienting.get("cut_base_max_offset_mm")
    if longest is not None and length > float(longest):
        return False  # a cut back a lost header shows face up: the face stands above the brain, far off its centre
    return up_share <= -float(orienting.get("cut_base_down_share", 0.3))


def least_sure_upright(found: FoundObject, orienting: Dict) -> float:
    """The confidence a first pass needs for the orientation check to trust :func:`head_lies_upright`: below it, the
    check looks at every turn.

    ``min_confidence`` (0, or left out: the check trusts any pass): a neck taken for brain sits high, but the network
    is unsure of it. Where the field of view cuts the brain on more than ``max_cut_base_mm2`` along a plane further
    than ``cut_base_max_tilt_deg`` from the horizontal (its front, back or a side), ``cut_side_min_confidence`` where
    that is higher: Colin27, whose field of view ends close to its brain, turned face up by a lost header, is cut so
    (5548 mm²) and its brain sits 0.64 up in its head, as upright heads with such a cut do (0.54-0.94), but 2.9.21 is
    0.9348 sure of it and 0.955 and surer of each of those (docs/brain-model.md, 2.9.23).
    """
    least = float(orienting.get("min_confidence", 0.0))
    on_a_cut_side = orienting.get("cut_side_min_confidence")
    if on_a_cut_side is None or found.cut_mm2 <= float(orienting.get("max_cut_base_mm2", 1000.0)):
        return least
    if _cut_tilt_deg(found.cut_points) <= float(orienting.get("cut_base_max_tilt_deg", 45.0)):
        return least  # a cut top or base: an upright head's
    return max(least, float(on_a_cut_side))


def _cut_tilt_deg(cut_points: np.ndarray) -> float:
    """How far (degrees) the plane that ``cut_points`` (LPS, mm) lie closest to tilts from the horizontal: near 0
    where the field of view cuts a brain's base, near 90 where it cuts its front, back or side."""
    if len(cut_points) < 3:
        return 90.0
    normal = _principal_axes(cut_points)[:, 0]  # the direction the points spread least along
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))


def face_reach_mm(
    model_image: Image, probabilities: np.ndarray, spec: ModelSpec, label: int, rows: Sequence[float]
) -> float:
    """How much further the head reaches in front of the brain than behind it (mm), averaged over the brain's rows
    between the ``rows`` shares of its volume from the bottom; NaN where the pass found no brain.

    The head is :func:`meddl.transforms.head_object` of ``model_image`` (an LPS model grid: j runs back, k up).
    Beside an upright head's lower brain the orbits, nose and cheeks lie in front and only the occiput behind: over
    the rows 0.05-0.35 of two heads in ten acquisitions, 10.9-24.3 mm, and -5.0 to 7.1 mm for the same heads facing
    back (docs/brain-model.md, brain-t1 2.3.13). A face zeroed by defacing reads as none.
    """
    brain = largest_object(probabilities, label)
    if brain is None:
        return float("nan")
    head = head_object(model_image, crop_threshold(spec))
    filled = np.cumsum(brain.sum(axis=(1, 2)))
    low, high = (int(np.searchsorted(filled, share * filled[-1])) for share in rows)
    reaches = []
    for k in range(low, high + 1):
        brain_j, head_j = np.flatnonzero(brain[k].any(axis=1)), np.flatnonzero(head[k].any(axis=1))
        if len(brain_j) and len(head_j):
            reaches.append((brain_j[0] - head_j[0]) - (head_j[-1] - brain_j[-1]))
    return float(np.mean(reaches)) * model_image.spacing[1] if reaches else float("nan")


def pass_confidence(model_image: Image, probabilities: np.ndarray, spec: ModelSpec) -> float:
    """How sure a pass is over the head: the mean of ``2 * max_c p_c - 1`` over the voxels above the package's crop
    threshold.

    On a head whose header turns it, the pass on the head turned upright is the surest: 0.92-0.94 against 0.87-0.93 for
    the other five ways up on Colin27 and nimare's 1 mm copy, and kept on all 40 of their quarter turns that ran the
    check (docs/brain-model.md, orientation check).
    """
    head = model_image.array > crop_threshold(spec)
    if not head.any():
        return 0.0
    return float(np.mean(2.0 * probabilities.max(axis=0)[head] - 1.0))


class TurnedPass(NamedTuple):
    """A pass on the input turned in the world (:func:`turned_world`)."""

    turn: np.ndarray
    result: NetworkPass

    @property
    def description(self) -> str:
        """Where the header had the head's top and face, in words (``"top to the left, face down"``)."""
        top, face = self.turn.T @ np.array([0.0, 0.0, 1.0]), self.turn.T @ np.array([0.0, -1.0, 0.0])
        return f"top {_direction_words(top)}, face {_direction_words(face)}"


def _direction_words(vector: np.ndarray) -> str:
    """The words for the LPS axis ``vector`` runs along most (:data:`DIRECTION_WORDS`)."""
    axis = int(np.argmax(np.abs(vector)))
    return DIRECTION_WORDS[axis][0 if vector[axis] > 0 else 1]


def upright_pass(
    first: NetworkPass,
    grid: Image,
    runner: PassRunner,
    orienting: Dict,
    progress: Optional[ProgressCallback] = None,
    first_upright: bool = True,
) -> Optional[TurnedPass]:
    """The pass on the ``first`` pass's input turned (:data:`AXIS_TURNS`) as the network is surest of
    (:attr:`NetworkPass.confidence`), where it is surer than ``first`` (no turn) by ``orienting["min_gain"]``, else
    None.

    Where the ``first`` pass's brain does not sit high in its head (``first_upright`` false, :func:`head_lies_upright`)
    and ``orienting`` gives ``upright_min_gain``, the surest of the turns whose brain does is kept where its confidence
    is at least the first pass's plus that, when no turn gains ``min_gain``: on a head with much air around it the
    network is nearly as sure of it every way up (a 256x256x160 volume face up: 0.9591 as it lies, 0.9641 upright), but
    only the upright turns hold the brain high (docs/brain-model.md, 2.9.35). Below 0 it may be that much less sure:
    nimare's 1 mm copy rolled 45 deg and shown upside down reads 0.000003 less sure upright (2.9.43).

    ``grid`` is the first pass's model grid, whole (:func:`whole_model_input`): each turn re-indexes it
    (:func:`turned_grid`).

    All 23 turns are looked at: the network reads a head turned about the vertical nearly as well as an upright one,
    so a first look at which way is up alone can pick a wrong up with the face forward over the right one with the
    face back (on nimare's 1 mm copy: 0.9262 against 0.9260). With a neck it can be surer of the head facing back
    (Colin27 at 0.9x with 80 mm of neck: 0.9061 against 0.8960), so where ``orienting`` gives ``face_rows``, the
    surest turn and its twin half a turn about the vertical (the first pass, where that is no turn) are told apart:
    by the brain's base where it tells (:func:`_faces_back`, ``base_share``), which turns with a pitch, else by the
    face: the one whose head reaches further in front of the brain (:func:`face_reach_mm`) is kept.
    """
    progress = progress or no_progress  # 0 to 1 over the turns
    spec = runner.package.spec
    rows = orienting.get("face_rows")
    # Each turn shows the network the first pass's whole grid re-indexed (turned_grid) and crops it to the head found
    # on that grid, turned with it, where resampling the turned input would interpolate and find the head afresh.
    head = grid.with_array(head_object(grid, crop_threshold(spec)).astype(np.uint8))

    def look(turn: np.ndarray) -> TurnedPass:
        model_image = cropped_input(turned_grid(grid, turn), spec, head=turned_grid(head, turn).array > 0)
        return TurnedPass(
            turn, runner.look(turned_world(first.seen, turn), turned_world(first.placed, turn), model_image)
        )

    def reach(candidate: NetworkPass) -> float:
        return face_reach_mm(candidate.model_image, candidate.probabilities, spec, first.label, rows)

    upright_gain = None if first_upright else orienting.get("upright_min_gain")
    best, best_confidence, best_upright = None, first.confidence, None
    for index, turn in enumerate(AXIS_TURNS):
        progress(
            index / len(AXIS_TURNS), f"which way is the head up? a pass on it turned ({index + 1}/{len(AXIS_TURNS)})"
        )
        turned = look(turn)
        confidence = turned.result.confidence
        if confidence > best_confidence:
            best, best_confidence = turned, confidence
        if upright_gain is not None and (best_upright is None or confidence > best_upright.result.confidence):
            if head_lies_upright(turned.result.found, turned.result.model_image, spec, orienting):
                best_upright = turned
    if best is None or best_confidence < first.confidence + float(orienting.get("min_gain", 0.01)):
        if best_upright is None or best_upright.result.confidence < first.confidence + float(upright_gain):
            return None
        best = best_upright
    if rows is None:
        return best
    twin = TURN_ABOUT_VERTICAL @ best.turn
    as_it_lay = not any(np.array_equal(turn, twin) for turn in AXIS_TURNS)  # the twin is no turn: the first pass
    faces_back, looked = _faces_back(best.result, orienting), None
    if faces_back is None:  # the brain's base does not tell: the face does
        # The twin's pass is looked at again here rather than kept from the loop: its face is measured only on this
        # path, and a pass on each of 23 turns held to the end would take some 300 MB on a 1 mm head.
        looked = None if as_it_lay else look(twin)
        faces_back = reach(first if looked is None else looked.result) > reach(best.result)
    if not faces_back:
        return best
    if as_it_lay:
        return None
    return looked if looked is not None else look(twin)


def brain_base_offset_mm(points: np.ndarray, share: float) -> float:
    """How far (mm) behind the brain's centre its lowest ``share`` lies, along its own front-back axis: the end of its
    longest principal axis that points posterior (LPS +y), its height across that axis in the vertical plane.

    Below an upright brain's centre the cerebellum and brainstem lie back, the temporal poles less far forward: the
    lowest 0.1 of the brain lies 8.6-12.3 mm back on the four reference masks (FSL's three, Colin27's) pitched -30 to
    +30 deg. The measure turns with the brain, so a pitch does not move it; the same brain facing back (half a turn
    about the vertical) reads it negated.
    """
    if len(points) < 2:
        return 0.0
    front_back = _front_back_axis(points)
    up = np.array([0.0, 0.0, 1.0]) - front_back[2] * front_back
    up /= max(1e-9, float(np.linalg.norm(up)))
    centred = points - points.mean(axis=0)
    height = centred @ up
    lowest = height <= np.quantile(height, share)
    return float((centred[lowest] @ front_back).mean())


def _faces_back(candidate: NetworkPass, orienting: Dict) -> Optional[bool]:
    """Whether the brain ``candidate`` found faces back, read off its base (:func:`brain_base_offset_mm`, over the
    lowest ``orienting["base_share"]``): True where its base lies at least ``min_base_offset_mm`` in front of its
    centre, False where as far behind, None where it lies closer to it, where ``orienting`` gives no ``base_share``
    or where the field of view cuts the brain on more than ``max_cut_base_mm2`` (a cut takes off what the base holds).

    The face (:func:`face_reach_mm`) turns with a pitch: in front of the lowest rows of a head pitched chin down by 10
    deg or more there is less head than behind them (the neck), and the check kept such heads facing back when their
    header had lost the orientation (docs/brain-model.md, "A head pitched chin down...").
    """
    share = orienting.get("base_share")
    if share is None or candidate.found.cut_mm2 > float(orienting.get("max_cut_base_mm2", 1000.0)):
        return None
    offset = brain_base_offset_mm(candidate.found.points, float(share))
    if abs(offset) < float(orienting.get("min_base_offset_mm", 4.0)):
        return None
    return offset < 0


def turned_world(image: Image, turn: np.ndarray) -> Image:
    """``image``'s voxels placed in a world turned by ``turn`` (an LPS rotation about the origin): the same array,
    so a labelmap drawn on it lies on ``image`` as it is."""
    turn = np.asarray(turn, dtype=np.float64)
    origin = tuple(turn @ np.asarray(image.origin))
    return replace(image, origin=origin, direction=turn @ image.direction, metadata=dict(image.metadata))


def turned_grid(image: Image, turn: np.ndarray) -> Image:
    """``image`` in a world turned by ``turn`` (:func:`turned_world`), re-indexed onto LPS axes as the model grid lies:
    the same voxels, none interpolated, for an LPS grid turned by quarter turns.

    Array axes are flipped and swapped in place of resampling (what SimpleITK's ``DICOMOrient`` does, at a quarter of
    its time: the orientation check turns the whole grid and its head 23 times each).

    Raises:
        ValueError: the turned image does not lie along LPS axes (``image`` is not an LPS grid, or ``turn`` is not a
            rotation by quarter turns).
    """
    turned = turned_world(image, turn)
    axes = np.rint(turned.direction)
    lies_on_axes = all(np.array_equal(np.abs(axes).sum(axis=side), [1, 1, 1]) for side in (0, 1))
    if not lies_on_axes or not np.allclose(turned.direction, axes, atol=1e-9):
        raise ValueError("turned_grid turns an LPS grid by quarter turns only")
    source = [int(np.flatnonzero(row)[0]) for row in axes]  # the index axis (i, j, k) that runs along L, P, S
    reversed_axes = [column for column in range(3) if axes[:, column].sum() < 0]
    origin = np.asarray(turned.origin, dtype=np.float64)
    for column in reversed_axes:  # voxel 0 of a reversed axis is its last
        origin = origin + turned.direction[:, column] * (turned.size[column] - 1) * turned.spacing[column]
    array = np.flip(turned.array, tuple(2 - column for column in reversed_axes))  # arrays run (k, j, i)
    return Image(
        np.ascontiguousarray(np.transpose(array, [2 - source[axis] for axis in (2, 1, 0)])),
        tuple(turned.spacing[column] for column in source),
        tuple(origin),
        np.eye(3),
        dict(image.metadata),
    )


def _calibrated(settings: Optional[Dict], reference_key: str) -> Optional[Dict]:
    """``settings`` when its reference has been measured (the recipe calibrates it after training), else None."""
    return settings if settings and settings.get(reference_key) is not None else None


class FoundObject(NamedTuple):
    """The largest object of a label that a pass found, and where the edge of what was imaged cuts it."""

    points: np.ndarray  # LPS positions (mm), one row per voxel of the object
    cut_points: np.ndarray  # the rows of those voxels that touch the edge of what was imaged
    voxel_face_mm2: float  # the area of the cut each of them stands for (the model grid is isotropic)
    crop_cut_voxels: int = 0  # those of them on a side of the crop box that the scan goes on beyond

    @property
    def cut_mm2(self) -> float:
        """Where the edge of what was imaged cuts the object, anywhere (mm²)."""
        return len(self.cut_points) * self.voxel_face_mm2

    @property
    def crop_cut_mm2(self) -> float:
        """Where the crop box, not the scan's field of view, cuts the object (mm²)."""
        return self.crop_cut_voxels * self.voxel_face_mm2

    def cut_except_top_mm2(self) -> float:
        """The cut (mm²) but for a cut top: the part on or beyond the edges of the band the widths are measured over
        (:func:`object_widths`), where a field of view too short front to back, or too narrow, cuts the object, and
        the part below its centre of mass. A field of view that stops under the vertex cuts inside that band, away
        from the brain's widest level, and leaves the widths as they were."""
        if len(self.points) < 2 or not len(self.cut_points):
            return 0.0
        low, high = _width_band(self.points)
        beyond_band = ((self.cut_points[:, :2] <= low) | (self.cut_points[:, :2] >= high)).any(axis=1)
        below_centre = self.cut_points[:, 2] < self.points[:, 2].mean()
        return float(np.count_nonzero(beyond_band | below_centre)) * self.voxel_face_mm2


def object_points_and_cut(probabilities: np.ndarray, model_image: Image, image: Image, label: int) -> FoundObject:
    """The largest connected object of ``label`` (LPS positions of its voxels) and those of its voxels that meet the
    edge of what was imaged: the input's field of view or the crop box around the head.

    A whole brain meets the edge nowhere, or with the brainstem's cross-section at most; a brain that the field of
    view cuts, with tens of cm².
    """
    from scipy import ndimage

    face_mm2 = float(model_image.spacing[0] * model_image.spacing[1])
    mask = largest_object(probabilities, label)
    if mask is None:
        return FoundObject(np.zeros((0, 3)), np.zeros((0, 3)), face_mm2)
    # On the model grid grown by a voxel on each side, so that the scan's edge shows where it meets the crop's.
    grown = replace(
        model_image,
        array=np.zeros(tuple(n + 2 for n in model_image.array.shape), dtype=np.uint8),
        origin=tuple(np.asarray(model_image.origin) - model_image.direction @ np.asarray(model_image.spacing)),
    )
    imaged = resample_to_grid(_field_of_view_box(image), grown, "nearest", 0).array.astype(bool)
    scan_edge = ndimage.binary_dilation(~imaged)[1:-1, 1:-1, 1:-1]
    crop_edge = ~scan_edge
    crop_edge[1:-1, 1:-1, 1:-1] = False  # the crop box's faces, where the scan does not stop

    # Cut faces are counted in voxels touching the edge, each worth one voxel face.
    cut = mask & (scan_edge | crop_edge)
    return FoundObject(
        _lps_points(model_image, mask), _lps_points(model_image, cut), face_mm2, int(np.count_nonzero(mask & crop_edge))
    )


def _voxel_offsets(image: Image, centre: Sequence[float]) -> Iterator[np.ndarray]:
    """Each voxel's offset (mm, float32) from ``centre`` along L, then P, then S: one full-size array at a time, each
    a sum of 1D terms along the voxel axes, broadcast."""
    index = [axis.astype(np.float32) for axis in np.ogrid[tuple(slice(0, n) for n in image.array.shape)]]  # k, j, i
    axes = (np.asarray(image.direction) * np.asarray(image.spacing)).astype(np.float32)  # LPS mm per i, j, k step
    for row, origin, middle in zip(axes, image.origin, centre):
        yield row[0] * index[2] + row[1] * index[1] + (row[2] * index[0] + np.float32(origin - middle))


def _lps_points(image: Image, voxels: np.ndarray) -> np.ndarray:
    """LPS positions (mm), one row each, of the true voxels of boolean ``voxels`` on ``image``'s grid."""
    kji = np.argwhere(voxels).astype(np.float64)
    return (kji[:, ::-1] * np.asarray(image.spacing)) @ image.direction.T + np.asarray(image.origin)


def _width_band(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 2nd and 98th percentiles of ``points`` along LPS left-right and anterior-posterior."""
    low, high = np.percentile(points[:, :2], [2, 98], axis=0)
    return low, high


def object_widths(points: np.ndarray) -> Tuple[float, float]:
    """Widths (mm) of an object along LPS left-right and anterior-posterior: 2nd to 98th percentile of its points.

    The widths of a brain hardly change with its pose (±25° moves: within 4 %), with a neck below it (which the
    network may take for brain) or with a field of view that cuts its top or bottom.
    """
    low, high = _width_band(points)
    return float(high[0] - low[0]), float(high[1] - low[1])


def _front_back_axis(points: np.ndarray) -> np.ndarray:
    """The unit vector along the longest principal axis of ``points``, its end pointing posterior (LPS +y)."""
    vectors = _principal_axes(points)
    return vectors[:, 2] if vectors[1, 2] >= 0 else -vectors[:, 2]


def _principal_axes(points: np.ndarray) -> np.ndarray:
    """The unit vectors along the principal axes of ``points`` (rows), as columns, from least spread to most."""
    centred = points - points.mean(axis=0)
    return np.linalg.eigh(centred.T @ centred)[1]


def _pitch_rotation(points: np.ndarray, angle: float) -> np.ndarray:
    """The LPS rotation that raises the posterior end of ``points``' front-back axis by ``angle`` (radians):
    about the horizontal axis across that axis, so a head turned about the vertical is pitched, not rolled."""
    front_back = _front_back_axis(points)
    horizontal = np.array([front_back[0], front_back[1], 0.0])
    horizontal /= max(1e-9, float(np.linalg.norm(horizontal)))
    across = np.cross(horizontal, [0.0, 0.0, 1.0])  # turning about it takes `horizontal` towards superior
    cross = np.array([[0.0, -across[2], across[1]], [across[2], 0.0, -across[0]], [-across[1], across[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * cross @ cross


def _rotation_angle_deg(rotation: Optional[np.ndarray]) -> float:
    """The angle (degrees) of a rotation matrix; 0 for None."""
    if rotation is None:
        return 0.0
    return math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def _field_of_view_box(image: Image) -> Image:
    """A 2×2×2 image of ones whose voxels span exactly ``image``'s box (voxel edges included): resampled with
    nearest neighbours it marks what was imaged as a full-size image of ones would, without allocating one."""
    spacing = np.asarray(image.spacing) * np.asarray(image.size) / 2.0
    origin = np.asarray(image.origin) + image.direction @ ((spacing - np.asarray(image.spacing)) / 2.0)
    return Image(np.ones((2, 2, 2), dtype=np.uint8), tuple(spacing), tuple(origin), image.direction)


def segment_file(
    model: Union[PathLike, ModelPackage],
    input_path: PathLike,
    output_path: PathLike,
    device: Optional[str] = None,
    tta: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    force_modality: bool = False,
) -> Dict:
    """Read, segment and write one volume; returns a JSON-able summary with a timing split.

    The output is written to a temporary name and renamed, so a failure or cancellation leaves no
    partial file. ``timings_s`` splits the time into load_model, read, preprocess, forward, postprocess
    and write (seconds).
    """
    progress = progress or no_progress
    started = time.perf_counter()
    package = model if isinstance(model, ModelPackage) else load_model(model)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    progress(0.0, f"reading {Path(input_path).name}")
    image = read_image(input_path)
    if force_modality:
        image.metadata["force"] = True
    read_seconds = time.perf_counter() - started

    device = select_device(device)
    result = segment_image(image, package, device, tta, scaled(progress, 0.05, 0.95), cancel)
    del image  # the labelmap keeps the geometry; the input's voxels are not needed for writing
    if cancel:
        cancel.check()
    started = time.perf_counter()
    progress(0.96, "writing the labelmap")
    written = write_image(result.labelmap, output_path)
    timings = {
        "load_model": load_seconds,
        "read": read_seconds,
        **result.timings,
        "write": time.perf_counter() - started,
    }
    progress(1.0, f"wrote {Path(written).name}")
    # What the engine did beyond one plain pass, so that a slower or surprising result explains itself.
    notes = ["the air was noise: blanked outside the head"] if result.air_quieted else []
    if result.orientation_turn != "none":
        notes.append(f"the header had the head {result.orientation_turn}: the passes saw it turned upright")
    if result.coil_gain != 1.0:
        notes.append(f"another pass without a coil profile {result.coil_gain:.2f}x as bright at the surface")
    gradient = float(np.linalg.norm(result.gradient_removed))
    if gradient:
        notes.append(f"another pass without an intensity gradient of {gradient:.2f} (log) per 100 mm across the brain")
    if result.size_scale != 1.0:
        notes.append(f"another pass for a head {result.size_scale:.2f}x the size the model learnt")
    if result.tilt_correction_deg:
        notes.append(f"another pass turned {result.tilt_correction_deg:.0f} deg to the pose the model learnt")
    if result.neck_trimmed_mm:
        notes.append(f"another pass without {result.neck_trimmed_mm:.0f} mm of neck below the brain")
    if result.air_above_cut_mm:
        notes.append(f"the field of view cuts the top of the head: {result.air_above_cut_mm:.0f} mm of air above it")
    if result.unlike_anatomy:
        notes.append(f"run anyway: {result.unlike_anatomy}")
    if result.air_beside_cut_mm:
        notes.append(f"the field of view cuts a side of the head: {result.air_beside_cut_mm:.0f} mm of air beyond it")
    if result.air_below_cut_mm:
        notes.append(f"the field of view cuts the base of the head: {result.air_below_cut_mm:.0f} mm of air below it")
    if result.tissue_trimmed:
        notes.append(f"{result.tissue_trimmed:.1%} of what the model drew lay outside the brain's tissue: trimmed off")
    if result.rim_peeled_mm:
        notes.append(
            f"the brain drawn had a rim brighter than the tissue under it (contrast agent?): {result.rim_peeled_mm:g} "
            "mm peeled off"
        )
    if result.pocket_filled_ml:
        notes.append(
            f"{result.pocket_filled_ml:.0f} ml inside the brain's hull lay deeper under the scalp than its surface (a "
            "lesion at the cortex?): drawn as brain"
        )
    xforms = result.labelmap.metadata.get("nifti_xforms")
    if xforms and str(written).lower().endswith((".nii", ".nii.gz")):
        notes.append(
            f"the input's qform and sform place it up to {xforms['apart_mm']:.1f} mm apart: the labelmap carries both"
        )
    return {
        "input": str(input_path),
        "output": str(written),
        "model": package.spec.name,
        "model_version": package.spec.version,
        "device": device,
        "windows": result.windows,
        "size_scale": round(result.size_scale, 4),
        "tilt_correction_deg": round(result.tilt_correction_deg, 1),
        "orientation_turn": result.orientation_turn,
        "air_quieted": result.air_quieted,
        "coil_gain": round(result.coil_gain, 3),
        "gradient_removed_per_100mm": list(result.gradient_removed),
        "edge_contrast": None if result.edge_contrast is None else round(result.edge_contrast, 3),
        "intensity_spread": None if result.intensity_spread is None else round(result.intensity_spread, 3),
        "cut_axes": result.cut_axes,
        "seen_edge_contrast": None if result.seen_edge_contrast is None else round(result.seen_edge_contrast, 3),
        "tissue_trimmed": round(result.tissue_trimmed, 4),
        "rim_peeled_mm": round(result.rim_peeled_mm, 2),
        "pocket_filled_ml": round(result.pocket_filled_ml, 1),
        "notes": notes,
        "geometry": result.labelmap.geometry(),
        "label_volumes_ml": result.label_volumes_ml,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
