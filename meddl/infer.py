"""Segmentation inference: model grid → MONAI sliding window → probabilities back on the input grid.

Memory stays bounded on large volumes: probabilities live on the (coarser) model grid, and are brought
back to the input grid one class at a time while a running arg-max keeps only the best score and label.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from meddl.errors import InputError, ModelError
from meddl.io import Image, read_image, write_image
from meddl.models import ModelPackage, load_model
from meddl.progress import CancelToken, ProgressCallback, no_progress, scaled
from meddl.transforms import normalize_intensity, resample_to_grid, to_model_grid

__all__ = ["SegmentationResult", "select_device", "check_input", "predict_probabilities", "segment_image",
           "segment_file", "postprocess_labelmap"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


@dataclass
class SegmentationResult:
    labelmap: Image
    timings: Dict[str, float] = field(default_factory=dict)
    label_volumes_ml: Dict[str, float] = field(default_factory=dict)


def select_device(device: Optional[str] = None) -> str:
    """``device`` if given, else CUDA when present, else CPU."""
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device '{device}' was requested but no CUDA GPU is available")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_input(image: Image, package: ModelPackage) -> None:
    """Refuse inputs the model cannot take, naming the file: wrong dimensions, NaN/inf, constant, wrong modality."""
    source = image.metadata.get("source")
    if image.array.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array of shape {image.array.shape}", source)
    if min(image.array.shape) < 1:
        raise InputError("the volume is empty", source)
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise InputError("the volume contains NaN or infinite values", source)
    if not all(np.isfinite(image.spacing)) or min(image.spacing) <= 0:
        raise InputError(f"spacing {image.spacing} must be positive and finite", source)
    expected = package.spec.modality
    found = image.metadata.get("modality")
    if expected and found and str(found).upper() != str(expected).upper() and not image.metadata.get("force"):
        raise InputError(
            f"the file's modality is {found} but model '{package.spec.name}' expects {expected} "
            "(use --force-modality to run it anyway)",
            source,
        )


def predict_probabilities(
    model_image: Image,
    package: ModelPackage,
    device: str = "cpu",
    tta: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
):
    """Softmax probabilities ``[C, k, j, i]`` (float32 numpy) for an image already on the model grid."""
    import torch
    from monai.inferers import sliding_window_inference

    spec = package.spec
    network = package.network.to(device)
    progress = progress or no_progress
    data = normalize_intensity(model_image.array, spec.normalization)
    tensor = torch.from_numpy(np.ascontiguousarray(data))[None, None].to(device)
    if spec.in_channels != 1:
        raise ModelError(f"model '{spec.name}' needs {spec.in_channels} input channels; this volume has 1")
    flips = [()] + ([(2,), (3,), (4,)] if tta else [])
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()
    overlap = float(spec.inference.get("overlap", 0.25))
    windows_done = [0]

    def forward(window):
        if cancel:
            cancel.check()
        out = network(window)
        windows_done[0] += 1
        return out

    total = None
    with torch.inference_mode(), autocast:
        summed = None
        for index, axes in enumerate(flips):
            flipped = torch.flip(tensor, axes) if axes else tensor
            logits = sliding_window_inference(
                flipped, roi_size=spec.patch_size, sw_batch_size=int(spec.inference.get("sw_batch_size", 1)),
                predictor=forward, overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0,
            )
            probabilities = torch.softmax(logits.float(), dim=1)
            probabilities = torch.flip(probabilities, axes) if axes else probabilities
            summed = probabilities if summed is None else summed + probabilities
            progress((index + 1) / len(flips), f"forward pass {index + 1}/{len(flips)}")
        total = (summed / len(flips))[0].cpu().numpy().astype(np.float32)
    return total


def postprocess_labelmap(labels: np.ndarray, options: Dict) -> np.ndarray:
    """Keep each label's largest connected component and/or fill its holes, as the package asks."""
    from scipy import ndimage

    largest = bool(options.get("largest_component", False))
    fill = bool(options.get("fill_holes", False))
    if not (largest or fill):
        return labels
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        if largest:
            components, count = ndimage.label(mask)
            if count > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                keep = components == int(np.argmax(sizes))
                labels[mask & ~keep] = 0
                mask = keep
        if fill:
            filled = ndimage.binary_fill_holes(mask)
            labels[filled & (labels == 0)] = value
    return labels


def segment_image(
    image: Image,
    package: ModelPackage,
    device: Optional[str] = None,
    tta: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> SegmentationResult:
    """Segment ``image`` with ``package``; the labelmap lies exactly on ``image``'s grid."""
    progress = progress or no_progress
    device = select_device(device)
    check_input(image, package)
    spec = package.spec
    if spec.task != "segmentation":
        raise ModelError(f"model '{spec.name}' is a {spec.task} model, not a segmentation model", package.path)
    timings: Dict[str, float] = {}

    started = time.perf_counter()
    progress(0.02, "resampling to the model grid")
    model_image = to_model_grid(image, spec.target_spacing)
    timings["preprocess"] = time.perf_counter() - started
    if cancel:
        cancel.check()

    started = time.perf_counter()
    tta = bool(spec.inference.get("tta_flips", False)) if tta is None else tta
    probabilities = predict_probabilities(model_image, package, device, tta, scaled(progress, 0.1, 0.85), cancel)
    timings["forward"] = time.perf_counter() - started

    started = time.perf_counter()
    progress(0.88, "resampling probabilities to the input grid")
    best_score = None
    labels = np.zeros(image.array.shape, dtype=np.uint8 if max(lb.value for lb in spec.labels) < 256 else np.uint16)
    for channel, label in enumerate(spec.labels):
        if cancel:
            cancel.check()
        score = resample_to_grid(model_image.with_array(probabilities[channel]), image, "linear").array
        if best_score is None:
            best_score = score
            labels[:] = label.value
        else:
            better = score > best_score
            best_score[better] = score[better]
            labels[better] = label.value
        del score
    del best_score, probabilities
    labels = postprocess_labelmap(labels, spec.postprocess)
    timings["postprocess"] = time.perf_counter() - started
    progress(0.98, "done")

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(lb.value for lb in spec.labels) + 1)
    volumes = {lb.name: float(counts[lb.value]) * voxel_ml for lb in spec.foreground_labels}
    labelmap = image.with_array(labels, model=spec.name, model_version=spec.version)
    return SegmentationResult(labelmap=labelmap, timings=timings, label_volumes_ml=volumes)


def segment_file(
    model: Union[PathLike, ModelPackage],
    input_path: PathLike,
    output_path: PathLike,
    device: Optional[str] = None,
    tta: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    force_modality: bool = False,
) -> Dict:
    """Read, segment and write one volume; returns a JSON-able summary with a timing split."""
    progress = progress or no_progress
    started = time.perf_counter()
    package = model if isinstance(model, ModelPackage) else load_model(model)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    image = read_image(input_path)
    if force_modality:
        image.metadata["force"] = True
    read_seconds = time.perf_counter() - started

    result = segment_image(image, package, device, tta, scaled(progress, 0.05, 0.95), cancel)
    if cancel:
        cancel.check()
    started = time.perf_counter()
    written = write_image(result.labelmap, output_path)
    timings = {"load_model": load_seconds, "read": read_seconds, **result.timings,
               "write": time.perf_counter() - started}
    progress(1.0, f"wrote {Path(written).name}")
    return {
        "input": str(input_path),
        "output": str(written),
        "model": package.spec.name,
        "model_version": package.spec.version,
        "geometry": result.labelmap.geometry(),
        "label_volumes_ml": result.label_volumes_ml,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
