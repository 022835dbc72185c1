"""Training a classifier package: augmentation, class-imbalance handling, mixup, early stopping, calibration.

Every image is resampled onto the network grid once (:func:`meddl.classify.preprocess.prepare_input`, the
same step inference uses) and kept in memory; augmentation (MONAI) then runs on those small arrays.
After training, the best epoch's weights (lowest validation loss) are kept and a temperature is fitted
on the validation split (temperature scaling), with the expected calibration error measured before and
after; both go into ``model.json`` under ``calibration``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.classify.calibration import expected_calibration_error, fit_temperature, softmax_with_temperature
from meddl.classify.preprocess import check_classifier_spec, class_value, prepare_input, read_classification_input
from meddl.errors import InputError, ModelError
from meddl.io import Image
from meddl.models import ModelSpec, build_network, save_model
from meddl.progress import CancelToken, ProgressCallback, no_progress

__all__ = [
    "LOSSES",
    "default_classifier_spec",
    "load_classification_datalist",
    "split_datalist",
    "prepare_datalist",
    "recalibrate_batchnorm",
    "train_classifier",
]

PathLike = Union[str, os.PathLike]
LOSSES = ("ce", "weighted_ce", "focal")
PALETTE = [[0.2, 0.4, 0.9], [0.9, 0.3, 0.2], [0.2, 0.7, 0.3], [0.9, 0.7, 0.1], [0.6, 0.3, 0.8], [0.1, 0.7, 0.8]]


def default_classifier_spec(
    classes: Sequence[str],
    spatial_dims: int = 2,
    patch_size: Sequence[int] = (64, 64),
    spacing: Optional[Sequence[float]] = None,
    name: str = "classifier",
    normalization: Optional[Dict[str, Any]] = None,
    widths: Sequence[int] = (8, 16, 32, 64),
    volume_slice: str = "refuse",
) -> ModelSpec:
    """A small MONAI ResNet classifier (one basic block per stage) for ``classes``.

    The first convolution keeps full resolution and there is no max-pool, so the last stage (the Grad-CAM
    layer) has 1/8 of the input size: a 64-pixel input gives an 8x8 heat map before upsampling.
    """
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise InputError(f"need at least two distinct class names, got {list(classes)}")
    data = {
        "name": name,
        "version": "1",
        "task": "classification",
        "architecture": {
            "name": "ResNet",
            "args": {
                "block": "basic",
                "layers": [1, 1, 1, 1],
                "block_inplanes": [int(w) for w in widths],
                "spatial_dims": int(spatial_dims),
                "n_input_channels": 1,
                "num_classes": len(classes),
                "conv1_t_size": 3,
                "conv1_t_stride": 1,
                "no_max_pool": True,
            },
        },
        "labels": [
            {"value": index, "name": str(label), "color": PALETTE[index % len(PALETTE)]}
            for index, label in enumerate(classes)
        ],
        "input": {
            "channels": 1,
            "spacing": [float(s) for s in spacing] if spacing else None,
            "patch_size": [int(p) for p in patch_size],
            "normalization": normalization or {"kind": "percentile", "lower": 0.5, "upper": 99.5},
            "volume_slice": volume_slice,
        },
        "gradcam": {"target_layer": "layer4"},
    }
    spec = ModelSpec.from_json({"format": "meddl-model", "schema_version": 1, **data})
    check_classifier_spec(spec)
    return spec


def load_classification_datalist(path: PathLike, section: Optional[str] = None) -> List[Dict[str, Any]]:
    """Read a JSON datalist of ``{"image": path, "label": class name, "group": optional}``.

    The file holds a list, or an object with lists under keys such as ``training``, ``validation``, ``test``
    (``section`` picks one; missing section → empty list). Relative image paths are relative to the file.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError("no such datalist file", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"datalist is not valid JSON ({' '.join(str(error).split())})", path) from None
    if isinstance(data, dict):
        if section is None:
            raise InputError(f"datalist is an object; name a section ({', '.join(map(str, data))})", path)
        entries = data.get(section, [])
    else:
        entries = data
    if not isinstance(entries, list):
        raise InputError("datalist must be a list of {'image', 'label'} objects", path)
    result = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "label" not in entry:
            raise InputError(f"datalist entry {number} needs a string 'image' and a 'label' (class name)", path)
        image = Path(entry["image"])
        item = {"image": str(image if image.is_absolute() else path.parent / image), "label": str(entry["label"])}
        if "group" in entry:
            item["group"] = str(entry["group"])
        result.append(item)
    return result


def _class_index(spec: ModelSpec) -> Dict[str, int]:
    return {label.name: label.value for label in spec.labels}


def split_datalist(
    datalist: List[Dict[str, Any]], val_fraction: float, seed: int
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Split into (train, validation). Items sharing a ``group`` (e.g. slices of one scan) stay together;
    without groups the split is stratified by class, with at least one validation item per class that has two."""
    rng = np.random.default_rng(seed)
    if any("group" in item for item in datalist):
        groups = sorted({str(item.get("group", index)) for index, item in enumerate(datalist)})
        rng.shuffle(groups)
        target = max(1, int(round(val_fraction * len(datalist))))
        chosen, count = set(), 0
        for group in groups:
            if count >= target or len(chosen) == len(groups) - 1:
                break
            chosen.add(group)
            count += sum(1 for i, item in enumerate(datalist) if str(item.get("group", i)) == group)
        val = [item for i, item in enumerate(datalist) if str(item.get("group", i)) in chosen]
        train = [item for i, item in enumerate(datalist) if str(item.get("group", i)) not in chosen]
        return train, val
    train, val = [], []
    for label in sorted({str(item["label"]) for item in datalist}):
        members = [item for item in datalist if str(item["label"]) == label]
        order = rng.permutation(len(members))
        n_val = int(round(val_fraction * len(members)))
        n_val = min(max(n_val, 1 if len(members) >= 2 else 0), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val


def prepare_datalist(
    datalist: List[Dict[str, Any]], spec: ModelSpec, slice_policy: Optional[str] = None, cancel=None
) -> Tuple[np.ndarray, np.ndarray]:
    """Resample every item onto the network grid: arrays ``[N, C, *patch]`` and class indices ``[N]``."""
    classes = _class_index(spec)
    arrays, labels = [], []
    for index, item in enumerate(datalist):
        if cancel:
            cancel.check()
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise InputError(f"datalist item {index} needs 'image' and 'label'")
        source = item["image"] if isinstance(item["image"], Image) else None
        name = str(item["label"])
        where = source.metadata.get("source") if source is not None else item["image"]
        class_value(spec, name, where)
        image = source if source is not None else read_classification_input(item["image"])
        arrays.append(prepare_input(image, spec, slice_policy).array)
        labels.append(classes[name])
    if not arrays:
        return np.zeros((0, spec.in_channels, *spec.patch_size), np.float32), np.zeros(0, np.int64)
    return np.stack(arrays), np.asarray(labels, dtype=np.int64)


def _field_of_view_padding():
    """A MONAI transform that imitates a scanner's circular field of view with padding below the minimum.

    CT stores voxels outside the reconstruction circle at -2000 or -3024 HU; after per-image percentile
    normalisation that padding becomes black and everything inside, air included, is lifted to grey. Applied to
    every class alike, it teaches the model that such a frame says nothing about the class.
    """
    from monai.transforms import RandomizableTransform

    class RandFieldOfViewPadding(RandomizableTransform):
        def __init__(self, prob: float = 0.25, radius=(0.35, 0.6), lift=(0.1, 0.4)) -> None:
            RandomizableTransform.__init__(self, prob)
            self.radius_range, self.lift_range = radius, lift

        def randomize(self, data=None) -> None:
            super().randomize(None)
            self.radius = self.R.uniform(*self.radius_range)
            self.lift = self.R.uniform(*self.lift_range)

        def __call__(self, image):
            import torch

            self.randomize()
            if not self._do_transform:
                return image
            array = torch.as_tensor(image)
            spatial = array.shape[1:]
            grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij")
            inside = (sum(g**2 for g in grids) <= self.radius**2 * 2)[None]
            low, high = array.min(), array.max()
            lifted = low + self.lift * (high - low) + (array - low) * (1 - self.lift)
            return torch.where(inside, lifted, low)

    return RandFieldOfViewPadding()


def _augmentation(spatial_dims: int, patch_size: Sequence[int], seed: int):
    """MONAI intensity and spatial augmentation on one ``[C, *patch]`` array, seeded."""
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandBiasField,
        RandFlip,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandHistogramShift,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSimulateLowResolution,
        RandZoom,
    )

    rotate = (np.pi / 12,) if spatial_dims == 2 else (np.pi / 12,) * 3
    transforms = [
        RandAffine(
            prob=0.8,
            rotate_range=rotate,
            scale_range=(0.15,) * spatial_dims,
            translate_range=[0.08 * p for p in patch_size],
            padding_mode="zeros",
        ),
        # Tighter fields of view: crops that cut the anatomy, as other scanners and protocols do.
        RandZoom(prob=0.3, min_zoom=1.0, max_zoom=1.8, keep_size=True),
        *[RandFlip(prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)],
        RandSimulateLowResolution(
            prob=0.2, zoom_range=(0.4, 0.9), upsample_mode="bilinear" if spatial_dims == 2 else "trilinear"
        ),
        _field_of_view_padding(),
        RandBiasField(prob=0.3, coeff_range=(0.0, 0.3)),
        RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6)),
        # A random monotone remapping of the intensity histogram: a model cannot lean on where a scanner puts
        # background, air or padding.
        RandHistogramShift(prob=0.3, num_control_points=(4, 8)),
        RandScaleIntensity(prob=0.5, factors=0.25),
        RandShiftIntensity(prob=0.5, offsets=0.15),
        # Noise and smoothing for every class: averaged templates are smoother than any scan, and a model must
        # not learn "smooth" or "noisy" as a class.
        RandGaussianSmooth(prob=0.3, sigma_x=(0.4, 1.2), sigma_y=(0.4, 1.2), sigma_z=(0.4, 1.2)),
        RandGaussianNoise(prob=0.5, std=0.08),
    ]
    return Compose(transforms).set_random_state(seed=seed)


def _as_array(value) -> np.ndarray:
    """An owned float32 copy of a transform's output (a MONAI MetaTensor, a tensor or an array), so a batch
    never holds views into memory a transform may reuse."""

    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor).numpy().astype(np.float32, copy=True)
    return np.array(value, dtype=np.float32, copy=True)


def _loss(kind: str, class_weights):
    import torch
    from monai.losses import FocalLoss

    if kind == "focal":
        focal = FocalLoss(use_softmax=True, gamma=2.0, weight=class_weights, reduction="mean")
        return lambda logits, soft_targets: focal(logits, soft_targets)
    weight = class_weights if kind == "weighted_ce" else None
    cross_entropy = torch.nn.CrossEntropyLoss(weight=weight)
    return lambda logits, soft_targets: cross_entropy(logits, soft_targets)


def recalibrate_batchnorm(network, images: np.ndarray, batch_size: int = 32) -> None:
    """Re-estimate BatchNorm running statistics as the exact average over ``images`` (precise BN).

    With few small batches per epoch, the running averages lag weights that change quickly, and a network
    that classifies perfectly in training mode can predict one class for everything in eval mode. One
    forward pass over the (un-augmented) training images, without gradients, makes eval mode match.
    """
    import torch

    layers = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the pass
    network.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            network(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    network.eval()


def train_classifier(
    spec: ModelSpec,
    datalist: List[Dict[str, Any]],
    output_dir: PathLike,
    epochs: int = 30,
    val_datalist: Optional[List[Dict[str, Any]]] = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-4,
    loss: str = "weighted_ce",
    balanced_sampler: bool = False,
    mixup_alpha: float = 0.2,
    augment: bool = True,
    patience: int = 8,
    max_seconds: Optional[float] = None,
    slice_policy: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """Train ``spec``'s network on ``datalist`` and write a calibrated package to ``output_dir``.

    Args:
        spec: the package to train (task ``classification``; class names are its label names).
        datalist: ``[{"image": path or Image, "label": class name, "group": optional}]``; items sharing
            a group (slices of one scan, one source) are never split between training and validation.
        output_dir: the new package folder (must not exist: versions are immutable).
        epochs: the most epochs; training stops earlier when the validation loss has not improved for
            ``patience`` epochs, or after ``max_seconds``.
        val_datalist: an explicit validation set (e.g. other sources); else ``val_fraction`` of ``datalist``.
        loss: ``ce``, ``weighted_ce`` (inverse class frequency) or ``focal`` (MONAI FocalLoss, same weights).
        balanced_sampler: draw training batches with equal probability per class (with replacement).
        mixup_alpha: Beta(alpha, alpha) mixing of pairs of images and their one-hot targets; 0 turns it off.
        augment: MONAI random affine, flips, bias field, gamma, histogram shift, intensity scale/shift and noise.

    Returns:
        The package folder.
    """
    import torch

    progress = progress or no_progress
    check_classifier_spec(spec)
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, not '{loss}'")
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise ModelError("refusing to overwrite an existing model package (versions are immutable)", output_dir)
    threads = num_threads or int(os.environ.get("MEDDL_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    if val_datalist is None:
        train_items, val_items = split_datalist(datalist, val_fraction, seed)
    else:
        train_items, val_items = list(datalist), list(val_datalist)
    if len(train_items) < 2 or len(val_items) < 1:
        raise InputError(
            f"need at least 2 training and 1 validation images, got {len(train_items)} and {len(val_items)}"
        )
    progress(0.0, f"preparing {len(train_items)} training and {len(val_items)} validation images")
    x_train, y_train = prepare_datalist(train_items, spec, slice_policy, cancel)
    x_val, y_val = prepare_datalist(val_items, spec, slice_policy, cancel)
    n_classes = len(spec.labels)
    counts = np.bincount(y_train, minlength=n_classes)
    if (counts == 0).any():
        missing = [label.name for label in spec.labels if counts[label.value] == 0]
        raise InputError(f"no training images of class {', '.join(missing)}")
    class_weights = torch.tensor(len(y_train) / (n_classes * counts), dtype=torch.float32)

    network = build_network(spec)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    criterion = _loss(loss, class_weights)
    validation_criterion = torch.nn.CrossEntropyLoss()
    augmentation = _augmentation(spec.spatial_dims, spec.patch_size, seed) if augment else None
    sampling_weights = (1.0 / counts[y_train]) if balanced_sampler else None
    x_val_tensor = torch.from_numpy(x_val)
    y_val_tensor = torch.from_numpy(y_val)

    best_loss, best_state, best_epoch, stale = float("inf"), None, -1, 0
    history: List[Dict[str, float]] = []
    for epoch in range(epochs):
        network.train()
        if sampling_weights is not None:
            order = rng.choice(
                len(y_train), size=len(y_train), replace=True, p=sampling_weights / sampling_weights.sum()
            )
        else:
            order = rng.permutation(len(y_train))
        epoch_loss, batches = 0.0, 0
        for start in range(0, len(order), batch_size):
            if cancel:
                cancel.check()
            index = order[start : start + batch_size]
            if len(index) < 2 and len(order) > 1:
                continue  # BatchNorm needs two samples; the last lone sample is seen next epoch
            images = np.stack(
                [_as_array(augmentation(x_train[i])) if augmentation is not None else x_train[i] for i in index]
            )
            batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            targets = torch.nn.functional.one_hot(torch.from_numpy(y_train[index]), n_classes).float()
            if mixup_alpha > 0:
                lam = float(rng.beta(mixup_alpha, mixup_alpha))
                partner = torch.from_numpy(rng.permutation(len(index)))
                batch = lam * batch + (1 - lam) * batch[partner]
                targets = lam * targets + (1 - lam) * targets[partner]
            optimizer.zero_grad(set_to_none=True)
            value = criterion(network(batch), targets)
            value.backward()
            optimizer.step()
            epoch_loss += float(value.detach())
            batches += 1
        scheduler.step()

        recalibrate_batchnorm(network, x_train, batch_size)
        with torch.inference_mode():
            val_logits = network(x_val_tensor)
            val_loss = float(validation_criterion(val_logits, y_val_tensor))
            val_accuracy = float((val_logits.argmax(1) == y_val_tensor).float().mean())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": epoch_loss / max(batches, 1),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )
        if val_loss < best_loss - 1e-4:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(network.state_dict()), epoch + 1, 0
        else:
            stale += 1
        elapsed = time.perf_counter() - started
        progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}: val loss {val_loss:.3f}, acc {val_accuracy:.2f}")
        if stale > patience or (max_seconds is not None and elapsed > max_seconds):
            break

    network.load_state_dict(best_state)
    network.eval()
    with torch.inference_mode():
        val_logits = network(x_val_tensor).float().numpy()
    if (val_logits.argmax(1) == y_val).all():
        # Every validation image is right: the likelihood keeps rising as T -> 0, so a fitted T would only
        # reflect the bound. Leave the network's confidence as it is rather than sharpen it without evidence.
        temperature, note = 1.0, "validation split perfectly separated; temperature left at 1"
    else:
        temperature, note = fit_temperature(val_logits, y_val), "fitted by minimising validation NLL"
    before = softmax_with_temperature(val_logits, 1.0)
    after = softmax_with_temperature(val_logits, temperature)
    data = spec.to_json()
    data["calibration"] = {
        "method": "temperature scaling fitted on the validation split",
        "temperature": round(temperature, 6),
        "note": note,
        "validation_images": int(len(y_val)),
        "ece_before": round(expected_calibration_error(before, y_val), 6),
        "ece_after": round(expected_calibration_error(after, y_val), 6),
    }
    data.setdefault("metrics", {})["validation"] = {
        "images": int(len(y_val)),
        "accuracy": round(float((after.argmax(1) == y_val).mean()), 6),
        "loss": round(best_loss, 6),
    }
    data["training"] = {
        "seed": seed,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "loss": loss,
        "balanced_sampler": balanced_sampler,
        "mixup_alpha": mixup_alpha,
        "augment": augment,
        "train_images": int(len(y_train)),
        "train_class_counts": {label.name: int(counts[label.value]) for label in spec.labels},
        "seconds": round(time.perf_counter() - started, 2),
        "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in history],
    }
    trained = ModelSpec.from_json(data)
    folder = save_model(trained, network, output_dir)
    progress(1.0, f"wrote {folder.name} (best epoch {best_epoch}, T={temperature:.2f})")
    return folder
