"""Heads rolled, turned about the vertical or pitched between quarter turns whose header lost the orientation: the
turn the orientation check keeps and the brain it draws, and, upside down, the same with
``orientation_check.upright_min_gain`` at 0 (a turn whose brain sits high must then be at least as sure as the head
as it lies). Prints Dice / HD95, the turn and the count that meet the targets.

    nice .venv/bin/python benchmarks/rolled_lost_orientation.py [--model DIR] [--threads 2]

Colin27 (the real head) and nimare's 1 mm copy of the FSL template are rotated 30 and 45 deg about the front-back
axis (a roll), 30 and 45 about the vertical, 45 about the left-right axis, and 30 and 30 about the first two
together, acquired on an axis-aligned 1 mm grid (``brain_stress.acquire``), then their voxels are turned face up,
upside down and onto a side with the header left as it was (``brain_stress.lost_orientation``). The head as
acquired, header intact, is segmented too: the figure a turn that finds it upright should give again.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from brain_stress import acquire  # noqa: E402
from cut_lost_orientation import LOST_ORIENTATIONS, package_and_heads, print_lost_headers, print_met  # noqa: E402

# A name and the rotation about the left-right, front-back and vertical axes (deg, brain_stress.acquire's order).
ROTATIONS_DEG = (
    ("rolled 30 deg", (0.0, 30.0, 0.0)),
    ("rolled 45 deg", (0.0, 45.0, 0.0)),
    ("turned 30 deg about the vertical", (0.0, 0.0, 30.0)),
    ("turned 45 deg about the vertical", (0.0, 0.0, 45.0)),
    ("pitched 45 deg", (45.0, 0.0, 0.0)),
    ("rolled and turned 30 deg", (0.0, 30.0, 30.0)),
)


def main(argv=None) -> int:
    import numpy as np

    package, heads = package_and_heads(argv, __doc__.split("\n\n")[0])
    orienting = package.spec.input.get("orientation_check") or {}
    others = {}  # upside down, the package also with upright_min_gain 0 where it sets a value below 0
    if float(orienting.get("upright_min_gain", 0.0)) < 0.0:
        no_allowance = copy.deepcopy(package)
        no_allowance.spec.input["orientation_check"]["upright_min_gain"] = 0.0
        others = {"upside down": [("upright_min_gain 0", no_allowance)]}

    met = {"package": [0, 0], "upright_min_gain 0": [0, 0]}  # meets the targets, measured
    for pair in heads:
        for rotation_name, rotation in ROTATIONS_DEG:
            rotated, rotated_label = acquire(pair, rotation, (1.0, 1.0, 1.0), np.eye(3))
            title = f"{pair.name} {rotation_name}"
            print_lost_headers(title, rotated, rotated_label, LOST_ORIENTATIONS, package, others, met)
    print_met(met)
    return 0


if __name__ == "__main__":
    sys.exit(main())
