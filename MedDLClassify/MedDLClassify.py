"""MedDL Classify: classify a volume with a packaged MONAI classifier, see where it looked (Grad-CAM), correct it.

Same architecture as MedDL Segment: the engine runs in the shared background worker (``meddl.worker``) and this
file is the thin Qt layer plus the console API (:class:`MedDLClassifyLogic`). The Qt-free code (nodes ⇄ files,
models, engine set-up) is ``MedDLSegmentLib``, shipped by the MedDLSegment module of the same extension.

Python console::

    logic = slicer.util.getModuleLogic("MedDLClassify")
    result = logic.classify(slicer.util.getNode("MRHead"))   # {"probabilities": {...}, "predicted": ..., ...}
"""

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Dict, List, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _addImportPaths() -> None:
    """Put the engine (``meddl``) and MedDLSegmentLib on sys.path: in a build both lie beside this file; in a
    source checkout they are in the repository root and the MedDLSegment folder."""
    for folder in (MODULE_DIR, MODULE_DIR.parent, MODULE_DIR.parent.parent):
        if (folder / "meddl" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            break
    for folder in (MODULE_DIR, MODULE_DIR.parent / "MedDLSegment"):
        if (folder / "MedDLSegmentLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            break


_addImportPaths()

from MedDLSegmentLib import engine, jobs, models, nodes, session  # noqa: E402

logger = logging.getLogger("MedDLClassify")


#
# MedDLClassify
#


class MedDLClassify(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL Classify"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedDL contributors"]
        self.parent.helpText = (
            "Classify a volume with a deep-learning classifier (PyTorch/MONAI) running in a background worker: "
            "calibrated class probabilities, a Grad-CAM heat map over the volume showing where the model looked, "
            "and 'Correct label' to teach the model the right class. Console API: MedDLClassifyLogic.classify()."
        )
        self.parent.acknowledgementText = "Built on MONAI (networks, Grad-CAM) and PyTorch."


#
# Parameter node
#


@parameterNodeWrapper
class MedDLClassifyParameterNode:
    """inputVolume: what to classify; heatmapVolume: the Grad-CAM map of the last result; modelPath: the model;
    heatmapOpacity: opacity of the heat map over the volume."""

    inputVolume: vtkMRMLScalarVolumeNode
    heatmapVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# Widget
#


class MedDLClassifyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runner = None
        self._pollTimer = None
        self._lastResult: Dict = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDLClassify.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDLClassifyLogic()
        self.runner = jobs.JobRunner(self.logic.session)

        self.ui.modelFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.progressBar.setRange(0, 100)
        self.ui.probabilitiesTable.setHorizontalHeaderLabels(["Class", "Probability"])
        self.ui.probabilitiesTable.horizontalHeader().setStretchLastSection(True)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.correctLabelButton.connect("clicked(bool)", self.onCorrectLabelButton)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacityChanged)
        self.ui.heatmapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onHeatmapChanged)

        tooOld = engine.python_too_old(sys.version_info[:2])
        self.ui.requirementsLabel.text = tooOld or ""
        self.ui.requirementsLabel.visible = bool(tooOld)

        for folder in _savedModelFolders():
            if Path(folder).is_dir() and Path(folder) not in self.logic.extraModelFolders:
                self.logic.extraModelFolders.append(Path(folder))
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()
        # Application exit or module reload: stop the worker (a reloaded module may bring a newer engine).
        engine.shutdown_shared_client()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MedDLClassifyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            index = self.ui.modelSelector.findData(self._parameterNode.modelPath)
            if index >= 0:
                self.ui.modelSelector.setCurrentIndex(index)
        self._updateButtons()

    # -- models ---------------------------------------------------------------------------------------------
    def refreshModels(self) -> None:
        combo = self.ui.modelSelector
        current = self._parameterNode.modelPath if self._parameterNode else ""
        combo.blockSignals(True)
        combo.clear()
        for entry in self.logic.availableModels():
            combo.addItem(entry.title, str(entry.path))
        if combo.count == 0:
            combo.addItem("(no classifier found: add a model folder)", "")
        combo.blockSignals(False)
        index = combo.findData(current) if current else -1
        if index >= 0:
            combo.setCurrentIndex(index)
        self.onModelChanged()

    def onModelChanged(self, index: int = -1) -> None:
        path = self.ui.modelSelector.currentData or ""
        if self._parameterNode:
            self._parameterNode.modelPath = path
        self.ui.correctClassComboBox.clear()
        if path:
            try:
                for name in self.logic.classNames(path):
                    self.ui.correctClassComboBox.addItem(name)
            except Exception as error:  # a broken package must not break the panel
                self.ui.statusLabel.text = str(error)
        self._updateButtons()

    def onAddModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot add this model folder.", waitCursor=True):
            added = self.logic.addModelFolder(self.ui.modelFolderPathLineEdit.currentPath)
            self.refreshModels()
            index = self.ui.modelSelector.findData(str(added[0].path))
            if index >= 0:
                self.ui.modelSelector.setCurrentIndex(index)
            self.ui.modelFolderPathLineEdit.addCurrentPathToHistory()
            _saveModelFolders(self.logic.extraModelFolders)

    # -- state ----------------------------------------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.runner.busy
        node = self._parameterNode
        ready = bool(node and node.inputVolume and node.modelPath) and not engine.python_too_old(sys.version_info[:2])
        self.ui.classifyButton.enabled = ready and not busy
        self.ui.cancelButton.enabled = busy
        self.ui.correctLabelButton.enabled = ready and not busy and self.ui.correctClassComboBox.count > 0

    def _setStatus(self, fraction: Optional[float], message: str) -> None:
        if fraction is not None:
            self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.text = message

    def _ensureDependencies(self) -> bool:
        """Check once that the worker's Python has torch, MONAI and the rest; offer to install what is missing."""
        tooOld = engine.python_too_old(sys.version_info[:2])
        if tooOld:
            slicer.util.errorDisplay(tooOld)
            return False
        if self.logic.session.dependencies_ready:
            return True
        with slicer.util.tryWithErrorDisplay("Cannot check the engine's dependencies.", waitCursor=True):
            missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "MedDL needs these Python packages in Slicer's Python:\n\n  "
            + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads about 1-3 GB. Slicer's own numpy is kept.",
            "MedDL: install dependencies",
        ):
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installDependencies(missing)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle="MedDL: installation failed")
            return False
        return True

    def _start(self, submit: Callable, onDone: Callable) -> None:
        """Hand a job to the runner; the worker starts in the background if needed and the timer follows it."""
        if not self._ensureDependencies():
            return
        try:
            self.runner.begin(submit, onDone)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle="MedDL")
            return
        self._setStatus(0, self.runner.message)
        self._pollTimer.start()
        self._updateButtons()

    def onPollWorker(self) -> None:
        try:
            state = self.runner.tick()
        except Exception as error:  # the timer must keep the GUI alive whatever happens
            logger.exception("following the MedDL job failed")
            state, self.runner.error = None, error
        self._setStatus(self.runner.progress, self.runner.message)
        client = self.logic.session.client()
        if client.alive and client.hello:
            self.ui.deviceLabel.text = engine.describe_worker(client.hello)
        if state == "failed":
            slicer.util.errorDisplay(str(self.runner.error), windowTitle="MedDL")
        if not self.runner.busy:
            self._pollTimer.stop()
            self._updateButtons()

    # -- actions --------------------------------------------------------------------------------------------
    def onClassifyButton(self) -> None:
        node = self._parameterNode
        volume, model = node.inputVolume, node.modelPath
        self._start(lambda: self.logic.startClassify(volume, model), lambda job: self._onClassifyDone(job, volume))

    def _onClassifyDone(self, job, volume) -> str:
        result, heatmap = self.logic.finishClassify(job, volume)
        self._lastResult = dict(result, volumeID=volume.GetID())
        self._showProbabilities(result.get("probabilities", {}))
        predicted = result.get("predicted")
        index = self.ui.correctClassComboBox.findText(str(predicted))
        if index >= 0:
            self.ui.correctClassComboBox.setCurrentIndex(index)
        if self._parameterNode:
            self._parameterNode.heatmapVolume = heatmap
        self._showHeatmap(volume, heatmap)
        probability = result.get("probabilities", {}).get(predicted)
        return f"Predicted: {predicted}" + (f" ({probability:.1%})" if probability is not None else "")

    def _showProbabilities(self, probabilities: Dict[str, float]) -> None:
        table = self.ui.probabilitiesTable
        rows = sorted(probabilities.items(), key=lambda item: -item[1])
        table.setRowCount(len(rows))
        for row, (name, probability) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(str(name)))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{probability:.3f}"))

    def _showHeatmap(self, volume, heatmap) -> None:
        opacity = self._parameterNode.heatmapOpacity if self._parameterNode else 0.5
        if heatmap is None:
            slicer.util.setSliceViewerLayers(background=volume, foreground=None)
        else:
            slicer.util.setSliceViewerLayers(background=volume, foreground=heatmap, foregroundOpacity=opacity)

    def onHeatmapChanged(self, node) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self._showHeatmap(self._parameterNode.inputVolume, node)

    def onHeatmapOpacityChanged(self, value: float) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onCancelButton(self) -> None:
        self.runner.cancel()
        self._setStatus(None, self.runner.message)

    def onCorrectLabelButton(self) -> None:
        node = self._parameterNode
        className = self.ui.correctClassComboBox.currentText
        volume, model = node.inputVolume, node.modelPath
        self._start(
            # what the model said about this volume, if it was the last one classified
            lambda: self.logic.startCorrectLabel(
                volume,
                className,
                model,
                lastResult=self._lastResult if self._lastResult.get("volumeID") == volume.GetID() else None,
            ),
            lambda job: f"Saved: this volume is '{className}'.",
        )


MODEL_FOLDERS_SETTING = "MedDL/ModelFolders"


def _savedModelFolders() -> List[str]:
    """Model folders the user added in earlier sessions (shared by both MedDL modules)."""
    value = qt.QSettings().value(MODEL_FOLDERS_SETTING)
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _saveModelFolders(folders: List[Path]) -> None:
    merged = list(dict.fromkeys(_savedModelFolders() + [str(f) for f in folders]))
    qt.QSettings().setValue(MODEL_FOLDERS_SETTING, merged)


#
# Logic
#


class MedDLClassifyLogic(ScriptedLoadableModuleLogic):
    """The Python-console API of MedDL Classify (no GUI needed); requests go to the shared MedDL worker."""

    TASK = "classification"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.extraModelFolders: List[Path] = []
        self.session = session.EngineSession(MODULE_DIR)

    def getParameterNode(self) -> MedDLClassifyParameterNode:
        return MedDLClassifyParameterNode(super().getParameterNode())

    # -- models -----------------------------------------------------------------------------------------
    def modelFolders(self) -> List[Path]:
        folders = [MODULE_DIR / "Resources" / "models"]
        if self.session.engine_root is not None:
            folders.append(self.session.engine_root / "Resources" / "models")
        return folders + list(self.extraModelFolders)

    def availableModels(self) -> List[models.ModelEntry]:
        return models.discover_models(self.modelFolders(), task=self.TASK)

    def addModelFolder(self, folder: str) -> List[models.ModelEntry]:
        path = Path(folder).expanduser()
        found = models.discover_models([path], task=self.TASK)
        if not found:
            raise ValueError(f"{path}: no {self.TASK} model (folder with model.json, or a model home) found there")
        if path not in self.extraModelFolders:
            self.extraModelFolders.append(path)
        return found

    def resolveModel(self, model: Optional[str] = None) -> str:
        if model:
            return str(Path(model).expanduser())
        available = self.availableModels()
        if not available:
            raise ValueError(f"no {self.TASK} model found in {', '.join(str(f) for f in self.modelFolders())}")
        return str(available[0].path)

    def classNames(self, model: Optional[str] = None) -> List[str]:
        """The model's classes, in model.json order."""
        return [label.name for label in models.read_model(self.resolveModel(model)).labels]

    # -- engine ---------------------------------------------------------------------------------------------
    def missingDependencies(self) -> List[str]:
        return self.session.missing_dependencies()

    def installDependencies(self, missing: List[str]) -> None:
        """See MedDLSegmentLogic.installDependencies: PyTorch Utils for torch when present, pip otherwise,
        Slicer's numpy pinned."""
        import numpy

        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        installTorch = (
            (lambda: PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False))
            if PyTorchUtils is not None
            else None
        )
        self.session.install_dependencies(missing, slicer.util.pip_install, numpy.__version__, installTorch)

    def wait(self, job, progress: Optional[Callable[[float, str], None]] = None) -> Dict:
        return self.session.wait(job, progress, slicer.app.processEvents)

    # -- classification ---------------------------------------------------------------------------------
    def startClassify(self, volumeNode, model: Optional[str] = None):
        """Write ``volumeNode`` for the worker and submit ``classify`` (with a Grad-CAM heat map)."""
        if volumeNode is None:
            raise ValueError("no input volume selected")
        folder = self.session.new_job_folder("classify")
        inputPath = nodes.write_volume_file(slicer.mrmlScene, volumeNode, folder / "input.nrrd")
        params = {
            "model": self.resolveModel(model),
            "input": str(inputPath),
            "heatmap_output": str(folder / "heatmap.nrrd"),
        }
        return self.session.submit("classify", params)

    def finishClassify(self, job, volumeNode):
        """The finished job's result and its heat map as a coloured volume node on ``volumeNode``'s grid (or None
        when the engine wrote none)."""
        result = job.result or {}
        heatmap = None
        if result.get("heatmap"):
            heatmap = nodes.import_heatmap_file(
                slicer.mrmlScene, result["heatmap"], volumeNode, name=f"{volumeNode.GetName()} Grad-CAM"
            )
            nodes.tag_result(heatmap, job.params["model"], volumeNode)
        return result, heatmap

    def classify(self, volumeNode, model: Optional[str] = None, progress=None) -> Dict:
        """Classify ``volumeNode``; returns the engine's result (``probabilities``, ``predicted``, ...) with
        ``heatmapNode`` added (the Grad-CAM map as a volume node, or None)."""
        self.session.ensure_started(slicer.app.processEvents)
        job = self.startClassify(volumeNode, model)
        self.wait(job, progress)
        result, heatmap = self.finishClassify(job, volumeNode)
        return dict(result, heatmapNode=heatmap)

    def startCorrectLabel(
        self,
        volumeNode,
        className: str,
        model: Optional[str] = None,
        site: str = "default",
        lastResult: Optional[Dict] = None,
    ):
        """Submit (volume, right class) as a correction to the model home's corrections store; ``lastResult``
        (the classification the user corrects) is stored with it, so the update knows what the model said."""
        model = self.resolveModel(model)
        if className not in self.classNames(model):
            raise ValueError(f"'{className}' is not a class of {model} ({', '.join(self.classNames(model))})")
        folder = self.session.work_directory() / "corrections" / time.strftime("%Y%m%d-%H%M%S")
        folder.mkdir(parents=True, exist_ok=True)
        imagePath = nodes.write_volume_file(slicer.mrmlScene, volumeNode, folder / "image.nrrd", compress=True)
        params = {"model": model, "image": str(imagePath), "label": className, "site": site}
        if lastResult and lastResult.get("predicted") is not None:
            params.update(predicted=lastResult["predicted"], probabilities=lastResult.get("probabilities"))
        return self.session.submit("submit_correction", params)

    def correctLabel(self, volumeNode, className: str, model: Optional[str] = None, site: str = "default") -> Dict:
        self.session.ensure_started(slicer.app.processEvents)
        return self.wait(self.startCorrectLabel(volumeNode, className, model, site))


#
# Test
#


class MedDLClassifyTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: classifies a sample with a bundled classifier; the heat map must lie on it."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ClassifySample()

    def test_ClassifySample(self) -> None:
        import SampleData

        logic = MedDLClassifyLogic()
        available = logic.availableModels()
        if not available:
            self.skipTest("the extension ships no classification model")
        if logic.missingDependencies():
            self.skipTest("torch/MONAI are not installed in Slicer's Python")
        volume = SampleData.downloadSample("MRHead")
        self.delayDisplay(f"Classifying with {available[0].title}")
        result = logic.classify(volume, str(available[0].path))
        probabilities = result["probabilities"]
        self.assertEqual(sorted(probabilities), sorted(logic.classNames(str(available[0].path))))
        self.assertAlmostEqual(sum(probabilities.values()), 1.0, places=3)
        self.assertEqual(result["predicted"], max(probabilities, key=probabilities.get))
        heatmap = result["heatmapNode"]
        if heatmap is not None:
            self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.delayDisplay("Classification test passed")
