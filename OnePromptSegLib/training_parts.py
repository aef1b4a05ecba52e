"""What training and test-time adaptation share: user-like prompts simulated from a mask, a random deformation of
the query ("another patient"), and the loss.

Training (``tooling.train``) makes its pairs with these; test-time adaptation (``adapt``) fine-tunes on the drawn
slices of one volume with the same ones, so the runtime never imports the training script.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .prompts import BBox, Click, Doodle, MaskPrompt, Prompt


def simulate_prompt(rng: np.random.Generator, mask: np.ndarray, kind: str, s: int) -> Prompt:
    """A user-like prompt of ``kind`` on slice ``s`` for the 2D object ``mask``."""
    if kind == "mask":
        m = mask.copy()
        r = rng.random()
        if r < 0.2:
            m = ndi.binary_erosion(m, iterations=1) if m.sum() > 30 else m
        elif r < 0.4:
            m = ndi.binary_dilation(m, iterations=1)
        if rng.random() < 0.1 and m.sum() > 40:  # drop a chunk of the prompt's foreground
            rr, cc = np.nonzero(m)
            i = rng.integers(len(rr))
            rad = max(2, int(math.sqrt(m.sum()) * rng.uniform(0.1, 0.3)))
            yy, xx = np.ogrid[:m.shape[0], :m.shape[1]]
            m &= (yy - rr[i]) ** 2 + (xx - cc[i]) ** 2 > rad ** 2
        return MaskPrompt(s, m if m.any() else mask)
    rr, cc = np.nonzero(mask)
    if kind == "box":
        r0, r1, c0, c1 = rr.min(), rr.max(), cc.min(), cc.max()
        h, w = r1 - r0 + 1, c1 - c0 + 1
        j = rng.uniform(-0.1, 0.1, 4) * np.array([h, h, w, w])
        r0, r1 = np.clip([r0 + j[0], r1 + j[1]], 0, mask.shape[0] - 1)
        c0, c1 = np.clip([c0 + j[2], c1 + j[3]], 0, mask.shape[1] - 1)
        if r1 - r0 < 1 or c1 - c0 < 1:
            r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        return BBox(s, float(r0), float(c0), float(min(r1, mask.shape[0] - 1)), float(min(c1, mask.shape[1] - 1)))
    if kind == "click":
        inner = ndi.distance_transform_edt(mask)
        npos = int(rng.integers(1, 4))
        # Users click near the middle: sample proportional to the distance from the border.
        p = inner[rr, cc] ** 2
        p = p / p.sum()
        idx = rng.choice(len(rr), size=min(npos, len(rr)), replace=False, p=p)
        pts = [(float(rr[i]), float(cc[i])) for i in idx]
        labels = [1] * len(pts)
        nneg = int(rng.integers(0, 4))
        if nneg:
            ring = ndi.binary_dilation(mask, iterations=int(rng.integers(3, 12))) & ~mask
            nr, nc = np.nonzero(ring)
            if len(nr):
                for i in rng.choice(len(nr), size=min(nneg, len(nr)), replace=False):
                    pts.append((float(nr[i]), float(nc[i])))
                    labels.append(0)
        return Click(s, pts, labels)
    # doodle: a thin broken skeleton inside, a stroke in a band outside
    from skimage.morphology import skeletonize
    sk = skeletonize(ndi.binary_erosion(mask, iterations=1) if mask.sum() > 40 else mask)
    if not sk.any():
        sk = mask.copy()
    if rng.random() < 0.5:
        sr, sc = np.nonzero(sk)
        keep = rng.random(len(sr)) < rng.uniform(0.3, 1.0)
        sk2 = np.zeros_like(sk)
        sk2[sr[keep], sc[keep]] = True
        sk = sk2 if sk2.any() else sk
    bg = None
    if rng.random() < 0.5:
        band = ndi.binary_dilation(mask, iterations=int(rng.integers(3, 8)))
        bg = (band ^ ndi.binary_erosion(band)) & ~mask  # a 1-px contour around the object
        if rng.random() < 0.5:  # partial stroke
            br, bc = np.nonzero(bg)
            if len(br):
                ang = np.arctan2(br - br.mean(), bc - bc.mean())
                a0 = rng.uniform(-np.pi, np.pi)
                keep = np.cos(ang - a0) > 0
                bg = np.zeros_like(bg)
                bg[br[keep], bc[keep]] = True
    return Doodle(s, sk, bg)


def deform_query(rng: np.random.Generator, img: np.ndarray, tgt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Random affine + gamma on the query: the template comes from "another patient"."""
    S = img.shape[0]
    ang = rng.uniform(-0.35, 0.35)
    sc = rng.uniform(0.8, 1.25, 2)
    A = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) @ np.diag(1 / sc)
    c = np.array([S / 2, S / 2])
    off = c - A @ c + rng.uniform(-0.08, 0.08, 2) * S
    img = ndi.affine_transform(img, A, off, order=1, mode="constant")
    tgt = ndi.affine_transform(tgt, A, off, order=1, mode="constant")
    img = np.clip(img, 0, 1) ** rng.uniform(0.6, 1.6)
    return img.astype(np.float32), (tgt > 0.5).astype(np.float32)


def loss_fn(logits: torch.Tensor, quality: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """BCE + soft Dice on the mask; MSE of the quality head against the Dice actually reached."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    den = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    soft = 1 - (2 * inter + 1) / (den + 1)
    with torch.no_grad():
        hard = (p > 0.5).float()
        hi = (hard * target).flatten(1).sum(1)
        hd = hard.flatten(1).sum(1) + target.flatten(1).sum(1)
        dice = torch.where(hd > 0, 2 * hi / hd.clamp_min(1), torch.ones_like(hd))
    q = F.mse_loss(quality, dice)
    return bce + soft.mean() + 0.5 * q, dice.mean()
