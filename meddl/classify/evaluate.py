"""Evaluating a classifier: metrics with bootstrap confidence intervals, and a Markdown/HTML report.

Everything in the report is computed from the predictions of the run that writes it: accuracy,
per-class sensitivity, specificity, precision, F1 and one-vs-rest AUC-ROC (with seeded percentile
bootstrap 95 % confidence intervals over images), the confusion matrix and the expected calibration error;
figures (ROC curves, reliability diagram, confusion matrix) are drawn with matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from meddl.classify.calibration import expected_calibration_error, reliability_bins, softmax_with_temperature
from meddl.classify.infer import load_classifier, predict_logits, temperature_of
from meddl.classify.preprocess import class_value, prepare_input, read_classification_input
from meddl.errors import InputError
from meddl.fsutil import write_text_atomic
from meddl.io import Image
from meddl.models import ModelPackage
from meddl.progress import CancelToken, ProgressCallback, no_progress

__all__ = ["classification_metrics", "bootstrap_interval", "evaluate_classifier", "write_report"]

PathLike = Union[str, os.PathLike]


def _per_class(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> Dict[str, np.ndarray]:
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion).astype(np.float64)
    fn = confusion.sum(axis=1) - tp
    fp = confusion.sum(axis=0) - tp
    tn = confusion.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / (tp + fn)
        specificity = tn / (tn + fp)
        precision = tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {
        "confusion": confusion,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
    }


def _auc_one_vs_rest(labels: np.ndarray, probabilities: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    aucs = np.full(n_classes, np.nan)
    for c in range(n_classes):
        positive = labels == c
        if positive.any() and (~positive).any():
            aucs[c] = roc_auc_score(positive, probabilities[:, c])
    return aucs


def bootstrap_interval(values: Sequence[float], level: float = 0.95) -> List[Optional[float]]:
    """Percentile interval of bootstrap replicates (NaN replicates, e.g. one class only, are dropped)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return [None, None]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def _clean(value: float) -> Optional[float]:
    return None if value is None or not np.isfinite(value) else float(value)


def classification_metrics(
    labels: Sequence[int],
    probabilities: np.ndarray,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Dict[str, Any]:
    """Metrics of calibrated ``probabilities`` ``[N, C]`` against true class indices ``labels``.

    Returns a JSON-able dict: ``images``, ``accuracy`` (+ ``accuracy_ci95``), ``macro_auc`` (+ CI),
    ``ece``, ``confusion_matrix`` (rows true, columns predicted), and ``per_class[name]`` with
    ``support``, ``sensitivity``, ``specificity``, ``precision``, ``f1``, ``auc`` and ``auc_ci95``.
    Undefined values (e.g. the AUC of a class absent from the set) are None.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if len(labels) == 0:
        raise InputError("no images to evaluate")
    predicted = probabilities.argmax(axis=1)
    counts = _per_class(labels, predicted, n_classes)
    aucs = _auc_one_vs_rest(labels, probabilities, n_classes)

    rng = np.random.default_rng(seed)
    boot_accuracy, boot_auc, boot_macro = [], [], []
    for _ in range(int(n_bootstrap)):
        index = rng.integers(0, len(labels), len(labels))
        boot_accuracy.append(float((predicted[index] == labels[index]).mean()))
        replicate = _auc_one_vs_rest(labels[index], probabilities[index], n_classes)
        boot_auc.append(replicate)
        present = np.isfinite(replicate)
        boot_macro.append(float(replicate[present].mean()) if present.all() else np.nan)
    boot_auc_array = np.asarray(boot_auc).reshape(-1, n_classes)

    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {
            "support": int((labels == c).sum()),
            "sensitivity": _clean(counts["sensitivity"][c]),
            "specificity": _clean(counts["specificity"][c]),
            "precision": _clean(counts["precision"][c]),
            "f1": _clean(counts["f1"][c]),
            "auc": _clean(aucs[c]),
            "auc_ci95": bootstrap_interval(boot_auc_array[:, c])
            if n_bootstrap and np.isfinite(aucs[c])
            else [None, None],
        }
    macro = float(np.mean(aucs)) if np.isfinite(aucs).all() else None
    return {
        "images": int(len(labels)),
        "classes": list(class_names),
        "accuracy": float((predicted == labels).mean()),
        "accuracy_ci95": bootstrap_interval(boot_accuracy) if n_bootstrap else [None, None],
        "macro_auc": macro,
        "macro_auc_ci95": bootstrap_interval(boot_macro) if n_bootstrap and macro is not None else [None, None],
        "ece": expected_calibration_error(probabilities, labels),
        "confusion_matrix": counts["confusion"].tolist(),
        "per_class": per_class,
        "bootstrap": {"replicates": int(n_bootstrap), "seed": int(seed), "method": "percentile, resampling images"},
    }


def _figures(labels: np.ndarray, probabilities: np.ndarray, metrics: Dict[str, Any], folder: Path) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    names = metrics["classes"]
    files = {}

    figure, axes = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    for c, name in enumerate(names):
        positive = labels == c
        if positive.any() and (~positive).any():
            fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
            auc = metrics["per_class"][name]["auc"]
            style = ("-", "--", ":", "-.")[c % 4]  # binary curves coincide; the styles keep both visible
            axes.plot(fpr, tpr, lw=2, ls=style, label=f"{name} vs rest (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axes.set(
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        title=f"ROC, one vs rest (n={metrics['images']})",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    files["roc"] = "roc.png"
    figure.savefig(folder / files["roc"])
    plt.close(figure)

    bins = reliability_bins(probabilities, labels)
    centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    used = bins["count"] > 0
    figure, axes = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    axes.bar(centres[used], bins["accuracy"][used], width=0.09, color="#4477aa", edgecolor="black", label="accuracy")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for x, y, n in zip(centres[used], bins["accuracy"][used], bins["count"][used]):
        axes.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    axes.set(
        xlabel="confidence (top-class probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.08),
        title=f"Reliability (ECE {metrics['ece']:.3f})",
    )
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    files["reliability"] = "reliability.png"
    figure.savefig(folder / files["reliability"])
    plt.close(figure)

    confusion = np.asarray(metrics["confusion_matrix"])
    figure, axes = plt.subplots(figsize=(1.6 + 0.9 * len(names), 1.4 + 0.9 * len(names)), dpi=110)
    axes.imshow(confusion, cmap="Blues", vmin=0)
    threshold = confusion.max() / 2 if confusion.max() else 1
    for (row, column), value in np.ndenumerate(confusion):
        axes.text(
            column,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > threshold else "black",
            fontsize=11,
        )
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    figure.tight_layout()
    files["confusion"] = "confusion.png"
    figure.savefig(folder / files["confusion"])
    plt.close(figure)
    return files


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: List[Optional[float]]) -> str:
    return "n/a" if interval[0] is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _tables(metrics: Dict[str, Any]) -> List[List[List[str]]]:
    summary = [
        ["measure", "value", "95% CI"],
        ["images", str(metrics["images"]), ""],
        ["accuracy", _fmt(metrics["accuracy"]), _ci(metrics["accuracy_ci95"])],
        ["macro AUC-ROC", _fmt(metrics["macro_auc"]), _ci(metrics["macro_auc_ci95"])],
        ["expected calibration error (10 bins)", _fmt(metrics["ece"]), ""],
    ]
    per_class = [["class", "n", "sensitivity", "specificity", "precision", "F1", "AUC (one vs rest)", "AUC 95% CI"]]
    for name, row in metrics["per_class"].items():
        per_class.append(
            [
                name,
                str(row["support"]),
                _fmt(row["sensitivity"]),
                _fmt(row["specificity"]),
                _fmt(row["precision"]),
                _fmt(row["f1"]),
                _fmt(row["auc"]),
                _ci(row["auc_ci95"]),
            ]
        )
    names = metrics["classes"]
    confusion = [["true \\ predicted", *names]]
    for name, row in zip(names, metrics["confusion_matrix"]):
        confusion.append([name, *[str(v) for v in row]])
    return [summary, per_class, confusion]


def _markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    labels: Sequence[int],
    probabilities: np.ndarray,
    metrics: Dict[str, Any],
    output_dir: PathLike,
    title: str = "Classifier evaluation",
    notes: Sequence[str] = (),
    predictions: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, str]:
    """Write ``report.md``, ``report.html``, the three PNGs, ``metrics.json`` and ``predictions.csv``."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    figures = _figures(labels, np.asarray(probabilities), metrics, folder)
    summary, per_class, confusion = _tables(metrics)
    boot = metrics["bootstrap"]
    method = (
        f"95% confidence intervals: percentile bootstrap over images, {boot['replicates']} replicates, "
        f"seed {boot['seed']}."
    )
    markdown = [
        f"# {title}",
        "",
        *[f"{note}  " for note in notes],
        "",
        "## Summary",
        "",
        _markdown_table(summary),
        "",
        method,
        "",
        "## Per class",
        "",
        _markdown_table(per_class),
        "",
        "## Confusion matrix",
        "",
        _markdown_table(confusion),
        "",
        "## Figures",
        "",
        f"![ROC curves]({figures['roc']})",
        f"![Reliability diagram]({figures['reliability']})",
        f"![Confusion matrix]({figures['confusion']})",
        "",
    ]
    write_text_atomic(folder / "report.md", "\n".join(markdown))
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}img{max-width:32%}"
    )
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
        *[f"<p>{html.escape(note)}</p>" for note in notes],
        "<h2>Summary</h2>",
        _html_table(summary),
        f"<p>{html.escape(method)}</p>",
        "<h2>Per class</h2>",
        _html_table(per_class),
        "<h2>Confusion matrix</h2>",
        _html_table(confusion),
        "<h2>Figures</h2>",
        *[f"<img src='{name}' alt='{key}'>" for key, name in figures.items()],
        "</body></html>",
    ]
    write_text_atomic(folder / "report.html", "\n".join(page))
    write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    files = {key: str(folder / name) for key, name in figures.items()}
    files.update(
        markdown=str(folder / "report.md"), html=str(folder / "report.html"), metrics=str(folder / "metrics.json")
    )
    if predictions:
        handle, temporary = tempfile.mkstemp(prefix=".predictions.csv.", dir=folder)
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(predictions[0]))
            writer.writeheader()
            writer.writerows(predictions)
        os.replace(temporary, folder / "predictions.csv")
        files["predictions"] = str(folder / "predictions.csv")
    return files


def evaluate_classifier(
    model: Union[PathLike, ModelPackage],
    datalist: List[Dict[str, Any]],
    output_dir: PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
    slice_policy: Optional[str] = None,
    title: Optional[str] = None,
    notes: Sequence[str] = (),
    device: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Dict[str, Any]:
    """Classify every ``{"image", "label"}`` item, compute the metrics and write the report to ``output_dir``.

    Returns:
        ``{"metrics": ..., "files": {"markdown", "html", "roc", "reliability", "confusion", ...}}``.
    """
    from meddl.infer import select_device

    progress = progress or no_progress
    package = load_classifier(model)
    spec = package.spec
    device = select_device(device)
    network = package.network.to(device)
    temperature = temperature_of(package)
    classes = {label.name: label.value for label in spec.labels}
    names = [label.name for label in sorted(spec.labels, key=lambda label: label.value)]
    if not datalist:
        raise InputError("the evaluation datalist is empty")
    labels, probabilities, predictions = [], [], []
    for index, item in enumerate(datalist):
        if cancel:
            cancel.check()
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise InputError(f"datalist item {index} needs 'image' and 'label'")
        image_value = item["image"]
        where = image_value.metadata.get("source") if isinstance(image_value, Image) else image_value
        class_value(spec, item["label"], where)
        image = image_value if isinstance(image_value, Image) else read_classification_input(image_value)
        prepared = prepare_input(image, spec, slice_policy)
        logits = predict_logits(network, prepared.array[None], device)
        p = softmax_with_temperature(logits, temperature)[0]
        labels.append(classes[str(item["label"])])
        probabilities.append(p)
        predictions.append(
            {
                "image": str(item.get("name", where)),
                "label": str(item["label"]),
                "predicted": names[int(np.argmax(p))],
                **{f"p_{name}": round(float(v), 6) for name, v in zip(names, p)},
            }
        )
        progress((index + 1) / (len(datalist) + 1), f"classified {index + 1}/{len(datalist)}")
    probability_array = np.asarray(probabilities)
    metrics = classification_metrics(labels, probability_array, names, n_bootstrap, seed)
    metrics["model"] = {"name": spec.name, "version": spec.version, "temperature": temperature}
    notes = [f"Model: {spec.name} version {spec.version}; calibration temperature {temperature:.3f}.", *notes]
    files = write_report(
        labels, probability_array, metrics, output_dir, title or f"Evaluation of {spec.name}", notes, predictions
    )
    progress(1.0, "report written")
    return {"metrics": metrics, "files": files}
