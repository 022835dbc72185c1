"""The continual update: fine-tune a candidate from the champion on new corrections without forgetting.

One update:

1. takes an exclusive lock on the home (one update at a time; a killed holder releases it);
2. collects the *new* corrections (active, not held out, not yet in the champion's ``training_data``) and a
   bounded, site-balanced replay buffer (replay cases = earlier training data, and earlier corrections);
3. brings every volume onto the model grid exactly as inference does (:func:`meddl.transforms.to_model_grid`,
   :func:`meddl.transforms.normalize_intensity`) and computes the champion's softmax on replay volumes;
4. trains: each batch mixes patches from new corrections (cross-entropy weighted up where the user changed
   the prediction, plus Dice) with replay patches (their labels, plus distillation of the champion's
   softmax: learning without forgetting); optional EWC. Patch centres are class-balanced. Bounded by
   ``max_steps`` and ``max_seconds``; a safetensors checkpoint is written every few seconds, so a killed
   update resumes where it was;
5. scores candidate and champion through the validation gate (:mod:`meddl.continual.gate`), writes the
   candidate as a new immutable version with its measured metrics, and promotes it or keeps it as a
   rejected candidate. Every step is in the audit log.

A classifier home (class-label corrections) follows the same steps with whole images instead of patches: each
image is prepared exactly as :func:`meddl.classify.classify_image` prepares it; a batch mixes new corrections
(cross-entropy) with replayed earlier corrections (cross-entropy plus distillation of the champion's softened
logits; without replay the correction images carry the distillation), and the gate scores the true-class
probability and accuracy (:func:`meddl.continual.gate.decide_classification`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from meddl.continual.gate import decide, decide_classification, score_cases, score_classification_cases
from meddl.continual.locks import LockBusy, file_lock
from meddl.continual.registry import ModelHome
from meddl.continual.store import StoredCase, load_case, load_correction, recover
from meddl.errors import Cancelled, ModelError
from meddl.fsutil import publish
from meddl.models import ModelPackage, load_model, save_model
from meddl.progress import CancelToken, ProgressCallback, no_progress, scaled
from meddl.transforms import normalize_intensity, resample_to_grid, to_model_grid

__all__ = ["UpdateOptions", "run_update"]

PathLike = Union[str, os.PathLike]
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class UpdateOptions:
    """How an update learns. ``method``: ``full`` (replay + distillation + changed-voxel weighting),
    ``replay`` (replay only) or ``naive`` (fine-tune on the new corrections alone)."""

    method: str = "full"
    learning_rate: float = 5e-4
    batch_size: int = 2
    changed_voxel_weight: float = 5.0
    replay_ratio: float = 1.0  # replay patches per correction patch, added to the batch (not replacing)
    replay_buffer_size: int = 16
    distill_weight: float = 1.0
    temperature: float = 2.0
    ewc_weight: float = 0.0
    checkpoint_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.method not in ("full", "replay", "naive"):
            raise ModelError(f"unknown update method '{self.method}' (full, replay or naive)")

    @property
    def uses_replay(self) -> bool:
        return self.method in ("full", "replay")

    @property
    def distills(self) -> bool:
        return self.method == "full" and self.distill_weight > 0

    @property
    def weights_changes(self) -> bool:
        return self.method == "full" and self.changed_voxel_weight != 1.0


@dataclass
class _Volume:
    """One training volume on the model grid, padded by half a patch so every centre gives a full patch."""

    id: str
    site: str
    image: np.ndarray  # float32 (k, j, i), normalised
    label: np.ndarray  # int64 class index (channel of spec.labels)
    weight: np.ndarray  # float32 per-voxel loss weight
    teacher: Optional[np.ndarray]  # float32 (C, k, j, i) champion softmax, replay volumes only
    centres: Dict[int, np.ndarray]  # class index → voxel indices (flat) of that class, inside the volume


@contextmanager
def _update_lock(home: ModelHome) -> Iterator[None]:
    try:
        with file_lock(home.updates_dir / "update.lock", blocking=False):
            yield
    except LockBusy:
        raise ModelError("another update is running on this model home", home.path) from None


def _clean_unregistered_versions(home: ModelHome) -> List[str]:
    """Version folders without a registry row were never acknowledged (a kill before registration)."""
    import shutil

    registered = {v["version"] for v in home.versions()}
    removed = []
    for folder in home.versions_dir.iterdir():
        if folder.name not in registered:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _class_index(label: np.ndarray, values: List[int]) -> np.ndarray:
    index = np.zeros(label.shape, dtype=np.int64)
    for channel, value in enumerate(values):
        index[label == value] = channel
    return index


def _prepare(
    case: StoredCase,
    package: ModelPackage,
    patch: List[int],
    role: str,
    options: UpdateOptions,
    device: str,
) -> _Volume:
    from meddl.infer import predict_probabilities

    spec = package.spec
    values = [label.value for label in spec.labels]
    model_image = to_model_grid(case.image, spec.target_spacing)
    label = resample_to_grid(case.label, model_image, "nearest").array
    image = normalize_intensity(model_image.array, spec.normalization)
    weight = np.ones(image.shape, dtype=np.float32)
    teacher = None
    if role == "new" and options.weights_changes:
        if case.prediction is not None:
            predicted = resample_to_grid(case.prediction, model_image, "nearest").array
        else:  # no prediction stored: the champion's own prediction is what the user corrected
            probabilities = predict_probabilities(model_image, package, device)
            predicted = np.asarray(values)[np.argmax(probabilities, axis=0)]
        weight[predicted != label] = options.changed_voxel_weight
    if role == "replay" and options.distills:
        teacher = predict_probabilities(model_image, package, device)
    classes = _class_index(label, values)
    pad = [(p // 2, p - p // 2) for p in patch]
    centres = {c: np.flatnonzero(classes == c) for c in range(len(values)) if (classes == c).any()}
    image = np.pad(image, pad, constant_values=float(image.min()))
    classes = np.pad(classes, pad, constant_values=0)
    weight = np.pad(weight, pad, constant_values=1.0)
    if teacher is not None:
        background = np.zeros((len(values), 1, 1, 1), dtype=np.float32)
        background[0] = 1.0
        teacher = np.concatenate(
            [np.pad(teacher[c], pad, constant_values=float(background[c, 0, 0, 0])) for c in range(len(values))]
        ).reshape((len(values),) + image.shape)
    return _Volume(case.id, case.site, image, classes, weight, teacher, centres)


def _sample_patch(volume: _Volume, patch: List[int], rng: np.random.Generator, shape_unpadded) -> Dict[str, Any]:
    """A class-balanced patch: pick a class present in the volume, then a voxel of it as the centre."""
    cls = int(rng.choice(sorted(volume.centres)))
    flat = int(rng.choice(volume.centres[cls]))
    centre = np.unravel_index(flat, shape_unpadded)
    # in padded coordinates the patch starting at the unpadded centre index is centred on it
    window = tuple(slice(int(c), int(c) + p) for c, p in zip(centre, patch))
    return {
        "image": volume.image[window],
        "label": volume.label[window],
        "weight": volume.weight[window],
        "teacher": volume.teacher[(slice(None),) + window] if volume.teacher is not None else None,
    }


def _augment(image: np.ndarray, others: List[Optional[np.ndarray]], rng: np.random.Generator):
    """Flips (all arrays) and intensity scale/shift/gamma/noise (image only), as in training."""
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis)
            others = [None if o is None else np.flip(o, axis + (o.ndim - 3)) for o in others]
    low = float(image.min())
    span = max(float(image.max()) - low, 1e-6)
    gamma = float(np.exp(rng.uniform(-0.2, 0.2)))
    image = ((image - low) / span) ** gamma * span + low
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    image = image + rng.normal(0.0, 0.02, image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), [
        None if o is None else np.ascontiguousarray(o) for o in others
    ]


@dataclass
class _Example:
    """One class-label correction on the network grid, prepared exactly as classification prepares it."""

    id: str
    image: np.ndarray  # float32 [C_in, *patch]
    target: int  # class index: position of the class among the model's labels sorted by value
    teacher: np.ndarray  # float32 [C] champion logits (distillation target)


def _prepare_example(case: StoredCase, package: ModelPackage, device: str) -> _Example:
    from meddl.classify import class_value
    from meddl.classify.infer import predict_logits
    from meddl.classify.preprocess import prepare_input

    spec = package.spec
    values = sorted(label.value for label in spec.labels)
    target = values.index(class_value(spec, case.meta["label"]["name"], case.id))
    prepared = prepare_input(case.image, spec)
    teacher = predict_logits(package.network, prepared.array[None], device)[0].astype(np.float32)
    return _Example(case.id, prepared.array, target, teacher)


def _classifier_loss(
    network, new: List[_Example], replay: List[_Example], options: UpdateOptions, seed: int, step: int, device: str
):
    """Cross-entropy on a batch of new corrections plus replayed ones, and distillation (KL to the champion's
    logits softened by ``options.temperature``) on the replayed images, or on the new ones when there is no
    replay, so the candidate keeps what the champion knew."""
    import torch

    rng = np.random.default_rng([seed, step])
    n_replay = int(round(options.batch_size * options.replay_ratio)) if replay else 0
    batch = [new[int(rng.integers(len(new)))] for _ in range(max(1, options.batch_size))]
    batch += [replay[int(rng.integers(len(replay)))] for _ in range(n_replay)]
    images = torch.from_numpy(np.stack([example.image for example in batch])).to(device)
    targets = torch.tensor([example.target for example in batch], device=device)
    logits = network(images)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    if options.distills:
        rows = list(range(len(batch) - n_replay, len(batch))) if n_replay else list(range(len(batch)))
        temperature = options.temperature
        teacher = torch.from_numpy(np.stack([batch[i].teacher for i in rows])).to(device)
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(logits[rows] / temperature, dim=1),
            torch.softmax(teacher / temperature, dim=1),
            reduction="batchmean",
        )
        loss = loss + options.distill_weight * temperature**2 * kl
    return loss


def _plan_key(
    champion: str, new_ids: List[str], replay_ids: List[str], options: UpdateOptions, max_steps: int, seed: int
) -> str:
    data = json.dumps([champion, sorted(new_ids), sorted(replay_ids), asdict(options), max_steps, seed], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, network, optimizer, meta: Dict[str, Any]) -> None:
    """Model and Adam state in one safetensors file (never pickle), written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    state = optimizer.state_dict()
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"opt.{index}.{name}"] = value.detach().cpu().reshape(value.shape).contiguous().clone()
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(state["param_groups"])}
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    publish(temporary, path)


def _load_checkpoint(path: Path, network, optimizer) -> Optional[Dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # a damaged checkpoint is only lost progress: start the update again
    network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    per_param: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": json.loads(metadata["param_groups"])})
    return json.loads(metadata["meta"])


def _select_replay(home: ModelHome, earlier_ids: List[str], size: int, seed: int) -> List[Dict[str, Any]]:
    """Bounded, site-balanced buffer: round-robin over sites, random order within a site."""
    rng = np.random.default_rng(seed)
    by_site: Dict[str, List[Dict[str, Any]]] = {}
    for case in home.cases("replay"):
        by_site.setdefault(case["site"], []).append({**case, "origin": "case"})
    if earlier_ids:
        placeholders = ",".join("?" * len(earlier_ids))
        for row in home.query(
            f"SELECT id, site FROM corrections WHERE status = 'active' AND id IN ({placeholders}) ORDER BY created, id",
            tuple(earlier_ids),
        ):
            by_site.setdefault(row["site"], []).append({"origin": "correction", "id": row["id"], "site": row["site"]})
    queues = {site: [items[i] for i in rng.permutation(len(items))] for site, items in sorted(by_site.items())}
    chosen: List[Dict[str, Any]] = []
    while len(chosen) < size and any(queues.values()):
        for site in list(queues):
            if queues[site] and len(chosen) < size:
                chosen.append(queues[site].pop())
    return chosen


def run_update(
    home: PathLike,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    max_steps: int = 200,
    max_seconds: float = 600.0,
    seed: int = 0,
    options: Optional[Union[UpdateOptions, Dict[str, Any]]] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Train a candidate from the champion on the new corrections, gate it, promote or reject it.

    Args:
        home: model home folder.
        progress: called with (fraction, message); messages name the phase and step.
        cancel: checked between steps; a cancelled update keeps its checkpoint and resumes next time.
        max_steps: optimisation steps in total (a resumed update continues the count).
        max_seconds: wall-time bound for this call's training phase.
        seed: makes patch sampling and augmentation reproducible (and identical after a resume).
        options: :class:`UpdateOptions` or a dict of its fields.
        device: torch device (default: CUDA when present, else CPU).

    Returns:
        A JSON-able summary: ``status`` (``promoted``, ``rejected`` or ``nothing_to_do``), ``candidate``,
        ``champion``, ``steps``, ``resumed_from_step``, ``gate`` report, ``timings_s``.
    """
    import torch

    from meddl.infer import select_device

    progress = progress or no_progress
    options = options if isinstance(options, UpdateOptions) else UpdateOptions(**(options or {}))
    model_home = ModelHome(home)
    device = select_device(device)
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    with _update_lock(model_home):
        recovered = recover(model_home)
        removed_versions = _clean_unregistered_versions(model_home)
        if removed_versions:
            model_home.audit("unregistered_versions_removed", versions=removed_versions)
        finished = _finish_interrupted(model_home)
        champion = model_home.champion()
        package = load_model(model_home.version_dir(champion), device)
        spec = package.spec
        classifier = spec.task == "classification"
        done_ids = [d["id"] for d in spec.raw.get("training_data", []) if d.get("kind") == "correction"]
        new_rows = [
            row
            for row in model_home.query(
                "SELECT id, site FROM corrections WHERE status = 'active' AND split = 'train' ORDER BY created, id"
            )
            if row["id"] not in set(done_ids)
        ]
        if not new_rows:
            return {
                "status": "nothing_to_do",
                "champion": champion,
                "message": f"no new corrections since version {champion}",
                "recovered": recovered,
            }
        new_ids = [row["id"] for row in new_rows]
        replay_items = (
            _select_replay(model_home, done_ids, options.replay_buffer_size, seed) if options.uses_replay else []
        )
        key = _plan_key(champion, new_ids, [r["id"] for r in replay_items], options, max_steps, seed)
        work = model_home.updates_dir / "current"
        work.mkdir(parents=True, exist_ok=True)
        decided = [
            v for v in model_home.versions() if (model_home.version(v["version"])["report"] or {}).get("key") == key
        ]
        if decided:  # this exact update already ran to a decision (a kill hit only its clean-up)
            (work / CHECKPOINT).unlink(missing_ok=True)
            row = model_home.version(decided[-1]["version"])
            return {
                "status": "already_decided",
                "candidate": row["version"],
                "champion": champion,
                "decision": row["report"]["decision"],
                "gate": row["report"],
                "recovered": recovered,
                "message": f"this update already produced {row['version']} ({row['report']['decision']})",
            }

        # -- data on the model grid ----------------------------------------------------------------------
        progress(0.01, "preparing corrections and replay data on the model grid")
        patch = spec.patch_size
        new_volumes, replay_volumes = [], []
        total_items = len(new_ids) + len(replay_items)
        for index, correction_id in enumerate(new_ids):
            if cancel:
                cancel.check()
            case = load_correction(model_home, correction_id)
            if classifier:
                new_volumes.append(_prepare_example(case, package, device))
            else:
                new_volumes.append(_prepare(case, package, patch, "new", options, device))
            progress(0.01 + 0.09 * (index + 1) / total_items, f"prepared correction {correction_id}")
        for index, item in enumerate(replay_items):
            if cancel:
                cancel.check()
            case = load_case(model_home, item) if item["origin"] == "case" else load_correction(model_home, item["id"])
            if classifier:
                replay_volumes.append(_prepare_example(case, package, device))
            else:
                replay_volumes.append(_prepare(case, package, patch, "replay", options, device))
            progress(0.01 + 0.09 * (len(new_ids) + index + 1) / total_items, f"prepared replay case {item['id']}")
        timings["prepare"] = time.perf_counter() - started

        # -- training --------------------------------------------------------------------------------------
        from monai.losses import DiceLoss

        torch.manual_seed(seed)
        network = package.network
        teacher_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        optimizer = torch.optim.Adam(network.parameters(), lr=options.learning_rate)
        checkpoint_path = work / CHECKPOINT
        step, resumed_from = 0, None
        if checkpoint_path.exists():
            meta = _load_checkpoint(checkpoint_path, network, optimizer)
            if meta and meta.get("key") == key:
                step = resumed_from = int(meta["step"])
                model_home.audit("update_resumed", champion=champion, step=step, key=key)
            else:
                network.load_state_dict(teacher_state)
                optimizer = torch.optim.Adam(network.parameters(), lr=options.learning_rate)
                checkpoint_path.unlink()
        if resumed_from is None:
            model_home.audit(
                "update_started",
                champion=champion,
                corrections=new_ids,
                replay=[r["id"] for r in replay_items],
                options=asdict(options),
                max_steps=max_steps,
                seed=seed,
                key=key,
            )
        use_ewc = options.ewc_weight and not classifier  # EWC's Fisher estimate samples segmentation patches
        ewc = _ewc_penalty(network, replay_volumes or new_volumes, patch, options, seed) if use_ewc else None
        anchor = {k: v.detach().clone() for k, v in network.named_parameters()} if ewc else None
        dice_loss = DiceLoss(to_onehot_y=True, softmax=True)
        last_checkpoint = time.perf_counter()
        train_started = time.perf_counter()
        train_progress = scaled(progress, 0.1, 0.8)
        network.train()
        losses: List[float] = []
        stopped_by = "steps"
        while step < max_steps:
            if cancel and cancel.cancelled:
                _save_checkpoint(checkpoint_path, network, optimizer, {"key": key, "step": step})
                model_home.audit("update_cancelled", champion=champion, step=step)
                raise Cancelled("update cancelled; its checkpoint is kept and the next update resumes it")
            if time.perf_counter() - train_started > max_seconds:
                stopped_by = "time"
                break
            if classifier:
                loss = _classifier_loss(network, new_volumes, replay_volumes, options, seed, step, device)
            else:
                rng = np.random.default_rng([seed, step])
                # Every method sees the same correction patches per step; replay is added, so learning the new site
                # is not slowed down by remembering the old one.
                n_new = max(1, options.batch_size)
                n_replay = int(round(options.batch_size * options.replay_ratio)) if replay_volumes else 0
                batch = []
                for role, count, pool in (("new", n_new, new_volumes), ("replay", n_replay, replay_volumes)):
                    for _ in range(count):
                        volume = pool[int(rng.integers(len(pool)))]
                        shape = tuple(s - p for s, p in zip(volume.image.shape, patch))
                        sample = _sample_patch(volume, patch, rng, shape)
                        image, (label, weight, teacher) = _augment(
                            sample["image"], [sample["label"], sample["weight"], sample["teacher"]], rng
                        )
                        batch.append((role, image, label, weight, teacher))
                images = torch.from_numpy(np.stack([b[1] for b in batch])[:, None]).to(device)
                labels = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
                weights = torch.from_numpy(np.stack([b[3] for b in batch])).to(device)
                logits = network(images)
                voxel_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                loss = (voxel_ce * weights).sum() / weights.sum() + dice_loss(logits, labels[:, None])
                replay_rows = [i for i, b in enumerate(batch) if b[0] == "replay" and b[4] is not None]
                if options.distills and replay_rows:
                    teacher = torch.from_numpy(np.stack([batch[i][4] for i in replay_rows])).to(device)
                    temperature = options.temperature
                    soft_teacher = torch.softmax(torch.log(teacher.clamp_min(1e-6)) / temperature, dim=1)
                    log_student = torch.log_softmax(logits[replay_rows] / temperature, dim=1)
                    kl = (soft_teacher * (torch.log(soft_teacher.clamp_min(1e-8)) - log_student)).sum(dim=1).mean()
                    loss = loss + options.distill_weight * temperature**2 * kl
            if ewc is not None:
                penalty = sum((ewc[n] * (p - anchor[n]) ** 2).sum() for n, p in network.named_parameters())
                loss = loss + options.ewc_weight * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            train_progress(step / max_steps, f"step {step}/{max_steps} loss {losses[-1]:.4f}")
            if time.perf_counter() - last_checkpoint >= options.checkpoint_seconds or step == max_steps:
                _save_checkpoint(checkpoint_path, network, optimizer, {"key": key, "step": step})
                last_checkpoint = time.perf_counter()
                progress(0.1 + 0.7 * step / max_steps, f"checkpoint step {step}")
        network.eval()
        if stopped_by == "time":
            _save_checkpoint(checkpoint_path, network, optimizer, {"key": key, "step": step})
        timings["train"] = time.perf_counter() - train_started

        # -- gate --------------------------------------------------------------------------------------------
        progress(0.8, "gate: scoring champion and candidate")
        gate_started = time.perf_counter()
        champion_package = load_model(model_home.version_dir(champion), device)
        candidate_package = ModelPackage(spec=spec, network=network, path=None)
        rules = model_home.gate_rules(champion)
        regression_cases = [] if classifier else [load_case(model_home, c) for c in model_home.cases("regression")]
        sites = sorted({row["site"] for row in new_rows})
        holdout_rows = [
            row
            for row in model_home.query(
                "SELECT id, site FROM corrections WHERE status = 'active' AND split = 'holdout' ORDER BY created"
            )
            if row["site"] in sites
        ]
        if holdout_rows:
            basis, correction_ids = "held-out corrections", [r["id"] for r in holdout_rows]
        else:
            basis, correction_ids = "training corrections (no held-out corrections yet)", new_ids
        correction_cases = [load_correction(model_home, i) for i in correction_ids]
        cases = regression_cases + correction_cases
        score = score_classification_cases if classifier else score_cases
        champion_scores = score(champion_package, cases, scaled(progress, 0.8, 0.88), cancel, device)
        candidate_scores = score(candidate_package, cases, scaled(progress, 0.88, 0.96), cancel, device)
        if classifier:
            report = decide_classification(rules, correction_ids, basis, champion_scores, candidate_scores)
        else:
            regression_by_site: Dict[str, List[str]] = {}
            for case in regression_cases:
                regression_by_site.setdefault(case.site, []).append(case.id)
            report = decide(rules, regression_by_site, correction_ids, basis, champion_scores, candidate_scores)
        timings["gate"] = time.perf_counter() - gate_started

        # -- write the candidate version, decide -----------------------------------------------------------------
        progress(0.97, "writing the candidate version")
        version = model_home.next_version_name()
        spec.version = version
        spec.raw["parent"] = champion
        # A class-label correction keeps its class in correction.json: that file's checksum identifies the label.
        label_hashes = {
            row["id"]: json.loads(row["files"]).get("correction.json" if classifier else "label.nii.gz")
            for row in model_home.query("SELECT id, files FROM corrections")
        }
        spec.raw["training_data"] = list(spec.raw.get("training_data", [])) + [
            {"kind": "correction", "id": i, "label_sha256": label_hashes.get(i)} for i in new_ids
        ]
        spec.raw["update"] = {
            "options": asdict(options),
            "steps": step,
            "seed": seed,
            "stopped_by": stopped_by,
            "replay": [r["id"] for r in replay_items],
            "final_loss": losses[-1] if losses else None,
        }
        spec.raw["metrics"] = {"gate": report}
        report["key"] = key
        save_model(spec, network, model_home.version_dir(version))
        # One row carries the decision; a kill after it is finished by _finish_interrupted on the next run.
        model_home.register_version(
            version, champion, "candidate" if report["decision"] == "promoted" else "rejected", report
        )
        _audit_decision(model_home, version, champion, report)
        if report["decision"] == "promoted":
            model_home.promote(version, reason="passed the validation gate", by="update")
        checkpoint_path.unlink(missing_ok=True)
        progress(1.0, f"{report['decision']}: {version}")
        timings["total"] = time.perf_counter() - started
        return {
            "status": report["decision"],
            "candidate": version,
            "champion": model_home.champion(),
            "parent": champion,
            "corrections": new_ids,
            "replay": [r["id"] for r in replay_items],
            "steps": step,
            "stopped_by": stopped_by,
            "resumed_from_step": resumed_from,
            "gate": report,
            "recovered": {**recovered, "finished": finished},
            "warnings": (
                [
                    "no earlier corrections to replay: this update distilled the champion on the new corrections only"
                    if classifier
                    else "no replay data (add replay cases with `meddl models add-case --kind replay`): this update "
                    "had no replay or distillation against forgetting"
                ]
                if options.uses_replay and not replay_items
                else []
            ),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }


def _audit_decision(home: ModelHome, version: str, parent: str, report: Dict[str, Any], **extra: Any) -> None:
    home.audit("candidate_written", version=version, parent=parent, **extra)
    home.audit(
        "gate_decision",
        version=version,
        decision=report["decision"],
        reasons=report["reasons"],
        regression=report["regression"],
        corrections=report["corrections"],
        **extra,
    )


def _finish_interrupted(home: ModelHome) -> List[str]:
    """Complete decisions a kill interrupted: audit registered candidates whose decision is not in the log, and
    promote a candidate that passed its gate when its parent is still the champion."""
    decided = {e.get("version") for e in home.audit_log.entries() if e.get("event") == "gate_decision"}
    finished = []
    for summary in home.versions():
        row = home.version(summary["version"])
        report = row["report"]
        if not report:
            continue
        if row["version"] not in decided:
            _audit_decision(home, row["version"], row["parent"], report, completed_after_interruption=True)
            finished.append(row["version"])
        if row["status"] == "candidate" and report["decision"] == "promoted":
            if row["parent"] == home.champion():
                home.promote(
                    row["version"], reason="passed the validation gate (completed after an interruption)", by="update"
                )
            else:  # the champion changed meanwhile (a manual promotion or rollback): do not override a person
                home.set_version_status(row["version"], "passed-not-promoted")
            finished.append(row["version"])
    return finished


def _ewc_penalty(network, volumes: List[_Volume], patch: List[int], options: UpdateOptions, seed: int):
    """Diagonal Fisher information of the champion on a few replay patches (EWC importance weights)."""
    import torch

    fisher = {n: torch.zeros_like(p) for n, p in network.named_parameters()}
    rng = np.random.default_rng([seed, 10**6])
    samples = 8
    network.eval()
    for _ in range(samples):
        volume = volumes[int(rng.integers(len(volumes)))]
        shape = tuple(s - p for s, p in zip(volume.image.shape, patch))
        sample = _sample_patch(volume, patch, rng, shape)
        image = torch.from_numpy(np.ascontiguousarray(sample["image"])[None, None])
        label = torch.from_numpy(np.ascontiguousarray(sample["label"])[None])
        network.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(network(image), label).backward()
        for name, parameter in network.named_parameters():
            if parameter.grad is not None:
                fisher[name] += parameter.grad.detach() ** 2 / samples
    network.zero_grad(set_to_none=True)
    network.train()
    return fisher
