"""The demo, end to end: the bundled brain-t1 model segments a brain it never trained on (nilearn's ICBM152
2009a T1) well, and the user gets the figures, a labelmap on the input's grid and an overlay PNG."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

from meddl.errors import EXIT_CANCELLED
from meddl.io import read_image
from meddl.models import load_model
from meddl.train import checkpoint_path, resolve_precision

# The recipe measured the bundled package on this very volume (model.json metrics.held_out_test); the demo must
# reproduce that figure (up to thread/BLAS noise) and stay above a floor that makes it a usable brain mask.
DICE_FLOOR = 0.9
DICE_TOLERANCE = 0.01
HD95_TOLERANCE_MM = 1.0


def test_bundled_model_package_is_small_and_documented(repo):
    package = repo / "Resources" / "models" / "brain-t1"
    spec = load_model(package).spec
    assert [label.name for label in spec.labels] == ["background", "brain"]
    assert (package / "weights.safetensors").stat().st_size < 10 * 1024 * 1024
    raw = json.loads((package / "model.json").read_text())
    assert raw["training"]["complete"] is True
    assert raw["provenance"]["recipe"].startswith(".venv/bin/python -m recipes.brain_t1")
    # The held-out volume was never a training or validation case.
    cases = raw["provenance"]["training_cases"] + raw["provenance"]["validation_cases"]
    assert not any("icbm" in case.lower() or "nilearn" in case.lower() for case in cases)
    card = (package / "MODEL_CARD.md").read_text()
    assert f"{raw['metrics']['held_out_test']['icbm152-2009a-1mm-nilearn']['dice']:.4f}" in card
    # The stress benchmark's figures (benchmarks/brain_stress.py --record) travel with the package.
    stress = raw["metrics"]["stress"]
    assert stress["cases"] == len(stress["per_case"]) >= 32
    assert f"{stress['cases_meeting_targets']} of {stress['cases']} cases" in card
    assert raw["provenance"]["git_commit"]


def test_recipe_version_names_the_bundled_weights_and_marks_another_schedule(repo):
    """The recipe's arguments recorded in the bundled package give its version back, and so does its command as the
    README gives it; a shorter schedule, which trains other weights (docs/brain-model.md: 30 of 40 at 120 steps an
    epoch), gives a marked one."""
    from recipes.brain_t1 import RECIPE_COMMAND, recipe_arguments, recipe_spec, trained_with

    raw = json.loads((repo / "Resources" / "models" / "brain-t1" / "model.json").read_text())
    arguments, precision = trained_with(raw), raw["training"]["precision"]
    assert recipe_spec(arguments, precision, compiled=False).version == raw["version"]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    readme_command = readme.split("-m recipes.brain_t1 ", 1)[1].split("`", 1)[0].split()
    assert readme_command[:2] == RECIPE_COMMAND.split()[-2:], readme_command  # --output Resources/models/brain-t1
    defaults = recipe_arguments(readme_command)
    assert recipe_spec(defaults, precision, compiled=False).version == raw["version"], vars(defaults)
    arguments.steps_per_epoch = 120
    assert recipe_spec(arguments, precision, compiled=False).version == raw["version"] + "+steps-per-epoch-120"


def test_recipe_short_run_ends_with_its_package_and_card(tmp_path, repo):
    """A quick try of the recipe (one epoch of two steps) ends with its package at --output and no staging folder.
    Such a network may draw nothing that follows the head's edges: the cases the package refuses are recorded as
    refused, with the reason, instead of ending the run in a traceback."""
    output = tmp_path / "brain"
    command = [sys.executable, "-m", "recipes.brain_t1", "--output", str(output), "--epochs", "1"]
    command += ["--steps-per-epoch", "2", "--no-stress"]
    completed = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert f"wrote {output}" in completed.stdout
    assert not output.with_name("brain.recipe").exists()
    package = load_model(output)
    assert package.spec.version.endswith("+epochs-1.steps-per-epoch-2")
    metrics = json.loads((output / "model.json").read_text())["metrics"]
    cases = {**metrics["validation_full_pipeline"], **metrics["held_out_test"]}
    assert len(cases) == 4
    card = (output / "MODEL_CARD.md").read_text()
    # The card says on which machine its times were measured: they, and float32 weights, depend on it.
    host = json.loads((output / "model.json").read_text())["provenance"]["host"]
    assert host["native_bfloat16"] == (resolve_precision("auto", "cpu") == "bf16")
    with_or_without = "with" if host["native_bfloat16"] else "without"
    assert f"(on\n{host['cores']}-core {host['cpu']}, {with_or_without} native bfloat16)" in card, card
    for name, scores in cases.items():
        assert name in card
        if scores["hd95_mm"] is None:  # refused: the reason is kept
            assert scores["dice"] == 0.0 and "found no brain" in scores["refused"], scores
        else:
            assert 0.0 <= scores["dice"] <= 1.0 and scores["hd95_mm"] >= 0.0, scores

    # A run stopped after its training, while measuring, leaves the whole package staged: the same command measures
    # it again (to the same figures) and moves it to --output, without training anew; other arguments are refused.
    staging = output.with_name("brain.recipe")
    output.rename(staging)
    refused = subprocess.run(command + ["--seed", "5"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 4
    assert refused.stderr.strip().splitlines() == [
        f"recipes.brain_t1: {staging} holds a run trained with --seed 20261131; remove it or run with those"
    ]
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{staging}: trained by an earlier run of this command; measuring it" in again.stdout
    assert "epoch 1/1" not in again.stdout and not staging.exists()
    raw = json.loads((output / "model.json").read_text())
    assert raw["metrics"] == metrics
    # The whole recipe's time counts the earlier run's training, not only the measuring that finished it.
    this_run_s = float(re.search(r"until now\) in (\d+) s", again.stdout).group(1))
    whole_s, training_s = raw["provenance"]["recipe_wall_time_s"], raw["provenance"]["wall_time_s"]
    assert whole_s >= training_s + this_run_s - 0.5, (whole_s, training_s, this_run_s)
    assert f"whole recipe {whole_s:.0f} s" in (output / "MODEL_CARD.md").read_text()


def test_recipe_bad_argument_gets_one_line_and_leaves_nothing(tmp_path, repo):
    """A value train_segmentation refuses ends the recipe with one line and a non-zero exit, not a traceback, and
    before anything is written."""
    output = tmp_path / "brain"
    command = [sys.executable, "-m", "recipes.brain_t1", "--output", str(output), "--ema-decay", "1.0"]
    completed = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [
        "recipes.brain_t1: ema_decay must be at least 0 and below 1 (got 1.0)"
    ]
    assert not list(tmp_path.iterdir())


def test_recipe_stopped_by_ctrl_c_says_what_it_keeps_and_continues(tmp_path, repo):
    """Ctrl-C during training ends the recipe with one line (no traceback) and exit 130; the checkpoint of the last
    finished epoch is kept and the next run goes on from it."""
    output = tmp_path / "brain"
    command = [sys.executable, "-m", "recipes.brain_t1", "--output", str(output), "--epochs", "20"]
    command += ["--steps-per-epoch", "2", "--no-stress"]
    checkpoint = checkpoint_path(output.with_name("brain.recipe"))
    # Ctrl-C at a terminal reaches a process whose SIGINT is the default. A shell that starts a job in the background
    # (nohup ... &) leaves SIGINT ignored in it, and Python then raises no KeyboardInterrupt: the recipe ran on.
    running = subprocess.Popen(
        command,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == EXIT_CANCELLED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"recipes.brain_t1: stopped; training continues from its last finished epoch ({checkpoint}) when the same "
        "command runs again"
    )
    # The next run (here for one step more) resumes from that epoch instead of starting afresh.
    completed = subprocess.run(
        command + ["--max-minutes", "0.001"], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stopped early" in completed.stdout
    resumed = json.loads((output.with_name("brain.recipe") / "model.json").read_text())["training"]["resumed_from"]
    assert resumed and resumed[0]["epoch"] >= 1, resumed


def test_demo_segments_the_held_out_brain(tmp_path, repo):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDDL_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "meddl.demo", "--output", str(tmp_path / "demo"), "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    brain = result["metrics"]["brain"]
    model_json = json.loads((repo / "Resources" / "models" / "brain-t1" / "model.json").read_text())
    recorded = model_json["metrics"]["held_out_test"]["icbm152-2009a-1mm-nilearn"]
    assert brain["dice"] >= DICE_FLOOR, brain
    assert abs(brain["dice"] - recorded["dice"]) <= DICE_TOLERANCE, (brain, recorded)
    assert abs(brain["hd95_mm"] - recorded["hd95_mm"]) <= HD95_TOLERANCE_MM, (brain, recorded)

    image = read_image(result["input"])
    labelmap = read_image(result["labelmap"])
    assert labelmap.same_grid(image)
    assert set(np.unique(labelmap.array).tolist()) == {0, 1}

    import matplotlib.image

    picture = matplotlib.image.imread(result["overlay_png"])
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 400
    # The overlay shows the brain colour, i.e. it really draws the segmentation.
    colour = np.array(load_model(repo / "Resources" / "models" / "brain-t1").spec.labels[1].color)
    rgb = picture[..., :3].reshape(-1, 3)
    assert np.any(np.abs(rgb - colour).max(axis=1) < 0.25)


def test_demo_reference_is_nilearns_own_brain_mask():
    from nilearn.datasets import load_mni152_brain_mask

    from meddl.data import icbm152_2009a_brain_pair

    pair = icbm152_2009a_brain_pair()
    theirs = np.asarray(load_mni152_brain_mask(resolution=1).dataobj)  # (x, y, z) voxel order of the same file
    assert pair.label.same_grid(pair.image)
    assert np.array_equal(pair.label.array.transpose(2, 1, 0) > 0, theirs > 0)
