"""Geometry and intensity steps shared by training and inference, so both see inputs the same way.

The model grid is axis-aligned in LPS (identity direction) at the package's target spacing and covers
the input's whole physical extent, whatever the input's orientation (axial, coronal, sagittal, oblique).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from meddl.errors import InputError
from meddl.io import Image, image_from_sitk, image_to_sitk

__all__ = [
    "keep_largest_component",
    "fill_holes",
    "volume_faces",
    "model_grid",
    "reference_grid",
    "resample_to_grid",
    "to_model_grid",
    "normalize_intensity",
    "bounding_box",
    "crop_box",
    "crop_to_foreground",
    "cut_face_reader",
    "foreground_object",
    "head_object",
    "outer_face",
    "frame_cut_base",
    "frame_cut_sides",
    "frame_cut_top",
    "scanned_air_level",
]

# The most voxels a model grid may have (512³: 0.5 GiB a float32 copy, and inference holds several such arrays).
MAX_GRID_VOXELS = 512**3


def model_grid(image: Image, spacing: Optional[Sequence[float]], direction: Optional[np.ndarray] = None) -> Image:
    """An empty grid at ``spacing`` covering ``image``'s physical extent (voxel edges included).

    Its axes are LPS (identity direction) unless ``direction`` (a rotation; columns = the grid's i, j, k axes in
    LPS) turns them: a second pass looks at a tilted head along the axes of the pose the model learnt.

    Raises:
        InputError: the grid would hold more than ``MAX_GRID_VOXELS`` (the input named by its ``source``).
    """
    spacing = np.asarray(spacing if spacing is not None else image.spacing, dtype=np.float64)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    size_ijk = np.asarray(image.size, dtype=np.float64)
    corners_index = np.array(
        [
            [x, y, z]
            for x in (-0.5, size_ijk[0] - 0.5)
            for y in (-0.5, size_ijk[1] - 0.5)
            for z in (-0.5, size_ijk[2] - 0.5)
        ]
    )
    corners = (image.direction @ (corners_index * np.asarray(image.spacing)).T).T + np.asarray(image.origin)
    corners = corners @ direction  # coordinates along the grid's axes
    low, high = corners.min(axis=0), corners.max(axis=0)
    # Extents come from float32 headers (NIfTI): 160 x 1.2 mm reads as 192.0000076 mm. Without a tolerance
    # that is 97 voxels at 2 mm instead of 96, and one voxel past the patch size doubles the sliding windows.
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-3)).astype(int)
    # Checked before anything is allocated: a model's spacing of 0.01 mm asked for 6.47 TiB here on a 1 mm head.
    if float(np.prod(size, dtype=np.float64)) > MAX_GRID_VOXELS:
        raise InputError(
            f"at {'x'.join(f'{s:g}' for s in spacing)} mm the model grid would be {'x'.join(map(str, size))} voxels, "
            f"more than the {MAX_GRID_VOXELS} this engine takes: the volume's extent or the model's spacing is "
            "implausible",
            image.metadata.get("source"),
        )
    origin = direction @ (low + spacing / 2.0)
    return Image(np.zeros(size[::-1], dtype=np.uint8), tuple(spacing), tuple(origin), direction)


def reference_grid(grid: Image) -> sitk.Image:
    """A SimpleITK image with ``grid``'s geometry, for use as a resampling reference.

    ITK only reads the geometry of a reference image, so a one-voxel pixel buffer would do; SimpleITK
    wants the size, though, and a uint8 buffer is the cheapest way to carry it.
    """
    reference = sitk.Image([int(n) for n in grid.size], sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction.flatten().tolist())
    return reference


def resample_to_grid(image: Image, grid: Image, interpolation: str = "linear", default: float = 0.0) -> Image:
    """Resample ``image`` onto ``grid``'s voxels in physical space ("linear" or "nearest").

    Linear interpolation returns float32 and nearest keeps the input's dtype. The input is handed to ITK
    as it is (no float copy of a large int16 CT first): ITK interpolates in double and writes float32.
    """
    linear = interpolation != "nearest"
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    source = image_to_sitk(image)
    output_type = sitk.sitkFloat32 if linear else source.GetPixelID()
    result = sitk.Resample(source, reference_grid(grid), sitk.Transform(), interpolator, float(default), output_type)
    del source
    resampled = image_from_sitk(result)
    resampled.metadata = dict(image.metadata)
    return resampled


def to_model_grid(
    image: Image,
    spacing: Optional[Sequence[float]],
    interpolation: str = "linear",
    direction: Optional[np.ndarray] = None,
) -> Image:
    """Resample ``image`` to the canonical model grid (see :func:`model_grid`); voxels outside the input get
    its minimum."""
    grid = model_grid(image, spacing, direction)
    default = float(np.min(image.array)) if interpolation == "linear" else 0.0
    return resample_to_grid(image, grid, interpolation, default)


def normalize_intensity(array: np.ndarray, normalization: Dict) -> np.ndarray:
    """Map raw intensities to roughly [0, 1] (float32) as the package says; independent of the raw range
    for ``percentile`` and ``zscore``."""
    kind = normalization.get("kind", "percentile")
    data = array.astype(np.float32, copy=False)
    if kind == "none":
        return data.astype(np.float32, copy=True)
    if kind == "ct_window":
        low, high = float(normalization.get("low", -1000)), float(normalization.get("high", 1000))
        return ((np.clip(data, low, high) - low) / (high - low)).astype(np.float32)
    if kind == "zscore":
        std = float(data.std())
        return ((data - float(data.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    # percentile: robust to scanner scaling, e.g. 0..1, 0..255 or 0..10000 for the same T1
    sample = data[:: max(1, data.shape[0] // 64)]  # a strided subsample keeps big volumes cheap
    low, high = np.percentile(sample, [float(normalization.get("lower", 0.5)), float(normalization.get("upper", 99.5))])
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        high = low + 1.0
    return np.clip((data - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def bounding_box(mask: np.ndarray, grow: Sequence[int] = (1, 1, 1)) -> Optional[Tuple[slice, ...]]:
    """The index box of ``mask``'s non-zero voxels grown by ``grow`` voxels per axis (clipped), or None."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        if present.size == 0:
            return None
        box.append(
            slice(max(0, int(present[0]) - grow[axis]), min(mask.shape[axis], int(present[-1]) + 1 + grow[axis]))
        )
    return tuple(box)


def crop_box(image: Image, box: Tuple[slice, ...]) -> Image:
    """``image`` cut to ``box`` (array order k, j, i; plain slices within the array), every kept voxel where it was."""
    start_ijk = np.array([box[2].start or 0, box[1].start or 0, box[0].start or 0], dtype=np.float64)
    origin = np.asarray(image.origin) + image.direction @ (start_ijk * np.asarray(image.spacing))
    return Image(
        np.ascontiguousarray(image.array[box]), image.spacing, tuple(origin), image.direction, dict(image.metadata)
    )


# Air full of noise (low field, heavy acceleration, an image scaled up by bias correction) smooths to its own mean,
# and where that lies near the crop's threshold, its speckle joins the head into one object across the field of
# view. The threshold then rises to this many times the air's level (the median of the smoothed volume's faces),
# up to a cap that keeps a head's outline (scalp fat) above it; clean air leaves it where it was.
NOISY_AIR_MARGIN = 1.5
NOISY_AIR_MAX_THRESHOLD = 0.6
# ... unless what stays above that level is less than this share of the volume: then the volume is noise through and
# through (no head in it), and it is cropped as before, for the edge check to refuse.
NOISY_AIR_MIN_SHARE = 0.01
# How deep inside the scan its faces are measured on a grid that runs beyond it: past the smoothing's reach (sigma 1).
SCANNED_FACE_DEPTH = 3


def keep_largest_component(mask: np.ndarray) -> bool:
    """Reduce boolean ``mask`` in place to its largest connected component; True when anything was dropped."""
    components, count = _components(mask)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        np.equal(components, int(np.argmax(sizes)), out=mask)
    return count > 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the grid's faces filled (6-connectivity).

    The same result as scipy's ``binary_fill_holes``, which floods the background from the faces one dilation at a
    time; labelling the background once is a quarter of its time on a head's bounding box.
    """
    background, count = _components(~mask)
    if count == 0:
        return mask.copy()
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.unique(volume_faces(background))] = True
    outside[0] = False
    return ~outside[background]


def _components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Connected components of ``mask`` (6-connectivity), numbered in uint16 when they fit, else int32."""
    from scipy import ndimage

    output = np.empty(mask.shape, dtype=np.uint16)
    try:
        count = ndimage.label(mask, output=output)
        return output, int(count)
    except RuntimeError:  # more than 65535 components: scipy refuses the narrow type
        pass
    del output  # before the int32 copy exists, not after
    components, count = ndimage.label(mask)
    return components, int(count)


def volume_faces(volume: np.ndarray) -> np.ndarray:
    """The voxels of ``volume``'s six faces, one flat array (a voxel on an edge counts once per face)."""
    return np.concatenate([np.moveaxis(volume, axis, 0)[end].ravel() for axis in range(3) for end in (0, -1)])


def foreground_object(array: np.ndarray, threshold: float, air_level: Optional[float] = None) -> np.ndarray:
    """The largest bright object (the head, the body) of a normalised ``array``, as a boolean mask.

    Smoothing first keeps noise speckles in the air out of it, and where the air is bright with noise the
    threshold rises above it (``NOISY_AIR_MARGIN``). The air's level is ``air_level`` where the caller measured it
    (:func:`scanned_air_level`, on a grid that runs beyond the scan), else the median of the smoothed volume's faces.
    """
    from scipy import ndimage

    smoothed = ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma=1.0)
    if air_level is None:
        air_level = float(np.median(volume_faces(smoothed)))
    above_air = min(NOISY_AIR_MARGIN * air_level, NOISY_AIR_MAX_THRESHOLD)
    if above_air > threshold:
        mask = smoothed > above_air
        keep_largest_component(mask)
        if mask.sum() >= NOISY_AIR_MIN_SHARE * mask.size:  # else the whole volume is noise: no air around a head
            return mask
    mask = smoothed > threshold
    keep_largest_component(mask)
    return mask


def scanned_air_level(array: np.ndarray, scanned: np.ndarray) -> Optional[float]:
    """The air's level for :func:`foreground_object` on a grid that runs beyond the scan: the median of the smoothed
    volume over the scan's own faces as the grid holds them, ``scanned`` a boolean mask of the voxels the scan
    covers; None where it covers too little to say.

    A grid turned to a head's pose, or laid square over an oblique acquisition, holds corners beyond the scan, filled
    with its minimum; its faces then cross little of the scan, and counted as air the fill pulls their median down to
    nothing. Noisy air (Rician noise at a tenth of the 99th percentile) then passes the crop's threshold and joins the
    head: the crop takes in the whole field of view, and the network draws brain in the noise (docs/brain-model.md,
    "Noisy air on a turned grid"). The faces measured lie ``SCANNED_FACE_DEPTH`` voxels inside the scan, where the
    smoothing takes in next to none of the fill.
    """
    from scipy import ndimage

    core = ndimage.binary_erosion(scanned, iterations=SCANNED_FACE_DEPTH, border_value=1)
    faces = core & ~ndimage.binary_erosion(core, border_value=0)
    if not faces.any():
        return None
    smoothed = ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma=1.0)
    return float(np.median(smoothed[faces]))


def crop_to_foreground(
    image: Image,
    threshold: float = 0.1,
    margin_mm: float = 10.0,
    max_height_mm: Optional[float] = None,
    head: Optional[np.ndarray] = None,
) -> Image:
    """Crop a normalised image to its largest bright object (:func:`foreground_object`) plus ``margin_mm``.

    A model trained on tightly framed volumes sees the same framing whatever air the scanner's field of view
    adds around the object.

    ``max_height_mm`` keeps at most that much of the box below its superior end (grid axis k, which the LPS
    model grid points superior): a head model then frames the head the same way whether the scan stops under
    the cerebellum or runs down the neck to the shoulders, which are tissue and survive the threshold.

    The air's level is ``image.metadata["air_level"]`` where the grid runs beyond the scan (:func:`scanned_air_level`).
    ``head`` is the object where the caller has it (on a turned grid, the first grid's head turned with it).
    """
    mask = head_object(image, threshold) if head is None else head
    if not mask.any():
        return image
    margin = [int(math.ceil(margin_mm / s)) for s in image.spacing[::-1]]  # array order (k, j, i)
    box = bounding_box(mask, margin)
    if max_height_mm is not None:
        keep = int(math.ceil(max_height_mm / image.spacing[2]))
        rows = box[0]
        if rows.stop - rows.start > keep:
            superior_at_stop = image.direction[2, 2] > 0
            rows = slice(rows.stop - keep, rows.stop) if superior_at_stop else slice(rows.start, rows.start + keep)
            box = (rows, *box[1:])
    return crop_box(image, box)


def head_object(image: Image, threshold: float) -> np.ndarray:
    """The head's bright object on a normalised model-grid ``image``: :func:`foreground_object` with the air's level
    the metadata carries where the grid runs beyond the scan (:func:`scanned_air_level`).

    Found once per image, array, threshold and air level, and read-only: the crop, the framing of a cut and the
    orientation check's measures of a pass each ask for it on the same image (on a head whose header lost its
    orientation, up to four times on each of 23 turns).
    """
    level = image.metadata.get("air_level")
    found = image.__dict__.setdefault("_head_objects", [])  # not a field: a copied or cropped image starts afresh
    for array, key, mask in found:
        if array is image.array and key == (threshold, level):
            return mask
    mask = foreground_object(image.array, threshold, level)
    mask.flags.writeable = False
    found.append((image.array, (threshold, level), mask))
    return mask


def outer_face(occupied: np.ndarray, spacing: Sequence[float], axis: int, high: bool) -> Tuple[float, float]:
    """The area (mm²) of ``occupied`` (a boolean mask on a grid of ``spacing``, in (i, j, k) order) in the two outermost
    slices across array ``axis`` (at its high or low end) that hold any of it (the larger of them), and the share of
    its slice that area fills.

    On a head cropped by :func:`crop_to_foreground` that is where the head meets the crop's box: a few cm² where the box
    touches a whole head (the crown: 30 cm² at most over the brain model's stress set and probes; a side 72 under the
    stress set's noise) and a cut face where the field of view cuts it (the top: 123 cm² and more, 37-59 % of the
    slice; the front, back or side: 172-286 cm², 50-71 %), an oval inside the crop's box (π/4 of it at most). Air
    full of noise as bright as tissue (MP2RAGE) passes the threshold too and fills 98-100 % of the slice.
    """
    others = tuple(a for a in range(3) if a != axis)
    slices_held = np.flatnonzero(occupied.any(axis=others))
    ends = slices_held[-2:] if high else slices_held[:2]
    voxels = max((np.count_nonzero(np.take(occupied, index, axis=axis)) for index in ends), default=0)
    slice_voxels = int(np.prod([occupied.shape[a] for a in others]))
    voxel_mm2 = float(np.prod([spacing[2 - a] for a in others]))  # spacing runs (i, j, k), arrays (k, j, i)
    return float(voxels) * voxel_mm2, voxels / slice_voxels if slice_voxels else 0.0


def cut_face_reader(
    image: Image, threshold: float, min_area_mm2: float, max_share: float
) -> Callable[[int, bool], bool]:
    """A function of (array axis, high end) telling whether the field of view cuts ``image``'s head there.

    A face is cut where the voxels over ``threshold`` fill more than ``min_area_mm2`` of it (:func:`outer_face`) and no
    more than ``max_share`` of its slice (more is air full of noise, not a head's cross-section), and the head's own
    object (:func:`head_object`) meets it in more than ``min_area_mm2`` too. Rician air passes the threshold in about
    half its voxels, so over a whole head's crown the voxels alone read 7,616-16,288 mm² where the object, whose
    threshold rises over noisy air, meets that row in 315-681 (docs/brain-model.md, "A crown read as cut under noisy
    air"). The voxels answer first, so the object is found only where they call a face cut.
    """
    above = image.array > threshold
    head = functools.cache(lambda: head_object(image, threshold))  # found at the first face the voxels call cut

    def is_cut(axis: int, high: bool) -> bool:
        area_mm2, share = outer_face(above, image.spacing, axis, high)
        if area_mm2 <= min_area_mm2 or share > max_share:
            return False
        return outer_face(head(), image.spacing, axis, high)[0] > min_area_mm2

    return is_cut


def _with_air(image: Image, axis: int, count: int, before: bool, **metadata: float) -> Image:
    """``image`` with ``count`` slices of air (0) added before or after its end along array ``axis``, every voxel
    where it was (the origin moves when they go before), and ``metadata`` set."""
    widths = [(0, 0)] * 3
    widths[axis] = (count, 0) if before else (0, count)
    origin = np.asarray(image.origin, dtype=np.float64)
    if before:
        origin = origin - image.direction[:, 2 - axis] * count * image.spacing[2 - axis]
    return Image(
        np.pad(image.array, widths), image.spacing, tuple(origin), image.direction, {**image.metadata, **metadata}
    )


def frame_cut_top(
    image: Image,
    threshold: float,
    min_area_mm2: float,
    height_mm: float,
    max_height_mm: Optional[float] = None,
    max_share: float = 0.8,
) -> Image:
    """``image`` with air (0) added above it up to ``height_mm`` when the field of view cuts the top of the head
    and, with ``max_height_mm``, without its rows beyond that height below the cut; otherwise, or when it is that tall
    already, ``image``. The top is cut as :func:`cut_face_reader` tells it, with ``min_area_mm2`` and ``max_share``.

    Training cuts blank what the field of view did not see and keep the template's window, so a head model learns
    cut heads with air above the cut and the base of the brain where the template had it; cropped to the cut, the
    head would sit higher in the window than it ever did, and a crop as tall as a whole head's (which a scan down
    the neck fills) would show the network more neck below the cut than it ever saw. Needs grid axis k pointing
    superior (the LPS model grid); a grid turned upside down is returned as it is. The metadata's
    ``air_above_cut_mm`` counts the air added.
    """
    rows = int(math.ceil(height_mm / image.spacing[2] - 1e-6))
    kept = int(math.ceil(max_height_mm / image.spacing[2] - 1e-6)) if max_height_mm is not None else None
    height = image.array.shape[0]
    if image.direction[2, 2] <= 0 or rows <= height <= (kept if kept is not None else height):
        return image
    if not cut_face_reader(image, threshold, min_area_mm2, max_share)(0, True):
        return image
    if kept is not None and height > kept:  # k's far end is the top: the rows dropped lie furthest below the cut
        image, height = crop_box(image, (slice(height - kept, None), slice(None), slice(None))), kept
    if height >= rows:
        return image
    missing = rows - height
    air_mm = float(image.metadata.get("air_above_cut_mm", 0.0)) + missing * image.spacing[2]
    return _with_air(image, 0, missing, before=False, air_above_cut_mm=air_mm)


def frame_cut_base(
    image: Image, threshold: float, min_area_mm2: float, height_mm: float, max_share: float = 0.8
) -> Image:
    """``image`` with air (0) added below it up to ``height_mm`` when the field of view cuts the base of the head (the
    cerebellum or the skull base), told as :func:`frame_cut_top` tells a cut top; otherwise, or when it is that tall
    already, ``image``.

    Training cuts blank the base inside the template's window, so the network learnt the top of a head whose base is
    cut where the whole head's top lay; cropped to the cut, a shorter head sat lower in the window (the sliding window
    pads a short crop on both ends) and the network drew the brain on up into the CSF over the vertex. Needs grid axis
    k pointing superior (the LPS model grid); a grid turned upside down is returned as it is. The metadata's
    ``air_below_cut_mm`` counts the air added.
    """
    missing = int(math.ceil(height_mm / image.spacing[2] - 1e-6)) - image.array.shape[0]
    if image.direction[2, 2] <= 0 or missing <= 0:
        return image
    if not cut_face_reader(image, threshold, min_area_mm2, max_share)(0, False):
        return image
    air_mm = float(image.metadata.get("air_below_cut_mm", 0.0)) + missing * image.spacing[2]
    return _with_air(image, 0, missing, before=True, air_below_cut_mm=air_mm)


def frame_cut_sides(
    image: Image, threshold: float, min_area_mm2: float, extents_mm: Sequence[float], max_share: float = 0.8
) -> Image:
    """``image`` with air (0) added beyond a side of the head the field of view cuts, up to ``extents_mm`` along grid
    axes i and j (left-right and front-back on the LPS model grid); ``image`` itself when nothing is cut, when the
    field of view cuts both sides of an axis (nothing then says where the head's middle is) or when the grid spans that
    much already. A side is cut as :func:`frame_cut_top` tells a cut top.

    Training cuts blank what the field of view did not see inside the template's window, so the network learnt a head
    cut at the back or side where the whole head would lie; cropped to the cut, the rest of the head sat in the middle
    of the window instead. The metadata's ``air_beside_cut_mm`` counts the air added.
    """
    for axis, extent_mm in zip((2, 1), extents_mm):  # array axes of grid axes i and j
        spacing = image.spacing[2 - axis]
        missing = int(math.ceil(extent_mm / spacing - 1e-6)) - image.array.shape[axis]
        if missing <= 0:
            continue
        is_cut = cut_face_reader(image, threshold, min_area_mm2, max_share)
        low, high = is_cut(axis, False), is_cut(axis, True)
        if low != high:
            air_mm = float(image.metadata.get("air_beside_cut_mm", 0.0)) + missing * spacing
            image = _with_air(image, axis, missing, before=low, air_beside_cut_mm=air_mm)
    return image
