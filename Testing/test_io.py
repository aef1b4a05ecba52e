"""Tests for OnePromptSegLib.io on small generated volumes (no Slicer, no data files)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from OnePromptSegLib import io
from OnePromptSegLib.io import Volume, VolumeIOError

# 90 degrees about the S axis (row-major), anisotropic spacing, non-zero origin.
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.8, 1.2, 3.0)
ORIGIN = (10.0, -20.0, 30.0)


def make_volume(shape_kji=(5, 7, 9), dtype=np.int16) -> Volume:
    """A small volume with a non-identity direction and anisotropic spacing."""
    array = (np.arange(np.prod(shape_kji)) % 200).reshape(shape_kji).astype(dtype)
    return Volume(array=array, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


def make_mask(shape_kji=(5, 7, 9)) -> np.ndarray:
    mask = np.zeros(shape_kji, bool)
    mask[1:4, 2:5, 3:8] = True
    mask[2, 0, 0] = True
    return mask


def assert_same_geometry(image: sitk.Image, ref: Volume) -> None:
    np.testing.assert_allclose(image.GetSpacing(), ref.spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ref.origin, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), ref.direction, atol=1e-6)


def test_ijk_to_ras_hand_worked():
    vol = Volume(array=np.zeros((4, 3, 2), np.uint8), spacing=(2.0, 3.0, 4.0), origin=(10.0, 20.0, 30.0),
                 direction=DIRECTION)
    # LPS = origin + D @ (2*i, 3*j, 4*k); for (1, 1, 1): (10 - 3, 20 + 2, 30 + 4) = (7, 22, 34); RAS = (-7, -22, 34).
    lps = vol.ijk_to_lps() @ [1, 1, 1, 1]
    ras = vol.ijk_to_ras() @ [1, 1, 1, 1]
    np.testing.assert_allclose(lps[:3], [7, 22, 34])
    np.testing.assert_allclose(ras[:3], [-7, -22, 34])
    np.testing.assert_allclose(vol.ijk_to_ras()[:3, 3], [-10, -20, 30])
    # Same as SimpleITK's own index -> physical point mapping.
    np.testing.assert_allclose(lps[:3], vol.to_sitk().TransformContinuousIndexToPhysicalPoint((1.0, 1.0, 1.0)))
    assert vol.spacing_kji == (4.0, 3.0, 2.0)


def test_to_sitk_rejects_other_shape():
    with pytest.raises(ValueError, match="does not match"):
        make_volume().to_sitk(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_write_read_label_map_round_trip(tmp_path, ext):
    ref = make_volume()
    mask = make_mask()
    out = tmp_path / f"mask{ext}"
    io.write_mask(mask, ref, out, label_value=3)
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(image, ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask * 3)
    # Read back as a prompt label map on the reference grid; nothing but the output (and .mhd's data file) is left.
    np.testing.assert_array_equal(io.read_label_volume(out, ref), mask * 3)
    expected = {out.name, "mask.zraw"} if ext == ".mhd" else {out.name}
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_volume_round_trip_keeps_dtype_and_geometry(tmp_path):
    ref = make_volume(dtype=np.int16)
    sitk.WriteImage(ref.to_sitk(), str(tmp_path / "img.nrrd"))
    vol = io.read_volume(tmp_path / "img.nrrd")
    assert vol.array.dtype == np.int16 and vol.path == str(tmp_path / "img.nrrd")
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.ijk_to_ras(), ref.ijk_to_ras(), atol=1e-6)


def test_seg_nrrd_round_trip(tmp_path):
    ref = make_volume()
    mask = make_mask()
    out = tmp_path / "result.seg.nrrd"
    io.write_mask(mask, ref, out, segment_name="liver", color=(0.1, 0.2, 0.3))
    np.testing.assert_array_equal(io.read_segmentation_mask(out), mask)
    np.testing.assert_array_equal(io.read_segmentation_mask(out, "liver"), mask)
    seg = slicerio.read_segmentation(str(out), skip_voxels=True)
    np.testing.assert_allclose(seg["ijkToLPS"], ref.ijk_to_lps(), atol=1e-6)
    (segment,) = seg["segments"]
    assert segment["name"] == "liver" and segment["labelValue"] == 1 and segment["layer"] == 0
    np.testing.assert_allclose(segment["color"], [0.1, 0.2, 0.3])
    assert segment["extent"] == [0, 8, 0, 6, 0, 4]
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert_same_geometry(sitk.ReadImage(str(out)), ref)
    with pytest.raises(VolumeIOError, match="no segment 'spleen'"):
        io.read_segmentation_mask(out, "spleen")


def write_dicom_series(folder, array_kji, spacing, series_uid, description="test"):
    """Write a CT-like DICOM series one slice per file (after SimpleITK's "Dicom Series From Array" example)."""
    os.makedirs(folder, exist_ok=True)
    image = sitk.GetImageFromArray(array_kji.astype(np.int16))
    image.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    date, now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    direction = image.GetDirection()
    tags = [("0008|0031", now), ("0008|0021", date), ("0008|0008", "DERIVED\\SECONDARY"),
            ("0020|000e", series_uid), ("0008|0060", "CT"), ("0008|103e", description),
            ("0020|0037", "\\".join(map(str, (*direction[0::3], *direction[1::3]))))]
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        for tag, value in tags:
            slice_k.SetMetaData(tag, value)
        slice_k.SetMetaData("0008|0012", date)
        slice_k.SetMetaData("0008|0013", now)
        slice_k.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_k.SetMetaData("0020|0013", str(k))
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(os.path.join(folder, f"{series_uid}_{k}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder(tmp_path):
    array = np.random.default_rng(0).integers(-100, 100, (4, 6, 5))
    write_dicom_series(tmp_path, array, (0.7, 0.7, 2.5), "1.2.826.0.1.3680043.2.1125.1.1")
    vol = io.read_volume(tmp_path)
    assert vol.array.shape == (4, 6, 5)
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.7, 2.5), atol=1e-4)


def test_dicom_folder_with_two_series_picks_largest(tmp_path):
    write_dicom_series(tmp_path, np.zeros((2, 4, 4)), (1, 1, 1), "1.2.826.0.1.3680043.2.1125.1.2")
    write_dicom_series(tmp_path, np.ones((3, 4, 4)), (1, 1, 1), "1.2.826.0.1.3680043.2.1125.1.3")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        vol = io.read_volume(tmp_path)
    assert vol.array.shape == (3, 4, 4)


def test_read_errors(tmp_path):
    with pytest.raises(VolumeIOError, match="no such file"):
        io.read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(VolumeIOError, match="no DICOM series"):
        io.read_volume(tmp_path)
    (tmp_path / "junk.nrrd").write_bytes(b"not an image")
    with pytest.raises(VolumeIOError, match="cannot be read"):
        io.read_volume(tmp_path / "junk.nrrd")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "flat.nrrd"))
    with pytest.raises(VolumeIOError, match="2D image; give a 3D volume"):
        io.read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "vec.nrrd"))
    with pytest.raises(VolumeIOError, match="3 components"):
        io.read_volume(tmp_path / "vec.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(tmp_path / "t.nii.gz"))
    with pytest.raises(VolumeIOError, match="4D image"):
        io.read_volume(tmp_path / "t.nii.gz")


def test_label_map_on_other_grid_is_rejected(tmp_path):
    ref = make_volume()
    other_spacing = Volume(ref.array, (1.0, 1.2, 3.0), ref.origin, ref.direction)
    sitk.WriteImage(other_spacing.to_sitk(make_mask().astype(np.uint8)), str(tmp_path / "a.nrrd"))
    with pytest.raises(VolumeIOError, match="must be on the image's grid"):
        io.read_label_volume(tmp_path / "a.nrrd", ref)
    half_voxel = tuple(np.asarray(ref.origin) + np.reshape(ref.direction, (3, 3)) @ (0.5 * np.asarray(ref.spacing)))
    between = Volume(ref.array[:-1], ref.spacing, half_voxel, ref.direction)
    sitk.WriteImage(between.to_sitk(), str(tmp_path / "b.nrrd"))
    with pytest.raises(VolumeIOError, match="must be on the image's grid"):
        io.read_label_volume(tmp_path / "b.nrrd", ref)
    # A float label map with integer values is accepted; fractional values are not.
    sitk.WriteImage(ref.to_sitk(make_mask().astype(np.float32)), str(tmp_path / "c.nrrd"))
    assert io.read_label_volume(tmp_path / "c.nrrd", ref).dtype == np.int32
    sitk.WriteImage(ref.to_sitk(make_mask() * np.float32(0.5)), str(tmp_path / "d.nrrd"))
    with pytest.raises(VolumeIOError, match="non-integer"):
        io.read_label_volume(tmp_path / "d.nrrd", ref)


def _cropped(ref: Volume, mask: np.ndarray, start_kji) -> Volume:
    """``mask[start:]``-sized crop geometry: the grid of ``ref`` shifted by whole voxels (may start outside it)."""
    k, j, i = start_kji
    origin = tuple(np.asarray(ref.origin) + np.reshape(ref.direction, (3, 3)) @ (np.asarray(ref.spacing) * (i, j, k)))
    return Volume(mask, ref.spacing, origin, ref.direction)


def test_cropped_label_map_is_placed_back_on_the_image_grid(tmp_path):
    """Slicer saves a segmentation cropped to its extent: the crop is put back voxel for voxel, not resampled."""
    ref = make_volume()
    full = make_mask()
    full[2, 0, 0] = False
    crop = full[1:4, 2:5, 3:8].astype(np.uint8)
    sitk.WriteImage(_cropped(ref, crop, (1, 2, 3)).to_sitk(), str(tmp_path / "crop.seg.nrrd"))
    np.testing.assert_array_equal(io.read_label_volume(tmp_path / "crop.seg.nrrd", ref), full)
    # A crop reaching past the image is fine where it is empty there, an error where something is drawn there.
    pad = np.zeros((7, 5, 9), np.uint8)  # slices -1..5 of 0..4, columns 2..10 of 0..8
    pad[2:5, 1:4, 1:6] = crop
    sitk.WriteImage(_cropped(ref, pad, (-1, 1, 2)).to_sitk(), str(tmp_path / "pad.nrrd"))
    np.testing.assert_array_equal(io.read_label_volume(tmp_path / "pad.nrrd", ref), full)
    sitk.WriteImage(_cropped(ref, crop, (3, 2, 3)).to_sitk(), str(tmp_path / "out.nrrd"))
    with pytest.raises(VolumeIOError, match="lies outside the image"):
        io.read_label_volume(tmp_path / "out.nrrd", ref)


def test_write_errors(tmp_path):
    ref = make_volume()
    with pytest.raises(VolumeIOError, match=r"unknown output extension; use one of .seg.nrrd"):
        io.write_mask(make_mask(), ref, tmp_path / "mask.png")
    with pytest.raises(VolumeIOError, match="does not match the image shape"):
        io.write_mask(np.zeros((2, 2, 2)), ref, tmp_path / "mask.nrrd")
    with pytest.raises(VolumeIOError, match="cannot write to"):
        io.write_mask(make_mask(), ref, tmp_path / "no_such_dir" / "mask.nrrd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.seg.nrrd"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, name):
    def write_half_then_fail(*args, **kwargs):
        path = next(a for a in args if isinstance(a, str) and a.endswith(name))
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    monkeypatch.setattr(slicerio, "write_segmentation", write_half_then_fail)
    with pytest.raises(VolumeIOError, match="writing failed.*disk full"):
        io.write_mask(make_mask(), make_volume(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    # An existing output is left as it was.
    (tmp_path / name).write_bytes(b"old result")
    with pytest.raises(VolumeIOError):
        io.write_mask(make_mask(), make_volume(), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"old result"


def test_robust_range_ignores_outliers():
    rng = np.random.default_rng(1)
    array = rng.uniform(0, 100, (20, 50, 50)).astype(np.float32)
    array.flat[rng.choice(array.size, 20, replace=False)] = 1e6
    array.flat[:20] = -1e6
    lo, hi = io.robust_range(array)
    assert 0 <= lo < 1 and 99 < hi <= 100
    lo_s, hi_s = io.robust_range(array, max_samples=10_000)  # subsampled: close to the full answer
    assert abs(lo_s - lo) < 2 and abs(hi_s - hi) < 2


def test_robust_range_fallbacks():
    sparse = np.zeros((10, 10, 10), np.int16)
    sparse[0, 0, 0] = 500  # percentiles coincide: falls back to min/max
    assert io.robust_range(sparse) == (0.0, 500.0)
    assert io.robust_range(np.full((4, 4, 4), 7, np.uint8)) == (7.0, 8.0)


def test_normalize_clips_to_unit_range():
    x = np.array([[-50, 0, 50], [100, 150, 400]], np.int16)
    out = io.normalize(x, 0.0, 100.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 0.5], [1, 1, 1]])
    assert x[0, 0] == -50  # input untouched
    with pytest.raises(ValueError):
        io.normalize(x, 5.0, 5.0)


def test_propagation_runs_without_simpleitk_and_reading_says_what_is_missing():
    """The lent GPU machine has no SimpleITK: the engine (and ``speed``) must not need it; reading a file there
    must say what to install rather than fail on import."""
    import json
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "from OnePromptSegLib import io\n"
        "from OnePromptSegLib.tooling import cli\n"
        "try:\n"
        "    io.read_volume(sys.argv[1])\n"
        "except io.VolumeIOError as e:\n"
        "    print('ERR', e)\n"
        "sys.argv = ['onepromptseg-dev', 'speed', '--shape', '8,48,48']\n"
        "cli.main()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True, cwd=root,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "ERR reading and writing images needs SimpleITK: pip install SimpleITK"
    assert json.loads(lines[-1])["slices"] == 7
