"""The Slicer side for real, headless: MRML nodes ⇄ files ⇄ the real worker ⇄ segmentation nodes.

Runs Slicer's own MRML and segmentations logic from PyPI's ``slicer-core`` through ``trame_slicer.core.SlicerApp``
(no Qt). Volumes are real files from installed packages (../shared/DATA.md); the engine is the real
``meddl.worker`` process driven by ``meddl.client``, with a tiny model package written by ``save_model``.
"""

from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BRAIN_MODEL = REPO / "Resources" / "models" / "brain-t1"
sys.path.insert(0, str(REPO / "MedDLSegment"))

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("trame_slicer", reason="pip install trame-slicer slicer-layer-dm slicer-core (the test extra)")


@pytest.fixture(scope="module")
def app():
    from trame_slicer.core import SlicerApp

    application = SlicerApp()
    import slicer

    slicer.mrmlScene = application.scene  # slicer.util needs it; SlicerApp does not set it
    yield application


@pytest.fixture(scope="module")
def scene(app):
    return app.scene


@pytest.fixture(scope="module")
def seg_logic(app):
    return app.segmentations_logic


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny 3-label UNet package. Label values are not in model order (0, 7, 2), so anything that maps segments
    to values by position instead of by name gets it wrong."""
    import torch

    from meddl.models import build_network, save_model, unet_segmentation_spec

    torch.manual_seed(0)
    spec = unet_segmentation_spec(
        "tiny-head",
        [
            {"value": 0, "name": "background", "color": [0, 0, 0]},
            {"value": 7, "name": "scalp", "color": [0.9, 0.6, 0.5]},
            {"value": 2, "name": "brain", "color": [0.2, 0.4, 0.9]},
        ],
        spacing=(4, 4, 4),
        patch_size=(32, 32, 32),
        channels=(4, 8),
        num_res_units=0,
        normalization={"kind": "percentile", "lower": 1, "upper": 99},
        version="1",
    )
    return save_model(spec, build_network(spec), tmp_path_factory.mktemp("models") / "tiny-head")


@pytest.fixture(scope="module")
def engine_session():
    """The modules' engine session (shared worker client) with this interpreter as the worker's Python."""
    from MedDLSegmentLib import engine, session

    work = session.EngineSession(REPO / "MedDLSegment", python=sys.executable)
    yield work  # started by the first test that needs it (the job-runner test starts it in the background)
    engine.shutdown_shared_client()


@pytest.fixture(scope="module")
def worker(engine_session):
    return engine_session.started_client()


@pytest.fixture(scope="module")
def oblique_volume(tmp_path_factory, nibabel_anatomical) -> Path:
    """A real MRI block (nibabel's anatomical.nii) re-stored with an oblique, left-right flipped direction."""
    image = sitk.ReadImage(str(nibabel_anatomical))
    angle = math.radians(25)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((12.5, -40.25, 7.0))
    image.SetSpacing((2.0, 2.2, 1.8))
    path = tmp_path_factory.mktemp("oblique") / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _physical_check(volume_arrays, itk_image, samples: int = 64) -> None:
    """Every sampled voxel of the converted node lies at a physical point where SimpleITK finds the same value at an
    exact voxel centre."""
    geometry = volume_arrays.geometry
    matrix = np.asarray(geometry.direction) @ np.diag(geometry.spacing)
    reference = sitk.GetArrayFromImage(itk_image)
    shape = volume_arrays.array.shape
    rng = np.random.default_rng(0)
    corners = [(k, j, i) for k in (0, shape[0] - 1) for j in (0, shape[1] - 1) for i in (0, shape[2] - 1)]
    for k, j, i in corners + [tuple(int(rng.integers(0, n)) for n in shape) for _ in range(samples)]:
        point = np.asarray(geometry.origin) + matrix @ np.array([i, j, k], dtype=float)
        index = np.array(itk_image.TransformPhysicalPointToContinuousIndex(point.tolist()))
        assert np.allclose(index, np.round(index), atol=1e-6), f"voxel {(k, j, i)} maps between voxel centres"
        ii, jj, kk = (int(round(v)) for v in index)
        assert volume_arrays.array[k, j, i] == reference[kk, jj, ii]


def test_geometry_conversion_is_its_own_inverse_and_matches_slicers_convention():
    from MedDLSegmentLib.geometry import ijk_to_ras_from_lps_geometry, lps_geometry_from_ijk_to_ras

    # The case measured in API.md §3: RAS directions diag(-1,-1,1), spacing (0.5,0.6,2), origin RAS (10,20,30)
    # is written to NRRD as LPS directions identity and origin (-10,-20,30).
    ras = np.array([[-0.5, 0, 0, 10], [0, -0.6, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]])
    lps = lps_geometry_from_ijk_to_ras(ras)
    assert np.allclose(lps.spacing, (0.5, 0.6, 2))
    assert np.allclose(lps.origin, (-10, -20, 30))
    assert np.allclose(lps.direction, np.eye(3))

    rng = np.random.default_rng(1)
    for _ in range(20):
        direction, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        spacing, origin = rng.uniform(0.1, 5, 3), rng.uniform(-300, 300, 3)
        back = lps_geometry_from_ijk_to_ras(ijk_to_ras_from_lps_geometry(spacing, origin, direction))
        assert np.allclose(back.spacing, spacing) and np.allclose(back.origin, origin)
        assert np.allclose(back.direction, direction)
    with pytest.raises(ValueError):
        lps_geometry_from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("which", ["fsl_t1_2mm", "oblique"])
def test_volume_node_geometry_matches_simpleitk(request, scene, which):
    """A file read by Slicer's storage node and converted to LPS puts every voxel where SimpleITK puts it. (For
    NIfTI Slicer even stores the slices in the opposite order, so this compares physical points, not arrays.)"""
    from MedDLSegmentLib.geometry import lps_to_volume, volume_to_lps
    from MedDLSegmentLib.nodes import ijk_to_ras, read_volume_file

    path = request.getfixturevalue("fsl_t1_2mm" if which == "fsl_t1_2mm" else "oblique_volume")
    node = read_volume_file(scene, path)
    converted = volume_to_lps(node)
    _physical_check(converted, sitk.ReadImage(str(path)))

    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    lps_to_volume(copy, converted.array, converted.geometry)
    assert np.allclose(ijk_to_ras(copy), ijk_to_ras(node), atol=1e-9)
    import slicer

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(node))
    scene.RemoveNode(copy)
    scene.RemoveNode(node)


def test_job_runner_starts_the_worker_in_the_background(
    scene, seg_logic, engine_session, model_dir, oblique_volume, tmp_path
):
    """The state machine behind the modules' buttons and QTimer: begin() returns at once even when the worker must
    first start (seconds of importing torch), no tick blocks for long, the result lands in the scene, cancel and
    failure end the job with a reason. It comes first in this file, so that its cold start is the only one."""
    import time

    from MedDLSegmentLib import engine, jobs, models, nodes

    from meddl.errors import InputError

    if engine_session.worker_running:  # run alone or after other tests: make the start cold again
        engine.shutdown_shared_client()
    runner = jobs.JobRunner(engine_session)
    volume = nodes.read_volume_file(scene, oblique_volume, name="runner")
    labels = models.read_model(model_dir).labels
    made = {}

    def submit(input_name="in.nrrd"):
        path = nodes.write_volume_file(scene, volume, tmp_path / input_name)
        if input_name == "gone.nrrd":
            path.unlink()
        params = {"model": str(model_dir), "input": str(path), "output": str(tmp_path / "out.nrrd")}
        return engine_session.submit("segment", params)

    def done(job):
        made["segmentation"] = nodes.import_labelmap_file(scene, seg_logic, job.result["output"], volume, labels)
        return "segmented"

    started = time.perf_counter()
    runner.begin(submit, done)
    begin_seconds = time.perf_counter() - started
    assert runner.busy and runner.message.startswith("Starting the engine")
    ticks, slowest, state = 0, 0.0, None
    while state is None:
        assert time.perf_counter() - started < 120, "the job did not finish"
        tick_started = time.perf_counter()
        state = runner.tick()
        slowest = max(slowest, time.perf_counter() - tick_started)
        ticks += 1
    total = time.perf_counter() - started
    assert state == "done", runner.error
    assert runner.message == "segmented" and runner.progress == 1.0 and not runner.busy
    assert made["segmentation"].GetSegmentation().GetNumberOfSegments() == 2
    # The cold start and the job took `total` seconds; the GUI thread was never held for more than a tick.
    assert begin_seconds < 0.5 and slowest < 1.0 and slowest < total / 3, (begin_seconds, slowest, total, ticks)
    print(
        f"cold start + segment: {total:.2f} s over {ticks} ticks; begin {begin_seconds * 1000:.1f} ms, "
        f"slowest tick {slowest * 1000:.0f} ms"
    )

    runner.begin(submit, done)
    runner.cancel()  # before the first tick: the job is never sent
    assert runner.tick() == "cancelled" and "before it started" in str(runner.error)
    assert runner.tick() is None and not runner.busy

    runner.begin(lambda: submit("gone.nrrd"), done)
    state = None
    while state is None:
        state = runner.tick()
    assert state == "failed" and isinstance(runner.error, InputError) and "gone.nrrd" in str(runner.error)
    assert runner.message.startswith("Failed: ")


def _segment_ids_by_name(segmentation_node) -> dict:
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
        for i in range(segmentation.GetNumberOfSegments())
    }


@pytest.mark.parametrize("which", ["fsl_t1_2mm", "oblique"])
def test_round_trip_volume_engine_segmentation_edit_correction(
    request, app, scene, seg_logic, worker, model_dir, tmp_path, which
):
    import slicer
    import vtk
    from MedDLSegmentLib import models, nodes

    path = request.getfixturevalue("fsl_t1_2mm" if which == "fsl_t1_2mm" else "oblique_volume")
    volume = nodes.read_volume_file(scene, path, name="patient")

    # Volume node -> NRRD for the engine -> the real worker segments it.
    engine_input = nodes.write_volume_file(scene, volume, tmp_path / "input.nrrd")
    result = worker.call(
        "segment",
        {"model": str(model_dir), "input": str(engine_input), "output": str(tmp_path / "prediction.nrrd")},
        timeout=120,
    )
    prediction_image = sitk.ReadImage(result["output"])
    prediction = sitk.GetArrayFromImage(prediction_image)
    labels = models.read_model(model_dir).labels

    # Labelmap -> segmentation node with the model's names and colours, on the volume's exact geometry.
    segmentation = nodes.import_labelmap_file(scene, seg_logic, result["output"], volume, labels, name="result")
    ids = _segment_ids_by_name(segmentation)
    assert list(ids) == ["scalp", "brain"], "segments must follow model.json's names and order"
    for label in labels[1:]:
        assert segmentation.GetSegmentation().GetSegment(ids[label.name]).GetColor() == pytest.approx(label.color)
    volume_matrix = nodes.ijk_to_ras(volume)
    for label in labels[1:]:
        internal = segmentation.GetBinaryLabelmapInternalRepresentation(ids[label.name])
        matrix = vtk.vtkMatrix4x4()
        internal.GetImageToWorldMatrix(matrix)
        assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), volume_matrix, atol=1e-9), (
            f"segment {label.name} is not stored on the volume's grid"
        )
    imported, counts = nodes.segmentation_to_label_array(scene, seg_logic, segmentation, volume, labels)
    np.testing.assert_array_equal(imported, prediction)
    assert counts == {lb.name: int((prediction == lb.value).sum()) for lb in labels[1:]}
    assert sum(counts.values()) > 0, "the tiny model predicted nothing: the round trip would prove little"

    # Edit segments as a user would in the Segment Editor (slicer.util needs slicer.modules: a test-only shim).
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: app.segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: app.volumes_logic),
    )
    shape = prediction.shape
    cube = np.zeros(shape, dtype=bool)
    cube[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2, shape[2] // 4 : shape[2] // 2] = True
    slab = np.zeros(shape, dtype=bool)
    slab[: shape[0] // 3] = True
    brain = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, ids["brain"], volume)
    scalp = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, ids["scalp"], volume)
    np.testing.assert_array_equal(brain > 0, prediction == 2)
    new_brain = (brain > 0) & ~slab  # the user erases brain in the lower third
    new_scalp = (scalp > 0) | (cube & (prediction == 0))  # and paints scalp into background
    slicer.util.updateSegmentBinaryLabelmapFromArray(new_brain.astype(np.uint8), segmentation, ids["brain"], volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(new_scalp.astype(np.uint8), segmentation, ids["scalp"], volume)
    # ... and drags "brain" to the top of the list: export order now differs from model order.
    segmentation.GetSegmentation().SetSegmentIndex(ids["brain"], 0)

    # Correction labelmap file: equal to the edit voxel for voxel, on the volume's grid, values by name.
    before = scene.GetNumberOfNodes()
    counts = nodes.export_correction_file(scene, seg_logic, segmentation, volume, labels, tmp_path / "fix.nrrd")
    assert scene.GetNumberOfNodes() == before, "exporting must not leave temporary nodes in the user's scene"
    correction_image = sitk.ReadImage(str(tmp_path / "fix.nrrd"))
    expected = np.zeros(shape, dtype=np.uint8)
    expected[new_scalp] = 7
    expected[new_brain] = 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(correction_image), expected)
    assert counts == {"scalp": int(new_scalp.sum()), "brain": int(new_brain.sum())}
    input_image = sitk.ReadImage(str(engine_input))
    assert correction_image.GetSize() == input_image.GetSize()
    assert np.allclose(correction_image.GetOrigin(), input_image.GetOrigin(), atol=1e-6)
    assert np.allclose(correction_image.GetSpacing(), input_image.GetSpacing(), atol=1e-9)
    assert np.allclose(correction_image.GetDirection(), input_image.GetDirection(), atol=1e-9)

    # A segment the model does not know is refused with one line naming it.
    extra = segmentation.GetSegmentation().AddEmptySegment("", "tumour", [1, 0, 0])
    from meddl.errors import InputError

    with pytest.raises(InputError, match="segment 'tumour' is not a label of the model"):
        nodes.export_correction_file(scene, seg_logic, segmentation, volume, labels, tmp_path / "bad.nrrd")
    assert not (tmp_path / "bad.nrrd").exists()
    # Deleting a segment means "none of this structure": its value disappears, the others stay.
    segmentation.GetSegmentation().RemoveSegment(extra)
    segmentation.GetSegmentation().RemoveSegment(ids["scalp"])
    array, _ = nodes.segmentation_to_label_array(scene, seg_logic, segmentation, volume, labels)
    np.testing.assert_array_equal(array, np.where(new_brain, 2, 0))
    # Segmenting again into the same node replaces its segments instead of piling up duplicates.
    again = nodes.import_labelmap_file(scene, seg_logic, result["output"], volume, labels, segmentation)
    assert again is segmentation and list(_segment_ids_by_name(again)) == ["scalp", "brain"]
    del slicer.modules


def test_labelmap_off_the_volume_grid_is_refused(scene, seg_logic, model_dir, fsl_t1_2mm, tmp_path):
    from MedDLSegmentLib import models, nodes

    from meddl.errors import InputError

    volume = nodes.read_volume_file(scene, fsl_t1_2mm, name="t1")
    labels = models.read_model(model_dir).labels
    shifted = sitk.Image(91, 109, 91, sitk.sitkUInt8)
    shifted.SetOrigin((-88.0, 126.0, 108.0))
    shifted.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1))
    shifted.SetSpacing((2, 2, 2))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match=r"shifted\.nrrd: does not lie on volume 't1'"):
        nodes.import_labelmap_file(scene, seg_logic, tmp_path / "shifted.nrrd", volume, labels)
    assert scene.GetNumberOfNodes() == before, "a refused import must not leave nodes behind"
    (tmp_path / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not a header\n")
    with pytest.raises(InputError, match=r"garbage\.nrrd: cannot read as a volume"):
        nodes.import_labelmap_file(scene, seg_logic, tmp_path / "garbage.nrrd", volume, labels)


def test_heatmap_overlay_lies_on_the_volume(scene, oblique_volume, tmp_path):
    import slicer
    from MedDLSegmentLib import nodes

    from meddl.errors import InputError

    volume = nodes.read_volume_file(scene, oblique_volume, name="mri")
    reference = sitk.ReadImage(str(nodes.write_volume_file(scene, volume, tmp_path / "mri.nrrd")))
    k, j, i = np.indices(sitk.GetArrayFromImage(reference).shape)
    heat = np.exp(-((k - 5) ** 2 + (j - 30) ** 2 + (i - 10) ** 2) / 20.0).astype(np.float32)
    heat_image = sitk.GetImageFromArray(heat)
    heat_image.CopyInformation(reference)
    sitk.WriteImage(heat_image, str(tmp_path / "heat.nrrd"))

    node = nodes.import_heatmap_file(scene, tmp_path / "heat.nrrd", volume)
    assert np.allclose(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume))
    loaded = slicer.util.arrayFromVolume(node)
    assert np.unravel_index(np.argmax(loaded), loaded.shape) == (5, 30, 10)
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"
    assert display.GetWindow() == pytest.approx(float(heat.max() - heat.min()), rel=1e-5)

    heat_image.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(heat_image, str(tmp_path / "moved.nrrd"))
    with pytest.raises(InputError, match="moved.nrrd: does not lie on volume 'mri'"):
        nodes.import_heatmap_file(scene, tmp_path / "moved.nrrd", volume)


def test_segment_folder_through_the_worker(worker, model_dir, fsl_t1_2mm, oblique_volume, tmp_path):
    """The batch helper behind MedDLSegmentLogic.segmentFolder: every good volume segmented, a bad one reported by
    name, the rest unaffected."""
    from MedDLSegmentLib import batch

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(fsl_t1_2mm, inputs / "t1.nii.gz")
    shutil.copy(oblique_volume, inputs / "oblique.nrrd")
    (inputs / "broken.nrrd").write_bytes(b"not an image")
    (inputs / "notes.txt").write_text("ignored")
    seen = []

    def segment_one(input_path, output_path):
        return worker.call(
            "segment", {"model": str(model_dir), "input": str(input_path), "output": str(output_path)}, timeout=120
        )

    summary = batch.segment_folder(segment_one, inputs, tmp_path / "out", progress=lambda f, m: seen.append(f))
    assert sorted(Path(r["output"]).name for r in summary["done"]) == ["oblique_seg.nrrd", "t1_seg.nrrd"]
    assert [Path(f["input"]).name for f in summary["failed"]] == ["broken.nrrd"]
    assert "broken.nrrd" in summary["failed"][0]["error"]
    assert seen[-1] == 1.0
    for result in summary["done"]:
        source = sitk.ReadImage(result["input"])
        output = sitk.ReadImage(result["output"])
        assert output.GetSize() == source.GetSize()
        assert np.allclose(output.GetOrigin(), source.GetOrigin(), atol=1e-4)


def test_session_waits_without_blocking_and_reports_errors(engine_session, model_dir, oblique_volume, tmp_path):
    """What MedDLSegmentLogic.segment does while it waits: pump GUI events, report progress, raise the worker's
    one-line error."""
    from MedDLSegmentLib import engine

    from meddl.errors import InputError

    hello = engine_session.ensure_started()
    assert engine.describe_worker(hello).startswith(("cpu", "cuda")) and "torch 2." in engine.describe_worker(hello)
    pumps, fractions = [], []
    job = engine_session.submit(
        "segment", {"model": str(model_dir), "input": str(oblique_volume), "output": str(tmp_path / "p.nrrd")}
    )
    result = engine_session.wait(job, progress=lambda f, m: fractions.append(f), process_events=lambda: pumps.append(1))
    assert Path(result["output"]).is_file()
    assert pumps, "the GUI was not given a chance to repaint while waiting"
    assert fractions[-1] == 1.0
    missing = tmp_path / "nowhere.nrrd"
    job = engine_session.submit(
        "segment", {"model": str(model_dir), "input": str(missing), "output": str(tmp_path / "q.nrrd")}
    )
    with pytest.raises(InputError, match="nowhere.nrrd"):
        engine_session.wait(job)
    assert engine_session.worker_running, "a bad request must not take the worker down"


def test_a_ct_volume_node_is_refused_by_the_mr_model_until_forced(scene, engine_session, tmp_path):
    """A CT loaded in Slicer reaches the worker as an NRRD with no modality tag; the MR brain model refuses it as a
    ModalityError (which the widget turns into a "segment anyway?" question) with no command-line switch in the
    message, and runs when the module passes force_modality."""
    from conftest import package_dir
    from MedDLSegmentLib import nodes

    from meddl.errors import ModalityError
    from meddl.io import Image, read_image, write_image

    ct = read_image(package_dir("data_store") / "data" / "eCT_Supplemental.dcm")  # a real CT in Hounsfield units
    # Its two 10 mm slices, three times over: 60 mm, as thick as the brain model asks of any volume.
    thick = Image(np.tile(ct.array, (3, 1, 1)).astype(np.int16), ct.spacing, ct.origin, ct.direction)
    write_image(thick, tmp_path / "ct.nii.gz")
    volume = nodes.read_volume_file(scene, tmp_path / "ct.nii.gz", name="head CT")
    path = nodes.write_volume_file(scene, volume, tmp_path / "input.nrrd")  # what startSegment hands the worker
    params = {"model": str(BRAIN_MODEL), "input": str(path), "output": str(tmp_path / "brain.nrrd")}
    engine_session.ensure_started()
    with pytest.raises(ModalityError) as refused:
        engine_session.wait(engine_session.submit("segment", params))
    message = str(refused.value)
    assert "input.nrrd" in message and "Hounsfield" in message and "expects MR" in message, message
    assert "--force-modality" not in message and not (tmp_path / "brain.nrrd").exists()
    result = engine_session.wait(engine_session.submit("segment", dict(params, force_modality=True)))
    written = sitk.ReadImage(result["output"])
    assert written.GetSize() == sitk.ReadImage(str(path)).GetSize()
    scene.RemoveNode(volume)


def test_classify_heatmap_lands_on_the_volume_node(scene, engine_session, oblique_volume, tmp_path):
    """MedDLClassify's path without Qt: volume node -> NRRD -> worker ``classify`` -> Grad-CAM map imported as a
    coloured volume on the node's exact grid; the probability table's classes are the model's."""
    import torch
    from MedDLSegmentLib import models, nodes

    from meddl.classify.train import default_classifier_spec
    from meddl.models import build_network, save_model

    torch.manual_seed(0)
    spec = default_classifier_spec(["low", "high"], 3, (16, 16, 16), None, name="tiny-cls", widths=(4, 8, 8, 8))
    model = save_model(spec, build_network(spec), tmp_path / "tiny-cls")
    volume = nodes.read_volume_file(scene, oblique_volume, name="mri")
    engine_input = nodes.write_volume_file(scene, volume, tmp_path / "input.nrrd")
    job = engine_session.submit(
        "classify", {"model": str(model), "input": str(engine_input), "heatmap_output": str(tmp_path / "cam.nrrd")}
    )
    result = engine_session.wait(job)
    assert sorted(result["probabilities"]) == sorted(label.name for label in models.read_model(model).labels)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["predicted"] == max(result["probabilities"], key=result["probabilities"].get)
    heatmap = nodes.import_heatmap_file(scene, result["heatmap"], volume, name="mri Grad-CAM")
    assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert np.allclose(nodes.ijk_to_ras(heatmap), nodes.ijk_to_ras(volume))
