"""SSIM between two crops after a light blur: the re-prompting trigger.

Blurring first (sigma ~1 px) keeps noise from dominating SSIM; see ../shared/DESIGN.md for why raw SSIM with the
paper's fixed threshold never fires on clean MRI and fires everywhere on noisy data.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity


def blur(a: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The blur ``blurred_ssim`` applies; callers comparing one crop with several can blur it once."""
    return ndi.gaussian_filter(a, sigma) if sigma > 0 else a


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two same-shape float images in [0, 1], already blurred with ``blur``."""
    return float(structural_similarity(a, b, data_range=1.0))


def blurred_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.0) -> float:
    """SSIM of two same-shape float images in [0, 1] after a Gaussian blur of ``sigma`` pixels."""
    return ssim(blur(a, sigma), blur(b, sigma))
