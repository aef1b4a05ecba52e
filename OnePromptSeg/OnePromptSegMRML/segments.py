"""A segment read onto a volume's voxel grid and written back, in world coordinates, with no temporary node.

``slicer.util.arrayFromSegmentBinaryLabelmap`` and ``updateSegmentBinaryLabelmapFromArray`` go through a temporary
label map volume node (each leaves a display node behind) and apply the volume's parent transform on top of geometry
that already includes it.  Here a segment's binary labelmap (``vtkOrientedImageData``, in the segmentation node's
own coordinates) is resampled onto the volume's grid expressed in those coordinates, and a result is written as a
labelmap with that same geometry (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``).  Whatever the
segmentation's reference geometry (finer, coarser, cropped) or the two nodes' linear transforms, a voxel keeps its
place in the world.
"""
import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .messages import InputError, _
from .volumes import ijkToWorld, nodeToWorld

BINARY_LABELMAP = "Binary labelmap"


def _matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(np.asarray(array, dtype=float).ravel())
    return matrix


def volumeGridInSegmentation(volumeNode, segmentationNode) -> np.ndarray:
    """4x4 from the volume's IJK to the segmentation node's own coordinates (where its labelmaps live)."""
    return np.linalg.inv(nodeToWorld(segmentationNode)) @ ijkToWorld(volumeNode)


def orientedImageOnVolumeGrid(array: np.ndarray, volumeNode, segmentationNode) -> "slicer.vtkOrientedImageData":
    """A uint8 (k, j, i) array on the volume's grid as a labelmap in the segmentation's coordinates: what
    ``SetBinaryLabelmapToSegment`` and a Segment Editor effect's modifier labelmap expect."""
    array = np.ascontiguousarray(np.asarray(array) > 0, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetImageToWorldMatrix(_matrix(volumeGridInSegmentation(volumeNode, segmentationNode)))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    return image


def checkSegment(segmentationNode, segmentId: str) -> None:
    """InputError unless the segment exists."""
    if segmentationNode is None or not segmentId or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise InputError(_("Select a segment (Segment Editor: Add) to hold the result or the prompt."))


def checkEditable(segmentationNode) -> None:
    """InputError unless the segmentation stores binary labelmaps (what a result is written as): a segmentation
    made of closed surfaces would lose its surfaces' detail, so the user converts it, as the Segment Editor asks."""
    source = segmentationNode.GetSegmentation().GetSourceRepresentationName()
    if source != BINARY_LABELMAP:
        raise InputError(_("The segmentation '{name}' is stored as '{source}', not as a binary labelmap: open it in "
                           "the Segment Editor (which offers to convert it) or in Segmentations > Representations, "
                           "then try again.").format(name=segmentationNode.GetName(), source=source))


def readSegment(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """The segment as uint8 (k, j, i) on the volume's grid (zeros where it is empty or outside)."""
    checkSegment(segmentationNode, segmentId)
    shape = slicer.util.arrayFromVolume(volumeNode).shape[:3]
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] \
            or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(shape[2], shape[1], shape[0])
    reference.SetImageToWorldMatrix(_matrix(volumeGridInSegmentation(volumeNode, segmentationNode)))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False):
        raise InputError(_("The segment could not be read on the volume's grid."))
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    return (values.reshape(shape) > 0).astype(np.uint8)


def writeSegment(array: np.ndarray, volumeNode, segmentationNode, segmentId: str) -> None:
    """Replace the segment's content with ``array`` (uint8 (k, j, i) on the volume's grid); other segments keep
    theirs."""
    checkSegment(segmentationNode, segmentId)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(orientedImageOnVolumeGrid(array, volumeNode, segmentationNode),
                                            segmentationNode, segmentId, logic.MODE_REPLACE):
        raise InputError(_("The result could not be written into segment '{id}'.").format(id=segmentId))
