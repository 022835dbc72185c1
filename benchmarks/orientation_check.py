"""What the orientation check costs, and what it buys, on a 256x256x160 head upright and with its orientation lost:
`segment_image` with the package's check against the same package without it. Prints time ratios, windows, the turn
kept and Dice / HD95 against the head's own mask.

    nice .venv/bin/python benchmarks/orientation_check.py [--model DIR] [--threads 2] [--repeats 2]

The volume is segment_speed.py's: the FSL MNI152 1 mm T1 with skull (nimare) on a 256x256x160 grid at 1x1x1.2 mm,
with nimare's brain mask resampled onto the same grid (nearest). "Face up" turns its voxels a quarter turn in the
plane of the first two array axes and leaves the header as it was (``brain_stress.lost_orientation``), as a file that
lost its orientation shows a head; "upside down", "face down" and "on its side" turn it two and three quarters so, and
a quarter in the plane of the first and last. Each timing is the best of ``--repeats`` runs after a warm-up, the runs
taking turns (``segment_speed.interleaved``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from brain_stress import DICE_TARGET, HD95_TARGET_MM, lost_orientation  # noqa: E402
from segment_speed import BUNDLED_MODEL, interleaved, t1_on_grid  # noqa: E402

# How a header that lost the orientation shows the head: a name, the array axes of the turn, quarter turns.
LOST_ORIENTATIONS = (
    ("face up", (0, 1), 1),
    ("upside down", (0, 1), 2),
    ("face down", (0, 1), 3),
    ("on its side", (0, 2), 1),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from meddl.data import fsl_mni152_brain_pairs
    from meddl.infer import segment_image
    from meddl.metrics import segmentation_metrics
    from meddl.models import load_model
    from meddl.transforms import resample_to_grid

    torch.set_num_threads(args.threads)
    package = load_model(args.model, "cpu")
    if not package.spec.input.get("orientation_check"):
        print(f"{args.model}: the package runs no orientation check; nothing to measure")
        return 2
    unchecked = copy.deepcopy(package)
    del unchecked.spec.input["orientation_check"]

    upright = t1_on_grid()
    nimare = next(pair for pair in fsl_mni152_brain_pairs() if pair.name == "fsl-mni152-1mm-nimare")
    mask = resample_to_grid(nimare.label, upright, "nearest")
    heads = {"upright": (upright, mask)}
    heads.update({name: lost_orientation(upright, mask, axes, turns) for name, axes, turns in LOST_ORIENTATIONS})

    print(f"torch {torch.__version__}, {args.threads} threads; {args.model}")
    print("volume: nimare 1 mm T1 on 256x256x160 at 1x1x1.2 mm, against nimare's mask on the same grid")
    for name, (image, label) in heads.items():
        runs = interleaved(
            args.repeats,
            {
                "check": lambda image=image: segment_image(image, package, device="cpu"),
                "no check": lambda image=image: segment_image(image, unchecked, device="cpu"),
            },
        )
        (checked_s, checked), (unchecked_s, plain) = runs["check"], runs["no check"]
        scores = []
        for result in (checked, plain):
            brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, image.spacing)["brain"]
            met = brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM
            scores.append(f"{brain['dice']:.4f} / {brain['hd95_mm']:.2f} mm ({'meets' if met else 'misses'})")
        print(
            f"{name}: with the check {checked_s:.2f} s, {checked.windows} windows, turn: {checked.orientation_turn}, "
            f"{scores[0]}; without {unchecked_s:.2f} s, {plain.windows} windows, {scores[1]} -> "
            f"{checked_s / unchecked_s:.2f}x the time"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
