"""Durable, atomic file publication shared by every writer in the engine, and the volume file names it reads.

A file or folder is built under a temporary name in its destination folder, flushed to disk, given
ordinary permissions and renamed into place, then the folder entry itself is flushed: a kill at any
moment leaves either the old state or the complete new one, never a half-written output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Tuple, Union

__all__ = ["fsync_file", "fsync_dir", "publish", "write_text_atomic", "VOLUME_SUFFIXES", "split_volume_suffix"]

PathLike = Union[str, os.PathLike]
# Volume files that meddl.io reads, longest first; in a batch folder anything else (notes, the .raw data files of
# .mhd headers, the .img files of .hdr headers) is not a case. Here, free of SimpleITK, so that the Slicer module's
# client side can list them too.
VOLUME_SUFFIXES = (".nii.gz", ".mgh.gz", ".hdr.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".mgz", ".mgh", ".hdr")


def split_volume_suffix(name: str) -> Tuple[str, str]:
    """``name`` without its volume extension, and that extension in lower case ("" when it has none)."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _default_mode(is_dir: bool) -> int:
    # tempfile creates 0600 files and 0700 folders; published outputs get what open()/mkdir() would give.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def fsync_file(path: PathLike) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in folder ``path`` durable (a no-op where the platform cannot)."""
    try:
        descriptor = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish(temporary: PathLike, final: PathLike) -> Path:
    """Flush ``temporary`` (a file, or a folder of files), then rename it to ``final`` atomically."""
    temporary, final = Path(temporary), Path(final)
    if temporary.is_dir():
        for child in temporary.rglob("*"):
            if child.is_file():
                fsync_file(child)
                os.chmod(child, _default_mode(False))
        fsync_dir(temporary)
        os.chmod(temporary, _default_mode(True))
    else:
        fsync_file(temporary)
        os.chmod(temporary, _default_mode(False))
    os.replace(temporary, final)
    fsync_dir(final.parent)
    return final


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and :func:`publish`: all of it or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        return publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
