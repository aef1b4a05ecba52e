"""OnePromptSeg: segment a structure through a whole volume from one prompted slice.

The module, its panel (widget and parameter node), dependency installation and progress with Cancel.  The data path
is elsewhere: Slicer nodes -> ``OnePromptSegMRML`` (arrays, geometry, prompts; no Qt) -> ``OnePromptSegLib`` (the
engine) -> arrays -> ``OnePromptSegMRML`` -> the selected segment.
"""
import logging
import os
import sys
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)


def _addLibraryToPath():
    """Make ``OnePromptSegLib`` importable: installed next to this file, or at ../ in the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(base, "OnePromptSegLib", "__init__.py")):
            if base not in sys.path:
                sys.path.insert(0, base)
            return base
    return None


LIBRARY_BASE = _addLibraryToPath()

from OnePromptSegMRML import segments, volumes  # noqa: E402 (needs the library on the path)
from OnePromptSegMRML.logic import PropagationLogic  # noqa: E402
from OnePromptSegMRML.promptnodes import (PROMPT_BOX, PROMPT_MASK, PROMPT_POINTS,  # noqa: E402
                                          PROMPT_SCRIBBLES, PROMPT_TYPES)

#: Python packages the library needs besides torch (installed with pip after the user agrees).
PIP_REQUIREMENTS = {"scipy": "scipy", "skimage": "scikit-image", "SimpleITK": "SimpleITK"}
DIRECTIONS = {"Both directions": "both", "Up only (increasing slice index)": "forward",
              "Down only (decreasing slice index)": "backward"}
VIEWS = ["Red", "Yellow", "Green"]
DEVICES = ["auto", "cpu", "cuda", "mps"]


class DependencyError(RuntimeError):
    """A Python dependency is missing and was not installed; the message says how to get it."""


#
# OnePromptSeg
#

class OnePromptSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OnePromptSeg")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["OnePromptSeg contributors"]
        self.parent.helpText = _("""
Segment a structure through a whole volume from <b>one prompted slice</b>: draw the structure on one slice (or give
points, a box or scribbles), then propagate slice by slice up and down. Correct any slice and click
<b>Re-propagate</b>: only the affected slices are recomputed. Slices you drew are never overwritten.
The <b>OnePrompt</b> effect offers the same in the Segment Editor, honouring its masking settings.
Not for clinical use. See the
<a href="https://github.com/onepromptseg/SlicerOnePromptSeg/blob/main/docs/README_radiologists.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
Model after One-Prompt to Segment All Medical Images (Wu et al., CVPR 2024) with slice propagation in the spirit of
Prompt U-Net and SAM2's video predictor. Developed by the OnePromptSeg contributors (MIT licence).
""")
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect():
    """Register the OnePrompt Segment Editor effect (as Slicer's ScriptedSegmentEditorEffect template does)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects
    instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
    effectFilename = os.path.join(os.path.dirname(__file__), "SegmentEditorOnePromptLib", "SegmentEditorEffect.py")
    instance.setPythonSource(effectFilename.replace("\\", "/"))
    instance.self().register()


#
# Parameter node
#

@parameterNodeWrapper
class OnePromptSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    sliceView: Annotated[str, Choice(VIEWS)] = "Red"
    promptType: Annotated[str, Choice(PROMPT_TYPES)] = PROMPT_MASK
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxRoi: vtkMRMLMarkupsROINode
    scribbleSegmentationNode: vtkMRMLSegmentationNode
    scribbleForegroundId: str = ""
    scribbleBackgroundId: str = ""
    useBackgroundScribbles: bool = False
    templateVolume: vtkMRMLScalarVolumeNode
    templateSegmentationNode: vtkMRMLSegmentationNode
    templateSegmentId: str = ""
    direction: Annotated[str, Choice(list(DIRECTIONS))] = "Both directions"
    useSliceRange: bool = False
    sliceFirst: Annotated[int, WithinRange(0, 9999)] = 0
    sliceLast: Annotated[int, WithinRange(0, 9999)] = 0
    useCalibratedThreshold: bool = True
    ssimThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    reprompt: bool = True
    followAnatomy: bool = True
    device: Annotated[str, Choice(DEVICES)] = "auto"
    modelName: str = ""


_sharedLogic = None


def sharedLogic():
    """The logic instance shared by the module panel and the Segment Editor effect."""
    global _sharedLogic
    if _sharedLogic is None:
        _sharedLogic = OnePromptSegLogic()
    return _sharedLogic


def createProgressCallback(title):
    """A modal progress dialog with Cancel and the callback the logic calls per slice (False = cancel)."""
    dialog = slicer.util.createProgressDialog(windowTitle=_("OnePromptSeg"), labelText=title, maximum=0, value=0,
                                              windowModality=qt.Qt.WindowModal)  # no second run while one runs
    dialog.setCancelButtonText(_("Cancel (keep what is done)"))
    dialog.show()
    slicer.app.processEvents()

    def callback(result=None, message=None):
        if message is not None:
            dialog.labelText = message
        if result is not None:
            dialog.maximum = max(int(result.total), 1)
            dialog.value = min(int(result.done), dialog.maximum - 1)  # reaching maximum would reset the dialog
            dialog.labelText = _("Slice {index} ({done} of {total}){flag}").format(
                index=result.slice_index, done=result.done, total=result.total,
                flag=_(", re-prompted") if result.reprompted else "")
        slicer.app.processEvents()  # keep Slicer responsive: one slice at a time
        return not dialog.wasCanceled

    return dialog, callback


#
# OnePromptSegWidget
#

class OnePromptSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingSelectors = False
        self._observedPointLists = []
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OnePromptSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()  # shared with the OnePrompt effect: correct in one, re-propagate in the other

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Segment selectors are not handled by the parameter node wrapper: synchronised here.
        self._segmentSelectors = [
            (self.ui.segmentSelector, "segmentationNode", "segmentId"),
            (self.ui.scribbleForegroundSelector, "scribbleSegmentationNode", "scribbleForegroundId"),
            (self.ui.scribbleBackgroundSelector, "scribbleSegmentationNode", "scribbleBackgroundId"),
            (self.ui.templateSegmentSelector, "templateSegmentationNode", "templateSegmentId"),
        ]
        for selector, _nodeName, _idName in self._segmentSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromSelectors)
            selector.connect("currentSegmentChanged(QString)", self.updateParameterNodeFromSelectors)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.repropagateButton.connect("clicked(bool)", self.onRepropagate)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        for placeWidget in (self.ui.positivePointsPlaceWidget, self.ui.negativePointsPlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        # The model list needs torch: it is read when the Model section is opened, not at start-up.
        self.ui.modelCollapsibleButton.connect("contentsCollapsed(bool)", self.onModelSectionToggled)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.logic.reset()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The .ui file names the parameter of each widget in its "SlicerParameterName" dynamic property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        pn = self._parameterNode
        if pn is None:
            return
        self._updatingSelectors = True
        try:
            for selector, nodeName, idName in self._segmentSelectors:
                node = getattr(pn, nodeName)
                if selector.currentNode() != node:
                    selector.setCurrentNode(node)
                if getattr(pn, idName) and selector.currentSegmentID() != getattr(pn, idName):
                    selector.setCurrentSegmentID(getattr(pn, idName))
        finally:
            self._updatingSelectors = False
        self.ui.positivePointsPlaceWidget.setCurrentNode(pn.positivePoints)
        self.ui.negativePointsPlaceWidget.setCurrentNode(pn.negativePoints)
        self.ui.roiPlaceWidget.setCurrentNode(pn.boxRoi)
        self.ui.maskPromptFrame.visible = pn.promptType == PROMPT_MASK
        self.ui.pointsPromptFrame.visible = pn.promptType == PROMPT_POINTS
        self.ui.boxPromptFrame.visible = pn.promptType == PROMPT_BOX
        self.ui.scribblePromptFrame.visible = pn.promptType == PROMPT_SCRIBBLES
        self.ui.scribbleBackgroundSelector.enabled = pn.useBackgroundScribbles
        self.ui.sliceFirstSpinBox.enabled = self.ui.sliceLastSpinBox.enabled = pn.useSliceRange
        self.ui.ssimThresholdSliderWidget.enabled = not pn.useCalibratedThreshold
        ready = bool(pn.inputVolume and pn.segmentationNode and pn.segmentId)
        self.ui.propagateButton.enabled = ready
        self.ui.propagateButton.toolTip = (_("Segment the prompted slice(s) and propagate through the volume") if ready
                                           else _("Select the volume, the segmentation and the segment to write into"))
        self.ui.repropagateButton.enabled = ready and self.logic.hasRun(pn.segmentationNode, pn.segmentId)
        self.ui.undoButton.enabled = bool(pn.segmentationNode) and self.logic.canUndo(pn.segmentationNode)
        self._observePointLists([pn.positivePoints, pn.negativePoints])

    def _observePointLists(self, pointLists):
        """Watch the point lists: a point placed after a run corrects that run (as in nnInteractive)."""
        pointLists = [node for node in pointLists if node is not None]
        if pointLists == self._observedPointLists:
            return
        for node in self._observedPointLists:
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        for node in pointLists:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self._observedPointLists = pointLists

    def onPointPlaced(self, caller=None, event=None):
        """A point placed once the segment has a run: it corrects its slice and the range around it is redone."""
        pn = self._parameterNode
        if pn is not None and not self._running and self.logic.hasRun(pn.segmentationNode, pn.segmentId):
            self._run(repropagate=False, points=True)

    def updateParameterNodeFromSelectors(self, *args):
        if self._parameterNode is None or self._updatingSelectors:
            return
        pn = self._parameterNode
        self._updatingSelectors = True
        try:
            # The background scribble selector follows the foreground selector's segmentation.
            self.ui.scribbleBackgroundSelector.setCurrentNode(self.ui.scribbleForegroundSelector.currentNode())
        finally:
            self._updatingSelectors = False
        with slicer.util.NodeModify(pn.parameterNode):
            for selector, nodeName, idName in self._segmentSelectors:
                if selector is not self.ui.scribbleBackgroundSelector:
                    setattr(pn, nodeName, selector.currentNode())
                setattr(pn, idName, selector.currentSegmentID() or "")

    def populateModels(self):
        """Model choices from the weights manifest (needs torch; the bundled default is always offered)."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default (bundled, works offline)"), "")
        for entry in self.logic.availableModels():
            if entry.get("default"):
                continue
            where = _("download") if entry.get("url") and not os.path.exists(entry.get("path", "")) else _("local")
            combo.addItem(f"{entry['name']} ({where})", entry["name"])
        selected = self._parameterNode.modelName if self._parameterNode else ""
        combo.currentIndex = max(combo.findData(selected), 0)
        combo.blockSignals(wasBlocked)

    def onModelSectionToggled(self, collapsed):
        if not collapsed and self.ui.modelComboBox.count <= 1:
            self.populateModels()

    def onModelChanged(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index) or ""

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            if self.logic.ensureDependencies(askConfirmation=True):
                self.populateModels()
                self.ui.statusLabel.text = _("Dependencies are installed; torch runs on: {device}").format(
                    device=self.logic.torchDeviceSummary())

    def onPropagate(self):
        self._run(repropagate=False)

    def onRepropagate(self):
        self._run(repropagate=True)

    def _run(self, repropagate, points=False):
        pn = self._parameterNode
        self._running = True
        with slicer.util.tryWithErrorDisplay(_("OnePromptSeg failed."), waitCursor=False):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self._running = False
                return
            dialog, callback = createProgressCallback(_("Loading the model..."))
            try:
                if points:
                    summary = self.logic.correctWithPoints(pn.inputVolume, pn.segmentationNode, pn.segmentId,
                                                           pn.positivePoints, pn.negativePoints,
                                                           progressCallback=callback)
                elif repropagate:
                    summary = self.logic.repropagate(pn.inputVolume, pn.segmentationNode, pn.segmentId,
                                                     progressCallback=callback)
                else:
                    summary = self.logic.segment(progressCallback=callback, **self.logic.requestFromParameterNode(pn))
            finally:
                dialog.close()
                self._running = False
            self.ui.statusLabel.text = self.logic.describe(summary)
        self.updateGUIFromParameterNode()

    def onUndo(self):
        pn = self._parameterNode
        if not self.logic.undo(pn.segmentationNode):
            slicer.util.warningDisplay(_("Nothing to undo."))
        self.updateGUIFromParameterNode()


#
# OnePromptSegLogic
#

class OnePromptSegLogic(ScriptedLoadableModuleLogic, PropagationLogic):
    """Everything the module does, usable without the GUI (scripts, tests, the Segment Editor effect).

    The MRML work is ``OnePromptSegMRML.logic.PropagationLogic``; this class adds Slicer's parameter node, the
    installation of missing dependencies, checkpoint download and the Segment Editor's undo.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        PropagationLogic.__init__(self)

    def getParameterNode(self):
        return OnePromptSegParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------------------------------- dependencies
    def ensureDependencies(self, askConfirmation=True):
        """torch through the PyTorch extension, other packages with pip; only after the user agrees."""
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise DependencyError(_("OnePromptSeg needs PyTorch: install the 'PyTorch' extension from the "
                                        "Extensions Manager, restart Slicer and try again."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=askConfirmation) is None:
                    raise DependencyError(_("PyTorch was not installed, so OnePromptSeg cannot run. Install it in "
                                            "the 'PyTorch Utils' module or accept the installation."))
        missing = [pip for module, pip in PIP_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        if missing:
            try:
                import slicer.packaging as packaging
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(missing, prompt_install=askConfirmation, requester="OnePromptSeg")
            else:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        _("OnePromptSeg needs these Python packages: {packages}. Install them now? "
                          "(needs a network connection)").format(packages=", ".join(missing))):
                    raise DependencyError(_("Missing Python packages: {packages}").format(packages=", ".join(missing)))
                slicer.util.pip_install(missing)
        return True

    def torchDeviceSummary(self):
        import torch
        if torch.cuda.is_available():
            return f"CUDA ({torch.cuda.get_device_name(0)})"
        return _("CPU only (no CUDA GPU found: propagation is slower but works)")

    # ---------------------------------------------------------------------------------------- models
    def availableModels(self):
        """Manifest entries (empty until torch is installed)."""
        import importlib.util
        if importlib.util.find_spec("torch") is None or LIBRARY_BASE is None:
            return []
        return PropagationLogic.availableModels(self)

    def modelFile(self, modelName=""):
        """A manifest entry that is not bundled is downloaded into Slicer's cache first (sha256-checked there and
        again when loaded); the adapter's ``loadModel`` caches the model."""
        from OnePromptSegLib.checkpoints import CheckpointError
        for entry in self.availableModels():
            if entry["name"] == modelName and entry.get("url") and not os.path.exists(entry["path"]):
                import SampleData
                fileName = os.path.basename(entry["file"])
                path = SampleData.SampleDataLogic().downloadFileIntoCache(
                    entry["url"], fileName, checksum=f"SHA256:{entry['sha256']}")
                if not path or not os.path.exists(path):
                    raise CheckpointError(_("Downloading {name} from {url} failed or the file did not match its "
                                            "checksum: check the network connection and try again, or use the "
                                            "default model.").format(name=modelName, url=entry["url"]))
                return path, entry["sha256"]
        return PropagationLogic.modelFile(self, modelName)

    # ---------------------------------------------------------------------------------------- running
    def requestFromParameterNode(self, pn):
        """Keyword arguments of :meth:`segment` from the module's parameter node."""
        return dict(volumeNode=pn.inputVolume, segmentationNode=pn.segmentationNode, segmentId=pn.segmentId,
                    promptType=pn.promptType, sliceView=pn.sliceView, positivePoints=pn.positivePoints,
                    negativePoints=pn.negativePoints, roiNode=pn.boxRoi,
                    scribbleSegmentationNode=pn.scribbleSegmentationNode,
                    scribbleForegroundId=pn.scribbleForegroundId,
                    scribbleBackgroundId=pn.scribbleBackgroundId if pn.useBackgroundScribbles else "",
                    templateVolumeNode=pn.templateVolume, templateSegmentationNode=pn.templateSegmentationNode,
                    templateSegmentId=pn.templateSegmentId, direction=DIRECTIONS[pn.direction],
                    sliceRange=(min(pn.sliceFirst, pn.sliceLast), max(pn.sliceFirst, pn.sliceLast))
                    if pn.useSliceRange else None,
                    ssimThreshold=None if pn.useCalibratedThreshold else pn.ssimThreshold, reprompt=pn.reprompt,
                    followAnatomy=pn.followAnatomy, modelName=pn.modelName, device=pn.device)

    def saveStateForUndo(self, segmentationNode):
        """This module's undo state and, when the Segment Editor edits this segmentation, the editor's too (so that
        its Undo button also undoes a run)."""
        PropagationLogic.saveStateForUndo(self, segmentationNode)
        editorWidget = getattr(getattr(slicer.modules, "SegmentEditorWidget", None), "editor", None)
        if editorWidget is not None and editorWidget.segmentationNode() == segmentationNode:
            editorWidget.saveStateForUndo()


#
# OnePromptSegTest
#

class OnePromptSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: Slicer --no-main-window --testing --python-code "import slicer.testing;
    slicer.testing.runUnitTest(['<repo>/OnePromptSeg'], 'OnePromptSeg')"."""

    # Lower bounds of Dice against the known truth of the synthetic volume (bundled checkpoint, CPU).
    MIN_DICE = {"mask": 0.75, "points": 0.6, "box": 0.6, "scribbles": 0.55, "oneprompt": 0.5}

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.logic = OnePromptSegLogic()
        self.logic.ensureDependencies(askConfirmation=False)

    def runTest(self):
        for test in (self.test_SyntheticMaskPrompt, self.test_SyntheticPointBoxScribblePrompts,
                     self.test_CorrectionAndUndo, self.test_CancelKeepsWork, self.test_OnePromptMode,
                     self.test_MRHead, self.test_SegmentEditorEffect):
            self.setUp()
            test()

    # helpers
    def _syntheticScene(self, seed=7):
        from OnePromptSegLib.sample import make_demo_volume
        image, truth, spacing = make_demo_volume(shape=(40, 112, 112), seed=seed)
        volumeNode = slicer.util.addVolumeFromArray(image, name=f"Synthetic{seed}")
        volumeNode.SetSpacing(spacing)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.AddEmptySegment("lesion", "lesion")
        otherId = segmentation.AddEmptySegment("other", "other")
        other = np.zeros(truth.shape, np.uint8)
        other[:, :12, :12] = 1
        segments.writeSegment(other, volumeNode, segmentationNode, otherId)
        return volumeNode, segmentationNode, segmentId, otherId, truth

    @staticmethod
    def _dice(a, b):
        a, b = np.asarray(a) > 0, np.asarray(b) > 0
        return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    def _drawSlice(self, truth, k, volumeNode, segmentationNode, segmentId):
        drawn = np.zeros_like(truth)
        drawn[k] = truth[k]
        segments.writeSegment(drawn, volumeNode, segmentationNode, segmentId)
        return drawn

    def _result(self, volumeNode, segmentationNode, segmentId):
        return segments.readSegment(segmentationNode, segmentId, volumeNode)

    # tests
    def test_SyntheticMaskPrompt(self):
        self.delayDisplay("Mask prompt on a synthetic volume with known truth")
        volumeNode, segNode, segId, otherId, truth = self._syntheticScene()
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        self._drawSlice(truth, k, volumeNode, segNode, segId)
        otherBefore = self._result(volumeNode, segNode, otherId).copy()
        summary = self.logic.segment(volumeNode, segNode, segId, PROMPT_MASK, sliceView="Red")
        result = self._result(volumeNode, segNode, segId)
        self.assertEqual(summary["axis"], 2)
        self.assertTrue(np.array_equal(result[k], truth[k]), "the drawn slice must not change")
        self.assertTrue(np.array_equal(self._result(volumeNode, segNode, otherId), otherBefore),
                        "other segment touched")
        dice = self._dice(result, truth)
        logging.info(f"mask prompt Dice {dice:.3f}")
        self.assertGreater(dice, self.MIN_DICE["mask"])

    def test_SyntheticPointBoxScribblePrompts(self):
        self.delayDisplay("Point, box and scribble prompts")
        volumeNode, segNode, segId, _otherId, truth = self._syntheticScene()
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        ijkToWorld = volumes.ijkToWorld(volumeNode)
        jj, ii = np.nonzero(truth[k])
        centre = ijkToWorld @ [ii.mean(), jj.mean(), k, 1.0]
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
        points.AddControlPoint(centre[:3])
        self.logic.segment(volumeNode, segNode, segId, PROMPT_POINTS, positivePoints=points)
        self.assertGreater(self._dice(self._result(volumeNode, segNode, segId), truth), self.MIN_DICE["points"])

        lo = ijkToWorld @ [ii.min() - 2, jj.min() - 2, k, 1.0]
        hi = ijkToWorld @ [ii.max() + 2, jj.max() + 2, k, 1.0]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(((lo + hi) / 2)[:3])
        roi.SetSize(np.abs(hi - lo)[:3] + [0, 0, 1])
        self.logic.segment(volumeNode, segNode, segId, PROMPT_BOX, roiNode=roi)
        self.assertGreater(self._dice(self._result(volumeNode, segNode, segId), truth), self.MIN_DICE["box"])

        scribbles = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        fgId = scribbles.GetSegmentation().AddEmptySegment("fg", "fg")
        bgId = scribbles.GetSegmentation().AddEmptySegment("bg", "bg")
        from scipy import ndimage
        fg, bg = np.zeros_like(truth), np.zeros_like(truth)
        fg[k] = ndimage.binary_erosion(truth[k], iterations=4)
        bg[k] = ndimage.binary_dilation(truth[k], iterations=6) & ~ndimage.binary_dilation(truth[k], iterations=4)
        segments.writeSegment(fg, volumeNode, scribbles, fgId)
        segments.writeSegment(bg, volumeNode, scribbles, bgId)
        self.logic.segment(volumeNode, segNode, segId, PROMPT_SCRIBBLES, scribbleSegmentationNode=scribbles,
                           scribbleForegroundId=fgId, scribbleBackgroundId=bgId)
        self.assertGreater(self._dice(self._result(volumeNode, segNode, segId), truth), self.MIN_DICE["scribbles"])

    def test_CorrectionAndUndo(self):
        self.delayDisplay("Correction, re-propagation and undo")
        volumeNode, segNode, segId, _otherId, truth = self._syntheticScene()
        slices = np.flatnonzero(truth.any(axis=(1, 2)))
        k = int(slices[len(slices) // 2])
        self._drawSlice(truth, k, volumeNode, segNode, segId)
        self.logic.segment(volumeNode, segNode, segId, PROMPT_MASK)
        first = self._result(volumeNode, segNode, segId).copy()
        fix = int(slices[-3])  # the user corrects a slice near the end of the structure
        corrected = first.copy()
        corrected[fix] = truth[fix]
        segments.writeSegment(corrected, volumeNode, segNode, segId)
        summary = self.logic.repropagate(volumeNode, segNode, segId)
        self.assertEqual(summary["corrected"], [fix])
        second = self._result(volumeNode, segNode, segId)
        self.assertTrue(np.array_equal(second[fix], truth[fix]), "the corrected slice must stay as drawn")
        self.assertTrue(np.array_equal(second[k], truth[k]))
        self.assertGreaterEqual(self._dice(second, truth), self._dice(first, truth) - 0.05)
        self.assertTrue(self.logic.undo(segNode))
        self.assertTrue(np.array_equal(self._result(volumeNode, segNode, segId), corrected), "undo must restore")

    def test_CancelKeepsWork(self):
        self.delayDisplay("Cancel keeps the slices done so far")
        volumeNode, segNode, segId, _otherId, truth = self._syntheticScene()
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        self._drawSlice(truth, k, volumeNode, segNode, segId)
        summary = self.logic.segment(
            volumeNode, segNode, segId, PROMPT_MASK,
            progressCallback=lambda result=None, message=None: result is None or result.done < 3)
        self.assertTrue(summary["cancelled"])
        self.assertEqual(summary["computed"], 3)
        result = self._result(volumeNode, segNode, segId)
        self.assertLessEqual(int(result.any(axis=(1, 2)).sum()), 4)

    def test_OnePromptMode(self):
        self.delayDisplay("One-Prompt mode: a template patient segments another volume")
        volumeNode, segNode, segId, _otherId, truth = self._syntheticScene(seed=8)
        templateNode, templateSegNode, templateSegId, _o, templateTruth = self._syntheticScene(seed=7)
        k = int(np.argmax(templateTruth.sum(axis=(1, 2))))
        self._drawSlice(templateTruth, k, templateNode, templateSegNode, templateSegId)
        self.logic.segment(volumeNode, segNode, segId, PROMPT_MASK, templateVolumeNode=templateNode,
                           templateSegmentationNode=templateSegNode, templateSegmentId=templateSegId)
        self.assertGreater(self._dice(self._result(volumeNode, segNode, segId), truth), self.MIN_DICE["oneprompt"])

    def test_MRHead(self):
        self.delayDisplay("MRHead sample: mask and point prompts, undo")
        import SampleData
        volumeNode = SampleData.downloadSample("MRHead")
        segNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segId = segNode.GetSegmentation().AddEmptySegment("brain", "brain")
        image = slicer.util.arrayFromVolume(volumeNode)
        naxis = 2 - volumes.sliceAxis(slicer.mrmlScene, "Red", volumes.ijkToWorld(volumeNode))
        index = [slice(None)] * 3
        index[naxis] = image.shape[naxis] // 2
        index = tuple(index)
        plane = image[index]
        rr, cc = np.ogrid[:plane.shape[0], :plane.shape[1]]
        disk = (rr - plane.shape[0] / 2) ** 2 + (cc - plane.shape[1] / 2) ** 2 < (min(plane.shape) / 6) ** 2
        drawn = np.zeros(image.shape, np.uint8)
        drawn[index] = disk & (plane > np.percentile(plane, 60))
        segments.writeSegment(drawn, volumeNode, segNode, segId)
        summary = self.logic.segment(volumeNode, segNode, segId, PROMPT_MASK, sliceView="Red")
        result = self._result(volumeNode, segNode, segId)
        self.assertTrue(np.array_equal(result[index], drawn[index]), "the drawn slice must not change")
        self.assertGreater(int(result.any(axis=tuple(d for d in range(3) if d != naxis)).sum()), 3)
        self.assertLess(result.sum(), 0.25 * result.size)
        self.assertGreater(summary["computed"], 3)
        self.assertTrue(self.logic.undo(segNode))
        self.assertTrue(np.array_equal(self._result(volumeNode, segNode, segId), drawn))
        # A click in the middle of the drawn region segments its slice.
        kji = np.argwhere(drawn).mean(axis=0)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
        points.AddControlPoint((volumes.ijkToWorld(volumeNode) @ [kji[2], kji[1], kji[0], 1.0])[:3])
        self.logic.segment(volumeNode, segNode, segId, PROMPT_POINTS, sliceView="Red", positivePoints=points)
        self.assertTrue(self._result(volumeNode, segNode, segId)[index].any())

    def test_SegmentEditorEffect(self):
        self.delayDisplay("The OnePrompt effect writes through the Segment Editor, with undo")
        volumeNode, segNode, segId, otherId, truth = self._syntheticScene()
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        self._drawSlice(truth, k, volumeNode, segNode, segId)
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        editor.setSegmentationNode(segNode)
        editor.setSourceVolumeNode(volumeNode)
        editor.setCurrentSegmentID(segId)
        if "OnePrompt" not in editor.availableEffectNames():
            registerEditorEffect()
            editor.updateEffectList()
        editor.setActiveEffectByName("OnePrompt")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect)
        before = self._result(volumeNode, segNode, segId).copy()
        effect.self().onPropagate()
        result = self._result(volumeNode, segNode, segId)
        self.assertTrue(np.array_equal(result[k], truth[k]))
        self.assertGreater(self._dice(result, truth), self.MIN_DICE["mask"])
        editor.undo()
        self.assertTrue(np.array_equal(self._result(volumeNode, segNode, segId), before), "Undo must restore")
        editor.setActiveEffectByName("")
