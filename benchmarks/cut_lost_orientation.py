"""Heads the field of view cuts whose header lost the orientation: the turn the orientation check keeps and the brain it
draws, and, where the head lies face up with its back cut, the same without ``orientation_check.cut_base_max_offset_mm``
(the cut then reads as a cut base and the check does not run). Prints Dice / HD95, the turn and the count that meet
the targets.

    nice .venv/bin/python benchmarks/cut_lost_orientation.py [--model DIR] [--threads 2]

Colin27 (the real head) and nimare's 1 mm copy of the FSL template, moved by the probes' pose
(``brain_stress.PROBE_POSE_DEG``), are cut 25 % into the brain at the front or the back, 20 % at the base or 10 % at
the top (``brain_stress.cut_brain``, ``cut_superior``), then their voxels are turned face up, upside down and onto a
side with the header left as it was (``brain_stress.lost_orientation``); back cuts of 10, 30 and 40 % are turned face
up as well. The cut head with its header intact is segmented too: the figure a turn that finds it upright should give
again.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from brain_stress import (  # noqa: E402
    AXIAL,
    DICE_TARGET,
    HD95_TARGET_MM,
    PROBE_POSE_DEG,
    acquire,
    cut_brain,
    cut_superior,
    lost_orientation,
)
from segment_speed import BUNDLED_MODEL  # noqa: E402

# A name, the array axes of the turn and quarter turns (as orientation_check.py).
LOST_ORIENTATIONS = (("face up", (0, 1), 1), ("upside down", (0, 1), 2), ("on its side", (0, 2), 1))
# A name, how the field of view cuts the brain, and the lost orientations measured.
CUTS = (
    ("front 25 %", lambda image, label: cut_brain(image, label, 1, 0.25, from_end=False), LOST_ORIENTATIONS),
    ("back 25 %", lambda image, label: cut_brain(image, label, 1, 0.25, from_end=True), LOST_ORIENTATIONS),
    ("base 20 %", lambda image, label: cut_superior(image, label, 0.2, top=False), LOST_ORIENTATIONS),
    ("top 10 %", lambda image, label: cut_superior(image, label, 0.1, top=True), LOST_ORIENTATIONS),
) + tuple(
    (
        f"back {share:.0%}",
        lambda image, label, share=share: cut_brain(image, label, 1, share, from_end=True),
        LOST_ORIENTATIONS[:1],
    )
    for share in (0.1, 0.3, 0.4)
)


def scored(image, label, package) -> Tuple[str, bool]:
    """``package``'s brain on ``image`` against ``label`` (brain 1): Dice / HD95 and the turn kept, in words, and
    whether it meets the targets."""
    from meddl.infer import segment_image
    from meddl.metrics import segmentation_metrics

    result = segment_image(image, package, device="cpu")
    brain = segmentation_metrics(result.labelmap.array, label.array, {1: "brain"}, label.spacing)["brain"]
    met = brain["dice"] >= DICE_TARGET and brain["hd95_mm"] <= HD95_TARGET_MM
    return f"{brain['dice']:.4f} / {brain['hd95_mm']:.2f} mm, turn: {result.orientation_turn}", met


def scored_line(image, label, variants: Sequence[Tuple[str, object]], met: Dict[str, List[int]]) -> str:
    """Each ``(name, package)`` of ``variants`` on ``image`` (:func:`scored`), in one line; ``met[name]`` counts
    [meets the targets, measured]."""
    line = []
    for name, variant in variants:
        figures, meets = scored(image, label, variant)
        met[name][0] += meets
        met[name][1] += 1
        line.append(f"{name} {figures}{'' if meets else ' (misses)'}")
    return "; ".join(line)


def print_lost_headers(
    title: str,
    image,
    label,
    orientations: Sequence[Tuple[str, Tuple[int, int], int]],
    package,
    others: Dict[str, Sequence[Tuple[str, object]]],
    met: Dict[str, List[int]],
) -> None:
    """``package`` on the head ``image`` with its header intact, then on each of ``orientations`` a lost header shows
    it in (:func:`brain_stress.lost_orientation`), with the ``(name, package)`` variants ``others`` gives that
    orientation's name beside it: one line each."""
    figures, _ = scored(image, label, package)
    print(f"{title}, header intact: {figures}")
    for how, axes, turns in orientations:
        lost, lost_label = lost_orientation(image, label, axes, turns)
        variants = [("package", package), *others.get(how, ())]
        print(f"  {how}: {scored_line(lost, lost_label, variants, met)}", flush=True)


def print_met(met: Dict[str, List[int]]) -> None:
    """How many of the inputs each variant measured meet the targets (:func:`scored_line`'s counts)."""
    for name, (meets, measured) in met.items():
        if measured:
            print(f"{name}: {meets} of {measured} meet the targets")


def package_and_heads(argv: Optional[Sequence[str]], description: str) -> Tuple[object, list]:
    """The lost-orientation benchmarks' start: ``--model`` and ``--threads`` read from ``argv``, torch set to that
    many threads, the package loaded and named in the first line printed; with the heads they move, Colin27 and
    nimare's 1 mm copy (labels: brain 1, else 0)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from meddl.data import colin27_brain_pair, fsl_mni152_brain_pairs
    from meddl.models import load_model

    torch.set_num_threads(args.threads)
    package = load_model(args.model, "cpu")
    nimare = next(pair for pair in fsl_mni152_brain_pairs() if pair.name == "fsl-mni152-1mm-nimare")
    print(f"torch {torch.__version__}, {args.threads} threads; {args.model}")
    return package, [colin27_brain_pair(), nimare]


def main(argv=None) -> int:
    package, heads = package_and_heads(argv, __doc__.split("\n\n")[0])
    orienting = package.spec.input.get("orientation_check") or {}
    unlimited = None
    if orienting.get("cut_base_max_offset_mm") is not None:
        unlimited = copy.deepcopy(package)
        del unlimited.spec.input["orientation_check"]["cut_base_max_offset_mm"]

    met = {"package": [0, 0], "no offset limit": [0, 0]}  # meets the targets, measured
    for pair in heads:
        moved, moved_label = acquire(pair, PROBE_POSE_DEG, pair.image.spacing, AXIAL)  # labels: brain 1, else 0
        for cut_name, cut, orientations in CUTS:
            cut_image, cut_label = cut(moved, moved_label)
            back_cut = unlimited is not None and cut_name.startswith("back")
            others = {"face up": [("no offset limit", unlimited)]} if back_cut else {}
            title = f"{pair.name} cut {cut_name}"
            print_lost_headers(title, cut_image, cut_label, orientations, package, others, met)
    print_met(met)
    return 0


if __name__ == "__main__":
    sys.exit(main())
