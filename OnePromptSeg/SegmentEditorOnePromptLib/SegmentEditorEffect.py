"""OnePrompt Segment Editor effect: propagate the selected segment's drawn slice(s) or scribbles through the volume.

The result goes through ``modifySelectedSegmentByLabelmap``, so the Segment Editor's masking settings (editable area,
intensity range, overwrite of other segments) apply, and ``saveStateForUndo`` makes Undo (Ctrl+Z) restore the
previous state.  The work is done by the OnePromptSeg module's logic.
"""
import os

import qt

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

VIEW_AUTO = "Auto (the view you drew in)"
MODE_MASK = "mask"
MODE_SCRIBBLES = "scribbles"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Propagate the selected segment from its drawn slice(s) through the source volume."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "OnePrompt"
        scriptedEffect.title = _("OnePrompt")
        scriptedEffect.perSegment = True  # writes into the selected segment only
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._lastViewName = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return _("""<html>Segment the whole structure from one drawn slice.<p>
1. Draw the structure on one slice of the selected segment (Paint, Draw, Level tracing...), or scribble on it and,
optionally, on what is not the structure in another segment (scribble mode).<br>
2. Click <b>Propagate</b>: the slices are segmented one after the other in both directions (progress, Cancel keeps
what is done). Slices you drew are never changed; masking settings below apply.<br>
3. Fix any slice with Paint/Erase and click <b>Re-propagate</b>: only the affected slices are recomputed.
Undo restores the previous state. Not for clinical use.</html>""")

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setupOptionsFrame(self):
        self.promptModeComboBox = qt.QComboBox()
        self.promptModeComboBox.addItem(_("Drawn slice(s) of this segment"), MODE_MASK)
        self.promptModeComboBox.addItem(_("Scribbles: strokes in this segment"), MODE_SCRIBBLES)
        self.promptModeComboBox.toolTip = _("Use the drawn slices as they are (mask), or treat the strokes as "
                                            "scribbles from which the model segments the slice first.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompt:"), self.promptModeComboBox)

        self.backgroundComboBox = qt.QComboBox()
        self.backgroundComboBox.toolTip = _("Scribble mode: a segment with strokes on what is not the structure.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Background scribbles:"), self.backgroundComboBox)

        self.viewComboBox = qt.QComboBox()
        for name in (VIEW_AUTO, "Red", "Yellow", "Green"):
            self.viewComboBox.addItem(name)
        self.viewComboBox.toolTip = _("The slice view whose slices are propagated (through-plane direction).")
        self.scriptedEffect.addLabeledOptionsWidget(_("Slice view:"), self.viewComboBox)

        self.directionComboBox = qt.QComboBox()
        for label, value in (("Both directions", "both"), ("Up only (increasing slice index)", "forward"),
                             ("Down only (decreasing slice index)", "backward")):
            self.directionComboBox.addItem(_(label), value)
        self.scriptedEffect.addLabeledOptionsWidget(_("Direction:"), self.directionComboBox)

        self.deviceComboBox = qt.QComboBox()
        for device in ("auto", "cpu", "cuda", "mps"):
            self.deviceComboBox.addItem(device)
        self.deviceComboBox.toolTip = _("auto = GPU if available; the run falls back to the CPU if the GPU fails.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Device:"), self.deviceComboBox)

        self.propagateButton = qt.QPushButton(_("Propagate"))
        self.propagateButton.objectName = self.__class__.__name__ + "Propagate"
        self.propagateButton.toolTip = _("Segment the structure through the volume from the drawn slice(s).")
        self.repropagateButton = qt.QPushButton(_("Re-propagate"))
        self.repropagateButton.objectName = self.__class__.__name__ + "Repropagate"
        self.repropagateButton.toolTip = _("After correcting slices: recompute only the slices they affect.")
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.repropagateButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for combo in (self.promptModeComboBox, self.backgroundComboBox, self.viewComboBox, self.directionComboBox,
                      self.deviceComboBox):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.repropagateButton.connect("clicked()", self.onRepropagate)

    def cleanup(self):
        """Disconnect the option widgets so the effect can be deleted (Slicer issue 7392)."""
        if not hasattr(self, "propagateButton"):
            return
        for combo in (self.promptModeComboBox, self.backgroundComboBox, self.viewComboBox, self.directionComboBox,
                      self.deviceComboBox):
            combo.disconnect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.propagateButton.disconnect("clicked()", self.onPropagate)
        self.repropagateButton.disconnect("clicked()", self.onRepropagate)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("PromptMode", MODE_MASK)
        self.scriptedEffect.setParameterDefault("BackgroundSegmentID", "")
        self.scriptedEffect.setParameterDefault("SliceView", VIEW_AUTO)
        self.scriptedEffect.setParameterDefault("Direction", "both")
        self.scriptedEffect.setParameterDefault("Device", "auto")

    def updateGUIFromMRML(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode() if parameterSetNode else None
        combos = (self.promptModeComboBox, self.backgroundComboBox, self.viewComboBox, self.directionComboBox,
                  self.deviceComboBox)
        blocked = [combo.blockSignals(True) for combo in combos]
        self.backgroundComboBox.clear()
        self.backgroundComboBox.addItem(_("(none)"), "")
        if segmentationNode is not None:
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                if segmentId != parameterSetNode.GetSelectedSegmentID():
                    self.backgroundComboBox.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)
        self.promptModeComboBox.currentIndex = max(
            self.promptModeComboBox.findData(self.scriptedEffect.parameter("PromptMode")), 0)
        self.backgroundComboBox.currentIndex = max(
            self.backgroundComboBox.findData(self.scriptedEffect.parameter("BackgroundSegmentID")), 0)
        self.viewComboBox.currentIndex = max(self.viewComboBox.findText(self.scriptedEffect.parameter("SliceView")), 0)
        self.directionComboBox.currentIndex = max(
            self.directionComboBox.findData(self.scriptedEffect.parameter("Direction")), 0)
        self.deviceComboBox.currentIndex = max(self.deviceComboBox.findText(self.scriptedEffect.parameter("Device")), 0)
        for combo, wasBlocked in zip(combos, blocked):
            combo.blockSignals(wasBlocked)
        self.backgroundComboBox.enabled = self.scriptedEffect.parameter("PromptMode") == MODE_SCRIBBLES
        logic = self._logic()
        self.repropagateButton.enabled = bool(
            logic and parameterSetNode and logic.hasRun(segmentationNode, parameterSetNode.GetSelectedSegmentID()))

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("PromptMode", self.promptModeComboBox.currentData or MODE_MASK)
        self.scriptedEffect.setParameter("BackgroundSegmentID", self.backgroundComboBox.currentData or "")
        self.scriptedEffect.setParameter("SliceView", self.viewComboBox.currentText)
        self.scriptedEffect.setParameter("Direction", self.directionComboBox.currentData or "both")
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Remember the slice view the user works in; never consume the event."""
        viewName = getattr(viewWidget, "sliceViewName", None)
        if viewName in ("Red", "Yellow", "Green"):
            self._lastViewName = viewName
        return False

    # ------------------------------------------------------------------------------------------ running
    @staticmethod
    def _logic():
        try:
            import OnePromptSeg
        except ImportError:
            return None
        return OnePromptSeg.sharedLogic()

    def _axis(self, volumeNode, segmentationNode, segmentId):
        """IJK axis: the chosen view's; in Auto the one the drawing lies in, else the last view used, else Red."""
        # importable once the OnePromptSeg module has put the library on the path
        from OnePromptSegLib.prompts import drawn_axis
        from OnePromptSegMRML.segments import readSegment
        from OnePromptSegMRML.volumes import ijkToWorld, sliceAxis
        viewName = self.scriptedEffect.parameter("SliceView")
        if viewName in ("Red", "Yellow", "Green"):
            return sliceAxis(volumeNode.GetScene(), viewName, ijkToWorld(volumeNode))
        axis = drawn_axis(readSegment(segmentationNode, segmentId, volumeNode))
        if axis is not None:
            return axis
        return sliceAxis(volumeNode.GetScene(), self._lastViewName or "Red", ijkToWorld(volumeNode))

    def _write(self, array, volumeNode, segmentationNode, segmentId):
        """Write through the Segment Editor: masking settings apply; Undo restores the previous state.

        The modifier labelmap lives in the segmentation's coordinates: the result, on the volume's grid, is placed
        there through both nodes' transforms, then resampled onto the editor's modifier geometry."""
        from OnePromptSegMRML.segments import orientedImageOnVolumeGrid
        modifier = orientedImageOnVolumeGrid(array, volumeNode, segmentationNode)
        aligned = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            modifier, self.scriptedEffect.defaultModifierLabelmap(), aligned)
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            aligned, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def onPropagate(self):
        self._run(repropagate=False)

    def onRepropagate(self):
        self._run(repropagate=True)

    def _run(self, repropagate):
        import OnePromptSeg
        logic = self._logic()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        segmentId = parameterSetNode.GetSelectedSegmentID()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        if volumeNode is None or not segmentId:
            slicer.util.errorDisplay(_("Select a source volume and a segment first."))
            return
        if self.scriptedEffect.confirmCurrentSegmentVisible() == self.scriptedEffect.NotConfirmed:
            return
        with slicer.util.tryWithErrorDisplay(_("OnePrompt failed."), waitCursor=False):
            if not logic.ensureDependencies(askConfirmation=True):
                return
            dialog, callback = OnePromptSeg.createProgressCallback(_("Loading the model..."))
            try:
                if repropagate:
                    summary = logic.repropagate(volumeNode, segmentationNode, segmentId, progressCallback=callback,
                                                writer=self._write)
                else:
                    prompt = {}
                    promptType = OnePromptSeg.PROMPT_MASK
                    if self.scriptedEffect.parameter("PromptMode") == MODE_SCRIBBLES:
                        promptType = OnePromptSeg.PROMPT_SCRIBBLES
                        prompt = dict(scribbleSegmentationNode=segmentationNode, scribbleForegroundId=segmentId,
                                      scribbleBackgroundId=self.scriptedEffect.parameter("BackgroundSegmentID"))
                    summary = logic.segment(
                        volumeNode, segmentationNode, segmentId, promptType,
                        axis=self._axis(volumeNode, segmentationNode, segmentId),
                        direction=self.scriptedEffect.parameter("Direction") or "both",
                        device=self.scriptedEffect.parameter("Device") or "auto",
                        progressCallback=callback, writer=self._write, **prompt)
            finally:
                dialog.close()
            self.statusLabel.text = logic.describe(summary)
        self.updateGUIFromMRML()
