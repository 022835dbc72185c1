"""Every malformed or hostile volume gets one line naming the file and the problem, and exit code 3.

Each case is a file this test makes, run through the real command line (`python -m meddl info BAD`) in a
subprocess, as a user would: exit code 3, exactly one line on stderr that names the file, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from meddl.errors import EXIT_BAD_INPUT
from meddl.io import read_image
from meddl.io.dicom import write_dicom_series

NRRD_HEADER = (
    "NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nspace: left-posterior-superior\n"
    "space directions: {directions}\nencoding: raw\nendian: little\nspace origin: (0,0,0)\n\n"
)


def _nrrd(path: Path, sizes: str = "8 8 8", directions: str = "(1,0,0) (0,1,0) (0,0,1)") -> Path:
    path.write_bytes(NRRD_HEADER.format(sizes=sizes, directions=directions).encode() + bytes(8 * 8 * 8 * 2))
    return path


def _random(path: Path, size: int = 20000) -> Path:
    path.write_bytes(np.random.default_rng(7).bytes(size))
    return path


def make_case(name: str, folder: Path, fixtures) -> Path:
    """Create the bad input ``name`` under ``folder``; returns the path to hand to the CLI."""
    anatomical = fixtures("nibabel_anatomical")
    if name == "truncated_nifti":
        data = anatomical.read_bytes()
        return _write(folder / "truncated.nii", data[: len(data) // 2])
    if name == "truncated_nifti_gz":
        data = fixtures("fsl_t1_2mm").read_bytes()
        return _write(folder / "truncated.nii.gz", data[: len(data) // 2])
    if name in ("nifti_pair_without_img", "nifti_pair_truncated_img", "nifti_pair_header_named_nii"):
        reference = nib.load(anatomical)
        nib.save(nib.Nifti1Pair(np.asarray(reference.dataobj), reference.affine), folder / "pair.img")
        if name == "nifti_pair_without_img":
            (folder / "pair.img").unlink()
        elif name == "nifti_pair_truncated_img":
            _write(folder / "pair.img", (folder / "pair.img").read_bytes()[:1000])
        else:
            return _write(folder / "pair.nii", (folder / "pair.hdr").read_bytes())
        return folder / "pair.hdr"
    if name == "truncated_mgz":
        reference = nib.load(anatomical)
        nib.save(nib.MGHImage(np.asarray(reference.dataobj).astype(np.int16), reference.affine), folder / "whole.mgz")
        return _write(folder / "truncated.mgz", (folder / "whole.mgz").read_bytes()[:2000])
    if name == "empty_file":
        return _write(folder / "empty.nii.gz", b"")
    if name == "random_nii_gz":
        return _random(folder / "random.nii.gz")
    if name == "random_nrrd":
        return _random(folder / "random.nrrd")
    if name == "random_no_extension":
        return _random(folder / "random_volume")  # no pre-check: decoded in the child process
    if name == "nrrd_zero_spacing":
        return _nrrd(folder / "zero_spacing.nrrd", directions="(0,0,0) (0,1,0) (0,0,1)")
    if name == "nrrd_nan_spacing":
        return _nrrd(folder / "nan_spacing.nrrd", directions="(nan,0,0) (0,1,0) (0,0,1)")
    if name == "nifti_zero_spacing":
        reference = nib.load(anatomical)
        image = nib.Nifti1Image(np.asarray(reference.dataobj), reference.affine)
        image.header.set_zooms((2.0, 0.0, 2.0))
        path = folder / "zero_spacing.nii.gz"
        nib.save(image, path)
        return path
    if name == "nifti_sheared_sform_no_qform":
        # An sform with a shear (an affine registration's output, a gantry tilt) and no qform: ITK, and so Slicer,
        # has no orthonormal transform to read.
        reference = nib.load(anatomical)
        sheared = reference.affine.copy()
        sheared[1, 2] += np.tan(np.radians(5.0)) * sheared[2, 2]
        image = nib.Nifti1Image(np.asarray(reference.dataobj), sheared)
        image.set_qform(None, code=0)
        image.set_sform(sheared, code=1)
        path = folder / "sheared.nii.gz"
        nib.save(image, path)
        return path
    if name == "nrrd_huge_claim":
        return _nrrd(folder / "huge.nrrd", sizes="10000 10000 10000")
    if name == "mhd_escapes_folder":
        (folder / "a" / "b").mkdir(parents=True)
        path = folder / "a" / "b" / "escape.mhd"
        path.write_text(
            "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
            "ElementDataFile = ../../etc/passwd\n"
        )
        return path
    if name == "image_2d":
        volume = sitk.ReadImage(str(anatomical))
        path = folder / "slice.nrrd"
        sitk.WriteImage(volume[:, :, 12], str(path))
        return path
    if name == "image_4d":
        return fixtures("nibabel_4d")
    if name == "dicom_missing_slice":
        image = read_image(anatomical)
        series = folder / "series"
        files = write_dicom_series(image, series, modality="MR")
        middle = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[12]
        middle.unlink()
        return series
    raise AssertionError(name)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CASES = {
    "truncated_nifti": "truncated",
    "truncated_nifti_gz": "truncated",
    "empty_file": "empty",
    "nifti_pair_without_img": "the NIfTI header pair.hdr has no voxel file pair.img beside it",
    "nifti_pair_truncated_img": "voxel file pair.img is truncated",
    "nifti_pair_header_named_nii": "magic ni1 marks the header of a two-file NIfTI (.hdr/.img), but the file is named",
    "truncated_mgz": "truncated",
    "random_nii_gz": "not a gzip-compressed NIfTI",
    "random_nrrd": "not a NRRD file",
    "random_no_extension": "cannot read as an image",
    "nrrd_zero_spacing": "spacing (0, 1, 1) must be positive",
    "nrrd_nan_spacing": "spacing (nan, 1, 1) must be positive",
    "nifti_zero_spacing": "spacing (2, 0, 2) must be positive",
    "nifti_sheared_sform_no_qform": "its sform shears the voxel axes 5.0° off square and it has no qform",
    "nrrd_huge_claim": "claims 1000000000000 voxels",
    "mhd_escapes_folder": "'../../etc/passwd' leaves the header's folder",
    "image_2d": "expected a 3D volume, got 2D",
    "image_4d": "expected a 3D volume, got 4D (shape 128x96x24x2)",
    "dicom_missing_slice": "1 slice missing between",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_3(case, tmp_path, request):
    bad = make_case(case, tmp_path, request.getfixturevalue)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "meddl", "info", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    elapsed = time.perf_counter() - started
    lines = completed.stderr.splitlines()
    assert completed.returncode == EXIT_BAD_INPUT, completed.stderr
    assert len(lines) == 1, completed.stderr
    assert str(bad) in lines[0] and CASES[case] in lines[0], lines[0]
    assert "Traceback" not in completed.stderr + completed.stdout
    assert completed.stdout == ""
    assert elapsed < 60  # refused, not chewed on


def test_json_mode_keeps_the_error_on_stderr(tmp_path):
    bad = _nrrd(tmp_path / "huge.nrrd", sizes="10000 10000 10000")
    completed = subprocess.run(
        [sys.executable, "-m", "meddl", "info", str(bad), "--json"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == EXIT_BAD_INPUT and completed.stdout == ""
    assert len(completed.stderr.splitlines()) == 1
