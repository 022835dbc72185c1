"""The worker process, driven over its real stdin/stdout with raw protocol lines (no client in between)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from worker_helpers import make_unet_package

from meddl.io import read_image
from meddl.protocol import PROTOCOL_VERSION

REPO = Path(__file__).resolve().parents[1]


class RawWorker:
    """``python -m meddl.worker`` with pipes; a thread collects every stdout line exactly as written."""

    def __init__(self, log_file: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.log_file = log_file
        self.stderr_path = log_file.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meddl.worker", "--log-file", str(log_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=REPO,
            env={**os.environ, "MEDDL_NUM_THREADS": "1", **(env or {})},
        )
        self.raw_lines: List[bytes] = []
        self.messages: queue.Queue[Dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.raw_lines.append(line)
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                self.messages.put({"unparsable": line})

    def send_raw(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, request_id: Any, method: str, params: Optional[Dict[str, Any]] = None) -> None:
        self.send_raw((json.dumps({"id": request_id, "method": method, "params": params or {}}) + "\n").encode())

    def next(self, timeout: float = 60.0) -> Dict[str, Any]:
        return self.messages.get(timeout=timeout)

    def until_final(self, request_id: Any, timeout: float = 120.0) -> Dict[str, Any]:
        """Messages until the ``result`` or ``error`` of ``request_id``; returns that final message."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if message.get("id") == request_id and message.get("event") in ("result", "error"):
                return message

    def call(self, request_id: Any, method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        self.send(request_id, method, params)
        return self.until_final(request_id)

    def close(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def model_4mm(tmp_path_factory) -> Path:
    return make_unet_package(tmp_path_factory.mktemp("models") / "unet-4mm")


# A stand-in for a chatty third-party library: an audit hook (installed by sitecustomize, outside meddl) that
# prints to sys.stdout and writes to file descriptor 1 whenever the worker opens the input volume.
CHATTY_SITECUSTOMIZE = """
import os, sys

def _chatty(event, args):
    if event == "open" and args and str(args[0]).endswith("MNI152_T1_2mm.nii.gz"):
        print("chatty library: python-level print")
        os.write(1, b"chatty library: C-level write to fd 1\\n")

sys.addaudithook(_chatty)
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One worker for the whole file (start-up costs seconds), with the chatty library installed."""
    folder = tmp_path_factory.mktemp("worker")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(CHATTY_SITECUSTOMIZE)
    pythonpath = os.pathsep.join([str(folder / "site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    raw = RawWorker(folder / "worker.log", env={"PYTHONPATH": pythonpath})
    yield raw
    raw.close()


def test_hello_reports_protocol_versions_and_device(worker):
    import torch

    reply = worker.call("h1", "hello")
    assert reply["event"] == "result", reply
    hello = reply["result"]
    assert hello["protocol_version"] == PROTOCOL_VERSION
    assert hello["torch_version"] == torch.__version__
    assert hello["python"] == ".".join(map(str, sys.version_info[:3]))
    assert hello["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (hello["gpu"] is not None) == torch.cuda.is_available()
    assert hello["num_threads"] == 1
    assert Path(hello["log_file"]) == worker.log_file


def test_segment_writes_a_labelmap_on_the_input_geometry(worker, model_4mm, fsl_t1_2mm, tmp_path):
    output = tmp_path / "labels.nrrd"
    reply = worker.call("s1", "segment", {"model": str(model_4mm), "input": str(fsl_t1_2mm), "output": str(output)})
    assert reply["event"] == "result", reply
    summary = reply["result"]
    assert Path(summary["output"]) == output
    assert [label["name"] for label in summary["labels"]] == ["background", "brain"]
    source, labelmap = read_image(fsl_t1_2mm), read_image(output)
    assert labelmap.same_grid(source)
    assert labelmap.array.shape == source.array.shape
    assert set(np.unique(labelmap.array)) <= {0, 1}


def test_garbage_lines_get_one_line_errors_and_the_worker_keeps_serving(worker):
    garbage = [
        b"this is not json\n",
        b"\xff\xfe\x00 binary junk\n",
        b"[1, 2, 3]\n",
        b'{"method": "hello"}\n',  # no id
        b'{"id": "g5", "method": "make_coffee"}\n',
        b'{"id": "g6", "method": "segment", "params": {"input": 3}}\n',
        b'{"id": "g7", "method": "segment", "params": "not an object"}\n',
    ]
    for line in garbage:
        worker.send_raw(line)
    errors = [worker.next() for _ in garbage]
    for message in errors:
        assert message["event"] == "error", message
        assert message["error"]["kind"] == "bad_request"
        assert "\n" not in message["error"]["message"]
    assert [m["id"] for m in errors[-3:]] == ["g5", "g6", "g7"]
    assert "make_coffee" in errors[4]["error"]["message"]
    assert "'model'" in errors[5]["error"]["message"]  # names the missing parameter
    assert worker.call("g8", "hello")["event"] == "result"


def test_a_missing_input_file_is_a_bad_input_error_naming_it(worker, model_4mm, tmp_path):
    missing = tmp_path / "no_such_scan.nii.gz"
    reply = worker.call(
        "m1", "segment", {"model": str(model_4mm), "input": str(missing), "output": str(tmp_path / "out.nrrd")}
    )
    assert reply["event"] == "error"
    assert reply["error"]["kind"] == "bad_input"
    assert str(missing) in reply["error"]["message"]
    missing_model = worker.call("m2", "load_model", {"model": str(tmp_path / "no_model")})
    assert missing_model["error"]["kind"] == "bad_model"
    assert str(tmp_path / "no_model") in missing_model["error"]["message"]
    assert not (tmp_path / "out.nrrd").exists()


def test_status_lists_the_loaded_model_and_memory(worker, model_4mm):
    reply = worker.call("st1", "load_model", {"model": str(model_4mm)})
    assert reply["result"]["labels"][1]["name"] == "brain"
    status = worker.call("st2", "status")["result"]
    assert [entry["path"] for entry in status["models"]] == [str(model_4mm.resolve())]
    assert status["memory"]["rss_mb"] > 50  # torch and MONAI are loaded
    assert status["jobs"] == []


def test_classify_runs_the_engine_classifier_and_refuses_a_segmentation_model(worker, model_4mm, fsl_t1_2mm, tmp_path):
    import torch

    from meddl.classify import default_classifier_spec
    from meddl.models import build_network, save_model

    spec = default_classifier_spec(
        ["control", "patient"], spatial_dims=3, patch_size=(32, 32, 32), spacing=(8.0, 8.0, 8.0), widths=(4, 8, 16, 32)
    )
    torch.manual_seed(0)
    classifier = save_model(spec, build_network(spec), tmp_path / "classifier")
    heatmap = tmp_path / "heat.nii.gz"
    reply = worker.call(
        "k1", "classify", {"model": str(classifier), "input": str(fsl_t1_2mm), "heatmap_output": str(heatmap)}
    )
    assert reply["event"] == "result", reply
    probabilities = reply["result"]["probabilities"]
    assert set(probabilities) == {"control", "patient"}
    assert abs(sum(probabilities.values()) - 1.0) < 1e-3
    assert read_image(heatmap).same_grid(read_image(fsl_t1_2mm))
    wrong = worker.call("k2", "classify", {"model": str(model_4mm), "input": str(fsl_t1_2mm)})
    assert wrong["event"] == "error" and wrong["error"]["kind"] == "bad_model", wrong


def test_model_cache_reloads_a_rewritten_package_and_keeps_only_a_few(model_4mm, tmp_path):
    from meddl.worker import ModelCache

    cache = ModelCache(capacity=1)
    first, hit, _ = cache.get(model_4mm, "cpu")
    assert not hit
    again, hit, seconds = cache.get(model_4mm / "model.json", "cpu")  # the json path names the same package
    assert hit and again is first and seconds == 0.0
    stamp = (model_4mm / "weights.safetensors").stat().st_mtime_ns + 1_000_000_000
    os.utime(model_4mm / "weights.safetensors", ns=(stamp, stamp))  # new weights written in place
    reloaded, hit, _ = cache.get(model_4mm, "cpu")
    assert not hit and reloaded is not first
    assert len(cache.describe()) == 1
    other = make_unet_package(tmp_path / "other", spacing=4.0)
    cache.get(other, "cpu")
    assert [entry["path"] for entry in cache.describe()] == [str(other.resolve())]  # capacity 1: oldest evicted


def test_a_segmentation_does_not_wait_behind_a_continual_update(
    worker, model_4mm, fsl_t1_2mm, fsl_brain_mask_2mm, tmp_path
):
    from meddl.continual import init_home

    home = tmp_path / "home"
    init_home(model_4mm, home, regression=[(fsl_t1_2mm, fsl_brain_mask_2mm, "A")])
    stored = worker.call(
        "c1",
        "submit_correction",
        {"model": str(home), "image": str(fsl_t1_2mm), "labelmap": str(fsl_brain_mask_2mm), "site": "B"},
    )
    assert stored["event"] == "result", stored
    assert stored["result"]["split"] == "train"

    worker.send("u1", "update", {"model": str(home), "max_steps": 100000, "max_seconds": 120})
    update_messages = []
    while not any(m.get("event") == "progress" and m.get("fraction", 0) > 0 for m in update_messages):
        message = worker.next()
        assert message.get("id") == "u1" and message["event"] != "error", message
        update_messages.append(message)
    assert update_messages[0]["event"] == "accepted" and update_messages[0]["queue"] == "long"

    # The update is training now; a segmentation of the same model home runs at once beside it.
    worker.send("s9", "segment", {"model": str(home), "input": str(fsl_t1_2mm), "output": str(tmp_path / "l.nrrd")})
    finals = {}  # id -> final message, in arrival order
    while not {"s9", "u1"} <= set(finals):
        message = worker.next()
        if message.get("id") == "s9" and message["event"] == "accepted":
            assert (message["queue"], message["queue_position"]) == ("inference", 0)
        if message.get("event") in ("result", "error"):
            finals[message["id"]] = message
            if message["id"] == "s9":
                worker.send("x1", "cancel", {"id": "u1"})  # done with the update: stop it
    assert list(finals)[0] == "s9" and finals["s9"]["event"] == "result", finals["s9"]
    assert finals["u1"]["event"] == "error" and finals["u1"]["error"]["kind"] == "cancelled", finals["u1"]
    assert finals["x1"]["result"]["state"] == "cancelling"


def test_library_prints_stay_off_the_protocol_stream_and_end_of_input_stops_cleanly(
    worker, model_4mm, fsl_t1_2mm, tmp_path
):
    # Runs last: it closes the module's worker.
    reply = worker.call(
        "p1", "segment", {"model": str(model_4mm), "input": str(fsl_t1_2mm), "output": str(tmp_path / "out.nii.gz")}
    )
    assert reply["event"] == "result", reply
    started = time.monotonic()
    assert worker.close() == 0  # closes stdin: end of input is a clean exit
    assert time.monotonic() - started < 20
    assert "end of input" in worker.log_file.read_text()
    stderr = worker.stderr_path.read_text()
    assert "python-level print" in stderr and "C-level write to fd 1" in stderr  # the library did print
    assert len(worker.raw_lines) > 20
    for line in worker.raw_lines:
        message = json.loads(line)  # ... and yet every stdout line is a protocol message
        assert message["event"] in ("accepted", "progress", "result", "error")
