"""``meddl classify``, ``meddl train-classifier`` and ``meddl evaluate-classifier``.

* ``classify``: one image (volume file, DICOM series folder, 2D file) or a folder batch → calibrated class
  probabilities, the predicted class and, with ``--heatmap``, a Grad-CAM map on the input's exact grid.
* ``train-classifier``: a JSON datalist of ``{"image", "label": class name}`` → a calibrated package.
* ``evaluate-classifier``: a JSON datalist → metrics with bootstrap CIs and a Markdown/HTML report with PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from meddl.errors import EXIT_OK, EXIT_PARTIAL, Cancelled, InputError, MedDLError, ModelError
from meddl.progress import CancelToken, ProgressCallback

__all__ = ["register", "run_classify", "run_train", "run_evaluate", "heatmap_name"]

HEATMAP_SUFFIX = "_gradcam.nrrd"


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")


def register(subparsers) -> None:
    classify = subparsers.add_parser(
        "classify",
        help="classify an image, a DICOM series or a folder of images; Grad-CAM heat map",
        description="Classify one image (NRRD/NIfTI/MHA volume, DICOM series folder, single DICOM frame, PNG) "
        "or every image of a folder. Prints class probabilities (temperature-calibrated) and the predicted "
        "class; --heatmap writes the Grad-CAM map as a volume on the input's exact grid (2D inputs: a "
        "single-slice volume).",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model, 5 a batch in which some images failed, 130 cancelled.",
    )
    classify.add_argument("--model", required=True, help="classifier package folder (or a model home)")
    classify.add_argument("--input", required=True, type=Path, help="image file, DICOM series folder or folder")
    classify.add_argument(
        "--heatmap",
        type=Path,
        help=f"Grad-CAM output: a .nrrd/.nii.gz/.mha file (one input) or a folder (batch: <name>{HEATMAP_SUFFIX})",
    )
    classify.add_argument(
        "--slice",
        choices=("refuse", "middle"),
        default=None,
        help="what a 2D model does with a 3D volume: classify its middle slice, or refuse (default: the model's "
        "input.volume_slice)",
    )
    classify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _json_flag(classify)
    classify.set_defaults(func=run_classify)

    train = subparsers.add_parser(
        "train-classifier",
        help="train a classifier package from a datalist of images and class names",
        description="Train a MONAI classifier on DATALIST (JSON: a list of {image, label, group?}, or an object "
        "with 'training' and optionally 'validation' lists; paths relative to the file). Augmentation, "
        "class-imbalance handling, mixup, early stopping on the validation loss and temperature scaling on the "
        "validation split. Items sharing a 'group' stay on one side of the split.",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model/spec, 130 cancelled.",
    )
    train.add_argument("--datalist", required=True, type=Path)
    train.add_argument("--output", required=True, type=Path, help="new package folder (must not exist)")
    train.add_argument("--spec", type=Path, help="model.json template (classification); else a small ResNet")
    train.add_argument("--classes", nargs="+", help="class names in label order (default: sorted datalist labels)")
    train.add_argument("--name", default="classifier")
    train.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images or 3D volumes")
    train.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        help="network input, array order ([k] j i); default 64 64 (2D) or 48 48 48 (3D)",
    )
    train.add_argument("--spacing", type=float, nargs="+", help="mm, (i j [k]); default: fit the image in")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--loss", choices=("ce", "weighted_ce", "focal"), default="weighted_ce")
    train.add_argument("--balanced-sampler", action="store_true", help="equal probability per class per batch")
    train.add_argument("--mixup", type=float, default=0.2, help="mixup Beta(alpha, alpha); 0 turns it off")
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--val-fraction", type=float, default=0.2)
    train.add_argument("--patience", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-seconds", type=float)
    train.add_argument("--threads", type=int)
    train.add_argument("--slice", choices=("refuse", "middle"), default=None)
    _json_flag(train)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate-classifier",
        help="accuracy, sensitivity, specificity, F1, AUC-ROC with bootstrap CIs, ECE; Markdown/HTML report",
        description="Classify every image of DATALIST (JSON list of {image, label}, or an object whose 'test' "
        "list is used) and write report.md, report.html, roc.png, reliability.png, confusion.png, metrics.json "
        "and predictions.csv into OUTPUT.",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model, 130 cancelled.",
    )
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--datalist", required=True, type=Path)
    evaluate.add_argument("--output", required=True, type=Path, help="report folder")
    evaluate.add_argument("--section", default="test", help="list to use when the datalist is an object")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% CIs")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--slice", choices=("refuse", "middle"), default=None)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _json_flag(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def _model_path(model: str) -> Path:
    try:
        from meddl.continual import resolve_model
    except ImportError:
        return Path(model)
    return Path(resolve_model(model))


def _bar(enabled: bool, name: str):
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", file=sys.stderr, leave=False, disable=not enabled,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")  # fmt: skip
    bar.set_description_str(name[:30])

    def report(fraction: float, message: str) -> None:
        bar.n = round(100 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message[:40], refresh=False)
        bar.refresh()

    return bar, report


def _with_interrupt(token: CancelToken):
    from meddl.cli.segment import cancel_on_interrupt

    return cancel_on_interrupt(token)


def heatmap_name(source: Path) -> str:
    name = source.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".bmp",
                   ".tif", ".tiff"):  # fmt: skip
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name + HEATMAP_SUFFIX


def _probability_text(summary: Dict) -> str:
    ranked = sorted(summary["probabilities"].items(), key=lambda kv: -kv[1])
    text = f"{summary['input']}: {summary['predicted']}  (" + ", ".join(f"{k} {v:.3f}" for k, v in ranked) + ")"
    if summary.get("heatmap"):
        text += f"  heat map: {summary['heatmap']}"
    return text


def run_classify(args: argparse.Namespace) -> int:
    from meddl.startup import import_engine

    source: Path = args.input
    if not source.exists():  # said before the seconds of importing torch and MONAI
        raise InputError("no such file or folder", source)
    import_engine()
    from meddl.classify.infer import classify_file, list_batch_inputs, load_classifier
    from meddl.cli import emit
    from meddl.infer import select_device

    device = select_device(args.device)
    package = load_classifier(_model_path(args.model), device)
    show = sys.stderr.isatty() and not getattr(args, "json", False)
    token = CancelToken()
    cases = list_batch_inputs(source) if source.is_dir() else None

    def classify_one(case: Path, heatmap: Optional[Path], progress: ProgressCallback) -> Dict:
        return classify_file(package, case, heatmap, progress, token, device, args.slice)

    if cases is None:
        heatmap = args.heatmap
        if heatmap is not None and heatmap.is_dir():
            heatmap = heatmap / heatmap_name(source)
        bar, progress = _bar(show, source.name)
        try:
            with _with_interrupt(token):
                summary = classify_one(source, heatmap, progress)
        finally:
            bar.close()
        emit(args, summary, _probability_text(summary))
        return EXIT_OK

    if args.heatmap is not None:
        if args.heatmap.exists() and not args.heatmap.is_dir():
            raise InputError("a batch needs a heat-map folder, and this is a file", args.heatmap)
        args.heatmap.mkdir(parents=True, exist_ok=True)
    done: List[Dict] = []
    failures: List[Dict] = []
    started = time.perf_counter()
    with _with_interrupt(token):
        for case in cases:
            bar, progress = _bar(show, case.name)
            try:
                heatmap = args.heatmap / heatmap_name(case) if args.heatmap is not None else None
                done.append(classify_one(case, heatmap, progress))
            except Cancelled:
                raise
            except MedDLError as error:
                failures.append({"input": str(case), "error": error.to_dict()})
            except Exception as error:  # noqa: BLE001 - a batch reports a surprise and goes on
                message = " ".join(f"internal error: {type(error).__name__}: {error}".split())
                failures.append({"input": str(case), "error": {"kind": "internal", "message": f"{case}: {message}"}})
            finally:
                bar.close()
    result = {
        "model": str(args.model),
        "succeeded": len(done),
        "failed": len(failures),
        "seconds": round(time.perf_counter() - started, 3),
        "cases": done,
        "failures": failures,
    }
    emit(args, result, "\n".join(_probability_text(summary) for summary in done))
    if failures:
        print(f"meddl classify: {len(failures)} of {len(cases)} images failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure['error']['message']}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    from meddl.classify.train import default_classifier_spec, load_classification_datalist, train_classifier
    from meddl.cli import emit
    from meddl.models import ModelSpec

    raw = _read_json(args.datalist)
    if isinstance(raw, dict):
        datalist = load_classification_datalist(args.datalist, "training")
        validation = load_classification_datalist(args.datalist, "validation") or None
    else:
        datalist, validation = load_classification_datalist(args.datalist), None
    if not datalist:
        raise InputError("the datalist has no training items", args.datalist)
    if args.spec is not None:
        template = _read_json(args.spec)
        spec = ModelSpec.from_json(template, args.spec)
    else:
        classes = args.classes or sorted({item["label"] for item in datalist})
        patch = args.patch_size or ([64, 64] if args.dims == 2 else [48, 48, 48])
        spec = default_classifier_spec(classes, args.dims, patch, args.spacing, name=args.name,
                                       volume_slice=args.slice or "refuse")  # fmt: skip
    show = sys.stderr.isatty() and not getattr(args, "json", False)
    bar, progress = _bar(show, "training")
    token = CancelToken()
    try:
        with _with_interrupt(token):
            folder = train_classifier(
                spec, datalist, args.output, epochs=args.epochs, val_datalist=validation,
                val_fraction=args.val_fraction, seed=args.seed, batch_size=args.batch_size,
                learning_rate=args.learning_rate, loss=args.loss, balanced_sampler=args.balanced_sampler,
                mixup_alpha=args.mixup, augment=not args.no_augment, patience=args.patience,
                max_seconds=args.max_seconds, slice_policy=args.slice, num_threads=args.threads,
                progress=progress, cancel=token,
            )  # fmt: skip
    finally:
        bar.close()
    trained = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    result = {"package": str(folder), "calibration": trained.get("calibration"),
              "metrics": trained.get("metrics"), "training": {k: v for k, v in trained["training"].items()
                                                              if k != "history"}}  # fmt: skip
    calibration = trained["calibration"]
    emit(args, result, f"wrote {folder}: validation accuracy {trained['metrics']['validation']['accuracy']:.3f}, "
         f"temperature {calibration['temperature']:.3f}, ECE {calibration['ece_before']:.3f} -> "
         f"{calibration['ece_after']:.3f}")  # fmt: skip
    return EXIT_OK


def run_evaluate(args: argparse.Namespace) -> int:
    from meddl.classify.evaluate import evaluate_classifier
    from meddl.classify.train import load_classification_datalist
    from meddl.cli import emit

    raw = _read_json(args.datalist)
    datalist = load_classification_datalist(args.datalist, args.section if isinstance(raw, dict) else None)
    show = sys.stderr.isatty() and not getattr(args, "json", False)
    bar, progress = _bar(show, "evaluating")
    token = CancelToken()
    try:
        with _with_interrupt(token):
            report = evaluate_classifier(
                _model_path(args.model), datalist, args.output, n_bootstrap=args.bootstrap, seed=args.seed,
                slice_policy=args.slice, device=None if args.device == "auto" else args.device,
                progress=progress, cancel=token,
            )  # fmt: skip
    finally:
        bar.close()
    metrics = report["metrics"]
    auc = "n/a" if metrics["macro_auc"] is None else f"{metrics['macro_auc']:.3f}"
    emit(args, report, f"{metrics['images']} images: accuracy {metrics['accuracy']:.3f}, macro AUC {auc}, "
         f"ECE {metrics['ece']:.3f}; report: {report['files']['markdown']}")  # fmt: skip
    return EXIT_OK


def _read_json(path: Path):
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise (ModelError if path.name == "model.json" else InputError)(
            f"not valid JSON ({' '.join(str(error).split())})", path
        ) from None
