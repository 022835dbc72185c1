"""Reading volumes (NRRD, NIfTI, MetaImage, DICOM series) into :class:`Image`, and writing them atomically.

Reading is two-staged. First the header is parsed cheaply in Python and checked (claimed size, spacing,
dimensions, data-file references, file size: :mod:`meddl.io.safety`; slice stack: :mod:`meddl.io.dicom`);
nothing large is allocated before that passes. Then SimpleITK decodes the voxels, with the ImageIO fixed by
the checked format so that a file cannot redirect itself to another decoder. Files that no pre-check
covers (unknown formats, compressed DICOM) are decoded in a child process (:mod:`meddl.io.isolated`), so
that a decoder crash on hostile input costs an error message, not the worker.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from meddl.errors import InputError
from meddl.fsutil import publish
from meddl.io.image import Image
from meddl.io.safety import check_dimensions, check_size, check_spacing, detect_format, itk_message, sniff_header

__all__ = ["read_image", "write_image", "image_from_sitk", "image_to_sitk", "WRITE_FORMATS"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# ITK prints warnings straight to stderr; the engine's contract is one line per error, nothing else.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

READ_IMAGE_IO = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO", "nifti": "NiftiImageIO"}
# Single-file formats only: a two-file format (.nhdr, .mhd) cannot be replaced atomically by one rename.
WRITE_FORMATS = {".nrrd": "NrrdImageIO", ".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".mha": "MetaImageIO"}


def image_from_sitk(itk_image: sitk.Image, source: Optional[PathLike] = None) -> Image:
    """Wrap a SimpleITK image; a trailing singleton 4th axis is dropped, anything else not 3D is refused."""
    size = list(itk_image.GetSize())
    if itk_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a scalar volume, got {itk_image.GetNumberOfComponentsPerPixel()} components per voxel", source
        )
    if itk_image.GetDimension() == 4 and size[3] == 1:
        itk_image = sitk.Extract(itk_image, size[:3] + [0], [0, 0, 0, 0])
        size = size[:3]
    if itk_image.GetDimension() != 3:
        check_dimensions(size, source)  # raises "expected a 3D volume, got ND (shape ...)"
    check_spacing(itk_image.GetSpacing(), source)
    origin = np.asarray(itk_image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(itk_image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.isfinite(origin).all() or not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError("origin or direction is not finite, or the direction matrix is singular", source)
    return Image(array=sitk.GetArrayFromImage(itk_image), spacing=itk_image.GetSpacing(), origin=origin,
                 direction=direction)  # fmt: skip


def image_to_sitk(image: Image) -> sitk.Image:
    """A SimpleITK image with the same voxels and geometry."""
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.array))
    itk_image.SetSpacing(image.spacing)
    itk_image.SetOrigin(image.origin)
    itk_image.SetDirection(image.direction.flatten().tolist())
    return itk_image


def _isolation_setting() -> Optional[bool]:
    value = os.environ.get("MEDDL_ISOLATE_READS", "auto").strip().lower()
    if value in ("1", "always", "true", "yes"):
        return True
    if value in ("0", "never", "false", "no"):
        return False
    return None


def read_image(
    path: PathLike,
    series_uid: Optional[str] = None,
    isolate: Optional[bool] = None,
    timeout: Optional[float] = None,
) -> Image:
    """Read a 3D volume with its exact LPS geometry.

    Args:
        path: a NRRD (.nrrd/.nhdr), NIfTI-1 or NIfTI-2 (.nii/.nii.gz, or a .hdr/.img pair named by either file),
            MetaImage (.mha/.mhd) or FreeSurfer (.mgh/.mgz) file, a DICOM series folder, or one DICOM file (its
            series in the same folder is read).
        series_uid: which DICOM series to read when the folder holds several.
        isolate: decode in a child process (True), in this process (False), or decide (None: a child for
            formats without a header pre-check and for compressed DICOM; ``MEDDL_ISOLATE_READS=always|never``
            overrides).
        timeout: seconds the child process may take (default ``MEDDL_READ_TIMEOUT`` or 300).

    Returns:
        The image; ``metadata`` holds ``source``, ``format``, ``modality`` (DICOM Modality, else None),
        ``series_uid`` (DICOM) and ``dtype``. NaN/inf voxels are kept; see ``validate_for_inference``.

    Raises:
        InputError: one line naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    forced = _isolation_setting() if isolate is None else isolate
    file_format = "dicom" if path.is_dir() else detect_format(path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError("the file is empty", path)

    if file_format == "dicom":
        from meddl.io.dicom import plan_dicom, read_dicom

        plan = plan_dicom(path, series_uid)
        check_size(plan.shape, path)
        # Uncompressed pixels are a plain copy for GDCM; compressed ones go through codecs, in a child.
        if plan.compressed if forced is None else forced:
            return _read_isolated(path, series_uid, timeout)
        image = read_dicom(plan, path)
    else:
        if file_format in READ_IMAGE_IO or file_format == "mgh":
            facts = sniff_header(path, file_format)
            if forced:
                return _read_isolated(path, series_uid, timeout)
            try:
                if file_format == "mgh":
                    image = _read_with_nibabel(path, facts.shape, "MGH")
                elif file_format == "nifti" and facts is not None and facts.notes.get("nifti_version") == 2:
                    image = _read_with_nibabel(path, facts.shape, "NIfTI-2")
                elif file_format == "nifti" and facts is not None and "float" in str(facts.notes.get("dtype")):
                    image = _read_float_nifti(path, facts.shape)
                else:
                    image = _read_with_sitk(path, READ_IMAGE_IO[file_format])
            except InputError as error:
                # ITK's words for a sheared sform with no qform ("only supports orthonormal direction cosines") do
                # not say what is wrong; where the shear shows as 0.0° they stay as they are.
                shear = _sform_shear_deg(facts.notes) if file_format == "nifti" and facts is not None else None
                if shear is None or round(shear, 1) == 0.0 or "orthonormal" not in error.problem:
                    raise
                raise InputError(
                    f"its sform shears the voxel axes {shear:.1f}° off square and it has no qform: ITK, and so "
                    "Slicer, cannot place it on a grid; resample it onto an orthogonal grid first",
                    path,
                ) from None
            if facts is not None and tuple(image.size) != tuple(facts.shape):
                raise InputError(f"decoded size {image.size} differs from the header's {facts.shape}", path)
            if file_format == "nifti" and facts is not None:
                xforms = _disagreeing_xforms(facts.notes, image)
                if xforms:
                    image.metadata["nifti_xforms"] = xforms
        elif forced is False:
            image = _read_with_sitk(path, None)
        else:
            return _read_isolated(path, series_uid, timeout)
        image.metadata.update({"source": str(path), "format": file_format or "other", "modality": None})
    image.metadata["dtype"] = str(image.array.dtype)
    return image


def _disagreeing_xforms(notes: dict, image: Image) -> Optional[dict]:
    """A NIfTI header's qform and sform when they place the voxels more than 0.01 mm apart, else None.

    ITK (and so Slicer, and this engine) reads the qform unless the sform's code is 1 (scanner); nibabel, FSL and
    nilearn read the sform. A labelmap written with only the geometry ITK read would lie on the image for the first
    and be shifted or turned for the others, so :func:`write_image` gives it both, as the source has them.
    ``grid`` is the geometry they belong to; ``apart_mm`` how far apart they put a corner of the volume.
    """
    if "qform" not in notes or "sform" not in notes:
        return None
    corners = np.array([[c * (n - 1) for c, n in zip(corner, image.size)] + [1.0] for corner in np.ndindex(2, 2, 2)])
    apart = np.linalg.norm((corners @ np.asarray(notes["qform"]).T - corners @ np.asarray(notes["sform"]).T), axis=1)
    if apart.max() <= 0.01:
        return None
    xforms = {key: notes[key] for key in ("qform", "qform_code", "sform", "sform_code")}
    return {**xforms, "grid": image.geometry(), "apart_mm": round(float(apart.max()), 2)}


def _sform_shear_deg(notes: dict) -> Optional[float]:
    """How far from square (degrees) the sform's voxel axes meet, where a NIfTI header has an sform and no qform;
    else None."""
    if "qform" in notes or "sform" not in notes:
        return None
    axes = np.asarray(notes["sform"], dtype=float)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs((unit.T @ unit)[np.triu_indices(3, 1)])
    return float(90.0 - np.degrees(np.arccos(np.clip(cosines.max(), 0.0, 1.0))))


def _read_with_sitk(path: Path, image_io: Optional[str]) -> Image:
    reader = sitk.ImageFileReader()
    if image_io:
        reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    try:
        if not image_io:
            # Unknown format: ITK's header read is cheap; check the claim before the voxels are allocated.
            reader.ReadImageInformation()
            check_size(list(reader.GetSize()) + [reader.GetNumberOfComponents()], path)
        itk_image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read as an image ({itk_message(error)})", path) from None
    return image_from_sitk(itk_image, path)


def _read_float_nifti(path: Path, shape) -> Image:
    """Float NIfTI: geometry from ITK (as Slicer reads it), voxels from nibabel.

    ITK's NIfTI reader turns NaN voxels into 0 without a word; nibabel keeps them, so that NaN is seen and
    refused before inference instead of being segmented as background.
    """
    import nibabel as nib

    reader = sitk.ImageFileReader()
    reader.SetImageIO("NiftiImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        nifti = nib.load(str(path))
        stored = nifti.get_data_dtype()
        voxels = np.asanyarray(nifti.dataobj)
    except RuntimeError as error:
        raise InputError(f"cannot read as an image ({itk_message(error)})", path) from None
    except Exception as error:  # noqa: BLE001 - nibabel/zlib raise several types on corrupt data
        raise InputError(f"cannot read the NIfTI voxels ({' '.join(str(error).split())[:200]})", path) from None
    if voxels.dtype == np.float64 and stored == np.float32:
        voxels = voxels.astype(np.float32)
    array = np.ascontiguousarray(voxels.reshape(tuple(shape), order="F").T)
    geometry = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # carries the header geometry through the same checks
    size = list(reader.GetSize())
    if len(size) > 3:
        if any(n != 1 for n in size[3:]):
            check_dimensions(size, path)
        spacing, origin = reader.GetSpacing()[:3], reader.GetOrigin()[:3]
        direction = np.asarray(reader.GetDirection()).reshape(len(size), len(size))[:3, :3]
    else:
        spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), np.asarray(reader.GetDirection())
    geometry.SetSpacing(check_spacing(spacing, path))
    geometry.SetOrigin(origin)
    geometry.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    template = image_from_sitk(geometry, path)
    return Image(array, template.spacing, template.origin, template.direction)


def _nifti_placement_as_itk(header) -> np.ndarray:
    """The voxel-to-RAS matrix ITK takes from a NIfTI header, so that a NIfTI-2 file lies where its NIfTI-1 twin does
    (in this engine and in Slicer): the sform where its code is 1 (scanner) or the qform's is 0, else the qform; with
    neither, the voxel sizes along the LPS axes from the origin."""
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if sform_code > 0 and (sform_code == 1 or qform_code == 0):
        return header.get_sform()
    if qform_code > 0:
        return header.get_qform()
    sizes = [abs(float(z)) for z in header.get_zooms()[:3]]
    return np.diag([-sizes[0], -sizes[1], sizes[2], 1.0])


def _read_with_nibabel(path: Path, shape, what: str) -> Image:
    """A format ITK does not read (FreeSurfer MGH/MGZ, NIfTI-2): voxels and the voxel-to-RAS matrix from nibabel,
    in LPS."""
    import nibabel as nib

    try:
        loaded = nib.load(str(path))
        voxels = np.asanyarray(loaded.dataobj)
        nifti = isinstance(loaded.header, nib.Nifti1Header)  # NIfTI-2's header class derives from NIfTI-1's
        affine = np.asarray(_nifti_placement_as_itk(loaded.header) if nifti else loaded.affine, dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - nibabel/zlib raise several types on corrupt data
        raise InputError(f"cannot read the {what} voxels ({' '.join(str(error).split())[:200]})", path) from None
    # A copy in the machine's byte order (MGH stores big-endian), not a view of nibabel's memory map of the file.
    array = np.array(voxels.reshape(tuple(shape), order="F").T, dtype=voxels.dtype.newbyteorder("="), order="C")
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])
    spacing = check_spacing(np.linalg.norm(affine[:3, :3], axis=0), path)
    direction = lps_from_ras @ affine[:3, :3] / np.asarray(spacing)
    return Image(array, spacing, tuple(lps_from_ras @ affine[:3, 3]), direction)


def _read_isolated(path: Path, series_uid: Optional[str], timeout: Optional[float]) -> Image:
    from meddl.io.isolated import read_in_child

    return read_in_child(path, series_uid=series_uid, timeout=timeout)


def _writable_array(image: Image, labelmap: Optional[bool], path: Path) -> np.ndarray:
    array = np.asarray(image.array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if labelmap is None:
        labelmap = bool(image.metadata.get("labelmap", False))
    if not labelmap:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError("a labelmap must hold whole numbers", path)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise InputError(f"labelmap values {low:g}..{high:g} do not fit uint16", path)
    return array.astype(np.uint8 if high < 256 else np.uint16, copy=False)


def write_image(image: Image, path: PathLike, labelmap: Optional[bool] = None, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` (.nrrd, .nii, .nii.gz, .mha) atomically, with its exact geometry.

    The voxels go to a temporary file in the destination folder, which is flushed to disk and renamed
    over ``path``: a reader never sees a half-written file, and a failure leaves nothing behind.

    Args:
        image: the image (3D).
        path: destination; the extension picks the format.
        labelmap: store as the smallest of uint8/uint16 that holds the labels (None: when
            ``image.metadata["labelmap"]`` is set; bool arrays are always stored as uint8).
        compress: compress the voxels (ignored for .nii, which is uncompressed by name).

    Returns:
        ``path``.
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    image_io = WRITE_FORMATS.get(suffix)
    if image_io is None:
        raise InputError(f"cannot write '{suffix or path.name}'; use one of {', '.join(WRITE_FORMATS)}", path)
    if image.array.ndim != 3:
        raise InputError(f"can only write 3D volumes, got an array of shape {image.array.shape}", path)
    array = _writable_array(image, labelmap, path)
    xforms = image.metadata.get("nifti_xforms") if suffix in (".nii", ".nii.gz") else None
    if xforms and not _on_grid(image, xforms["grid"]):
        xforms = None  # a crop or resample of the source: the source's header no longer describes it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise InputError(f"cannot write here ({error.strerror or error})", path) from None
    try:
        if xforms:
            _write_nifti_with_xforms(array, xforms, temporary)
        else:
            writer = sitk.ImageFileWriter()
            writer.SetImageIO(image_io)
            writer.SetFileName(temporary)
            writer.SetUseCompression(bool(compress) and suffix != ".nii")
            writer.Execute(image_to_sitk(Image(array, image.spacing, image.origin, image.direction)))
        publish(temporary, path)
    except RuntimeError as error:
        raise InputError(f"cannot write the image ({itk_message(error)})", path) from None
    except OSError as error:
        raise InputError(f"cannot write the image ({error.strerror or error})", path) from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _on_grid(image: Image, grid: dict) -> bool:
    """Whether ``image`` lies on ``grid`` (:meth:`Image.geometry`), to 1e-6 mm."""
    mine = image.geometry()
    return mine["size"] == list(grid["size"]) and all(
        np.allclose(mine[key], grid[key], atol=1e-6) for key in ("spacing", "origin", "direction")
    )


def _write_nifti_with_xforms(array: np.ndarray, xforms: dict, path: str) -> None:
    """Write ``array`` (k, j, i) as NIfTI with the source's qform and sform and their codes (nibabel, which
    compresses by the name's .gz)."""
    import nibabel as nib

    nifti = nib.Nifti1Image(array.T, None)  # nibabel's axes are (i, j, k)
    try:
        nifti.set_qform(np.asarray(xforms["qform"]), code=int(xforms["qform_code"]))
        nifti.set_sform(np.asarray(xforms["sform"]), code=int(xforms["sform_code"]))
        nifti.header.set_xyzt_units("mm")
        nib.save(nifti, path)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - nibabel raises several types; write_image reports RuntimeError
        raise RuntimeError(" ".join(str(error).split())[:200]) from None
