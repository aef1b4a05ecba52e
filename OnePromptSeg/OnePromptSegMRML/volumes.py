"""Volumes and slice views -> arrays and geometry.

A volume's voxels come as a (k, j, i) array (``slicer.util.arrayFromVolume``: a view, no copy in MRML) and its
geometry as a 4x4 IJK-to-world matrix that includes the volume's parent transform, so that prompts placed in world
coordinates (markups, a slice view's plane) land on the voxels the user sees.  A non-linear transform cannot be
folded into one matrix: the user is asked to harden it, and nothing is read.
"""
from typing import List, Tuple

import numpy as np
import vtk

import slicer
from OnePromptSegLib.geometry import slice_axis_for_normal, view_name_to_default_normal

from .messages import InputError, _


def nodeToWorld(node) -> np.ndarray:
    """4x4 from a transformable node's own coordinates to world (its parent transforms); identity without one.

    Raises InputError for a non-linear transform (grid, B-spline, thin-plate): a result could not be placed
    voxel for voxel, so the user must harden it first.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(_("'{name}' is under a non-linear transform ('{transform}'): harden the transform first "
                           "(Data module: right-click the node > Harden transform), then try again.").format(
                               name=node.GetName(), transform=parent.GetName()))
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def ijkToWorld(volumeNode) -> np.ndarray:
    """4x4 IJK -> world RAS of a volume, its parent transform included."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return nodeToWorld(volumeNode) @ slicer.util.arrayFromVTKMatrix(matrix)


def checkImageVolume(volumeNode) -> None:
    """InputError unless ``volumeNode`` is a scalar image with voxels: the engine segments grey values."""
    if volumeNode is None:
        raise InputError(_("Select the image volume to segment."))
    imageData = volumeNode.GetImageData()
    if imageData is None or min(imageData.GetDimensions()) < 1 or imageData.GetPointData().GetScalars() is None:
        raise InputError(_("The volume '{name}' has no image data: load or select another volume.").format(
            name=volumeNode.GetName()))
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(_("'{name}' is a label map, not an image: select the image volume to segment (a label map "
                           "can be imported into a segmentation instead).").format(name=volumeNode.GetName()))
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(_("'{name}' has {n} components per voxel (colour or vector image): convert it to a scalar "
                           "volume first (Vector to Scalar Volume module).").format(name=volumeNode.GetName(),
                                                                                    n=components))


def volumeArray(volumeNode) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """(image (k, j, i) float32, IJK-to-world 4x4, spacing (i, j, k) mm) of a scalar volume."""
    checkImageVolume(volumeNode)
    world = ijkToWorld(volumeNode)
    image = slicer.util.arrayFromVolume(volumeNode).astype(np.float32)
    return image, world, tuple(float(s) for s in volumeNode.GetSpacing())


def sliceNormal(scene, viewName: str) -> List[float]:
    """World normal of a slice view: column 2 of its slice node's SliceToRAS; the view's default orientation
    (Red axial, Yellow sagittal, Green coronal) where the scene has no such slice node."""
    sliceNode = scene.GetNodeByID(f"vtkMRMLSliceNode{viewName}") if scene is not None else None
    if sliceNode is None:
        return list(view_name_to_default_normal(viewName))
    sliceToRas = sliceNode.GetSliceToRAS()
    return [sliceToRas.GetElement(row, 2) for row in range(3)]


def sliceAxis(scene, viewName: str, ijkToWorldMatrix: np.ndarray) -> int:
    """The IJK axis (0 i, 1 j, 2 k) that ``viewName`` slices the volume along; GeometryError if it is oblique."""
    return slice_axis_for_normal(sliceNormal(scene, viewName), ijkToWorldMatrix)


def libraryVolume(volumeNode, image: np.ndarray):
    """The volume as the library's ``io.Volume`` (voxels plus LPS geometry, its parent transform included): what
    template registration works on, in the one physical space both volumes share in the scene."""
    from OnePromptSegLib.io import Volume
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijkToWorld(volumeNode)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return Volume(image, tuple(float(v) for v in spacing), tuple(float(v) for v in lps[:3, 3]),
                  tuple(float(v) for v in direction.ravel()))
