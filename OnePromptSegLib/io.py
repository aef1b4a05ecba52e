"""Reading volumes and prompt label maps, writing result masks, and per-volume intensity normalisation.

Arrays are in numpy (k, j, i) order, as ``sitk.GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give them;
spacing, origin and direction follow SimpleITK (i, j, k order, LPS, row-major 3x3).  Volumes keep their stored dtype
(no float copy of a large volume): only the slices or crops fed to the model are converted, by :func:`normalize`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

PathLike = Union[str, "os.PathLike[str]"]


def _sitk():
    """SimpleITK, imported when a file is read or written: the engine (``normalize``, ``robust_range``) needs only
    numpy, so propagation, ``speed`` and training from a pack run where SimpleITK is not installed (the lent GPU
    machine's image)."""
    try:
        import SimpleITK
    except ImportError as e:
        raise VolumeIOError("reading and writing images needs SimpleITK: pip install SimpleITK") from e
    return SimpleITK

#: Output extensions :func:`write_mask` understands (``.seg.nrrd`` is a Slicer segmentation, the others a label map).
MASK_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slicer's default terminology for a new segment ("Tissue"), so Slicer shows the segment like one it created itself.
_DEFAULT_TERMINOLOGY = {
    "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
    "category": ["SCT", "85756007", "Tissue"],
    "type": ["SCT", "85756007", "Tissue"],
    "anatomicContextName": "Anatomic codes - DICOM master list",
}


class VolumeIOError(Exception):
    """A volume or mask file cannot be read or written; the message names the file and says what to do."""


@dataclass
class Volume:
    """A 3D scalar image: voxels in (k, j, i) order plus SimpleITK (LPS) geometry."""

    array: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]
    path: Optional[str] = None

    @property
    def spacing_kji(self) -> Tuple[float, float, float]:
        """Spacing in numpy axis order (k, j, i), to go with ``array``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous voxel indices (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing, float)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's IJKToRAS)."""
        return _LPS_TO_RAS @ self.ijk_to_lps()

    def to_sitk(self, array: Optional[np.ndarray] = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: this volume's voxels) carrying this volume's geometry."""
        sitk = _sitk()
        array = self.array if array is None else np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume shape {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _volume_from_image(image: sitk.Image, path: str) -> Volume:
    """Check ``image`` is a 3D scalar image and wrap it as a :class:`Volume`."""
    sitk = _sitk()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeIOError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
                            "vector image); give a single-channel (grayscale) 3D volume")
    if image.GetDimension() != 3:
        raise VolumeIOError(f"{path}: is a {image.GetDimension()}D image; give a 3D volume (a single 3D time point "
                            "or channel)")
    return Volume(array=sitk.GetArrayFromImage(image), spacing=tuple(image.GetSpacing()),
                  origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()), path=path)


def _read_dicom_folder(folder: str) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder`` (warning when there are several)."""
    sitk = _sitk()
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)
              for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}
    if not series:
        raise VolumeIOError(f"{folder}: folder contains no DICOM series; give a folder of DICOM files or a volume "
                            "file (.nii, .nii.gz, .nrrd, .mha ...)")
    sid = max(series, key=lambda s: len(series[s]))
    if len(series) > 1:
        warnings.warn(f"{folder}: contains {len(series)} DICOM series; using {sid} ({len(series[sid])} files), the "
                      "one with the most files. Put the wanted series alone in a folder to choose another.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[sid])
    return reader.Execute()


def read_volume(path: PathLike) -> Volume:
    """Read a 3D scalar volume: any file SimpleITK reads (NIfTI, NRRD, MHA ...) or a folder holding a DICOM series.

    Raises VolumeIOError for a missing or unreadable file, a 2D or 4D image, or a multi-component image.
    """
    sitk = _sitk()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeIOError(f"{path}: no such file or folder; check the path")
    try:
        image = _read_dicom_folder(path) if os.path.isdir(path) else sitk.ReadImage(path)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VolumeIOError(f"{path}: cannot be read as an image ({reason}); give a NIfTI, NRRD, MHA file or a "
                            "DICOM series folder") from e
    return _volume_from_image(image, path)


def read_label_volume(path: PathLike, reference: Volume) -> np.ndarray:
    """Read a label map (e.g. a prompt mask) that must lie on ``reference``'s voxel grid; returns integers (k, j, i).

    Spacing and direction must match within 1e-3 (relative and absolute) and the origin must fall on one of the
    image's voxels: the mask is used voxel for voxel, never resampled.  A mask cropped to its own extent (Slicer
    saves a ``.seg.nrrd`` that way) is placed back into the image's grid; foreground outside the image is an error.
    """
    label = read_volume(path)
    offset = _grid_offset(label, reference)
    if offset is None:
        raise VolumeIOError(f"{label.path}: the prompt mask must be on the image's grid (mask size "
                            f"{label.array.shape[::-1]}, spacing {_fmt(label.spacing)}, origin {_fmt(label.origin)}; "
                            f"image size {reference.array.shape[::-1]}, spacing {_fmt(reference.spacing)}, origin "
                            f"{_fmt(reference.origin)}); resample or export it with the image as reference")
    array = label.array
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise VolumeIOError(f"{label.path}: has non-integer voxel values; a prompt mask must be a label map "
                                "(0 = background, integer labels)")
        array = array.astype(np.int32)
    if offset == (0, 0, 0) and array.shape == reference.array.shape:
        return array
    # Embed the cropped mask: its part inside the image is copied, and nothing drawn may lie outside.
    full = np.zeros(reference.array.shape, array.dtype)
    dst = tuple(slice(max(0, o), min(n, o + m)) for o, m, n in zip(offset, array.shape, reference.array.shape))
    src = tuple(slice(d.start - o, d.stop - o) for d, o in zip(dst, offset))
    if all(d.stop > d.start for d in dst):
        full[dst] = array[src]
    if np.count_nonzero(full) != np.count_nonzero(array):
        raise VolumeIOError(f"{label.path}: part of the prompt mask lies outside the image (mask origin "
                            f"{_fmt(label.origin)}, size {array.shape[::-1]}; image size {reference.array.shape[::-1]}"
                            "); draw the prompt on the image it is used with")
    return full


def _grid_offset(label: Volume, reference: Volume) -> Optional[Tuple[int, int, int]]:
    """(k, j, i) index of ``label``'s first voxel in ``reference``'s grid, or None when the two grids differ
    (spacing, direction, or an origin between voxels)."""
    if not all(np.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in ((label.spacing, reference.spacing),
                                                                    (label.direction, reference.direction))):
        return None
    lps_to_ijk = np.linalg.inv(reference.ijk_to_lps())
    ijk = (lps_to_ijk @ np.append(np.asarray(label.origin, float), 1.0))[:3]
    if not np.allclose(ijk, np.round(ijk), atol=1e-2):
        return None
    i, j, k = (int(v) for v in np.round(ijk))
    return k, j, i


def _fmt(values: Sequence[float]) -> str:
    """Compact rendering of a coordinate triple for messages."""
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _mask_extension(path: str) -> str:
    """The supported extension ``path`` ends with, or VolumeIOError."""
    lower = path.lower()
    for ext in MASK_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    raise VolumeIOError(f"{path}: unknown output extension; use one of {', '.join(MASK_EXTENSIONS)}")


def check_readable(path: PathLike, what: str = "input") -> None:
    """VolumeIOError unless ``path`` is an existing, readable file or folder: checked for every input before any
    work starts, so a typo in the last of several paths is not found after the first has been read and processed."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeIOError(f"{path}: no such file or folder ({what}); check the path")
    if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        raise VolumeIOError(f"{path}: not readable ({what}); check its permissions")


def check_writable(path: PathLike, extensions: Sequence[str] = MASK_EXTENSIONS, what: str = "output") -> None:
    """VolumeIOError unless ``path`` ends with one of ``extensions`` and its folder exists and is writable; the
    check :func:`write_mask` would otherwise make only once the result is computed."""
    path = os.fspath(path)
    if path.endswith(os.sep) or os.path.isdir(path):
        raise VolumeIOError(f"{path}: is a folder; give a file name ending in {', '.join(extensions)} ({what})")
    if not any(path.lower().endswith(e) for e in extensions):
        raise VolumeIOError(f"{path}: unknown extension ({what}); use one of {', '.join(extensions)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VolumeIOError(f"{path}: folder {folder} does not exist ({what})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VolumeIOError(f"{path}: folder {folder} is not writable ({what})")


def write_mask(mask: np.ndarray, reference: Volume, path: PathLike, segment_name: str = "Segment_1",
               label_value: int = 1, color: Sequence[float] = (0.9, 0.3, 0.2)) -> None:
    """Write ``mask`` ((k, j, i), non-zero = inside) with ``reference``'s geometry; voxels inside get ``label_value``.

    ``.seg.nrrd`` gives a Slicer segmentation with one segment (``segment_name``, ``color``); ``.nii``, ``.nii.gz``,
    ``.nrrd``, ``.mha`` and ``.mhd`` a uint8 label map.  The files are written in a temporary folder next to ``path``
    and moved into place only when complete, so a failure never leaves a partial output (nor replaces an old one).
    """
    sitk = _sitk()
    path = os.fspath(path)
    ext = _mask_extension(path)
    mask = np.asarray(mask)
    if mask.shape != reference.array.shape:
        raise VolumeIOError(f"{path}: mask shape {mask.shape} does not match the image shape "
                            f"{reference.array.shape} (both k, j, i); compute the mask on the image's grid")
    if not 1 <= int(label_value) <= 255:
        raise VolumeIOError(f"{path}: label value {label_value} does not fit a uint8 label map; use 1..255")
    labels = np.where(mask != 0, np.uint8(label_value), np.uint8(0))
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        tmp_dir = tempfile.mkdtemp(prefix=".onepromptseg-", dir=folder)
    except OSError as e:
        raise VolumeIOError(f"{path}: cannot write to {folder} ({e.strerror}); check the folder exists and is "
                            "writable") from e
    try:
        tmp_path = os.path.join(tmp_dir, name)
        if ext == ".seg.nrrd":
            _write_seg_nrrd(labels, reference, tmp_path, segment_name, int(label_value), color)
        else:
            sitk.WriteImage(reference.to_sitk(labels), tmp_path, True)
        # Companion files (.mhd's .raw/.zraw) first, the named file last: it appears only once all data is there.
        for f in sorted(os.listdir(tmp_dir), key=lambda f: f == name):
            os.replace(os.path.join(tmp_dir, f), os.path.join(folder, f))
    except Exception as e:
        raise VolumeIOError(f"{path}: writing failed ({e}); check free disk space and write permission") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_seg_nrrd(labels: np.ndarray, reference: Volume, path: str, segment_name: str, label_value: int,
                    color: Sequence[float]) -> None:
    """Write a one-segment Slicer segmentation (.seg.nrrd) with the metadata Slicer expects."""
    import slicerio

    n_i, n_j, n_k = labels.shape[::-1]
    segmentation = {
        "voxels": labels.transpose(2, 1, 0),  # slicerio/pynrrd default index order is (i, j, k)
        "ijkToLPS": reference.ijk_to_lps(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [{
            "id": "Segment_1", "name": segment_name, "nameAutoGenerated": False,
            "color": [float(c) for c in color], "colorAutoGenerated": False,
            "labelValue": label_value, "layer": 0,
            # Full extent: older Slicer versions crop a layer to its first segment's extent.
            "extent": [0, n_i - 1, 0, n_j - 1, 0, n_k - 1],
            "terminology": _DEFAULT_TERMINOLOGY,
        }],
    }
    slicerio.write_segmentation(path, segmentation)


def read_segmentation_mask(path: PathLike, segment: Optional[str] = None) -> np.ndarray:
    """One segment of a Slicer ``.seg.nrrd`` as a uint8 (k, j, i) mask on the file's own grid.

    ``segment`` is a segment name or ID; None takes the only segment (an error when there are several).
    """
    import slicerio

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VolumeIOError(f"{path}: no such file; check the path")
    try:
        segmentation = slicerio.read_segmentation(path)
    except Exception as e:
        raise VolumeIOError(f"{path}: cannot be read as a Slicer segmentation ({e}); give a .seg.nrrd file") from e
    names = slicerio.segment_names(segmentation)
    if segment is None:
        if len(names) != 1:
            raise VolumeIOError(f"{path}: has {len(names)} segments ({', '.join(names)}); name the segment to read")
        segment = segmentation["segments"][0]
    try:
        mask = slicerio.segment_mask(segmentation, segment)
    except KeyError as e:
        raise VolumeIOError(f"{path}: has no segment {segment!r}; its segments are: {', '.join(names)}") from e
    return np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8)


def robust_range(array: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5, max_samples: int = 500_000,
                 seed: int = 0) -> Tuple[float, float]:
    """Intensity window (lo, hi) of a whole volume from percentiles of a random voxel subsample.

    Computed once per volume (not per slice) so every slice is normalised alike; sampling keeps the cost and memory
    small for large volumes.  Falls back to min/max when the percentiles coincide, and to (lo, lo + 1) for a
    constant volume, so ``hi > lo`` always holds.
    """
    array = np.asarray(array)
    if array.size == 0:
        return 0.0, 1.0
    if array.size > max_samples:  # random multi-index: no copy of the volume, even a non-contiguous view
        rng = np.random.default_rng(seed)
        sample = array[tuple(rng.integers(0, n, max_samples) for n in array.shape)]
    else:
        sample = array.ravel()
    if np.issubdtype(sample.dtype, np.floating):
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [lo_pct, hi_pct]))
    if hi <= lo:
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def normalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(x - lo) / (hi - lo)`` as float32 clipped to [0, 1] (NaN -> 0); converts only the slice or crop given."""
    if not hi > lo:
        raise ValueError(f"normalize needs hi > lo (got lo={lo}, hi={hi})")
    out = np.asarray(x, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)
