"""The MRML adapter (OnePromptSeg/OnePromptSegMRML) on real Slicer nodes (slicer-core).

A bright ball placed in world coordinates is the truth; the oracle predictor of conftest segments exactly the bright
voxels, so whatever is off in the result is the adapter's geometry: each case checks the written segment against the
ball in world coordinates (Dice, centroid), read from the segment's own labelmap and the nodes' own transforms.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import OracleModel
from mrml_support import (add_grid_transform, add_linear_transform, add_segmentation, add_volume, ball_image, draw,
                          matrix, new_scene, node_counts, segment_voxels_world, sphere_dice, volume_ijk_to_world,
                          world_of)

import slicer
from OnePromptSegLib.geometry import GeometryError
from OnePromptSegLib.prompts import PromptError
from OnePromptSegMRML import segments, volumes
from OnePromptSegMRML.logic import UNDO_DEPTH, PropagationLogic
from OnePromptSegMRML.messages import InputError
from OnePromptSegMRML.promptnodes import PROMPT_BOX, PROMPT_MASK, PROMPT_POINTS, PROMPT_SCRIBBLES

SHAPE = (40, 64, 64)  # (k, j, i)
IJK_TO_RAS = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
BALL_IJK = (20, 40, 15)  # off-centre: a flipped axis misses it
RADIUS = 9.0
#: a linear transform from registration: a shift along R and a small rotation about S
SHIFT_R = np.array([[1, 0, 0, 15.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
ROTATE = np.array([[np.cos(0.3), -np.sin(0.3), 0, -4.0], [np.sin(0.3), np.cos(0.3), 0, 6.0], [0, 0, 1, 3.0],
                   [0, 0, 0, 1]])


def oracle_logic() -> PropagationLogic:
    logic = PropagationLogic()
    oracle = OracleModel()
    oracle.device, oracle.name = "cpu", "oracle"
    logic.loadModel = lambda modelName="", device="auto": oracle
    return logic


class Case:
    """A scene with the ball volume (optionally under a transform) and a segmentation (optionally under another,
    optionally with its own reference geometry)."""

    def __init__(self, volume_transform=None, segmentation_transform=None, geometry=None, ijk_to_ras=IJK_TO_RAS,
                 shape=SHAPE, ball_ijk=BALL_IJK):
        self.scene = new_scene()
        vparent = add_linear_transform(self.scene, volume_transform, "registration") \
            if volume_transform is not None else None
        sparent = add_linear_transform(self.scene, segmentation_transform, "segmentation transform") \
            if segmentation_transform is not None else None
        to_world = (volume_transform if volume_transform is not None else np.eye(4)) @ ijk_to_ras
        self.center = (to_world @ [*ball_ijk, 1.0])[:3]
        image, self.truth = ball_image(shape, to_world, self.center, RADIUS)
        self.volume = add_volume(self.scene, image, ijk_to_ras, "ball", vparent)
        self.segmentation = add_segmentation(self.scene, ["target", "other"], reference=self.volume,
                                             parent=sparent, geometry=geometry)
        other = np.zeros(shape, np.uint8)
        other[:, :6, :6] = 1
        draw(self.segmentation, "other", other, self.volume)
        self.k = int(np.argmax(self.truth.sum(axis=(1, 2))))
        self.logic = oracle_logic()

    def draw_slice(self, k=None):
        drawn = np.zeros_like(self.truth)
        k = self.k if k is None else k
        drawn[k] = self.truth[k]
        draw(self.segmentation, "target", drawn, self.volume)

    def points(self, world_points, name="positive"):
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for p in world_points:
            node.AddControlPointWorld(vtk_point(p))
        return node

    def world(self, ijk):
        return (volume_ijk_to_world(self.volume) @ [*ijk, 1.0])[:3]

    def check(self, min_dice=0.95):
        dice, offset = sphere_dice(self.segmentation, "target", self.center, RADIUS)
        assert dice >= min_dice and offset <= 0.8, (dice, offset)  # within one (in-plane) voxel
        return dice


def vtk_point(p):
    import vtk
    return vtk.vtkVector3d(*[float(v) for v in p])


# ------------------------------------------------------------------------------------------------ prompt kinds

@pytest.mark.parametrize("kind", ["mask", "points", "box", "scribbles"])
def test_each_prompt_kind_lands_on_the_ball(kind):
    case = Case()
    other_before = segment_voxels_world(case.segmentation, "other")[0]
    extra = {}
    if kind == "mask":
        case.draw_slice()
        prompt = PROMPT_MASK
    elif kind == "points":
        prompt, extra = PROMPT_POINTS, dict(positivePoints=case.points([case.center]))
    elif kind == "box":
        roi = case.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*case.center)
        roi.SetSize(2 * RADIUS + 4, 2 * RADIUS + 4, 1.0)
        prompt, extra = PROMPT_BOX, dict(roiNode=roi)
    else:
        strokes = add_segmentation(case.scene, ["fg", "bg"], reference=case.volume, name="strokes")
        fg = np.zeros_like(case.truth)
        fg[case.k, 38:42, 18:22] = 1
        bg = np.zeros_like(case.truth)
        bg[case.k, 5:8, 30:60] = 1
        draw(strokes, "fg", fg, case.volume)
        draw(strokes, "bg", bg, case.volume)
        prompt = PROMPT_SCRIBBLES
        extra = dict(scribbleSegmentationNode=strokes, scribbleForegroundId="fg", scribbleBackgroundId="bg")
    summary = case.logic.segment(case.volume, case.segmentation, "target", prompt, **extra)
    assert summary["axis"] == 2 and not summary["cancelled"]
    case.check()
    assert np.array_equal(segment_voxels_world(case.segmentation, "other")[0], other_before)  # untouched


# ------------------------------------------------------------------------------------------------ transforms

@pytest.mark.parametrize("volume_transform,segmentation_transform", [
    (SHIFT_R, None), (None, ROTATE), (SHIFT_R, ROTATE), (ROTATE, ROTATE)],
    ids=["volume", "segmentation", "both", "same"])
@pytest.mark.parametrize("kind", ["mask", "points"])
def test_transformed_nodes_keep_the_result_where_the_prompt_was(volume_transform, segmentation_transform, kind):
    case = Case(volume_transform, segmentation_transform)
    if kind == "mask":
        case.draw_slice()
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    else:  # a click in world coordinates, as placed in a slice view
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_POINTS,
                           positivePoints=case.points([case.center]))
    case.check()
    # and the adapter reads back what it wrote, on the volume's grid
    back = segments.readSegment(case.segmentation, "target", case.volume)
    assert 2 * (back & case.truth).sum() / (back.sum() + case.truth.sum()) >= (1.0 if kind == "mask" else 0.95)


@pytest.mark.parametrize("name,factor,crop", [("finer", 0.5, None), ("coarser", 2.0, None),
                                              ("cropped", 1.0, (8, 56, 8, 56, 4, 36))])
def test_reference_geometry_of_the_segmentation_does_not_move_the_result(name, factor, crop):
    ijk = IJK_TO_RAS.copy()
    ijk[:3, :3] *= factor
    dims = [int(round(n / factor)) for n in SHAPE[::-1]]
    if crop is not None:
        ijk[:3, 3] = (IJK_TO_RAS @ [crop[0], crop[2], crop[4], 1.0])[:3]
        dims = [crop[1] - crop[0], crop[3] - crop[2], crop[5] - crop[4]]
    case = Case(SHIFT_R, None, geometry=(dims, ijk))
    case.draw_slice()
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    case.check()


@pytest.mark.parametrize("which", ["volume", "segmentation"])
def test_a_non_linear_transform_asks_to_harden_it_and_writes_nothing(which):
    case = Case()
    case.draw_slice()
    before = segment_voxels_world(case.segmentation, "target")[0].copy()
    warp = add_grid_transform(case.scene)
    (case.volume if which == "volume" else case.segmentation).SetAndObserveTransformNodeID(warp.GetID())
    counts = node_counts(case.scene)
    with pytest.raises(InputError, match="non-linear transform.*[Hh]arden"):
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    assert node_counts(case.scene) == counts
    (case.volume if which == "volume" else case.segmentation).SetAndObserveTransformNodeID(None)
    assert np.array_equal(segment_voxels_world(case.segmentation, "target")[0], before)


# ------------------------------------------------------------------------------------------------ views and axes

def _slice_node(scene, view, normal, in_plane):
    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName(view)
    node.SetSingletonTag(view)
    scene.AddNode(node)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = in_plane[0], in_plane[1], normal
    node.GetSliceToRAS().DeepCopy(matrix(m))
    node.UpdateMatrices()
    return node


@pytest.mark.parametrize("view,axis", [("Red", 2), ("Yellow", 0), ("Green", 1)])
def test_every_slice_view_propagates_along_its_axis(view, axis):
    case = Case()
    _slice_node(case.scene, "Red", (0, 0, 1), ((-1, 0, 0), (0, 1, 0)))
    _slice_node(case.scene, "Yellow", (1, 0, 0), ((0, -1, 0), (0, 0, 1)))
    _slice_node(case.scene, "Green", (0, 1, 0), ((-1, 0, 0), (0, 0, 1)))
    naxis = 2 - axis
    s = int(np.argmax(case.truth.sum(axis=tuple(d for d in range(3) if d != naxis))))
    drawn = np.zeros_like(case.truth)
    index = [slice(None)] * 3
    index[naxis] = s
    drawn[tuple(index)] = case.truth[tuple(index)]
    draw(case.segmentation, "target", drawn, case.volume)
    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, sliceView=view)
    assert summary["axis"] == axis and summary["drawn"] == [s]
    case.check()


def test_a_permuted_volume_and_an_oblique_view():
    permuted = np.array([[0, 0, -0.9, 30.0], [0, 0.8, 0, -10.0], [2.0, 0, 0, 5.0], [0, 0, 0, 1]])  # i runs along S
    case = Case(ijk_to_ras=permuted, shape=(48, 56, 24), ball_ijk=(11, 30, 25))
    assert volumes.sliceAxis(case.scene, "Red", volumes.ijkToWorld(case.volume)) == 0
    s = int(np.argmax(case.truth.sum(axis=(0, 1))))
    drawn = np.zeros_like(case.truth)
    drawn[:, :, s] = case.truth[:, :, s]
    draw(case.segmentation, "target", drawn, case.volume)
    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, sliceView="Red")
    assert summary["axis"] == 0
    case.check()
    a = np.radians(30)
    _slice_node(case.scene, "Red", (np.sin(a), 0, np.cos(a)), ((np.cos(a), 0, -np.sin(a)), (0, 1, 0)))
    with pytest.raises(GeometryError, match="oblique"):
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, sliceView="Red")


# ------------------------------------------------------------------------------------------------ scene clutter

def test_runs_corrections_and_undo_leave_no_node_behind():
    case = Case(SHIFT_R, ROTATE)
    case.draw_slice()
    counts = node_counts(case.scene)
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    assert node_counts(case.scene) == counts
    current = segments.readSegment(case.segmentation, "target", case.volume)
    current[case.k + 3] = 0  # the user erases one slice
    draw(case.segmentation, "target", current, case.volume)
    summary = case.logic.repropagate(case.volume, case.segmentation, "target")
    assert summary["corrected"] == [case.k + 3] and node_counts(case.scene) == counts
    assert not segments.readSegment(case.segmentation, "target", case.volume)[case.k + 3].any()
    assert case.logic.undo(case.segmentation) and node_counts(case.scene) == counts


# ------------------------------------------------------------------------------------------------ the loop

def test_correction_loop_cancel_and_undo_depth():
    case = Case()
    case.draw_slice()
    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK,
                                 progressCallback=lambda result=None, message=None: result is None or result.done < 3)
    assert summary["cancelled"] and summary["computed"] == 3
    kept = segments.readSegment(case.segmentation, "target", case.volume)
    assert 2 <= int(kept.any(axis=(1, 2)).sum()) <= 4 and np.array_equal(kept[case.k], case.truth[case.k])
    assert case.logic.repropagate(case.volume, case.segmentation, "target")["computed"] == 0  # nothing corrected
    for _ in range(UNDO_DEPTH + 2):
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    case.check()
    undone = 0
    while case.logic.undo(case.segmentation):
        undone += 1
    assert undone == UNDO_DEPTH, undone


def test_points_placed_after_a_run_correct_their_slice_and_rerun_the_range():
    """nnInteractive-style corrections: a negative point deep in a slice's part removes it, and the walk past it is
    redone from that empty slice; a positive point afterwards brings the slice back.  Points of the prompt itself
    and points already used do not count again."""
    case = Case(SHIFT_R, ROTATE)
    positive = case.points([case.center], "positive")
    negative = case.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_POINTS, positivePoints=positive,
                       negativePoints=negative)
    first = segments.readSegment(case.segmentation, "target", case.volume)
    nothing = case.logic.correctWithPoints(case.volume, case.segmentation, "target", positive, negative)
    assert nothing["computed"] == 0 and "No new point" in nothing["note"]
    top = int(np.flatnonzero(first.any(axis=(1, 2))).max())
    s = top - 2
    jj, ii = np.nonzero(first[s])
    negative.AddControlPointWorld(vtk_point(case.world((ii.mean(), jj.mean(), s))))
    summary = case.logic.correctWithPoints(case.volume, case.segmentation, "target", positive, negative)
    assert summary["corrected"] == [s] and s in summary["drawn"]
    second = segments.readSegment(case.segmentation, "target", case.volume)
    assert not second[s:].any() and np.array_equal(second[:s - 1], first[:s - 1])
    positive.AddControlPointWorld(vtk_point(case.world((ii.mean(), jj.mean(), s))))
    case.logic.correctWithPoints(case.volume, case.segmentation, "target", positive, negative)
    third = segments.readSegment(case.segmentation, "target", case.volume)
    assert 2 * (third[s] & case.truth[s]).sum() / (third[s].sum() + case.truth[s].sum()) > 0.9
    case.check()


def test_a_leak_erased_in_the_segment_editor_ends_the_structure_there():
    """The image seems to go on past the ball (a bright column to the volume's edge): the result leaks.  The user
    erases the first leaked slice in the Segment Editor and re-propagates: that slice is a slice drawn empty, and
    nothing is left past it."""
    case = Case()
    top = int(np.flatnonzero(case.truth.any(axis=(1, 2))).max())
    image = slicer.util.arrayFromVolume(case.volume)
    image[top + 1:][:, case.truth[top].astype(bool)] = 1.0
    slicer.util.arrayFromVolumeModified(case.volume)
    case.draw_slice()
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    leaked = segments.readSegment(case.segmentation, "target", case.volume)
    assert leaked[top + 1:].any(axis=(1, 2)).all()
    leaked[top + 1] = 0
    draw(case.segmentation, "target", leaked, case.volume)
    summary = case.logic.repropagate(case.volume, case.segmentation, "target")
    assert summary["corrected"] == [top + 1]
    result = segments.readSegment(case.segmentation, "target", case.volume)
    assert not result[top + 1:].any() and np.array_equal(result, case.truth)


def _template_case(shape=SHAPE):
    """This volume (``Case``) and a template patient's volume of the same ``shape`` with its drawn segment, the ball
    a few voxels away from this volume's."""
    case = Case(SHIFT_R, shape=shape, ball_ijk=(*BALL_IJK[:2], min(BALL_IJK[2], shape[0] // 2)))
    template_k = min(16, shape[0] // 2)
    template_image, template_truth = ball_image(shape, IJK_TO_RAS, (IJK_TO_RAS @ [22, 38, template_k, 1.0])[:3],
                                                RADIUS)
    template = add_volume(case.scene, template_image, IJK_TO_RAS, "template")
    template_seg = add_segmentation(case.scene, ["drawn"], reference=template, name="template segmentation")
    draw(template_seg, "drawn", template_truth, template)
    return case, template, template_seg


def test_template_mode_registers_another_volumes_segment_and_propagates():
    """Template mode: the template patient's segment is registered to this volume (the two volumes in one scene,
    one under a transform) and seeds the engine."""
    case, template, template_seg = _template_case()
    messages = []
    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, templateVolumeNode=template,
                                 templateSegmentationNode=template_seg, templateSegmentId="drawn",
                                 progressCallback=lambda result=None, message=None: messages.append(message))
    assert summary["drawn"] == [] and not summary["cancelled"]
    assert any(m and m.startswith("Registering the template") for m in messages)
    case.check()


def test_cancel_during_the_template_registration_writes_nothing():
    case, template, template_seg = _template_case()
    counts = node_counts(case.scene)

    def progress(result=None, message=None):
        return not (message or "").startswith("Registering")

    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, templateVolumeNode=template,
                                 templateSegmentationNode=template_seg, templateSegmentId="drawn",
                                 progressCallback=progress)
    assert summary["cancelled"] and summary["computed"] == 0
    assert len(segment_voxels_world(case.segmentation, "target")[0]) == 0 and node_counts(case.scene) == counts
    assert not case.logic.canUndo(case.segmentation)


def test_template_mode_on_a_short_stack_fits_each_slice_and_can_be_cancelled_there():
    """A short stack (16 slices, as a cardiac cine MRI): after the affine, each slice is fitted on its own
    (``template.refine_slicewise``), with its own progress message; cancelling there writes nothing either."""
    case, template, template_seg = _template_case(shape=(16, 64, 64))
    counts = node_counts(case.scene)
    messages = []

    def progress(result=None, message=None):
        messages.append(message or "")
        return not (message or "").startswith("Fitting the template")

    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, templateVolumeNode=template,
                                 templateSegmentationNode=template_seg, templateSegmentId="drawn",
                                 progressCallback=progress)
    assert summary["cancelled"] and summary["computed"] == 0
    assert any(m.startswith("Registering the template") for m in messages)
    assert "slice by slice" in messages[-1]
    assert len(segment_voxels_world(case.segmentation, "target")[0]) == 0 and node_counts(case.scene) == counts


# ------------------------------------------------------------------------------------------------ the effect's write

def test_the_segment_editor_effect_writes_in_the_segmentations_coordinates(monkeypatch):
    """The effect's own ``_write`` (its module imported with stand-ins for Qt and the effect base class): the
    modifier labelmap is resampled onto the editor's modifier geometry, which lives in the segmentation's
    coordinates, and set into the selected segment (``modifySelectedSegmentByLabelmap``'s job in Slicer)."""
    import importlib
    import sys
    import types

    case = Case(SHIFT_R, ROTATE, geometry=None)
    case.draw_slice()
    qt = types.ModuleType("qt")
    base = types.ModuleType("SegmentEditorEffects")
    abstract = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")
    abstract.AbstractScriptedSegmentEditorEffect = type("AbstractScriptedSegmentEditorEffect", (), {
        "__init__": lambda self, scriptedEffect: setattr(self, "scriptedEffect", scriptedEffect)})
    base.AbstractScriptedSegmentEditorEffect = abstract.AbstractScriptedSegmentEditorEffect
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    for name, module in (("qt", qt), ("SegmentEditorEffects", base), ("slicer.i18n", i18n),
                         ("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect", abstract)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(ModificationModeSet=1),
                        raising=False)
    effect_module = importlib.import_module("SegmentEditorOnePromptLib.SegmentEditorEffect")

    class ScriptedEffect:
        """What the effect asks of qSlicerSegmentEditorScriptedEffect, on real MRML."""
        name = title = ""
        perSegment = requireSegments = True
        undo_states = 0

        def parameter(self, name):
            return {"SliceView": "Red"}.get(name, "")

        def defaultModifierLabelmap(self):  # the segmentation's reference geometry, in its own coordinates
            geometry = slicer.vtkOrientedImageData()
            converter = slicer.vtkSegmentationConverter
            converter.DeserializeImageGeometry(case.segmentation.GetSegmentation().GetConversionParameter(
                converter.GetReferenceImageGeometryParameterName()), geometry)
            return geometry

        def saveStateForUndo(self):
            self.undo_states += 1

        def modifySelectedSegmentByLabelmap(self, labelmap, mode):
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            assert logic.SetBinaryLabelmapToSegment(labelmap, case.segmentation, "target", logic.MODE_REPLACE)

    scripted = ScriptedEffect()
    effect = effect_module.SegmentEditorEffect(scripted)
    axis = effect._axis(case.volume, case.segmentation, "target")
    assert axis == 2
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, axis=axis, writer=effect._write)
    assert scripted.undo_states == 1
    case.check(min_dice=0.93)  # resampled once more, onto the reference geometry


# ------------------------------------------------------------------------------------------------ storage

def test_the_result_saves_and_loads_as_seg_nrrd(tmp_path):
    case = Case(None, ROTATE)
    case.draw_slice()
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    case.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(case.segmentation)
    scene = new_scene()
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert reader.ReadData(loaded)
    segment_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("target")
    # the file holds the segment in the segmentation's own coordinates: the transform is the scene's, not the file's
    points, _ = segment_voxels_world(loaded, segment_id)
    world = (world_of(case.segmentation) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    assert np.linalg.norm(world.mean(axis=0) - case.center) <= 0.8


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_gets_a_clear_message_and_changes_nothing():
    case = Case()
    logic = case.logic
    counts = node_counts(case.scene)
    with pytest.raises(InputError, match="Select the image volume"):
        logic.segment(None, case.segmentation, "target", PROMPT_MASK)
    with pytest.raises(InputError, match="Select a segment"):
        logic.segment(case.volume, case.segmentation, "missing", PROMPT_MASK)
    with pytest.raises(PromptError, match="segment is empty"):
        logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    empty_points = case.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "none")
    with pytest.raises(PromptError, match="positive point"):
        logic.segment(case.volume, case.segmentation, "target", PROMPT_POINTS, positivePoints=empty_points)
    outside = case.points([case.world((-30, 10, 10)), case.world((10, 10, 90))], "outside")
    with pytest.raises(InputError, match="inside the volume"):
        logic.segment(case.volume, case.segmentation, "target", PROMPT_POINTS, positivePoints=outside)
    roi = case.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "elsewhere")
    roi.SetCenter(*case.world((200, 200, case.k)))
    roi.SetSize(10, 10, 1)
    with pytest.raises(GeometryError, match="ROI does not overlap"):
        logic.segment(case.volume, case.segmentation, "target", PROMPT_BOX, roiNode=roi)
    with pytest.raises(InputError, match="Nothing to re-propagate"):
        logic.repropagate(case.volume, case.segmentation, "target")
    not_markups = lambda c: {k: v for k, v in c.items() if not k.startswith("vtkMRMLMarkups")}  # noqa: E731
    assert not_markups(node_counts(case.scene)) == not_markups(counts)  # only the markups the test placed
    assert len(segment_voxels_world(case.segmentation, "target")[0]) == 0


def test_volumes_that_are_not_a_scalar_image_are_refused():
    case = Case()
    case.draw_slice()
    rgb = add_volume(case.scene, np.zeros(SHAPE + (3,), np.uint8), IJK_TO_RAS, "photo",
                     node_class="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components.*Vector to Scalar"):
        case.logic.segment(rgb, case.segmentation, "target", PROMPT_MASK)
    labels = add_volume(case.scene, case.truth, IJK_TO_RAS, "labels", node_class="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="label map"):
        case.logic.segment(labels, case.segmentation, "target", PROMPT_MASK)
    case.segmentation.GetSegmentation().SetSourceRepresentationName("Closed surface")
    with pytest.raises(InputError, match="Closed surface.*binary labelmap"):
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)


def test_a_single_slice_volume_segments_that_slice():
    case = Case(shape=(1, 64, 64), ball_ijk=(20, 40, 0))
    case.draw_slice(0)
    summary = case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK)
    assert summary["computed"] == 0 and summary["drawn"] == [0]
    assert np.array_equal(segments.readSegment(case.segmentation, "target", case.volume), case.truth)
    points = case.points([case.center])
    case.logic.segment(case.volume, case.segmentation, "target", PROMPT_POINTS, positivePoints=points)
    result = segments.readSegment(case.segmentation, "target", case.volume)
    assert 2 * (result & case.truth).sum() / (result.sum() + case.truth.sum()) > 0.95


@pytest.mark.parametrize("removed", ["segment", "volume", "segmentation"])
def test_removing_a_node_during_the_run_writes_nothing(removed):
    case = Case()
    case.draw_slice()
    before = segment_voxels_world(case.segmentation, "target")[0].copy()

    def progress(result=None, message=None):
        if result is not None and result.done == 2:
            if removed == "segment":
                case.segmentation.GetSegmentation().RemoveSegment("target")
            else:
                case.scene.RemoveNode(case.volume if removed == "volume" else case.segmentation)
        return True

    with pytest.raises(InputError, match="removed during the run: nothing was written"):
        case.logic.segment(case.volume, case.segmentation, "target", PROMPT_MASK, progressCallback=progress)
    if removed == "volume":
        assert np.array_equal(segment_voxels_world(case.segmentation, "target")[0], before)
    assert not case.logic.hasRun(case.segmentation, "target")


# ------------------------------------------------------------------------------------------------ cost of writing

def test_writing_a_large_result_is_quick_and_uses_no_temporary_node():
    """512 x 512 x 300 (the figure in docs/BENCHMARKS.md comes from ``python Testing/test_mrml_adapter.py``)."""
    seconds, extra_nodes = _time_large_write()
    assert seconds < 20 and extra_nodes == 0


def _time_large_write(shape=(300, 512, 512)) -> tuple:
    scene = new_scene()
    volume = add_volume(scene, np.zeros(shape, np.int16), IJK_TO_RAS, "large")
    segmentation = add_segmentation(scene, ["target"], reference=volume)
    result = np.zeros(shape, np.uint8)
    result[100:200, 150:350, 150:350] = 1
    counts = node_counts(scene)
    t0 = time.perf_counter()
    segments.writeSegment(result, volume, segmentation, "target")
    seconds = time.perf_counter() - t0
    extra = sum(node_counts(scene).values()) - sum(counts.values())
    return seconds, extra


if __name__ == "__main__":
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds, extra = _time_large_write()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"write 300x512x512 into a segment: {seconds:.2f} s, peak RSS {peak:.0f} MB "
          f"(before the volume {rss0:.0f} MB), extra nodes {extra}")
