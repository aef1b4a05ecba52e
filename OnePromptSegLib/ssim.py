"""SSIM between two crops after a light blur: the re-prompting trigger.

Blurring first (sigma ~1 px) keeps noise from dominating SSIM; see ../shared/DESIGN.md for why raw SSIM with the
paper's fixed threshold never fires on clean MRI and fires everywhere on noisy data.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity


def blurred_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.0) -> float:
    """SSIM of two same-shape float images in [0, 1] after a Gaussian blur of ``sigma`` pixels."""
    if sigma > 0:
        a = ndi.gaussian_filter(a, sigma)
        b = ndi.gaussian_filter(b, sigma)
    return float(structural_similarity(a, b, data_range=1.0))
