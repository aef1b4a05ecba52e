"""Synthetic labelled volumes: the demo volume, test volumes and unlimited training tasks.

Everything the project's tests and demo run on is generated here (never the real data in ../shared).
A volume has a tissue-like background (smoothed-noise label regions), a bias field, noise and blur, and objects that
appear, change shape, drift and vanish along the slice axis: ellipsoids with a wobbling radius and tubes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, ...], sigma) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _bias(rng: np.random.Generator, shape: Tuple[int, int, int], strength: float) -> np.ndarray:
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


def tube_mask(rng: np.random.Generator, shape: Tuple[int, int, int], radius: float) -> np.ndarray:
    """A tube that runs along k on a smooth random path, between two random depths."""
    D, H, W = shape
    z0, z1 = sorted(rng.integers(0, D, 2))
    if z1 - z0 < 4:
        z1 = min(D, z0 + 4 + int(rng.integers(0, D // 2 + 1)))
    t = np.linspace(0, 1, D)
    py = H * (0.3 + 0.4 * rng.random()) + H * 0.15 * np.sin(2 * np.pi * (t * rng.uniform(0.3, 1.2) + rng.random()))
    px = W * (0.3 + 0.4 * rng.random()) + W * 0.15 * np.cos(2 * np.pi * (t * rng.uniform(0.3, 1.2) + rng.random()))
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.zeros(shape, bool)
    for k in range(z0, z1):
        out[k] = (yy - py[k]) ** 2 + (xx - px[k]) ** 2 <= radius ** 2
    return out


def random_volume(rng: np.random.Generator, shape: Tuple[int, int, int] = (48, 112, 112),
                  n_blobs: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A random training volume: (image float32 in [0,1], labels uint8).  Labels 1-3 tissue, 4.. objects."""
    D, H, W = shape
    aniso = rng.uniform(1.0, 3.0)
    tissue_field = _smooth_noise(rng, shape, (rng.uniform(2, 6) / aniso, rng.uniform(4, 12), rng.uniform(4, 12)))
    levels = np.quantile(tissue_field, np.sort(rng.uniform(0.2, 0.9, 3)))
    labels = np.digitize(tissue_field, levels).astype(np.uint8)  # 0..3
    n_blobs = int(rng.integers(2, 6)) if n_blobs is None else n_blobs
    lab = 4
    for _ in range(n_blobs):
        if rng.random() < 0.25:
            m = tube_mask(rng, shape, rng.uniform(2, 7))
        else:
            rz = rng.uniform(4, D / 2)
            ry, rx = rng.uniform(5, H / 4), rng.uniform(5, W / 4)
            c = (rng.uniform(0.2, 0.8) * D, rng.uniform(0.25, 0.75) * H, rng.uniform(0.25, 0.75) * W)
            m = blob_mask(shape, c, (rz, ry, rx), wobble=rng.uniform(0, 0.3),
                          drift=tuple(rng.uniform(-0.6, 0.6, 2)), phase=rng.uniform(0, 6.3),
                          lobes=int(rng.integers(2, 6)))
        if m.sum() < 50:
            continue
        labels[m] = lab
        lab += 1
    nl = int(labels.max()) + 1
    means = rng.uniform(0, 1, nl).astype(np.float32)
    img = means[labels]
    tex = _smooth_noise(rng, shape, rng.uniform(0.5, 2.0)) * rng.uniform(0.02, 0.12)
    img = img + tex
    img = ndi.gaussian_filter(img, (rng.uniform(0, 0.8), rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)))
    img = img * _bias(rng, shape, rng.uniform(0, 0.15))
    img = img + rng.normal(0, rng.uniform(0.0, 0.08), shape).astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return img, labels


def make_demo_volume(shape: Tuple[int, int, int] = (60, 160, 160), seed: int = 7
                     ) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """The demo/test volume: (image float32 (k,j,i) in CT-like units, mask uint8, spacing (i,j,k) in mm).

    A lesion-like object (a wobbling, drifting ellipsoid over ~2/3 of the slices) inside tissue with two
    distractor objects of similar intensity, a bias field and noise; the mask is the known truth.
    """
    rng = np.random.default_rng(seed)
    D, H, W = shape
    base = _smooth_noise(rng, shape, (3, 10, 10))
    body = blob_mask(shape, (D / 2, H / 2, W / 2), (D * 3, H * 0.46, W * 0.46), wobble=0.05)
    img = np.where(body, 40 + 12 * base, -900).astype(np.float32)
    target = blob_mask(shape, (D * 0.5, H * 0.45, W * 0.55), (D * 0.33, H * 0.16, W * 0.13), wobble=0.18,
                       drift=(0.35, -0.25), phase=1.0, lobes=3)
    d1 = blob_mask(shape, (D * 0.3, H * 0.72, W * 0.3), (D * 0.2, H * 0.08, W * 0.08))
    d2 = blob_mask(shape, (D * 0.7, H * 0.25, W * 0.25), (D * 0.15, H * 0.07, W * 0.1))
    img[d1 | d2] = 95
    img[target] = 120 + 6 * base[target]
    img = ndi.gaussian_filter(img, (0.5, 1.0, 1.0))
    img = img * _bias(rng, shape, 0.05) + rng.normal(0, 10, shape).astype(np.float32)
    return img.astype(np.float32), target.astype(np.uint8), (0.8, 0.8, 2.0)
