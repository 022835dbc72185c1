"""``meddl segment``: one volume (file or DICOM series folder) or a folder of volumes → labelmaps.

The model is loaded once. A batch continues past a file that fails and lists every failure at the
end (exit code 5). Ctrl-C cancels cleanly (exit code 130): outputs are written to a temporary name
and renamed, so no partial labelmap is ever left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from meddl.cli import error_line
from meddl.errors import EXIT_OK, EXIT_PARTIAL, Cancelled, InputError, MedDLError
from meddl.fsutil import split_volume_suffix
from meddl.progress import CancelToken, ProgressCallback

__all__ = ["register", "run", "batch_cases", "output_name", "resolve_model_path"]

# Output format for an input format: two-file formats become their one-file twin (atomic rename).
_SAME_FORMAT = {
    ".nii.gz": ".nii.gz",
    ".nii": ".nii",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",
    ".mha": ".mha",
    ".mhd": ".mha",
    ".hdr": ".nii",
    ".hdr.gz": ".nii.gz",
}
FORMATS = ("input", "nii.gz", "nii", "nrrd", "mha")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a volume, a DICOM series or a folder of volumes with a model package",
        description="Segment one volume (NRRD, NIfTI, MetaImage file or DICOM series folder) into a labelmap "
        "file, or every volume of a folder into an output folder (same base names). The labelmap lies "
        "exactly on its source image.",
        epilog="Exit codes: 0 ok, 3 bad input, 4 bad model, 5 a batch in which some volumes failed, 130 cancelled.",
    )
    parser.add_argument("--model", required=True, help="model package folder (or a model home: its champion)")
    parser.add_argument(
        "--input", required=True, type=Path, help="volume file, DICOM series folder, or folder of volumes"
    )
    parser.add_argument("--output", required=True, type=Path, help="labelmap file (one input) or folder (a batch)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when present")
    parser.add_argument(
        "--tta", action="store_const", const=True, default=None, help="average over flips (test-time augmentation)"
    )
    parser.add_argument(
        "--force-modality", action="store_true", help="run even when the file's modality is not the model's"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="input",
        help="labelmap format in a batch (default: the input's; DICOM series and .mhd/.nhdr give one-file formats)",
    )
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")
    parser.set_defaults(func=run)


def resolve_model_path(model: str) -> Path:
    """The package folder for ``model``: a model home's champion when meddl.continual is there, else the path."""
    try:
        from meddl.continual import resolve_model
    except ImportError:
        return Path(model)
    return Path(resolve_model(model))


def output_name(source: Path, output_format: str = "input") -> str:
    """File name of the labelmap for ``source``: its base name with the chosen format's extension."""
    base, suffix = split_volume_suffix(source.name)
    if output_format != "input":
        return f"{base}.{output_format}"
    return base + _SAME_FORMAT.get(suffix, ".nii.gz")  # DICOM series and FreeSurfer volumes (not written) → NIfTI


def _holds_dicom(folder: Path) -> bool:
    from meddl.io.safety import detect_format

    return any(p.is_file() and detect_format(p) == "dicom" for p in folder.iterdir())


def batch_cases(folder: Path, exclude: Optional[Path] = None) -> Optional[List[Path]]:
    """The cases of a batch folder, or None when ``folder`` is itself one DICOM series.

    A batch folder holds volume files (by extension) and/or sub-folders, each taken as one DICOM series.
    A folder with DICOM files directly in it and no volume files is a single series.
    """
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    exclude = exclude.resolve() if exclude is not None else None
    volumes = [p for p in entries if p.is_file() and split_volume_suffix(p.name)[1]]
    series = [p for p in entries if p.is_dir() and p.resolve() != exclude]
    if not volumes and (not series or _holds_dicom(folder)):
        return None
    return volumes + series


class _Bars:
    """tqdm bars on stderr: cases of a batch (outer) and the current case's progress (inner)."""

    def __init__(self, enabled: bool, cases: int) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.outer = tqdm(total=cases, unit="case", file=sys.stderr, position=0, disable=not enabled or cases < 2)
        self.inner = tqdm(
            total=100,
            unit="%",
            file=sys.stderr,
            position=1 if cases > 1 else 0,
            leave=False,
            disable=not enabled,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    def case_progress(self, name: str) -> ProgressCallback:
        self.inner.reset(total=100)
        self.inner.set_description_str(name[:30])

        def report(fraction: float, message: str) -> None:
            self.inner.n = round(100 * fraction)
            self.inner.set_postfix_str(message[:40], refresh=False)
            self.inner.refresh()

        return report

    def case_done(self) -> None:
        self.outer.update(1)

    def write(self, line: str) -> None:
        if self.enabled:
            self.outer.write(line, file=sys.stderr)

    def close(self) -> None:
        self.inner.close()
        self.outer.close()


@contextlib.contextmanager
def cancel_on_interrupt(token: CancelToken) -> Iterator[None]:
    """First Ctrl-C sets ``token`` (the job stops at its next check and cleans up); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame) -> None:
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        print("meddl: cancelling (Ctrl-C again to abort at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _timing_text(summary: Dict) -> str:
    timings = summary.get("timings_s", {})
    shown = ["start"] if "start" in timings else []
    shown += [key for key in timings if key not in ("start", "load_model", "total")]
    steps = ", ".join(f"{key} {timings[key]:.2f}" for key in shown)
    in_all = f"; {timings['total']:.1f} s in all" if "total" in timings else ""
    volumes = ", ".join(f"{name} {ml:.1f} ml" for name, ml in summary.get("label_volumes_ml", {}).items())
    text = f"{summary['output']}  [{volumes}]  ({steps} s{in_all})"
    return text + "".join(f"; {note}" for note in summary.get("notes", []))


def run(args: argparse.Namespace) -> int:
    from meddl.startup import import_engine

    source: Path = args.input
    if not source.exists():  # said before the seconds of importing torch and MONAI
        raise InputError("no such file or folder", source)
    import_engine()
    from meddl.infer import segment_file, select_device
    from meddl.io.readers import WRITE_FORMATS
    from meddl.models import load_model

    show_bars = sys.stderr.isatty() and not getattr(args, "json", False)
    device = select_device(args.device)
    started = time.perf_counter()
    package = load_model(resolve_model_path(args.model), device)
    load_seconds = time.perf_counter() - started
    # What a cold command costs before it reads a voxel: importing torch and MONAI (seconds), then the model.
    command_started = getattr(args, "started", started)
    start_seconds = time.perf_counter() - command_started
    cases = batch_cases(source, exclude=args.output) if source.is_dir() else None
    token = CancelToken()

    def segment_one(case: Path, output: Path, progress: Optional[ProgressCallback]) -> Dict:
        return segment_file(package, case, output, device, args.tta, progress, token, args.force_modality)

    if cases is None:  # one volume (file or DICOM series)
        output: Path = args.output
        if output.is_dir():
            output = output / output_name(source, args.format)
        suffix = ".nii.gz" if output.name.lower().endswith(".nii.gz") else output.suffix.lower()
        if suffix not in WRITE_FORMATS:
            raise InputError(f"cannot write '{suffix or output.name}'; use one of {', '.join(WRITE_FORMATS)}", output)
        bars = _Bars(show_bars, 1)
        try:
            with cancel_on_interrupt(token):
                summary = segment_one(source, output, bars.case_progress(source.name))
        finally:
            bars.close()
        summary["timings_s"]["load_model"] = round(load_seconds, 4)
        summary["timings_s"]["start"] = round(start_seconds, 4)
        summary["timings_s"]["total"] = round(time.perf_counter() - command_started, 4)
        from meddl.cli import emit

        emit(args, summary, f"wrote {_timing_text(summary)}")
        return EXIT_OK
    return _run_batch(args, cases, segment_one, token, show_bars, start_seconds)


def _run_batch(
    args: argparse.Namespace,
    cases: List[Path],
    segment_one: Callable[[Path, Path, Optional[ProgressCallback]], Dict],
    token: CancelToken,
    show_bars: bool,
    start_seconds: float,
) -> int:
    from meddl.cli import emit

    if not cases:
        raise InputError(
            "the folder holds no volumes (.nii.gz, .nii, .hdr, .nrrd, .nhdr, .mha, .mhd, .mgz) or series", args.input
        )
    output_dir: Path = args.output
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError("a batch needs an output folder, and this is a file", output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done: List[Dict] = []
    failures: List[Dict] = []
    claimed: Dict[str, Path] = {}
    bars = _Bars(show_bars, len(cases))
    started = time.perf_counter()
    try:
        with cancel_on_interrupt(token):
            for case in cases:
                name = output_name(case, args.format)
                try:
                    if name in claimed:
                        raise InputError(f"its labelmap name {name} is already taken by {claimed[name].name}", case)
                    claimed[name] = case
                    # segment_one checks `token`: one Ctrl-C stops the whole batch, not only the current case.
                    summary = segment_one(case, output_dir / name, bars.case_progress(case.name))
                    done.append(summary)
                    bars.write(f"ok   {case.name} -> {name}")
                except Cancelled:
                    raise
                except MedDLError as error:
                    failures.append({"input": str(case), "error": error.to_dict()})
                    bars.write(f"FAIL {error}")
                except Exception as error:  # noqa: BLE001 - a batch reports a surprise and goes on
                    message = " ".join(f"internal error: {type(error).__name__}: {error}".split())
                    failures.append(
                        {"input": str(case), "error": {"kind": "internal", "message": f"{case}: {message}"}}
                    )
                    bars.write(f"FAIL {case}: {message}")
                finally:
                    bars.case_done()
    finally:
        bars.close()
    result = {
        "model": str(args.model),
        "output_dir": str(output_dir),
        "succeeded": len(done),
        "failed": len(failures),
        "seconds": round(time.perf_counter() - started + start_seconds, 3),
        "start_seconds": round(start_seconds, 3),
        "cases": done,
        "failures": failures,
    }
    each = (result["seconds"] - start_seconds) / len(cases)  # a folder with no volumes was refused above
    timing = f"(start {start_seconds:.1f} s, then {each:.1f} s a volume; {result['seconds']:.1f} s in all)"
    lines = [f"segmented {len(done)} of {len(cases)} volumes into {output_dir} {timing}"]
    lines += [f"  {Path(s['output']).name}" for s in done]
    emit(args, result, "\n".join(lines))
    if failures:
        print(f"meddl segment: {len(failures)} of {len(cases)} volumes failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {error_line(failure['error'])}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
