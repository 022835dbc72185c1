"""Model packages: ``model.json`` (what the network is and how to feed it) + ``weights.safetensors``.

A package is data, never code: the architecture is a name from an allow-list of MONAI networks plus
JSON arguments, and weights load with safetensors (no unpickling). Every problem is a
:class:`~meddl.errors.ModelError` naming the file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from meddl.errors import ModelError
from meddl.fsutil import publish

__all__ = [
    "SCHEMA_VERSION",
    "ALLOWED_ARCHITECTURES",
    "FIELD_TERMS",
    "Label",
    "ModelSpec",
    "ModelPackage",
    "load_spec",
    "load_model",
    "save_model",
    "build_network",
    "unet_segmentation_spec",
]

PathLike = Union[str, os.PathLike]
SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
MAX_MODEL_JSON_BYTES = 1 << 20

# MONAI networks a package may name. Anything else is refused: the name is looked up in this table,
# never imported from a string the file chose.
ALLOWED_ARCHITECTURES = (
    "UNet",
    "BasicUNet",
    "DynUNet",
    "SegResNet",
    "AttentionUnet",
    "UNETR",
    "SwinUNETR",
    "DenseNet121",
    "DenseNet169",
    "ResNet",
    "EfficientNetBN",
    "Classifier",
)
TASKS = ("segmentation", "classification")
NORMALIZATIONS = ("percentile", "ct_window", "zscore", "none")
# Model-grid axes a package may declare its network symmetric under (``inference.flip_axes``); on an LPS grid
# i runs left-right, j front-back, k up-down. Packages that declare none are taken to be symmetric under all three.
FLIP_AXES = ("i", "j", "k")
# The largest patch a package may ask for: at 256³ each 16-channel float32 activation of the network is 1 GiB.
MAX_PATCH_VOXELS = 256**3
# Keys of the engine's pass and trim settings that are not plain numbers; ModelSpec.from_json checks each its own way.
STRUCTURED_SETTINGS = ("limits", "reference_extent_mm", "field", "reference_gradient", "reference_field", "face_rows")
# The intensity fields ``input.gradient_normalization.field`` may name, by their terms after the constant: each a
# product of the positions along L, P and S (in 100 mm about the brain's centre; meddl.infer.intensity_gradient).
# Each field keeps the terms of the one before and adds its own degree; ``reference_field`` gives one number a term.
FIELD_TERMS = {"linear": ("L", "P", "S")}
FIELD_TERMS["quadratic"] = FIELD_TERMS["linear"] + ("LL", "PP", "SS", "LP", "LS", "PS")
FIELD_TERMS["cubic"] = FIELD_TERMS["quadratic"] + ("LLL", "PPP", "SSS", "LLP", "LLS", "LPP", "PPS", "LSS", "PSS", "LPS")


@dataclass
class Label:
    value: int
    name: str
    color: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ModelSpec:
    """The parsed, validated ``model.json``. ``raw`` keeps every field, including ones this version ignores."""

    name: str
    version: str
    task: str
    architecture: str
    architecture_args: Dict[str, Any]
    labels: List[Label]
    input: Dict[str, Any]
    postprocess: Dict[str, Any]
    inference: Dict[str, Any]
    raw: Dict[str, Any]

    @property
    def spatial_dims(self) -> int:
        return int(self.architecture_args.get("spatial_dims", 3))

    @property
    def in_channels(self) -> int:
        return int(self.input.get("channels", 1))

    @property
    def target_spacing(self) -> Optional[List[float]]:
        spacing = self.input.get("spacing")
        return [float(s) for s in spacing] if spacing else None

    @property
    def patch_size(self) -> List[int]:
        return [int(p) for p in self.input["patch_size"]]

    @property
    def normalization(self) -> Dict[str, Any]:
        return self.input.get("normalization", {"kind": "percentile", "lower": 0.5, "upper": 99.5})

    @property
    def modality(self) -> Optional[str]:
        return self.input.get("modality")

    @property
    def min_extent_mm(self) -> float:
        """The least the input must span along each of its axes (mm): thinner volumes are refused (0: any)."""
        return float(self.input.get("min_extent_mm", 0.0))

    @property
    def flip_axes(self) -> Tuple[int, ...]:
        """Array axes (0 = k, 1 = j, 2 = i) the network learnt to be symmetric under: the only flips test-time
        augmentation may average over (a flip it never learnt, such as a head upside down, spoils the average)."""
        return tuple(sorted(2 - FLIP_AXES.index(axis) for axis in self.inference.get("flip_axes", FLIP_AXES)))

    @property
    def foreground_labels(self) -> List[Label]:
        return [label for label in self.labels if label.value != 0]

    def to_json(self) -> Dict[str, Any]:
        data = copy.deepcopy(self.raw)
        data.update(
            {
                "format": "meddl-model",
                "schema_version": SCHEMA_VERSION,
                "name": self.name,
                "version": self.version,
                "task": self.task,
                "architecture": {"name": self.architecture, "args": self.architecture_args},
                "labels": [{"value": lb.value, "name": lb.name, "color": lb.color} for lb in self.labels],
                "input": self.input,
                "postprocess": self.postprocess,
                "inference": self.inference,
            }
        )
        return copy.deepcopy(data)  # callers edit the result; this spec must not change with it

    @classmethod
    def from_json(cls, data: Any, path: Optional[PathLike] = None) -> ModelSpec:
        """Validate ``data`` (a parsed model.json); raise ModelError naming ``path`` and the field."""

        def need(condition: bool, problem: str) -> None:
            if not condition:
                raise ModelError(f"invalid model.json: {problem}", path)

        need(isinstance(data, dict), "top level must be an object")
        need(data.get("format", "meddl-model") == "meddl-model", "format must be 'meddl-model'")
        need(
            data.get("schema_version") == SCHEMA_VERSION,
            f"schema_version {data.get('schema_version')!r} is not supported (this engine reads {SCHEMA_VERSION})",
        )
        for key in ("name", "task", "architecture", "labels", "input"):
            need(key in data, f"missing field '{key}'")
        need(data["task"] in TASKS, f"task must be one of {', '.join(TASKS)}")
        architecture = data["architecture"]
        need(isinstance(architecture, dict) and "name" in architecture, "architecture needs a 'name'")
        need(
            architecture["name"] in ALLOWED_ARCHITECTURES,
            f"architecture '{architecture['name']}' is not an allowed MONAI network "
            f"({', '.join(ALLOWED_ARCHITECTURES)})",
        )
        args = architecture.get("args", {})
        need(isinstance(args, dict) and _is_plain_json(args), "architecture.args must be plain JSON values")
        labels_raw = data["labels"]
        need(isinstance(labels_raw, list) and labels_raw, "labels must be a non-empty list")
        labels = []
        for entry in labels_raw:
            need(isinstance(entry, dict) and "name" in entry and "value" in entry, "each label needs value and name")
            need(isinstance(entry["value"], int) and entry["value"] >= 0, f"label value {entry['value']!r} invalid")
            color = entry.get("color", [0.5, 0.5, 0.5])
            need(
                isinstance(color, list) and len(color) == 3 and all(0 <= float(c) <= 1 for c in color),
                f"label '{entry['name']}' colour must be three numbers in [0, 1]",
            )
            labels.append(Label(int(entry["value"]), str(entry["name"]), [float(c) for c in color]))
        values = [label.value for label in labels]
        need(len(set(values)) == len(values), "label values must be unique")
        spec_input = data["input"]
        need(isinstance(spec_input, dict), "input must be an object")
        patch, dims = spec_input.get("patch_size"), args.get("spatial_dims", 3)
        need(
            isinstance(patch, list) and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch),
            "input.patch_size must be a list of positive integers",
        )
        need(len(patch) == dims, f"input.patch_size must give {dims} sizes, one per axis of the network")
        need(
            math.prod(patch) <= MAX_PATCH_VOXELS, f"input.patch_size must hold at most {MAX_PATCH_VOXELS} voxels (256³)"
        )
        spacing = spec_input.get("spacing")
        need(
            spacing is None
            or (isinstance(spacing, list) and len(spacing) == dims and all(_is_number(s) and s > 0 for s in spacing)),
            f"input.spacing must be {dims} positive numbers",
        )
        crop = spec_input.get("crop_foreground")
        need(crop is None or isinstance(crop, dict), "input.crop_foreground must be an object")
        for key in (
            "threshold",
            "margin_mm",
            "max_height_mm",
            "max_below_object_mm",
            "cut_top_min_area_mm2",
            "cut_top_height_mm",
            "cut_top_max_height_mm",
            "cut_side_min_area_mm2",
            "cut_base_min_area_mm2",
            "cut_base_height_mm",
        ):
            value = (crop or {}).get(key)
            positive = key.startswith(("max_", "cut_"))
            need(
                value is None or (_is_number(value) and (value > 0 if positive else value >= 0)),
                f"input.crop_foreground.{key} must be a finite number" + (" > 0" if positive else " >= 0"),
            )
        extents = (crop or {}).get("cut_side_extent_mm")
        need(
            extents is None
            or (isinstance(extents, list) and len(extents) == 2 and all(_is_number(v) and v > 0 for v in extents)),
            "input.crop_foreground.cut_side_extent_mm must be two finite numbers > 0 (grid axes i and j, mm)",
        )

        # The passes read a label's probability at the channel of its value, and the trim finds it in the labelmap.
        foreground = [value for channel, value in enumerate(values) if value == channel != 0]

        def settings(
            name: str, non_negative: Sequence[str], section: str = "input", labelled: bool = True
        ) -> Dict[str, Any]:
            """``<section>.<name>`` (absent: {}) after checking it is an object of finite numbers (notes: text; the
            lists and names in ``STRUCTURED_SETTINGS`` are checked by the caller), its ``non_negative`` keys >= 0 and,
            where ``labelled``, its ``label`` (default 1) one of the model's foreground labels. The engine reads them
            while it segments, where a wrong one would stop it with an internal error rather than this line."""
            value = (data.get(section) or {}).get(name)
            need(value is None or isinstance(value, dict), f"{section}.{name} must be an object")
            for key, number in (value or {}).items():
                if key.endswith("_note"):
                    need(isinstance(number, str), f"{section}.{name}.{key} must be text")
                elif key not in STRUCTURED_SETTINGS:
                    need(_is_number(number), f"{section}.{name}.{key} must be a finite number")
            for key in non_negative:
                number = (value or {}).get(key)
                need(number is None or number >= 0, f"{section}.{name}.{key} must be >= 0")
            label = value.get("label", 1) if value and labelled else None
            need(
                label is None or label in foreground and isinstance(label, int),
                f"{section}.{name}.label must be one of the model's foreground label values {foreground}",
            )
            return value or {}

        value = spec_input.get("min_extent_mm")
        need(value is None or (_is_number(value) and value >= 0), "input.min_extent_mm must be a finite number >= 0")
        settings("noisy_air", ("face_median", "calm_std"), labelled=False)
        sizing = settings("size_normalization", ("min_change", "max_cut_mm2", "max_cut_except_top_mm2"))
        extent = sizing.get("reference_extent_mm")
        need(
            extent is None
            or (isinstance(extent, list) and len(extent) == 2 and all(_is_number(v) and v > 0 for v in extent)),
            "input.size_normalization.reference_extent_mm must be two widths in mm > 0",
        )
        limits = sizing.get("limits", [0.75, 1.25])
        need(
            isinstance(limits, list)
            and len(limits) == 2
            and all(_is_number(v) for v in limits)
            and 0 < limits[0] <= 1 <= limits[1],
            "input.size_normalization.limits must be [low, high] with 0 < low <= 1 <= high",
        )
        posing = settings("pose_normalization", ("min_change_deg", "max_cut_mm2"))
        value = posing.get("max_change_deg")
        need(
            value is None or (_is_number(value) and 0 < value <= 90),
            "input.pose_normalization.max_change_deg must be in (0, 90]",
        )
        value = posing.get("reference_tilt_deg")
        need(
            value is None or (_is_number(value) and -90 <= value <= 90),
            "input.pose_normalization.reference_tilt_deg must be an angle in [-90, 90] degrees",
        )
        grading = settings("gradient_normalization", ("min_change", "min_follow_change", "max_crop_cut_growth_mm2"))
        for key in ("block_mm", "max_distance_mm"):
            need(grading.get(key, 1) > 0, f"input.gradient_normalization.{key} must be > 0")
        passes = grading.get("max_passes", 0)
        need(
            isinstance(passes, int) and passes >= 0,
            "input.gradient_normalization.max_passes must be a whole number >= 0",
        )
        surface = grading.get("field", "linear")
        need(surface in FIELD_TERMS, f"input.gradient_normalization.field must be one of {', '.join(FIELD_TERMS)}")
        for key, terms, what in (
            ("reference_gradient", 3, "the plane's, along L, P and S"),
            ("reference_field", len(FIELD_TERMS[surface]), f"one per term of its {surface} field"),
        ):
            value = grading.get(key)
            need(
                value is None or (isinstance(value, list) and len(value) == terms and all(map(_is_number, value))),
                f"input.gradient_normalization.{key} must be {terms} numbers ({what})",
            )
        need(
            surface == "linear" or grading.get("reference_gradient") is None or "reference_field" in grading,
            f"input.gradient_normalization.reference_field is missing: a {surface} field is measured against it",
        )
        orienting = settings(
            "orientation_check", ("min_gain", "min_confidence", "min_offset_mm", "min_gradient_pass_gain")
        )
        rows = orienting.get("face_rows")
        need(
            rows is None
            or (
                isinstance(rows, list) and len(rows) == 2 and all(map(_is_number, rows)) and 0 <= rows[0] < rows[1] <= 1
            ),
            "input.orientation_check.face_rows must be [low, high] shares of the brain with 0 <= low < high <= 1",
        )
        coil = settings("coil_normalization", ("min_change",))
        need(coil.get("radius_mm", 80.0) > 0, "input.coil_normalization.radius_mm must be > 0")
        postprocess = data.get("postprocess", {})
        need(isinstance(postprocess, dict), "postprocess must be an object")
        for key in ("min_edge_contrast", "min_intensity_spread", "min_edge_contrast_cut_twice"):
            value = postprocess.get(key)
            need(value is None or _is_number(value), f"postprocess.{key} must be a finite number")
        axes = postprocess.get("max_cut_axes")
        need(
            axes is None or (isinstance(axes, int) and not isinstance(axes, bool) and 0 <= axes <= 2),
            "postprocess.max_cut_axes must be a whole number from 0 to 2",
        )
        trim_keys = ("label", "min_ratio", "closing_mm", "smoothing_mm", "level_mm", "min_removed", "min_surface_share")
        settings("tissue_trim", trim_keys, section="postprocess")
        rim = settings("rim_peel", ("label", "step_mm", "max_depth_mm", "min_ratio"), section="postprocess")
        need(rim.get("step_mm", 1.0) > 0, "postprocess.rim_peel.step_mm must be > 0")
        need(rim.get("max_depth_mm", 3.0) > 0, "postprocess.rim_peel.max_depth_mm must be > 0")
        pocket_keys = ("label", "grid_mm", "margin_mm", "min_radius_mm", "surface_percentile", "grow_mm")
        pocket = settings("pocket_fill", pocket_keys, section="postprocess")
        need(pocket.get("grid_mm", 2.0) > 0, "postprocess.pocket_fill.grid_mm must be > 0")
        need(pocket.get("surface_percentile", 25.0) <= 100, "postprocess.pocket_fill.surface_percentile must be <= 100")
        opening = postprocess.get("opening_mm", 0)
        need(_is_number(opening) and opening >= 0, "postprocess.opening_mm must be a finite number >= 0")
        for key in ("largest_component", "fill_holes"):
            need(isinstance(postprocess.get(key, False), bool), f"postprocess.{key} must be true or false")
        inference = data.get("inference", {})
        need(isinstance(inference, dict), "inference must be an object")
        flips = inference.get("flip_axes", list(FLIP_AXES))
        need(
            isinstance(flips, list) and len(set(flips)) == len(flips) and all(axis in FLIP_AXES for axis in flips),
            f"inference.flip_axes must list distinct axes out of {', '.join(FLIP_AXES)}",
        )
        overlap = inference.get("overlap", 0.25)
        need(_is_number(overlap) and 0 <= overlap < 1, "inference.overlap must be a number from 0 up to (not) 1")
        batch = inference.get("sw_batch_size", 1)
        need(
            isinstance(batch, int) and not isinstance(batch, bool) and batch > 0, "inference.sw_batch_size must be >= 1"
        )
        need(isinstance(inference.get("tta_flips", False), bool), "inference.tta_flips must be true or false")
        normalization = spec_input.get("normalization", {"kind": "percentile"})
        need(isinstance(normalization, dict), "input.normalization must be an object")
        kind = normalization.get("kind")
        need(kind in NORMALIZATIONS, f"input.normalization.kind must be one of {NORMALIZATIONS}")
        # The bounds normalize_intensity maps to 0 and 1 (equal ones would divide by zero), with their defaults.
        bounds = {"percentile": ("lower", "upper", 0.5, 99.5), "ct_window": ("low", "high", -1000, 1000)}
        if kind in bounds:
            low_key, high_key, low, high = bounds[kind]
            low, high = normalization.get(low_key, low), normalization.get(high_key, high)
            percentile = kind == "percentile"
            need(
                _is_number(low) and _is_number(high) and low < high and (not percentile or 0 <= low and high <= 100),
                f"input.normalization.{low_key} and .{high_key} must be numbers with {low_key} < {high_key}"
                + (" within 0-100" if percentile else ""),
            )
        if data["task"] == "segmentation":
            need(0 in values, "a segmentation model needs a label with value 0 (background)")
            out_channels = args.get("out_channels")
            need(
                out_channels is None or out_channels == len(labels),
                f"architecture.args.out_channels ({out_channels}) must equal the number of labels ({len(labels)})",
            )
        return cls(
            name=str(data["name"]),
            version=str(data.get("version", "0")),
            task=data["task"],
            architecture=architecture["name"],
            architecture_args=dict(args),
            labels=labels,
            input=dict(spec_input),
            postprocess=dict(data.get("postprocess", {})),
            inference=dict(data.get("inference", {})),
            raw=copy.deepcopy(data),
        )


def unet_segmentation_spec(
    name: str,
    labels: Sequence[Dict[str, Any]],
    spacing: Sequence[float],
    patch_size: Sequence[int],
    channels: Sequence[int] = (8, 16, 32, 64),
    num_res_units: int = 1,
    modality: Optional[str] = None,
    normalization: Optional[Dict[str, Any]] = None,
    version: str = "1.0.0",
    **fields: Any,
) -> ModelSpec:
    """A validated spec for a 3D MONAI ``UNet`` segmenter, the project's default architecture.

    Args:
        name: model name.
        labels: ``{"value", "name", "color"}`` entries, background (value 0) included; one output channel each.
        spacing: target spacing in mm, ``(i, j, k)``.
        patch_size: sliding-window size in voxels, array order.
        channels: features per level; each level after the first halves the resolution.
        num_res_units: residual units per level.
        modality: DICOM modality the model expects (``"MR"``, ``"CT"``), or None for any.
        normalization: intensity normalisation (default: 0.5-99.5 percentile).
        version: package version.
        **fields: further top-level ``model.json`` fields (postprocess, inference, provenance, metrics, gate, ...).
    """
    spec_input: Dict[str, Any] = {
        "channels": 1,
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch_size],
        "normalization": normalization or {"kind": "percentile", "lower": 0.5, "upper": 99.5},
    }
    if modality:
        spec_input["modality"] = modality
    data = {
        "format": "meddl-model",
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "task": "segmentation",
        "architecture": {
            "name": "UNet",
            "args": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": len(labels),
                "channels": [int(c) for c in channels],
                "strides": [2] * (len(channels) - 1),
                "num_res_units": int(num_res_units),
            },
        },
        "labels": [dict(label) for label in labels],
        "input": spec_input,
        **fields,
    }
    return ModelSpec.from_json(data)


def _is_number(value: Any) -> bool:
    """A finite int or float from JSON (bool is an int in Python, and not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_plain_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_json(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain_json(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _package_dir(path: PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name == MODEL_JSON:
        path = path.parent
    if not path.is_dir():
        raise ModelError("no such model package (expected a folder with model.json and weights.safetensors)", path)
    return path


def load_spec(path: PathLike) -> ModelSpec:
    """Read and validate ``model.json`` of the package at ``path`` (folder or the json file)."""
    folder = _package_dir(path)
    json_path = folder / MODEL_JSON
    if not json_path.is_file():
        raise ModelError("model.json is missing", folder)
    if json_path.stat().st_size > MAX_MODEL_JSON_BYTES:
        raise ModelError("model.json is larger than 1 MiB; refusing to parse it", json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"model.json is not valid JSON ({error})", json_path) from None
    return ModelSpec.from_json(data, json_path)


def build_network(spec: ModelSpec):
    """Instantiate the allow-listed MONAI network named by ``spec``, its 3D convolutions on oneDNN on the CPU
    (:mod:`meddl.models.convolution`)."""
    from monai.networks import nets

    from meddl.models.convolution import use_onednn_convolutions

    try:
        network = getattr(nets, spec.architecture)(**spec.architecture_args)
    except (TypeError, ValueError, AssertionError, AttributeError) as error:
        raise ModelError(f"cannot build {spec.architecture} from architecture.args ({error})") from None
    return use_onednn_convolutions(network)


@dataclass
class ModelPackage:
    """A loaded package: the spec, the network with its weights, and where it came from."""

    spec: ModelSpec
    network: Any
    path: Optional[Path] = None


def load_model(path: PathLike, device: Optional[str] = None) -> ModelPackage:
    """Load a package; weights come from safetensors only and must match the network exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = _package_dir(path)
    spec = load_spec(folder)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".ckpt", ".pkl", ".ts"})
        hint = f" (found {', '.join(unsafe)}: pickled/TorchScript weights are refused)" if unsafe else ""
        raise ModelError(f"weights.safetensors is missing{hint}", folder)
    network = build_network(spec)
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot read safetensors weights ({' '.join(str(error).split())})", weights_path) from None
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"weights do not fit {spec.architecture} with these args: {detail}", weights_path)
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ModelError(
                f"weight '{key}' is {tuple(tensor.shape)} {tensor.dtype}, the network needs "
                f"{tuple(want.shape)} {want.dtype}",
                weights_path,
            )
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ModelError(f"weight '{key}' contains NaN or infinite values", weights_path)
    network.load_state_dict(state, strict=True)
    network.eval()
    if device:
        network.to(device)
    return ModelPackage(spec=spec, network=network, path=folder)


def save_model(spec: ModelSpec, network, folder: PathLike) -> Path:
    """Write a package atomically: both files go to a temporary folder that is renamed into place.

    ``folder`` must not exist yet (model versions are immutable).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise ModelError("refusing to overwrite an existing model package (versions are immutable)", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        # One metadata entry only: safetensors writes them from a hash map in random order, so two entries would
        # give the same weights a different file (and sha256) from one run to the next.
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / MODEL_JSON).write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
        publish(staging, folder)
    finally:
        if staging.exists():
            for file in staging.iterdir():
                file.unlink()
            staging.rmdir()
    return folder
