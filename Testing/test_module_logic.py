"""The Slicer module's logic, run without Slicer: Slicer, Qt and VTK are replaced by small stand-ins.

The stand-ins model only what the logic touches (volume arrays and IJK-to-RAS matrices, segments as uint8 arrays,
markups positions, a segmentation history for undo).  What is checked is the module's own work: prompts built from
nodes, the slice axis from the view, writing only the target segment and never the drawn slices, the correction loop,
cancel, undo and One-Prompt mode.  The real Slicer API calls are checked by slicer_api_check and by OnePromptSegTest
inside Slicer.  Propagation uses the oracle predictor of conftest (fast, deterministic) except one short real run.
"""
from __future__ import annotations

import copy
import importlib
import os
import sys
import types

import numpy as np
import pytest
from conftest import OracleModel, bright_object_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ stand-ins

class Matrix:
    """vtkMatrix4x4 backed by numpy."""

    def __init__(self, a=None):
        self.a = np.eye(4) if a is None else np.array(a, float)

    def GetElement(self, r, c):
        return float(self.a[r, c])


class Volume:
    def __init__(self, array, spacing=(1.0, 1.0, 1.0), ijkToRas=None, nodeId="vol"):
        self.array = np.asarray(array)
        self.spacing = tuple(spacing)
        self.ijkToRas = np.diag(list(spacing) + [1.0]) if ijkToRas is None else np.asarray(ijkToRas, float)
        self.id = nodeId

    def GetImageData(self):
        return object()

    def GetIJKToRASMatrix(self, m):
        m.a[:] = self.ijkToRas

    def GetParentTransformNode(self):
        return None

    def GetSpacing(self):
        return self.spacing

    def GetID(self):
        return self.id

    def GetName(self):
        return self.id


class Segmentation:
    def __init__(self):
        self.segments = {}

    def GetSegment(self, segmentId):
        return self.segments.get(segmentId) is not None or None


class SegmentationNode:
    def __init__(self, shape, segmentIds, nodeId="seg"):
        self.segmentation = Segmentation()
        for sid in segmentIds:
            self.segmentation.segments[sid] = np.zeros(shape, np.uint8)
        self.id = nodeId
        self.writes = []

    def GetSegmentation(self):
        return self.segmentation

    def GetID(self):
        return self.id

    def __getitem__(self, segmentId):
        return self.segmentation.segments[segmentId]


class History:
    """vtkSegmentationHistory: SaveState before a change, RestorePreviousState undoes it."""

    def __init__(self):
        self.states, self.segmentation = [], None

    def SetMaximumNumberOfStates(self, n):
        pass

    def SetSegmentation(self, segmentation):
        self.segmentation, self.states = segmentation, []

    def GetSegmentation(self):
        return self.segmentation

    def SaveState(self):
        self.states.append(copy.deepcopy(self.segmentation.segments))

    def IsRestorePreviousStateAvailable(self):
        return bool(self.states)

    def RestorePreviousState(self):
        self.segmentation.segments.clear()
        self.segmentation.segments.update(self.states.pop())
        return True


class Points:
    def __init__(self, points):
        self.points = [list(map(float, p)) for p in points]

    def GetNumberOfControlPoints(self):
        return len(self.points)

    def GetNthControlPointPositionStatus(self, i):
        return 2

    def GetNthControlPointPositionWorld(self, i, p):
        p[:] = self.points[i]


class ROI:
    def __init__(self, center, size):
        self.center, self.size = list(center), list(size)

    def GetCenterWorld(self, c):
        c[:] = self.center

    def GetSizeWorld(self, s):
        s[:] = self.size

    def GetObjectToWorldMatrix(self):
        m = np.eye(4)
        m[:3, 3] = self.center
        return Matrix(m)


def _util():
    util = types.ModuleType("slicer.util")

    def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
        return segmentationNode.segmentation.segments[segmentId].copy()

    def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
        assert narray.shape == referenceVolumeNode.array.shape
        segmentationNode.segmentation.segments[segmentId] = (np.asarray(narray) > 0).astype(np.uint8)
        segmentationNode.writes.append(segmentId)

    util.arrayFromVolume = lambda node: node.array
    util.arrayFromVTKMatrix = lambda m: m.a.copy()
    util.arrayFromSegmentBinaryLabelmap = arrayFromSegmentBinaryLabelmap
    util.updateSegmentBinaryLabelmapFromArray = updateSegmentBinaryLabelmapFromArray
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    return util


@pytest.fixture(scope="module")
def module():
    """Import OnePromptSeg/OnePromptSeg.py against the stand-ins; restore sys.modules afterwards."""
    saved = {k: sys.modules.get(k) for k in ("slicer", "slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule",
                                            "slicer.parameterNodeWrapper", "qt", "vtk", "OnePromptSeg")}
    slicer = types.ModuleType("slicer")
    slicer.util = _util()
    slicer.i18n = types.ModuleType("slicer.i18n")
    slicer.i18n.tr = lambda text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *args: ("validator", args)
    for name in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode", "vtkMRMLScalarVolumeNode",
                 "vtkMRMLSegmentationNode"):
        setattr(slicer, name, type(name, (), {}))
    slicer.vtkMRMLMarkupsNode = types.SimpleNamespace(PositionDefined=2)
    slicer.vtkSegmentationHistory = History
    slicer.app = types.SimpleNamespace(layoutManager=lambda: None)
    slicer.mrmlScene = types.SimpleNamespace(GetNodeByID=lambda nodeId: None)
    slicer.modules = types.SimpleNamespace()
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = Matrix
    sys.modules.update({"slicer": slicer, "slicer.util": slicer.util, "slicer.i18n": slicer.i18n,
                        "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw,
                        "qt": types.ModuleType("qt"), "vtk": vtk})
    sys.modules.pop("OnePromptSeg", None)
    sys.path.insert(0, os.path.join(ROOT, "OnePromptSeg"))
    try:
        yield importlib.import_module("OnePromptSeg")
    finally:
        sys.path.remove(os.path.join(ROOT, "OnePromptSeg"))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture
def scene():
    """The bright-object volume (object on k = 8..29), a target segment drawn on k = 20, another segment."""
    img, truth = bright_object_volume()
    volume = Volume(img, spacing=(0.8, 0.8, 2.0))
    seg = SegmentationNode(img.shape, ["lesion", "other"])
    seg["lesion"][20] = truth[20]
    seg["other"][:, :6, :6] = 1
    return volume, seg, truth


@pytest.fixture
def logic(module, monkeypatch):
    lg = module.OnePromptSegLogic()
    oracle = OracleModel()
    oracle.device, oracle.name = "cpu", "oracle"
    monkeypatch.setattr(lg, "loadModel", lambda modelName="", device="auto": oracle)
    return lg


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


# ------------------------------------------------------------------------------------------------ tests

def test_mask_prompt_writes_only_the_target_segment_and_keeps_the_drawn_slice(module, logic, scene):
    volume, seg, truth = scene
    drawn = seg["lesion"][20].copy()
    other = seg["other"].copy()
    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, sliceView="Red")
    assert summary["axis"] == 2 and summary["drawn"] == [20] and not summary["cancelled"]
    assert seg.writes == ["lesion"]
    assert np.array_equal(seg["other"], other)
    assert np.array_equal(seg["lesion"][20], drawn)
    assert _dice(seg["lesion"], truth) > 0.95
    assert "slices propagated along K" in module.OnePromptSegLogic.describe(summary)


def test_direction_and_slice_range(module, logic, scene):
    volume, seg, truth = scene
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK, direction="forward", sliceRange=(15, 25))
    written = seg["lesion"].any(axis=(1, 2))
    assert written[20:26].all() and not written[:20].any() and not written[26:].any()


def test_running_again_keeps_only_the_user_drawing_as_anchors(module, logic, scene):
    volume, seg, truth = scene
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK, direction="forward")
    assert seg["lesion"][21:30].any() and not seg["lesion"][:20].any()
    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, direction="both")
    assert summary["drawn"] == [20] and summary["computed"] > 10  # the slices written before are recomputed
    assert _dice(seg["lesion"], truth) > 0.95


def test_view_gives_the_axis_and_oblique_views_are_refused(module, logic, scene):
    volume, _seg, _truth = scene
    assert logic.sliceAxis("Red", volume.ijkToRas) == 2
    assert logic.sliceAxis("Yellow", volume.ijkToRas) == 0
    assert logic.sliceAxis("Green", volume.ijkToRas) == 1
    permuted = np.array([[0, 0, 2.0, 0], [0, 0.8, 0, 0], [0.8, 0, 0, 0], [0, 0, 0, 1]])  # i runs along S
    assert logic.sliceAxis("Red", permuted) == 0
    a = np.radians(30)
    oblique = np.array([[np.cos(a), 0, np.sin(a), 0], [0, 1, 0, 0], [-np.sin(a), 0, np.cos(a), 0], [0, 0, 0, 1]])
    from OnePromptSegLib.geometry import GeometryError
    with pytest.raises(GeometryError, match="oblique"):
        logic.sliceAxis("Red", oblique)


def test_points_are_grouped_per_slice(module, logic, scene):
    volume, _seg, _truth = scene
    ijk = volume.ijkToRas
    world = lambda i, j, k: (ijk @ [i, j, k, 1.0])[:3]  # noqa: E731
    positive = Points([world(40, 40, 20), world(42, 40, 20.2), world(40, 40, 25)])
    negative = Points([world(10, 10, 20), world(70, 70, 5)])  # the second is on a slice without positives
    prompts, drawn = logic.buildPrompts(module.PROMPT_POINTS, volume, volume.array, ijk, 2,
                                        positivePoints=positive, negativePoints=negative)
    assert drawn == set()
    assert [p.slice_index for p in prompts] == [20, 25]
    assert prompts[0].labels == [1, 1, 0] and prompts[1].labels == [1]
    assert prompts[0].points[0] == pytest.approx((40.0, 40.0))  # (row, col) = (j, i)
    with pytest.raises(Exception, match="positive point"):
        logic.buildPrompts(module.PROMPT_POINTS, volume, volume.array, ijk, 2, positivePoints=Points([]))


def test_box_prompt_from_an_roi(module, logic, scene):
    volume, _seg, _truth = scene
    ijk = volume.ijkToRas
    lo, hi = ijk @ [30, 20, 20, 1.0], ijk @ [50, 44, 20, 1.0]
    roi = ROI(((lo + hi) / 2)[:3], (np.abs(hi - lo)[:3] + [0, 0, 1]))
    (box,), drawn = logic.buildPrompts(module.PROMPT_BOX, volume, volume.array, ijk, 2, roiNode=roi)
    assert box.slice_index == 20 and drawn == set()
    assert (box.r0, box.c0, box.r1, box.c1) == pytest.approx((20, 30, 44, 50))


def test_scribbles_become_doodles_on_their_slices(module, logic, scene):
    volume, _seg, truth = scene
    strokes = SegmentationNode(truth.shape, ["fg", "bg"], "strokes")
    strokes["fg"][20, 38:42, 38:42] = 1
    strokes["bg"][20, 5:8, 5:30] = 1
    prompts, drawn = logic.buildPrompts(module.PROMPT_SCRIBBLES, volume, volume.array, volume.ijkToRas, 2,
                                        scribbleSegmentationNode=strokes, scribbleForegroundId="fg",
                                        scribbleBackgroundId="bg")
    assert len(prompts) == 1 and prompts[0].slice_index == 20 and drawn == set()
    assert prompts[0].foreground.sum() == 16 and prompts[0].background.sum() == 75
    with pytest.raises(Exception, match="another segment"):
        logic.buildPrompts(module.PROMPT_SCRIBBLES, volume, volume.array, volume.ijkToRas, 2,
                           scribbleSegmentationNode=strokes, scribbleForegroundId="fg", scribbleBackgroundId="fg")


def test_correction_loop_recomputes_and_never_overwrites_corrections(module, logic, scene):
    volume, seg, truth = scene
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK)
    assert logic.hasRun(seg, "lesion")
    nothing = logic.repropagate(volume, seg, "lesion")
    assert nothing["computed"] == 0 and "No corrected slice" in module.OnePromptSegLogic.describe(nothing)
    fixed = seg["lesion"].copy()
    fixed[26] = 0
    fixed[26, 30:36, 30:36] = 1  # the user's correction disagrees with the image: it must stay as drawn
    seg.segmentation.segments["lesion"] = fixed.copy()
    summary = logic.repropagate(volume, seg, "lesion")
    assert summary["corrected"] == [26]
    assert np.array_equal(seg["lesion"][26], fixed[26]) and np.array_equal(seg["lesion"][20], truth[20])
    assert 26 in summary["drawn"] and 20 in summary["drawn"]
    assert logic.undo(seg)  # back to the user's corrected state
    assert np.array_equal(seg["lesion"], fixed)
    assert not logic.hasRun(seg, "lesion")  # after an undo the old session would mistake undone slices for fixes


def test_a_leak_erased_in_the_segment_editor_is_a_slice_drawn_empty(module, logic, scene):
    volume, seg, truth = scene
    volume.array[30:][:, truth[29].astype(bool)] = 1.0  # the structure seems to go on to the volume's edge
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK)
    assert seg["lesion"][30:].any(axis=(1, 2)).all()  # the leak
    erased = seg["lesion"].copy()
    erased[30] = 0  # the user erases it on the first slice past the end, and re-propagates
    seg.segmentation.segments["lesion"] = erased
    summary = logic.repropagate(volume, seg, "lesion")
    assert summary["corrected"] == [30]
    assert not seg["lesion"][30:].any()  # one erased slice ends the structure there, as a slice drawn empty does
    assert _dice(seg["lesion"], truth) > 0.95


def test_cancel_keeps_what_was_done(module, logic, scene):
    volume, seg, _truth = scene
    calls = []

    def progress(result=None, message=None):
        if result is not None:
            calls.append(result.slice_index)
        return result is None or result.done < 3

    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, progressCallback=progress)
    assert summary["cancelled"] and summary["computed"] == 3 and len(calls) == 3
    written = set(np.flatnonzero(seg["lesion"].any(axis=(1, 2))))
    assert written <= set(calls) | {20} and len(written) >= 2


def test_undo_restores_the_state_before_the_run(module, logic, scene):
    volume, seg, _truth = scene
    before = copy.deepcopy(seg.segmentation.segments)
    assert not logic.canUndo(seg)
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK)
    assert logic.canUndo(seg)
    assert logic.undo(seg)
    assert all(np.array_equal(before[k], seg[k]) for k in before)
    assert not logic.undo(seg)


def test_one_prompt_mode_reads_the_prompt_on_the_template(module, logic, scene):
    volume, seg, truth = scene
    seg.segmentation.segments["lesion"][:] = 0
    template_img, template_truth = bright_object_volume(z0=10, z1=32)
    template = Volume(template_img, nodeId="template")
    template_seg = SegmentationNode(template_img.shape, ["drawn"], "templateSeg")
    template_seg["drawn"][21] = template_truth[21]
    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, templateVolumeNode=template,
                            templateSegmentationNode=template_seg, templateSegmentId="drawn")
    assert summary["drawn"] == []
    assert _dice(seg["lesion"], truth) > 0.9
    assert any("One-Prompt mode" in w for w in summary["warnings"])


def test_errors_are_clear(module, logic, scene):
    volume, seg, _truth = scene
    with pytest.raises(ValueError, match="Select a segment"):
        logic.segment(volume, seg, "missing", module.PROMPT_MASK)
    empty = SegmentationNode(volume.array.shape, ["lesion"], "empty")
    with pytest.raises(Exception, match="segment is empty"):
        logic.segment(volume, empty, "lesion", module.PROMPT_MASK)
    with pytest.raises(ValueError, match="Nothing to re-propagate"):
        logic.repropagate(volume, empty, "lesion")


def test_parameter_node_defaults_are_valid_choices(module):
    pn = module.OnePromptSegParameterNode
    assert pn.promptType in module.PROMPT_TYPES and pn.direction in module.DIRECTIONS
    assert pn.sliceView in module.VIEWS and pn.device in module.DEVICES
    assert set(module.DIRECTIONS.values()) == {"both", "forward", "backward"}


def test_follow_anatomy_switches_the_engines_optical_flow(module, logic, scene, monkeypatch):
    from OnePromptSegLib.session import PropagationSession
    from OnePromptSegLib.settings import EngineSettings

    volume, seg, _truth = scene
    used = []
    plain = PropagationSession.__init__

    def init(self, model, settings=None):
        used.append((settings.flow_weight, settings.interp_flow))
        plain(self, model, settings)
    monkeypatch.setattr(PropagationSession, "__init__", init)
    assert module.OnePromptSegParameterNode.followAnatomy is True
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK)
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK, followAnatomy=False)
    assert used == [(EngineSettings.flow_weight, True), (0.0, False)] and used[0][0] > 0


def test_dependencies_present_means_no_install(module, logic):
    assert logic.ensureDependencies(askConfirmation=False) is True


def test_real_model_loads_from_the_manifest_and_propagates(module, scene):
    """One short run with the bundled checkpoint, found through the module's manifest path."""
    from OnePromptSegLib.sample import make_demo_volume
    lg = module.OnePromptSegLogic()
    assert lg.manifestPath() and os.path.isfile(lg.manifestPath())
    assert any(e.get("default") for e in lg.availableModels())
    img, truth, spacing = make_demo_volume(shape=(16, 64, 64), seed=3)
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    volume = Volume(img, spacing)
    seg = SegmentationNode(img.shape, ["lesion"])
    seg["lesion"][k] = truth[k]
    summary = lg.segment(volume, seg, "lesion", module.PROMPT_MASK, device="cpu", sliceRange=(k - 1, k + 1))
    assert summary["computed"] == 2 and summary["device"] == "cpu"
    assert np.array_equal(seg["lesion"][k], truth[k])
    assert not seg["lesion"][: k - 1].any() and not seg["lesion"][k + 2:].any()


def test_adaptation_shows_progress_and_cancel_writes_nothing_new(module, logic, scene, model, monkeypatch):
    from OnePromptSegLib.settings import EngineSettings

    volume, seg, _truth = scene
    monkeypatch.setattr(logic, "loadModel", lambda modelName="", device="auto": model)  # adaptation trains the net
    drawn = seg["lesion"].copy()
    plain = EngineSettings.for_model
    monkeypatch.setattr(EngineSettings, "for_model", classmethod(
        lambda cls, model, **kw: plain(model, adapt_steps=3, adapt_batch=2, **kw)))
    messages = []

    def progress(result=None, message=None):
        messages.append(message)
        return not (message or "").startswith("Adapting")  # cancel at the first adaptation step

    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, progressCallback=progress)
    assert summary["cancelled"] and summary["computed"] == 0
    assert [m for m in messages if m and m.startswith("Adapting")] == [
        "Adapting the model to the drawn slices (step 1 of 3)..."]
    assert np.array_equal(seg["lesion"], drawn)  # the user's drawing, untouched
    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK,
                            progressCallback=lambda result=None, message=None: True)
    assert not summary["cancelled"] and summary["computed"] > 10
