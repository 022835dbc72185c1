"""What each worker method does. Handlers take the request's params, a progress callback and a cancel token,
and return a JSON-able result dict or raise a :class:`~meddl.errors.MedDLError`."""

from __future__ import annotations

import inspect
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from meddl import __version__
from meddl.errors import InputError
from meddl.progress import CancelToken, ProgressCallback
from meddl.protocol import PROTOCOL_VERSION, NotAvailable, ProtocolError
from meddl.worker.cache import ModelCache

__all__ = ["Handlers", "capabilities", "memory_usage"]


def _text_param(params: Dict[str, Any], name: str, method: str, required: bool = True) -> Optional[str]:
    value = params.get(name)
    if value is None:
        if required:
            raise ProtocolError(f"'{method}' needs the parameter '{name}'")
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"parameter '{name}' of '{method}' must be a non-empty string (a path)")
    return value


def _existing_input(path: str) -> str:
    # Checked before the model loads, so a typo in the input path is reported at once.
    if not Path(path).exists():
        raise InputError("no such file or folder", path)
    return path


def _call_supported(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``func`` with the keyword arguments its signature accepts (engine parts evolve independently)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return func(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in parameters}
    return func(*args, **kwargs)


def _optional(module: str, name: str, what: str) -> Callable:
    """``module.name`` or a :class:`NotAvailable` error saying what is missing."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise NotAvailable(f"{what} is not available in this engine install ({module}: {error})") from None
    except AttributeError:
        raise NotAvailable(f"{what} is not available in this engine install ({module} has no {name})") from None


def capabilities(num_threads: int, log_file: Optional[str]) -> Dict[str, Any]:
    """The ``hello`` result: versions, device, GPU name and memory."""
    import torch

    from meddl.infer import select_device
    from meddl.protocol import METHODS

    info: Dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "meddl_version": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(terse=True),
        "torch_version": torch.__version__,
        "device": select_device(),
        "num_threads": num_threads,
        "pid": os.getpid(),
        "log_file": log_file,
        "methods": list(METHODS),
    }
    try:
        import monai

        info["monai_version"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency; reported rather than fatal
        info["monai_version"] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": properties.name,
            "memory_mb": round(properties.total_memory / 2**20),
            "count": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda,
        }
    else:
        info["gpu"] = None
    return info


def memory_usage() -> Dict[str, Any]:
    """Resident memory of the worker and, with CUDA, the GPU memory torch holds."""
    memory: Dict[str, Any] = {"rss_mb": None}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    memory["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            memory["peak_rss_mb"] = round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
        except ImportError:  # Windows
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        memory["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        memory["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        memory["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


class Handlers:
    """The compute methods; each runs on a job thread with its own progress and cancel token."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache

    def run(self, method: str, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        handler = getattr(self, method, None)
        if handler is None:
            raise ProtocolError(f"method '{method}' is not a job")
        return handler(params, progress, cancel)

    def load_model(self, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        from meddl.infer import select_device

        model = _text_param(params, "model", "load_model")
        device = select_device(params.get("device"))
        progress(0.1, "loading model")
        package, hit, seconds = self.cache.get(model, device)
        spec = package.spec
        return {
            "model": spec.name,
            "model_version": spec.version,
            "path": str(package.path),
            "task": spec.task,
            "modality": spec.modality,
            "labels": [{"value": lb.value, "name": lb.name, "color": lb.color} for lb in spec.labels],
            "device": device,
            "model_cache": "hit" if hit else "miss",
            "load_s": round(seconds, 4),
        }

    def segment(self, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        from meddl.infer import segment_file, select_device
        from meddl.progress import scaled

        model = _text_param(params, "model", "segment")
        input_path = _existing_input(_text_param(params, "input", "segment"))
        output_path = _text_param(params, "output", "segment")
        tta = params.get("tta")
        if tta is not None and not isinstance(tta, bool):
            raise ProtocolError("parameter 'tta' of 'segment' must be true, false or null")
        device = select_device(params.get("device"))
        started = time.perf_counter()
        progress(0.0, "loading model")
        package, hit, load_seconds = self.cache.get(model, device)
        cancel.check()
        summary = segment_file(
            package,
            input_path,
            output_path,
            device=device,
            tta=tta,
            progress=scaled(progress, 0.02, 1.0),
            cancel=cancel,
            force_modality=bool(params.get("force_modality", False)),
        )
        summary["timings_s"]["load_model"] = round(load_seconds, 4)
        summary["timings_s"]["total"] = round(time.perf_counter() - started, 4)
        summary["model_cache"] = "hit" if hit else "miss"
        summary["device"] = device
        summary["labels"] = [{"value": lb.value, "name": lb.name, "color": lb.color} for lb in package.spec.labels]
        return summary

    def classify(self, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        classify_file = _optional("meddl.classify", "classify_file", "classification")
        from meddl.infer import select_device

        model = _text_param(params, "model", "classify")
        input_path = _existing_input(_text_param(params, "input", "classify"))
        heatmap = _text_param(params, "heatmap_output", "classify", required=False)
        device = select_device(params.get("device"))
        progress(0.0, "loading model")
        package, hit, load_seconds = self.cache.get(model, device)
        cancel.check()
        summary = _call_supported(
            classify_file,
            package,
            input_path,
            heatmap_output=heatmap,
            device=device,
            progress=progress,
            cancel=cancel,
            slice_policy=params.get("slice_policy"),
        )
        if isinstance(summary, dict):
            summary.setdefault("timings_s", {})["load_model"] = round(load_seconds, 4)
            summary["model_cache"] = "hit" if hit else "miss"
            summary["device"] = device
        return summary

    def submit_correction(self, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        """A segmentation correction (``labelmap``, ``prediction``) or a classification one (``label``: the
        right class name, with the model's ``predicted`` class and ``probabilities`` if known); the store
        refuses the kind that does not match the model's task."""
        submit = _optional("meddl.continual", "submit_correction", "continual learning")
        method = "submit_correction"
        home = _text_param(params, "model", method)
        image = _existing_input(_text_param(params, "image", method))
        label = _text_param(params, "label", method, required=False)
        labelmap = _text_param(params, "labelmap", method, required=label is None)
        if label is not None and labelmap is not None:
            raise ProtocolError(f"'{method}' takes either 'labelmap' (segmentation) or 'label' (a class), not both")
        if labelmap is not None:
            _existing_input(labelmap)
        prediction = _text_param(params, "prediction", method, required=False)
        if prediction:
            _existing_input(prediction)
        probabilities = params.get("probabilities")
        if probabilities is not None and not isinstance(probabilities, dict):
            raise ProtocolError(f"parameter 'probabilities' of '{method}' must be an object (class name -> value)")
        extra = {}
        if label is not None:
            extra = {
                "label": label,
                "predicted": _text_param(params, "predicted", method, required=False),
                "probabilities": probabilities,
            }
        return _call_supported(
            submit,
            home,
            image,
            labelmap,
            prediction=prediction,
            site=params.get("site") or "default",
            model_version=params.get("model_version"),
            **extra,
        )

    def update(self, params: Dict[str, Any], progress: ProgressCallback, cancel: CancelToken) -> Dict:
        run_update = _optional("meddl.continual", "run_update", "continual learning")
        home = _text_param(params, "model", "update")
        names = ("max_steps", "max_seconds", "seed", "options", "device")
        options = {k: params[k] for k in names if params.get(k) is not None}
        return _call_supported(run_update, home, progress=progress, cancel=cancel, **options)
