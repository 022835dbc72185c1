"""``meddl correct``: submit a corrected labelmap or class label to a model home (or list / exclude / delete
corrections)."""

from __future__ import annotations

import argparse

from meddl.cli import emit
from meddl.errors import InputError

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "correct",
        help="submit a corrected labelmap (or the right class) so the model can learn from it",
        description="Store a correction durably (checksummed, indexed, audited) in a model home. "
        "With --exclude or --delete, take a correction out of future updates (audited).",
    )
    parser.add_argument("--model", "--home", dest="home", required=True, help="model home folder")
    parser.add_argument("image", nargs="?", help="the volume that was segmented or classified")
    parser.add_argument("labelmap", nargs="?", help="the corrected labelmap (on the image's grid)")
    parser.add_argument("--image", dest="image_option", metavar="IMAGE", help="the image (instead of IMAGE)")
    parser.add_argument("--label", metavar="CLASS", help="classifier homes: the right class name for the image")
    parser.add_argument("--predicted", metavar="CLASS", help="classifier homes: the class the model predicted")
    parser.add_argument("--prediction", help="the labelmap the model produced (lets the update weight the changes)")
    parser.add_argument("--site", default="default", help="site or scanner tag (default: default)")
    parser.add_argument("--model-version", help="version that made the prediction (default: the champion)")
    parser.add_argument("--list", action="store_true", help="list the corrections")
    parser.add_argument("--exclude", metavar="ID", help="exclude a correction from future updates (kept on disk)")
    parser.add_argument("--delete", metavar="ID", help="delete a correction's files (the audit log keeps the record)")
    parser.add_argument("--reason", default="", help="why a correction is excluded or deleted")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meddl.continual import exclude_correction, list_corrections, submit_correction

    if args.list:
        rows = list_corrections(args.home, status=None)
        lines = [
            f"{r['id']}  site={r['site']}  split={r['split']}  status={r['status']}  made by {r['model_version']}"
            for r in rows
        ]
        emit(args, {"corrections": rows}, "\n".join(lines) or "no corrections")
        return 0
    if args.exclude or args.delete:
        if not args.reason:
            raise InputError("say why with --reason (it goes to the audit log)")
        result = exclude_correction(args.home, args.exclude or args.delete, args.reason, delete=bool(args.delete))
        emit(args, result, f"{result['status']} correction {result['id']}")
        return 0
    if args.image and args.image_option:
        raise InputError("give the image once: IMAGE or --image IMAGE")
    image = args.image_option or args.image
    if args.label is not None:
        if not image or args.labelmap or args.prediction:
            raise InputError("a class correction is --image IMAGE --label CLASS (no labelmap or --prediction)")
        result = submit_correction(
            args.home,
            image,
            site=args.site,
            model_version=args.model_version,
            label=args.label,
            predicted=args.predicted,
        )
        emit(
            args,
            result,
            f"stored correction {result['id']}: class {result['label']} (site {result['site']}, {result['split']})",
        )
        return 0
    if not (image and args.labelmap):
        raise InputError(
            "give IMAGE and LABELMAP, or --image IMAGE --label CLASS (or --list, --exclude ID, --delete ID)"
        )
    result = submit_correction(args.home, image, args.labelmap, args.prediction, args.site, args.model_version)
    changed = f", {result['changed_voxels']} voxels changed" if result["changed_voxels"] is not None else ""
    emit(args, result, f"stored correction {result['id']} (site {result['site']}, {result['split']}{changed})")
    return 0
