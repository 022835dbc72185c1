"""Model packages for the worker and client tests, written with the engine's own ``save_model``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["make_unet_package"]


def make_unet_package(
    folder: Path, spacing: float = 4.0, channels: Sequence[int] = (8, 16, 32), num_res_units: int = 1, seed: int = 0
) -> Path:
    """An untrained 2-label (background, brain) MONAI UNet package with a 64^3 patch at ``spacing`` mm."""
    import torch

    from meddl.models import build_network, save_model, unet_segmentation_spec

    spec = unet_segmentation_spec(
        "test-brain",
        [
            {"value": 0, "name": "background", "color": [0, 0, 0]},
            {"value": 1, "name": "brain", "color": [0.9, 0.6, 0.3]},
        ],
        spacing=[spacing] * 3,
        patch_size=(64, 64, 64),
        channels=channels,
        num_res_units=num_res_units,
        modality="MR",
        normalization={"kind": "zscore"},
        version="1",
    )
    torch.manual_seed(seed)
    return save_model(spec, build_network(spec), folder)
