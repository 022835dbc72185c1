"""Classifying one image: calibrated class probabilities, the predicted class and a Grad-CAM heat map.

The heat map is computed on the network grid and resampled back onto the input's exact grid, so it
overlays the image in Slicer without any registration (2D inputs get a single-slice volume).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from meddl.classify.calibration import softmax_with_temperature
from meddl.classify.gradcam import default_target_layer, gradcam_map
from meddl.classify.preprocess import check_classifier_spec, map_to_input, prepare_input, read_classification_input
from meddl.errors import InputError, ModelError
from meddl.infer import select_device
from meddl.io import Image, write_image
from meddl.models import ModelPackage, load_model
from meddl.progress import CancelToken, ProgressCallback, no_progress

__all__ = [
    "ClassificationResult",
    "load_classifier",
    "temperature_of",
    "predict_logits",
    "classify_image",
    "classify_file",
    "list_batch_inputs",
]

PathLike = Union[str, os.PathLike]
HEATMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")
BATCH_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class ClassificationResult:
    probabilities: Dict[str, float]
    predicted: str
    logits: List[float]
    heatmap: Optional[Image] = None
    slice_index: Optional[int] = None
    timings: Dict[str, float] = field(default_factory=dict)


def load_classifier(model: Union[PathLike, ModelPackage], device: Optional[str] = None) -> ModelPackage:
    """Load (or accept) a package and make sure it is a usable classifier."""
    package = model if isinstance(model, ModelPackage) else load_model(model)
    check_classifier_spec(package.spec, package.path)
    if device:
        package.network.to(device)
    return package


def temperature_of(package: ModelPackage) -> float:
    calibration = package.spec.raw.get("calibration") or {}
    temperature = float(calibration.get("temperature", 1.0)) if isinstance(calibration, dict) else 1.0
    if not np.isfinite(temperature) or temperature <= 0:
        raise ModelError(f"calibration.temperature must be a positive number, not {temperature}", package.path)
    return temperature


def predict_logits(network, batch: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Raw logits ``[N, C]`` for a batch ``[N, C_in, *patch]`` (no temperature)."""
    import torch

    network.eval()
    with torch.inference_mode():
        logits = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
    return logits.float().cpu().numpy()


def classify_image(
    image: Image,
    package: ModelPackage,
    heatmap: bool = True,
    device: Optional[str] = None,
    slice_policy: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> ClassificationResult:
    """Classify ``image``; the heat map (when asked for) lies exactly on ``image``'s grid."""
    import torch

    progress = progress or no_progress
    spec = package.spec
    check_classifier_spec(spec, package.path)
    device = select_device(device)
    network = package.network.to(device)
    timings: Dict[str, float] = {}

    started = time.perf_counter()
    progress(0.05, "resampling to the network grid")
    prepared = prepare_input(image, spec, slice_policy)
    timings["preprocess"] = time.perf_counter() - started
    if cancel:
        cancel.check()

    started = time.perf_counter()
    progress(0.4, "forward pass")
    logits = predict_logits(network, prepared.array[None], device)[0]
    probabilities = softmax_with_temperature(logits[None], temperature_of(package))[0]
    predicted_index = int(np.argmax(probabilities))
    timings["forward"] = time.perf_counter() - started
    if cancel:
        cancel.check()

    heatmap_image = None
    if heatmap:
        started = time.perf_counter()
        progress(0.6, "Grad-CAM")
        tensor = torch.from_numpy(prepared.array[None]).to(device)
        values = gradcam_map(network, tensor, predicted_index, default_target_layer(network, spec))
        heatmap_image = map_to_input(values, prepared, image)
        heatmap_image.metadata.update(model=spec.name, model_version=spec.version, heatmap="gradcam")
        timings["gradcam"] = time.perf_counter() - started
    progress(0.95, "done")
    names = [label.name for label in sorted(spec.labels, key=lambda label: label.value)]
    return ClassificationResult(
        probabilities={name: float(p) for name, p in zip(names, probabilities)},
        predicted=names[predicted_index],
        logits=[float(v) for v in logits],
        heatmap=heatmap_image,
        slice_index=prepared.slice_index,
        timings=timings,
    )


def classify_file(
    model: Union[PathLike, ModelPackage],
    input: PathLike,
    heatmap_output: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    device: Optional[str] = None,
    slice_policy: Optional[str] = None,
) -> Dict:
    """Read, classify and (optionally) write the Grad-CAM map; returns a JSON-able summary.

    Returns:
        ``{"input", "model", "model_version", "probabilities": {class: p}, "predicted", "heatmap": path or
        None, "slice_index", "geometry", "timings_s"}``.
    """
    progress = progress or no_progress
    if heatmap_output is not None and not str(heatmap_output).lower().endswith(HEATMAP_SUFFIXES):
        raise InputError(f"the heat map is a volume; use one of {', '.join(HEATMAP_SUFFIXES)}", heatmap_output)
    started = time.perf_counter()
    package = load_classifier(model)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    image = read_classification_input(input)
    read_seconds = time.perf_counter() - started
    result = classify_image(
        image,
        package,
        heatmap=heatmap_output is not None,
        device=device,
        slice_policy=slice_policy,
        progress=lambda f, m: progress(0.05 + 0.85 * f, m),
        cancel=cancel,
    )
    if cancel:
        cancel.check()
    written = None
    timings = {"load_model": load_seconds, "read": read_seconds, **result.timings}
    if result.heatmap is not None and heatmap_output is not None:
        started = time.perf_counter()
        written = str(write_image(result.heatmap, heatmap_output))
        timings["write"] = time.perf_counter() - started
    progress(1.0, f"predicted {result.predicted}")
    return {
        "input": str(input),
        "model": package.spec.name,
        "model_version": package.spec.version,
        "probabilities": result.probabilities,
        "predicted": result.predicted,
        "heatmap": written,
        "slice_index": result.slice_index,
        "geometry": image.geometry(),
        "timings_s": {key: round(value, 4) for key, value in timings.items()},
    }


def list_batch_inputs(folder: PathLike) -> Optional[List[Path]]:
    """The files of a batch folder, or None when ``folder`` is one DICOM series (one volume).

    A folder holding only DICOM files of a single series is a volume; anything else (volume files, 2D
    images, DICOM files of several series) is a batch of files, not searched recursively.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.name.lower().endswith(BATCH_SUFFIXES)]
    non_dicom = [p for p in candidates if not p.name.lower().endswith(".dcm")]
    if not non_dicom:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if len(series) == 1 and len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])) > 1:
            return None
    if not candidates:
        raise InputError("the folder holds no DICOM series and no image files", folder)
    return candidates
