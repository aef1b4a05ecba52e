"""Real MRML scenes for the tests (PyPI's slicer-core: Slicer's own MRML, Segmentations and Markups classes).

Everything MRML here is the real class.  What slicer-core lacks is either done here the way Slicer's application
does it at startup (registering the segmentation converter rules, which Slicer's Segmentations module does), or
replaced by the smallest stand-in (``FRAMEWORK``: Qt and the scripted-module framework, so that the module file
itself can be imported).  Truth is defined in world coordinates and checked through the segment's own labelmap and
the nodes' own transforms, never read back through the code under test.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types
import unittest
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "OnePromptSeg")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)  # as Slicer does for a scripted module: OnePromptSegMRML is importable

_converters_registered = False


def register_segmentation_converters() -> None:
    """Binary labelmap <-> closed surface conversion, as Slicer's Segmentations module registers it at startup
    (without it a segment cannot even be created empty)."""
    global _converters_registered
    if not _converters_registered:
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
        _converters_registered = True


def matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    m.DeepCopy(np.asarray(array, dtype=float).ravel())
    return m


def to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def new_scene() -> "slicer.vtkMRMLScene":
    register_segmentation_converters()
    return slicer.vtkMRMLScene()


def add_volume(scene, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume", parent=None,
               node_class: str = "vtkMRMLScalarVolumeNode"):
    """A volume node holding ``array_kji`` (a copy) with the given IJK-to-RAS matrix, under ``parent``."""
    node = scene.AddNewNodeByClass(node_class, name)
    array = np.ascontiguousarray(array_kji)
    image = vtk.vtkImageData()
    components = 1 if array.ndim == 3 else array.shape[3]
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), components)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.reshape(-1, components).squeeze()
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(matrix(ijk_to_ras))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_linear_transform(scene, to_parent: np.ndarray, name: str = "transform", parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(matrix(to_parent))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_grid_transform(scene, name: str = "warp"):
    """A non-linear (displacement grid) transform: a small smooth shift."""
    grid = vtk.vtkImageData()
    grid.SetOrigin(-100, -100, -100)
    grid.SetSpacing(50, 50, 50)
    grid.SetDimensions(5, 5, 5)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = 1.5
    transform = vtk.vtkGridTransform()
    transform.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def world_of(node) -> np.ndarray:
    """4x4 node coordinates -> world, through the node's real transform nodes (linear only)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    assert parent.GetMatrixTransformToWorld(m)
    return to_array(m)


def volume_ijk_to_world(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return world_of(volume) @ to_array(m)


def add_segmentation(scene, segment_names: Sequence[str], reference=None, parent=None,
                     geometry: Optional[Tuple[Sequence[int], np.ndarray]] = None, name: str = "segmentation"):
    """A segmentation node with empty segments (ids = names), its reference geometry from the volume ``reference``
    or from ``geometry`` = (dimensions (i, j, k), image-to-node 4x4)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    if reference is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    if geometry is not None:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*[int(d) for d in geometry[0]])
        image.SetImageToWorldMatrix(matrix(geometry[1]))
        converter = slicer.vtkSegmentationConverter
        node.GetSegmentation().SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                                      converter.SerializeImageGeometry(image))
    for segment_name in segment_names:
        node.GetSegmentation().AddEmptySegment(segment_name, segment_name)
    return node


def draw(segmentation, segment_id: str, array_kji: np.ndarray, volume) -> None:
    """Set a segment to ``array_kji`` on ``volume``'s voxel grid, placed in the segmentation through both nodes'
    transforms (what a user's drawing in that volume's slices amounts to); computed here, not by the adapter."""
    to_segmentation = np.linalg.inv(world_of(segmentation)) @ volume_ijk_to_world(volume)
    array = np.ascontiguousarray(np.asarray(array_kji) > 0, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetImageToWorldMatrix(matrix(to_segmentation))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE)


def segment_voxels_world(segmentation, segment_id: str) -> Tuple[np.ndarray, float]:
    """World positions (N, 3) of the segment's voxels and one voxel's volume (mm^3), from its own labelmap and the
    node's own transform."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or labelmap.GetPointData().GetScalars() is None:
        return np.zeros((0, 3)), 0.0
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
    kji = np.argwhere(values > 0)
    ijk = kji[:, ::-1] + [extent[0], extent[2], extent[4]]
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    to_world = world_of(segmentation) @ to_array(m)
    points = (to_world @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    return points, abs(float(np.linalg.det(to_world[:3, :3])))


def sphere_dice(segmentation, segment_id: str, center: Sequence[float], radius: float) -> Tuple[float, float]:
    """(Dice of the segment against the ball (center, radius) in world coordinates, distance in mm of the segment's
    centroid from the ball's centre).  The ball's volume is the analytic one."""
    points, voxel = segment_voxels_world(segmentation, segment_id)
    if not len(points):
        return 0.0, float("inf")
    inside = np.linalg.norm(points - np.asarray(center), axis=1) <= radius
    ball = 4.0 / 3.0 * np.pi * radius ** 3
    dice = 2 * inside.sum() * voxel / (len(points) * voxel + ball)
    return float(dice), float(np.linalg.norm(points.mean(axis=0) - np.asarray(center)))


def ball_image(shape_kji: Sequence[int], ijk_to_world: np.ndarray, center: Sequence[float], radius: float
               ) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32 (k, j, i): 1.0 in the ball, 0.2 elsewhere, ball mask uint8) of a volume whose voxels sit at
    ``ijk_to_world`` (parent transforms included): the oracle model segments exactly the bright voxels."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).T
    world = (np.asarray(ijk_to_world) @ ijk1)[:3].T.reshape(*shape_kji, 3)
    ball = (np.linalg.norm(world - np.asarray(center), axis=-1) <= radius).astype(np.uint8)
    image = np.where(ball > 0, 1.0, 0.2).astype(np.float32)
    image.flat[0] = 0.0  # a full [0, 1] range for the engine's per-volume normalisation
    return image, ball


def node_counts(scene) -> dict:
    """{class name: count} of the scene's nodes."""
    counts: dict = {}
    for n in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(n).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ module import

class _Base:
    """Stand-in base class of the scripted-module framework (not in slicer-core)."""

    def __init__(self, *args, **kwargs):
        pass


class _ScriptedTest(unittest.TestCase):
    """Stand-in of ScriptedLoadableModuleTest: a unittest.TestCase whose delayDisplay only logs."""

    def delayDisplay(self, message, *args):
        logging.info(message)


class _ScriptedLogic(_Base):
    def getParameterNode(self):
        raise NotImplementedError("the parameter node needs Slicer's scripted-module framework")


def _framework() -> dict:
    """Stand-ins for what slicer-core lacks and the module file imports: Qt, slicer.i18n, the scripted-module
    framework and the parameter node wrapper."""
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = _Base
    slm.ScriptedLoadableModuleTest = _ScriptedTest
    slm.ScriptedLoadableModuleLogic = _ScriptedLogic
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *args: ("validator", args)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    return {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": slm,
            "slicer.parameterNodeWrapper": pnw, "slicer.i18n": i18n}


@contextlib.contextmanager
def module_with_scene(scene) -> Iterator[types.ModuleType]:
    """Import OnePromptSeg/OnePromptSeg.py on real MRML with ``scene`` as ``slicer.mrmlScene`` (the stand-ins of
    ``_framework`` for the rest); everything is put back afterwards."""
    stand_ins = _framework()
    saved_modules = {k: sys.modules.get(k) for k in list(stand_ins) + ["OnePromptSeg"]}
    saved_attrs = {k: getattr(slicer, k, None) for k in ("mrmlScene", "app", "modules")}
    sys.modules.update(stand_ins)
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(processEvents=lambda: None)
    slicer.modules = types.SimpleNamespace()
    sys.modules.pop("OnePromptSeg", None)
    try:
        yield importlib.import_module("OnePromptSeg")
    finally:
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k, v in saved_attrs.items():
            if v is None:
                if hasattr(slicer, k):
                    delattr(slicer, k)
            else:
                setattr(slicer, k, v)
