"""Which models the user can pick, and the label names and colours a model package declares.

A model is either a package folder (``model.json`` + ``weights.safetensors``) or a continual-learning "model
home" (a folder with ``versions/<v>/`` packages); the worker resolves a home to its champion version. Reading
``model.json`` needs no torch: :func:`meddl.models.load_spec` validates it without importing the network code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Union

from meddl.errors import ModelError
from meddl.models import Label as ModelLabel
from meddl.models import load_spec

__all__ = ["ModelLabel", "ModelEntry", "package_folder", "read_model", "discover_models"]

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One selectable model."""

    name: str
    version: str
    task: str
    path: Path
    labels: List[ModelLabel]

    @property
    def title(self) -> str:
        return f"{self.name} {self.version} ({self.path.name})"


def package_folder(path: PathLike) -> Path:
    """The package folder whose ``model.json`` describes ``path``: the folder itself, or for a model home the
    newest version (label names and colours do not change between versions of one home).

    Raises:
        ModelError: ``path`` is neither a package nor a model home.
    """
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    versions = path / "versions"
    if versions.is_dir():
        candidates = sorted((p for p in versions.iterdir() if (p / "model.json").is_file()), key=lambda p: p.name)
        if candidates:
            return candidates[-1]
    raise ModelError("not a model package (no model.json) nor a model home (no versions/*/model.json)", path)


def read_model(path: PathLike) -> ModelEntry:
    """Name, version, task and labels of the model at ``path`` (package or model home)."""
    spec = load_spec(package_folder(path))
    return ModelEntry(spec.name, spec.version, spec.task, Path(path), list(spec.labels))


def discover_models(folders: Iterable[PathLike], task: Optional[str] = None) -> List[ModelEntry]:
    """Models in ``folders``: each folder that is a model, else each of its sub-folders that is one.

    Invalid packages are skipped (and logged), so one broken folder does not hide the others.
    """
    found: List[ModelEntry] = []
    seen = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        try:
            candidates = [folder] if _looks_like_model(folder) else sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError as error:
            logger.warning("cannot list models in %s: %s", folder, error)
            continue
        for candidate in candidates:
            if not _looks_like_model(candidate) or candidate.resolve() in seen:
                continue
            try:
                entry = read_model(candidate)
            except ModelError as error:
                logger.warning("skipping model: %s", error)
                continue
            if task is None or entry.task == task:
                seen.add(candidate.resolve())
                found.append(entry)
    return found


def _looks_like_model(folder: Path) -> bool:
    return (folder / "model.json").is_file() or (folder / "versions").is_dir()
