"""Peak resident memory of `meddl segment` on a 512x512x400 int16 CT-sized volume. Prints figures, not pass/fail.

    nice .venv/bin/python benchmarks/memory_ct.py [--model DIR] [--threads 2]

The volume is the real head CT of ``invesalius-examples`` (Cranium.inv3, 256x256x108 at 0.957x0.957x1.5 mm,
HU) resampled to 512x512x400 over the same field of view, when the Debian package is installed; else a
synthetic head-like CT (a skull shell around soft tissue, in air) of the same size. `meddl segment` runs in
a fresh child process; its peak RSS is read with ``resource.getrusage(RUSAGE_CHILDREN)`` by a wrapper
process that runs nothing else. The target is ≤ 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZE_IJK = (512, 512, 400)
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

# Runs `meddl segment` as its only child and prints that child's peak RSS (Linux: ru_maxrss in KiB).
WRAPPER = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - started
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)
"""


def cranium_ct() -> Tuple[sitk.Image, str]:
    """The invesalius head CT (HU) at its own grid, as DATA.md describes reading it."""
    with tarfile.open(CRANIUM, "r:gz") as archive:

        def member(end: str) -> bytes:
            return archive.extractfile(next(n for n in archive.getnames() if n.endswith(end))).read()

        meta = plistlib.loads(member("main.plist"))
        hu = np.frombuffer(member("matrix.dat"), "<i2").reshape(meta["matrix"]["shape"])
    image = sitk.GetImageFromArray(hu.copy())
    image.SetSpacing([float(s) for s in meta["spacing"]])
    return image, f"invesalius-examples Cranium.inv3 (real head CT, {list(image.GetSize())} voxels) resampled"


def synthetic_ct() -> Tuple[sitk.Image, str]:
    """A head-like CT: soft-tissue ellipsoid (40 HU) inside a 7 mm bone shell (1000 HU), in air, with noise."""
    size = np.array([256, 256, 200])
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    radius = np.sqrt((i / 0.8) ** 2 + (j / 0.9) ** 2 + (k / 0.85) ** 2)
    hu = np.full(radius.shape, -1000, np.int16)
    hu[radius < 1.0] = 1000
    hu[radius < 0.94] = 40
    hu += np.random.default_rng(0).normal(0, 10, hu.shape).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing([0.96, 0.96, 1.25])
    return image, "synthetic head-like CT (invesalius-examples not installed)"


def ct_volume(path: Path) -> str:
    """Write the 512x512x400 int16 CT-sized volume to ``path`` (uncompressed NRRD); returns what it is."""
    source, text = cranium_ct() if CRANIUM.is_file() else synthetic_ct()
    extent = np.asarray(source.GetSize()) * np.asarray(source.GetSpacing())
    reference = sitk.Image(list(SIZE_IJK), sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(e / n) for e, n in zip(extent, SIZE_IJK)))
    reference.SetOrigin(source.GetOrigin())
    volume = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(volume, str(path), useCompression=False)
    spacing = ", ".join(f"{s:.3f}" for s in volume.GetSpacing())
    return f"{text} to {list(volume.GetSize())} at ({spacing}) mm, int16"


def peak_rss(command, env) -> Tuple[int, float, float]:
    """(exit code, peak RSS in MiB, seconds) of ``command`` run as the only child of a fresh wrapper process."""
    output = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
    code, kib, seconds = output.stdout.split()
    return int(code), int(kib) / 1024.0, float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model package (default: the bundled brain-t1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    from segment_speed import choose_model

    scratch = Path(tempfile.mkdtemp(prefix="meddl-memory-"))
    model_dir, model_text = choose_model(args.model, scratch)
    volume = scratch / "ct_512x512x400.nrrd"
    started = time.perf_counter()
    volume_text = ct_volume(volume)
    print(f"model: {model_text}")
    print(
        f"volume: {volume_text} ({volume.stat().st_size / 2**20:.0f} MiB on disk, made in "
        f"{time.perf_counter() - started:.1f} s)"
    )
    env = {
        **os.environ,
        "MEDDL_NUM_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(REPO),
    }
    baseline_code, baseline_mib, _ = peak_rss(
        [sys.executable, "-c", "import meddl.infer, meddl.cli, torch, monai, SimpleITK"], env
    )
    output = scratch / "ct_labels.nrrd"
    command = [
        sys.executable,
        "-m",
        "meddl",
        "--json",
        "segment",
        "--model",
        str(model_dir),
        "--input",
        str(volume),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--force-modality",
    ]
    code, mib, seconds = peak_rss(command, env)
    if code != 0 or not output.exists():
        print(f"meddl segment failed with exit code {code}")
        return 1
    labels = sitk.ReadImage(str(output))
    voxels = int(np.prod(SIZE_IJK))
    figures = {
        "model": model_text,
        "volume": volume_text,
        "voxels": voxels,
        "input_int16_mib": voxels * 2 / 2**20,
        "peak_rss_mib": mib,
        "imports_only_peak_rss_mib": baseline_mib,
        "seconds": seconds,
        "threads": args.threads,
        "labelmap_size": list(labels.GetSize()),
    }
    print(f"imports alone (torch, MONAI, SimpleITK, meddl): peak RSS {baseline_mib:.0f} MiB")
    print(
        f"`meddl segment` on {SIZE_IJK[0]}x{SIZE_IJK[1]}x{SIZE_IJK[2]} int16 ({figures['input_int16_mib']:.0f} MiB "
        f"of voxels): peak RSS {mib:.0f} MiB = {mib / 1024:.2f} GiB (target ≤ 4 GB), {seconds:.1f} s "
        f"with {args.threads} threads"
    )
    print(f"peak RSS / input voxel bytes = {mib / figures['input_int16_mib']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
