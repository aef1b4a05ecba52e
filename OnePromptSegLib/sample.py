"""A generated sample volume with its known truth, and the Dice score against it.

``onepromptseg demo``, the Slicer module's self-test and the test suite run on this volume, never on the real data
in ../shared.  ``blob_mask`` and the noise fields are also the building blocks of the training volumes
(``tooling.synth``).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: Tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation: texture and tissue regions."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def bias_field(rng: np.random.Generator, shape: Tuple[int, int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field around 1 (linear and quadratic terms): an MRI-like bias field."""
    z, y, x = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    c = rng.normal(0, strength, 4).astype(np.float32)
    return 1 + c[0] * z[:, None, None] + c[1] * y[None, :, None] + c[2] * x[None, None, :] \
        + c[3] * (y[None, :, None] ** 2 + x[None, None, :] ** 2)


def blob_mask(shape: Tuple[int, int, int], center: Tuple[float, float, float], radii: Tuple[float, float, float],
              wobble: float = 0.15, drift: Tuple[float, float] = (0.0, 0.0), phase: float = 0.0,
              lobes: int = 3) -> np.ndarray:
    """An ellipsoid whose in-plane radius wobbles with angle and depth and whose centre drifts along k."""
    D, H, W = shape
    z = np.arange(D, dtype=np.float32)[:, None, None]
    y = np.arange(H, dtype=np.float32)[None, :, None]
    x = np.arange(W, dtype=np.float32)[None, None, :]
    cz, cy, cx = center
    dz = (z - cz) / radii[0]
    cyz = cy + drift[0] * (z - cz)
    cxz = cx + drift[1] * (z - cz)
    ang = np.arctan2(y - cyz, x - cxz)
    mod = 1 + wobble * np.sin(lobes * ang + phase + 0.4 * (z - cz))
    r2 = ((y - cyz) / radii[1]) ** 2 + ((x - cxz) / radii[2]) ** 2
    return (r2 / mod ** 2 + dz ** 2) <= 1.0


def make_demo_volume(shape: Tuple[int, int, int] = (60, 160, 160), seed: int = 7
                     ) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """The demo/test volume: (image float32 (k,j,i) in CT-like units, mask uint8, spacing (i,j,k) in mm).

    A lesion-like object (a wobbling, drifting ellipsoid over ~2/3 of the slices) inside tissue with two
    distractor objects of similar intensity, a bias field and noise; the mask is the known truth.
    """
    rng = np.random.default_rng(seed)
    D, H, W = shape
    base = smooth_noise(rng, shape, (3, 10, 10))
    body = blob_mask(shape, (D / 2, H / 2, W / 2), (D * 3, H * 0.46, W * 0.46), wobble=0.05)
    img = np.where(body, 40 + 12 * base, -900).astype(np.float32)
    target = blob_mask(shape, (D * 0.5, H * 0.45, W * 0.55), (D * 0.33, H * 0.16, W * 0.13), wobble=0.18,
                       drift=(0.35, -0.25), phase=1.0, lobes=3)
    d1 = blob_mask(shape, (D * 0.3, H * 0.72, W * 0.3), (D * 0.2, H * 0.08, W * 0.08))
    d2 = blob_mask(shape, (D * 0.7, H * 0.25, W * 0.25), (D * 0.15, H * 0.07, W * 0.1))
    img[d1 | d2] = 95
    img[target] = 120 + 6 * base[target]
    img = ndi.gaussian_filter(img, (0.5, 1.0, 1.0))
    img = img * bias_field(rng, shape, 0.05) + rng.normal(0, 10, shape).astype(np.float32)
    return img.astype(np.float32), target.astype(np.uint8), (0.8, 0.8, 2.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)
