"""Older-subject grid: the bundled brain model on scans that bring many of an older subject's differences at once.

    nice .venv/bin/python benchmarks/older_subjects.py [--model DIR] [--draws 8] [--seed 4242 777] [--threads 1]

The hidden real scans #11 is scored on are single subjects from other scanners: noisier than the averaged templates,
often from older heads, under a phased-array coil, in any pose and with the neck in the field of view. No stress case
or probe brings all of that at once. Each seed draws ``--draws`` scans from each of two heads with skull, nimare's 1 mm
copy of the FSL template and Colin27 (held out of training; left out with a note where mricron-data is missing),
under :func:`brain_stress.older_subject_scans`: size, atrophy on the skull base, pose, neck, acquisition grid, helmet
coil, bias field and Rician noise, every figure in the draw's name. Each scan is segmented in this process
(``meddl.infer.segment_image``, CPU) and scored against its brain (Dice, HD95); a scan the engine refuses counts as a
miss and prints the refusal. The last line says how many met Dice ≥ 0.95 and HD95 ≤ 5 mm. It never fails on a
target.

An engine change is judged by running this in two checkouts on the same seeds: the draws depend only on the seed and
the installed data, so both engines see the same volumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from brain_stress import DICE_TARGET, HD95_TARGET_MM, older_subject_scans  # noqa: E402

import meddl  # noqa: E402
from meddl.data import colin27_brain_pair, fsl_mni152_brain_pairs  # noqa: E402
from meddl.errors import InputError  # noqa: E402
from meddl.infer import configure_threads, segment_image  # noqa: E402
from meddl.metrics import segmentation_metrics  # noqa: E402
from meddl.models import ModelPackage, load_model  # noqa: E402

__all__ = ["main"]


def grid_sources() -> List:
    """(name, pair) of the grid's heads: nimare's 1 mm FSL template with skull, and Colin27 where it is installed."""
    sources = [("nimare", {p.name: p for p in fsl_mni152_brain_pairs()}["fsl-mni152-1mm-nimare"])]
    try:
        sources.append(("Colin27", colin27_brain_pair()))
    except InputError as error:
        print(f"note: no Colin27 draws: {error}")
    return sources


def score_draws(package: ModelPackage, sources: List, seed: int, draws: int) -> List[Dict]:
    """Each draw of ``seed`` from ``sources`` (:func:`grid_sources`) segmented by ``package`` and scored; prints a line
    as each one ends."""
    rows = []
    for index, (name, scan, label) in enumerate(older_subject_scans(sources, draws, seed)):
        start = time.perf_counter()
        row: Dict = {"seed": seed, "index": index, "name": name}
        try:
            result = segment_image(scan, package, device="cpu")
        except InputError as error:
            row.update(refused=str(error), met=False)
        else:
            brain = segmentation_metrics(
                result.labelmap.array, (label.array > 0).astype(np.uint8), {1: "brain"}, scan.spacing
            )["brain"]
            row.update(dice=round(float(brain["dice"]), 4), hd95_mm=round(float(brain["hd95_mm"]), 2))
            row["met"] = row["dice"] >= DICE_TARGET and row["hd95_mm"] <= HD95_TARGET_MM
        row["seconds"] = round(time.perf_counter() - start, 1)
        figures = f"refused: {row['refused']}" if "refused" in row else f"{row['dice']:.4f} / {row['hd95_mm']:.2f} mm"
        print(
            f"seed {seed} #{index:2d} {'met ' if row['met'] else 'MISS'} {figures} ({row['seconds']} s)  {name}",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "Resources" / "models" / "brain-t1")
    parser.add_argument("--draws", type=int, default=8, help="draws of each head per seed")
    parser.add_argument("--seed", type=int, nargs="+", default=[4242, 777])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: MEDDL_NUM_THREADS, else all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every draw's figures here")
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    engine = Path(meddl.__file__).parent
    print(f"load average before: {os.getloadavg()[0]:.1f}; model {args.model}; engine {engine}; threads {threads}")
    package, sources = load_model(args.model), grid_sources()
    rows = [row for seed in args.seed for row in score_draws(package, sources, seed, args.draws)]
    met = sum(row["met"] for row in rows)
    refused = sum("refused" in row for row in rows)
    print(
        f"met the targets (Dice >= {DICE_TARGET}, HD95 <= {HD95_TARGET_MM} mm): {met} of {len(rows)}; refused {refused}"
    )
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "seeds": args.seed, "draws": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
