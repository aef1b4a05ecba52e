"""Fit the end-of-structure classifier (``OnePromptSegLib.ssim``) on real labelled volumes.

    python -m OnePromptSegLib.tooling.ends DATA_DIR [--features out.json] [--from features.json]

For every task of the benchmark (label along k, the largest slice drawn) the walks run to the volume's edges with no
stop rule of any kind; every predicted slice past the drawn one gives the engine's own ``end_features`` and a label:
is the truth empty there (the walk ran past the structure's end)?  A class-balanced logistic regression is fitted
on them; it prints the weights for ``EngineSettings.end_weights``, the leave-one-case-out AUC, and for a few
thresholds the share of real slices and of slices past the end that score above them (the first is what a threshold
costs, the second what it catches).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from .bench import cases, tasks


def collect(data: str, model_name: Optional[str], device: str) -> List[Dict]:
    """One row per predicted slice past the drawn one: case, label, slice, features, past_end."""
    from ..checkpoints import load_model
    from ..io import read_label_volume, read_volume
    from ..prompts import MaskPrompt
    from ..session import PropagationSession
    from ..settings import EngineSettings

    model = load_model(model_name, device)
    settings = EngineSettings.for_model(model, stop_after_empty=10 ** 9, min_quality=0.0, cut_tail=False,
                                        end_threshold=1.0)
    rows = []
    for ip, lp in cases(data):
        vol = read_volume(ip)
        lbl = read_label_volume(lp, vol)
        for lab in tasks(lbl):
            gt = lbl == lab
            k0 = int(gt.sum(axis=(1, 2)).argmax())
            sess = PropagationSession(model, settings)
            sess.set_volume(vol.array, "k", vol.spacing)
            sess.add_prompt(MaskPrompt(k0, gt[k0]))
            for _ in sess.propagate():
                pass
            for s, f in sorted(sess.end_features.items()):
                rows.append(dict(case=ip, label=lab, slice=s, features=[round(float(v), 5) for v in f],
                                 past_end=int(not gt[s].any())))
            print(f"{ip} label {lab}: {len(sess.end_features)} slices", file=sys.stderr, flush=True)
    return rows


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 4000) -> np.ndarray:
    """Class-balanced logistic regression by gradient descent on standardised features; (bias, weights) in the
    features' own units."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    xs = (x - mu) / sd
    w, b = np.zeros(x.shape[1]), 0.0
    balance = np.where(y == 1, 0.5 / max(y.mean(), 1e-9), 0.5 / max(1 - y.mean(), 1e-9))
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xs @ w + b)))
        g = (p - y) * balance
        w -= 0.1 * (xs.T @ g / len(y) + l2 * w)
        b -= 0.1 * g.mean()
    return np.concatenate([[b - (w / sd) @ mu], w / sd])


def _scores(x: np.ndarray, wb: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(wb[0] + x @ wb[1:])))


def report(rows: List[Dict]) -> Tuple[np.ndarray, Dict]:
    """(fitted weights, summary with the leave-one-case-out AUC and operating points)."""
    x = np.array([r["features"] for r in rows], float)
    y = np.array([r["past_end"] for r in rows], float)
    groups = np.array([r["case"] for r in rows])
    held = np.zeros(len(y))
    for case in np.unique(groups):
        out = groups == case
        held[out] = _scores(x[out], fit(x[~out], y[~out]))
    pos, neg = held[y == 1], held[y == 0]
    auc = float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()) if len(pos) else None
    points = {f"{t:.2f}": dict(real=round(float((neg > t).mean()), 4), past_end=round(float((pos > t).mean()), 4))
              for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
    wb = fit(x, y)
    return wb, dict(slices=len(y), past_end=int(y.sum()), loco_auc=auc, loco_points=points,
                    end_weights=[round(float(v), 4) for v in wb])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m OnePromptSegLib.tooling.ends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default="", help="folder of <case>_img/_lbl.nii.gz (not with --from)")
    ap.add_argument("--from", dest="source", default="", help="features collected earlier (--features)")
    ap.add_argument("--features", default="", help="write the collected features here")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if a.source:
        with open(a.source) as f:
            rows = json.load(f)
    elif a.data:
        rows = collect(a.data, a.model, a.device)
    else:
        ap.error("give a data folder or --from")
    if a.features:
        with open(a.features, "w") as f:
            json.dump(rows, f)
    _, summary = report(rows)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
