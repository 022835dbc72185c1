"""The one place where Slicer's RAS world meets the engine's LPS world.

Slicer describes a volume by a 4x4 IJK-to-RAS matrix; the engine (SimpleITK, DICOM, NRRD files) by spacing,
origin and direction cosines in LPS. RAS and LPS differ by a sign flip of the first two axes, for points and
for direction columns alike: ``RAS = diag(-1, -1, 1) @ LPS``. Arrays are ``(k, j, i)`` on both sides
(``slicer.util.arrayFromVolume`` and ``SimpleITK.GetArrayFromImage`` agree), so only the matrix changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = [
    "LPS_TO_RAS",
    "LpsGeometry",
    "VolumeArrays",
    "lps_geometry_from_ijk_to_ras",
    "ijk_to_ras_from_lps_geometry",
    "volume_to_lps",
    "lps_to_volume",
]

# Flips L→R and P→A; its own inverse, so it maps RAS to LPS as well.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class LpsGeometry:
    """Engine-side geometry: ``spacing`` and ``origin`` in (i, j, k) / (x, y, z) order, ``direction`` 3x3 with
    column ``c`` the LPS unit vector of axis ``(i, j, k)[c]`` (SimpleITK's convention)."""

    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray


@dataclass
class VolumeArrays:
    """A volume node's voxels (a copy, ``(k, j, i)``) with its LPS geometry."""

    array: np.ndarray
    geometry: LpsGeometry


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> LpsGeometry:
    """Split a 4x4 IJK-to-RAS matrix into LPS spacing, origin and direction.

    Args:
        ijk_to_ras: 4x4 (numpy), as ``slicer.util.arrayFromVTKMatrix(node.GetIJKToRASMatrix(m))`` gives it.

    Returns:
        The same grid in the engine's terms.

    Raises:
        ValueError: when the matrix is not an affine map with non-degenerate axes.
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]) or not np.isfinite(matrix).all():
        raise ValueError(f"not an affine IJK-to-RAS matrix: {matrix.tolist()}")
    lps = LPS_TO_RAS @ matrix[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJK-to-RAS matrix has a zero-length axis: {matrix.tolist()}")
    direction = lps[:, :3] / spacing
    return LpsGeometry(tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:, 3]), direction)


def ijk_to_ras_from_lps_geometry(
    spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray
) -> np.ndarray:
    """The inverse of :func:`lps_geometry_from_ijk_to_ras`: LPS spacing/origin/direction to a 4x4 IJK-to-RAS."""
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return matrix


def _ijk_to_ras_array(volume_node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_to_lps(volume_node) -> VolumeArrays:
    """A scalar volume node as the engine sees it: a ``(k, j, i)`` copy of its voxels and its LPS geometry.

    The geometry is the node's own (local) one; a parent transform is not applied, so results that come back
    on this geometry belong under the same parent transform.
    """
    import slicer

    array = slicer.util.arrayFromVolume(volume_node).copy()
    return VolumeArrays(array, lps_geometry_from_ijk_to_ras(_ijk_to_ras_array(volume_node)))


def lps_to_volume(volume_node, array: np.ndarray, geometry: LpsGeometry) -> None:
    """Fill ``volume_node`` with ``array`` (``(k, j, i)``) placed on the LPS ``geometry``."""
    import slicer

    matrix = ijk_to_ras_from_lps_geometry(geometry.spacing, geometry.origin, geometry.direction)
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(array))
