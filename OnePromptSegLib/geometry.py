"""Coordinate helpers between Slicer's RAS world and a volume's voxel indices (pure numpy, no Slicer).

Slicer describes a volume by its IJKToRAS 4x4 matrix (column a of the 3x3 part is IJK axis a's direction times its
spacing) and a slice view by its normal in RAS.  These helpers find which IJK axis a view slices along, which slice a
point lies on, and the voxel box a markups ROI covers on that slice.  Voxel indices are continuous: integer values are
voxel centres.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Triple = Tuple[float, float, float]

_VIEW_NORMALS = {"red": (0.0, 0.0, 1.0), "yellow": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0)}


class GeometryError(ValueError):
    """Geometry that cannot be used as asked (oblique volume, ROI outside the volume ...); the message says why."""


def _points(points: np.ndarray) -> np.ndarray:
    """``points`` as a float (N, 3) array, or GeometryError."""
    p = np.asarray(points, dtype=float)
    if p.ndim not in (1, 2) or p.shape[-1] != 3:
        raise GeometryError(f"points must have shape (3,) or (N, 3), got {p.shape}")
    return np.atleast_2d(p)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (3,) or (N, 3), keeping that shape."""
    p = _points(points)
    m = np.asarray(matrix, dtype=float)
    out = p @ m[:3, :3].T + m[:3, 3]
    return out[0] if np.ndim(points) == 1 else out


def ijk_to_ras(points_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel indices (i, j, k) -> RAS millimetres; shape (3,) or (N, 3) is kept."""
    return _apply(ijk_to_ras, points_ijk)


def ras_to_ijk(points_ras: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS millimetres -> continuous voxel indices (i, j, k); shape (3,) or (N, 3) is kept."""
    try:
        inverse = np.linalg.inv(np.asarray(ijk_to_ras, dtype=float))
    except np.linalg.LinAlgError as e:
        raise GeometryError("the volume's IJK-to-RAS matrix is singular (zero spacing?)") from e
    return _apply(inverse, points_ras)


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """LPS (DICOM, ITK) <-> RAS (Slicer): negate the first two coordinates; shape (3,) or (N, 3) is kept."""
    p = np.array(points, dtype=float)
    _points(p)
    p[..., :2] *= -1
    return p


ras_to_lps = lps_to_ras


def _axis_directions(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unit RAS directions of the IJK axes, one per column."""
    cols = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms == 0):
        raise GeometryError("the volume's IJK-to-RAS matrix has a zero axis (zero spacing?)")
    return cols / norms


def slice_axis_for_normal(normal_ras: Sequence[float], ijk_to_ras: np.ndarray, tolerance_deg: float = 5.0) -> int:
    """The IJK axis (0=i, 1=j, 2=k) most parallel to a slice view's normal.

    The model segments whole voxel slices, so the view must cut the volume along one of its axes: an angle above
    ``tolerance_deg`` raises GeometryError telling the user how to align volume and view.
    """
    n = np.asarray(normal_ras, dtype=float)
    length = np.linalg.norm(n)
    if n.shape != (3,) or length == 0:
        raise GeometryError(f"the slice view normal must be a non-zero 3-vector, got {normal_ras!r}")
    cosines = np.abs((n / length) @ _axis_directions(ijk_to_ras))
    axis = int(np.argmax(cosines))
    angle = float(np.degrees(np.arccos(min(cosines[axis], 1.0))))
    if angle > tolerance_deg:
        raise GeometryError(f"the volume is oblique to this slice view by {angle:.1f} degrees (tolerance "
                            f"{tolerance_deg:g}); reslice the volume (Resample Scalar/Vector/DWI Volume, or "
                            "Transforms > Harden) or align the view to the volume (slice view menu: Rotate to volume "
                            "plane)")
    return axis


def view_name_to_default_normal(name: str) -> Triple:
    """Default RAS normal of a Slicer slice view: Red = axial (0,0,1), Yellow = sagittal (1,0,0), Green = coronal."""
    try:
        return _VIEW_NORMALS[str(name).lower()]
    except KeyError:
        raise GeometryError(f"unknown slice view {name!r}; use Red, Yellow or Green") from None


def slice_index_for_ras(point_ras: Sequence[float], ijk_to_ras: np.ndarray, axis: int) -> int:
    """Index of the slice along IJK ``axis`` nearest to a RAS point (may lie outside the volume; callers check)."""
    return int(np.floor(ras_to_ijk(np.asarray(point_ras, dtype=float), ijk_to_ras)[axis] + 0.5))


def ijk_box_from_ras_corners(corners_ras: np.ndarray, ijk_to_ras: np.ndarray, axis: int, slice_index: int,
                             volume_shape_kji: Sequence[int]) -> Tuple[Triple, Triple]:
    """Voxel box (two opposite (i, j, k) corners) that a markups ROI covers on one slice.

    The ROI's corners (e.g. from :func:`roi_corners`) are mapped to IJK; their in-plane bounds are clamped to the
    volume ([0, n-1]) and the ``axis`` coordinate is set to ``slice_index``.  Raises GeometryError when the ROI misses
    the volume in-plane or the slice is outside the volume.
    """
    ijk = ras_to_ijk(_points(corners_ras), ijk_to_ras)
    sizes = [int(n) for n in volume_shape_kji][::-1]  # (n_i, n_j, n_k)
    if not 0 <= slice_index < sizes[axis]:
        raise GeometryError(f"slice {slice_index} is outside the volume (0..{sizes[axis] - 1} along "
                            f"{'ijk'[axis]}); move the view onto the volume")
    lo, hi = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for a in range(3):
        if a == axis:
            lo[a] = hi[a] = float(slice_index)
            continue
        a_min, a_max = float(ijk[:, a].min()), float(ijk[:, a].max())
        # The volume covers [-0.5, n - 0.5] in continuous indices (voxel edges).
        if a_max < -0.5 or a_min > sizes[a] - 0.5:
            raise GeometryError("the ROI does not overlap the volume on this slice; place the ROI over the image")
        lo[a], hi[a] = max(a_min, 0.0), min(a_max, sizes[a] - 1.0)
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


def roi_corners(center_ras: Sequence[float], size_ras: Sequence[float],
                roi_to_ras: Optional[np.ndarray] = None) -> np.ndarray:
    """The 8 corners (8, 3) in RAS of a box of ``size_ras`` (mm, along its own axes) centred on ``center_ras``.

    ``roi_to_ras`` (4x4, optional) orients the box: its 3x3 part's normalised columns are the box axes in RAS (its
    translation is ignored: the centre is ``center_ras``).  Without it the box is aligned with RAS.
    """
    half = np.asarray(size_ras, dtype=float) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    local = signs * half
    if roi_to_ras is not None:
        local = local @ _axis_directions(roi_to_ras).T
    return local + np.asarray(center_ras, dtype=float)
