"""Dense optical flow between two crops (TV-L1), used to carry a walk's result from one slice to the next.

The model predicts slice s from slice s-1's image and mask; a mask (or probabilities) warped by the optical flow
between the two images follows the anatomy's shift and shrinkage, which the model, trained to keep shapes, follows
poorly on thin slices (left atrium, spinal cord).  The engine averages the two (``EngineSettings.flow_weight``,
``PropagationSession._with_flow``; docs/BENCHMARKS.md).

This is the TV-L1 solver of scikit-image (``skimage.registration.optical_flow_tvl1``: Zach et al. 2007, Wedel et
al. 2009, coarse to fine), written out because scikit-image's takes ~110 ms on a 96 x 96 crop, more than a model
step: its data term updates through boolean fancy indexing and each flow component is regularised in its own loop.
Here both components go through each operation at once, the data term uses ``np.where`` and the pyramid is 2 x 2
mean pooling; the engine asks for fewer iterations at half its input size (calibrated).  The result matches
scikit-image's to within a small fraction of a pixel on smooth images (Testing/test_flow.py).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage as ndi


def _warp(img: np.ndarray, flow: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """``img`` sampled at (row + flow[0], col + flow[1]), bilinear, edges repeated."""
    return ndi.map_coordinates(img, [rr + flow[0], cc + flow[1]], order=1, mode="nearest")


def _grid(shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel (``_warp``'s base grid)."""
    return np.meshgrid(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32), indexing="ij")


def pool(img: np.ndarray) -> np.ndarray:
    """``img`` at half the size, by 2 x 2 means (an odd last row or column is dropped)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))


def _solve(ref: np.ndarray, mov: np.ndarray, flow: np.ndarray, attachment: float, tightness: float,
           num_warp: int, num_iter: int) -> np.ndarray:
    """TV-L1 at one pyramid level, from ``flow`` (2, H, W); scikit-image's ``_tvl1`` (2D), vectorised."""
    dt = 0.25  # time step: 0.5 / ndim
    f0, f1 = attachment * tightness, dt / tightness
    rr, cc = _grid(ref.shape)
    proj = np.zeros((2, 2) + ref.shape, np.float32)  # dual variables: [flow component, axis]
    g = np.zeros((2, 2) + ref.shape, np.float32)  # forward differences, zero at the last row / column
    flow = flow.astype(np.float32, copy=True)
    for _ in range(num_warp):
        warped = _warp(mov, flow, rr, cc)
        grad = np.stack(np.gradient(warped))
        ni = (grad * grad).sum(0)
        ni[ni == 0] = 1
        rho0 = warped - ref - (grad * flow).sum(0)
        for _ in range(num_iter):
            rho = rho0 + (grad * flow).sum(0)
            small = np.abs(rho) <= f0 * ni
            step = np.where(small, rho / ni, f0 * np.sign(rho))
            aux = flow - step * grad
            flow = aux  # never changed in place: each update below makes a new array
            for _ in range(2):  # scikit-image's reg_num_iter
                g[:, 0, :-1] = np.diff(flow, axis=1)
                g[:, 1, :, :-1] = np.diff(flow, axis=2)
                norm = 1.0 + f1 * np.sqrt((g * g).sum(1, keepdims=True))
                proj -= dt * g
                proj /= norm
                d = -proj.sum(1)
                d[:, 1:, :] += proj[:, 0, :-1, :]
                d[:, :, 1:] += proj[:, 1, :, :-1]
                flow = aux + d
    return flow


def tvl1(reference: np.ndarray, moving: np.ndarray, attachment: float = 15.0, tightness: float = 0.3,
         num_warp: int = 5, num_iter: int = 10, min_size: int = 16) -> Tuple[np.ndarray, np.ndarray]:
    """Optical flow (v, u) such that ``moving[r + v, c + u]`` matches ``reference[r, c]`` (scikit-image's
    convention), coarse to fine from the coarsest 2x reduction larger than ``2 * min_size``."""
    ref, mov = [np.asarray(reference, np.float32)], [np.asarray(moving, np.float32)]
    while min(ref[-1].shape) > 2 * min_size:
        ref.append(pool(ref[-1]))
        mov.append(pool(mov[-1]))
    flow = np.zeros((2,) + ref[-1].shape, np.float32)
    for level in range(len(ref) - 1, -1, -1):
        if flow.shape[1:] != ref[level].shape:
            flow = np.stack(resize_flow((flow[0], flow[1]), ref[level].shape))
        flow = _solve(ref[level], mov[level], flow, attachment, tightness, num_warp, num_iter)
    return flow[0], flow[1]


def resize_flow(flow: Tuple[np.ndarray, np.ndarray], shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """A flow (v, u) resampled (bilinear) to ``shape``, its vectors scaled to the new pixel size."""
    zr, zc = shape[0] / flow[0].shape[0], shape[1] / flow[0].shape[1]
    v, u = (ndi.zoom(f, (zr, zc), order=1, mode="nearest", grid_mode=True) for f in flow)
    return (v * np.float32(zr)).astype(np.float32), (u * np.float32(zc)).astype(np.float32)


def warp_mask(mask: np.ndarray, flow: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A (soft) mask carried along ``flow``: ``mask`` sampled at (row + v, col + u), bilinear, edges repeated."""
    rr, cc = _grid(mask.shape)
    return _warp(np.asarray(mask, np.float32), np.stack(flow), rr, cc)
