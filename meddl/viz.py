"""Pictures a person can check a segmentation with: three orthogonal slices with the labels overlaid.

Slices are cut in physical (LPS) space through the labelmap's centre of mass, whatever the volume's
direction matrix, so an oblique or RAS-stored volume looks the same as an axial LPS one. Pixels are
square millimetres (the physical aspect ratio), and the views follow the radiological convention:
the patient's right on the viewer's left, anterior up in the axial view, superior up in the coronal
and sagittal views (anterior on the left in the sagittal view).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from meddl.io import Image, image_to_sitk

__all__ = ["save_overlay_png", "orthogonal_slices", "DEFAULT_COLORS"]

PathLike = Union[str, os.PathLike]

# Distinct, colour-blind-friendly defaults (Okabe-Ito) for labels without a colour of their own.
DEFAULT_COLORS = (
    (0.90, 0.62, 0.00),
    (0.34, 0.71, 0.91),
    (0.00, 0.62, 0.45),
    (0.94, 0.89, 0.26),
    (0.00, 0.45, 0.70),
    (0.84, 0.37, 0.00),
    (0.80, 0.47, 0.65),
)
MAX_PIXELS = 400  # the longest side of a panel, in pixels

# For each view: LPS unit vectors of the panel's columns (left to right), rows (top to bottom) and normal.
_VIEWS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # R→L across, A at the top
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # R→L across, S at the top
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),  # A→P across, S at the top
}
# Letters at the panel's left, right, top and bottom edges.
_EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def _physical_box(image: Image) -> Tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS coordinates of the volume's corners (voxel edges included)."""
    size = np.asarray(image.size, dtype=np.float64)
    corners = np.array(
        [[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)]
    )
    points = (image.direction @ (corners * np.asarray(image.spacing)).T).T + np.asarray(image.origin)
    return points.min(axis=0), points.max(axis=0)


def _centre_of_mass(labelmap: Image) -> np.ndarray:
    """LPS centre of mass of the labelled voxels, or the volume's centre when nothing is labelled."""
    foreground = np.argwhere(labelmap.array > 0)
    if foreground.size:
        index_kji = foreground.mean(axis=0)
    else:
        index_kji = (np.asarray(labelmap.array.shape) - 1) / 2.0
    index_ijk = index_kji[::-1]
    return labelmap.direction @ (index_ijk * np.asarray(labelmap.spacing)) + np.asarray(labelmap.origin)


def orthogonal_slices(
    image: Image, labelmap: Image, centre: Optional[Sequence[float]] = None, reference: Optional[Image] = None
) -> Dict[str, Dict[str, np.ndarray]]:
    """Axial, coronal and sagittal planes through ``centre`` (LPS mm; default: the labels' centre of mass).

    Returns ``{view: {"image": float32 2D, "labels": 2D, "reference": 2D or absent, "pixel_mm": float}}``,
    resampled on square pixels in the orientation the module docstring describes.
    """
    centre = np.asarray(centre if centre is not None else _centre_of_mass(labelmap), dtype=np.float64)
    low, high = _physical_box(image)
    extent = high - low
    pixel = max(min(image.spacing), float(extent.max()) / MAX_PIXELS)
    sources = {"image": (image_to_sitk(image), sitk.sitkLinear, sitk.sitkFloat32)}
    sources["labels"] = (image_to_sitk(labelmap), sitk.sitkNearestNeighbor, None)
    if reference is not None:
        sources["reference"] = (image_to_sitk(reference), sitk.sitkNearestNeighbor, None)
    panels: Dict[str, Dict[str, np.ndarray]] = {}
    for view, (across, down, normal) in _VIEWS.items():
        across_v, down_v, normal_v = (np.asarray(v) for v in (across, down, normal))
        # Start at the corner of the physical box the panel's first pixel lies in, on the plane through centre.
        start = np.where(across_v + down_v < 0, high, low) * np.abs(across_v + down_v) + centre * np.abs(normal_v)
        columns = int(np.ceil(abs(float(extent @ across_v)) / pixel))
        rows = int(np.ceil(abs(float(extent @ down_v)) / pixel))
        reference_grid = sitk.Image([max(1, columns), max(1, rows), 1], sitk.sitkUInt8)
        reference_grid.SetSpacing([pixel] * 3)
        reference_grid.SetOrigin(tuple(start + 0.5 * pixel * (across_v + down_v)))
        reference_grid.SetDirection(np.stack([across_v, down_v, normal_v], axis=1).flatten().tolist())
        panel: Dict[str, np.ndarray] = {"pixel_mm": np.float64(pixel)}
        for key, (source, interpolator, output_type) in sources.items():
            resampled = sitk.Resample(
                source,
                reference_grid,
                sitk.Transform(),
                interpolator,
                0.0,
                output_type if output_type is not None else source.GetPixelID(),
            )
            panel[key] = sitk.GetArrayFromImage(resampled)[0]
        panels[view] = panel
    return panels


def _display_window(image: Image) -> Tuple[float, float]:
    """A robust grey-level window: the 1st and 99.5th percentiles of a subsample of the volume."""
    sample = image.array[:: max(1, image.array.shape[0] // 48)].astype(np.float32, copy=False).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(sample, [1.0, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _label_colours(
    values: Iterable[int], colors: Optional[Mapping[int, Sequence[float]]]
) -> Dict[int, Tuple[float, float, float]]:
    result = {}
    for index, value in enumerate(sorted(values)):
        colour = (colors or {}).get(int(value))
        if colour is None:
            colour = DEFAULT_COLORS[index % len(DEFAULT_COLORS)]
        colour = tuple(float(c) for c in colour[:3])
        if max(colour) > 1.0:  # 0-255 colours
            colour = tuple(c / 255.0 for c in colour)
        result[int(value)] = colour
    return result


def save_overlay_png(
    image: Image,
    labelmap: Image,
    path: PathLike,
    colors: Optional[Mapping[int, Sequence[float]]] = None,
    title: Optional[str] = None,
    names: Optional[Mapping[int, str]] = None,
    reference: Optional[Image] = None,
    alpha: float = 0.35,
) -> Path:
    """Write a PNG of axial, coronal and sagittal slices through the labels' centre of mass.

    Args:
        image: the grey-level volume.
        labelmap: labels on any grid (usually ``image``'s); value 0 is background.
        path: the PNG to write (written to a temporary name, then renamed).
        colors: label value -> RGB in [0, 1] (or 0-255); labels without one get a default colour.
        title: a line above the panels.
        names: label value -> name for the legend (default ``"label <value>"``).
        reference: an optional reference labelmap drawn as white dashed contours (e.g. the ground truth).
        alpha: opacity of the filled overlay; each label also gets a solid contour.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    panels = orthogonal_slices(image, labelmap, reference=reference)
    present = sorted(int(v) for v in np.unique(labelmap.array) if v != 0)
    colours = _label_colours(present, colors)
    low, high = _display_window(image)

    widths = [panels[view]["image"].shape[1] for view in _VIEWS]
    height = max(panels[view]["image"].shape[0] for view in _VIEWS)
    # About 1.5 screen pixels per panel pixel, and never so small that the titles and legend crowd it.
    scale = 1.5 / 100.0
    figure = Figure(
        figsize=(max(7.0, min(18.0, sum(widths) * scale + 0.5)), max(3.2, height * scale + 1.2)),
        dpi=100,
        layout="constrained",
    )
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    for axis, view in zip(axes, _VIEWS):
        panel = panels[view]
        axis.imshow(panel["image"], cmap="gray", vmin=low, vmax=high, interpolation="bilinear")
        labels = panel["labels"]
        overlay = np.zeros(labels.shape + (4,), dtype=np.float32)
        for value in present:
            mask = labels == value
            if not mask.any():
                continue
            overlay[mask] = (*colours[value], alpha)
            axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colours[value]], linewidths=1.0)
        axis.imshow(overlay, interpolation="nearest")
        if reference is not None and "reference" in panel and (panel["reference"] > 0).any():
            axis.contour(
                (panel["reference"] > 0).astype(np.float32),
                levels=[0.5],
                colors=["white"],
                linewidths=1.0,
                linestyles="dashed",
            )
        left, right, top, bottom = _EDGE_LETTERS[view]
        style = {"color": "yellow", "fontsize": 9, "fontweight": "bold"}
        rows, columns = labels.shape
        axis.text(2, rows / 2, left, ha="left", va="center", **style)
        axis.text(columns - 3, rows / 2, right, ha="right", va="center", **style)
        axis.text(columns / 2, 2, top, ha="center", va="top", **style)
        axis.text(columns / 2, rows - 3, bottom, ha="center", va="bottom", **style)
        axis.set_title(view, fontsize=10)
        axis.set_axis_off()
    handles: List = [
        Patch(facecolor=(*colours[v], 0.6), edgecolor=colours[v], label=(names or {}).get(v, f"label {v}"))
        for v in present
    ]
    if reference is not None:
        handles.append(Line2D([0], [0], color="dimgray", linestyle="dashed", label="reference (white, dashed)"))
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=9, frameon=False)
    if title:
        figure.suptitle(title, fontsize=11)

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    try:
        figure.savefig(temporary, format="png", facecolor="white")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
