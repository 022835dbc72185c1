"""Validation gate: may a candidate replace the champion?

The candidate and the champion are scored with the real inference path (:func:`meddl.infer.segment_image`,
labelmap on each case's own grid) on

* the locked regression set, per site (cases never used for updates): the candidate may lose at most
  ``max_regression_drop`` mean foreground Dice on any site;
* corrections: the held-out corrections of the sites being updated (or, before any exist, the corrections
  the candidate was trained on, which the report says): the candidate must gain more than
  ``min_correction_gain``.

A classifier home is gated the same way on its class-label corrections (:func:`decide_classification`): the
score of a case is the probability the model gives its true class (through :func:`meddl.classify.classify_image`,
calibration included), and the candidate must also not lose accuracy. A classifier home holds no locked
regression cases (they are labelmaps), so no regression set is required of it.

The rules come from the champion package's ``gate`` field (see ``DEFAULT_GATE``), so the change-control
plan is part of the model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from meddl.continual.store import StoredCase
from meddl.models import ModelPackage
from meddl.progress import CancelToken, ProgressCallback, no_progress

__all__ = ["mean_foreground_dice", "score_cases", "score_classification_cases", "decide", "decide_classification"]


def mean_foreground_dice(prediction: np.ndarray, reference: np.ndarray, values: Sequence[int]) -> float:
    """Mean Dice over the foreground labels present in the prediction or the reference (1.0 when none is)."""
    import torch
    from monai.metrics import compute_dice

    present = [v for v in values if v != 0 and ((prediction == v).any() or (reference == v).any())]
    if not present:
        return 1.0
    pred = torch.from_numpy(np.stack([prediction == v for v in present])[None].astype(np.float32))
    ref = torch.from_numpy(np.stack([reference == v for v in present])[None].astype(np.float32))
    return float(compute_dice(pred, ref, include_background=True, ignore_empty=False).mean())


def score_cases(
    package: ModelPackage,
    cases: Sequence[StoredCase],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    device: Optional[str] = None,
) -> Dict[str, float]:
    """Mean foreground Dice of ``package`` on each case (case id → Dice)."""
    from meddl.infer import segment_image

    progress = progress or no_progress
    values = [label.value for label in package.spec.labels]
    scores = {}
    for index, case in enumerate(cases):
        if cancel:
            cancel.check()
        result = segment_image(case.image, package, device=device, tta=False)
        scores[case.id] = mean_foreground_dice(result.labelmap.array, case.label.array, values)
        progress((index + 1) / max(1, len(cases)), f"scored {index + 1}/{len(cases)}")
    return scores


def score_classification_cases(
    package: ModelPackage,
    cases: Sequence[StoredCase],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    device: Optional[str] = None,
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Probability of the true class, and correctness (1.0 or 0.0), of ``package`` on each class-label correction
    (case id → value), classified exactly as ``meddl classify`` does."""
    from meddl.classify import classify_image

    progress = progress or no_progress
    probability, correct = {}, {}
    for index, case in enumerate(cases):
        if cancel:
            cancel.check()
        result = classify_image(case.image, package, heatmap=False, device=device)
        truth = case.meta["label"]["name"]
        probability[case.id] = float(result.probabilities[truth])
        correct[case.id] = float(result.predicted == truth)
        progress((index + 1) / max(1, len(cases)), f"scored {index + 1}/{len(cases)}")
    return probability, correct


def _mean(scores: Dict[str, float], ids: List[str]) -> Optional[float]:
    return float(np.mean([scores[i] for i in ids])) if ids else None


def decide(
    rules: Dict[str, Any],
    regression: Dict[str, List[str]],
    corrections: List[str],
    corrections_basis: str,
    champion_scores: Dict[str, float],
    candidate_scores: Dict[str, float],
    unit: str = "Dice",
) -> Dict[str, Any]:
    """Apply the gate's rules to measured scores; returns the report (``decision``, ``reasons``, per-site figures)."""
    reasons: List[str] = []
    max_drop = float(rules.get("max_regression_drop", 0.01))
    min_gain = float(rules.get("min_correction_gain", 0.0))
    sites = {}
    for site, ids in sorted(regression.items()):
        before, after = _mean(champion_scores, ids), _mean(candidate_scores, ids)
        drop = before - after
        ok = drop <= max_drop + 1e-9
        sites[site] = {"cases": len(ids), "champion_dice": before, "candidate_dice": after, "drop": drop, "pass": ok}
        if not ok:
            reasons.append(f"regression site '{site}' drops {drop * 100:.2f} Dice points (limit {max_drop * 100:.2f})")
    if not regression and rules.get("require_regression_set", True):
        reasons.append("the model home has no locked regression cases, and the gate requires them")
    before, after = _mean(champion_scores, corrections), _mean(candidate_scores, corrections)
    gain = (after - before) if corrections else None
    corrections_ok = bool(corrections) and gain > min_gain
    if not corrections:
        reasons.append("no corrections to score the candidate on")
    elif not corrections_ok:
        reasons.append(f"corrections gain {gain * 100:.2f} {unit} points (must exceed {min_gain * 100:.2f})")
    return {
        "rules": dict(rules),
        "regression": sites,
        "corrections": {
            "basis": corrections_basis,
            "cases": len(corrections),
            "champion_dice": before,
            "candidate_dice": after,
            "gain": gain,
            "pass": corrections_ok,
            "metric": unit,
        },
        "decision": "rejected" if reasons else "promoted",
        "reasons": reasons,
    }


def decide_classification(
    rules: Dict[str, Any],
    corrections: List[str],
    corrections_basis: str,
    champion_scores: Tuple[Dict[str, float], Dict[str, float]],
    candidate_scores: Tuple[Dict[str, float], Dict[str, float]],
) -> Dict[str, Any]:
    """:func:`decide` for a classifier: the mean true-class probability must gain more than
    ``min_correction_gain`` and the accuracy must not drop (``score_classification_cases`` gives both)."""
    # Regression cases are labelmaps, which a classifier home refuses: there is no regression set to require.
    report = decide(
        {**rules, "require_regression_set": False},
        {},
        corrections,
        corrections_basis,
        champion_scores[0],
        candidate_scores[0],
        unit="true-class probability",
    )
    before, after = _mean(champion_scores[1], corrections), _mean(candidate_scores[1], corrections)
    report["corrections"].update(champion_accuracy=before, candidate_accuracy=after)
    if corrections and after < before - 1e-9:
        report["corrections"]["pass"] = False
        report["reasons"].append(f"accuracy on the corrections drops from {before:.3f} to {after:.3f}")
        report["decision"] = "rejected"
    return report
