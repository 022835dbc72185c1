"""Segment every volume of a folder through a callable (the worker client, or the engine in-process).

Qt- and MRML-free: the worker reads and writes the files itself, so a batch never loads volumes into the scene.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from meddl.errors import Cancelled, InputError, MedDLError
from meddl.fsutil import VOLUME_SUFFIXES, split_volume_suffix

__all__ = ["list_volumes", "output_path_for", "segment_folder"]

PathLike = Union[str, os.PathLike]


def list_volumes(folder: PathLike) -> List[Path]:
    """Volume files (by suffix) and DICOM series folders (sub-folders holding files) of ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such folder", folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and split_volume_suffix(entry.name)[1]:
            found.append(entry)
        elif entry.is_dir() and any(p.is_file() for p in entry.iterdir()):
            found.append(entry)
    return found


def output_path_for(input_path: PathLike, output_folder: PathLike) -> Path:
    """``<output>/<input stem>_seg.nrrd``."""
    return Path(output_folder) / f"{split_volume_suffix(Path(input_path).name)[0]}_seg.nrrd"


def segment_folder(
    segment_one: Callable[[Path, Path], Dict],
    input_folder: PathLike,
    output_folder: PathLike,
    progress: Optional[Callable[[float, str], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
) -> Dict:
    """Run ``segment_one(input, output)`` for every volume of ``input_folder``; one bad file does not stop the rest.

    Returns:
        ``{"input_folder", "output_folder", "done": [result...], "failed": [{"input", "error"}...], "seconds"}``.

    Raises:
        InputError: ``input_folder`` does not exist or holds no volume.
        Cancelled: ``cancelled()`` turned true (outputs written so far stay).
    """
    started = time.perf_counter()
    inputs = list_volumes(input_folder)
    if not inputs:
        raise InputError(f"no volumes ({', '.join(VOLUME_SUFFIXES)} or DICOM folders) found", input_folder)
    Path(output_folder).mkdir(parents=True, exist_ok=True)
    done: List[Dict] = []
    failed: List[Dict] = []
    for index, input_path in enumerate(inputs):
        if cancelled and cancelled():
            raise Cancelled(f"cancelled after {index} of {len(inputs)} volumes", input_folder)
        if progress:
            progress(index / len(inputs), f"{index + 1}/{len(inputs)}: {input_path.name}")
        try:
            done.append(segment_one(input_path, output_path_for(input_path, output_folder)))
        except Cancelled:
            raise
        except MedDLError as error:
            failed.append({"input": str(input_path), "error": str(error)})
    if progress:
        progress(1.0, f"{len(done)} segmented, {len(failed)} failed")
    return {
        "input_folder": str(input_folder),
        "output_folder": str(output_folder),
        "done": done,
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 3),
    }
