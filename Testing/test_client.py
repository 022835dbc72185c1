"""meddl.client against the real worker process: warm models, queue places, cancel, a killed worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from worker_helpers import make_unet_package

from meddl.client import Job, WorkerClient
from meddl.errors import InputError, ModelError
from meddl.protocol import PROTOCOL_VERSION, WorkerExited


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        # Many weights on a coarse grid: loading costs like a real model, computing stays cheap on CPU.
        "heavy": make_unet_package(folder / "heavy-4mm", 4.0, channels=(4, 8, 16, 32, 64, 512), num_res_units=2),
        # A 2 mm model with test-time augmentation: a request that runs for seconds (to cancel or kill).
        "slow": make_unet_package(folder / "slow-2mm", 2.0),
    }


@pytest.fixture(scope="module")
def restarts():
    return []


@pytest.fixture(scope="module")
def client(tmp_path_factory, restarts):
    log = tmp_path_factory.mktemp("client") / "worker.log"
    worker = WorkerClient(env={**os.environ, "MEDDL_NUM_THREADS": "1"}, log_path=log, on_restart=restarts.append)
    worker.start()
    yield worker
    worker.shutdown()


def slow_request(models, fsl_t1_2mm, output: Path) -> dict:
    return {"model": str(models["slow"]), "input": str(fsl_t1_2mm), "output": str(output), "tta": True}


def wait_until(client: WorkerClient, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        client.poll(timeout=0.05)


def test_start_reports_versions_and_device(client):
    import torch

    assert client.alive
    assert client.hello["protocol_version"] == PROTOCOL_VERSION
    assert client.hello["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert client.hello["pid"] == client.pid
    assert Path(client.hello["log_file"]) == client.log_path


def test_warm_second_request_is_faster_than_the_first(client, models, fsl_t1_2mm, tmp_path):
    def segment(index: int):
        started = time.perf_counter()
        result = client.call(
            "segment",
            {"model": str(models["heavy"]), "input": str(fsl_t1_2mm), "output": str(tmp_path / f"labels{index}.nrrd")},
            timeout=120,
        )
        return time.perf_counter() - started, result

    first_seconds, first = segment(0)
    warm = [segment(index) for index in (1, 2, 3)]
    warm_seconds = min(seconds for seconds, _ in warm)  # the least disturbed by other processes on the machine
    print(f"first {first_seconds:.3f} s, warm {warm_seconds:.3f} s, ratio {first_seconds / warm_seconds:.2f}")
    assert first["model_cache"] == "miss" and first["timings_s"]["load_model"] > 0
    assert all(result["model_cache"] == "hit" and result["timings_s"]["load_model"] == 0 for _, result in warm)
    assert warm_seconds < 0.8 * first_seconds


def test_queued_jobs_report_their_place_and_status_answers_while_a_job_runs(client, models, fsl_t1_2mm, tmp_path):
    running = client.submit("segment", slow_request(models, fsl_t1_2mm, tmp_path / "a.nrrd"))
    second = client.submit(
        "segment", {"model": str(models["heavy"]), "input": str(fsl_t1_2mm), "output": str(tmp_path / "b.nrrd")}
    )
    third = client.submit(
        "segment", {"model": str(models["heavy"]), "input": str(fsl_t1_2mm), "output": str(tmp_path / "c.nrrd")}
    )
    wait_until(client, lambda: third.queue_position is not None and running.state == "running")
    assert (running.queue_position, second.queue_position, third.queue_position) == (0, 1, 2)
    assert second.state == "queued" and second.message == "queued: 1 job ahead"

    started = time.perf_counter()
    status = client.status(timeout=30)
    status_seconds = time.perf_counter() - started
    assert not running.done, "the slow job should still be running"
    assert [(job["id"], job["state"], job["queue_position"]) for job in status["jobs"]] == [
        (running.id, "running", 0),
        (second.id, "queued", 1),
        (third.id, "queued", 2),
    ]
    assert status_seconds < 5.0  # answered by the reader thread, not after the running job

    poll_started = time.perf_counter()
    client.poll()
    assert time.perf_counter() - poll_started < 0.1  # a GUI timer can call it while the job runs

    client.cancel(third)
    wait_until(client, lambda: third.done)
    assert third.state == "cancelled" and not running.done
    client.wait(second, timeout=120)
    assert running.state == "done" and second.state == "done"
    assert (tmp_path / "b.nrrd").exists() and not (tmp_path / "c.nrrd").exists()


def test_cancel_a_running_job_then_serve_the_next(client, models, fsl_t1_2mm, tmp_path):
    progress = []
    job = client.submit(
        "segment",
        slow_request(models, fsl_t1_2mm, tmp_path / "cancelled.nrrd"),
        on_progress=lambda fraction, message: progress.append((fraction, message)),
    )
    wait_until(client, lambda: any(message.startswith("resampling") for _, message in progress))
    cancelled_at = time.perf_counter()
    client.cancel(job)
    client.wait(job, timeout=60)
    latency = time.perf_counter() - cancelled_at
    assert job.state == "cancelled", (job.state, job.error)
    assert latency < 10.0  # stops at its next sliding-window step, not at the end of four TTA passes
    assert not (tmp_path / "cancelled.nrrd").exists()
    result = client.call(
        "segment",
        {"model": str(models["heavy"]), "input": str(fsl_t1_2mm), "output": str(tmp_path / "next.nrrd")},
        timeout=120,
    )
    assert Path(result["output"]).exists()


def test_bad_requests_raise_the_matching_error(client, models, tmp_path):
    missing = tmp_path / "missing_scan.nrrd"
    with pytest.raises(InputError, match=str(missing)):
        client.call(
            "segment",
            {"model": str(models["heavy"]), "input": str(missing), "output": str(tmp_path / "x.nrrd")},
            timeout=60,
        )
    with pytest.raises(ModelError, match="no such model package"):
        client.call("load_model", {"model": str(tmp_path / "no_model")}, timeout=60)
    assert client.alive


@pytest.mark.skipif(sys.platform.startswith("win"), reason="SIGKILL is POSIX")
def test_a_killed_worker_fails_its_jobs_clearly_and_is_restarted(client, models, fsl_t1_2mm, tmp_path, restarts):
    finished = []
    running = client.submit("segment", slow_request(models, fsl_t1_2mm, tmp_path / "a.nrrd"), on_done=finished.append)
    queued = client.submit("load_model", {"model": str(models["heavy"])}, on_done=finished.append)
    wait_until(client, lambda: running.state == "running")
    old_pid = client.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_until(client, lambda: running.done and queued.done)
    for job in (running, queued):
        assert job.state == "failed"
        assert isinstance(job.error, WorkerExited) and job.error.returncode == -signal.SIGKILL
        assert f"worker process exited unexpectedly (code {-signal.SIGKILL}); see log {client.log_path}" == str(
            job.error
        )
    assert finished == [running, queued]  # on_done told the caller
    assert not client.alive and restarts == []

    result = client.call(
        "segment",
        {"model": str(models["heavy"]), "input": str(fsl_t1_2mm), "output": str(tmp_path / "after.nrrd")},
        timeout=180,
    )
    assert Path(result["output"]).exists()
    assert client.alive and client.pid != old_pid
    assert len(restarts) == 1 and "exited unexpectedly" in restarts[0]
    assert client.hello["pid"] == client.pid


def test_an_interpreter_without_the_engine_dependencies_fails_with_one_clear_line(tmp_path):
    import subprocess

    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not base.exists() or subprocess.run([str(base), "-c", "import monai"], capture_output=True).returncode == 0:
        pytest.skip("needs a base interpreter without MONAI (the venv's base Python)")
    client = WorkerClient(python_executable=str(base), log_path=tmp_path / "worker.log")
    with pytest.raises(WorkerExited) as caught:
        client.start()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("worker process exited unexpectedly (code 3): ")
    assert caught.value.returncode == 3  # what a GUI checks to offer installing torch and MONAI
    assert "cannot import the engine's dependencies (No module named" in message
    assert message.endswith(f"see log {tmp_path / 'worker.log'}")
    assert not client.alive


def test_shutdown_stops_the_worker(client):
    assert isinstance(client.submit("status"), Job)
    assert client.shutdown() == 0
    assert not client.alive
