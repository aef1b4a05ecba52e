"""Synthetic labelled volumes for training: unlimited random tasks (the demo volume is ``OnePromptSegLib.sample``).

A volume has a tissue-like background (smoothed-noise label regions), a bias field, noise and blur, and objects that
appear, change shape, drift and vanish along the slice axis: ellipsoids with a wobbling radius and tubes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..sample import bias_field, blob_mask, smooth_noise


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
    tissue_field = smooth_noise(rng, shape, (rng.uniform(2, 6) / aniso, rng.uniform(4, 12), rng.uniform(4, 12)))
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
    tex = smooth_noise(rng, shape, rng.uniform(0.5, 2.0)) * rng.uniform(0.02, 0.12)
    img = img + tex
    img = ndi.gaussian_filter(img, (rng.uniform(0, 0.8), rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)))
    img = img * bias_field(rng, shape, rng.uniform(0, 0.15))
    img = img + rng.normal(0, rng.uniform(0.0, 0.08), shape).astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return img, labels
