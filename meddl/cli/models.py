"""``meddl models``: create a model home, list/show/diff its versions, promote and roll back the champion."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from meddl.cli import emit
from meddl.errors import InputError

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="model versions: init, list, show, diff, promote, rollback, check",
        description="Manage a model home: immutable versions, the champion that inference uses, rollback.",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="create a model home whose first version is a copy of a package")
    init.add_argument("--from", dest="package", required=True, help="model package folder (model.json + weights)")
    init.add_argument("--home", "--model", dest="home", required=True, help="new model home folder")
    init.add_argument(
        "--regression",
        nargs=3,
        action="append",
        default=[],
        metavar=("IMAGE", "LABEL", "SITE"),
        help="a locked regression case for the validation gate (repeatable)",
    )
    init.add_argument(
        "--replay",
        nargs=3,
        action="append",
        default=[],
        metavar=("IMAGE", "LABEL", "SITE"),
        help="earlier training data for the replay buffer (repeatable)",
    )
    init.add_argument(
        "--max-regression-drop",
        type=float,
        default=None,
        help="gate margin: largest allowed Dice loss on any regression site (default 0.01 = 1 point)",
    )

    add = actions.add_parser("add-case", help="add a locked regression case or a replay case to a home")
    add.add_argument("--home", "--model", dest="home", required=True)
    add.add_argument("--kind", choices=("regression", "replay"), required=True)
    add.add_argument("--site", default="default")
    add.add_argument("image")
    add.add_argument("label")

    for name, text in (("list", "list the versions"), ("check", "verify checksums and registry consistency")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("home", help="model home folder")
    show = actions.add_parser("show", help="one version's package, lineage and gate report")
    show.add_argument("home")
    show.add_argument("version", nargs="?", help="default: the champion")
    diff = actions.add_parser("diff", help="compare two versions (fields, training data, gate figures)")
    diff.add_argument("home")
    diff.add_argument("version_a")
    diff.add_argument("version_b")
    promote = actions.add_parser("promote", help="make a version the champion (audited)")
    promote.add_argument("home")
    promote.add_argument("version")
    promote.add_argument("--reason", default="manual promotion")
    rollback = actions.add_parser("rollback", help="point the champion back (default: to the previous champion)")
    rollback.add_argument("home")
    rollback.add_argument("version", nargs="?")
    rollback.add_argument("--reason", default="manual rollback")
    parser.set_defaults(func=run)


def _show(home, version: str) -> Dict[str, Any]:
    from meddl.models import load_spec

    row = home.version(version)
    spec = load_spec(home.version_dir(version))
    return {
        **{k: row[k] for k in ("version", "parent", "status", "created", "weights_sha256", "champion")},
        "path": str(home.version_dir(version)),
        "name": spec.name,
        "labels": {label.value: label.name for label in spec.labels},
        "gate_rules": spec.raw.get("gate"),
        "training_data": spec.raw.get("training_data", []),
        "update": spec.raw.get("update"),
        "gate_report": row["report"],
    }


def _flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(data, dict):
        out: Dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _report_lines(report: Dict[str, Any]) -> List[str]:
    lines = [f"gate: {report['decision']}" + (f" ({'; '.join(report['reasons'])})" if report["reasons"] else "")]
    for site, figures in report["regression"].items():
        lines.append(
            f"  regression site {site}: Dice {figures['champion_dice']:.4f} -> {figures['candidate_dice']:.4f}"
            f" ({figures['cases']} cases)"
        )
    corrections = report["corrections"]
    if corrections["cases"]:
        lines.append(
            f"  corrections ({corrections['basis']}): {corrections.get('metric', 'Dice')} "
            f"{corrections['champion_dice']:.4f} -> {corrections['candidate_dice']:.4f} ({corrections['cases']} cases)"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from meddl.continual import ModelHome, add_case, check_home, init_home

    action = args.models_action
    if action == "init":
        gate = {"max_regression_drop": args.max_regression_drop} if args.max_regression_drop is not None else None
        result = init_home(
            args.package, args.home, [tuple(c) for c in args.regression], [tuple(c) for c in args.replay], gate
        )
        emit(
            args,
            result,
            f"created model home {result['home']} (champion v1, {result['regression_cases']} "
            f"regression cases, {result['replay_cases']} replay cases)",
        )
        return 0
    if action == "add-case":
        result = add_case(args.home, args.image, args.label, args.kind, args.site)
        emit(args, result, f"added {args.kind} case {result['id']} (site {args.site})")
        return 0
    if action == "check":
        result = check_home(args.home)
        text = "\n".join(
            [
                f"champion {result['champion']}, {result['versions']} versions, {result['corrections']} "
                "corrections: " + ("consistent" if result["ok"] else "PROBLEMS")
            ]
            + result["problems"]
        )
        emit(args, result, text)
        return 0 if result["ok"] else 3
    home = ModelHome(args.home)
    if action == "list":
        versions = home.versions()
        lines = [f"{'':2}{'version':8} {'parent':8} {'status':10} created"]
        lines += [
            f"{'*' if v['champion'] else ' ':2}{v['version']:8} {v['parent'] or '-':8} {v['status']:10} {v['created']}"
            for v in versions
        ]
        emit(args, {"champion": home.champion(), "versions": versions}, "\n".join(lines))
        return 0
    if action == "show":
        result = _show(home, args.version or home.champion())
        lines = [
            f"{result['version']} ({result['status']}{', champion' if result['champion'] else ''}), parent "
            f"{result['parent'] or '-'}, {len(result['training_data'])} corrections in its training data",
            f"path {result['path']}",
        ]
        if result["gate_report"]:
            lines += _report_lines(result["gate_report"])
        emit(args, result, "\n".join(lines))
        return 0
    if action == "diff":
        a, b = _show(home, args.version_a), _show(home, args.version_b)
        flat_a, flat_b = (
            _flatten({k: v for k, v in a.items() if k != "training_data"}),
            _flatten({k: v for k, v in b.items() if k != "training_data"}),
        )
        changed = {
            k: [flat_a.get(k), flat_b.get(k)]
            for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)
        }
        ids_a = {d.get("id") for d in a["training_data"]}
        ids_b = {d.get("id") for d in b["training_data"]}
        result = {
            "a": a["version"],
            "b": b["version"],
            "changed": changed,
            "training_data_only_in_a": sorted(ids_a - ids_b),
            "training_data_only_in_b": sorted(ids_b - ids_a),
        }
        lines = [f"{k}: {json.dumps(v[0], default=str)} -> {json.dumps(v[1], default=str)}" for k, v in changed.items()]
        lines.append(
            f"corrections only in {a['version']}: {len(result['training_data_only_in_a'])}, only in "
            f"{b['version']}: {len(result['training_data_only_in_b'])}"
        )
        emit(args, result, "\n".join(lines))
        return 0
    if action == "promote":
        result = home.promote(args.version, reason=args.reason, by="cli")
        emit(args, result, f"champion is now {result['champion']} (was {result['previous']})")
        return 0
    if action == "rollback":
        result = home.rollback(args.version, reason=args.reason, by="cli")
        emit(args, result, f"rolled back: champion is now {result['champion']} (was {result['previous']})")
        return 0
    raise InputError(f"unknown action '{action}'")
