"""Clicks on one slice: which candidate mask of a click outlines the structure, and corrections of a shown result.

``PropagationSession.segment_slice`` segments a click in several crops and keeps the mask ``pick_extent`` chooses;
``PropagationSession.refine_slice`` corrects a slice with clicks: ``drop_clicked_parts`` for a negative click deep
inside a part, then ``refine_outline`` (scikit-image's random walker) for the outline.  Issue 19; the measurements
are in docs/BENCHMARKS.md (section 8.2).
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import random_walker


def pick_extent(image: np.ndarray, masks: Sequence[np.ndarray], ring: float = 0.15) -> int:
    """Which of several candidate masks of one click on ``image`` (the slice, normalised and blurred by 1 px)
    outlines the structure: the one whose inside differs most in mean intensity from a ring just outside it
    (``ring`` x its extent wide, at least 2 px).

    A crop narrower than the structure gives a mask inside it (same intensity around it), a crop much wider one that
    spills over its neighbours (its inside mixes both).  On 30 train/ tasks this picked the better crop where the
    model's own quality estimate could not (first-slice Dice 0.646 against 0.581 for the slice-wide crop alone and
    0.580 picking by quality; issue 19).
    """
    scores = []
    for m in masks:
        rr, cc = np.nonzero(m)
        if len(rr) < 3:
            scores.append(-1.0)
            continue
        w = max(2, int(ring * (max(np.ptp(rr), np.ptp(cc)) + 1)))
        r0, c0 = max(rr.min() - w, 0), max(cc.min() - w, 0)
        win = (slice(r0, rr.max() + w + 1), slice(c0, cc.max() + w + 1))  # only where the ring can be
        around = (ndi.distance_transform_edt(~m[win]) <= w) & ~m[win]
        inside = float(image[rr, cc].mean())
        scores.append(abs(inside - float(image[win][around].mean())) if around.any() else -1.0)
    return int(np.argmax(scores))


def pixel(point: Tuple[float, float], shape: Tuple[int, int]) -> Tuple[int, int]:
    """The slice pixel holding a (row, col) point."""
    return (min(max(int(round(point[0])), 0), shape[0] - 1), min(max(int(round(point[1])), 0), shape[1] - 1))


def drop_clicked_parts(mask: np.ndarray, clicks: Sequence[Tuple[Tuple[float, float], int]], refine_whole: float
                       ) -> np.ndarray:
    """``mask`` without the connected parts a negative click lies deep inside (at least ``refine_whole`` of the
    part's own greatest depth): such a click says "this is not the structure", not "this edge is too far out"
    (the random walker, seeded from the rest of the part, would keep most of it)."""
    parts, n = ndi.label(mask)
    if n == 0:
        return mask
    depth = ndi.distance_transform_edt(mask)
    deepest = ndi.maximum(depth, parts, np.arange(1, n + 1))
    out = mask.copy()
    for point, positive in clicks:
        part = parts[pixel(point, mask.shape)]
        if not positive and part and depth[pixel(point, mask.shape)] >= refine_whole * deepest[part - 1]:
            out[parts == part] = False
    return out


def refine_outline(image_window: Callable[[Tuple[slice, slice]], np.ndarray], current: np.ndarray,
                   clicks: Sequence[Tuple[Tuple[float, float], int]], refine_band: float, refine_beta: float
                   ) -> np.ndarray:
    """``current`` (a slice's mask) with its outline decided again where the clicks say it is wrong;
    ``image_window(win)`` is the slice's normalised, blurred image in the window ``win`` (rows, cols).

    Seeds for scikit-image's random walker: the current mask shrunk by a band (foreground) and the outside
    beyond it (background), each click a small disc of its label.  Around each click, the seeds of the other
    label are lifted in a disc twice as wide as the click's distance to the current outline (the centre of an
    error region lies about half its width from the outline), so the walker can move the outline there as
    far as the image supports; everything else keeps the current mask.  Only a window around the mask and the
    clicks is solved.
    """
    shape = current.shape
    pts = np.array([p for p, _ in clicks], float).reshape(-1, 2)
    pos = np.array([v for _, v in clicks], int)
    rr, cc = np.nonzero(current)
    ext = max(np.ptp(rr), np.ptp(cc)) + 1 if len(rr) else 8
    inside = ndi.distance_transform_edt(current)
    outside = ndi.distance_transform_edt(~current)
    ri, ci = np.clip(np.round(pts[:, 0]).astype(int), 0, shape[0] - 1), np.clip(np.round(pts[:, 1]).astype(int),
                                                                               0, shape[1] - 1)
    dist = np.where(pos == 1, outside[ri, ci], inside[ri, ci])
    # The disc around each click where its opposite label's seeds are lifted; never wider than the mask itself
    # (a walker with much room and few edges floods the slice).
    reach = np.minimum(2 * dist + 2, max(ext, 8))
    # Thin structures (a myocardium) keep foreground seeds: the band is at most half the mask's depth.
    band = max(1.0, min(refine_band * ext, 0.5 * inside.max()))
    pad = int(max(reach.max(), band) + 4)
    rows = np.concatenate([rr, ri]) if len(rr) else ri
    cols = np.concatenate([cc, ci]) if len(cc) else ci
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, shape[1])
    win = (slice(r0, r1), slice(c0, c1))
    seeds = np.zeros((r1 - r0, c1 - c0), np.int32)
    seeds[inside[win] > band] = 1
    seeds[outside[win] > band] = 2
    yy, xx = np.mgrid[r0:r1, c0:c1]
    for (r, c), p, R in zip(pts, pos, reach):
        near = (yy - r) ** 2 + (xx - c) ** 2
        seeds[(near <= R ** 2) & (seeds == (2 if p else 1))] = 0
    for (r, c), p, d in zip(pts, pos, dist):
        near = (yy - r) ** 2 + (xx - c) ** 2
        seeds[near <= max(1.0, d / 2) ** 2] = 1 if p else 2
    mask = current.copy()
    if not (seeds == 1).any():
        mask[win] = False  # negative clicks took every foreground seed: nothing of the structure is left here
    elif (seeds == 2).any() and (seeds == 0).any():
        mask[win] = random_walker(image_window(win), seeds, beta=refine_beta, mode="bf") == 1
    return mask
