"""What a walk judges its slices by: SSIM to the prompt's slice (the re-prompting trigger) and the end-of-structure
score (the stop rule).

SSIM between two crops after a light blur: blurring first (sigma ~1 px) keeps noise from dominating SSIM; see
../shared/DESIGN.md for why raw SSIM with the paper's fixed threshold never fires on clean MRI and fires everywhere on
noisy data.

Where a structure ends: a walk from a drawn slice is prompted by its own previous mask, so past the structure's end a
small blob can survive slice after slice, and the model's quality alone does not flag it (docs/BENCHMARKS.md, "Where
the drawn slices go": a quality threshold that catches a third of the slices past the end also drops 2.6% of the
real ones).  Three cheap features of a predicted slice, measured against the drawn slice the walk started from,
separate them better together (``python -m OnePromptSegLib.tooling.ends``, leave-one-case-out on train/):

* the model's predicted quality;
* the predicted area against the drawn slice's area (log): structures taper towards their ends, a leak is small;
* the share of the predicted pixels whose intensity lies within the drawn region's 5th-95th percentiles: a leak
  often sits on other tissue.

``end_score`` is a logistic regression over them (weights in ``EngineSettings.end_weights``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


@dataclass(frozen=True)
class DrawnLook:
    """What a walk compares its slices with: the drawn slice's area and its region's intensity range."""

    area: int
    low: float
    high: float

    @classmethod
    def of(cls, image: np.ndarray, mask: np.ndarray) -> "DrawnLook":
        """The look of the drawn ``mask`` on its slice ``image`` (any intensity unit: only compared with itself)."""
        values = image[mask]
        low, high = np.percentile(values, [5, 95]) if values.size else (0.0, 0.0)
        return cls(int(values.size), float(low), float(high))


def end_features(look: DrawnLook, image: np.ndarray, mask: np.ndarray, quality: float) -> np.ndarray:
    """[quality, log(area / drawn area), share of the predicted pixels within the drawn intensity range] of a
    predicted (non-empty) ``mask`` on slice ``image``."""
    values = image[mask]
    ratio = values.size / max(look.area, 1)
    inside = float(np.count_nonzero((values >= look.low) & (values <= look.high))) / max(values.size, 1)
    return np.array([float(quality), float(np.log(max(ratio, 1e-3))), inside])


def end_score(features: np.ndarray, weights: Sequence[float]) -> float:
    """Probability that a slice lies past the structure's end: logistic regression, ``weights`` = (bias, one per
    feature of ``end_features``)."""
    z = float(weights[0]) + float(np.dot(np.asarray(weights[1:], float), features))
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))
