"""MedDL Segment: segment a volume with a packaged MONAI model, correct it in the Segment Editor, teach the model.

The GUI process never imports torch or MONAI: the engine runs in a long-lived worker process
(``python -m meddl.worker`` under Slicer's ``PythonSlicer``) driven through ``meddl.client``. Everything that
touches MRML but not Qt lives in ``MedDLSegmentLib`` (tested headless with slicer-core); this file is the thin
Qt layer and the console API (:class:`MedDLSegmentLogic`).

Python console::

    logic = slicer.util.getModuleLogic("MedDLSegment")
    seg = logic.segment(slicer.util.getNode("MRHead"))            # default model, blocks, GUI stays live
    summary = logic.segmentFolder("/data/in", "/data/out", model="/models/brain")
"""

import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _addImportPaths() -> None:
    """Put MedDLSegmentLib's folder and the engine (``meddl``) on sys.path (source checkout or installed build)."""
    candidates = [MODULE_DIR, MODULE_DIR.parent, MODULE_DIR.parent.parent]
    for folder in candidates:
        if (folder / "meddl" / "__init__.py").is_file() and str(folder) not in sys.path:
            sys.path.append(str(folder))
            break
    if str(MODULE_DIR) not in sys.path:
        sys.path.append(str(MODULE_DIR))


_addImportPaths()

from MedDLSegmentLib import batch, engine, jobs, models, nodes, session  # noqa: E402

from meddl.errors import ModalityError  # noqa: E402

logger = logging.getLogger("MedDLSegment")


#
# MedDLSegment
#


class MedDLSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedDL contributors"]
        self.parent.helpText = (
            "Segment a volume with a deep-learning model (PyTorch/MONAI) running in a background worker, "
            "correct the result in the Segment Editor and submit the correction so the model can learn from it. "
            "The Python console API is MedDLSegmentLogic: segment(volumeNode) and segmentFolder(input, output)."
        )
        self.parent.acknowledgementText = (
            "Built on MONAI and PyTorch. Bundled models are trained on public templates (see each model card)."
        )


#
# Parameter node
#


@parameterNodeWrapper
class MedDLSegmentParameterNode:
    """What the module works on; saved with the scene.

    inputVolume: the volume to segment.
    outputSegmentation: where the result goes (a new node when None).
    modelPath: the selected model package or model home.
    useTTA: average the prediction over the flips the model learnt (its package's flip_axes).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    useTTA: bool = False


#
# Widget
#


class MedDLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runner = None
        self.teachRunner = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDLSegmentLogic()
        self.runner = jobs.JobRunner(self.logic.session)
        self.teachRunner = jobs.JobRunner(self.logic.session)

        self.ui.modelFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)

        # The worker is polled from the GUI thread: replies are applied a few times a second, nothing blocks.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.submitCorrectionButton.connect("clicked(bool)", self.onSubmitCorrectionButton)
        self.ui.teachButton.connect("clicked(bool)", self.onTeachButton)

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

    def setParameterNode(self, inputParameterNode: Optional[MedDLSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectModelInCombo(self._parameterNode.modelPath)
        self._updateButtons()

    # -- models ---------------------------------------------------------------------------------------------
    def refreshModels(self) -> None:
        current = self._parameterNode.modelPath if self._parameterNode else ""
        combo = self.ui.modelSelector
        combo.blockSignals(True)
        combo.clear()
        for entry in self.logic.availableModels():
            combo.addItem(entry.title, str(entry.path))
        combo.blockSignals(False)
        if combo.count == 0:
            combo.addItem("(no model found: add a model folder)", "")
        self._selectModelInCombo(current)
        self.onModelChanged()

    def _selectModelInCombo(self, path: str) -> None:
        index = self.ui.modelSelector.findData(path) if path else -1
        if index >= 0:
            self.ui.modelSelector.setCurrentIndex(index)

    def onModelChanged(self, index: int = -1) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = self.ui.modelSelector.currentData or ""
        self._updateButtons()

    def onAddModelButton(self) -> None:
        folder = self.ui.modelFolderPathLineEdit.currentPath
        with slicer.util.tryWithErrorDisplay("Cannot add this model folder.", waitCursor=True):
            added = self.logic.addModelFolder(folder)
            self.refreshModels()
            if added:
                self._selectModelInCombo(str(added[0].path))
            self.ui.modelFolderPathLineEdit.addCurrentPathToHistory()
            _saveModelFolders(self.logic.extraModelFolders)

    # -- state ----------------------------------------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.runner.busy
        node = self._parameterNode
        ready = bool(node and node.inputVolume and node.modelPath) and not engine.python_too_old(sys.version_info[:2])
        self.ui.segmentButton.enabled = ready and not busy
        self.ui.segmentButton.toolTip = (
            "Segment the input volume with the selected model." if ready else "Select an input volume and a model."
        )
        self.ui.cancelButton.enabled = busy
        hasOutput = bool(node and node.outputSegmentation)
        self.ui.editButton.enabled = hasOutput and not busy
        self.ui.submitCorrectionButton.enabled = hasOutput and not busy
        # Updates run on the worker's own queue beside inference, so teaching does not block segmenting.
        self.ui.teachButton.enabled = bool(node and node.modelPath) and not self.teachRunner.busy

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
        if self.logic.dependenciesReady:
            return True
        self._setStatus(0, "Checking torch and MONAI in Slicer's Python...")
        slicer.app.processEvents()
        with slicer.util.tryWithErrorDisplay("Cannot check the engine's dependencies.", waitCursor=True):
            missing = self.logic.missingDependencies()
        if not missing:
            return True
        question = (
            "MedDL needs these Python packages in Slicer's Python:\n\n  "
            + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads about 1-3 GB and can take several minutes. "
            "Slicer's own numpy is kept."
        )
        if not slicer.util.confirmOkCancelDisplay(question, "MedDL: install dependencies"):
            self._setStatus(0, "The engine's dependencies are not installed.")
            return False
        self._setStatus(0, "Installing dependencies (see the Python console for details)...")
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():
                self.logic.installDependencies(missing)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle="MedDL: installation failed")
            self._setStatus(0, "Installation failed.")
            return False
        return True

    # -- running jobs ---------------------------------------------------------------------------------------
    def _start(self, runner, submit: Callable, onDone: Callable) -> None:
        """Hand a job to ``runner``; the worker starts in the background if needed and the timer follows it."""
        if not self._ensureDependencies():
            return
        try:
            runner.begin(submit, onDone)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle="MedDL")
            return
        if runner is self.runner:
            self._setStatus(0, runner.message)
        self._pollTimer.start()
        self._updateButtons()

    def onPollWorker(self) -> None:
        for runner in (self.runner, self.teachRunner):
            if not runner.busy:
                continue
            try:
                state = runner.tick()
            except Exception as error:  # the timer must keep the GUI alive whatever happens
                logger.exception("following the MedDL job failed")
                state, runner.error = None, error
            if runner is self.runner:
                self._setStatus(runner.progress, runner.message)
            else:
                self.ui.teachButton.text = f"Teaching... {runner.progress:.0%}" if runner.busy else "Teach the model"
            if state == "failed" and not self._offerToSegmentAnyway(runner):
                slicer.util.errorDisplay(str(runner.error), windowTitle="MedDL")
            if state is not None:
                self._updateButtons()
        client = self.logic.session.client()
        if client.alive and client.hello:
            self.ui.deviceLabel.text = engine.describe_worker(client.hello)
        if not (self.runner.busy or self.teachRunner.busy):
            self._pollTimer.stop()

    def onSegmentButton(self) -> None:
        self._segment(forceModality=False)

    def _segment(self, forceModality: bool) -> None:
        node = self._parameterNode
        volume, model, tta = node.inputVolume, node.modelPath, node.useTTA
        self._start(
            self.runner,
            lambda: self.logic.startSegment(volume, model, tta=tta, forceModality=forceModality),
            lambda job: self._onSegmentDone(job, volume, model),
        )

    def _offerToSegmentAnyway(self, runner) -> bool:
        """When the engine refused the volume as not the model's kind of image (a CT given to an MR model, or a
        volume where what the model drew is unlike its anatomy), ask whether to run it anyway, as the command line's
        --force-modality does; True if it runs again."""
        if runner is not self.runner or not isinstance(runner.error, ModalityError):
            return False
        if not slicer.util.confirmYesNoDisplay(
            f"{runner.error.problem}.\n\nSegment this volume with the model anyway?",
            windowTitle="MedDL: not the model's kind of image",
        ):
            return False
        self._segment(forceModality=True)
        return True

    def _onSegmentDone(self, job, volume, model: str) -> str:
        node = self._parameterNode
        segmentation = self.logic.finishSegment(job, volume, model, node.outputSegmentation if node else None)
        if node:
            node.outputSegmentation = segmentation
        slicer.util.setSliceViewerLayers(background=volume)
        seconds = job.result.get("timings_s", {}).get("total")
        volumes = job.result.get("label_volumes_ml", {})
        summary = ", ".join(f"{name} {ml:.1f} ml" for name, ml in volumes.items())
        notes = "".join(f"; {note}" for note in job.result.get("notes", []))  # e.g. noisy air blanked
        return f"Done{f' in {seconds:.1f} s' if seconds else ''}: {summary}{notes}"

    def onCancelButton(self) -> None:
        self.runner.cancel()
        self._setStatus(None, self.runner.message)

    def onEditButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot open the Segment Editor.", waitCursor=True):
            segmentation = node.outputSegmentation
            volume = nodes.result_provenance(slicer.mrmlScene, segmentation)["volume"] or node.inputVolume
            self.logic.openSegmentEditor(segmentation, volume)

    def onSubmitCorrectionButton(self) -> None:
        node = self._parameterNode
        segmentation, volume, model = node.outputSegmentation, node.inputVolume, node.modelPath
        self._start(
            self.runner,
            lambda: self.logic.startSubmitCorrection(segmentation, volume, model),
            self._onCorrectionDone,
        )

    def _onCorrectionDone(self, job) -> str:
        result = job.result or {}
        changed = result.get("changed_voxels")
        return f"Correction {result.get('id', '')} saved" + (
            f" ({changed} voxels differ from the prediction)." if changed is not None else "."
        )

    def onTeachButton(self) -> None:
        model = self._parameterNode.modelPath
        if not slicer.util.confirmOkCancelDisplay(
            "Fine-tune the model on the submitted corrections? The new version replaces the current one only if "
            "it passes its validation gate; this runs in the background and can take minutes.",
            "MedDL: teach the model",
        ):
            return
        self._start(self.teachRunner, lambda: self.logic.startTeach(model), self._onTeachDone)

    def _onTeachDone(self, job) -> str:
        result = job.result or {}
        champion = result.get("champion")
        message = f"Model update {result.get('status', 'finished')}" + (
            f"; current version {champion}." if champion else "."
        )
        self._setStatus(None, message)
        self.refreshModels()
        return message


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


class MedDLSegmentLogic(ScriptedLoadableModuleLogic):
    """The Python-console API of MedDL Segment (no GUI needed).

    Every request goes to one shared background worker (``meddl.worker``), started on first use. Blocking
    methods (``segment``, ``segmentFolder``, ``submitCorrection``, ``teach``) keep Slicer responsive by
    processing GUI events while they wait; the widget uses the ``start*`` / ``finish*`` pairs instead.
    """

    TASK = "segmentation"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.extraModelFolders: List[Path] = []
        self.session = session.EngineSession(MODULE_DIR)

    def getParameterNode(self) -> MedDLSegmentParameterNode:
        return MedDLSegmentParameterNode(super().getParameterNode())

    # -- models -----------------------------------------------------------------------------------------
    def modelFolders(self) -> List[Path]:
        """Where models are looked for: the extension's bundled models, then folders the user added."""
        bundled = [MODULE_DIR / "Resources" / "models"]
        root = engine.find_engine_root(MODULE_DIR)
        if root is not None:
            bundled.append(root / "Resources" / "models")
        return bundled + list(self.extraModelFolders)

    def availableModels(self) -> List[models.ModelEntry]:
        return models.discover_models(self.modelFolders(), task=self.TASK)

    def addModelFolder(self, folder: str) -> List[models.ModelEntry]:
        """Add a model package, model home, or folder of them; returns the models it holds (ValueError if none)."""
        path = Path(folder).expanduser()
        found = models.discover_models([path], task=self.TASK)
        if not found:
            raise ValueError(f"{path}: no {self.TASK} model (folder with model.json, or a model home) found there")
        if path not in self.extraModelFolders:
            self.extraModelFolders.append(path)
        return found

    def resolveModel(self, model: Optional[str] = None) -> str:
        """``model`` as a path; the first available model when None."""
        if model:
            return str(Path(model).expanduser())
        available = self.availableModels()
        if not available:
            raise ValueError(f"no {self.TASK} model found in {', '.join(str(f) for f in self.modelFolders())}")
        return str(available[0].path)

    # -- engine and worker ------------------------------------------------------------------------------
    @property
    def dependenciesReady(self) -> bool:
        return self.session.dependencies_ready

    def missingDependencies(self) -> List[str]:
        """pip requirements missing from the worker's Python (checked in a subprocess)."""
        return self.session.missing_dependencies()

    def installDependencies(self, missing: List[str]) -> None:
        """Install ``missing`` into Slicer's Python without changing Slicer's numpy.

        torch comes from the PyTorch Utils extension when it is installed (it picks the CUDA build that fits the
        driver); everything else from ``slicer.util.pip_install`` with numpy pinned by a constraint file.

        Raises:
            RuntimeError: offline, or installing failed (the message says how to install by hand).
        """
        import numpy

        self.session.install_dependencies(
            missing, slicer.util.pip_install, numpy.__version__, install_torch=_pyTorchUtilsInstaller()
        )

    @property
    def workerRunning(self) -> bool:
        return self.session.worker_running

    def startWorker(self) -> Dict:
        """Start the shared worker (waits until it is ready, a few seconds on first use, while Slicer keeps
        repainting); returns its hello: device, GPU, versions."""
        return self.session.ensure_started(slicer.app.processEvents)

    def cancel(self, job) -> None:
        self.session.cancel(job)

    def wait(self, job, progress: Optional[Callable[[float, str], None]] = None) -> Dict:
        """Wait for ``job`` while Slicer keeps repainting; returns its result or raises its error."""
        return self.session.wait(job, progress, slicer.app.processEvents)

    # -- segmentation -----------------------------------------------------------------------------------
    def startSegment(
        self, volumeNode, model: Optional[str] = None, tta: Optional[bool] = None, forceModality: bool = False
    ):
        """Write ``volumeNode`` for the worker and submit ``segment``; returns the job (see :meth:`finishSegment`).

        The job fails with :class:`meddl.errors.ModalityError` when the volume looks like another modality than
        the model's (CT air in Hounsfield units for an MR model); ``forceModality`` runs it anyway.
        """
        if volumeNode is None:
            raise ValueError("no input volume selected")
        model = self.resolveModel(model)
        folder = self.session.new_job_folder("segment")
        inputPath = nodes.write_volume_file(slicer.mrmlScene, volumeNode, folder / "input.nrrd")
        params = {"model": model, "input": str(inputPath), "output": str(folder / "prediction.nrrd"), "tta": tta}
        if forceModality:
            params["force_modality"] = True
        return self.session.submit("segment", params)

    def finishSegment(self, job, volumeNode, model: Optional[str] = None, segmentationNode=None):
        """Import a finished ``segment`` job's labelmap as a segmentation on ``volumeNode``'s exact geometry."""
        result = job.result or {}
        model = self.resolveModel(model)
        labels = _labelsFrom(result) or models.read_model(model).labels
        name = f"{volumeNode.GetName()} {result.get('model', 'MedDL')} segmentation"
        segmentation = nodes.import_labelmap_file(
            slicer.mrmlScene,
            slicer.modules.segmentations.logic(),
            result["output"],
            volumeNode,
            labels,
            segmentationNode,
            name=None if segmentationNode is not None else name,
        )
        nodes.tag_result(segmentation, model, volumeNode, result["output"])
        segmentation.CreateClosedSurfaceRepresentation()
        return segmentation

    def segment(
        self,
        volumeNode,
        model: Optional[str] = None,
        progress=None,
        segmentationNode=None,
        tta=None,
        forceModality: bool = False,
    ):
        """Segment ``volumeNode`` and return the segmentation node (segments named and coloured by the model).

        Args:
            volumeNode: a scalar volume node.
            model: a model package or model home folder; the first bundled model when None.
            progress: optional ``progress(fraction, message)`` callback.
            segmentationNode: reuse this node (its segments are replaced); a new node when None.
            tta: test-time flips (None: the model's default).
            forceModality: run even when the volume looks like another modality than the model's.

        Raises:
            meddl.errors.ModalityError: the volume looks like another modality (unless ``forceModality``).
        """
        self.session.ensure_started(slicer.app.processEvents)
        job = self.startSegment(volumeNode, model, tta, forceModality)
        self.wait(job, progress)
        return self.finishSegment(job, volumeNode, model, segmentationNode)

    def segmentFolder(self, inputFolder: str, outputFolder: str, model: Optional[str] = None, progress=None) -> Dict:
        """Segment every volume (NRRD, NIfTI, MetaImage, DICOM series folder) of ``inputFolder`` into
        ``outputFolder/<name>_seg.nrrd``; returns ``{"done": [...], "failed": [...], ...}``. Nothing is loaded into
        the scene: the worker reads and writes the files."""
        model = self.resolveModel(model)
        self.session.ensure_started(slicer.app.processEvents)

        def segmentOne(inputPath: Path, outputPath: Path) -> Dict:
            job = self.session.submit("segment", {"model": model, "input": str(inputPath), "output": str(outputPath)})
            return self.wait(job)

        summary = batch.segment_folder(segmentOne, inputFolder, outputFolder, progress=progress)
        summary["model"] = model
        return summary

    # -- correction and teaching ------------------------------------------------------------------------
    def startSubmitCorrection(
        self, segmentationNode, volumeNode=None, model: Optional[str] = None, site: str = "default"
    ):
        """Export the edited segmentation and its volume to files and submit them as a correction."""
        if segmentationNode is None:
            raise ValueError("no segmentation selected")
        provenance = nodes.result_provenance(slicer.mrmlScene, segmentationNode)
        volumeNode = provenance["volume"] or volumeNode
        model = provenance["model"] or self.resolveModel(model)
        if volumeNode is None:
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no source volume")
        folder = self.session.work_directory() / "corrections" / time.strftime("%Y%m%d-%H%M%S")
        folder.mkdir(parents=True, exist_ok=True)
        labels = models.read_model(model).labels
        imagePath = nodes.write_volume_file(slicer.mrmlScene, volumeNode, folder / "image.nrrd", compress=True)
        labelmapPath = folder / "labelmap.nrrd"
        nodes.export_correction_file(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), segmentationNode, volumeNode, labels, labelmapPath
        )
        params = {"model": model, "image": str(imagePath), "labelmap": str(labelmapPath), "site": site}
        if provenance["prediction"]:
            params["prediction"] = provenance["prediction"]
        return self.session.submit("submit_correction", params)

    def submitCorrection(
        self, segmentationNode, volumeNode=None, model: Optional[str] = None, site: str = "default"
    ) -> Dict:
        """Blocking :meth:`startSubmitCorrection`; returns the engine's receipt."""
        self.session.ensure_started(slicer.app.processEvents)
        return self.wait(self.startSubmitCorrection(segmentationNode, volumeNode, model, site))

    def startTeach(self, model: Optional[str] = None, maxSeconds: Optional[float] = None):
        """Submit a continual-learning ``update`` of a model home (runs beside inference in the worker)."""
        params = {"model": self.resolveModel(model)}
        if maxSeconds:
            params["max_seconds"] = float(maxSeconds)
        return self.session.submit("update", params)

    def teach(self, model: Optional[str] = None, progress=None, maxSeconds: Optional[float] = None) -> Dict:
        """Blocking :meth:`startTeach`; returns the update's decision."""
        self.session.ensure_started(slicer.app.processEvents)
        return self.wait(self.startTeach(model, maxSeconds), progress)

    # -- GUI helpers usable from the console ------------------------------------------------------------
    def openSegmentEditor(self, segmentationNode, volumeNode) -> None:
        """Switch to the Segment Editor with ``segmentationNode`` and its source volume selected."""
        if segmentationNode is None:
            raise ValueError("no segmentation to edit")
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None:
            editor.setSourceVolumeNode(volumeNode)


def _labelsFrom(result: Dict) -> List[models.ModelLabel]:
    """Labels the worker reports with a result (the version it actually ran), if any."""
    labels = result.get("labels") or []
    return [
        models.ModelLabel(int(lb["value"]), str(lb["name"]), list(lb.get("color", [0.5, 0.5, 0.5]))) for lb in labels
    ]


def _pyTorchUtilsInstaller() -> Optional[Callable[[], object]]:
    """PyTorch Utils' torch installer when the PyTorch extension is installed, else None (pip is used)."""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return lambda: PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)


#
# Test
#


class MedDLSegmentTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: segments a sample with a bundled model and checks segments and geometry.

    Needs the engine's dependencies in Slicer's Python; run with "Reload and Test" or ctest.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentSampleOnItsGrid()

    def _sampleVolume(self):
        samples = sorted((MODULE_DIR / "Resources" / "samples").glob("*.nrrd"))
        root = engine.find_engine_root(MODULE_DIR)
        if root is not None:
            samples += sorted((root / "Resources" / "samples").glob("*.nrrd"))
        if samples:
            return nodes.read_volume_file(slicer.mrmlScene, samples[0])
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_SegmentSampleOnItsGrid(self) -> None:
        import numpy as np

        self.delayDisplay("Loading a sample volume")
        volume = self._sampleVolume()
        logic = MedDLSegmentLogic()
        available = logic.availableModels()
        self.assertTrue(available, "the extension ships no segmentation model")
        entry = available[0]
        if logic.missingDependencies():
            self.skipTest("torch/MONAI are not installed in Slicer's Python")

        self.delayDisplay(f"Segmenting with {entry.title}")
        seen = []
        segmentation = logic.segment(volume, str(entry.path), progress=lambda f, m: seen.append(f))
        self.assertTrue(seen and max(seen) > 0.5, "no progress was reported")

        names = [
            segmentation.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
        ]
        self.assertEqual(names, [lb.name for lb in entry.labels if lb.value != 0])
        segLogic = slicer.modules.segmentations.logic()
        array, counts = nodes.segmentation_to_label_array(
            slicer.mrmlScene, segLogic, segmentation, volume, entry.labels
        )
        self.assertEqual(array.shape, slicer.util.arrayFromVolume(volume).shape)
        prediction = nodes.read_volume_file(
            slicer.mrmlScene, nodes.result_provenance(slicer.mrmlScene, segmentation)["prediction"], labelmap=True
        )
        np.testing.assert_array_equal(array, slicer.util.arrayFromVolume(prediction))
        self.delayDisplay(f"Segments {counts} lie on the volume's grid")
