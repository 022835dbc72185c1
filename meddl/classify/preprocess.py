"""Reading, checking and resampling classifier inputs, shared by training, inference and evaluation.

Two kinds of input, two kinds of model:

* a **volume** (more than one voxel along every axis) for a 3D model. The network's grid is LPS-aligned
  (like :func:`meddl.transforms.to_model_grid`), at the package's spacing, ``patch_size`` voxels, centred
  on the volume's physical centre: the same as resampling to the model grid and then centre-cropping or
  padding to the patch.
* a **2D image** (a single slice: a PNG/JPEG/2D file, a single-frame DICOM such as ``CT_small.dcm``, or a
  volume with one voxel along some axis) for a 2D model. The network sees the slice in its own pixel
  orientation (rows, columns), at the package's in-plane spacing, centred on the slice.

A 2D model given a volume classifies the volume's middle slice along its stored slice axis ``k`` only when
asked to (``slice_policy="middle"``, or ``input.volume_slice: "middle"`` in model.json); otherwise a volume
given to a 2D model, and a 2D image given to a 3D model, are refused with one line.

With ``input.spacing`` null the grid's spacing is chosen so the whole image fits the patch (isotropic,
aspect ratio kept, the rest padded): useful when inputs have very different fields of view.

Conventions follow the segmentation packages: ``input.spacing`` is in ``(i, j[, k])`` order, ``input.patch_size``
in array order ``([k,] j, i)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from meddl.errors import InputError, ModelError
from meddl.io import Image, read_image
from meddl.models import ModelSpec
from meddl.transforms import normalize_intensity, resample_to_grid

__all__ = [
    "PreparedInput",
    "read_classification_input",
    "check_classifier_spec",
    "check_classification_input",
    "prepare_input",
    "channel_count",
    "single_slice_axis",
    "network_grid",
    "map_to_input",
    "class_value",
]

PathLike = Union[str, os.PathLike]
VOLUME_SLICE_POLICIES = ("refuse", "middle")


@dataclass
class PreparedInput:
    """What the network sees, and how to map its maps back.

    Attributes:
        array: float32 ``[C, *patch_size]``, normalised.
        grid: the network grid as an :class:`Image` (single-slice for 2D models); its array is unused.
        source: the image the grid was resampled from (the input, or its middle slice).
        slice_index: index along the input's ``k`` axis when ``source`` is a slice of a volume, else None.
    """

    array: np.ndarray
    grid: Image
    source: Image
    slice_index: Optional[int] = None


def read_classification_input(path: PathLike) -> Image:
    """Read a volume, a DICOM folder, or a 2D image (PNG/JPEG/BMP/TIFF, a single-frame DICOM, a 2D NRRD/MHA).

    Volumes go through :func:`meddl.io.read_image` (with its header checks). What it refuses as 2D or as
    multi-component is read here as a single-slice image (SimpleITK's ``JoinSeries`` geometry: the slice's
    own origin and direction, 1 mm across), with colour components kept as a trailing channel axis so the
    channel check can name them.
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(PLAIN_2D_SUFFIXES):
        return _read_single_slice(path)
    try:
        return read_image(path)
    except InputError:
        if not path.is_file() or not _looks_2d(path):
            raise
    return _read_single_slice(path)


PLAIN_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"cannot read as an image ({_last_line(error)})", path) from None
    return reader


def _looks_2d(path: Path) -> bool:
    try:
        reader = _header(path)
    except InputError:
        return False
    size = reader.GetSize()
    return (
        reader.GetDimension() == 2
        or (reader.GetDimension() == 3 and size[2] == 1)
        or (reader.GetNumberOfComponents() > 1 and reader.GetDimension() <= 3)
    )


def _read_single_slice(path: Path) -> Image:
    from meddl.io.safety import check_size

    reader = _header(path)
    check_size(list(reader.GetSize()) + [reader.GetNumberOfComponents()], path)
    if reader.GetDimension() not in (2, 3):
        raise InputError(f"expected a 2D image or a 3D volume, got {reader.GetDimension()}D", path)
    try:
        itk_image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read as an image ({_last_line(error)})", path) from None
    if itk_image.GetDimension() == 2:
        itk_image = sitk.JoinSeries(itk_image)
    direction = np.array(itk_image.GetDirection()).reshape(3, 3)
    if abs(np.linalg.det(direction)) < 1e-6:
        raise InputError("the direction matrix is singular", path)
    image = Image(
        array=sitk.GetArrayFromImage(itk_image),
        spacing=itk_image.GetSpacing(),
        origin=itk_image.GetOrigin(),
        direction=direction,
    )
    modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else None
    image.metadata.update(source=str(path), format="2d", modality=modality or None, dtype=str(image.array.dtype))
    return image


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


def check_classifier_spec(spec: ModelSpec, path: Optional[PathLike] = None) -> None:
    """Refuse packages that are not usable classifiers (task, labels 0..C-1, input sizes that fit the dims)."""
    if spec.task != "classification":
        raise ModelError(f"model '{spec.name}' is a {spec.task} model, not a classifier", path)
    values = sorted(label.value for label in spec.labels)
    if values != list(range(len(values))) or len(values) < 2:
        raise ModelError("a classifier needs at least two labels with values 0..C-1", path)
    dims = spec.spatial_dims
    if dims not in (2, 3):
        raise ModelError(f"architecture.args.spatial_dims must be 2 or 3, not {dims}", path)
    if len(spec.patch_size) != dims:
        raise ModelError(f"input.patch_size {spec.patch_size} must have {dims} entries for a {dims}D model", path)
    spacing = spec.target_spacing
    if spacing is not None and len(spacing) != dims:
        raise ModelError(f"input.spacing {spacing} must have {dims} entries for a {dims}D model", path)
    policy = spec.input.get("volume_slice", "refuse")
    if policy not in VOLUME_SLICE_POLICIES:
        raise ModelError(f"input.volume_slice must be one of {', '.join(VOLUME_SLICE_POLICIES)}", path)


def class_value(spec: ModelSpec, name: str, path: Optional[PathLike] = None) -> int:
    """The label value of class ``name``; an unknown name (e.g. in a datalist or a correction) is an InputError
    naming ``path`` and the model's classes."""
    for label in spec.labels:
        if label.name == str(name):
            return label.value
    classes = ", ".join(label.name for label in sorted(spec.labels, key=lambda label: label.value))
    raise InputError(f"unknown class name '{name}' (model '{spec.name}' classes: {classes})", path)


def channel_count(image: Image) -> int:
    return int(image.array.shape[3]) if image.array.ndim == 4 else 1


def single_slice_axis(image: Image) -> Optional[int]:
    """The ``(i, j, k)`` index of the axis with one voxel for a 2D image, None for a volume."""
    size = image.array.shape[:3][::-1]
    singles = [axis for axis, n in enumerate(size) if n == 1]
    if not singles:
        return None
    return 2 if 2 in singles else singles[0]


def check_classification_input(image: Image, spec: ModelSpec, slice_policy: Optional[str] = None) -> None:
    """Refuse what the classifier cannot take, naming the file: dims, channels, empty, NaN, constant."""
    source = image.metadata.get("source")
    array = image.array
    if array.ndim not in (3, 4) or array.size == 0 or min(array.shape[:3]) < 1:
        raise InputError(f"the image is empty or has an unusable shape {array.shape}", source)
    channels = channel_count(image)
    if channels != spec.in_channels:
        kind = " (colour/RGB)" if channels in (3, 4) else ""
        raise InputError(
            f"the image has {channels} channel{'s' if channels != 1 else ''}{kind} but model '{spec.name}' takes "
            f"{spec.in_channels}",
            source,
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the image contains NaN or infinite values", source)
    if not all(np.isfinite(image.spacing)) or min(image.spacing) <= 0:
        raise InputError(f"spacing {image.spacing} must be positive and finite", source)
    sizes = array.shape[:3]
    if sum(1 for n in sizes if n == 1) >= 2:
        raise InputError(f"the image is a line or a point (shape {sizes[::-1]}), not a 2D image or a volume", source)
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputError(f"the image is constant (every voxel is {low:g}); there is nothing to classify", source)
    is_slice = single_slice_axis(image) is not None
    if spec.spatial_dims == 3 and is_slice:
        raise InputError(
            f"this is a 2D image (size {list(image.size)}) but model '{spec.name}' classifies 3D volumes", source
        )
    policy = slice_policy or spec.input.get("volume_slice", "refuse")
    if spec.spatial_dims == 2 and not is_slice and policy != "middle":
        raise InputError(
            f"this is a 3D volume (size {list(image.size)}) but model '{spec.name}' classifies 2D images "
            "(pass --slice middle to classify its middle slice)",
            source,
        )


def middle_slice(image: Image) -> Tuple[Image, int]:
    """The slice at the middle of the stored ``k`` axis, with its exact position in space."""
    index = image.array.shape[0] // 2
    origin = np.asarray(image.origin) + image.direction[:, 2] * image.spacing[2] * index
    sliced = Image(
        image.array[index : index + 1].copy(),
        image.spacing,
        tuple(origin),
        image.direction.copy(),
        dict(image.metadata),
    )
    return sliced, index


def _centre(image: Image) -> np.ndarray:
    half = (np.asarray(image.size, dtype=np.float64) - 1.0) / 2.0
    return np.asarray(image.origin) + image.direction @ (half * np.asarray(image.spacing))


def _extent(image: Image, direction: np.ndarray) -> np.ndarray:
    """Physical extent (voxel edges included) of ``image`` along the columns of ``direction``."""
    size = np.asarray(image.size, dtype=np.float64)
    corners = np.array(
        [[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)]
    )
    points = (image.direction @ (corners * np.asarray(image.spacing)).T).T
    projected = points @ direction
    return projected.max(axis=0) - projected.min(axis=0)


def network_grid(image: Image, spec: ModelSpec) -> Image:
    """The grid the network sees (see the module docstring), as an empty :class:`Image`."""
    patch = spec.patch_size[::-1]  # (i, j[, k])
    spacing = spec.target_spacing
    if spec.spatial_dims == 3:
        direction = np.eye(3)
        size = np.asarray(patch, dtype=int)
        extent = _extent(image, direction)
        grid_spacing = np.asarray(spacing) if spacing else np.full(3, float(np.max(extent / size)))
    else:
        normal = single_slice_axis(image)
        plane = [axis for axis in range(3) if axis != normal]
        direction = image.direction[:, plane + [normal]]
        size = np.asarray(list(patch) + [1], dtype=int)
        extent = _extent(image, direction)[:2]
        in_plane = np.asarray(spacing) if spacing else np.full(2, float(np.max(extent / size[:2])))
        grid_spacing = np.append(in_plane, image.spacing[normal])
    origin = _centre(image) - direction @ ((size - 1) / 2.0 * grid_spacing)
    return Image(np.zeros(size[::-1], dtype=np.uint8), tuple(grid_spacing), tuple(origin), direction)


def prepare_input(image: Image, spec: ModelSpec, slice_policy: Optional[str] = None) -> PreparedInput:
    """Check ``image`` against ``spec`` and resample it onto the network grid; intensities normalised first.

    Normalising the source (not the grid) keeps the intensity mapping independent of how much padding the
    grid adds around a small image.
    """
    check_classification_input(image, spec, slice_policy)
    source, slice_index = image, None
    if spec.spatial_dims == 2 and single_slice_axis(image) is None:
        source, slice_index = middle_slice(image)
    grid = network_grid(source, spec)
    channels: List[np.ndarray] = []
    arrays = [source.array] if source.array.ndim == 3 else [source.array[..., c] for c in range(source.array.shape[3])]
    for array in arrays:
        normalised = source.with_array(normalize_intensity(array, spec.normalization))
        background = float(normalised.array.min())
        resampled = resample_to_grid(normalised, grid, "linear", default=background).array
        channels.append(resampled[0] if spec.spatial_dims == 2 else resampled)
    return PreparedInput(np.stack(channels).astype(np.float32), grid, source, slice_index)


def map_to_input(values: np.ndarray, prepared: PreparedInput, image: Image) -> Image:
    """Bring a map on the network grid (``[*patch_size]``) back onto ``image``'s exact grid (zero outside)."""
    grid_array = values[None] if values.ndim == 2 else values
    on_grid = prepared.grid.with_array(grid_array.astype(np.float32))
    on_source = resample_to_grid(on_grid, prepared.source, "linear", default=0.0).array.astype(np.float32)
    if prepared.slice_index is None:
        result = on_source
    else:
        result = np.zeros(image.array.shape[:3], dtype=np.float32)
        result[prepared.slice_index] = on_source[0]
    heatmap = Image(result, image.spacing, image.origin, image.direction.copy(), dict(image.metadata))
    return heatmap
