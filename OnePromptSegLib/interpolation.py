"""The shape interpolated between two drawn slices: the prior that ``PropagationSession`` blends with the model's
probability inside a gap (``EngineSettings.interp_*``).

Where drawn slices are dense the interpolated shape is the better guess, where they are sparse the model.  Two ways:
shape interpolation of signed distances in place (what Slicer's Fill between slices does), or each drawn outline
carried along the optical flow between neighbouring slices before the two are blended (``interp_flow``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from .crops import CropBox, crop_around, extract, paste
from .flow import warp_mask
from .settings import EngineSettings

#: ``flow(s, src, box)``: the optical flow that carries a crop of slice ``src`` onto slice ``s``
FlowFn = Callable[[int, int, CropBox], Tuple[np.ndarray, np.ndarray]]


def signed_distance(mask: np.ndarray, spacing: Tuple[float, float]) -> np.ndarray:
    """Distance in mm to the mask's border, positive inside: interpolating two of these linearly morphs one shape
    into the other (the idea behind Fill between slices' shape interpolation)."""
    return ndi.distance_transform_edt(mask, sampling=spacing) - ndi.distance_transform_edt(~mask, sampling=spacing)


def gap_prior(settings: EngineSettings, a: int, b: int, mask_a: np.ndarray, mask_b: np.ndarray,
              spacing: Tuple[float, float], shape: Tuple[int, int], size: int, flow: FlowFn
              ) -> Tuple[Optional[Callable[[int], np.ndarray]], float]:
    """(slice -> interpolated-shape probabilities between drawn slices ``a`` and ``b``, its blending weight), or
    (None, 0) where not used: a gap longer than ``interp_gap``, or one end drawn empty.  ``shape`` is a slice's
    shape, ``size`` the model's input size (the crop the flow works in)."""
    st = settings
    if not (1 < b - a <= st.interp_gap and st.interp_weight > 0 and mask_a.any() and mask_b.any()):
        return None, 0.0
    ramp = st.interp_ramp
    weight = 1 - (1 - st.interp_weight) * min(1.0, (b - a - 2) / (ramp - 2)) if ramp > 2 else st.interp_weight
    if st.interp_flow:
        return flow_interpolation(a, b, mask_a, mask_b, spacing, shape, size, st.margin, flow), weight
    sa, sb = signed_distance(mask_a, spacing), signed_distance(mask_b, spacing)
    tau = min(spacing)

    def prior(k: int) -> np.ndarray:
        t = (k - a) / (b - a)
        return 1.0 / (1.0 + np.exp(-np.clip(((1 - t) * sa + t * sb) / tau, -30, 30)))
    return prior, weight


def flow_interpolation(a: int, b: int, mask_a: np.ndarray, mask_b: np.ndarray, spacing: Tuple[float, float],
                       shape: Tuple[int, int], size: int, margin: float, flow: FlowFn) -> Callable[[int], np.ndarray]:
    """Registration-based interpolation between drawn slices a and b: each drawn slice's signed distance (pixels of
    a crop around both) is carried slice by slice along the optical flow towards the other, and the two are blended
    linearly by position, as shape interpolation blends them where they were drawn.

    Shape interpolation alone morphs one outline into the other in place; an object that moves or turns between the
    drawn slices (a vessel, the spinal cord, thick cardiac slices) shrinks through the middle of the gap.  Calibrated
    on train/ (docs/BENCHMARKS.md): drawn slices to reach 0.90 from 8.87 to 8.30, 25 of 30 tasks instead of 24; the
    same with carried masks instead of signed distances 8.50.  Two flows per slice of the gap, ~6 ms each.
    """
    box = crop_around(mask_a | mask_b, shape, spacing, margin)
    drawn = {a: mask_a, b: mask_b}

    def carried(start: int, order: List[int]) -> Dict[int, np.ndarray]:
        m = extract(drawn[start].astype(np.float32), box, size) > 0.5
        out = {start: signed_distance(m, (1.0, 1.0)).astype(np.float32)}
        for prev, k in zip([start] + order, order):
            out[k] = warp_mask(out[prev], flow(k, prev, box))
        return out

    inner = list(range(a + 1, b))
    up, down = carried(a, inner), carried(b, inner[::-1])

    def prior(k: int) -> np.ndarray:
        t = (k - a) / (b - a)
        sd = (1 - t) * up[k] + t * down[k]
        vals, (rs, cs) = paste(1.0 / (1.0 + np.exp(-np.clip(sd, -30, 30))), box, shape)
        out = np.zeros(shape, np.float32)
        out[rs, cs] = vals
        return out
    return prior
