"""``meddl train``: a model package from images + labelmaps (a folder pair or a JSON datalist).

Validation split, per-epoch validation Dice, best-checkpoint keeping, fixed seed and a resumable
checkpoint come from :func:`meddl.train.train_segmentation`. Every input problem (missing file, a label
that does not lie on its image, label values the spec does not name) is one line naming the pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from meddl.errors import EXIT_OK, InputError, ModelError
from meddl.progress import CancelToken

__all__ = ["register", "run", "default_spec", "datalist_from_folders"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmentation model package from images and labelmaps",
        description="Train a segmentation model package (model.json + weights.safetensors) from images and "
        "reference labelmaps: a folder pair matched by name (case1.nii.gz <-> case1.nii.gz / case1_seg.nrrd) "
        'or a JSON datalist ([{"image": ..., "label": ...}] or MONAI\'s {"training": [...]}). Keeps the '
        "checkpoint with the best validation Dice; a stopped run continues when started again.",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model, 130 cancelled (the checkpoint is kept).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder (or file) of training images; needs --labels")
    source.add_argument("--datalist", type=Path, help="JSON datalist of image/label pairs")
    parser.add_argument("--labels", type=Path, help="folder (or file) of labelmaps matching --images")
    parser.add_argument("--output", required=True, type=Path, help="package folder to write (must not exist)")
    parser.add_argument("--config", type=Path, help="model.json-style spec (default: small 3D UNet, labels found)")
    parser.add_argument("--epochs", type=int, default=20, help="default: 20")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="default: one per training case")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop resumably after this wall time")
    parser.add_argument("--init-from", type=Path, help="package whose weights start the training (fine-tuning)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start afresh")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="network forward pass in bfloat16 (faster on CPUs with native bfloat16); auto: bf16 where the CPU has it",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile: needs a C++ compiler and about a minute first, then faster float32 steps "
        "on a CPU (without a compiler the run says so and trains as it is)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="above 0 (0.995, say): validate and write a moving average of the weights, each step moving it "
        "1 - decay of the way to the network's; smoother, less tied to the last steps' draws (default: off)",
    )
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")
    parser.set_defaults(func=run)


def datalist_from_folders(images: Path, labels: Path) -> List[Dict[str, str]]:
    """Pair ``images`` with ``labels`` by name; an image without a labelmap (or the reverse) is an error."""
    from meddl.report import case_name, list_volumes, match_cases

    pairs, lonely_images, lonely_labels = match_cases(list_volumes(images), list_volumes(labels))
    for _, image, label in pairs:  # one file each is paired whatever the names; for training the names must agree
        if images.is_dir() and not _names_match(case_name(image), case_name(label)):
            raise InputError(f"no labelmap in {labels} matches this image (found only {label.name})", image)
    if lonely_images:
        raise InputError(f"no labelmap in {labels} matches this image", lonely_images[0])
    if lonely_labels:
        raise InputError(f"no image in {images} matches this labelmap", lonely_labels[0])
    if not pairs:
        raise InputError("no image/label pairs found", images)
    return [{"image": str(image), "label": str(label)} for _, image, label in pairs]


def _names_match(image_case: str, label_case: str) -> bool:
    image_case, label_case = image_case.lower(), label_case.lower()
    if label_case == image_case:
        return True
    return label_case.startswith(image_case + "_") or image_case.startswith(label_case + "_")


def default_spec(datalist: List[Dict[str, str]], name: str):
    """A small 3D UNet at the first image's spacing, with one label per value found in the first labelmap."""
    import numpy as np

    from meddl.io import read_image
    from meddl.models import unet_segmentation_spec

    first_image = read_image(datalist[0]["image"])
    first_label = read_image(datalist[0]["label"])
    values = sorted({0, *(int(v) for v in np.unique(first_label.array))})
    palette = [[0.0, 0.0, 0.0], [0.9, 0.3, 0.2], [0.2, 0.7, 0.3], [0.2, 0.4, 0.9], [0.9, 0.8, 0.2], [0.7, 0.3, 0.8]]
    labels = [
        {"value": v, "name": "background" if v == 0 else f"label_{v}", "color": palette[i % len(palette)]}
        for i, v in enumerate(values)
    ]
    return unet_segmentation_spec(
        name,
        labels,
        spacing=[round(float(s), 4) for s in first_image.spacing],
        patch_size=(64, 64, 64),
        channels=(8, 16, 32, 64),
        num_res_units=1,
        postprocess={"largest_component": False, "fill_holes": False},
        inference={"overlap": 0.25, "tta_flips": False, "sw_batch_size": 1},
    )


def _check_files(datalist: List[Dict[str, str]]) -> None:
    for entry in datalist:
        for key in ("image", "label"):
            if not Path(entry[key]).exists():
                raise InputError(f"{key} of pair ({entry['image']}, {entry['label']}) does not exist", entry[key])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from meddl.cli import emit
    from meddl.cli.segment import cancel_on_interrupt
    from meddl.models import ModelSpec
    from meddl.train import load_datalist, train_segmentation

    if args.images is not None:
        if args.labels is None:
            raise InputError("--images needs --labels (a folder of labelmaps matching the images by name)")
        datalist = datalist_from_folders(args.images, args.labels)
    else:
        datalist = load_datalist(args.datalist)
    _check_files(datalist)
    if args.config is not None:
        if not args.config.is_file():
            raise ModelError("no such spec file", args.config)
        try:
            spec = ModelSpec.from_json(json.loads(args.config.read_text(encoding="utf-8")), args.config)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"spec is not valid JSON ({error})", args.config) from None
    else:
        spec = default_spec(datalist, args.output.name)

    show = sys.stderr.isatty() and not getattr(args, "json", False)
    bar = tqdm(
        total=1000,
        file=sys.stderr,
        disable=not show,
        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
    )

    def progress(fraction: float, message: str) -> None:
        bar.n = int(fraction * 1000)
        bar.set_description_str(message[:60], refresh=False)
        bar.refresh()

    token = CancelToken()
    try:
        with cancel_on_interrupt(token):
            package = train_segmentation(
                spec,
                datalist,
                args.output,
                epochs=args.epochs,
                val_fraction=args.val_fraction,
                seed=args.seed,
                progress=progress,
                cancel=token,
                max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                init_from=args.init_from,
                resume=not args.no_resume,
                augment=not args.no_augment,
                steps_per_epoch=args.steps_per_epoch,
                device=None if args.device == "auto" else args.device,
                precision=args.precision,
                compile_network=args.compile,
                ema_decay=args.ema_decay,
            )
    finally:
        bar.close()
    model_json = json.loads((package / "model.json").read_text(encoding="utf-8"))
    training, metrics = model_json["training"], model_json["metrics"]["validation"]
    result = {
        "package": str(package),
        "complete": training["complete"],
        "epochs_done": training["epochs_done"],
        "steps_done": training["steps_done"],
        "precision": training["precision"],
        "compiled_steps": training["compiled_steps"],
        "ema_decay": training.get("ema_decay", 0.0),
        "validation": metrics,
        "wall_time_s": model_json["provenance"]["wall_time_s"],
    }
    dice = ", ".join(f"{name} {value:.3f}" for name, value in metrics["dice"].items())
    state = "done" if training["complete"] else "stopped early (run the same command again to continue)"
    emit(args, result, f"{package}: {state}; best validation Dice (epoch {metrics['best_epoch']}): {dice}")
    return EXIT_OK
