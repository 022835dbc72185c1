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

    from meddl.models import ModelSpec, build_network, save_model

    spec = ModelSpec.from_json(
        {
            "format": "meddl-model",
            "schema_version": 1,
            "name": "test-brain",
            "version": "1",
            "task": "segmentation",
            "architecture": {
                "name": "UNet",
                "args": {
                    "spatial_dims": 3,
                    "in_channels": 1,
                    "out_channels": 2,
                    "channels": list(channels),
                    "strides": [2] * (len(channels) - 1),
                    "num_res_units": num_res_units,
                },
            },
            "labels": [
                {"value": 0, "name": "background", "color": [0, 0, 0]},
                {"value": 1, "name": "brain", "color": [0.9, 0.6, 0.3]},
            ],
            "input": {
                "channels": 1,
                "modality": "MR",
                "spacing": [spacing] * 3,
                "patch_size": [64, 64, 64],
                "normalization": {"kind": "zscore"},
            },
        }
    )
    torch.manual_seed(seed)
    return save_model(spec, build_network(spec), folder)
