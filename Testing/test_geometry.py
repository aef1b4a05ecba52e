"""Tests for OnePromptSegLib.geometry with hand-worked matrices (no Slicer)."""
from __future__ import annotations

import numpy as np
import pytest

from OnePromptSegLib import geometry as g
from OnePromptSegLib.geometry import GeometryError

RED, YELLOW, GREEN = (g.view_name_to_default_normal(n) for n in ("Red", "Yellow", "Green"))


def affine(columns, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """IJKToRAS with the given axis vectors (i, j, k columns, spacing included) and origin."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(columns, float).T
    m[:3, 3] = origin
    return m


def rotation_about_a(deg: float) -> np.ndarray:
    """4x4 rotation about the R (x) axis."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = np.eye(4)
    m[1:3, 1:3] = [[c, -s], [s, c]]
    return m


# Axial acquisition, anisotropic: i along R (0.5 mm), j along A (0.5 mm), k along S (3 mm).
AXIAL = affine([(0.5, 0, 0), (0, 0.5, 0), (0, 0, 3.0)], origin=(-10, -20, -30))
# Sagittal acquisition: i along A, j along -S (rows go down), k along R (slices left to right).
SAGITTAL = affine([(0, 1.0, 0), (0, 0, -1.0), (2.0, 0, 0)], origin=(-40, -50, 60))


def test_view_normals():
    assert (RED, YELLOW, GREEN) == ((0, 0, 1), (1, 0, 0), (0, 1, 0))
    assert g.view_name_to_default_normal("red") == RED
    with pytest.raises(GeometryError, match="unknown slice view 'Blue'"):
        g.view_name_to_default_normal("Blue")


def test_identity():
    np.testing.assert_allclose(g.ijk_to_ras([1, 2, 3], np.eye(4)), [1, 2, 3])
    np.testing.assert_allclose(g.ras_to_ijk([1, 2, 3], np.eye(4)), [1, 2, 3])


def test_anisotropic_spacing_hand_worked():
    # (i, j, k) = (2, 4, 1) -> (-10 + 1, -20 + 2, -30 + 3)
    np.testing.assert_allclose(g.ijk_to_ras([2, 4, 1], AXIAL), [-9, -18, -27])
    np.testing.assert_allclose(g.ras_to_ijk([-9, -18, -27], AXIAL), [2, 4, 1])


def test_rotation_about_s_hand_worked():
    # 90 degrees about S: i points to A, j points to L (-R); spacing 1, 2, 3.
    m = affine([(0, 1, 0), (-2, 0, 0), (0, 0, 3)], origin=(5, 6, 7))
    np.testing.assert_allclose(g.ijk_to_ras([1, 1, 1], m), [5 - 2, 6 + 1, 7 + 3])
    np.testing.assert_allclose(g.ras_to_ijk([3, 7, 10], m), [1, 1, 1])


def test_nifti_like_lps_matrix_to_ras():
    # An ITK/DICOM (LPS) IJK matrix with identity direction is, in RAS, flipped on the first two axes.
    ijk_to_lps = affine([(0.8, 0, 0), (0, 0.8, 0), (0, 0, 2.0)], origin=(100, 120, -50))
    ijk_to_ras = np.diag([-1.0, -1, 1, 1]) @ ijk_to_lps
    np.testing.assert_allclose(g.ijk_to_ras([10, 5, 2], ijk_to_ras), [-108, -124, -46])
    np.testing.assert_allclose(g.lps_to_ras(g.ijk_to_ras([10, 5, 2], ijk_to_lps)), [-108, -124, -46])
    np.testing.assert_allclose(g.ras_to_lps([[1, 2, 3], [-4, 5, -6]]), [[-1, -2, 3], [4, -5, -6]])
    pts = np.array([1.0, 2.0, 3.0])
    g.lps_to_ras(pts)
    np.testing.assert_array_equal(pts, [1, 2, 3])  # input not modified


@pytest.mark.parametrize("m", [AXIAL, SAGITTAL, rotation_about_a(33) @ AXIAL])
def test_round_trip(m):
    x = np.random.default_rng(0).uniform(-5, 50, (10, 3))
    np.testing.assert_allclose(g.ras_to_ijk(g.ijk_to_ras(x, m), m), x, atol=1e-9)
    assert g.ras_to_ijk(x[0], m).shape == (3,) and g.ras_to_ijk(x, m).shape == (10, 3)


def test_bad_inputs():
    with pytest.raises(GeometryError, match="shape"):
        g.ras_to_ijk([1, 2], np.eye(4))
    with pytest.raises(GeometryError, match="singular"):
        g.ras_to_ijk([1, 2, 3], np.zeros((4, 4)))
    with pytest.raises(GeometryError, match="non-zero"):
        g.slice_axis_for_normal((0, 0, 0), AXIAL)


def test_slice_axis_axial_volume():
    assert [g.slice_axis_for_normal(n, AXIAL) for n in (RED, YELLOW, GREEN)] == [2, 0, 1]
    assert g.slice_axis_for_normal((0, 0, -1), AXIAL) == 2  # flipped normal: same axis


def test_slice_axis_sagittal_volume():
    # The red (axial) view cuts a sagittal acquisition along j (rows), the yellow view along k (its slices).
    assert [g.slice_axis_for_normal(n, SAGITTAL) for n in (RED, YELLOW, GREEN)] == [1, 2, 0]


def test_slice_axis_oblique_volume():
    assert g.slice_axis_for_normal(RED, rotation_about_a(2) @ AXIAL) == 2
    with pytest.raises(GeometryError, match=r"oblique to this slice view by 10.0 degrees \(tolerance 5\)"):
        g.slice_axis_for_normal(RED, rotation_about_a(10) @ AXIAL)
    assert g.slice_axis_for_normal(RED, rotation_about_a(10) @ AXIAL, tolerance_deg=12) == 2


def test_slice_index_for_ras():
    assert g.slice_index_for_ras((0, 0, -30 + 3 * 4.4), AXIAL, 2) == 4
    assert g.slice_index_for_ras((0, 0, -30 + 3 * 4.6), AXIAL, 2) == 5
    # Sagittal volume: k runs along R from -40 in 2 mm steps.
    assert g.slice_index_for_ras((-33, 0, 0), SAGITTAL, 2) == 4  # (-33 + 40) / 2 = 3.5 -> 4


def test_roi_corners():
    c = g.roi_corners((1, 2, 3), (2, 4, 6))
    assert c.shape == (8, 3)
    np.testing.assert_allclose(c.min(axis=0), [0, 0, 0])
    np.testing.assert_allclose(c.max(axis=0), [2, 4, 6])
    # Rotated 90 degrees about R: the box's y size lies along S, its z size along A.
    rotated = g.roi_corners((0, 0, 0), (2, 4, 6), rotation_about_a(90))
    np.testing.assert_allclose(rotated.max(axis=0), [1, 3, 2], atol=1e-12)


def test_ijk_box_clamped_to_volume():
    shape_kji = (10, 40, 30)  # n_i = 30, n_j = 40, n_k = 10
    # In IJK: i from -4 to 10, j from 20 to 60 (clamped to 0 and 39), through-plane ignored.
    center = g.ijk_to_ras([3, 40, 5], AXIAL)
    corners = g.roi_corners(center, (7.0, 20.0, 100.0))
    lo, hi = g.ijk_box_from_ras_corners(corners, AXIAL, 2, 5, shape_kji)
    np.testing.assert_allclose(lo, (0, 20, 5))
    np.testing.assert_allclose(hi, (10, 39, 5))


def test_ijk_box_on_sagittal_volume_red_view():
    corners = g.roi_corners(g.ijk_to_ras([5, 3, 7], SAGITTAL), (4.0, 4.0, 4.0))
    # Red view -> axis j; i (A, 1 mm) spans 3..7, k (R, 2 mm) spans 6..8.
    lo, hi = g.ijk_box_from_ras_corners(corners, SAGITTAL, 1, 3, (20, 20, 20))
    np.testing.assert_allclose(lo, (3, 3, 6))
    np.testing.assert_allclose(hi, (7, 3, 8))


def test_ijk_box_errors():
    far = g.roi_corners(g.ijk_to_ras([100, 5, 5], AXIAL), (5, 5, 5))
    with pytest.raises(GeometryError, match="does not overlap"):
        g.ijk_box_from_ras_corners(far, AXIAL, 2, 5, (10, 40, 30))
    near = g.roi_corners(g.ijk_to_ras([5, 5, 5], AXIAL), (5, 5, 5))
    with pytest.raises(GeometryError, match="outside the volume"):
        g.ijk_box_from_ras_corners(near, AXIAL, 2, 10, (10, 40, 30))
