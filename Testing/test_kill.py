"""Nothing lost: SIGKILL a real `meddl update` (and `meddl correct`) process at many different moments.

After every kill: each acknowledged correction is there with valid checksums, the registry is consistent,
the audit chain verifies, the champion loads and segments; at the end an update runs to completion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from continual_helpers import make_home

from meddl.continual import ModelHome, check_home, list_corrections, resolve_model
from meddl.infer import segment_file

torch.set_num_threads(1)
STEPS = 16

# Moments to kill `meddl update` at: a regular expression on its progress lines (stderr), or seconds after start.
UPDATE_KILLS = [
    1.0,  # still importing torch
    "prepared correction",  # preparing data
    "step 3/",  # training, before any checkpoint
    "checkpoint step",  # right after a checkpoint was written
    "gate: scoring",  # scoring the candidate
    "writing the candidate",  # writing the new version
]


def _command(*args):
    return [sys.executable, "-m", "meddl", *map(str, args)]


def _run_and_kill(command, when):
    """Start ``command``; SIGKILL it ``when`` seconds later or when a stderr line contains ``when``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDDL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    killed = threading.Event()

    def watch():
        for line in process.stderr:
            seen.append(line.rstrip())
            if isinstance(when, str) and when in line and not killed.is_set():
                process.send_signal(signal.SIGKILL)
                killed.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if isinstance(when, float):
        time.sleep(when)
        process.send_signal(signal.SIGKILL)
        killed.set()
    process.wait(timeout=120)
    watcher.join(timeout=10)
    stdout = process.stdout.read()
    return process.returncode, seen, stdout


def _assert_intact(home, acknowledged, image):
    report = check_home(home)
    assert report["ok"], report["problems"]
    stored = {row["id"] for row in list_corrections(home)}
    assert set(acknowledged) <= stored, f"lost corrections: {set(acknowledged) - stored}"
    audit = ModelHome(home).verify_audit()
    assert audit.ok, audit.problems
    result = segment_file(resolve_model(home), image, home.parent / "check_segmentation.nii.gz")
    assert result["label_volumes_ml"]["brain"] > 100.0


@pytest.mark.slow
def test_kills_lose_nothing_and_the_next_update_runs(tmp_path):
    data = make_home(tmp_path)
    home = data["home"]
    prediction = tmp_path / "b_prediction.nii.gz"
    segment_file(resolve_model(home), data["b_image"], prediction)
    acknowledged = []

    def correct(when=None):
        command = _command(
            "--json",
            "correct",
            "--model",
            home,
            data["b_image"],
            data["label"],
            "--prediction",
            prediction,
            "--site",
            "B",
        )
        if when is None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            acknowledged.append(json.loads(done.stdout)["id"])
        else:
            code, _, stdout = _run_and_kill(command, when)
            if code == 0:  # it finished before the kill: it was acknowledged
                acknowledged.append(json.loads(stdout)["id"])

    correct()
    correct(2.5)  # killed somewhere in reading, validating or writing
    correct()
    _assert_intact(home, acknowledged, data["b_image"])

    killed_at = []
    for when in UPDATE_KILLS:
        code, lines, _ = _run_and_kill(_command("update", "--model", home, "--max-steps", STEPS, "--seed", 0), when)
        killed_at.append((when, code, lines[-1] if lines else ""))
        _assert_intact(home, acknowledged, data["b_image"])
        if when == "prepared correction":
            correct()  # a correction submitted between two interrupted updates is kept too
    print("\n".join(f"killed at {when!r}: exit {code}, last line {line!r}" for when, code, line in killed_at))
    assert all(code == -signal.SIGKILL for _, code, _ in killed_at[1:]), killed_at

    done = subprocess.run(
        _command("--json", "update", "--model", home, "--max-steps", STEPS, "--seed", 0),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] in ("promoted", "rejected", "already_decided"), result
    print(f"final update: {result['status']}, resumed from step {result.get('resumed_from_step')}")
    _assert_intact(home, acknowledged, data["b_image"])
    versions = ModelHome(home).versions()
    assert all(v["status"] in ("champion", "rejected", "candidate", "passed-not-promoted") for v in versions)
    events = [e["event"] for e in ModelHome(home).audit_log.entries()]
    assert "gate_decision" in events
