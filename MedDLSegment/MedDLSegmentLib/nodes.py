"""MRML nodes ⇄ files for the engine, without Qt.

Every function takes the MRML scene (and, where needed, the segmentations module logic) as arguments: inside
Slicer they are ``slicer.mrmlScene`` and ``slicer.modules.segmentations.logic()``, in tests and the web front end
they come from ``trame_slicer.core.SlicerApp``. Files are read and written with
``vtkMRMLVolumeArchetypeStorageNode``, which converts Slicer's RAS to the files' LPS and back.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from meddl.errors import InputError, ModelError
from MedDLSegmentLib.geometry import lps_geometry_from_ijk_to_ras
from MedDLSegmentLib.models import ModelLabel

__all__ = [
    "GRID_TOLERANCE",
    "write_volume_file",
    "read_volume_file",
    "ijk_to_ras",
    "check_same_grid",
    "labelmap_to_segmentation",
    "import_labelmap_file",
    "segmentation_to_label_array",
    "export_correction_file",
    "import_heatmap_file",
    "tag_result",
    "result_provenance",
]

PathLike = Union[str, os.PathLike]

# Same tolerance as the engine's Image.same_grid: NRRD stores geometry as decimal text.
GRID_TOLERANCE = 1e-4


def _with_storage_node(scene, path: PathLike):
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    return storage


def write_volume_file(scene, volume_node, path: PathLike, compress: bool = False) -> Path:
    """Write a scalar or labelmap volume node to ``path`` (NRRD, NIfTI, ...), atomically (temp file + rename).

    The file holds the node's own geometry converted to LPS; a parent transform is not applied.

    Raises:
        InputError: the node has no voxels, is not a single-component volume, or writing failed.
    """
    path = Path(path)
    name = volume_node.GetName() if volume_node is not None else None
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError(f"volume '{name}' has no voxels to write", path)
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "the engine takes single-component (scalar) volumes",
            path,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    # A name that does not exist yet (the storage node complains about overwriting), beside the target so that
    # the rename is atomic.
    temporary = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    storage = _with_storage_node(scene, temporary)
    try:
        storage.SetUseCompression(bool(compress))
        if not storage.WriteData(volume_node):
            raise InputError(f"could not write volume '{name}'", path)
        os.replace(temporary, path)
    finally:
        scene.RemoveNode(storage)
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_volume_file(scene, path: PathLike, name: Optional[str] = None, labelmap: bool = False):
    """Read a volume file into a new scalar (or labelmap) volume node added to ``scene``.

    Raises:
        InputError: the file is missing or not a readable volume.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, name or path.name.split(".")[0])
    storage = _with_storage_node(scene, path)
    try:
        ok = storage.ReadData(node)
    finally:
        scene.RemoveNode(storage)
    if not ok or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise InputError("cannot read as a volume", path)
    return node


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as numpy."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def check_same_grid(node, reference_node, what: PathLike, tolerance: float = GRID_TOLERANCE) -> None:
    """Raise InputError naming ``what`` unless ``node`` has ``reference_node``'s dimensions and IJK-to-RAS."""
    dims = tuple(node.GetImageData().GetDimensions())
    reference_dims = tuple(reference_node.GetImageData().GetDimensions())
    if dims != reference_dims:
        raise InputError(f"does not lie on volume '{reference_node.GetName()}': size {dims} != {reference_dims}", what)
    matrix, reference = ijk_to_ras(node), ijk_to_ras(reference_node)
    scale = max(1.0, float(np.abs(reference[:3, 3]).max()))
    if not (
        np.allclose(matrix[:3, :3], reference[:3, :3], atol=tolerance)
        and np.allclose(matrix[:3, 3], reference[:3, 3], atol=tolerance * scale)
    ):
        found = lps_geometry_from_ijk_to_ras(matrix)
        expected = lps_geometry_from_ijk_to_ras(reference)
        raise InputError(
            f"does not lie on volume '{reference_node.GetName()}': origin {np.round(found.origin, 4).tolist()} "
            f"spacing {np.round(found.spacing, 4).tolist()} vs origin {np.round(expected.origin, 4).tolist()} "
            f"spacing {np.round(expected.spacing, 4).tolist()} (LPS)",
            what,
        )


def _color_table_for(scene, labels: Sequence[ModelLabel]):
    """A temporary colour table whose entry ``value`` carries the model label's name and colour."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "MedDL labels")
    table.SetTypeToUser()
    table.SetNumberOfColors(max(label.value for label in labels) + 1)
    for value in range(table.GetNumberOfColors()):
        table.SetColor(value, f"unused {value}", 0.0, 0.0, 0.0, 0.0)
    for label in labels:
        table.SetColor(label.value, label.name, *label.color, 1.0)
    return table


def labelmap_to_segmentation(
    scene,
    segmentations_logic,
    labelmap_node,
    volume_node,
    labels: Sequence[ModelLabel],
    segmentation_node=None,
    name: Optional[str] = None,
):
    """Turn a labelmap node on ``volume_node``'s grid into a segmentation with one segment per model label.

    Segments are named and coloured from the model (``labels``, background excluded) and exist even when the
    labelmap holds no voxel of that label, so the user can paint a structure the model missed. An existing
    ``segmentation_node`` is emptied and reused.

    Returns:
        The segmentation node; its reference geometry is ``volume_node`` and its parent transform the volume's.

    Raises:
        InputError: the labelmap holds values that are not model labels.
        ModelError: two model labels share a name.
    """
    foreground = [label for label in labels if label.value != 0]
    names = [label.name for label in foreground]
    if len(set(names)) != len(names):
        # Segments are matched to label values by name, so two labels with one name would be ambiguous.
        raise ModelError(f"the model's label names are not distinct ({', '.join(names)})")
    values = np.unique(_array(labelmap_node))
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in {label.value for label in foreground})
    if unknown:
        raise InputError(
            f"labelmap holds values {unknown[:5]} that are not labels of the model "
            f"({', '.join(f'{lb.value}={lb.name}' for lb in foreground)})",
            labelmap_node.GetName(),
        )
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "MedDL segmentation")
    else:
        segmentation_node.GetSegmentation().RemoveAllSegments()
        if name:
            segmentation_node.SetName(name)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())

    # The import names segments after the labelmap's colour table: give it the model's names.
    table = _color_table_for(scene, foreground)
    display = labelmap_node.GetDisplayNode()
    if display is None:
        labelmap_node.CreateDefaultDisplayNodes()
        display = labelmap_node.GetDisplayNode()
    previous_color = display.GetColorNodeID()
    display.SetAndObserveColorNodeID(table.GetID())
    try:
        if not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ""):
            raise InputError("Slicer could not import the labelmap into a segmentation", labelmap_node.GetName())
    finally:
        display.SetAndObserveColorNodeID(previous_color)
        scene.RemoveNode(table)

    segmentation = segmentation_node.GetSegmentation()
    for label in foreground:
        segment_id = segmentation.GetSegmentIdBySegmentName(label.name)
        if not segment_id:
            segmentation.AddEmptySegment("", label.name, list(label.color))
        else:
            segmentation.GetSegment(segment_id).SetColor(*label.color)  # exact, not the table's 8-bit copy
    # Model order, so the segments table lists them as model.json does.
    for index, label in enumerate(foreground):
        segment_id = segmentation.GetSegmentIdBySegmentName(label.name)
        segmentation.SetSegmentIndex(segment_id, index)
    return segmentation_node


def _array(volume_node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromVolume(volume_node)


def import_labelmap_file(
    scene,
    segmentations_logic,
    labelmap_path: PathLike,
    volume_node,
    labels: Sequence[ModelLabel],
    segmentation_node=None,
    name: Optional[str] = None,
):
    """Read the engine's labelmap file and import it as a segmentation on ``volume_node``'s exact geometry.

    The file must lie on the volume's grid (the engine guarantees it; anything else is refused, naming the
    file). Its geometry is then copied from the volume bit for bit, so no decimal rounding of the file's header
    reaches the segmentation.
    """
    labelmap_node = read_volume_file(scene, labelmap_path, name="MedDL labelmap", labelmap=True)
    try:
        check_same_grid(labelmap_node, volume_node, labelmap_path)
        labelmap_node.CopyOrientation(volume_node)
        return labelmap_to_segmentation(
            scene, segmentations_logic, labelmap_node, volume_node, labels, segmentation_node, name
        )
    finally:
        _remove_volume(scene, labelmap_node)


def _remove_volume(scene, node, with_color_table: bool = False) -> None:
    """Remove a temporary volume node; ``with_color_table`` also removes the colour table an export created for it
    (as ``slicer.util.arrayFromSegmentBinaryLabelmap`` does), so repeated exports leave nothing behind."""
    display = node.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    scene.RemoveNode(node)
    if with_color_table and color is not None and not color.GetSingletonTag():
        scene.RemoveNode(color)


def segmentation_to_label_array(
    scene, segmentations_logic, segmentation_node, volume_node, labels: Sequence[ModelLabel]
) -> Tuple[np.ndarray, Dict[str, int]]:
    """The segmentation as one ``(k, j, i)`` array on ``volume_node``'s grid, with the model's label values.

    Values are mapped BY SEGMENT NAME: a segment named like a model label gets that label's value, whatever its
    position in the segment list. Where segments overlap, the one later in model order wins.

    Returns:
        The array and the voxel count of every model label.

    Raises:
        InputError: a segment's name is not a model label (the user must rename or delete it).
    """
    import vtk

    by_name = {label.name: label for label in labels if label.value != 0}
    segmentation = segmentation_node.GetSegmentation()
    segment_ids: List[str] = []
    values: List[int] = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_name = segmentation.GetNthSegment(index).GetName()
        if segment_name not in by_name:
            raise InputError(
                f"segment '{segment_name}' is not a label of the model ({', '.join(by_name)}); "
                "rename or delete it before submitting",
                segmentation_node.GetName(),
            )
        segment_ids.append(segmentation.GetNthSegmentID(index))
        values.append(by_name[segment_name].value)
    rank = {label.value: position for position, label in enumerate(by_name.values())}
    order = sorted(range(len(values)), key=lambda i: rank[values[i]])
    ids = vtk.vtkStringArray()
    for i in order:
        ids.InsertNextValue(segment_ids[i])
    dtype = np.uint8 if max(by_name[n].value for n in by_name) < 256 else np.uint16
    out = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), dtype=dtype)
    if segment_ids:
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedDL correction export")
        try:
            if not segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap_node, volume_node):
                raise InputError("Slicer could not export the segmentation to a labelmap", segmentation_node.GetName())
            check_same_grid(labelmap_node, volume_node, segmentation_node.GetName())
            exported = _array(labelmap_node)
            # Export numbers segments 1, 2, ... in the order of ``ids``; translate to model values.
            lookup = np.zeros(len(order) + 1, dtype=dtype)
            for position, i in enumerate(order, start=1):
                lookup[position] = values[i]
            out[:] = lookup[exported]
        finally:
            _remove_volume(scene, labelmap_node, with_color_table=True)
    counts = {label.name: int(np.count_nonzero(out == label.value)) for label in by_name.values()}
    return out, counts


def export_correction_file(
    scene, segmentations_logic, segmentation_node, volume_node, labels: Sequence[ModelLabel], path: PathLike
) -> Dict[str, int]:
    """Write the (edited) segmentation as a labelmap file on the volume's grid with the model's label values.

    Returns:
        Voxel count per label name (what the correction contains).
    """
    import slicer

    array, counts = segmentation_to_label_array(scene, segmentations_logic, segmentation_node, volume_node, labels)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedDL correction")
    try:
        labelmap_node.CopyOrientation(volume_node)
        slicer.util.updateVolumeFromArray(labelmap_node, array)
        write_volume_file(scene, labelmap_node, path, compress=True)
    finally:
        _remove_volume(scene, labelmap_node)
    return counts


def import_heatmap_file(
    scene,
    path: PathLike,
    volume_node,
    name: str = "MedDL heat map",
    color_node_id: str = "vtkMRMLColorTableNodeRainbow",
):
    """Read a Grad-CAM heat map written by the engine on ``volume_node``'s grid into a coloured volume node.

    The window spans the map's range so that its peak is the hottest colour; the caller shows it as the slice
    views' foreground.
    """
    node = read_volume_file(scene, path, name=name)
    try:
        check_same_grid(node, volume_node, path)
    except InputError:
        scene.RemoveNode(node)
        raise
    node.CopyOrientation(volume_node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_node_id)
    values = _array(node)
    low, high = float(values.min()), float(values.max())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
    return node


# Node attributes (saved with the scene) that tie a result to what made it, so that "Submit correction"
# knows the model, the source volume and the engine's original prediction even after a scene reload.
MODEL_ATTRIBUTE = "MedDL.model"
VOLUME_ATTRIBUTE = "MedDL.volumeID"
PREDICTION_ATTRIBUTE = "MedDL.prediction"


def tag_result(node, model_path: PathLike, volume_node, prediction_path: Optional[PathLike] = None) -> None:
    """Record on ``node`` which model and volume produced it (and the engine's prediction file)."""
    node.SetAttribute(MODEL_ATTRIBUTE, str(model_path))
    node.SetAttribute(VOLUME_ATTRIBUTE, volume_node.GetID())
    if prediction_path is not None:
        node.SetAttribute(PREDICTION_ATTRIBUTE, str(prediction_path))


def result_provenance(scene, node) -> Dict[str, object]:
    """What :func:`tag_result` recorded: ``{"model": path, "volume": node, "prediction": path}`` (each may be None)."""
    volume_id = node.GetAttribute(VOLUME_ATTRIBUTE)
    prediction = node.GetAttribute(PREDICTION_ATTRIBUTE)
    return {
        "model": node.GetAttribute(MODEL_ATTRIBUTE) or None,
        "volume": scene.GetNodeByID(volume_id) if volume_id else None,
        "prediction": prediction if prediction and Path(prediction).is_file() else None,
    }
