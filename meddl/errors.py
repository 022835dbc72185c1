"""Errors a user can act on.

Every error the engine raises for bad input or a bad model is a :class:`MedDLError` whose ``str()`` is
one line naming the file and the problem. The CLI and the worker print exactly that line; anything else
is an internal error and is reported as such (with the traceback in the log only).
"""

from __future__ import annotations

import os
from typing import Optional, Union

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_BAD_INPUT",
    "EXIT_BAD_MODEL",
    "EXIT_PARTIAL",
    "EXIT_CANCELLED",
    "MedDLError",
    "InputError",
    "ModalityError",
    "ModelError",
    "Cancelled",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_BAD_MODEL = 4
EXIT_PARTIAL = 5  # a batch finished, but some inputs failed
EXIT_CANCELLED = 130


class MedDLError(Exception):
    """An error with a one-line message naming the file (when there is one) and the problem."""

    exit_code = EXIT_INTERNAL
    kind = "error"

    def __init__(self, problem: str, path: Optional[Union[str, os.PathLike]] = None) -> None:
        self.problem = " ".join(str(problem).split())  # one line, always
        self.path = os.fspath(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": str(self), "path": self.path, "problem": self.problem}


class InputError(MedDLError):
    """An input file (volume, labelmap, DICOM series, datalist, correction) is unusable."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class ModalityError(InputError):
    """The input's modality (from its DICOM tags or its values) is not the one the model expects, or the input is
    not the model's kind of image at all (what the model drew in it is unlike its anatomy: ``postprocess``'s
    ``min_edge_contrast``, ``min_intensity_spread``, ``max_cut_axes``, ``min_edge_contrast_cut_twice``).

    The message states the problem only; each caller says how to run it anyway (``--force-modality`` on the
    command line, a question in Slicer), since the input may be right and the guess wrong.
    """

    kind = "wrong_modality"


class ModelError(MedDLError):
    """A model package is missing, malformed, unsafe or does not fit the input."""

    exit_code = EXIT_BAD_MODEL
    kind = "bad_model"


class Cancelled(MedDLError):
    """The user cancelled a job."""

    exit_code = EXIT_CANCELLED
    kind = "cancelled"

    def __init__(self, problem: str = "cancelled", path: Optional[Union[str, os.PathLike]] = None) -> None:
        super().__init__(problem, path)
