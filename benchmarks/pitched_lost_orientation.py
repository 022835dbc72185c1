"""Heads pitched in the scanner whose header lost the orientation: the turn the orientation check keeps and the brain it
draws, with the package's settings and with the twin told apart by the face alone (without
``orientation_check.base_share``). Prints Dice / HD95, the turn and the count that meet the targets and keep the
head facing forward.

    nice .venv/bin/python benchmarks/pitched_lost_orientation.py [--model DIR] [--threads 2] [--spacing 1.0]

Colin27 (the real head) and nimare's 1 mm copy of the FSL template are pitched (positive chin up, as
``brain_stress.py``'s probes) and acquired on an axis-aligned grid at ``--spacing`` mm (``brain_stress.acquire``),
then their voxels are turned face up and onto a side with the header left as it was
(``brain_stress.lost_orientation``). The head as acquired, header intact, is segmented too: the figure a turn that
finds the head upright should give again.
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

from brain_stress import DICE_TARGET, HD95_TARGET_MM, acquire, lost_orientation  # noqa: E402
from segment_speed import BUNDLED_MODEL  # noqa: E402

PITCHES_DEG = (-30.0, -20.0, -10.0, 15.0)
# A name, the array axes of the turn and quarter turns (as orientation_check.py), and the turn that puts it upright.
LOST_ORIENTATIONS = (
    ("face up", (0, 1), 1, "top back, face up"),
    ("on its side", (0, 2), 1, "top to the left, face forward"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=1.0, help="the acquisition grid's spacing (mm)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from meddl.data import colin27_brain_pair, fsl_mni152_brain_pairs
    from meddl.infer import segment_image
    from meddl.metrics import segmentation_metrics
    from meddl.models import load_model

    torch.set_num_threads(args.threads)
    package = load_model(args.model, "cpu")
    orienting = package.spec.input.get("orientation_check") or {}
    if orienting.get("base_share") is None:
        print(f"{args.model}: the package tells a turn's twin by the face alone; nothing to compare")
        return 2
    by_face = copy.deepcopy(package)
    del by_face.spec.input["orientation_check"]["base_share"]
    nimare = next(pair for pair in fsl_mni152_brain_pairs() if pair.name == "fsl-mni152-1mm-nimare")

    def scored(result, label) -> tuple:
        brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, label.spacing)["brain"]
        return brain["dice"], brain["hd95_mm"], brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM

    print(f"torch {torch.__version__}, {args.threads} threads; {args.model}; acquired at {args.spacing:g} mm")
    kept = {"package": [0, 0], "face alone": [0, 0]}  # meets the targets, facing forward
    cases = 0
    for pair in (colin27_brain_pair(), nimare):
        for pitch in PITCHES_DEG:
            upright, upright_label = acquire(pair, (pitch, 0.0, 0.0), (args.spacing,) * 3, np.eye(3))
            dice, hd95, _ = scored(segment_image(upright, package, device="cpu"), upright_label)
            print(f"{pair.name} pitched {pitch:+.0f} deg, header intact: {dice:.4f} / {hd95:.2f} mm")
            for how, axes, turns, upright_turn in LOST_ORIENTATIONS:
                image, label = lost_orientation(upright, upright_label, axes, turns)
                cases += 1
                figures = []
                for name, variant in (("package", package), ("face alone", by_face)):
                    result = segment_image(image, variant, device="cpu")
                    dice, hd95, met = scored(result, label)
                    forward = result.orientation_turn == upright_turn
                    kept[name][0] += met
                    kept[name][1] += forward
                    figures.append(f"{name} {dice:.4f} / {hd95:.2f} mm, turn: {result.orientation_turn}")
                print(f"  {how}: " + "; ".join(figures))
    for name, (met, forward) in kept.items():
        print(f"{name}: {met} of {cases} meet the targets, {forward} of {cases} turned upright facing forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
