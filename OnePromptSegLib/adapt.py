"""Test-time adaptation: fine-tune a copy of the model on the slices the user drew in *this* volume.

The drawn slices are the only ground truth the engine ever sees of a volume.  Before a propagation they become
training pairs made the way ``train`` makes them, but from this volume alone: a drawn slice is the template (its mask
corrupted as in training) and the query is (a) another drawn slice within ``reach`` slices (real pairs from this
patient; an empty drawn slice teaches where the structure ends) or (b) the template slice itself with a random
affine and gamma (with one drawn slice: what this structure looks like in this image).  A copy of the network takes
a few Adam steps on them; the shared model is never changed.  Seeded, so the same drawn slices give the same model.

Measured on train/ subsets and eval (docs/BENCHMARKS.md): from one drawn slice, 20 steps at lr 1e-4 raised the mean
volumetric Dice; larger learning rates or milder deformations did worse.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Dict, Generator, Tuple

import numpy as np
import torch

from .checkpoints import LoadedModel
from .crops import CropBox, crop_around, extract
from .prompts import KIND_INDEX, render_prompt_maps

#: share of pairs whose query is another drawn slice, where there is one within reach
REAL_PAIR_SHARE = 0.6


def adapt_model(model: LoadedModel, slice_crop: Callable[[int, CropBox], np.ndarray], anchors: Dict[int, np.ndarray],
                spacing: Tuple[float, float], steps: int, lr: float, batch: int, reach: int, seed: int = 0
                ) -> Generator[Tuple[int, int], None, LoadedModel]:
    """Fine-tune a copy of ``model`` on pairs of the drawn slices ``anchors`` (slice -> 2D mask); yields
    (steps done, steps) after each step and returns the adapted copy (``model`` itself when nothing is drawn).

    ``slice_crop(s, box)`` is slice ``s`` cropped to ``box`` at the model's size and normalised as in propagation.
    """
    from .training_parts import deform_query, loss_fn, simulate_prompt

    full = sorted(s for s, m in anchors.items() if m.any())
    if steps <= 0 or not full:
        return model
    if not isinstance(getattr(model, "model", None), torch.nn.Module):
        raise TypeError(f"test-time adaptation (adapt_steps) trains the network of a checkpoint loaded with "
                        f"load_model; {type(model).__name__} has none: set adapt_steps=0")
    rng = np.random.default_rng(seed)
    S, dev = model.size, model.device
    net = copy.deepcopy(model.model).float().train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    kinds = torch.full((batch, 1), KIND_INDEX["mask"], dtype=torch.int64, device=dev)
    with torch.enable_grad():
        for step in range(steps):
            qs, ts, ps, ys = [], [], [], []
            for _ in range(batch):
                a = int(full[rng.integers(len(full))])
                box = crop_around(anchors[a], anchors[a].shape, spacing, margin=float(rng.uniform(0.4, 0.9)))
                jr, jc = rng.uniform(-0.1, 0.1, 2)
                box = CropBox(box.r0 + jr * box.h, box.c0 + jc * box.w, box.h, box.w)
                timg = slice_crop(a, box)
                others = [b for b in anchors if b != a and abs(b - a) <= reach]
                if others and rng.random() < REAL_PAIR_SHARE:
                    b = int(others[rng.integers(len(others))])
                    q = slice_crop(b, box)
                    y = (extract(anchors[b].astype(np.float32), box, S) > 0.5).astype(np.float32)
                else:
                    y0 = (extract(anchors[a].astype(np.float32), box, S) > 0.5).astype(np.float32)
                    q, y = deform_query(rng, timg.copy(), y0)
                qs.append(q)
                ts.append(timg)
                ps.append(render_prompt_maps(simulate_prompt(rng, anchors[a], "mask", a), box, S))
                ys.append(y)
            as_t = lambda arrs, shape: torch.from_numpy(  # noqa: E731
                np.stack(arrs).astype(np.float32).reshape(shape)).to(dev)
            logits, qual = net(as_t(qs, (batch, 1, S, S)), as_t(ts, (batch, 1, 1, S, S)),
                               as_t(ps, (batch, 1, 4, S, S)), kinds)
            loss, _ = loss_fn(logits.float(), qual.float(), as_t(ys, (batch, 1, S, S)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield step + 1, steps
    net.eval().to(dtype=model.dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    return replace(model, model=net, _cache=type(model._cache)())
