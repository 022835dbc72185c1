"""Training a segmentation model package from images and labelmaps, resumably, with MONAI.

Images and labels are brought to the package's model grid with :func:`meddl.transforms.to_model_grid`
(labels with nearest-neighbour), so training sees exactly what inference sees. Augmentation simulates
other acquisitions (rotations up to ±30°, scaling, bias field, gamma, noise, low and anisotropic
resolution, fields of view that cut the head, flips) with MONAI dictionary transforms; patches are sampled
class-balanced; the loss is Dice + cross-entropy, the optimiser AdamW with a cosine schedule.

A run keeps one checkpoint file beside the package (``<output>.checkpoint/state.safetensors``: weights,
best weights and optimiser tensors, with the loop state as JSON metadata; never pickle). A run that is
killed, cancelled or stopped by ``max_seconds`` continues from its last saved step when started again.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import InputError, ModelError
from meddl.io import Image, read_image
from meddl.models import ModelPackage, ModelSpec, build_network, load_model, save_model
from meddl.progress import CancelToken, ProgressCallback, no_progress
from meddl.transforms import normalize_intensity, resample_to_grid, to_model_grid

__all__ = [
    "TrainingVolume",
    "load_training_volume",
    "load_datalist",
    "intensity_classes",
    "RandSynthesizeFromTissuesd",
    "RandBrainOnlyd",
    "RandFieldOfViewCutd",
    "RandAnisotropicLowResd",
    "RandSmoothDeformd",
    "RandInferiorExtensiond",
    "RandAtrophyd",
    "RandCoilFieldd",
    "RandLesiond",
    "NormalizeIntensityd",
    "training_transforms",
    "resolve_precision",
    "native_bfloat16",
    "host_description",
    "train_segmentation",
    "checkpoint_path",
    "git_commit",
    "TRAINED_FLIP_AXES",
]

PathLike = Union[str, "os.PathLike[str]"]
CHECKPOINT_FILE = "state.safetensors"
CHECKPOINT_FORMAT = "meddl-train-checkpoint-1"
# The flips training_transforms applies (model-grid axes, as ModelSpec.flip_axes names them): left-right only.
TRAINED_FLIP_AXES = ("i",)


# --------------------------------------------------------------------------------------------- data


@dataclass
class TrainingVolume:
    """One case on its model grid: the raw-intensity image and the label as channel indices (0..C-1).

    ``extra`` holds further label-like maps on the same grid (e.g. a tissue-class map for synthesis).
    """

    name: str
    image: Image
    label: np.ndarray
    extra: Dict[str, np.ndarray]


def _as_image(value: Union[PathLike, Image], what: str, pair: str) -> Image:
    if isinstance(value, Image):
        return value
    path = Path(value)
    if not path.exists():
        raise InputError(f"{what} of pair {pair} does not exist", path)
    return read_image(path)


def _case_name(value: Union[PathLike, Image]) -> str:
    if isinstance(value, Image):
        source = value.metadata.get("source")
        return Path(str(source)).name if source else "in-memory image"
    return Path(value).name


def load_training_volume(
    item: Mapping[str, Any], spec: ModelSpec, name: Optional[str] = None, extra_keys: Sequence[str] = ()
) -> TrainingVolume:
    """Read one datalist entry (``image`` and ``label``: paths or :class:`Image`; optional ``name``) onto the
    model grid.

    Raises:
        InputError: a file is missing/unreadable, the label does not lie on the image's grid, or the label
            holds values the spec does not name (each message names the pair).
    """
    if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
        raise InputError(f"datalist entry {name or item!r} needs 'image' and 'label'")
    name = name or item.get("name") or _case_name(item["image"])
    pair = name if "name" in item or isinstance(item["image"], Image) else f"({item['image']}, {item['label']})"
    image = _as_image(item["image"], "image", pair)
    label = _as_image(item["label"], "label", pair)
    label_source = label.metadata.get("source")
    if label_source is None and not isinstance(item["label"], Image):
        label_source = str(item["label"])
    if image.array.ndim != 3 or label.array.ndim != 3:
        raise InputError(f"pair {pair}: image and label must be 3D volumes", label_source)
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise InputError(f"pair {pair}: the image contains NaN or infinite values", image.metadata.get("source"))
    if not image.same_grid(label):
        raise InputError(
            f"label does not lie on its image's grid (pair {pair}: image size {image.size} spacing "
            f"{tuple(round(s, 4) for s in image.spacing)} origin {tuple(round(o, 3) for o in image.origin)}; label "
            f"size {label.size} spacing {tuple(round(s, 4) for s in label.spacing)} origin "
            f"{tuple(round(o, 3) for o in label.origin)})",
            label_source,
        )
    values = [lb.value for lb in spec.labels]
    found = np.unique(label.array)
    unknown = [v for v in found.tolist() if v not in values]
    if unknown:
        raise InputError(
            f"label values {unknown[:8]} of pair {pair} are not among the model's labels {values}", label_source
        )
    model_image = to_model_grid(image, spec.target_spacing)
    model_label = resample_to_grid(label, model_image, "nearest").array
    index = np.zeros(model_label.shape, dtype=np.uint8)
    for channel, value in enumerate(values):
        index[model_label == value] = channel
    extra = {}
    for key in extra_keys:
        if key in item:
            extra_image = _as_image(item[key], key, pair)
            extra[key] = resample_to_grid(extra_image, model_image, "nearest").array
    model_image.metadata["name"] = name
    return TrainingVolume(name, model_image, index, extra)


def load_datalist(path: PathLike) -> List[Dict[str, str]]:
    """Read a JSON datalist: a list of ``{"image", "label"}`` or MONAI's ``{"training": [...]}``.

    Relative paths are taken relative to the JSON file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such datalist file", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"datalist is not valid JSON ({error})", path) from None
    entries = data.get("training") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError("datalist must be a non-empty list of {'image', 'label'} (or {'training': [...]})", path)
    result = []
    for number, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("image"), str)
            or not isinstance(entry.get("label"), str)
        ):
            raise InputError(f"datalist entry {number} needs string fields 'image' and 'label'", path)
        result.append(
            {
                k: str((path.parent / v) if not Path(v).is_absolute() else v)
                for k, v in entry.items()
                if k in ("image", "label")
            }
        )
    return result


# ------------------------------------------------------------------------------------- augmentation


def _numpy(value: Any) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor or MONAI MetaTensor."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _randomizable_map():
    from monai.transforms import MapTransform, RandomizableTransform

    return MapTransform, RandomizableTransform


_MapTransform, _RandomizableTransform = _randomizable_map()


def intensity_classes(image: Image, foreground: Image) -> Image:
    """A tissue-class map for synthesis: 0 air, 1-3 dark/mid/bright foreground, 4-6 dark/mid/bright elsewhere.

    Classes come from intensity quantiles inside and outside the foreground label; their exact meaning does
    not matter, since :class:`RandSynthesizeFromTissuesd` gives every class a random intensity.
    """
    values = np.asarray(image.array, dtype=np.float32)
    inside = np.asarray(foreground.array) > 0
    air = values < 0.06 * np.percentile(values, 99)
    classes = np.zeros(values.shape, dtype=np.uint8)
    for offset, region, quantiles in ((1, inside, (20, 55)), (4, ~inside & ~air, (33, 66))):
        if region.any():
            low, high = np.percentile(values[region], quantiles)
            classes[region] = offset + (values[region] > low) + (values[region] > high)
    return image.with_array(classes)


class RandSynthesizeFromTissuesd(_RandomizableTransform, _MapTransform):
    """Replace the image by one synthesised from a tissue-class map (SynthStrip/SynthSeg-style).

    Each class gets a random mean intensity and a random noise level, then the result is blurred a random
    amount: the network sees the head's shape with contrasts no scanner made, so it cannot rely on one
    template's contrast.
    """

    def __init__(
        self, image_key: str = "image", tissue_key: str = "tissues", prob: float = 0.5, max_blur_voxels: float = 1.0
    ) -> None:
        _MapTransform.__init__(self, [image_key], allow_missing_keys=True)
        _RandomizableTransform.__init__(self, prob)
        self.image_key, self.tissue_key, self.max_blur = image_key, tissue_key, max_blur_voxels

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        tissues = data.get(self.tissue_key)
        if not self._do_transform or tissues is None:
            return data
        from scipy import ndimage

        classes = np.asarray(tissues).astype(np.int64)
        count = int(classes.max()) + 1
        means = self.R.uniform(0.0, 1.0, count).astype(np.float32)
        means[0] = self.R.uniform(0.0, 0.15)  # air stays dark-ish, as on every MR scanner
        spreads = self.R.uniform(0.0, 0.08, count).astype(np.float32)
        synthetic = means[classes] + spreads[classes] * self.R.standard_normal(classes.shape).astype(np.float32)
        sigma = self.R.uniform(0.0, self.max_blur)
        if sigma > 0.2:
            synthetic[0] = ndimage.gaussian_filter(synthetic[0], sigma)
        data[self.image_key] = np.clip(synthetic, 0.0, None).astype(np.float32)
        return data


class RandBrainOnlyd(_RandomizableTransform, _MapTransform):
    """Zero every voxel outside the foreground label (optionally dilated): a skull-stripped input.

    Teaches the model that an already extracted brain is all brain, and that the brain does not need a
    skull around it to be recognised.
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", prob: float = 0.15, max_dilation: int = 1
    ) -> None:
        _MapTransform.__init__(self, [image_key])
        _RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key, self.max_dilation = image_key, label_key, max_dilation

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        from scipy import ndimage

        mask = _numpy(data[self.label_key]) > 0
        dilation = int(self.R.randint(0, self.max_dilation + 1))
        if dilation:
            mask = ndimage.binary_dilation(mask, iterations=dilation)
        image = _numpy(data[self.image_key])
        data[self.image_key] = np.where(mask, image, np.float32(0.0)).astype(np.float32)
        return data


class RandFieldOfViewCutd(_RandomizableTransform, _MapTransform):
    """Blank the image and label beyond a random plane across one axis: a field of view that cuts the head.

    The plane cuts off up to ``max_fraction`` of the foreground's extent along that axis (e.g. the top 40 % of
    the brain), measured on the label. The first array axis (k: inferior-superior on the model grid, the slice
    direction of most axial scans) is cut ``first_axis_weight`` of the time, the other two share the rest. The
    blanked part is what the scanner never saw; the label there is background because nothing there can be
    segmented, just as the model grid at inference covers only the input's extent.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        prob: float = 0.3,
        max_fraction: float = 0.4,
        label_key: str = "label",
        first_axis_weight: float = 0.5,
    ) -> None:
        _MapTransform.__init__(self, keys)
        _RandomizableTransform.__init__(self, prob)
        self.max_fraction, self.label_key = max_fraction, label_key
        self.axis_weights = [first_axis_weight, (1 - first_axis_weight) / 2, (1 - first_axis_weight) / 2]

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        shape = _numpy(data[self.keys[0]]).shape[1:]
        axis = int(self.R.choice(3, p=self.axis_weights))
        fraction = self.R.uniform(0.05, self.max_fraction)
        from_start = bool(self.R.randint(0, 2))
        label = _numpy(data[self.label_key]) if self.label_key in data else None
        other_axes = tuple(a + 1 for a in range(3) if a != axis)
        present = np.nonzero(label.any(axis=(0, *other_axes)))[0] if label is not None else np.array([])
        first, last = (int(present[0]), int(present[-1]) + 1) if present.size else (0, shape[axis])
        depth = int(round((last - first) * fraction))
        region = [slice(None)] * 4
        region[axis + 1] = slice(0, first + depth) if from_start else slice(last - depth, None)
        for key in self.keys:
            array = _numpy(data[key]).copy()
            array[tuple(region)] = 0
            data[key] = array
        return data


class RandAnisotropicLowResd(_RandomizableTransform, _MapTransform):
    """Average a random number of slices together along one random axis, then interpolate back.

    Simulates thick-slice acquisitions (e.g. 1×1×3 mm) in axial, coronal or sagittal orientation.
    """

    def __init__(self, keys: Sequence[str] = ("image",), prob: float = 0.3, max_factor: float = 3.0) -> None:
        _MapTransform.__init__(self, keys)
        _RandomizableTransform.__init__(self, prob)
        self.max_factor = max_factor

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        import torch
        import torch.nn.functional as functional

        axis = int(self.R.randint(0, 3))
        factor = float(self.R.uniform(1.5, self.max_factor))
        for key in self.keys:
            array = torch.as_tensor(_numpy(data[key]).astype(np.float32))[None]  # 1, C, k, j, i
            size = list(array.shape[2:])
            low = list(size)
            low[axis] = max(2, int(round(size[axis] / factor)))
            reduced = functional.interpolate(array, size=low, mode="area")
            data[key] = functional.interpolate(reduced, size=size, mode="trilinear", align_corners=False)[0].numpy()
        return data


class RandSmoothDeformd(_RandomizableTransform, _MapTransform):
    """A smooth random non-linear deformation (displacements on a coarse grid, interpolated): other head shapes.

    A cheap stand-in for MONAI's ``Rand3DElasticd``, whose full-resolution Gaussian smoothing costs about
    a second per volume on two CPU cores.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        prob: float = 0.3,
        max_voxels: float = 4.0,
        control_points: int = 5,
        modes: Sequence[str] = ("bilinear", "nearest"),
    ) -> None:
        _MapTransform.__init__(self, keys)
        _RandomizableTransform.__init__(self, prob)
        self.max_voxels, self.control_points, self.modes = max_voxels, control_points, list(modes)

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        import torch
        import torch.nn.functional as functional

        shape = _numpy(data[self.keys[0]]).shape[1:]
        points = self.control_points
        coarse = self.R.uniform(-1.0, 1.0, (1, 3, points, points, points)).astype(np.float32) * self.max_voxels
        displacement = functional.interpolate(
            torch.from_numpy(coarse), size=shape, mode="trilinear", align_corners=True
        )[0]  # (3: k, j, i), voxels
        axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
        grid_k, grid_j, grid_i = torch.meshgrid(*axes, indexing="ij")
        scale = [2.0 / max(n - 1, 1) for n in shape]
        grid = torch.stack(
            [
                grid_i + displacement[2] * scale[2],
                grid_j + displacement[1] * scale[1],
                grid_k + displacement[0] * scale[0],
            ],
            dim=-1,
        )[None]
        for key, mode in zip(self.keys, self.modes):
            array = _numpy(data[key])
            volume = torch.as_tensor(array.astype(np.float32))[None]
            warped = functional.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
            data[key] = warped.numpy().astype(array.dtype)
        return data


class RandInferiorExtensiond(_RandomizableTransform, _MapTransform):
    """Extend the volume below its lowest slice by repeating that slice, labelled background: a longer neck.

    Templates stop just under the cerebellum; real scans often run down the neck. The repeated bottom slab
    (spinal cord, muscles) teaches that whatever continues below the labelled brainstem is not brain. Needs
    arrays on the LPS model grid, where the first array axis (k) runs from inferior to superior.
    """

    def __init__(
        self,
        image_keys: Sequence[str] = ("image",),
        label_keys: Sequence[str] = ("label",),
        prob: float = 0.3,
        max_slices: int = 25,
    ) -> None:
        _MapTransform.__init__(self, [*image_keys, *label_keys], allow_missing_keys=True)
        _RandomizableTransform.__init__(self, prob)
        self.image_keys, self.label_keys, self.max_slices = list(image_keys), list(label_keys), max_slices

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        slices = int(self.R.randint(1, self.max_slices + 1))
        for key in self.image_keys + self.label_keys:
            if key not in data:
                continue
            array = _numpy(data[key])
            widths = [(0, 0), (slices, 0), (0, 0), (0, 0)]
            if key in self.image_keys:
                data[key] = np.pad(array, widths, mode="edge")
            else:
                data[key] = np.pad(array, widths, mode="constant")
        return data


class RandAtrophyd(_RandomizableTransform, _MapTransform):
    """Shrink the brain inside an unchanged skull and fill the gap with cerebrospinal fluid: an older brain.

    The template is a young adult average whose brain touches the inside of the skull almost everywhere, so a
    network trained on it alone learns "inside the skull" for brain; an atrophied brain's wider CSF space then comes
    out as brain (a 0.88x brain in the template's skull, the gap at half the brain's median intensity: Dice 0.84 for
    the bundled model, docs/brain-model.md). The brain's contents are
    scaled by a random factor in ``factor_range`` about its centre of mass; the voxels it leaves become background
    with a random CSF intensity, ``csf_range`` times the brain's median (dark on T1; brighter where thin CSF shares
    voxels with tissue), and tissue class ``csf_class`` (see :func:`intensity_classes`). ``anchor="base"`` shrinks
    about the centre's left-right and front-back position at the level with 5 % of the brain below it, instead of the
    centre of mass: the brain stays on the skull base and its top and sides draw in, as an ageing brain's do (the
    centre of mass lifts the cerebellum and brainstem off the skull base; docs/brain-model.md). Needs ``(1, k, j, i)``
    arrays; for ``"base"``, with k running inferior to superior (the model grid's).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        tissue_key: str = "tissues",
        prob: float = 0.3,
        factor_range: Tuple[float, float] = (0.85, 0.98),
        csf_range: Tuple[float, float] = (0.15, 0.6),
        csf_class: int = 1,
        anchor: str = "centre",
    ) -> None:
        if anchor not in ("centre", "base"):
            raise ValueError(f"anchor must be 'centre' or 'base', not {anchor!r}")
        _MapTransform.__init__(self, [image_key, label_key, tissue_key], allow_missing_keys=True)
        _RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key, self.tissue_key = image_key, label_key, tissue_key
        self.factor_range, self.csf_range, self.csf_class, self.anchor = factor_range, csf_range, csf_class, anchor

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        from scipy import ndimage

        label = _numpy(data[self.label_key])
        brain = label[0] > 0
        if not brain.any():
            return data
        factor = float(self.R.uniform(*self.factor_range))
        csf_level = float(self.R.uniform(*self.csf_range))
        centre = np.array(ndimage.center_of_mass(brain))
        if self.anchor == "base":
            rows = np.cumsum(brain.sum(axis=(1, 2)))
            centre[0] = float(np.searchsorted(rows, 0.05 * rows[-1]))
        # Output voxel x shows the source at centre + (x - centre) / factor: the brain drawn `factor` times its size.
        matrix, offset = np.eye(3) / factor, centre - centre / factor

        def shrink(array: np.ndarray, order: int) -> np.ndarray:
            return ndimage.affine_transform(array, matrix, offset, order=order, mode="constant", cval=0)

        shrunk_label = shrink(label[0], 0)
        smaller = shrunk_label > 0  # nearest neighbours: the brain of the shrunk label is the shrunk brain
        vacated = brain & ~smaller
        image = _numpy(data[self.image_key])
        csf = np.float32(csf_level * np.median(image[0][brain]))
        data[self.image_key] = self._paste(image, shrink(image[0].astype(np.float32), 1), smaller, vacated, csf)
        data[self.label_key] = self._paste(label, shrunk_label, smaller, vacated, 0)
        if self.tissue_key in data:
            tissues = _numpy(data[self.tissue_key])
            data[self.tissue_key] = self._paste(tissues, shrink(tissues[0], 0), smaller, vacated, self.csf_class)
        return data

    @staticmethod
    def _paste(original: np.ndarray, shrunk: np.ndarray, smaller: np.ndarray, vacated: np.ndarray, fill) -> np.ndarray:
        result = np.array(original, copy=True)
        result[0][smaller] = shrunk[smaller]
        result[0][vacated] = fill
        return result


class RandCoilFieldd(_RandomizableTransform, _MapTransform):
    """Multiply the image by a receive coil's intensity profile: brighter (or darker) towards the head's surface.

    A phased-array head coil sees the cortex and scalp near its elements brighter than the middle of the head (edge
    over centre 1.5-3 on an uncorrected 32-channel scan); at 7 T the middle is brighter instead. MONAI's
    ``RandBiasFieldd`` as :func:`training_transforms` runs it draws smooth polynomials over the whole volume whose
    edge over centre on the template's brain stays within 1.02-1.24 (5th-95th percentile), and under a stronger
    profile the bundled model draws an orbit as brain (docs/brain-model.md). The profile is
    ``gain ** min((r / R)², 1.5)``: ``r`` the distance from a point near the head's centre (moved up to ``max_shift``
    times R along each axis), R the 95th percentile of the head's distances from its centre, ``gain`` log-uniform in
    ``gain_range``. The head is where the image exceeds 10 % of its 99th percentile. Needs ``(1, k, j, i)`` arrays on
    an isotropic grid.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image",),
        prob: float = 0.3,
        gain_range: Tuple[float, float] = (0.5, 3.0),
        max_shift: float = 0.25,
    ) -> None:
        _MapTransform.__init__(self, keys)
        _RandomizableTransform.__init__(self, prob)
        self.gain_range, self.max_shift = gain_range, max_shift

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        gain = float(np.exp(self.R.uniform(*np.log(self.gain_range))))
        shift = self.R.uniform(-self.max_shift, self.max_shift, 3)
        reference = _numpy(data[self.keys[0]])[0]
        head = np.argwhere(reference > 0.1 * np.percentile(reference, 99))
        if len(head) < 2:
            return data
        centre = head.mean(axis=0)
        radius = max(1.0, float(np.percentile(np.linalg.norm(head - centre, axis=1), 95)))
        centre = centre + shift * radius
        kji = np.ogrid[tuple(slice(0, n) for n in reference.shape)]
        squared = sum(((axis - c) / radius) ** 2 for axis, c in zip(kji, centre))
        field = np.exp(np.log(gain) * np.minimum(squared, 1.5)).astype(np.float32)
        for key in self.keys:
            data[key] = (_numpy(data[key]) * field[None]).astype(np.float32)
        return data


class RandLesiond(_RandomizableTransform, _MapTransform):
    """Paint a lesion into the brain: an ellipsoid of random size, intensity and depth, labelled brain.

    A tumour, cyst or old infarct that reaches the cortex is dark on T1 (necrosis, fluid) or bright (enhancement,
    blood). The template has none, and a network trained on it alone draws the brain's surface around a dark one, as
    if it were the CSF outside (a 50 mm dark ball in nimare's cortex: HD95 9.38 mm for the bundled model;
    docs/brain-model.md). Here the lesion's semi-axes are ``radius_range`` voxels (each axis its own, up to 1.4 to 1),
    its centre a brain voxel no deeper than its largest semi-axis, so that most lesions reach the surface; inside the
    brain it takes ``level_range`` times the brain's median intensity, with a soft edge of one voxel. The label does
    not change: a lesion in the brain is brain. Needs ``(1, k, j, i)`` arrays.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        prob: float = 0.3,
        radius_range: Tuple[float, float] = (3.0, 14.0),
        level_range: Tuple[float, float] = (0.05, 1.6),
    ) -> None:
        _MapTransform.__init__(self, [image_key, label_key])
        _RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = image_key, label_key
        self.radius_range, self.level_range = radius_range, level_range

    def __call__(self, data):
        data = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return data
        from scipy import ndimage

        brain = _numpy(data[self.label_key])[0] > 0
        if not brain.any():
            return data
        radii = self.R.uniform(*self.radius_range) * self.R.uniform(1.0 / 1.4, 1.0, 3)
        level = float(self.R.uniform(*self.level_range))
        # Depth on a grid twice as coarse: a tenth of the cost, and a voxel's accuracy is plenty for a centre.
        depth = 2.0 * ndimage.distance_transform_edt(brain[::2, ::2, ::2])
        candidates = 2 * np.argwhere((depth > 0) & (depth <= radii.max()))
        if not len(candidates):  # a brain of a few voxels, all between the coarse grid's points
            return data
        centre = candidates[int(self.R.randint(len(candidates)))]
        # Only the lesion's bounding box is computed: the rest of the volume keeps its values.
        low = np.maximum(np.floor(centre - radii - 1).astype(int), 0)
        high = np.minimum(np.ceil(centre + radii + 2).astype(int), brain.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        kji = np.ogrid[box]
        scaled = np.sqrt(sum(((axis - c) / r) ** 2 for axis, c, r in zip(kji, centre, radii)))
        weight = (np.clip((1.0 - scaled) * radii.min(), 0.0, 1.0) * brain[box]).astype(np.float32)
        image = np.array(_numpy(data[self.image_key]), dtype=np.float32, copy=True)
        value = np.float32(level * np.median(image[0][brain]))
        image[0][box] = image[0][box] * (1.0 - weight) + weight * value
        data[self.image_key] = image
        return data


class NormalizeIntensityd(_MapTransform):
    """The package's own intensity normalisation (:func:`meddl.transforms.normalize_intensity`)."""

    def __init__(self, keys: Sequence[str], normalization: Dict[str, Any]) -> None:
        super().__init__(keys)
        self.normalization = normalization

    def __call__(self, data):
        data = dict(data)
        for key in self.keys:
            array = _numpy(data[key])
            data[key] = normalize_intensity(array, self.normalization).astype(np.float32)
        return data


def training_transforms(
    spec: ModelSpec,
    patches_per_volume: int = 2,
    augment: bool = True,
    pre_transforms: Sequence[Callable] = (),
):
    """The MONAI training pipeline for arrays shaped ``(1, k, j, i)`` on the model grid.

    Input keys: ``image`` (normalised float32), ``label`` (channel indices); returns a list of
    ``patches_per_volume`` dicts whose ``image``/``label`` are ``(1, *patch_size)``. ``pre_transforms``
    (e.g. :class:`RandSynthesizeFromTissuesd`, :class:`RandBrainOnlyd`) run first, on the whole volume.
    """
    from monai import transforms as mt

    patch = spec.patch_size
    keys = ["image", "label"]
    steps: List[Callable] = list(pre_transforms)
    if augment:
        steps += [
            RandSmoothDeformd(keys, prob=0.3, max_voxels=4.0),
            # A field of view cut before the rotation below: the cut plane ends up oblique to the head.
            RandFieldOfViewCutd(keys, prob=0.3),
            # Head pose and size: rotations up to ±30° about every axis, ±15 % scale per axis, shifts.
            mt.RandAffined(
                keys,
                prob=0.9,
                rotate_range=[np.pi / 6] * 3,
                scale_range=[0.15] * 3,
                translate_range=[8, 8, 8],
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAnisotropicLowResd(["image"], prob=0.25, max_factor=3.0),
            mt.RandSimulateLowResolutiond(["image"], prob=0.15, zoom_range=(0.5, 1.0)),
            RandFieldOfViewCutd(keys, prob=0.3),
            mt.RandBiasFieldd(["image"], degree=3, coeff_range=(0.0, 0.3), prob=0.5),
            mt.RandAdjustContrastd(["image"], gamma=(0.6, 1.6), prob=0.4),
            mt.RandScaleIntensityd(["image"], factors=0.15, prob=0.3),
            mt.RandShiftIntensityd(["image"], offsets=0.1, prob=0.3),
            mt.RandGaussianNoised(["image"], std=0.04, prob=0.3),
        ]
    # The same percentile normalisation as inference, on the whole volume before cropping.
    steps += [
        NormalizeIntensityd(["image"], spec.normalization),
        mt.SpatialPadd(keys, spatial_size=patch, mode="constant"),
        mt.RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch,
            pos=1.0,
            neg=1.0,
            num_samples=patches_per_volume,
            image_key=None,
        ),
    ]
    if augment:
        steps.append(mt.RandFlipd(keys, prob=0.5, spatial_axis=2))  # i: left-right (TRAINED_FLIP_AXES)
    steps.append(mt.EnsureTyped(keys, data_type="tensor", track_meta=False))
    return mt.Compose(steps)


# ----------------------------------------------------------------------------------------- helpers


def checkpoint_path(output_dir: PathLike) -> Path:
    """Where a run writing ``output_dir`` keeps its resumable checkpoint."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".checkpoint") / CHECKPOINT_FILE


def git_commit(folder: Optional[PathLike] = None) -> Optional[str]:
    """``git rev-parse HEAD`` of the repository holding ``folder`` (this package by default), or None.

    A ``+dirty`` suffix says that tracked files differed from that commit, so the code that ran is not exactly it.
    """
    folder = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if result.returncode != 0 or not result.stdout.strip():
            return None
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=folder, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() + ("+dirty" if changed.returncode == 1 else "")


def _package_versions(extra: Sequence[str] = ()) -> Dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("meddl", "torch", "monai", "numpy", "SimpleITK", "safetensors", *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _dice_per_label(prediction: np.ndarray, reference: np.ndarray, channels: int) -> List[float]:
    scores = []
    for channel in range(1, channels):
        predicted, wanted = prediction == channel, reference == channel
        total = int(predicted.sum()) + int(wanted.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((predicted & wanted).sum()) / total)
    return scores


def _save_checkpoint(
    path: Path, network, best_state, optimizer, loop_state: Dict[str, Any], averaged: Optional[Any] = None
) -> None:
    """Weights, best weights, averaged weights and optimiser tensors in one safetensors file; the rest as JSON
    metadata."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    if averaged is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in averaged.state_dict().items()})
    optim_state = optimizer.state_dict()
    for index, values in optim_state["state"].items():
        for name, value in values.items():
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous().reshape(value.shape)
    groups = [{k: v for k, v in group.items()} for group in optim_state["param_groups"]]
    metadata = {"format": CHECKPOINT_FORMAT, "loop": json.dumps(loop_state), "optimizer_groups": json.dumps(groups)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _load_checkpoint(
    path: Path, network, optimizer, averaged: Optional[Any] = None
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"cannot read the training checkpoint ({error}); delete it to start afresh", path) from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InputError("not a meddl training checkpoint; delete it to start afresh", path)
    loop = json.loads(metadata["loop"])
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    best_state = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    try:
        network.load_state_dict(model_state, strict=True)
        averaged_state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        if averaged is not None and averaged_state:  # none: a run without the average, which the fingerprint refuses
            averaged.load_state_dict(averaged_state)
    except RuntimeError as error:
        raise InputError(f"checkpoint does not fit this network ({str(error).splitlines()[0]})", path) from None
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optimizer_groups"])})
    for group_state in optimizer.state.values():  # keep step counters as the optimiser created them
        if "step" in group_state and not torch.is_tensor(group_state["step"]):
            group_state["step"] = torch.tensor(float(group_state["step"]))
    return loop, best_state


def _replaceable(output_dir: Path, checkpoint: Path) -> bool:
    """True when ``output_dir`` is an unfinished package this trainer wrote (a resumable run's interim result)."""
    try:
        data = json.loads((output_dir / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return checkpoint.is_file() and data.get("training", {}).get("complete") is False


def _write_package(spec: ModelSpec, network, best_state, output_dir: Path, replace_existing: bool) -> Path:
    import torch

    with torch.no_grad():
        current = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(best_state, strict=True)
    staging = output_dir.with_name(f".{output_dir.name}.new-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    save_model(spec, network, staging)
    network.load_state_dict(current, strict=True)
    if output_dir.exists():
        if not replace_existing:
            shutil.rmtree(staging)
            raise ModelError("refusing to overwrite an existing model package (versions are immutable)", output_dir)
        retired = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, retired)
        os.replace(staging, output_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------- training


def resolve_precision(precision: str, device: str) -> str:
    """``"auto"`` becomes ``"bf16"`` on a CPU with bfloat16 instructions (AVX512-BF16 or AMX), else ``"fp32"``.

    oneDNN also runs bfloat16 on a plain AVX-512 CPU, emulated: there a training step took 1.24 s against 1.07 s in
    float32, where a CPU with AVX512-BF16 took 0.44 s against 1.03 s (``benchmarks/training_step.py``). Elsewhere
    (CUDA) ``"auto"`` stays float32: only the CPU gain is measured.
    """
    if precision != "auto":
        return precision
    if not str(device).startswith("cpu"):
        return "fp32"
    return "bf16" if native_bfloat16() else "fp32"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX); False where torch cannot tell."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probes: do not guess
        return False


def host_description() -> Dict[str, Any]:
    """The machine a run is timed on: CPU model, the cores this process may use, native bfloat16.

    A run's times depend on them, and a float32 run's weights on the CPU's kernels (docs/brain-model.md).
    """
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor()  # on Linux that runs `uname -p`: only where /proc/cpuinfo named no model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu or "unknown", "cores": cores, "native_bfloat16": native_bfloat16()}


def train_segmentation(
    spec: ModelSpec,
    datalist: Sequence[Mapping[str, Any]],
    output_dir: PathLike,
    epochs: int = 10,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    max_seconds: Optional[float] = None,
    init_from: Optional[PathLike] = None,
    resume: bool = True,
    batch_size: int = 1,
    patches_per_volume: int = 2,
    augment: bool = True,
    steps_per_epoch: Optional[int] = None,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-4,
    val_datalist: Optional[Sequence[Mapping[str, Any]]] = None,
    pre_transforms: Sequence[Callable] = (),
    extra_keys: Sequence[str] = (),
    provenance: Optional[Dict[str, Any]] = None,
    device: Optional[str] = None,
    precision: str = "fp32",
    compile_network: bool = False,
    ema_decay: float = 0.0,
) -> Path:
    """Train ``spec``'s network on ``datalist`` and write the best-validation-Dice package to ``output_dir``.

    Args:
        spec: the package description (architecture, labels, spacing, patch size, normalisation).
        datalist: entries ``{"image": path|Image, "label": path|Image}`` (+ ``extra_keys`` maps), or
            :class:`TrainingVolume` objects already on the model grid.
        output_dir: the package folder to write; must not exist, unless it is this run's unfinished result.
        epochs: passes of ``steps_per_epoch`` steps (default: one step per training volume).
        val_fraction: share of ``datalist`` held out for validation when ``val_datalist`` is not given; with a
            single case the training case itself is validated (the package says so).
        seed: fixes MONAI/torch/numpy randomness; each step's augmentation is seeded from (seed, epoch, step),
            so a resumed run draws what an uninterrupted one would have drawn.
        progress: called after each step with (fraction, message); cancel: checked before each step.
        max_seconds: stop cleanly after the step that exhausts this wall time, write the best package so far
            (marked unfinished) and keep the checkpoint; calling again continues.
        init_from: a package whose weights start the training (fine-tuning).
        resume: continue from ``<output>.checkpoint`` when it exists (else start afresh and overwrite it).
        batch_size: volumes per step; patches_per_volume: patches cropped from each (class-balanced).
        augment: apply the acquisition-simulating augmentation (off for quick tests).
        pre_transforms: extra MONAI-style dictionary transforms run first on whole volumes.
        provenance: extra facts for model.json (data sources, recipe).
        device: "cpu", "cuda" or None for auto.
        precision: ``"fp32"``, or ``"bf16"`` to run the network's forward pass under bfloat16 autocast (weights,
            optimiser and loss stay float32), or ``"auto"`` (:func:`resolve_precision`: bf16 on a CPU with native
            bfloat16, where ``benchmarks/training_step.py`` measures the gain). Validation always runs in float32.
        compile_network: train through ``torch.compile`` (PyTorch's inductor, which needs a C++ compiler: the brain
            network's float32 step on two CPU cores 1.19x as fast, ``benchmarks/training_step.py``, after one to two
            minutes of compiling; other weights than without it, to float32 rounding). Where it cannot compile, the
            run says so and trains as it is. Validation and the written package use the network as it is.
        ema_decay: above 0, keep an exponential moving average of the weights (``torch.optim.swa_utils``; each step
            moves it ``1 - ema_decay`` of the way to the network's weights) and validate and write that average
            instead of the network's last weights: a smoother model, less tied to the last steps' draws.

    Returns:
        The package folder.
    """
    import torch
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from meddl.infer import predict_probabilities, select_device

    started = time.time()
    commit = git_commit()  # the code that trains is the code at the start, whatever is committed meanwhile
    progress = progress or no_progress
    output_dir = Path(output_dir)
    checkpoint = checkpoint_path(output_dir)
    if spec.task != "segmentation":
        raise ModelError(f"model '{spec.name}' is a {spec.task} model; train_segmentation needs a segmentation spec")
    if output_dir.exists() and not (resume and _replaceable(output_dir, checkpoint)):
        raise ModelError("refusing to overwrite an existing model package (versions are immutable)", output_dir)
    if epochs < 1:
        raise InputError(f"epochs must be at least 1 (got {epochs})")
    if not 0.0 <= ema_decay < 1.0:
        raise InputError(f"ema_decay must be at least 0 and below 1 (got {ema_decay})")
    device = select_device(device)
    if precision not in ("fp32", "bf16", "auto"):
        raise InputError(f"precision must be 'fp32', 'bf16' or 'auto' (got {precision!r})")
    precision = resolve_precision(precision, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    set_determinism(seed=seed)

    # Data: everything on the model grid, once.
    volumes = [
        v if isinstance(v, TrainingVolume) else load_training_volume(v, spec, None, extra_keys) for v in datalist
    ]
    if not volumes:
        raise InputError("the datalist is empty")
    if val_datalist is not None:
        train_volumes = volumes
        val_volumes = [
            v if isinstance(v, TrainingVolume) else load_training_volume(v, spec, None, extra_keys)
            for v in val_datalist
        ]
        split = "explicit validation list"
    elif len(volumes) == 1:
        train_volumes, val_volumes = volumes, volumes
        split = "single case: validated on the training case (no held-out validation)"
    else:
        order = np.random.RandomState(seed).permutation(len(volumes))
        n_val = min(len(volumes) - 1, max(1, int(round(val_fraction * len(volumes)))))
        val_volumes = [volumes[i] for i in sorted(order[:n_val])]
        train_volumes = [volumes[i] for i in sorted(order[n_val:])]
        split = f"random {n_val}/{len(volumes)} held out (seed {seed})"
    channels = len(spec.labels)
    train_items = []
    for volume in train_volumes:
        item = {"image": normalize_intensity(volume.image.array, spec.normalization)[None], "label": volume.label[None]}
        item.update({key: value[None] for key, value in volume.extra.items()})
        train_items.append(item)
    pipeline = training_transforms(spec, patches_per_volume, augment, pre_transforms)
    steps = int(steps_per_epoch or max(1, len(train_items) // batch_size))

    # Network, optimiser, schedule.
    network = build_network(spec)
    if init_from is not None:
        parent = load_model(init_from)
        if parent.spec.architecture != spec.architecture or parent.spec.architecture_args != spec.architecture_args:
            raise ModelError("cannot start from this package: its architecture differs from the spec's", init_from)
        network.load_state_dict(parent.network.state_dict(), strict=True)
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    total_steps = epochs * steps
    averaged = None
    if ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)

    def set_learning_rate(done_steps: int) -> None:
        # Cosine decay to 2 % of the start, computed from the step count so a resumed run needs no scheduler state.
        factor = 0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * min(done_steps, total_steps) / total_steps))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * factor

    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    fingerprint = {"seed": seed, "spec": spec.name, "cases": [v.name for v in volumes], "steps": steps}
    if ema_decay:
        fingerprint["ema_decay"] = ema_decay
    loop: Dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_dice": -1.0,
        "best_epoch": 0,
        "history": [],
        "elapsed_s": 0.0,
        "fingerprint": fingerprint,
        "resumed_from": [],
    }
    best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    if resume and checkpoint.is_file():
        loop, best_state = _load_checkpoint(checkpoint, network, optimizer, averaged)
        if loop.get("fingerprint") != fingerprint:
            raise InputError(
                "the checkpoint belongs to a different training run (seed, data, steps or moving average differ); "
                "delete it or train with resume=False",
                checkpoint,
            )
        loop["resumed_from"].append({"epoch": loop["epoch"], "step": loop["step"]})
    elapsed_before = float(loop["elapsed_s"])

    # What is validated and written: the moving average when there is one, else the network itself.
    validated = network if averaged is None else averaged.module

    def validate() -> List[float]:
        validated.eval()
        package = ModelPackage(spec=spec, network=validated)
        scores = []
        for volume in val_volumes:
            probabilities = predict_probabilities(volume.image, package, device, tta=False, cancel=cancel)
            scores.append(_dice_per_label(np.argmax(probabilities, axis=0), volume.label, channels))
        network.train()
        return np.mean(np.asarray(scores), axis=0).tolist()

    def record_epoch(epoch: int, losses: List[float], partial: bool = False) -> None:
        dice = validate()
        mean = float(np.mean(dice)) if dice else 0.0
        entry = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)) if losses else None,
            "val_dice": dice,
            "val_mean_dice": mean,
        }
        if partial:
            entry["partial"] = True  # validated mid-epoch, when a stopped run had nothing validated yet
        loop["history"].append(entry)
        if mean > loop["best_dice"]:
            loop["best_dice"], loop["best_epoch"] = mean, epoch + 1
            best_state.update({k: v.detach().cpu().clone() for k, v in validated.state_dict().items()})

    def step_seed(epoch: int, step: int) -> int:
        return (seed * 1_000_003 + epoch * 10_007 + step) % (2**31)

    def augmented_batch(epoch: int, step: int):
        """The patches of (epoch, step), drawn from those two numbers alone: they can be made a step ahead."""
        order = np.random.RandomState(seed + 7919 * epoch).permutation(steps * batch_size) % len(train_items)
        pipeline.set_random_state(seed=step_seed(epoch, step))
        patches = []
        for index in order[step * batch_size : (step + 1) * batch_size]:
            patches.extend(pipeline(dict(train_items[int(index)])))
        images = torch.stack([p["image"] for p in patches]).float()
        return images, torch.stack([p["label"] for p in patches]).float()

    def following(epoch: int, step: int) -> Optional[Tuple[int, int]]:
        return (epoch, step + 1) if step + 1 < steps else ((epoch + 1, 0) if epoch + 1 < epochs else None)

    # The compiled module shares the network's parameters: the optimiser, checkpoints and validation see one network.
    compiled = torch.compile(network) if compile_network else None
    compiled_here = False  # a compiled step ran in this process: a later failure is the step's, not the compiler's

    def train_step(model, images, labels, seed_of_step: int):
        torch.manual_seed(seed_of_step)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(images)
        loss = loss_function(logits.float(), labels)
        loss.backward()
        return loss

    stopped_early = False
    network.train()
    # One thread augments the next step's volume while the network trains on this one: the network's
    # convolutions leave a core idle part of the time, and the augmentation is mostly single-threaded.
    # Only that thread touches the pipeline, and the pipeline draws nothing from torch's generator.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="meddl-augment") as augmenter:
        ahead: Optional[Tuple[Tuple[int, int], Any]] = None
        while loop["epoch"] < epochs and not stopped_early:
            epoch = loop["epoch"]
            losses = loop.pop("epoch_losses", [])
            while loop["step"] < steps:
                if cancel and cancel.cancelled:
                    # Keep what this epoch did so far, then stop as asked; the next run continues from here.
                    loop["epoch_losses"] = losses
                    loop["elapsed_s"] = elapsed_before + time.time() - started
                    _save_checkpoint(checkpoint, network, best_state, optimizer, loop, averaged)
                    cancel.check()
                step = loop["step"]
                if ahead is None or ahead[0] != (epoch, step):
                    ahead = ((epoch, step), augmenter.submit(augmented_batch, epoch, step))
                batch = ahead[1].result()
                upcoming = following(epoch, step)
                ahead = (upcoming, augmenter.submit(augmented_batch, *upcoming)) if upcoming else None
                images, labels = (tensor.to(device) for tensor in batch)
                set_learning_rate(epoch * steps + step)
                if compiled is None:
                    loss = train_step(network, images, labels, step_seed(epoch, step))
                else:
                    try:
                        loss = train_step(compiled, images, labels, step_seed(epoch, step))
                    except Exception as error:  # noqa: BLE001 - no C++ compiler, or an operator inductor cannot take
                        if compiled_here:
                            raise
                        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                        fraction = (epoch * steps + step) / total_steps
                        progress(fraction, f"cannot compile the network ({reason}); training as it is")
                        compiled = None
                        loss = train_step(network, images, labels, step_seed(epoch, step))
                    else:
                        compiled_here = True
                        loop["compiled_steps"] = loop.get("compiled_steps", 0) + 1
                optimizer.step()
                if averaged is not None:
                    averaged.update_parameters(network)
                losses.append(float(loss.detach()))
                loop["step"] = step + 1
                done = epoch * steps + step + 1
                progress(
                    done / total_steps, f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps} loss {losses[-1]:.4f}"
                )
                if max_seconds is not None and time.time() - started >= max_seconds and done < total_steps:
                    stopped_early = True
                    break
            if loop["step"] >= steps:
                record_epoch(epoch, losses)
                loop["epoch"], loop["step"] = epoch + 1, 0
            else:
                loop["epoch_losses"] = losses
                if not loop["history"]:  # nothing validated yet: the interim package still needs measured weights
                    record_epoch(epoch, losses, partial=True)
            loop["elapsed_s"] = elapsed_before + time.time() - started
            _save_checkpoint(checkpoint, network, best_state, optimizer, loop, averaged)

    complete = loop["epoch"] >= epochs
    best = next((h for h in loop["history"] if h["epoch"] == loop["best_epoch"]), loop["history"][-1])
    label_names = [lb.name for lb in spec.labels[1:]]
    raw = spec.to_json()
    raw["provenance"] = {
        **raw.get("provenance", {}),
        **(provenance or {}),
        "training_cases": [v.name for v in train_volumes],
        "validation_cases": [v.name for v in val_volumes],
        "validation_split": split,
        "package_versions": _package_versions(),
        "git_commit": commit,
        "seed": seed,
        "device": device,
        "host": host_description(),
        "wall_time_s": round(float(loop["elapsed_s"]), 1),
    }
    raw["metrics"] = {
        **raw.get("metrics", {}),
        "validation": {
            "dice": dict(zip(label_names, [round(d, 4) for d in best["val_dice"]])),
            "mean_dice": round(float(best["val_mean_dice"]), 4),
            "best_epoch": loop["best_epoch"],
            "measured_on": "model grid, sliding window, no TTA, no post-processing",
        },
    }
    raw["training"] = {
        "complete": complete,
        "epochs": epochs,
        "epochs_done": loop["epoch"],
        "steps_per_epoch": steps,
        "steps_done": loop["epoch"] * steps + loop["step"],
        "batch_size": batch_size,
        "patches_per_volume": patches_per_volume,
        "augment": augment,
        "learning_rate": learning_rate,
        "precision": precision,
        "compiled_steps": loop.get("compiled_steps", 0),
        "resumed_from": loop["resumed_from"],
        "history": loop["history"],
    }
    if ema_decay:
        raw["training"]["ema_decay"] = ema_decay  # the package holds the average, not the last weights
    if init_from is not None:
        raw["parent"] = str(init_from)
    # What the network learnt to be symmetric under: test-time flips use no other flip.
    raw.setdefault("inference", {})["flip_axes"] = list(TRAINED_FLIP_AXES) if augment else []
    final_spec = ModelSpec.from_json(raw)
    network.to("cpu")
    written = _write_package(final_spec, network, best_state, output_dir, replace_existing=output_dir.exists())
    if complete:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    progress(1.0, f"wrote {written}")
    return written
