"""``meddl evaluate``: per-case, per-label Dice, IoU, HD95, ASD, sensitivity, specificity, precision.

Segments each image with the model (or scores existing labelmaps with ``--predictions``), matches
images to reference labelmaps by name, refuses a pair whose grids differ (one line naming both files),
and writes ``metrics.csv``, ``metrics.json``, ``summary.md`` (mean ± sd per label) and
``worst_case.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meddl.cli import error_line
from meddl.errors import EXIT_OK, EXIT_PARTIAL
from meddl.progress import CancelToken

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model (or existing labelmaps) against reference labelmaps",
        description="Segment every image with MODEL (or take --predictions), match each to its reference "
        "labelmap by name (case1.nii.gz ↔ case1.nii.gz, case1_seg.nii.gz, case1_mask.nrrd ...), and write "
        "per-case per-label metrics (CSV, JSON), a Markdown summary with mean ± sd and an overlay PNG of "
        "the worst case into OUTPUT.",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model, 5 some cases failed, 130 cancelled.",
    )
    parser.add_argument("--model", help="model package folder or model home (needed unless --predictions)")
    parser.add_argument("--images", required=True, type=Path, help="image file or folder")
    parser.add_argument("--labels", required=True, type=Path, help="reference labelmap file or folder")
    parser.add_argument("--output", required=True, type=Path, help="folder for the reports")
    parser.add_argument("--predictions", type=Path, help="score these labelmaps instead of segmenting")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tta", action="store_const", const=True, default=None, help="flip test-time augmentation")
    parser.add_argument("--force-modality", action="store_true", help="run even when the modality differs")
    parser.add_argument("--no-overlay", action="store_true", help="skip the worst-case PNG")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meddl.cli import emit
    from meddl.cli.segment import _Bars, cancel_on_interrupt, resolve_model_path
    from meddl.report import evaluate

    model = resolve_model_path(args.model) if args.model else None
    device = None if args.device == "auto" else args.device
    token = CancelToken()
    bars = _Bars(sys.stderr.isatty() and not getattr(args, "json", False), 1)
    try:
        with cancel_on_interrupt(token):
            report = evaluate(
                args.images,
                args.labels,
                args.output,
                model=model,
                predictions=args.predictions,
                device=device,
                tta=args.tta,
                force_modality=args.force_modality,
                progress=bars.case_progress("evaluate"),
                cancel=token,
                overlay=not args.no_overlay,
            )
    finally:
        bars.close()
    lines = [f"evaluated {len(report['cases'])} cases into {args.output}"]
    for label, metrics in report["summary"].items():
        dice, hd95 = metrics["dice"], metrics["hd95_mm"]
        lines.append(
            f"  {label}: Dice {dice['mean']:.3f} ± {dice['sd']:.3f}, HD95 {hd95['mean']:.2f} ± {hd95['sd']:.2f} mm"
            + (f" ({hd95['n_nonfinite']} undefined)" if hd95["n_nonfinite"] else "")
        )
    if report["worst_case"]:
        lines.append(
            f"  worst case: {report['worst_case']['case']} (mean Dice {report['worst_case']['mean_dice']:.3f})"
        )
    lines.append(f"  reports: {', '.join(Path(p).name for p in report['files'].values())}")
    from meddl.metrics import json_safe

    emit(args, json_safe(report), "\n".join(lines))
    if report["failures"]:
        print(f"meddl evaluate: {len(report['failures'])} cases failed:", file=sys.stderr)
        for failure in report["failures"]:
            print(f"  {error_line(failure['error'])}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
