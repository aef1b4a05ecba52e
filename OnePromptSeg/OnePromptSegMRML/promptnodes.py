"""Slicer nodes -> the library's prompts on a volume's voxel grid.

Four prompt kinds, as the module offers them: the drawn slices of a segment (masks), positive and negative point
lists (clicks), a markups ROI (a box on the slice through its centre) and painted scribbles (doodles).  Points and
ROIs are read in world coordinates and mapped through the volume's IJK-to-world matrix (parent transform included).
"""
from typing import List, Optional, Set, Tuple

import numpy as np

import slicer
from OnePromptSegLib import geometry, prompts

from .messages import InputError, _
from .segments import readSegment

PROMPT_MASK = "Mask: drawn slices of the segment"
PROMPT_POINTS = "Points: positive / negative point lists"
PROMPT_BOX = "Box: markups ROI"
PROMPT_SCRIBBLES = "Scribbles: painted foreground / background segments"
PROMPT_TYPES = [PROMPT_MASK, PROMPT_POINTS, PROMPT_BOX, PROMPT_SCRIBBLES]


def _definedPoints(markupsNode) -> List[int]:
    """Indices of a point list's control points whose position is defined (placed, not being placed)."""
    if markupsNode is None:
        return []
    return [i for i in range(markupsNode.GetNumberOfControlPoints())
            if markupsNode.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionDefined]


def pointsWorld(markupsNode) -> np.ndarray:
    """(N, 3) world positions of a point list's defined control points (none for no node)."""
    points = []
    for i in _definedPoints(markupsNode):
        p = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(i, p)
        points.append(p)
    return np.array(points, dtype=float).reshape(-1, 3)


def pointIds(markupsNode) -> List[str]:
    """The control point IDs of ``pointsWorld``'s points, in the same order (stable when points are removed)."""
    return [markupsNode.GetNthControlPointID(i) for i in _definedPoints(markupsNode)]


def insideVolume(ijk: np.ndarray, shape_kji: Tuple[int, ...]) -> np.ndarray:
    """Per point: inside the volume's voxels (continuous indices within [-0.5, n - 0.5] on every axis)."""
    sizes = np.array(shape_kji[::-1], dtype=float)
    return ((ijk >= -0.5) & (ijk <= sizes - 0.5)).all(axis=1)


def buildPrompts(promptType: str, volumeNode, image: np.ndarray, ijkToWorld: np.ndarray, axis: int,
                 segmentationNode=None, segmentId: Optional[str] = None, positivePoints=None, negativePoints=None,
                 roiNode=None, scribbleSegmentationNode=None, scribbleForegroundId: Optional[str] = None,
                 scribbleBackgroundId: Optional[str] = None) -> Tuple[List, Set[int]]:
    """Nodes -> (prompts on ``volumeNode``'s grid along IJK ``axis``, the slices the user drew).

    Raises PromptError / InputError / GeometryError with a message that says what to do; nothing is changed.
    """
    naxis = 2 - axis
    if promptType == PROMPT_MASK:
        drawing = readSegment(segmentationNode, segmentId, volumeNode)
        if not drawing.any():
            raise prompts.PromptError(_("The segment is empty: draw the structure on one slice first (Segment "
                                        "Editor: Paint or Draw), or choose another prompt type."))
        masks = prompts.masks_from_label_volume(drawing, axis)
        return masks, {m.slice_index for m in masks}
    if promptType == PROMPT_POINTS:
        pos, neg = pointsWorld(positivePoints), pointsWorld(negativePoints)
        if not len(pos):
            raise prompts.PromptError(_("Place at least one positive point on the structure."))
        allPoints = np.concatenate([pos, neg])
        ijk = np.atleast_2d(geometry.ras_to_ijk(allPoints, ijkToWorld))
        inside = insideVolume(ijk, image.shape)
        if not inside[:len(pos)].any():
            raise InputError(_("No positive point lies inside the volume '{name}': place the points on the image "
                               "(check that the point list and the volume are under the same transform).").format(
                                   name=volumeNode.GetName()))
        labels = np.array([1] * len(pos) + [0] * len(neg))
        return prompts.clicks_by_slice(ijk[inside], labels[inside].tolist(), axis), set()
    if promptType == PROMPT_BOX:
        if roiNode is None:
            raise prompts.PromptError(_("Select or place a markups ROI around the structure on one slice."))
        center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        roiNode.GetCenterWorld(center)
        roiNode.GetSizeWorld(size)
        roiToWorld = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
        corners = geometry.roi_corners(center, size, roiToWorld)
        s = geometry.slice_index_for_ras(center, ijkToWorld, axis)
        c0, c1 = geometry.ijk_box_from_ras_corners(corners, ijkToWorld, axis, s, image.shape)
        return [prompts.BBox.from_ijk(c0, c1, axis)], set()
    if promptType == PROMPT_SCRIBBLES:
        if scribbleBackgroundId and scribbleBackgroundId == scribbleForegroundId:
            raise prompts.PromptError(_("Background scribbles must be in another segment than the foreground."))
        fg = readSegment(scribbleSegmentationNode, scribbleForegroundId, volumeNode)
        bg = (readSegment(scribbleSegmentationNode, scribbleBackgroundId, volumeNode)
              if scribbleBackgroundId else np.zeros_like(fg))
        slices = np.flatnonzero(fg.any(axis=tuple(d for d in range(3) if d != naxis)))
        if not len(slices):
            raise prompts.PromptError(_("The foreground scribble segment is empty: paint on the structure first."))
        return [prompts.Doodle(int(s), np.take(fg, s, naxis) > 0, np.take(bg, s, naxis) > 0) for s in slices], set()
    raise ValueError(f"unknown prompt type {promptType!r}")
