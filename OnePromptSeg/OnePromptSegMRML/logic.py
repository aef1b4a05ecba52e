"""One run of the engine on Slicer nodes: prompt, propagate, write; the correction loop; undo.

``PropagationLogic`` is everything the module does that needs MRML but no GUI.  The module's
``OnePromptSegLogic`` adds Slicer's scripted-module framework, dependency installation and checkpoint download;
the Segment Editor effect passes its own writer.  A run reads the nodes, checks every input before any work, runs
the engine (``OnePromptSegLib``) and writes only the target segment, and only if the nodes it read are still there:
no other segment and no other node of the scene changes.
"""
import logging
import warnings
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

import slicer

# The engine (OnePromptSegLib.session, .checkpoints, .settings) imports torch: it is imported where it is used, so that
# Slicer loads the module, and offers to install PyTorch, before torch is there.
from .messages import InputError, _
from .promptnodes import PROMPT_MASK, buildPrompts, insideVolume, pointIds, pointsWorld
from .segments import checkEditable, checkSegment, readSegment, writeSegment
from .volumes import libraryVolume, sliceAxis, volumeArray

#: states kept per segmentation for this module's undo
UNDO_DEPTH = 10

#: ``progressCallback(result=None, message=None)``: a status message or a SliceResult; returning False cancels
ProgressCallback = Callable[..., Optional[bool]]
#: ``writer(array, volumeNode, segmentationNode, segmentId)``: how a result reaches the segment
Writer = Callable[[np.ndarray, object, object, str], None]


class _Run:
    """What the logic keeps between runs for one target segment: the session and what was written."""

    def __init__(self, session, volumeNodeID: str, axis: int, direction: str,
                 sliceRange: Optional[Tuple[int, int]], drawn: Set[int]):
        self.session = session
        self.volumeNodeID = volumeNodeID
        self.axis = axis
        self.direction = direction
        self.sliceRange = sliceRange
        self.drawn = set(drawn)  # slices the user drew or corrected: never overwritten
        self.written: Optional[np.ndarray] = None  # the segment (k, j, i) as it was right after our last write
        self.usedPoints: Set[Tuple[str, str]] = set()  # (point list ID, control point ID) already taken into account


def _changedSlices(current: np.ndarray, written: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along IJK ``axis`` where the segment differs from what the last run wrote."""
    otherAxes = tuple(d for d in range(3) if d != 2 - axis)
    return np.flatnonzero((current != written).any(axis=otherAxes))


class PropagationLogic:
    """Runs, re-runs and undoes propagations into segments of a scene (no GUI)."""

    def __init__(self):
        self._model = None
        self._modelKey = None
        self._runs: Dict[Tuple[str, str], _Run] = {}
        self._histories: Dict[str, "slicer.vtkSegmentationHistory"] = {}

    def reset(self) -> None:
        """Forget sessions and undo histories (scene closed)."""
        self._runs, self._histories = {}, {}

    # ---------------------------------------------------------------------------------------- models
    def manifestPath(self) -> str:
        """The weights manifest beside the library (the repository's, or the one the extension installs)."""
        from OnePromptSegLib.checkpoints import default_manifest_path
        return default_manifest_path()

    def availableModels(self) -> list:
        """The checkpoints of the manifest (name, path, default ...)."""
        from OnePromptSegLib.checkpoints import list_models
        return list_models(self.manifestPath())

    def loadModel(self, modelName: str = "", device: str = "auto"):
        """The model (cached per name and device), sha256-checked."""
        from OnePromptSegLib.checkpoints import load_model
        key = (modelName or "", device)
        if self._model is None or self._modelKey != key:
            nameOrPath, expectedSha = self.modelFile(modelName)
            self._model = load_model(nameOrPath, device=device, manifest_path=self.manifestPath(),
                                     expected_sha256=expectedSha)
            self._modelKey = key
        return self._model

    def modelFile(self, modelName: str = ""):
        """(manifest name or file path for ``load_model``, sha256 the file must have or None): the bundled
        checkpoints by name.  The Slicer module fetches a manifest entry that is not bundled first."""
        return modelName or None, None

    # ---------------------------------------------------------------------------------------- running
    def segment(self, volumeNode, segmentationNode, segmentId: str, promptType: str = PROMPT_MASK,
                sliceView: str = "Red", axis: Optional[int] = None, templateVolumeNode=None,
                templateSegmentationNode=None, templateSegmentId: Optional[str] = None, direction: str = "both",
                sliceRange: Optional[Tuple[int, int]] = None, ssimThreshold: Optional[float] = None,
                reprompt: bool = True, followAnatomy: bool = True, modelName: str = "", device: str = "auto",
                progressCallback: Optional[ProgressCallback] = None, writer: Optional[Writer] = None,
                **promptNodes) -> dict:
        """Prompt, propagate and write into ``segmentId``.  Returns a summary dict.

        ``promptNodes``: positivePoints, negativePoints, roiNode, scribbleSegmentationNode, scribbleForegroundId,
        scribbleBackgroundId.  With ``templateVolumeNode`` (One-Prompt mode) the prompts are read on the template
        volume and segment this volume: a template segment (mask prompt) is registered to this volume and its
        warped labels seed the engine (``OnePromptSegLib.template``; progress and cancel during the registration);
        points, a box or scribbles on the template seed it through the model alone (One-Prompt's seed search).
        ``progressCallback`` returning False cancels, keeping what was done.  ``writer`` replaces the default write
        (the Segment Editor effect passes its own).  ``followAnatomy=False`` turns off the engine's optical flow
        (``NO_FLOW``): faster, less accurate.  Every input is checked before any work; an error leaves the scene as
        it was.
        """
        from OnePromptSegLib.session import PropagationSession
        from OnePromptSegLib.settings import NO_FLOW, EngineSettings
        image, ijkToWorld, spacing = volumeArray(volumeNode)
        checkSegment(segmentationNode, segmentId)
        checkEditable(segmentationNode)
        scene = volumeNode.GetScene()
        axis = sliceAxis(scene, sliceView, ijkToWorld) if axis is None else int(axis)
        if templateVolumeNode is not None:
            tImage, tIjkToWorld, tSpacing = volumeArray(templateVolumeNode)
            tAxis = sliceAxis(scene, sliceView, tIjkToWorld)
            templatePrompts, _unused = buildPrompts(promptType, templateVolumeNode, tImage, tIjkToWorld, tAxis,
                                                    templateSegmentationNode, templateSegmentId, **promptNodes)
            userPrompts, drawn = [], set()
        else:
            userPrompts, drawn = buildPrompts(promptType, volumeNode, image, ijkToWorld, axis, segmentationNode,
                                              segmentId, **promptNodes)
            previous = self._runs.get((segmentationNode.GetID(), segmentId))
            if promptType == PROMPT_MASK and previous is not None and previous.written is not None \
                    and previous.volumeNodeID == volumeNode.GetID() and previous.axis == axis:
                # Run again (new settings): the slices our last run wrote are not the user's drawing.
                current = readSegment(segmentationNode, segmentId, volumeNode)
                drawn &= previous.drawn | set(_changedSlices(current, previous.written, axis).tolist())
                userPrompts = [p for p in userPrompts if p.slice_index in drawn]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if progressCallback:
                progressCallback(message=_("Loading the model..."))
            model = self.loadModel(modelName, device)
            settings = EngineSettings.for_model(model, reprompt=bool(reprompt), **({} if followAnatomy else NO_FLOW))
            if ssimThreshold is not None:
                settings.ssim_threshold = float(ssimThreshold)
            if templateVolumeNode is not None and promptType == PROMPT_MASK:
                session = self._templateSession(model, settings, volumeNode, image, axis, templateVolumeNode, tImage,
                                                templateSegmentationNode, templateSegmentId, progressCallback)
                if session is None:
                    return {"computed": 0, "cancelled": True, "axis": axis, "anchors": [], "drawn": [],
                            "device": str(getattr(model, "device", "?")), "model": getattr(model, "name", "?"),
                            "warnings": self._userWarnings(caught)}
            else:
                session = PropagationSession(model, settings)
                session.set_volume(image, axis, spacing)
            if progressCallback:
                progressCallback(message=_("Segmenting the prompted slice(s)..."))
            if templateVolumeNode is not None and promptType != PROMPT_MASK:
                for prompt in templatePrompts:
                    session.add_reference(tImage, prompt, tAxis, tSpacing)
            for prompt in userPrompts:
                session.add_prompt(prompt)
            run = _Run(session, volumeNode.GetID(), axis, direction, sliceRange, drawn)
            # Points already there are the prompt (or unrelated): only points placed after the run correct it.
            for node in (promptNodes.get("positivePoints"), promptNodes.get("negativePoints")):
                run.usedPoints |= {(node.GetID(), i) for i in pointIds(node)} if node is not None else set()
            summary = self._propagateAndWrite(run, volumeNode, segmentationNode, segmentId, progressCallback,
                                              writer)
            self._runs[(segmentationNode.GetID(), segmentId)] = run
        summary["warnings"] = self._userWarnings(caught)
        return summary

    @staticmethod
    def _templateSession(model, settings, volumeNode, image, axis, templateVolumeNode, templateImage,
                         templateSegmentationNode, templateSegmentId, progressCallback):
        """A session over this volume seeded from the template segment: registered (affine, SimpleITK), warped, and
        anchored on its most trustworthy slice.  None when the user cancels during the registration."""
        from OnePromptSegLib.template import SLICEWISE, Cancelled, template_session
        templateMask = readSegment(templateSegmentationNode, templateSegmentId, templateVolumeNode)

        def progress(stage, step):
            if progressCallback is None:
                return True
            if stage == SLICEWISE:
                message = _("Fitting the template to this volume slice by slice ({done} slices done)...").format(
                    done=step)
            else:
                message = _("Registering the template to this volume (level {level} of 3, iteration {iteration})..."
                            ).format(level=stage + 1, iteration=step)
            return progressCallback(message=message) is not False
        try:
            session, _prior = template_session(model, libraryVolume(volumeNode, image),
                                               libraryVolume(templateVolumeNode, templateImage), templateMask, axis,
                                               settings, progress=progress)
        except Cancelled:
            return None
        return session

    @staticmethod
    def _userWarnings(caught) -> list:
        """Messages worth showing (device fallback, One-Prompt seeding ...), each once; all are logged."""
        messages = []
        for w in caught:
            if issubclass(w.category, UserWarning) and str(w.message) not in messages:
                messages.append(str(w.message))
                logging.warning(str(w.message))
        return messages

    def _runFor(self, volumeNode, segmentationNode, segmentId: str) -> _Run:
        run = self._runs.get((segmentationNode.GetID() if segmentationNode else None, segmentId))
        if run is None or run.written is None or volumeNode is None or run.volumeNodeID != volumeNode.GetID():
            raise InputError(_("Nothing to re-propagate for this segment and volume yet: click 'Segment and "
                               "propagate' first."))
        checkSegment(segmentationNode, segmentId)
        return run

    def _takeUpEdits(self, run: _Run, volumeNode, segmentationNode, segmentId: str) -> List[int]:
        """Slices whose content differs from our last write (drawn, erased, or erased to empty) become locked
        anchors; returns them."""
        current = readSegment(segmentationNode, segmentId, volumeNode)
        changed = [int(s) for s in _changedSlices(current, run.written, run.axis)]
        for s in changed:
            run.session.correct(s, np.take(current, s, 2 - run.axis) > 0)
            run.drawn.add(s)
        return changed

    def repropagate(self, volumeNode, segmentationNode, segmentId: str,
                    progressCallback: Optional[ProgressCallback] = None, writer: Optional[Writer] = None) -> dict:
        """Correction loop: slices whose content differs from our last write (drawn, erased, or erased to empty)
        become locked anchors and only the affected slices are recomputed."""
        run = self._runFor(volumeNode, segmentationNode, segmentId)
        changed = self._takeUpEdits(run, volumeNode, segmentationNode, segmentId)
        if not changed:
            return {"computed": 0, "cancelled": False, "corrected": [], "axis": run.axis, "warnings": [],
                    "note": _("No corrected slice found: edit a slice of the segment first.")}
        return self._rerun(run, changed, volumeNode, segmentationNode, segmentId, progressCallback, writer)

    def correctWithPoints(self, volumeNode, segmentationNode, segmentId: str, positivePoints=None,
                          negativePoints=None, progressCallback: Optional[ProgressCallback] = None,
                          writer: Optional[Writer] = None) -> dict:
        """Click corrections of a shown result: the points placed since the run (positive: a part the result
        missed, negative: a part it wrongly holds) refine their slices (``PropagationSession.refine_slice``), which
        become locked anchors, and only the affected slices are recomputed.  Slices edited by hand meanwhile are
        taken up as corrections too."""
        from OnePromptSegLib.geometry import ras_to_ijk
        from OnePromptSegLib.prompts import Click
        run = self._runFor(volumeNode, segmentationNode, segmentId)
        image, ijkToWorld, _spacing = volumeArray(volumeNode)
        points, labels, keys = [], [], []
        for node, label in ((positivePoints, 1), (negativePoints, 0)):
            if node is None:
                continue
            for pointId, position in zip(pointIds(node), pointsWorld(node)):
                if (node.GetID(), pointId) not in run.usedPoints:
                    points.append(position)
                    labels.append(label)
                    keys.append((node.GetID(), pointId))
        if not points:
            return {"computed": 0, "cancelled": False, "corrected": [], "axis": run.axis, "warnings": [],
                    "note": _("No new point: place a point on a part to add (positive) or to remove (negative).")}
        ijk = np.atleast_2d(ras_to_ijk(np.array(points), ijkToWorld))
        inside = insideVolume(ijk, image.shape)
        if not inside.any():
            raise InputError(_("The new points lie outside the volume: place them on the image."))
        changed = self._takeUpEdits(run, volumeNode, segmentationNode, segmentId)
        bySlice: Dict[int, list] = {}
        for p, label in zip(ijk[inside], np.array(labels)[inside]):
            bySlice.setdefault(int(round(p[run.axis])), []).append((p, int(label)))  # as Click.from_ijk rounds
        for s, items in sorted(bySlice.items()):
            clicks = Click.from_ijk([p for p, _l in items], [label for _p, label in items], run.axis)
            run.session.refine_slice(s, clicks)
            run.drawn.add(s)
        run.usedPoints |= set(keys)
        return self._rerun(run, sorted(set(changed) | set(bySlice)), volumeNode, segmentationNode, segmentId,
                           progressCallback, writer, refined=set(bySlice))

    def _rerun(self, run: _Run, corrected: List[int], volumeNode, segmentationNode, segmentId: str,
               progressCallback: Optional[ProgressCallback], writer: Optional[Writer], refined: Set[int] = frozenset()
               ) -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = self._propagateAndWrite(run, volumeNode, segmentationNode, segmentId, progressCallback, writer,
                                              refined)
        summary["corrected"] = [int(s) for s in corrected]
        summary["warnings"] = self._userWarnings(caught)
        return summary

    def _propagateAndWrite(self, run: _Run, volumeNode, segmentationNode, segmentId: str,
                           progressCallback: Optional[ProgressCallback], writer: Optional[Writer],
                           refined: Set[int] = frozenset()) -> dict:
        """Propagate, then write: computed slices and anchors replace the segment's slices, except slices the user
        drew, which keep the segment's content; ``refined`` slices (drawn by click corrections in the session, not
        in the segment) are written too."""
        computed, cancelled = [], False
        adapting = run.session.adapt()  # test-time adaptation to the drawn slices, when the checkpoint asks for it
        try:
            for done, total in adapting:
                if progressCallback is not None and progressCallback(message=_(
                        "Adapting the model to the drawn slices (step {done} of {total})...").format(
                        done=done, total=total)) is False:
                    cancelled = True
                    break
        finally:
            adapting.close()
        generator = run.session.propagate(direction=run.direction, slice_range=run.sliceRange)
        try:
            for result in ([] if cancelled else generator):
                computed.append(int(result.slice_index))
                if progressCallback is not None and progressCallback(result) is False:
                    cancelled = True
                    break
        finally:
            generator.close()
        from OnePromptSegLib.session import merge_into
        self._checkStillThere(volumeNode, segmentationNode, segmentId)
        current = readSegment(segmentationNode, segmentId, volumeNode)
        merged = merge_into(current, run.session.result, run.axis, set(computed) | set(run.session.anchors),
                            run.drawn - set(refined))
        (writer or self.writeSegment)(merged, volumeNode, segmentationNode, segmentId)
        run.written = readSegment(segmentationNode, segmentId, volumeNode)
        return {"computed": len(computed), "cancelled": cancelled, "axis": run.axis,
                "anchors": sorted(int(a) for a in run.session.anchors), "drawn": sorted(run.drawn),
                "device": str(getattr(run.session.model, "device", "?")),
                "model": getattr(run.session.model, "name", "?")}

    @staticmethod
    def _checkStillThere(volumeNode, segmentationNode, segmentId: str) -> None:
        """InputError if the user removed the volume, the segmentation or the segment while the run went on:
        the result has nowhere to go and nothing is written."""
        if volumeNode.GetScene() is None or volumeNode.GetImageData() is None:
            raise InputError(_("The volume was removed during the run: nothing was written."))
        if segmentationNode.GetScene() is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise InputError(_("The segment was removed during the run: nothing was written."))

    def writeSegment(self, array: np.ndarray, volumeNode, segmentationNode, segmentId: str) -> None:
        """Default writer: only this segment, in world coordinates, with a state saved for undo first."""
        self.saveStateForUndo(segmentationNode)
        writeSegment(array, volumeNode, segmentationNode, segmentId)

    def hasRun(self, segmentationNode, segmentId: str) -> bool:
        return segmentationNode is not None and (segmentationNode.GetID(), segmentId) in self._runs

    @staticmethod
    def describe(summary: dict) -> str:
        """One short text for the status line."""
        if summary.get("note"):
            return summary["note"]
        text = _("{n} slices propagated along {axis} on {device}").format(
            n=summary["computed"], axis="IJK"[summary["axis"]], device=summary.get("device", "?"))
        if summary.get("corrected"):
            text += _("; corrected slices: {s}").format(s=", ".join(str(s) for s in summary["corrected"]))
        if summary.get("cancelled"):
            text += _(" (cancelled: the slices done so far were kept)")
        return "\n".join([text] + summary.get("warnings", []))

    # ---------------------------------------------------------------------------------------- undo
    def saveStateForUndo(self, segmentationNode) -> None:
        """Snapshot of the whole segmentation for :meth:`undo` (``UNDO_DEPTH`` states per segmentation)."""
        history = self._histories.get(segmentationNode.GetID())
        if history is None or history.GetSegmentation() != segmentationNode.GetSegmentation():
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(UNDO_DEPTH + 1)  # the history also holds the state undone to
            history.SetSegmentation(segmentationNode.GetSegmentation())
            self._histories[segmentationNode.GetID()] = history
        history.SaveState()

    def canUndo(self, segmentationNode) -> bool:
        history = self._histories.get(segmentationNode.GetID()) if segmentationNode else None
        return bool(history and history.IsRestorePreviousStateAvailable())

    def undo(self, segmentationNode) -> bool:
        """Restore the segmentation as it was before the last write of this module."""
        if not self.canUndo(segmentationNode):
            return False
        # The sessions no longer match the segment: re-propagating would take the undone slices for corrections.
        self._runs = {key: run for key, run in self._runs.items() if key[0] != segmentationNode.GetID()}
        return bool(self._histories[segmentationNode.GetID()].RestorePreviousState())
