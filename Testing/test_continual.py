"""Corrections, versions, gated update, rollback and audit, on a real tiny model trained on real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from continual_helpers import make_home

from meddl.cli import main
from meddl.continual import (
    ModelHome,
    check_home,
    exclude_correction,
    list_corrections,
    resolve_model,
    run_update,
    submit_correction,
)
from meddl.errors import Cancelled, InputError, ModelError
from meddl.infer import segment_file
from meddl.io import read_image, write_image
from meddl.progress import CancelToken

torch.set_num_threads(1)
STEPS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained tiny model and a pristine home; tests copy the home so they stay independent."""
    return make_home(tmp_path_factory.mktemp("continual"))


@pytest.fixture()
def setup(base, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(base["home"], home)
    prediction = tmp_path / "b_prediction.nii.gz"
    segment_file(resolve_model(home), base["b_image"], prediction)
    return {**base, "home": home, "b_prediction": prediction, "tmp": tmp_path}


def test_correction_update_gate_rollback_audit(setup, capsys):
    home = setup["home"]
    assert resolve_model(home) == home / "versions" / "v1"
    assert resolve_model(setup["package"]) == setup["package"]
    code = main(
        [
            "--json",
            "correct",
            "--model",
            str(home),
            str(setup["b_image"]),
            str(setup["label"]),
            "--prediction",
            str(setup["b_prediction"]),
            "--site",
            "B",
        ]
    )
    assert code == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["changed_voxels"] > 0 and stored["split"] == "train"
    assert (Path(stored["folder"]) / "label.nii.gz").is_file()

    result = run_update(home, max_steps=STEPS, max_seconds=120, seed=0)
    assert result["status"] in ("promoted", "rejected")
    assert result["candidate"] == "v2" and result["corrections"] == [stored["id"]]
    gate = result["gate"]
    assert set(gate["regression"]) == {"A"}
    home_view = ModelHome(home)
    assert home_view.version("v2")["report"]["decision"] == result["status"]
    expected_champion = "v2" if result["status"] == "promoted" else "v1"
    assert home_view.champion() == expected_champion
    # the package itself records its lineage, training data and the measured gate figures
    package_json = json.loads((home / "versions" / "v2" / "model.json").read_text())
    assert package_json["parent"] == "v1" and package_json["training_data"][0]["id"] == stored["id"]
    assert (
        package_json["metrics"]["gate"]["regression"]["A"]["candidate_dice"]
        == gate["regression"]["A"]["candidate_dice"]
    )
    # nothing new: a second update does nothing
    assert run_update(home, max_steps=STEPS)["status"] == "nothing_to_do"

    # promote / rollback are one call each and move only the pointer
    assert main(["models", "promote", str(home), "v2"]) == 0
    assert resolve_model(home) == home / "versions" / "v2"
    weights_before = (home / "versions" / "v2" / "weights.safetensors").read_bytes()
    assert main(["models", "rollback", str(home)]) == 0
    assert ModelHome(home).champion() == "v1" and resolve_model(home) == home / "versions" / "v1"
    assert (home / "versions" / "v2" / "weights.safetensors").read_bytes() == weights_before
    capsys.readouterr()
    assert main(["--json", "models", "list", str(home)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listed["versions"]] == ["v1", "v2"] and listed["champion"] == "v1"
    assert main(["--json", "models", "diff", str(home), "v1", "v2"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["training_data_only_in_b"] == [stored["id"]]
    assert main(["models", "show", str(home), "v2"]) == 0
    assert "regression site A" in capsys.readouterr().out

    # every decision is in the audit log, and the chain verifies
    assert main(["--json", "audit", "--model", str(home)]) == 0
    events = [e["event"] for e in json.loads(capsys.readouterr().out)["entries"]]
    for event in (
        "home_created",
        "correction_submitted",
        "update_started",
        "candidate_written",
        "gate_decision",
        "promoted",
        "rolled_back",
    ):
        assert event in events, event
    assert main(["audit", "--model", str(home), "--verify"]) == 0


def test_gate_rejects_a_candidate_that_forgets(setup):
    """A 'correction' that erases the brain on site A teaches the model to forget: the gate must refuse it."""
    home = setup["home"]
    image = read_image(setup["a_image"])
    erased = setup["tmp"] / "erased.nii.gz"
    write_image(image.with_array(np.zeros(image.array.shape, np.uint8)), erased)
    submit_correction(home, setup["a_image"], erased, site="A")
    result = run_update(home, max_steps=STEPS, seed=1, options={"method": "naive", "learning_rate": 1e-2})
    assert result["status"] == "rejected", result["gate"]
    assert any("regression site 'A' drops" in reason for reason in result["gate"]["reasons"])
    assert ModelHome(home).champion() == "v1"
    assert ModelHome(home).version("v2")["status"] == "rejected"
    decisions = [e for e in ModelHome(home).audit_log.entries() if e["event"] == "gate_decision"]
    assert decisions[-1]["decision"] == "rejected" and decisions[-1]["version"] == "v2"


def test_bad_corrections_are_refused_with_one_line(setup, capsys):
    home, tmp = setup["home"], setup["tmp"]
    label = read_image(setup["label"])
    # geometry mismatch: a labelmap on another grid names both files
    shifted = tmp / "shifted_label.nii.gz"
    moved = label.with_array(label.array)
    moved.origin = (moved.origin[0] + 6.0, moved.origin[1], moved.origin[2])
    write_image(moved, shifted)
    with pytest.raises(InputError) as error:
        submit_correction(home, setup["b_image"], shifted, site="B")
    message = str(error.value)
    assert str(shifted) in message and str(setup["b_image"]) in message and "\n" not in message
    # label values the model does not have
    foreign = tmp / "foreign_label.nii.gz"
    write_image(label.with_array((label.array * 7).astype(np.uint8)), foreign)
    assert main(["correct", "--model", str(home), str(setup["b_image"]), str(foreign)]) == 3
    err = capsys.readouterr().err.strip()
    assert str(foreign) in err and "[7]" in err and len(err.splitlines()) == 1
    # missing file
    assert main(["correct", "--model", str(home), str(tmp / "missing.nii.gz"), str(setup["label"])]) == 3
    assert "missing.nii.gz" in capsys.readouterr().err
    # nothing was stored by the refused submissions
    assert list_corrections(home) == []
    # unknown versions for promote / rollback
    assert main(["models", "promote", str(home), "v9"]) == 4
    assert "unknown model version 'v9'" in capsys.readouterr().err
    assert main(["models", "rollback", str(home), "v7"]) == 4
    assert main(["models", "rollback", str(home)]) == 4  # nothing to roll back to yet
    # a folder that is not a model home
    assert main(["update", "--model", str(tmp)]) == 4


def test_corrupt_correction_on_disk_is_detected_by_name(setup, capsys):
    home = setup["home"]
    stored = submit_correction(home, setup["b_image"], setup["label"], setup["b_prediction"], site="B")
    label_file = Path(stored["folder"]) / "label.nii.gz"
    data = bytearray(label_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    label_file.write_bytes(bytes(data))
    report = check_home(home)
    assert not report["ok"] and any(str(label_file) in p and "checksum" in p for p in report["problems"])
    assert main(["models", "check", str(home)]) == 3
    assert str(label_file) in capsys.readouterr().out
    with pytest.raises(InputError, match="checksum mismatch"):
        run_update(home, max_steps=2)
    assert ModelHome(home).champion() == "v1"


def test_excluded_corrections_are_not_learned_and_audited(setup):
    home = setup["home"]
    first = submit_correction(home, setup["b_image"], setup["label"], setup["b_prediction"], site="B")
    second = submit_correction(home, setup["b_image"], setup["label"], None, site="B")
    exclude_correction(home, first["id"], "wrong patient")
    exclude_correction(home, second["id"], "consent withdrawn", delete=True)
    assert not Path(second["folder"]).exists()
    assert run_update(home, max_steps=2)["status"] == "nothing_to_do"
    events = {e["event"]: e for e in ModelHome(home).audit_log.entries()}
    assert events["correction_excluded"]["id"] == first["id"]
    assert events["correction_deleted"]["reason"] == "consent withdrawn"
    assert check_home(home)["ok"]


def test_cancelled_update_resumes_from_its_checkpoint(setup):
    home = setup["home"]
    submit_correction(home, setup["b_image"], setup["label"], setup["b_prediction"], site="B")
    token = CancelToken()

    def progress(fraction, message):
        if message.startswith("step 5/"):
            token.cancel()

    with pytest.raises(Cancelled):
        run_update(home, progress, token, max_steps=STEPS, options={"checkpoint_seconds": 0.0})
    assert (home / "updates" / "current" / "checkpoint.safetensors").is_file()
    assert ModelHome(home).champion() == "v1"
    result = run_update(home, max_steps=STEPS, options={"checkpoint_seconds": 0.0})
    assert result["resumed_from_step"] == 5 and result["steps"] == STEPS
    assert not (home / "updates" / "current" / "checkpoint.safetensors").exists()


def test_tampered_audit_log_fails_verification(setup, capsys):
    home = setup["home"]
    submit_correction(home, setup["b_image"], setup["label"], site="B")
    log = home / "audit.jsonl"
    original = log.read_text()
    lines = original.splitlines(keepends=True)
    edited = lines[2].replace('"A"', '"Z"') if '"A"' in lines[2] else lines[2].replace('"v1"', '"v9"')
    assert edited != lines[2]
    log.write_text("".join(lines[:2] + [edited] + lines[3:]))
    assert main(["audit", "--model", str(home), "--verify"]) == 3
    assert f"{log}:3" in capsys.readouterr().out
    # dropping the newest entries is caught too (the registry anchors the head of the chain)
    log.write_text("".join(lines[:-1]))
    assert main(["audit", "--model", str(home), "--verify"]) == 3
    assert "truncated" in capsys.readouterr().out
    log.write_text(original)
    assert main(["audit", "--model", str(home), "--verify"]) == 0


def test_init_refuses_a_used_folder_and_a_bad_package(setup, tmp_path, capsys):
    assert main(["models", "init", "--from", str(setup["package"]), "--home", str(setup["home"])]) == 4
    assert "already exists" in capsys.readouterr().err
    assert main(["models", "init", "--from", str(tmp_path / "nope"), "--home", str(tmp_path / "new")]) == 4
    assert not (tmp_path / "new").exists()
    # a refused regression case leaves no half-made home behind
    missing = tmp_path / "missing.nii.gz"
    argv = [
        "models",
        "init",
        "--from",
        str(setup["package"]),
        "--home",
        str(tmp_path / "new"),
        "--regression",
        str(missing),
        str(setup["label"]),
        "A",
    ]
    assert main(argv) == 3
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_only_one_update_at_a_time(setup):
    from meddl.continual.locks import file_lock

    home = setup["home"]
    submit_correction(home, setup["b_image"], setup["label"], site="B")
    with file_lock(home / "updates" / "update.lock"):  # what a running update holds
        with pytest.raises(ModelError, match="another update is running"):
            run_update(home, max_steps=2)
    assert ModelHome(home).champion() == "v1"


def test_two_homes_built_from_the_same_cases_learn_the_same_update(base, tmp_path):
    # Case ids order only to the second, then by a random suffix; the replay buffer must follow the order the
    # cases were added, or the same data and seed give a different update in every home (and every benchmark run).
    from meddl.continual import init_home
    from meddl.models import load_model

    head = read_image(base["a_image"])
    replay = []
    for index, scale in enumerate((1.0, 0.8, 1.2, 0.9, 1.1)):
        path = write_image(head.with_array(head.array * scale), tmp_path / f"replay_{index}.nii.gz")
        replay.append((path, base["label"], "A"))
    weights = []
    for name in ("first", "second"):
        home = tmp_path / name
        init_home(base["package"], home, regression=[(base["a_image"], base["label"], "A")], replay=replay)
        prediction = tmp_path / f"{name}_prediction.nii.gz"
        segment_file(resolve_model(home), base["b_image"], prediction)
        submit_correction(home, base["b_image"], base["label"], prediction, site="B")
        result = run_update(home, max_steps=STEPS, seed=0)
        candidate = load_model(ModelHome(home).version_dir(result["candidate"]))
        weights.append(torch.cat([t.flatten().float() for t in candidate.network.state_dict().values()]))
    assert torch.equal(weights[0], weights[1])
