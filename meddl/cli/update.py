"""``meddl update``: fine-tune a candidate on new corrections, gate it, promote or reject it."""

from __future__ import annotations

import argparse
import sys

from meddl.cli import emit

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "update",
        help="learn from the new corrections (gated; resumable; Ctrl-C keeps progress)",
        description="Train a candidate from the champion on corrections not yet learned, with replay and "
        "distillation against forgetting; promote it only if it passes the model's validation gate.",
    )
    parser.add_argument("--model", "--home", dest="home", required=True, help="model home folder")
    parser.add_argument("--max-steps", type=int, default=200, help="optimisation steps (default 200)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="wall-time bound of training (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--method",
        choices=("full", "replay", "naive"),
        default="full",
        help="full = replay + distillation + changed-voxel weighting (default)",
    )
    parser.add_argument("--ewc", type=float, default=0.0, help="EWC weight (default 0: off)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    parser.set_defaults(func=run)


def _progress(args: argparse.Namespace):
    """tqdm on a terminal; one line per message otherwise (logs, the worker, tests watching phases)."""
    if sys.stderr.isatty() and not args.json:
        from tqdm import tqdm

        bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")

        def report(fraction: float, message: str) -> None:
            bar.n = int(fraction * 1000)
            bar.set_description_str(message[:50])
            bar.refresh()

        return report, bar.close

    def report_line(fraction: float, message: str) -> None:
        print(f"update {fraction * 100:5.1f}% {message}", file=sys.stderr, flush=True)

    return report_line, lambda: None


def run(args: argparse.Namespace) -> int:
    from meddl.continual import run_update
    from meddl.progress import CancelToken

    report, close = _progress(args)
    try:
        result = run_update(
            args.home,
            report,
            CancelToken(),
            args.max_steps,
            args.max_seconds,
            args.seed,
            {"method": args.method, "ewc_weight": args.ewc},
            args.device,
        )
    finally:
        close()
    if result["status"] in ("nothing_to_do", "already_decided"):
        emit(args, result, result["message"])
        return 0
    gate = result["gate"]
    lines = [
        f"{result['status']}: candidate {result['candidate']} from {result['parent']} after {result['steps']} "
        f"steps on {len(result['corrections'])} corrections; champion is {result['champion']}"
    ]
    lines += [
        f"  regression site {site}: Dice {f['champion_dice']:.4f} -> {f['candidate_dice']:.4f}"
        for site, f in gate["regression"].items()
    ]
    corrections = gate["corrections"]
    if corrections["cases"]:
        lines.append(
            f"  corrections ({corrections['basis']}): {corrections.get('metric', 'Dice')} "
            f"{corrections['champion_dice']:.4f} -> {corrections['candidate_dice']:.4f}"
        )
        if corrections.get("candidate_accuracy") is not None:  # a classifier's gate also weighs accuracy
            lines.append(
                f"  corrections accuracy {corrections['champion_accuracy']:.3f} -> "
                f"{corrections['candidate_accuracy']:.3f}"
            )
    lines += [f"  rejected because {reason}" for reason in gate["reasons"]]
    lines += [f"  warning: {warning}" for warning in result.get("warnings", [])]
    emit(args, result, "\n".join(lines))
    return 0
