"""The four One-Prompt prompt kinds on one slice, their validation, and their rendering as model input maps.

Coordinates: a volume is a numpy array in (k, j, i) order (what SimpleITK's ``GetArrayFromImage`` and Slicer's
``arrayFromVolume`` return).  A slice along IJK axis ``axis`` ('i', 'j' or 'k') is ``np.take(volume, s, numpy_axis)``
and a prompt's 2D coordinates are (row, col) in that slice array.  ``from_ijk`` helpers convert voxel indices
(i, j, k), as the CLI and Slicer give them, into that form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .crops import CropBox, extract

AxisLike = Union[str, int]


class PromptError(ValueError):
    """A prompt the user gave cannot be used; the message says why and what to do."""


def ijk_axis(axis: AxisLike) -> int:
    """'i'|'j'|'k' or 0|1|2 -> IJK axis index (0=i, 1=j, 2=k)."""
    if isinstance(axis, str) and axis.lower() in ("i", "j", "k"):
        return "ijk".index(axis.lower())
    if isinstance(axis, (int, np.integer)) and int(axis) in (0, 1, 2):
        return int(axis)
    raise PromptError(f"axis must be one of i, j, k (got {axis!r})")


def numpy_axis(axis: AxisLike) -> int:
    """IJK axis -> axis of a (k, j, i) numpy array."""
    return 2 - ijk_axis(axis)


def slice_shape(volume_shape: Sequence[int], axis: AxisLike) -> Tuple[int, int]:
    """Shape (rows, cols) of one slice of a (k, j, i) volume along ``axis``."""
    a = numpy_axis(axis)
    rest = [n for d, n in enumerate(volume_shape) if d != a]
    return int(rest[0]), int(rest[1])


def ijk_to_slice(ijk: Sequence[float], axis: AxisLike) -> Tuple[int, float, float]:
    """Voxel index (i, j, k) -> (slice index, row, col) for slices along ``axis``."""
    a = ijk_axis(axis)
    kji = [float(ijk[2]), float(ijk[1]), float(ijk[0])]  # numpy order
    na = 2 - a
    rest = [kji[d] for d in range(3) if d != na]
    return int(round(kji[na])), rest[0], rest[1]


@dataclass
class Click:
    """Positive (label 1) and negative (label 0) points on one slice, as (row, col)."""

    slice_index: int
    points: List[Tuple[float, float]]
    labels: List[int]
    kind: str = field(default="click", init=False)

    @classmethod
    def from_ijk(cls, points_ijk: Sequence[Sequence[float]], labels: Sequence[int], axis: AxisLike) -> "Click":
        """Build from voxel indices; all points must lie on one slice along ``axis``."""
        if not len(points_ijk):
            raise PromptError("a click prompt needs at least one point")
        conv = [ijk_to_slice(p, axis) for p in points_ijk]
        slices = sorted({c[0] for c in conv})
        if len(slices) > 1:
            raise PromptError(f"click points lie on different slices {slices} along axis {'ijk'[ijk_axis(axis)]}: "
                              "put all points of one prompt on one slice")
        return cls(slices[0], [(c[1], c[2]) for c in conv], [int(v) for v in labels])


@dataclass
class BBox:
    """An axis-aligned box on one slice: rows [r0, r1], cols [c0, c1] (inclusive pixel indices)."""

    slice_index: int
    r0: float
    c0: float
    r1: float
    c1: float
    kind: str = field(default="box", init=False)

    @classmethod
    def from_ijk(cls, corner0: Sequence[float], corner1: Sequence[float], axis: AxisLike) -> "BBox":
        """Two opposite corners as voxel indices on the same slice."""
        s0, r0, c0 = ijk_to_slice(corner0, axis)
        s1, r1, c1 = ijk_to_slice(corner1, axis)
        if s0 != s1:
            raise PromptError(f"box corners lie on different slices ({s0} and {s1}) along axis "
                              f"{'ijk'[ijk_axis(axis)]}: draw the box on one slice")
        return cls(s0, min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1))


@dataclass
class Doodle:
    """Foreground and (optional) background strokes on one slice, as 2D boolean masks."""

    slice_index: int
    foreground: np.ndarray
    background: Optional[np.ndarray] = None
    kind: str = field(default="doodle", init=False)


@dataclass
class MaskPrompt:
    """A drawn (or corrected) mask of one slice: One-Prompt's SegLab prompt.  May be empty (object absent)."""

    slice_index: int
    mask: np.ndarray
    kind: str = field(default="mask", init=False)


Prompt = Union[Click, BBox, Doodle, MaskPrompt]


def validate(prompt: Prompt, volume_shape: Sequence[int], axis: AxisLike) -> None:
    """Raise PromptError with a clear message if ``prompt`` cannot be used on this volume and axis."""
    n = volume_shape[numpy_axis(axis)]
    rows, cols = slice_shape(volume_shape, axis)
    name = "ijk"[ijk_axis(axis)]
    if not 0 <= int(prompt.slice_index) < n:
        raise PromptError(f"{prompt.kind} prompt is on slice {prompt.slice_index}, outside the volume "
                          f"(axis {name} has slices 0..{n - 1})")

    def inside(r: float, c: float) -> bool:
        return -0.5 <= r <= rows - 0.5 and -0.5 <= c <= cols - 0.5

    if isinstance(prompt, Click):
        if not prompt.points:
            raise PromptError("a click prompt needs at least one point")
        if len(prompt.labels) != len(prompt.points):
            raise PromptError("a click prompt needs one label (1 positive, 0 negative) per point")
        if not any(int(v) == 1 for v in prompt.labels):
            raise PromptError("a click prompt needs at least one positive point on the structure")
        for (r, c) in prompt.points:
            if not inside(r, c):
                raise PromptError(f"click ({r:.1f}, {c:.1f}) on slice {prompt.slice_index} is outside the slice "
                                  f"({rows} x {cols} pixels)")
    elif isinstance(prompt, BBox):
        if not (inside(prompt.r0, prompt.c0) and inside(prompt.r1, prompt.c1)):
            raise PromptError(f"box rows {prompt.r0:.0f}..{prompt.r1:.0f}, cols {prompt.c0:.0f}..{prompt.c1:.0f} "
                              f"reaches outside the slice ({rows} x {cols} pixels)")
        if prompt.r1 - prompt.r0 < 1 or prompt.c1 - prompt.c0 < 1:
            raise PromptError("the box has zero area: drag it over the structure so it spans at least 2 x 2 pixels")
    elif isinstance(prompt, Doodle):
        for nm, m in (("foreground", prompt.foreground), ("background", prompt.background)):
            if m is None:
                continue
            if np.ndim(m) != 2 or tuple(np.shape(m)) != (rows, cols):
                raise PromptError(f"{nm} doodle has shape {np.shape(m)}; a slice along axis {name} is "
                                  f"{rows} x {cols}")
        if not np.asarray(prompt.foreground).any():
            raise PromptError("the doodle is empty: scribble on the structure (foreground) before propagating")
    elif isinstance(prompt, MaskPrompt):
        if np.ndim(prompt.mask) != 2:
            raise PromptError(f"a mask prompt must be one 2D slice (got {np.ndim(prompt.mask)} dimensions); "
                              "use masks_from_label_volume() for a label volume")
        if tuple(np.shape(prompt.mask)) != (rows, cols):
            raise PromptError(f"mask prompt has shape {np.shape(prompt.mask)}; a slice along axis {name} is "
                              f"{rows} x {cols}")
    else:
        raise PromptError(f"unknown prompt type {type(prompt).__name__}")


def masks_from_label_volume(labels: np.ndarray, axis: AxisLike, label: Optional[int] = None,
                            volume_shape: Optional[Sequence[int]] = None) -> List[MaskPrompt]:
    """One MaskPrompt per slice that holds voxels of ``label`` (any non-zero label when None).

    Every slice with voxels is a drawn slice (an anchor).  Raises PromptError when the label volume does not match the
    image grid or holds no voxels of the label.
    """
    if volume_shape is not None and tuple(labels.shape) != tuple(volume_shape):
        raise PromptError(f"prompt mask has shape {tuple(labels.shape)[::-1]} (i,j,k) but the image is "
                          f"{tuple(volume_shape)[::-1]}: the prompt must be drawn on the image's own grid")
    fg = labels > 0 if label is None else labels == label
    a = numpy_axis(axis)
    other = tuple(d for d in range(3) if d != a)
    present = np.flatnonzero(fg.any(axis=other))
    if present.size == 0:
        what = "any label" if label is None else f"label {label}"
        found = [int(v) for v in np.unique(labels) if v != 0][:10]
        raise PromptError(f"the prompt mask holds no voxels of {what} (labels present: {found or 'none'})")
    return [MaskPrompt(int(s), np.take(fg, int(s), axis=a)) for s in present]


def clicks_by_slice(points_ijk: Sequence[Sequence[float]], labels: Sequence[int], axis: AxisLike) -> List[Click]:
    """One Click per slice that holds a positive point; negative points join their slice's prompt.

    Points are voxel indices (i, j, k), e.g. from Slicer's point lists; negatives on a slice without a positive point
    are dropped (they cannot prompt anything on their own).
    """
    if len(points_ijk) != len(labels):
        raise PromptError("click points and labels differ in number")
    by_slice: dict = {}
    for p, lab in zip(points_ijk, labels):
        s, r, c = ijk_to_slice(p, axis)
        by_slice.setdefault(s, []).append(((r, c), int(lab)))
    return [Click(s, [pt for pt, _ in items], [lab for _, lab in items])
            for s, items in sorted(by_slice.items()) if any(lab == 1 for _, lab in items)]


def drawn_axis(labels: np.ndarray) -> Optional[int]:
    """The IJK axis a drawing made slice by slice lies on: the axis along which it covers the fewest slices.

    None when the drawing is empty or two axes tie (then the caller must ask which view was used).
    """
    counts = [int(np.asarray(labels).any(axis=tuple(d for d in range(3) if d != 2 - a)).sum()) for a in range(3)]
    best = min(counts)
    return counts.index(best) if best > 0 and counts.count(best) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Rendering: prompt -> four maps (positive, negative, box, mask) on a crop, the model's input.

KIND_INDEX = {"click": 0, "box": 1, "doodle": 2, "mask": 3}


def _blobs(rr: np.ndarray, cc: np.ndarray, size: int, sigma: float) -> np.ndarray:
    if len(rr) == 0:
        return np.zeros((size, size), np.float32)
    y = np.arange(size, dtype=np.float32)[:, None, None]
    x = np.arange(size, dtype=np.float32)[None, :, None]
    g = np.exp(-((y - rr[None, None]) ** 2 + (x - cc[None, None]) ** 2) / (2 * sigma ** 2))
    return g.max(-1).astype(np.float32)


def render_prompt_maps(prompt: Prompt, box: CropBox, size: int, click_sigma: float = 2.0) -> np.ndarray:
    """Draw ``prompt`` on the crop ``box`` at ``size``: (4, size, size) float32 in [0, 1]."""
    out = np.zeros((4, size, size), np.float32)
    if isinstance(prompt, Click):
        pts = np.asarray(prompt.points, float).reshape(-1, 2)
        lab = np.asarray(prompt.labels, int)
        r, c = box.to_crop(pts[:, 0], pts[:, 1], size)
        out[0] = _blobs(r[lab == 1], c[lab == 1], size, click_sigma)
        out[1] = _blobs(r[lab != 1], c[lab != 1], size, click_sigma)
    elif isinstance(prompt, BBox):
        r, c = box.to_crop(np.array([prompt.r0 - 0.5, prompt.r1 + 0.5]) , np.array([prompt.c0 - 0.5, prompt.c1 + 0.5]),
                           size)
        y = np.arange(size)[:, None] + 0.5
        x = np.arange(size)[None, :] + 0.5
        out[2] = ((y >= r[0] + 0.5) & (y <= r[1] + 0.5) & (x >= c[0] + 0.5) & (x <= c[1] + 0.5)).astype(np.float32)
    elif isinstance(prompt, Doodle):
        # Strokes are thin: take the max over each output pixel's footprint so none vanishes when shrinking.
        out[0] = _max_resample(np.asarray(prompt.foreground, bool), box, size)
        if prompt.background is not None:
            out[1] = _max_resample(np.asarray(prompt.background, bool), box, size)
    elif isinstance(prompt, MaskPrompt):
        # ``extract`` converts only the crop's window to float, not the whole slice's mask.
        out[3] = np.clip(extract(np.asarray(prompt.mask), box, size), 0, 1)
    return out


def _max_resample(m: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    rr, cc = np.nonzero(m)
    out = np.zeros((size, size), np.float32)
    if len(rr) == 0:
        return out
    r, c = box.to_crop(rr, cc, size)
    r, c = np.round(r).astype(int), np.round(c).astype(int)
    ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
    out[r[ok], c[ok]] = 1.0
    return out


def prompt_points(prompt: Prompt) -> Optional[np.ndarray]:
    """(N,2) rows/cols that locate the prompt on its slice, for choosing a crop; None for an empty mask."""
    if isinstance(prompt, Click):
        # Positive points only: a click says where, not how big (the engine widens the crop itself).
        return np.asarray(prompt.points, float)[np.asarray(prompt.labels) == 1]
    if isinstance(prompt, BBox):
        return np.array([[prompt.r0, prompt.c0], [prompt.r1, prompt.c1]], float)
    m = prompt.foreground if isinstance(prompt, Doodle) else prompt.mask
    rr, cc = np.nonzero(m)
    if len(rr) == 0:
        return None
    return np.stack([rr, cc], 1).astype(float)
