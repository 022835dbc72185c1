"""The bundled modality classifier: a safe, small package whose report and model card are the measured ones.

Re-evaluating the recipe's held-out test files must reproduce the predictions stored in its report, so the
numbers in the repository are what the package does, not typed text.
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from meddl.classify import classify_file, evaluate_classifier, load_classifier
from meddl.classify.preprocess import read_classification_input
from meddl.io import read_image

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundled(repo):
    return repo / "Resources" / "models" / "modality-classifier"


@pytest.fixture(scope="module")
def recipe(repo):
    sys.path.insert(0, str(repo / "recipes"))
    try:
        import classifier_modality
    finally:
        sys.path.remove(str(repo / "recipes"))
    return classifier_modality


def test_package_is_small_safe_and_documented(bundled):
    package = load_classifier(bundled)
    assert package.spec.task == "classification" and package.spec.spatial_dims == 2
    assert [label.name for label in package.spec.labels] == ["CT", "MR"]
    assert (bundled / "weights.safetensors").stat().st_size < 5 * 1024 * 1024
    assert not [p for p in bundled.rglob("*") if p.suffix in {".pt", ".pth", ".pkl", ".ckpt"}]
    for name in ("report.md", "report.html", "roc.png", "reliability.png", "confusion.png", "metrics.json"):
        assert (bundled / "evaluation" / name).is_file(), name
    metrics = json.loads((bundled / "evaluation" / "metrics.json").read_text())
    card = (bundled / "MODEL_CARD.md").read_text()
    assert f"Accuracy {metrics['accuracy']:.3f}" in card
    assert package.spec.raw["calibration"]["temperature"] > 0


def test_report_reproduces_from_the_held_out_files(bundled, recipe, tmp_path):
    with open(bundled / "evaluation" / "predictions.csv", newline="") as stream:
        stored = list(csv.DictReader(stream))
    result = evaluate_classifier(bundled, recipe.held_out_test(), tmp_path, n_bootstrap=20)
    with open(tmp_path / "predictions.csv", newline="") as stream:
        fresh = list(csv.DictReader(stream))
    assert [row["image"] for row in fresh] == [row["image"] for row in stored]
    assert [row["predicted"] for row in fresh] == [row["predicted"] for row in stored]
    np.testing.assert_allclose([float(row["p_CT"]) for row in fresh], [float(row["p_CT"]) for row in stored],
                               atol=1e-4)  # fmt: skip
    stored_metrics = json.loads((bundled / "evaluation" / "metrics.json").read_text())
    assert result["metrics"]["accuracy"] == pytest.approx(stored_metrics["accuracy"])


def test_dicom_slice_and_volume_get_heat_maps_on_their_own_grids(bundled, pydicom_test_files, nibabel_anatomical,
                                                                 tmp_path):  # fmt: skip
    dicom = pydicom_test_files / "CT_small.dcm"
    result = classify_file(bundled, dicom, tmp_path / "ct_small_gradcam.nrrd")
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-6
    heat = read_image(result["heatmap"])
    assert heat.same_grid(read_classification_input(dicom))
    assert 0 <= heat.array.min() and heat.array.max() <= 1 and heat.array.max() > 0

    volume = classify_file(bundled, nibabel_anatomical, tmp_path / "anatomical_gradcam.nii.gz")
    assert volume["slice_index"] == read_image(nibabel_anatomical).array.shape[0] // 2  # input.volume_slice
    assert read_image(volume["heatmap"]).same_grid(read_image(nibabel_anatomical))
