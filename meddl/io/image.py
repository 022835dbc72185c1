"""The engine's one image type: voxels plus the exact geometry they lie on.

Geometry follows SimpleITK and DICOM: physical space is LPS (millimetres), the array is indexed
``[k, j, i]`` (slice, row, column), ``spacing`` and ``origin`` are in ``(i, j, k)`` / ``(x, y, z)``
order, and ``direction`` is a 3x3 matrix whose columns are the LPS directions of the i, j, k axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

import numpy as np

__all__ = ["Image", "GEOMETRY_TOLERANCE"]

# Geometry equal up to this (mm, or unitless for direction cosines) is the same grid; files store
# geometry as decimal text (NRRD) or float32 (NIfTI), so exact float equality is too strict.
GEOMETRY_TOLERANCE = 1e-4


@dataclass
class Image:
    """A 3D scalar image (``array.ndim == 3``) on an LPS grid.

    Attributes:
        array: voxels, shape ``(k, j, i)``.
        spacing: voxel size in mm, ``(i, j, k)`` order.
        origin: LPS position of voxel ``(0, 0, 0)``'s centre, mm.
        direction: 3x3; column ``c`` is the LPS unit vector of array axis ``(i, j, k)[c]``.
        metadata: free-form facts from the file (modality, series UID, source path).
    """

    array: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def size(self) -> Tuple[int, int, int]:
        """Size in ``(i, j, k)`` order, as SimpleITK and ITK-SNAP report it."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(i, j, k, 1)`` to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def orientation_code(self) -> str:
        """Three letters naming where each axis (i, j, k) points, in LPS terms (e.g. ``"LPS"``, ``"RAS"``)."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for column in self.direction.T:
            axis = int(np.argmax(np.abs(column)))
            code += letters[axis][0] if column[axis] > 0 else letters[axis][1]
        return code

    def same_grid(self, other: Image, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        """True when ``other`` has the same array shape, spacing, origin and direction."""
        return (
            self.array.shape[:3] == other.array.shape[:3]
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance * max(1.0, max(map(abs, self.origin))))
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def with_array(self, array: np.ndarray, **metadata: object) -> Image:
        """The same grid holding other voxels (e.g. a labelmap on its source image)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array shape {array.shape} does not fit the grid {self.array.shape}")
        return replace(self, array=array, direction=self.direction.copy(), metadata={**self.metadata, **metadata})

    def geometry(self) -> dict:
        """Geometry as plain JSON-able values."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.round(9).tolist(),
            "orientation": self.orientation_code,
        }
