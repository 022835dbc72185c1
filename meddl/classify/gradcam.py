"""Grad-CAM heat maps with MONAI's :class:`monai.visualize.GradCAM`.

The target layer is the package's ``gradcam.target_layer`` when model.json names one, else the last block
of feature maps for the architectures we know (where the maps still have spatial extent), else the last
convolution in the network.
"""

from __future__ import annotations

import weakref

import numpy as np

from meddl.errors import ModelError
from meddl.models import ModelSpec

__all__ = ["default_target_layer", "gradcam_map"]

# The last block whose output is still a spatial feature map, per allow-listed classifier architecture.
KNOWN_TARGET_LAYERS = {
    "ResNet": "layer4",
    "DenseNet121": "class_layers.relu",
    "DenseNet169": "class_layers.relu",
    "EfficientNetBN": "_swish",
}

# MONAI's GradCAM registers hooks on the network for good; one GradCAM per (network, layer) keeps a warm
# worker from piling up hooks on every request.
_CAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_target_layer(network, spec: ModelSpec) -> str:
    """Name of the layer Grad-CAM reads (see the module docstring)."""
    import torch

    names = dict(network.named_modules())
    configured = spec.raw.get("gradcam", {}).get("target_layer") if isinstance(spec.raw.get("gradcam"), dict) else None
    if configured:
        if configured not in names:
            raise ModelError(f"gradcam.target_layer '{configured}' is not a layer of {spec.architecture}")
        return configured
    known = KNOWN_TARGET_LAYERS.get(spec.architecture)
    if known and known in names:
        return known
    convolutions = [name for name, module in names.items() if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d))]
    if not convolutions:
        raise ModelError(f"{spec.architecture} has no convolution layer for Grad-CAM")
    return convolutions[-1]


def gradcam_map(network, tensor, class_index: int, target_layer: str) -> np.ndarray:
    """Grad-CAM for ``class_index`` on ``tensor`` (``[1, C, *spatial]``): float32 ``[*spatial]`` in [0, 1]."""
    import torch
    from monai.visualize import GradCAM

    per_network = _CAMS.setdefault(network, {})
    cam = per_network.get(target_layer)
    if cam is None:
        cam = GradCAM(nn_module=network, target_layers=target_layer)
        per_network[target_layer] = cam
    with torch.enable_grad():
        result = cam(x=tensor, class_idx=int(class_index))
    network.zero_grad(set_to_none=True)
    values = result.detach().cpu().numpy()[0, 0].astype(np.float32)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return values
