"""Loaded model packages kept between requests, so that only the first request pays the load cost."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

__all__ = ["ModelCache", "resolve_package_dir"]

PathLike = Union[str, os.PathLike]


def resolve_package_dir(model: PathLike) -> Path:
    """The package folder a request names: a model home resolves to its champion version when
    :mod:`meddl.continual` is installed; a ``model.json`` path resolves to its folder."""
    path = Path(model).expanduser()
    try:
        from meddl.continual import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        path = Path(resolve_model(path))
    if path.name == "model.json":
        path = path.parent
    return path.resolve()


def _stamp(folder: Path) -> Tuple[int, int]:
    """Modification times of the two package files: a rewritten package is a different cache entry."""
    stamps = []
    for name in ("model.json", "weights.safetensors"):
        try:
            stamps.append((folder / name).stat().st_mtime_ns)
        except OSError:
            stamps.append(-1)  # load_model below names the missing file
    return stamps[0], stamps[1]


class ModelCache:
    """A small least-recently-used map ``(folder, mtimes, device) -> ModelPackage``; thread-safe."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = max(1, int(capacity))
        self._entries: OrderedDict[tuple, Dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: PathLike, device: str):
        """Return ``(package, hit, seconds)``; loads (and evicts the oldest entry) on a miss."""
        from meddl.models import load_model

        folder = resolve_package_dir(model)
        key = (str(folder), *_stamp(folder), device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry["last_used"] = time.time()
                entry["hits"] += 1
                return entry["package"], True, 0.0
        started = time.perf_counter()
        package = load_model(folder, device=device)
        seconds = time.perf_counter() - started
        with self._lock:
            # A package rewritten in place leaves a stale entry for the same folder: drop it.
            for old in [k for k in self._entries if k[0] == key[0] and k[3] == device]:
                del self._entries[old]
            self._entries[key] = {"package": package, "loaded_s": seconds, "last_used": time.time(), "hits": 0}
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return package, False, seconds

    def describe(self) -> List[Dict[str, Any]]:
        """JSON-able summary of the loaded models, most recently used last."""
        with self._lock:
            return [
                {
                    "path": key[0],
                    "device": key[3],
                    "name": entry["package"].spec.name,
                    "version": entry["package"].spec.version,
                    "load_s": round(entry["loaded_s"], 4),
                    "hits": entry["hits"],
                    "last_used": entry["last_used"],
                }
                for key, entry in self._entries.items()
            ]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
