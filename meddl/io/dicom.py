"""DICOM series: find them, choose one by SeriesInstanceUID, check the slice stack, read it with exact geometry.

Only headers are parsed here (pydicom, pixel data skipped); the stack is checked before a single voxel is
decoded: one orientation, one slice size, slices stacked along the slice normal at equal spacing, none
missing, none duplicated. SimpleITK (GDCM) then decodes the pixels in the order chosen here, and the
geometry comes from the headers: origin = ImagePositionPatient of the first slice, direction columns =
row cosine, column cosine, slice normal, spacing = (column spacing, row spacing, slice distance).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import InputError
from meddl.io.image import Image
from meddl.io.safety import itk_message

__all__ = [
    "DicomSlice",
    "DicomPlan",
    "scan_dicom",
    "list_series",
    "plan_dicom",
    "read_dicom",
    "write_dicom_series",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
]

PathLike = Union[str, os.PathLike]

UNCOMPRESSED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
# Modalities that never hold an image volume this engine can read as one.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
MAX_FILES = 100_000
# Positions are decimal strings with up to 16 characters; scanners round them to ~1e-4 mm.
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class DicomSlice:
    """Header facts of one DICOM file (one slice, or one multi-frame object)."""

    path: Path
    series_uid: str
    sop_class: str
    sop_class_name: str
    modality: Optional[str]
    description: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    pixel_bytes: int  # bytes one uncompressed object's pixels take (0 when unknown)
    pixel_data_end: int  # file offset where the pixel data ends (0 unknown/encapsulated, -1 too short)
    position: Optional[np.ndarray]
    orientation: Optional[np.ndarray]
    pixel_spacing: Optional[Tuple[float, float]]


@dataclass
class DicomPlan:
    """A checked series, ready to decode: files in slice order and the geometry they make."""

    files: List[Path]
    series_uid: str
    modality: Optional[str]
    description: str
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray
    shape: Tuple[int, int, int]  # (k, j, i)
    frame_order: Optional[List[int]] = None  # multi-frame: frames in slice order
    compressed: bool = False


def _quiet(function):
    """Silence pydicom's warnings (Python warnings and its logger) while ``function`` parses headers.

    Odd values in real files (e.g. IS '1A') are common and harmless here; printed, they would break the
    one-line error contract of the CLI and the worker.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        pydicom_logger = logging.getLogger("pydicom")
        level = pydicom_logger.level
        pydicom_logger.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return function(*args, **kwargs)
        finally:
            pydicom_logger.setLevel(level)

    return wrapper


def _floats(value, count: int) -> Optional[np.ndarray]:
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.size == count and np.isfinite(array).all() else None


def _read_header(path: Path, force: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # Values over 256 bytes (pixel data above all) are deferred: not read, but their offset and length
        # are kept, which is what the truncation check needs.
        return pydicom.dcmread(path, defer_size=256, force=force)
    except (InvalidDicomError, OSError, EOFError):
        return None
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage; garbage is "not DICOM"
        return None


def _slice_from(dataset, path: Path) -> Optional[DicomSlice]:
    meta = getattr(dataset, "file_meta", None)
    sop_class = str(dataset.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if not sop_class or sop_class == DICOMDIR_CLASS:
        return None
    try:
        from pydicom.uid import UID

        sop_class_name = UID(sop_class).name
    except Exception:  # noqa: BLE001
        sop_class_name = sop_class
    spacing = _floats(dataset.get("PixelSpacing", []) or [], 2)
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        bits = int(dataset.get("BitsAllocated", 0) or 0)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        pixel_bytes = int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0) * samples * frames
        pixel_bytes = pixel_bytes * bits // 8 if bits % 8 == 0 else 0
    except (TypeError, ValueError):
        pixel_bytes = 0
    pixel_data_end = 0
    raw = getattr(dataset, "_dict", {}).get(0x7FE00010)  # the deferred element, not read
    if raw is not None and getattr(raw, "value_tell", None) is not None and raw.length != 0xFFFFFFFF:
        pixel_data_end = int(raw.value_tell) + int(raw.length)
        if raw.length < pixel_bytes:
            pixel_data_end = -1  # fewer pixel bytes than rows x columns x frames need
    return DicomSlice(
        path=path,
        series_uid=str(dataset.get("SeriesInstanceUID", "") or ""),
        sop_class=sop_class,
        sop_class_name=str(sop_class_name),
        modality=str(dataset.get("Modality")) if dataset.get("Modality") else None,
        description=str(dataset.get("SeriesDescription", "") or ""),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
        rows=int(dataset.get("Rows", 0) or 0),
        columns=int(dataset.get("Columns", 0) or 0),
        frames=frames,
        pixel_bytes=pixel_bytes,
        pixel_data_end=pixel_data_end,
        position=_floats(dataset.get("ImagePositionPatient", []) or [], 3),
        orientation=_floats(dataset.get("ImageOrientationPatient", []) or [], 6),
        pixel_spacing=tuple(spacing) if spacing is not None else None,
    )


def _checked_slice(dataset, file_path: Path, reported: Path) -> Optional[DicomSlice]:
    """``_slice_from`` for a file that parsed as DICOM; a header whose values do not decode is an InputError.

    pydicom decodes values lazily, so a corrupt element surfaces only when it is read, with any of a
    dozen exception types; they all mean the same thing to the user.
    """
    try:
        return _slice_from(dataset, file_path)
    except Exception as error:  # noqa: BLE001 - see above
        where = f"{file_path.name} has a" if file_path != reported else "a"
        raise InputError(f"{where} malformed DICOM header ({_describe_error(error)})", reported) from None


def _describe_error(error: BaseException) -> str:
    detail = " ".join(str(error).split())[:120]
    return type(error).__name__ + ": " + "".join(ch if ch.isprintable() else "?" for ch in detail)


@_quiet
def scan_dicom(path: PathLike) -> List[DicomSlice]:
    """Headers of every DICOM file in a folder (recursively), or of one file. Non-DICOM files are skipped."""
    path = Path(path)
    if path.is_file():
        dataset = _read_header(path) or _read_header(path, force=True)
        found = _checked_slice(dataset, path, path) if dataset is not None else None
        if found is None:
            raise InputError("not a DICOM file (no DICOM header with a SOP class)", path)
        return [found]
    slices = []
    count = 0
    for root, folders, names in os.walk(path):
        folders.sort()
        for name in sorted(names):
            count += 1
            if count > MAX_FILES:
                raise InputError(f"folder holds more than {MAX_FILES} files; point at one series folder", path)
            file_path = Path(root) / name
            dataset = _read_header(file_path)
            if dataset is not None:
                found = _checked_slice(dataset, file_path, path)
                if found is not None:
                    slices.append(found)
    return slices


def _group(slices: Sequence[DicomSlice]) -> Dict[str, List[DicomSlice]]:
    groups: Dict[str, List[DicomSlice]] = {}
    for item in slices:
        groups.setdefault(item.series_uid, []).append(item)
    return groups


def _is_image(item: DicomSlice) -> bool:
    return (item.modality or "").upper() not in NON_IMAGE_MODALITIES and "Image Storage" in item.sop_class_name


@_quiet
def list_series(path: PathLike) -> List[Dict[str, object]]:
    """One summary per series found under ``path``: uid, modality, description, files, is_image."""
    summaries = []
    for uid, items in _group(scan_dicom(path)).items():
        first = items[0]
        summaries.append(
            {
                "series_uid": uid,
                "modality": first.modality,
                "description": first.description,
                "files": len(items),
                "frames": sum(item.frames for item in items),
                "kind": first.sop_class_name,
                "is_image": _is_image(first),
            }
        )
    return summaries


def _describe(summaries: List[Dict[str, object]]) -> str:
    parts = []
    for summary in summaries:
        text = f"{summary['series_uid']} ({summary['modality'] or '?'}, {summary['files']} files"
        if summary["description"]:
            text += f", '{summary['description']}'"
        parts.append(text + ")")
    return "; ".join(parts)


@_quiet
def plan_dicom(path: PathLike, series_uid: Optional[str] = None) -> DicomPlan:
    """Choose and check a series (headers only); raise InputError with the reason when it cannot be read.

    Args:
        path: a series folder (or a folder holding several series), or one DICOM file. A single-frame
            file stands for its whole series in the same folder.
        series_uid: the SeriesInstanceUID to read; required when the folder holds more than one image series.
    """
    path = Path(path)
    if path.is_file():
        only = scan_dicom(path)[0]
        if only.frames > 1 or not _is_image(only):
            return _plan_series(path, [only])
        siblings = [item for item in scan_dicom(path.parent) if item.series_uid == only.series_uid]
        return _plan_series(path, siblings or [only])
    slices = scan_dicom(path)
    if not slices:
        raise InputError("no DICOM files in this folder", path)
    groups = _group(slices)
    summaries = list_series(path) if len(groups) > 1 else []
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"series {series_uid} is not in this folder; it holds: {_describe(summaries or [])}"
                             if summaries else f"series {series_uid} is not in this folder", path)  # fmt: skip
        return _plan_series(path, groups[series_uid])
    image_groups = {uid: items for uid, items in groups.items() if _is_image(items[0])}
    if len(image_groups) == 1:
        return _plan_series(path, next(iter(image_groups.values())))
    if not image_groups:
        return _plan_series(path, next(iter(groups.values())))  # raises "not an image series"
    image_summaries = [summary for summary in summaries if summary["is_image"]]
    raise InputError(
        f"folder holds {len(image_groups)} DICOM image series; choose one with series_uid (--series-uid): "
        + _describe(image_summaries),
        path,
    )


def _plan_series(path: Path, items: List[DicomSlice]) -> DicomPlan:
    first = items[0]
    if not _is_image(first):
        raise InputError(
            f"is a DICOM {first.sop_class_name} object (modality {first.modality or 'unknown'}), not an image series",
            path,
        )
    multi = [item for item in items if item.frames > 1]
    if multi:
        if len(items) > 1:
            raise InputError("series mixes multi-frame and single-frame objects; cannot stack it", path)
        try:
            return _plan_multiframe(path, first)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - lazily decoded functional groups fail in many ways
            raise InputError(f"malformed multi-frame DICOM header ({_describe_error(error)})", path) from None
    if len(items) == 1:
        raise InputError(f"expected a 3D volume, got 2D (one DICOM slice of {first.columns}x{first.rows})", path)
    for item in items:
        if item.position is None or item.orientation is None or item.pixel_spacing is None:
            raise InputError(f"slice {item.path.name} lacks ImagePositionPatient, ImageOrientationPatient or "
                             "PixelSpacing; cannot place it in space", path)  # fmt: skip
    if len({(item.rows, item.columns) for item in items}) > 1:
        raise InputError("slices differ in size (rows x columns); not one volume", path)
    orientations = np.array([item.orientation for item in items])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise InputError("slices have mixed orientations (ImageOrientationPatient differs); not one volume", path)
    spacings = np.array([item.pixel_spacing for item in items])
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise InputError("slices have different PixelSpacing; not one volume", path)
    _check_file_sizes(path, items)
    positions = np.array([item.position for item in items])
    order, slice_spacing, direction = _stack(path, positions, first.orientation, [i.path.name for i in items])
    row_spacing, column_spacing = first.pixel_spacing
    ordered = [items[index] for index in order]
    return DicomPlan(
        files=[item.path for item in ordered],
        series_uid=first.series_uid,
        modality=first.modality,
        description=first.description,
        spacing=(float(column_spacing), float(row_spacing), slice_spacing),
        origin=tuple(float(v) for v in positions[order[0]]),
        direction=direction,
        shape=(len(items), first.rows, first.columns),
        compressed=any(item.transfer_syntax not in UNCOMPRESSED_TRANSFER_SYNTAXES for item in items),
    )


def _check_file_sizes(path: Path, items: List[DicomSlice]) -> None:
    """A file that ends before its pixel data does is truncated; say which, before GDCM reads it."""
    for item in items:
        if item.pixel_data_end == -1:
            raise InputError(f"{item.path.name} holds fewer pixel bytes than its {item.columns}x{item.rows}"
                             f"x{item.frames} pixels need", path)  # fmt: skip
        size = item.path.stat().st_size
        if item.pixel_data_end > size:
            raise InputError(f"{item.path.name} is truncated: its pixel data ends at byte {item.pixel_data_end}, "
                             f"the file at {size}", path)  # fmt: skip


def _stack(path: Path, positions: np.ndarray, orientation: np.ndarray, names: List[str]):
    """Sort slice positions along the normal and check the stack; returns (order, spacing, direction)."""
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise InputError("ImageOrientationPatient is not two orthogonal unit vectors", path)
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    distances = positions @ normal
    order = [int(i) for i in np.argsort(distances, kind="stable")]
    distances = distances[order]
    gaps = np.diff(distances)
    duplicates = np.flatnonzero(gaps < 1e-3)
    if duplicates.size:
        index = int(duplicates[0])
        raise InputError(f"duplicated slice: {names[order[index]]} and {names[order[index + 1]]} are both at "
                         f"{distances[index]:.3f} mm "
                         "along the slice normal (duplicated slice or several acquisitions in one series)",
                         path)  # fmt: skip
    spacing = float(np.median(gaps))
    tolerance = max(0.01, 0.01 * spacing)
    in_plane = positions[order] - positions[order[0]]
    shear = in_plane - np.outer(in_plane @ normal, normal)
    if np.abs(shear).max() > max(0.01, 0.01 * spacing):
        raise InputError("slice positions are not stacked along the slice normal (gantry tilt or shear); "
                         "resample the series before reading it", path)  # fmt: skip
    wide = np.flatnonzero(gaps > spacing + tolerance)
    for index in wide:
        ratio = gaps[index] / spacing
        if abs(ratio - round(ratio)) * spacing <= tolerance and round(ratio) >= 2:
            missing = int(round(ratio)) - 1
            raise InputError(
                f"{missing} slice{'s' if missing > 1 else ''} missing between {distances[index]:.3f} and "
                f"{distances[index + 1]:.3f} mm along the slice normal (gap {gaps[index]:.3f} mm, spacing "
                f"{spacing:.3f} mm)",
                path,
            )
    if np.abs(gaps - spacing).max() > tolerance:
        raise InputError(f"slices are unequally spaced (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm); "
                         "not one regular volume", path)  # fmt: skip
    spacing = float((distances[-1] - distances[0]) / (len(distances) - 1))
    direction = np.column_stack([row, column, normal])
    return order, spacing, direction


def _plan_multiframe(path: Path, item: DicomSlice) -> DicomPlan:
    """An enhanced multi-frame object: per-frame positions from the functional groups."""
    import pydicom

    try:
        dataset = pydicom.dcmread(item.path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot parse the multi-frame DICOM header ({error})", path) from None

    def group_value(frame_group, sequence: str, keyword: str):
        for source in (frame_group, *(dataset.get("SharedFunctionalGroupsSequence") or [])):
            if source is not None and sequence in source and source[sequence].value:
                value = source[sequence].value[0].get(keyword)
                if value is not None:
                    return value
        return None

    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != item.frames:
        raise InputError(f"multi-frame DICOM ({item.frames} frames) without per-frame positions; its slice "
                         "geometry is unknown", path)  # fmt: skip
    positions, orientations, spacings = [], [], []
    for frame in per_frame:
        positions.append(_floats(group_value(frame, "PlanePositionSequence", "ImagePositionPatient") or [], 3))
        orientations.append(_floats(group_value(frame, "PlaneOrientationSequence", "ImageOrientationPatient") or [], 6))
        spacings.append(_floats(group_value(frame, "PixelMeasuresSequence", "PixelSpacing") or [], 2))
    if any(p is None for p in positions) or any(o is None for o in orientations) or any(s is None for s in spacings):
        raise InputError("multi-frame DICOM lacks per-frame position, orientation or pixel spacing", path)
    _check_file_sizes(path, [item])
    if len(per_frame) < 2:
        raise InputError(f"expected a 3D volume, got 2D (one frame of {item.columns}x{item.rows})", path)
    orientations_array = np.array(orientations)
    if np.abs(orientations_array - orientations_array[0]).max() > ORIENTATION_TOLERANCE:
        raise InputError("frames have mixed orientations; not one volume", path)
    names = [f"frame {index + 1}" for index in range(len(per_frame))]
    positions_array = np.array(positions)
    order, slice_spacing, direction = _stack(path, positions_array, orientations_array[0], names)
    row_spacing, column_spacing = spacings[0]
    return DicomPlan(
        files=[item.path],
        series_uid=item.series_uid,
        modality=item.modality,
        description=item.description,
        spacing=(float(column_spacing), float(row_spacing), slice_spacing),
        origin=tuple(float(v) for v in positions_array[order[0]]),
        direction=direction,
        shape=(item.frames, item.rows, item.columns),
        frame_order=order,
        compressed=item.transfer_syntax not in UNCOMPRESSED_TRANSFER_SYNTAXES,
    )


def read_dicom(plan: DicomPlan, source: PathLike) -> Image:
    """Decode the pixels of a checked plan with SimpleITK (GDCM) and put them on the plan's geometry."""
    import SimpleITK as sitk

    try:
        if plan.frame_order is None:
            reader = sitk.ImageSeriesReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileNames([str(p) for p in plan.files])
            array = sitk.GetArrayFromImage(reader.Execute())
        else:
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(str(plan.files[0]))
            array = sitk.GetArrayFromImage(reader.Execute())[plan.frame_order]
    except RuntimeError as error:
        raise InputError(f"cannot decode the DICOM pixel data ({itk_message(error)})", source) from None
    if array.ndim != 3:
        components = array.shape[-1] if array.ndim == 4 else "several"
        raise InputError(f"expected a scalar volume, got {components} components per voxel (colour DICOM)", source)
    if tuple(array.shape) != tuple(plan.shape):
        raise InputError(f"decoded pixels have shape {array.shape}, the headers say {plan.shape}", source)
    return Image(
        array=array,
        spacing=plan.spacing,
        origin=plan.origin,
        direction=plan.direction,
        metadata={
            "source": str(source),
            "format": "dicom",
            "modality": plan.modality,
            "series_uid": plan.series_uid,
            "series_description": plan.description,
            "dicom_files": len(plan.files),
        },
    )


@_quiet
def write_dicom_series(
    image: Image,
    folder: PathLike,
    modality: str = "MR",
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    description: str = "meddl test series",
) -> List[Path]:
    """Write ``image`` as a single-frame DICOM series (one file per k slice), e.g. to make test series.

    Voxels must be integers that fit int16 (stored as-is, slope 1, intercept 0). Slice ``k`` is placed at
    ``origin + k * spacing_k * direction[:, 2]``. DICOM's slice normal is row x column, so a left-handed
    image (det(direction) = -1, e.g. a RAS-stored NIfTI read as LAS) reads back as the same physical image
    with the k axis reversed.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    array = np.asarray(image.array)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < -32768 or array.max() > 32767:
        raise ValueError("write_dicom_series stores int16 voxels; convert the image first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_class = {"CT": pydicom.uid.CTImageStorage, "MR": pydicom.uid.MRImageStorage}[modality]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    row, column = image.direction[:, 0], image.direction[:, 1]
    written = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{k:04d}.dcm"
        dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.SOPClassUID = sop_class
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        dataset.Modality = modality
        dataset.PatientName = "Test^Series"
        dataset.PatientID = "meddl-test"
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.FrameOfReferenceUID = frame_uid
        dataset.SeriesDescription = description
        dataset.SeriesNumber = 1
        dataset.InstanceNumber = k + 1
        position = np.asarray(image.origin) + image.direction @ (np.array([0.0, 0.0, k]) * image.spacing)
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
        dataset.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
        dataset.PixelSpacing = [f"{image.spacing[1]:.6f}", f"{image.spacing[0]:.6f}"]
        dataset.SliceThickness = f"{image.spacing[2]:.6f}"
        dataset.Rows, dataset.Columns = int(array.shape[1]), int(array.shape[2])
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        dataset.RescaleIntercept, dataset.RescaleSlope = "0", "1"
        dataset.PixelData = np.ascontiguousarray(array[k], dtype="<i2").tobytes()
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
