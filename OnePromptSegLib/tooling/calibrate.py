"""Calibrate the SSIM re-prompt threshold on real labelled volumes (no model needed).

    python -m OnePromptSegLib.tooling.calibrate ../shared/data/train [--quantile 0.05] [--json out.json]

For every task (label along k) it crops around the object exactly as the engine does (square in mm, resampled to
the model's input size, normalised per volume), blurs, and measures SSIM between a slice and the slices 1, 2, 4, 8
and 12 away.  The threshold is the given low quantile of the 1-slice SSIM: re-prompting then fires on the abrupt
changes (the rarest ``quantile`` of neighbouring steps), not on ordinary anatomy.  DESIGN.md explains why the
paper's fixed 0.6 cannot work: it never fires on clean 1 mm MRI and fires everywhere on noisy data.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

import numpy as np

from .bench import cases, tasks
from ..crops import crop_around, extract
from ..settings import EngineSettings
from ..io import normalize, read_label_volume, read_volume, robust_range
from ..ssim import blurred_ssim


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m OnePromptSegLib.tooling.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--quantile", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    st = EngineSettings()
    sims: Dict[int, List[float]] = {d: [] for d in (1, 2, 4, 8, 12)}
    for ip, lp in cases(a.data):
        vol = read_volume(ip)
        lbl = read_label_volume(lp, vol)
        lo, hi = robust_range(vol.array)
        sp = (vol.spacing[1], vol.spacing[0])
        for lab in tasks(lbl):
            gt = lbl == lab
            zs = np.flatnonzero(gt.any(axis=(1, 2)))
            for z in zs:
                box = crop_around(gt[z], gt[z].shape, sp, st.margin)
                a0 = normalize(extract(vol.array[z], box, a.size), lo, hi)
                for d in sims:
                    if z + d < vol.array.shape[0]:
                        b = normalize(extract(vol.array[z + d], box, a.size), lo, hi)
                        sims[d].append(blurred_ssim(a0, b, st.ssim_sigma))
    rows = {d: dict(n=len(v), p01=round(float(np.quantile(v, 0.01)), 3), p05=round(float(np.quantile(v, 0.05)), 3),
                    p25=round(float(np.quantile(v, 0.25)), 3), median=round(float(np.median(v)), 3),
                    below_0_6=round(float(np.mean(np.asarray(v) < 0.6)), 3))
            for d, v in sims.items() if v}
    thr = round(float(np.quantile(sims[1], a.quantile)), 3)
    out = dict(offsets=rows, quantile=a.quantile, threshold=thr)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
