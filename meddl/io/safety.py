"""Cheap checks of untrusted image headers, done before any reader allocates or decodes voxels.

A hostile or broken file can claim 10^12 voxels, zero or NaN spacing, a data file outside its folder
(``../../etc/passwd``), or hold less data than it claims. The header of every format with a text or
fixed binary header (NRRD, MetaImage, NIfTI) is parsed here in pure Python, bounded in bytes read, and
checked; only then does SimpleITK touch the file. Every refusal is an :class:`~meddl.errors.InputError`
naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import InputError

__all__ = [
    "MAX_VOXELS",
    "MAX_HEADER_BYTES",
    "HeaderFacts",
    "detect_format",
    "sniff_header",
    "check_size",
    "check_spacing",
    "check_dimensions",
    "check_contained",
    "validate_for_inference",
    "itk_message",
]

PathLike = Union[str, os.PathLike]

# 2^31 voxels is 8 GiB as float32: far beyond any CT or MRI volume, small enough to refuse absurd claims
# before anything is allocated. MEDDL_MAX_VOXELS raises it for a site that truly needs more.
MAX_VOXELS = int(os.environ.get("MEDDL_MAX_VOXELS", str(2**31)))
# No real NRRD/MetaImage header is near this; a "header" that is longer is not one.
MAX_HEADER_BYTES = 1 << 20
MGH_HEADER_BYTES = 284  # FreeSurfer's fixed MGH header; the voxels follow it

NRRD_TYPE_BYTES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4,
    "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8,
    "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8,
    "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}  # fmt: skip
# MET_LONG / MET_ULONG are left out on purpose: their size differs between MetaIO versions, so a size
# check with them could refuse a good file.
META_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


@dataclass
class HeaderFacts:
    """What a header claims, after it passed the checks.

    Attributes:
        format: ``"nrrd"``, ``"metaimage"`` or ``"nifti"``.
        shape: voxel counts per spatial axis, ``(i, j, k)``, trailing singleton axes removed.
        spacing: voxel size per spatial axis, mm.
        voxel_bytes: bytes per voxel (0 when the header does not say in a way we trust).
        data_path: the file holding the voxels (the header file itself when attached).
        compressed: voxels are gzip/zlib compressed.
        notes: other facts worth keeping (encoding, data offset).
    """

    format: str
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    voxel_bytes: int = 0
    data_path: Optional[Path] = None
    compressed: bool = False
    notes: Dict[str, object] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64))


def detect_format(path: PathLike) -> Optional[str]:
    """The format a file claims by name, confirmed or corrected by its first bytes; None when unknown.

    Returns one of ``"nrrd"``, ``"metaimage"``, ``"nifti"``, ``"mgh"`` (FreeSurfer), ``"dicom"`` or None.
    """
    path = Path(path)
    name = path.name.lower()
    by_name = None
    if name.endswith((".nrrd", ".nhdr")):
        by_name = "nrrd"
    elif name.endswith((".mha", ".mhd")):
        by_name = "metaimage"
    elif name.endswith((".nii", ".nii.gz")):
        by_name = "nifti"
    elif _pair_stem(name) is not None:
        # A two-file NIfTI (or an ANALYZE 7.5 pair, which has no NIfTI magic and is left to ITK): the header says.
        header = _nifti_pair_header(path)
        return "nifti" if header is not None and _nifti_magic(_first_bytes(header, 348)) else None
    elif name.endswith((".mgz", ".mgh", ".mgh.gz")):
        by_name = "mgh"
    elif name.endswith((".dcm", ".dicom", ".ima")):
        by_name = "dicom"
    if by_name is not None:
        return by_name
    # No telling extension (DICOM files often have none): look at the magic bytes.
    try:
        with open(path, "rb") as handle:
            head = handle.read(352)
    except OSError:
        return None
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _nifti_magic(head):
        return "nifti"
    if head.startswith(b"ObjectType") or head.startswith(b"NDims"):
        return "metaimage"
    return None


def sniff_header(path: PathLike, file_format: Optional[str] = None) -> Optional[HeaderFacts]:
    """Parse and check the header of ``path``; None for formats without a pre-check here (DICOM, unknown).

    Raises:
        InputError: the header is malformed, claims too much, has bad spacing, is not 3D, points outside
            its folder, or the file holds less data than the header claims.
    """
    path = Path(path)
    file_format = file_format or detect_format(path)
    with warnings.catch_warnings():
        # Header parsers warn on odd fields; a warning on stderr would break the one-line error rule.
        warnings.simplefilter("ignore")
        if file_format == "nrrd":
            return _sniff_nrrd(path)
        if file_format == "metaimage":
            return _sniff_metaimage(path)
        if file_format == "nifti":
            return _sniff_nifti(path)
        if file_format == "mgh":
            return _sniff_mgh(path)
    return None


# --- shared checks --------------------------------------------------------------------------------------


def check_dimensions(shape: Sequence[int], path: PathLike) -> Tuple[int, ...]:
    """Drop trailing singleton axes beyond the third; refuse anything that is not then 3D."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"expected a 3D volume, got {len(shape)}D (shape {'x'.join(map(str, shape))})", path)
    if min(shape) < 1:
        raise InputError(f"the volume is empty (shape {'x'.join(map(str, shape))})", path)
    return shape


def check_size(shape: Sequence[int], path: PathLike) -> None:
    """Refuse a claimed voxel count above :data:`MAX_VOXELS` (checked in floating point: no overflow)."""
    if any(int(n) < 0 for n in shape):
        raise InputError(f"header claims a negative size {tuple(shape)}", path)
    voxels = float(np.prod([float(n) for n in shape])) if len(shape) else 0.0
    if voxels > MAX_VOXELS:
        raise InputError(
            f"header claims {voxels:.0f} voxels ({'x'.join(map(str, shape))}), more than the limit of {MAX_VOXELS}; "
            "refusing to allocate it",
            path,
        )


def check_spacing(spacing: Sequence[float], path: PathLike) -> Tuple[float, ...]:
    """Spacing must be positive and finite on every axis."""
    values = tuple(float(s) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in values):
        shown = ", ".join(f"{s:g}" for s in values)
        raise InputError(f"voxel spacing ({shown}) must be positive and finite", path)
    return values


def check_contained(reference: str, folder: Path, path: PathLike) -> Path:
    """Resolve a data-file reference from a header; it must stay inside the header's folder."""
    candidate = Path(reference)
    if candidate.is_absolute():
        raise InputError(f"data file reference '{reference}' is an absolute path; it must stay in the header's folder",
                         path)  # fmt: skip
    resolved = (folder / candidate).resolve()
    try:
        resolved.relative_to(folder.resolve())
    except ValueError:
        raise InputError(f"data file reference '{reference}' leaves the header's folder; refusing to follow it",
                         path) from None  # fmt: skip
    if not resolved.is_file():
        raise InputError(f"data file '{reference}' named by the header does not exist", path)
    return resolved


def _check_raw_bytes(facts: HeaderFacts, data_offset: int, path: PathLike) -> None:
    """For uncompressed voxels: the data file must hold at least what the header claims."""
    if not facts.voxel_bytes or facts.data_path is None:
        return
    expected = facts.voxels * facts.voxel_bytes
    available = facts.data_path.stat().st_size - max(0, data_offset)
    if available < expected:
        truncated = "file" if facts.data_path == Path(path) else f"voxel file {facts.data_path.name}"
        raise InputError(
            f"{truncated} is truncated: the header claims {expected} bytes of voxel data, only {max(available, 0)} "
            "present",
            path,
        )


def _check_gzip_stream(data_path: Path, offset: int, expected: int, path: PathLike) -> None:
    """A gzip stream must be complete and decompress to at least ``expected`` bytes.

    SimpleITK silently zero-fills a truncated gzip stream, so this check is what catches a cut-off
    ``.nii.gz``. Fast path: the gzip trailer (ISIZE, size mod 2^32) matches the claim. Otherwise the stream
    is decompressed in chunks, counting bytes, without keeping them.
    """
    size = data_path.stat().st_size
    if size - offset < 18:  # smallest possible gzip member
        raise InputError("compressed data is missing or truncated", path)
    with open(data_path, "rb") as handle:
        handle.seek(size - 4)
        trailer_size = int.from_bytes(handle.read(4), "little")
        if trailer_size == expected % 2**32:
            return
        handle.seek(offset)
        total = _count_decompressed(handle, zlib.MAX_WBITS | 16, expected, path)
    if total < expected:
        raise InputError(f"compressed data is truncated: decompresses to {total} bytes, the header claims {expected}",
                         path)  # fmt: skip


def _count_decompressed(handle, wbits: int, enough: int, path: PathLike) -> int:
    """Decompress a (possibly multi-member) stream, counting bytes; stop once ``enough`` are seen."""
    total = 0
    decompressor = zlib.decompressobj(wbits)
    fed = False  # whether the current member has received any input
    pending = b""
    try:
        while True:
            if not pending:
                pending = handle.read(1 << 20)
                if not pending:
                    break
            total += len(decompressor.decompress(pending, 1 << 22))
            fed = True
            if total >= enough:
                return total
            if decompressor.eof:
                pending = decompressor.unused_data
                if not pending.strip(b"\0"):  # zero padding after the last member
                    pending = b""
                decompressor, fed = zlib.decompressobj(wbits), False
            else:
                pending = decompressor.unconsumed_tail
    except zlib.error as error:
        raise InputError(f"compressed data is corrupt ({error})", path) from None
    if fed and not decompressor.eof:
        raise InputError(f"compressed data is truncated after {total} of {enough} bytes", path)
    return total


# --- NRRD -----------------------------------------------------------------------------------------------


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(MAX_HEADER_BYTES)


def _sniff_nrrd(path: Path) -> HeaderFacts:
    import nrrd

    head = _read_head(path)
    if not head:
        raise InputError("the file is empty", path)
    if not head.startswith(b"NRRD000"):
        raise InputError("not a NRRD file (no 'NRRD000x' magic line)", path)
    buffer = io.BytesIO(head)
    try:
        header = nrrd.read_header(buffer)
    except Exception as error:  # noqa: BLE001 - pynrrd raises several types for malformed text
        raise InputError(f"malformed NRRD header ({_first_line(error)})", path) from None
    header_bytes = buffer.tell()
    if header_bytes >= len(head) == MAX_HEADER_BYTES:
        raise InputError("NRRD header is longer than 1 MiB; not a real header", path)

    sizes = [int(n) for n in np.atleast_1d(header.get("sizes", []))]
    if not sizes or len(sizes) != int(header.get("dimension", len(sizes))):
        raise InputError("malformed NRRD header (sizes do not match dimension)", path)
    check_size(sizes, path)
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    spatial = [axis for axis, kind in enumerate(kinds) if kind in ("domain", "space", "time")] or list(
        range(len(sizes))
    )
    non_spatial = [axis for axis in range(len(sizes)) if axis not in spatial and sizes[axis] != 1]
    if non_spatial:
        raise InputError(
            f"expected a scalar 3D volume, got {len(sizes)}D with a '{kinds[non_spatial[0]]}' axis "
            f"(shape {'x'.join(map(str, sizes))})",
            path,
        )
    shape = check_dimensions([sizes[axis] for axis in spatial], path)

    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        # One row per axis ('none', i.e. NaN, for non-spatial ones); spacing is the length of the spatial rows.
        axes = [axis for axis in spatial if axis < len(directions) and sizes[axis] != 1] or spatial
        spacing = [float(np.linalg.norm(directions[axis])) for axis in axes[:3] if axis < len(directions)]
    elif "spacings" in header:
        spacings = np.atleast_1d(header["spacings"])
        spacing = [float(spacings[axis]) for axis in spatial if axis < len(spacings)][:3]
    else:
        spacing = [1.0] * 3
    spacing = check_spacing(spacing, path)
    if "space origin" in header and not np.isfinite(np.asarray(header["space origin"], dtype=np.float64)).all():
        raise InputError("space origin must be finite", path)

    type_bytes = NRRD_TYPE_BYTES.get(str(header.get("type", "")).lower())
    if type_bytes is None:
        raise InputError(f"unsupported NRRD voxel type '{header.get('type')}'", path)
    encoding = str(header.get("encoding", "raw")).lower()
    data_reference = header.get("data file", header.get("datafile"))
    if data_reference is not None:
        reference = str(data_reference).strip()
        if reference.upper().startswith("LIST") or len(reference.split()) > 1:
            raise InputError("multi-file NRRD data ('data file: LIST' or a file pattern) is not supported", path)
        data_path, data_offset = check_contained(reference, path.parent, path), 0
    else:
        data_path, data_offset = path, header_bytes
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)) or 0)
    facts = HeaderFacts(
        "nrrd", shape, spacing, type_bytes, data_path, encoding in ("gzip", "gz"), {"encoding": encoding}
    )
    expected = facts.voxels * type_bytes
    if encoding == "raw":
        if byte_skip == -1:  # data sits at the end of the file
            data_offset = 0
        _check_raw_bytes(facts, data_offset + max(byte_skip, 0), path)
    elif encoding in ("gzip", "gz"):
        _check_gzip_stream(data_path, data_offset, expected, path)
    elif encoding in ("ascii", "text", "txt", "hex"):
        # Text needs at least one character and a separator per voxel (hex: two characters per byte).
        per_voxel = 2 * type_bytes if encoding == "hex" else 2
        available = data_path.stat().st_size - data_offset
        if available < facts.voxels * per_voxel - 1:
            raise InputError(f"file is truncated: {available} bytes of {encoding} data cannot hold "
                             f"{facts.voxels} voxels", path)  # fmt: skip
    else:  # bzip2 included: SimpleITK's NRRD reader is built without it
        raise InputError(f"NRRD encoding '{encoding}' is not supported (save it as raw or gzip)", path)
    return facts


# --- MetaImage ------------------------------------------------------------------------------------------


def _sniff_metaimage(path: Path) -> HeaderFacts:
    head = _read_head(path)
    if not head:
        raise InputError("the file is empty", path)
    fields: Dict[str, str] = {}
    offset = 0
    for number, raw_line in enumerate(head.splitlines(keepends=True), start=1):
        offset += len(raw_line)
        line = raw_line.decode("latin-1").strip()
        if not line:
            continue
        if "=" not in line:
            raise InputError(f"not a MetaImage header (line {number} is not 'Key = Value')", path)
        key, value = (part.strip() for part in line.split("=", 1))
        fields[key.lower()] = value
        if key.lower() == "elementdatafile":
            break
    else:
        raise InputError("not a MetaImage header (no ElementDataFile line)", path)
    for required in ("ndims", "dimsize", "elementtype"):
        if required not in fields:
            raise InputError(f"MetaImage header lacks '{required}'", path)
    try:
        ndims = int(fields["ndims"])
        sizes = [int(v) for v in fields["dimsize"].split()]
        spacing_text = fields.get("elementspacing") or fields.get("elementsize")
        spacing = [float(v) for v in spacing_text.split()] if spacing_text else [1.0] * ndims
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except ValueError as error:
        raise InputError(f"malformed MetaImage header ({_first_line(error)})", path) from None
    if len(sizes) != ndims:
        raise InputError(f"malformed MetaImage header (NDims {ndims} but DimSize has {len(sizes)} values)", path)
    check_size(sizes + [channels], path)
    if channels != 1:
        raise InputError(f"expected a scalar volume, got {channels} components per voxel", path)
    shape = check_dimensions(sizes, path)
    spacing = check_spacing(spacing[:3], path)
    for key in ("offset", "origin", "position"):
        if key in fields:
            try:
                values = [float(v) for v in fields[key].split()]
            except ValueError:
                raise InputError(f"malformed MetaImage header (field '{key}' is not numbers)", path) from None
            if not all(math.isfinite(v) for v in values):
                raise InputError("image origin must be finite", path)

    reference = fields["elementdatafile"]
    if reference.upper() == "LOCAL":
        data_path, data_offset = path, offset
    elif reference.upper().startswith("LIST") or "%" in reference or len(reference.split()) > 1:
        raise InputError("multi-file MetaImage data (LIST or a file pattern) is not supported", path)
    else:
        data_path, data_offset = check_contained(reference, path.parent, path), 0
    compressed = fields.get("compresseddata", "false").lower() == "true"
    facts = HeaderFacts("metaimage", shape, spacing, META_TYPE_BYTES.get(fields["elementtype"].upper(), 0),
                        data_path, compressed, {"element_type": fields["elementtype"]})  # fmt: skip
    if compressed:
        available = data_path.stat().st_size - data_offset
        claimed = fields.get("compresseddatasize")
        if claimed is not None and claimed.isdigit() and int(claimed) > available:
            raise InputError(f"file is truncated: {claimed} compressed bytes claimed, {available} present", path)
        if facts.voxel_bytes:
            with open(data_path, "rb") as handle:
                handle.seek(data_offset)
                total = _count_decompressed(handle, zlib.MAX_WBITS, facts.voxels * facts.voxel_bytes, path)
            if total < facts.voxels * facts.voxel_bytes:
                raise InputError(f"compressed data is truncated: {total} bytes, the header claims "
                                 f"{facts.voxels * facts.voxel_bytes}", path)  # fmt: skip
    else:
        skip = data_path.stat().st_size if header_size == -1 else max(header_size, 0)
        if header_size == -1 and facts.voxel_bytes:
            skip = data_path.stat().st_size - facts.voxels * facts.voxel_bytes
        _check_raw_bytes(facts, data_offset + max(skip, 0), path)
    return facts


# --- NIfTI ----------------------------------------------------------------------------------------------


def _pair_stem(name: str) -> Optional[Tuple[str, str]]:
    """``(stem, suffix)`` of a two-file NIfTI/ANALYZE name (``.hdr``, ``.img``, either gzipped), else None."""
    for suffix in (".hdr.gz", ".img.gz", ".hdr", ".img"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _nifti_pair_header(path: PathLike) -> Optional[Path]:
    """The header file of a two-file NIfTI or ANALYZE volume named by either of its files, if it exists."""
    path = Path(path)
    stem_suffix = _pair_stem(path.name)
    if stem_suffix is None:
        return None
    stem, suffix = stem_suffix
    if suffix.startswith(".hdr"):
        return path if path.is_file() else None
    gzipped = (".hdr.gz", ".hdr") if suffix.endswith(".gz") else (".hdr", ".hdr.gz")
    return next((path.with_name(stem + s) for s in gzipped if path.with_name(stem + s).is_file()), None)


def _first_bytes(path: Path, count: int) -> bytes:
    """Up to ``count`` bytes from the start of a file, decompressed when its name ends in .gz; b"" when unreadable."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as handle:
            return handle.read(count)
    except (OSError, EOFError, zlib.error):
        return b""


def _nifti_magic(head: bytes) -> Optional[bytes]:
    """``n+1``/``ni1`` (NIfTI-1) or ``n+2``/``ni2`` (NIfTI-2) from a file's first bytes; None for anything else."""
    for magic in (head[344:347], head[4:7]):  # NIfTI-1 keeps it at byte 344, NIfTI-2 at byte 4
        if magic in (b"n+1", b"ni1", b"n+2", b"ni2"):
            return magic
    return None


def _pair_data_file(header_path: Path, path: Path) -> Path:
    """The voxel file of a two-file NIfTI: beside its header, ``.img`` or ``.img.gz``."""
    stem, suffix = _pair_stem(header_path.name)
    gzipped = (".img.gz", ".img") if suffix.endswith(".gz") else (".img", ".img.gz")
    for candidate in (header_path.with_name(stem + s) for s in gzipped):
        if candidate.is_file():
            return candidate
    raise InputError(f"the NIfTI header {header_path.name} has no voxel file {stem}.img beside it", path)


def _sniff_nifti(path: Path) -> HeaderFacts:
    import nibabel as nib

    pair_header = _nifti_pair_header(path)
    header_path = pair_header or path
    compressed = header_path.name.lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(header_path, "rb") as handle:
                raw = handle.read(544)
        else:
            with open(header_path, "rb") as handle:
                raw = handle.read(544)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"not a gzip-compressed NIfTI file ({_first_line(error)})", path) from None
    if not raw:
        raise InputError("the file is empty" if not compressed else "the compressed file holds no data", path)
    if len(raw) < 348:
        raise InputError(f"not a NIfTI file (only {len(raw)} bytes, a NIfTI header needs 348)", path)
    header_class = None
    for byteorder in ("little", "big"):
        sizeof_hdr = int.from_bytes(raw[:4], byteorder)
        if sizeof_hdr == 348:
            header_class = nib.Nifti1Header
        elif sizeof_hdr == 540:
            header_class = nib.Nifti2Header
        if header_class is not None:
            break
    if header_class is None:
        raise InputError("not a NIfTI file (header size field is neither 348 nor 540)", path)
    try:
        # check=False: nibabel's checks silently "fix" bad fields (zero pixdim becomes 1) and log about it;
        # the fields are checked here instead, as stored.
        header = header_class.from_fileobj(io.BytesIO(raw), check=False)
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        # Some old writers store negative pixdims (a flip); the geometry comes from qform/sform either way.
        zooms = [abs(float(z)) for z in header["pixdim"][1 : 1 + min(3, len(shape))]]
        offset = int(header.get_data_offset())
        magic = bytes(header["magic"]).rstrip(b"\0")
    except Exception as error:  # noqa: BLE001 - nibabel raises several types for malformed headers
        raise InputError(f"malformed NIfTI header ({_first_line(error)})", path) from None
    single_file = magic in (b"n+1", b"n+2")
    if not single_file and magic not in (b"ni1", b"ni2"):
        raise InputError(f"not a NIfTI file (magic {magic!r})", path)
    if single_file == (pair_header is not None):
        kind = "a single-file NIfTI (.nii)" if single_file else "the header of a two-file NIfTI (.hdr/.img)"
        raise InputError(f"magic {magic.decode()} marks {kind}, but the file is named {header_path.name}", path)
    check_size(shape, path)
    shape3 = check_dimensions(shape, path)
    spacing = check_spacing(zooms[:3], path)
    # NIfTI-2 (540-byte header, 64-bit fields) is what ITK, and so Slicer, does not read: nibabel reads it here.
    notes = {"dtype": str(dtype), "nifti_version": 2 if header_class is nib.Nifti2Header else 1}
    notes.update(_nifti_xforms(header))
    data_path = path if single_file else _pair_data_file(header_path, path)
    if not single_file:
        compressed = data_path.name.lower().endswith(".gz")  # vox_offset then counts in the .img
    facts = HeaderFacts("nifti", shape3, spacing, int(dtype.itemsize), data_path, compressed, notes)
    if compressed:
        _check_gzip_stream(data_path, 0, offset + facts.voxels * facts.voxel_bytes, path)
    else:
        _check_raw_bytes(facts, offset, path)
    return facts


def _sniff_mgh(path: Path) -> HeaderFacts:
    """FreeSurfer MGH (``.mgh``) or its gzip form (``.mgz``): a 284-byte big-endian header, then the voxels."""
    from nibabel.freesurfer.mghformat import MGHHeader

    try:
        with open(path, "rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            raw = handle.read(MGH_HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"not a readable MGH/MGZ file ({_first_line(error)})", path) from None
    if len(raw) < MGH_HEADER_BYTES:
        raise InputError(f"not an MGH/MGZ file (only {len(raw)} bytes, its header needs {MGH_HEADER_BYTES})", path)
    try:
        header = MGHHeader(raw, check=False)
        version = int(header["version"])
        shape = tuple(int(n) for n in header["dims"])
        dtype = header.get_data_dtype()
        zooms = [float(z) for z in header["delta"]]
    except Exception as error:  # noqa: BLE001 - nibabel raises several types for malformed headers
        raise InputError(f"malformed MGH header ({_first_line(error)})", path) from None
    if version != 1:
        raise InputError(f"not an MGH/MGZ file (version field {version}, not 1)", path)
    check_size(shape, path)
    shape3 = check_dimensions(shape, path)
    spacing = check_spacing(zooms, path)
    facts = HeaderFacts("mgh", shape3, spacing, int(dtype.itemsize), path, compressed, {"dtype": str(dtype)})
    if compressed:
        _check_gzip_stream(path, 0, MGH_HEADER_BYTES + facts.voxels * facts.voxel_bytes, path)
    else:
        _check_raw_bytes(facts, MGH_HEADER_BYTES, path)
    return facts


def _nifti_xforms(header) -> dict:
    """The header's qform and sform (4×4 lists, RAS) with their codes; each absent when its code is 0 or it is not
    finite."""
    xforms = {}
    for name in ("qform", "sform"):
        code = int(header[f"{name}_code"])
        try:
            matrix = header.get_qform() if name == "qform" else header.get_sform()
        except Exception:  # noqa: BLE001 - a malformed quaternion is not this check's business
            continue
        if code > 0 and matrix is not None and np.all(np.isfinite(matrix)):
            xforms[name], xforms[f"{name}_code"] = np.asarray(matrix, dtype=float).tolist(), code
    return xforms


# --- after reading --------------------------------------------------------------------------------------


def validate_for_inference(image, path: Optional[PathLike] = None) -> None:
    """Refuse an image a model must not see: NaN/inf voxels, a constant volume, bad spacing, not 3D. One-line
    InputError.

    :func:`~meddl.io.read_image` keeps NaN and inf voxels (they are what the file holds); anything that
    feeds a network calls this first.
    """
    source = path or image.metadata.get("source")
    if image.array.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array of shape {image.array.shape}", source)
    check_spacing(image.spacing, source)
    if np.issubdtype(image.array.dtype, np.floating):
        finite = np.isfinite(image.array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputError(f"the volume contains {bad} NaN or infinite voxel values", source)
    if image.array.size and image.array.min() == image.array.max():
        # Normalisation has nothing to scale: a model would answer anyway (the brain model found 1.4 l of brain).
        raise InputError(f"every voxel of the volume is {image.array.flat[0]}: a blank image", source)


def itk_message(error: BaseException) -> str:
    """The informative line of an ITK exception, without source paths, object addresses or raw file bytes."""
    import re

    useful = []
    for line in str(error).strip().splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        line = re.sub(r"^(sitk|itk|ITK)\s*::?\s*ERROR:\s*", "", line)
        line = re.sub(r"^ITK ERROR:\s*", "", line)
        line = re.sub(r"\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        if line:
            useful.append(line)
    text = useful[0] if useful else "unknown error"
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    line = text.splitlines()[0][:200]
    return "".join(ch if ch.isprintable() else "?" for ch in line)
