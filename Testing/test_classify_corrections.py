"""Corrected class labels ("Correct label" in MedDLClassify) in the same durable corrections store as
segmentation corrections: through the real CLI and the real worker process (meddl.client.WorkerClient)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from worker_helpers import make_unet_package

from meddl.cli import main
from meddl.client import WorkerClient
from meddl.continual import check_home, init_home, list_corrections
from meddl.continual.registry import sha256_file
from meddl.errors import InputError

torch.set_num_threads(1)


def _tiny_classifier(folder: Path) -> Path:
    """An untrained 2D CT/MR classifier (the engine's own spec builder and save_model); storing corrections
    does not depend on what the weights have learned."""
    from meddl.classify import default_classifier_spec
    from meddl.models import build_network, save_model

    spec = default_classifier_spec(["CT", "MR"], spatial_dims=2, patch_size=(32, 32), widths=(4, 8, 8, 8), name="tiny")
    torch.manual_seed(0)
    return save_model(spec, build_network(spec), folder)


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("homes")
    classifier = folder / "classifier-home"
    assert main(["models", "init", "--from", str(_tiny_classifier(folder / "tiny")), "--home", str(classifier)]) == 0
    segmenter = folder / "segmenter-home"
    init_home(make_unet_package(folder / "unet", 4.0, channels=(4, 8)), segmenter)
    return {"classifier": classifier, "segmenter": segmenter}


@pytest.fixture(scope="module")
def ct_slice(pydicom_test_files) -> Path:
    return pydicom_test_files / "CT_small.dcm"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_stores_a_class_label_durably_lists_and_audits_it(homes, ct_slice, capsys):
    home = homes["classifier"]
    capsys.readouterr()
    assert main(["--json", "correct", "--model", str(home), "--image", str(ct_slice), "--label", "CT"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "CT" and result["label_value"] == 0 and result["model_version"] == "v1"
    folder = Path(result["folder"])
    record = json.loads((folder / "correction.json").read_text())
    assert record["task"] == "classification" and record["label"] == {"name": "CT", "value": 0}
    assert record["sources"]["image_sha256"] == sha256_file(ct_slice)
    for name, digest in result["files"].items():  # every stored file matches its checksum
        assert sha256_file(folder / name) == digest
    assert check_home(home)["ok"]

    assert main(["correct", "--model", str(home), "--list"]) == 0
    assert result["id"] in capsys.readouterr().out
    assert main(["audit", "--model", str(home)]) == 0
    audit = capsys.readouterr().out
    assert "correction_submitted" in audit and result["id"] in audit
    assert main(["audit", "--model", str(home), "--verify"]) == 0


def test_cli_update_of_a_classifier_home_is_gated_recorded_and_audited(tmp_path, ct_slice, pydicom_test_files, capsys):
    home = tmp_path / "home"
    assert main(["models", "init", "--from", str(_tiny_classifier(tmp_path / "tiny")), "--home", str(home)]) == 0
    corrections = [(ct_slice, "CT"), (pydicom_test_files / "MR_small.dcm", "MR")]
    for image, label in corrections:
        assert main(["correct", "--model", str(home), "--image", str(image), "--label", label]) == 0
    capsys.readouterr()

    assert main(["--json", "update", "--model", str(home), "--max-steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] in ("promoted", "rejected") and result["steps"] == 5 and result["candidate"] == "v2"
    gate = result["gate"]["corrections"]
    assert gate["cases"] == len(corrections) and gate["basis"].startswith("training corrections")
    for key in ("champion_dice", "candidate_dice", "champion_accuracy", "candidate_accuracy"):
        assert 0.0 <= gate[key] <= 1.0, key  # true-class probability and accuracy, measured on both models
    promoted = (
        gate["candidate_dice"] > gate["champion_dice"] and gate["candidate_accuracy"] >= gate["champion_accuracy"]
    )
    assert result["status"] == ("promoted" if promoted else "rejected")

    assert main(["--json", "models", "list", str(home)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["champion"] == ("v2" if promoted else "v1")
    v2 = [v for v in listing["versions"] if v["version"] == "v2"][0]
    assert v2["parent"] == "v1" and v2["status"] == ("champion" if promoted else "rejected")
    assert main(["audit", "--model", str(home), "--verify"]) == 0
    assert main(["audit", "--model", str(home)]) == 0
    audit = capsys.readouterr().out
    assert "gate_decision" in audit and "update_started" in audit
    assert check_home(home)["ok"]

    # The champion (whichever it is) still classifies through the home.
    assert main(["--json", "classify", "--model", str(home), "--input", str(ct_slice)]) == 0
    classified = json.loads(capsys.readouterr().out)
    assert classified["predicted"] in ("CT", "MR")
    # Nothing new: a second update says so.
    assert main(["--json", "update", "--model", str(home), "--max-steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "nothing_to_do"


def test_cli_refuses_unknown_classes_and_wrong_inputs_with_one_line(homes, ct_slice, fsl_t1_2mm, capsys):
    home = homes["classifier"]
    before = len(list_corrections(home, status=None))
    capsys.readouterr()
    assert main(["correct", "--model", str(home), "--image", str(ct_slice), "--label", "XR"]) == 3
    err = _one_line_error(capsys)
    assert "unknown class name 'XR'" in err and "CT, MR" in err
    # a 3D volume for a 2D classifier names the file
    assert main(["correct", "--model", str(home), "--image", str(fsl_t1_2mm), "--label", "MR"]) == 3
    err = _one_line_error(capsys)
    assert str(fsl_t1_2mm) in err and "2D images" in err
    # a labelmap for a classifier home, and a class name for a segmentation home
    assert main(["correct", "--model", str(home), str(ct_slice), str(ct_slice)]) == 3
    assert "is a classifier" in _one_line_error(capsys)
    assert main(["correct", "--model", str(homes["segmenter"]), "--image", str(fsl_t1_2mm), "--label", "brain"]) == 3
    assert "is a segmentation model: give a corrected labelmap" in _one_line_error(capsys)
    assert len(list_corrections(home, status=None)) == before  # nothing stored by refused submissions
    assert list_corrections(homes["segmenter"], status=None) == []


def test_worker_takes_a_label_or_a_labelmap_and_refuses_a_mismatch(homes, ct_slice, fsl_t1_2mm, tmp_path):
    client = WorkerClient(env={**os.environ, "MEDDL_NUM_THREADS": "1"}, log_path=tmp_path / "worker.log")
    client.start()
    try:
        home = str(homes["classifier"])
        probabilities = {"CT": 0.3, "MR": 0.7}
        result = client.call(
            "submit_correction",
            {"model": home, "image": str(ct_slice), "label": "CT", "predicted": "MR", "probabilities": probabilities},
            timeout=120,
        )
        record = json.loads((Path(result["folder"]) / "correction.json").read_text())
        assert record["label"]["name"] == "CT" and record["prediction"]["predicted"] == "MR"
        assert record["prediction"]["probabilities"] == probabilities
        assert check_home(home)["ok"]

        with pytest.raises(InputError) as error:
            client.call("submit_correction", {"model": home, "image": str(ct_slice), "label": "XR"}, timeout=120)
        assert "CT, MR" in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(InputError) as error:
            client.call(
                "submit_correction", {"model": home, "image": str(ct_slice), "labelmap": str(ct_slice)}, timeout=120
            )
        assert "is a classifier" in str(error.value) and "\n" not in str(error.value)
        segmenter = str(homes["segmenter"])
        with pytest.raises(InputError) as error:
            client.call(
                "submit_correction", {"model": segmenter, "image": str(fsl_t1_2mm), "label": "brain"}, timeout=120
            )
        assert "give a corrected labelmap" in str(error.value) and "\n" not in str(error.value)
        assert list_corrections(segmenter, status=None) == []
    finally:
        client.shutdown()
