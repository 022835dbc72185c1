"""The demo: segment a real brain the bundled model never trained on, score it, and show it.

``python -m meddl.demo --output DIR`` (``make demo``) takes nilearn's ICBM152 2009a T1 — an average of
152 heads that is not the FSL MNI152 template the bundled ``brain-t1`` model was trained on, and is
already skull-stripped — segments it with :func:`meddl.infer.segment_file`, prints per-label Dice and
HD95 against nilearn's own brain mask (``T1 / max > 0.2``), and writes the labelmap and a PNG overlay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from meddl.errors import MedDLError

__all__ = ["BUNDLED_BRAIN_MODEL", "score_labelmap", "run_demo", "main"]

BUNDLED_BRAIN_MODEL = Path(__file__).resolve().parents[1] / "Resources" / "models" / "brain-t1"


def score_labelmap(
    prediction: np.ndarray, reference: np.ndarray, labels: Dict[int, str], spacing: Sequence[float]
) -> Dict[str, Dict[str, float]]:
    """Per-label Dice and HD95 (mm) of ``prediction`` against ``reference`` (arrays ``k, j, i``, spacing ``i, j, k``).

    Uses :func:`meddl.metrics.segmentation_metrics` when the project has it, else MONAI's metrics directly.
    """
    try:
        from meddl.metrics import segmentation_metrics
    except ImportError:
        segmentation_metrics = None
    if segmentation_metrics is not None:
        return segmentation_metrics(prediction, reference, labels, spacing)
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    results = {}
    array_spacing = list(spacing)[::-1]  # arrays are (k, j, i)
    for value, name in labels.items():
        if value == 0:
            continue
        predicted = torch.from_numpy(np.asarray(prediction) == value)[None, None].float()
        wanted = torch.from_numpy(np.asarray(reference) == value)[None, None].float()
        dice = float(compute_dice(predicted, wanted, include_background=True)[0, 0])
        hd95 = float(
            compute_hausdorff_distance(
                predicted, wanted, include_background=True, percentile=95, spacing=array_spacing
            )[0, 0]
        )
        results[name] = {"dice": dice, "hd95_mm": hd95}
    return results


def _save_overlay(
    image, labelmap, path: Path, colors: Dict[int, List[float]], title: str, names: Dict[int, str], reference=None
) -> Optional[Path]:
    try:
        from meddl.viz import save_overlay_png
    except ImportError:
        save_overlay_png = None
    if save_overlay_png is not None:
        return Path(
            save_overlay_png(image, labelmap, path, colors=colors, title=title, names=names, reference=reference)
        )
    # Fallback until meddl.viz lands: three orthogonal slices through the label's centre of mass.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    labels = np.asarray(labelmap.array)
    centre = (
        [int(round(c)) for c in ndimage.center_of_mass(labels > 0)] if labels.any() else [n // 2 for n in labels.shape]
    )
    values = np.asarray(image.array, dtype=np.float32)
    low, high = np.percentile(values, [0.5, 99.5])
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    views = [
        ("axial", lambda a: a[centre[0]]),
        ("coronal", lambda a: a[:, centre[1]][::-1]),
        ("sagittal", lambda a: a[:, :, centre[2]][::-1]),
    ]
    for axis, (name, cut) in zip(axes, views):
        axis.imshow(cut(values), cmap="gray", vmin=low, vmax=high)
        overlay = np.zeros(cut(labels).shape + (4,), dtype=np.float32)
        for value, color in colors.items():
            overlay[cut(labels) == value] = [*color, 0.45]
        axis.imshow(overlay)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def run_demo(output: Path, model: Optional[Path] = None, device: Optional[str] = None) -> Dict:
    """Segment the held-out ICBM152 2009a T1, score it and write labelmap + overlay into ``output``."""
    from meddl.data import icbm152_2009a_brain_pair
    from meddl.infer import segment_file
    from meddl.io import read_image, write_image
    from meddl.models import load_model

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    package = load_model(model or BUNDLED_BRAIN_MODEL)
    pair = icbm152_2009a_brain_pair()
    input_path = output / "icbm152_2009a_t1.nii.gz"
    reference_path = output / "icbm152_2009a_brain_reference.nii.gz"
    write_image(pair.image, input_path)
    write_image(pair.label, reference_path)
    started = time.perf_counter()
    summary = segment_file(package, input_path, output / "icbm152_2009a_brain_labelmap.nii.gz", device=device)
    seconds = time.perf_counter() - started
    labelmap = read_image(summary["output"])
    image = read_image(input_path)
    names = {lb.value: lb.name for lb in package.spec.foreground_labels}
    metrics = score_labelmap(labelmap.array, pair.label.array, names, image.spacing)
    colors = {lb.value: lb.color for lb in package.spec.foreground_labels}
    brain = ", ".join(f"{n} Dice {m['dice']:.3f} HD95 {m['hd95_mm']:.2f} mm" for n, m in metrics.items())
    overlay = _save_overlay(
        image,
        labelmap,
        output / "icbm152_2009a_brain_overlay.png",
        colors,
        f"{package.spec.name} on ICBM152 2009a (held out): {brain}; dashed: reference",
        names,
        pair.label,
    )
    return {
        "model": str(package.path),
        "input": str(input_path),
        "input_source": pair.source,
        "reference": str(reference_path),
        "labelmap": summary["output"],
        "overlay_png": str(overlay),
        "metrics": metrics,
        "seconds": round(seconds, 2),
        "timings_s": summary["timings_s"],
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meddl.demo",
        description="Segment the held-out ICBM152 2009a T1 with the bundled brain-t1 model; print Dice/HD95.",
    )
    parser.add_argument("--output", type=Path, default=Path("demo-output"), help="folder for the outputs")
    parser.add_argument("--model", type=Path, default=None, help="model package (default: the bundled brain-t1)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        result = run_demo(args.output, args.model, args.device)
    except MedDLError as error:
        print(f"meddl demo: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model      {result['model']}")
    print(f"input      {result['input']}  ({result['input_source']}; never used in training)")
    for name, values in result["metrics"].items():
        print(f"{name:10s} Dice {values['dice']:.4f}   HD95 {values['hd95_mm']:.2f} mm")
    print(f"time       {result['seconds']:.1f} s  {result['timings_s']}")
    print(f"labelmap   {result['labelmap']}")
    print(f"overlay    {result['overlay_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
