"""Classification end to end: a tiny classifier trained here on a task whose signal sits in one known region,
its Grad-CAM map (geometry and location), the CLI (`classify --json`, batches, `evaluate-classifier` report),
and one clear line with exit code 3/4 for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meddl.classify import classify_file, default_classifier_spec, train_classifier
from meddl.classify.calibration import expected_calibration_error, fit_temperature, softmax_with_temperature
from meddl.cli import main
from meddl.errors import InputError
from meddl.io import Image, read_image, write_image
from meddl.models import load_model

torch.set_num_threads(1)

SIZE = 32  # pixels per side of the synthetic 2D images
# An oblique in-plane rotation and an odd origin/spacing: the heat map must come back on exactly this grid.
ANGLE = np.deg2rad(20)
DIRECTION = np.array([[np.cos(ANGLE), -np.sin(ANGLE), 0], [np.sin(ANGLE), np.cos(ANGLE), 0], [0, 0, 1]])


def synthetic_image(rng: np.random.Generator, blob: bool, name: str) -> Image:
    """Noise on a flat background; class "blob" adds a bright Gaussian blob in the top-left quadrant only
    (rows and columns < SIZE/2), so that quadrant is the one region carrying the signal."""
    array = rng.normal(100.0, 12.0, (1, SIZE, SIZE)).astype(np.float32)
    if blob:
        row, column = rng.integers(4, SIZE // 2 - 3, 2)
        rows, columns = np.mgrid[:SIZE, :SIZE]
        array[0] += 90.0 * np.exp(-((rows - row) ** 2 + (columns - column) ** 2) / (2 * 2.0**2))
    return Image(array, (0.7, 0.9, 2.5), (-31.5, 12.25, 7.0), DIRECTION, {"source": name})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classify")


@pytest.fixture(scope="module")
def blob_model(workspace) -> Path:
    """A 2D classifier (none / blob) trained here in a few seconds."""
    rng = np.random.default_rng(1)
    datalist = [
        {"image": synthetic_image(rng, label == "blob", f"train {index}"), "label": label}
        for index, label in enumerate(["none", "blob"] * 30)
    ]
    spec = default_classifier_spec(["none", "blob"], 2, (SIZE, SIZE), None, name="blob-test")
    # No augmentation here: the signal's place is the point, and zoomed crops or flips would move it
    # (augmentation is exercised by test_training_options_and_unknown_class).
    return train_classifier(spec, datalist, workspace / "blob-model", epochs=8, seed=0, batch_size=16, augment=False)


@pytest.fixture(scope="module")
def test_images(workspace) -> dict:
    """Held-out synthetic images written as NRRD files (single-slice volumes on the oblique grid)."""
    rng = np.random.default_rng(7)
    folder = workspace / "test-images"
    entries = []
    for index, label in enumerate(["none", "blob"] * 8):
        path = folder / f"{label}_{index:02d}.nrrd"
        write_image(synthetic_image(rng, label == "blob", str(path)), path)
        entries.append({"image": path.name, "label": label})
    (folder / "datalist.json").write_text(json.dumps({"test": entries}))
    return {"folder": folder, "entries": entries}


@pytest.fixture(scope="module")
def volume_model(workspace) -> Path:
    """A tiny 3D classifier; only its interface matters here (geometry of the heat map, input checks)."""
    rng = np.random.default_rng(3)
    datalist = []
    for index, label in enumerate(["low", "high"] * 4):
        array = rng.normal(0, 1, (12, 14, 16)).astype(np.float32) + (3.0 if label == "high" else 0.0) * (
            np.arange(16)[None, None, :] > 8
        )
        datalist.append({"image": Image(array, (1.5, 1.5, 2.0), (0, 0, 0), np.eye(3), {"source": f"v{index}"}),
                         "label": label})  # fmt: skip
    spec = default_classifier_spec(["low", "high"], 3, (16, 16, 16), None, name="volume-test", widths=(4, 8, 8, 8))
    return train_classifier(spec, datalist, workspace / "volume-model", epochs=1, seed=0, batch_size=4,
                            val_fraction=0.25, mixup_alpha=0.0)  # fmt: skip


def test_package_is_safetensors_and_calibrated(blob_model):
    files = sorted(p.name for p in blob_model.iterdir())
    assert files == ["model.json", "weights.safetensors"]
    spec = json.loads((blob_model / "model.json").read_text())
    assert spec["task"] == "classification"
    assert [label["value"] for label in spec["labels"]] == [0, 1]
    calibration = spec["calibration"]
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1
    assert spec["metrics"]["validation"]["accuracy"] >= 0.9
    assert load_model(blob_model).spec.task == "classification"


def test_gradcam_lies_on_the_input_grid_and_peaks_where_the_signal_is(blob_model, test_images, workspace):
    folder = test_images["folder"]
    blob_files = [folder / e["image"] for e in test_images["entries"] if e["label"] == "blob"]
    inside = 0
    for path in blob_files[:4]:
        heatmap_path = workspace / "heat" / (path.stem + "_gradcam.nrrd")
        result = classify_file(blob_model, path, heatmap_path)
        assert result["predicted"] == "blob"
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-6
        source, heat = read_image(path), read_image(heatmap_path)
        assert heat.same_grid(source), (heat.geometry(), source.geometry())
        _, row, column = np.unravel_index(int(np.argmax(heat.array)), heat.array.shape)
        half = SIZE // 2
        inside += row < half and column < half
        quadrant_means = [heat.array[0, r : r + half, c : c + half].mean() for r in (0, half) for c in (0, half)]
        assert int(np.argmax(quadrant_means)) == 0, quadrant_means
    assert inside >= 3


def test_volume_heatmap_lies_on_an_oblique_volume(volume_model, workspace):
    rng = np.random.default_rng(5)
    rotation = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float) @ DIRECTION  # a flipped, rotated grid
    volume = Image(rng.normal(0, 1, (10, 18, 20)).astype(np.float32), (1.2, 0.8, 2.2), (5, -7, 11), rotation)
    path = workspace / "oblique.nii.gz"
    write_image(volume, path)
    result = classify_file(volume_model, path, workspace / "oblique_gradcam.nii.gz")
    heat = read_image(result["heatmap"])
    assert heat.same_grid(read_image(path))
    assert set(result["probabilities"]) == {"low", "high"}


def test_cli_classify_json_and_batch_with_a_failure(blob_model, test_images, workspace):
    path = test_images["folder"] / test_images["entries"][1]["image"]
    heatmap = workspace / "cli_heat.nrrd"
    completed = subprocess.run(
        [sys.executable, "-m", "meddl", "classify", "--model", str(blob_model), "--input", str(path),
         "--heatmap", str(heatmap), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["predicted"] == "blob" and summary["heatmap"] == str(heatmap) and heatmap.is_file()
    assert summary["probabilities"]["blob"] > 0.5

    batch = workspace / "batch"
    batch.mkdir()
    for entry in test_images["entries"][:2]:
        (batch / entry["image"]).write_bytes((test_images["folder"] / entry["image"]).read_bytes())
    flat = synthetic_image(np.random.default_rng(0), False, "flat")
    write_image(flat.with_array(np.full_like(flat.array, 5.0)), batch / "flat.nrrd")
    code = main(["--json", "classify", "--model", str(blob_model), "--input", str(batch), "--heatmap",
                 str(workspace / "batch-heat")])  # fmt: skip
    assert code == 5
    assert sorted(p.name for p in (workspace / "batch-heat").iterdir()) == [
        "blob_01_gradcam.nrrd", "none_00_gradcam.nrrd"
    ]  # fmt: skip


def test_cli_evaluate_classifier_writes_report_with_figures(blob_model, test_images, workspace, capsys):
    output = workspace / "report"
    datalist = test_images["folder"] / "datalist.json"
    code = main(["--json", "evaluate-classifier", "--model", str(blob_model), "--datalist", str(datalist),
                 "--output", str(output), "--bootstrap", "200"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    metrics = report["metrics"]
    assert metrics["images"] == 16 and metrics["accuracy"] >= 0.85
    low, high = metrics["per_class"]["blob"]["auc_ci95"]
    assert low <= metrics["per_class"]["blob"]["auc"] <= high
    assert np.array(metrics["confusion_matrix"]).sum() == 16
    for name in ("roc.png", "reliability.png", "confusion.png"):
        png = output / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    markdown = (output / "report.md").read_text()
    html = (output / "report.html").read_text()
    assert "AUC" in markdown and "roc.png" in markdown and "<img src='confusion.png'" in html
    assert f"{metrics['accuracy']:.3f}" in markdown  # the report shows the measured figure


@pytest.fixture(scope="module")
def bad_inputs(workspace, nibabel_anatomical, nibabel_4d, pydicom_test_files) -> dict:
    folder = workspace / "bad"
    folder.mkdir()
    rgb = Image(np.zeros((1, 8, 8, 3), np.uint8), (1, 1, 1), (0, 0, 0))
    import SimpleITK as sitk

    rgb_path = folder / "colour.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), np.uint8),
                                           isVector=True), str(rgb_path))  # fmt: skip
    del rgb
    constant = folder / "constant.nrrd"
    write_image(Image(np.full((1, 20, 20), 7, np.int16), (1, 1, 1), (0, 0, 0)), constant)
    nan_path = folder / "nan.nrrd"
    nan_array = np.ones((1, 20, 20), np.float32)
    nan_array[0, 3, 3] = np.nan
    write_image(Image(nan_array, (1, 1, 1), (0, 0, 0)), nan_path)
    return {
        "volume": nibabel_anatomical,
        "four_d": nibabel_4d,
        "ct_slice": pydicom_test_files / "CT_small.dcm",
        "rgb": rgb_path,
        "constant": constant,
        "nan": nan_path,
        "not_an_image": Path(__file__),
    }


@pytest.mark.parametrize(
    "case, model, code, words",
    [
        ("volume", "blob", 3, "3D volume"),  # a 3D volume to a 2D model
        ("ct_slice", "volume", 3, "2D image"),  # a 2D image to a 3D model
        ("rgb", "blob", 3, "3 channels"),
        ("constant", "blob", 3, "constant"),
        ("nan", "blob", 3, "NaN"),
        ("four_d", "blob", 3, "4D"),
        ("not_an_image", "blob", 3, ""),
        ("ct_slice", "not_a_model", 4, ""),
    ],
)
def test_bad_input_is_one_line_naming_the_file(case, model, code, words, bad_inputs, blob_model, volume_model,
                                               workspace, capsys):  # fmt: skip
    models = {"blob": blob_model, "volume": volume_model, "not_a_model": workspace / "no-such-model"}
    heatmap = workspace / f"bad_{case}.nrrd"
    exit_code = main(["classify", "--model", str(models[model]), "--input", str(bad_inputs[case]),
                      "--heatmap", str(heatmap)])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert exit_code == code, error
    assert len(error.splitlines()) == 1, error
    named = str(models[model]) if code == 4 else str(bad_inputs[case])
    assert named in error and words in error, error
    assert not heatmap.exists()


def test_middle_slice_of_a_volume_for_a_2d_model(blob_model, nibabel_anatomical, workspace):
    result = classify_file(blob_model, nibabel_anatomical, workspace / "middle.nrrd", slice_policy="middle")
    heat, source = read_image(result["heatmap"]), read_image(nibabel_anatomical)
    assert heat.same_grid(source)
    index = result["slice_index"]
    assert index == source.array.shape[0] // 2
    assert heat.array[index].max() > 0 and np.count_nonzero(np.delete(heat.array, index, axis=0)) == 0


def test_training_options_and_unknown_class(workspace):
    rng = np.random.default_rng(2)
    datalist = [{"image": synthetic_image(rng, index % 4 == 0, f"i{index}"), "label": "blob" if index % 4 == 0
                 else "none"} for index in range(16)]  # fmt: skip
    spec = default_classifier_spec(["none", "blob"], 2, (16, 16), None, name="options", widths=(4, 4, 8, 8))
    folder = train_classifier(spec, datalist, workspace / "focal", epochs=1, loss="focal", balanced_sampler=True,
                              mixup_alpha=0.4)  # fmt: skip
    training = json.loads((folder / "model.json").read_text())["training"]
    assert training["loss"] == "focal" and training["balanced_sampler"] is True
    assert training["train_class_counts"]["blob"] < training["train_class_counts"]["none"]
    with pytest.raises(InputError, match="unknown class name 'tumour'") as error:
        train_classifier(spec, datalist + [{"image": datalist[0]["image"], "label": "tumour"}], workspace / "x",
                         epochs=1)  # fmt: skip
    assert "i0" in str(error.value)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 3))
    true_temperature = 2.5
    labels = np.array([rng.choice(3, p=p) for p in softmax_with_temperature(logits, true_temperature)])
    fitted = fit_temperature(logits, labels)
    assert abs(fitted - true_temperature) < 0.25
    before = expected_calibration_error(softmax_with_temperature(logits, 1.0), labels)
    after = expected_calibration_error(softmax_with_temperature(logits, fitted), labels)
    assert after < before / 3


def test_cli_train_classifier_from_a_datalist(test_images, workspace, capsys):
    datalist = workspace / "train-datalist.json"
    entries = [{"image": str(test_images["folder"] / e["image"]), "label": e["label"]} for e in test_images["entries"]]
    datalist.write_text(json.dumps({"training": entries}))
    output = workspace / "cli-trained"
    code = main(["--json", "train-classifier", "--datalist", str(datalist), "--output", str(output), "--epochs", "1",
                 "--patch-size", "16", "16", "--classes", "none", "blob", "--loss", "focal",
                 "--balanced-sampler"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["package"] == str(output) and summary["calibration"]["temperature"] > 0
    assert load_model(output).spec.patch_size == [16, 16]

    code = main(["train-classifier", "--datalist", str(datalist), "--output", str(workspace / "never"),
                 "--classes", "none", "tumour"])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 3 and len(error.splitlines()) == 1 and "unknown class name 'blob'" in error, error
    assert not (workspace / "never").exists()
