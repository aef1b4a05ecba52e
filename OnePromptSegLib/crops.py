"""Crops around the object, resampled to the model's square input, and pasted back at full resolution.

A crop is square in millimetres (so anisotropic in-plane pixels keep their aspect, unlike peers that stretch a slice
to a square), may reach outside the slice (the outside is padded with zeros) and is resampled to ``size x size``.
Only the crop is ever converted to float: memory does not grow with the slice or the volume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """A rectangle in slice pixel coordinates: rows [r0, r0+h), cols [c0, c0+w)."""

    r0: float
    c0: float
    h: float
    w: float

    def to_crop(self, r: np.ndarray, c: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Slice pixel coordinates (pixel centres) -> crop pixel coordinates at ``size``."""
        return (np.asarray(r, float) + 0.5 - self.r0) * size / self.h - 0.5, \
               (np.asarray(c, float) + 0.5 - self.c0) * size / self.w - 0.5


def crop_around(mask: Optional[np.ndarray], shape: Tuple[int, int], spacing: Sequence[float] = (1.0, 1.0),
                margin: float = 0.6, min_mm: float = 24.0, points: Optional[np.ndarray] = None) -> CropBox:
    """A box square in mm around the foreground of ``mask`` (or around ``points`` (N,2) rows/cols).

    ``margin`` is added on each side as a fraction of the object's larger extent; ``min_mm`` keeps tiny objects in
    context.  With neither mask foreground nor points, the whole slice is used (padded to a square in mm).
    """
    sr, sc = float(spacing[0]), float(spacing[1])
    if points is not None and len(points):
        rows, cols = np.asarray(points, float)[:, 0], np.asarray(points, float)[:, 1]
    elif mask is not None and mask.any():
        rr = np.flatnonzero(mask.any(1))
        cc = np.flatnonzero(mask.any(0))
        rows, cols = np.array([rr[0], rr[-1]], float), np.array([cc[0], cc[-1]], float)
    else:
        ext = max(shape[0] * sr, shape[1] * sc)
        return CropBox(shape[0] / 2 - ext / sr / 2, shape[1] / 2 - ext / sc / 2, ext / sr, ext / sc)
    cr, cc_ = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    ext = max((rows.max() - rows.min() + 1) * sr, (cols.max() - cols.min() + 1) * sc)
    side = max(ext * (1 + 2 * margin), min_mm)
    return CropBox(cr - side / sr / 2, cc_ - side / sc / 2, side / sr, side / sc)


def steady_box(mask: np.ndarray, previous: Optional[CropBox], spacing: Sequence[float], margin: float) -> CropBox:
    """The crop for a prompt mask (``crop_around``); the ``previous`` step's crop is kept while it still fits (within
    10-25%).

    Keeping the crop steady lets a slice's encoder features, computed when it was the query, be reused when it is a
    template, and avoids jitter.
    """
    fresh = crop_around(mask, mask.shape, spacing, margin)
    if previous is not None and 0.8 * fresh.h <= previous.h <= 1.25 * fresh.h:
        dr = abs((fresh.r0 + fresh.h / 2) - (previous.r0 + previous.h / 2))
        dc = abs((fresh.c0 + fresh.w / 2) - (previous.c0 + previous.w / 2))
        if dr <= 0.1 * previous.h and dc <= 0.1 * previous.w:
            return previous
    return fresh


def _window(box: CropBox, shape: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Integer pixel window covering the box: (r0, r1, c0, c1), possibly outside the slice."""
    r0, c0 = int(np.floor(box.r0)), int(np.floor(box.c0))
    r1, c1 = int(np.ceil(box.r0 + box.h)), int(np.ceil(box.c0 + box.w))
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def extract(img: np.ndarray, box: CropBox, size: int, mode: str = "bilinear") -> np.ndarray:
    """Resample the box of a 2D array to (size, size) float32; outside the slice reads as 0."""
    import torch  # imported here so that prompts (and the Slicer panel) work before torch is installed
    import torch.nn.functional as F

    r0, r1, c0, c1 = _window(box, img.shape)
    H, W = img.shape
    out = np.zeros((r1 - r0, c1 - c0), np.float32)
    ar0, ar1, ac0, ac1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
    if ar1 > ar0 and ac1 > ac0:
        out[ar0 - r0:ar1 - r0, ac0 - c0:ac1 - c0] = img[ar0:ar1, ac0:ac1]
    t = torch.from_numpy(out)[None, None]
    # Sub-pixel placement: sample the exact box inside the integer window with an affine grid.
    ys = (torch.arange(size, dtype=torch.float32) + 0.5) * box.h / size + box.r0 - r0
    xs = (torch.arange(size, dtype=torch.float32) + 0.5) * box.w / size + box.c0 - c0
    if mode == "nearest":
        ri = ys.floor().long().clamp(0, out.shape[0] - 1)
        ci = xs.floor().long().clamp(0, out.shape[1] - 1)
        return out[ri.numpy()][:, ci.numpy()].astype(np.float32)
    # Anti-alias when shrinking a large crop, then sample bilinearly.
    fh, fw = out.shape[0] / size, out.shape[1] / size
    if fh > 1.5 or fw > 1.5:
        kh, kw = max(1, int(round(fh))), max(1, int(round(fw)))
        t = F.avg_pool2d(t, (kh, kw), stride=(kh, kw), ceil_mode=True)
        ys, xs = ys / kh, xs / kw
    gy = (ys + 0.0) / t.shape[2] * 2 - 1
    gx = (xs + 0.0) / t.shape[3] * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def paste(prob: np.ndarray, box: CropBox, shape: Tuple[int, int]) -> Tuple[np.ndarray, Tuple[slice, slice]]:
    """Resample a (size,size) crop result back onto the slice grid.

    Returns the values over the part of the slice the box covers and the (row, col) slices locating it, so callers
    write only that window instead of allocating a full-slice float array.
    """
    import torch
    import torch.nn.functional as F

    size = prob.shape[0]
    r0, r1, c0, c1 = _window(box, shape)
    ar0, ar1, ac0, ac1 = max(r0, 0), min(r1, shape[0]), max(c0, 0), min(c1, shape[1])
    if ar1 <= ar0 or ac1 <= ac0:
        return np.zeros((0, 0), np.float32), (slice(0, 0), slice(0, 0))
    rr = (np.arange(ar0, ar1) + 0.5 - box.r0) / box.h * size - 0.5
    cc = (np.arange(ac0, ac1) + 0.5 - box.c0) / box.w * size - 0.5
    gy = torch.from_numpy(((rr + 0.5) / size * 2 - 1).astype(np.float32))
    gx = torch.from_numpy(((cc + 0.5) / size * 2 - 1).astype(np.float32))
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
    return out, (slice(ar0, ar1), slice(ac0, ac1))
