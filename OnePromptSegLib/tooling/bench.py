"""``onepromptseg-dev bench DATA_DIR``: the project's benchmark, in-process.

It follows the reference protocol (../shared/tools/eval_propagation.py): for every <case>_img/_lbl.nii.gz and each of
its (up to 4 largest) labels along k, the ground-truth mask of the largest slice is the one prompt -> volumetric Dice
(``dice1``) and Dice within +-10 slices (``win10``); then the worst slice's truth is added as a corrected slice until
Dice >= 0.90 (``noi90``, capped).  Corrections go through ``PropagationSession.correct`` so only the affected range
is recomputed, as in the Slicer module.  It also reports, per prompt kind, the first slice from a click, a box and a
doodle alone and the volume propagated from it, and One-Prompt transfer (prompt one case, segment another case of
the same dataset), with timings.  ``--one-step`` adds the model's accuracy one slice away from the truth, next to
copying the truth (a low-noise measure of a checkpoint, free of the walk's drift).  ``--clicks N`` adds click
corrections as nnInteractive's papers measure them: after the drawn largest slice, N simulated clicks, each at the
centre of the largest error region (``correction_click``), each refining its slice (``refine_slice``) and
re-propagating; the volume's Dice after 1, 3 and 5 clicks sits next to that of 2 drawn slices (``drawn2``, the
protocol's first correction).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..sample import dice


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="folder with <case>_img.nii.gz and <case>_lbl.nii.gz files (searched recursively)")
    p.add_argument("--kinds", default="mask,box,click,doodle", help="prompt kinds to measure (mask = the protocol)")
    p.add_argument("--transfer", action="store_true",
                   help="also measure transfer between two cases of a dataset: One-Prompt's seed search alone "
                        "(transfer_dice), the registered template's labels alone (reg_dice) and the engine refining "
                        "from them (template_dice, the template mode), with seconds per case")
    p.add_argument("--transfer-only", action="store_true", help="--transfer without the single-volume tasks")
    p.add_argument("--ends", action="store_true",
                   help="also measure the usual correction: the largest slice plus the first slice past each end of "
                        "the structure drawn empty (one propagation; ends_dice)")
    p.add_argument("--one-step", action="store_true",
                   help="also measure one model step from the truth of the neighbouring slice against copying that "
                        "truth (one_step, copy_step): the model's own accuracy, without a walk's drift")
    p.add_argument("--clicks", type=int, default=0,
                   help="also measure this many simulated correction clicks after the drawn largest slice "
                        "(click_dice after 1, 3, 5 ...; drawn2: Dice with 2 drawn slices)")
    p.add_argument("--max-anchors", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--ssim-threshold", type=float, default=None)
    p.add_argument("--no-reprompt", action="store_true")
    p.add_argument("--max-templates", type=int, default=None)
    p.add_argument("--no-stop", action="store_true")
    p.add_argument("--no-flow", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any EngineSettings field, e.g. --set min_quality=0.2 (calibration sweeps)")
    p.add_argument("--json", default="", help="write rows and summary to this file")
    p.add_argument("--figure", default="", help="PNG of the worst single-prompt task: truth green, result red")
    p.set_defaults(func=cmd_bench)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="100,256,256", help="volume shape k,j,i (e.g. 300,512,512)")
    p.add_argument("--dtype", default="int16", help="voxel type of the generated volume")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="propagate this many times, each in a new session; the first run pays torch's first-call "
                        "costs (once per process: once per Slicer session), later ones are reported as warm")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any EngineSettings field, e.g. --set flow_weight=0 (what a setting costs)")
    p.set_defaults(func=cmd_speed)


def speed_volume(shape: Sequence[int], dtype: str = "int16") -> Tuple[np.ndarray, np.ndarray]:
    """(volume, object mask) of ``speed``: a wobbling blob through every slice, 300 inside and 40 outside."""
    from ..sample import blob_mask

    D, H, W = shape
    vol = np.zeros((D, H, W), np.dtype(dtype))
    obj = np.zeros((D, H, W), bool)
    for k in range(D):  # one slice at a time: the test volume itself must not need a float copy
        m = blob_mask((1, H, W), (0, H * 0.45, W * 0.5), (1, H * 0.12, W * 0.1), wobble=0.1, phase=k * 0.05)[0]
        obj[k] = m
        vol[k] = np.where(m, 300, 40).astype(vol.dtype)
    return vol, obj


def cmd_speed(args: argparse.Namespace) -> int:
    """Time per slice step and peak memory on a generated volume with an object through every slice.

    ``ms_per_slice`` is the first run (cold); with ``--repeat`` the median of the later runs is ``ms_per_slice_warm``.
    """
    import resource

    import torch

    from ..checkpoints import load_model
    from ..session import PropagationSession
    from ..settings import EngineSettings
    from ..prompts import MaskPrompt

    if args.threads:
        torch.set_num_threads(args.threads)
    D, H, W = (int(v) for v in args.shape.split(","))
    overrides = EngineSettings.parse(args.set)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vol, obj = speed_volume((D, H, W), args.dtype)
    vol_mb = vol.nbytes / 2 ** 20
    model = load_model(args.model, args.device)
    runs = []
    for _ in range(max(1, args.repeat)):
        # A new session each time: its slices are new keys to the feature cache, so nothing is reused.
        sess = PropagationSession(model, EngineSettings.for_model(model, **overrides))
        sess.set_volume(vol, "k", (0.7, 0.7, 1.5))
        k0 = D // 2
        sess.add_prompt(MaskPrompt(k0, obj[k0]))
        t0 = time.time()
        n = sum(1 for _ in sess.propagate())
        runs.append(time.time() - t0)
    dt = runs[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = dict(shape_kji=[D, H, W], dtype=args.dtype, device=str(model.device), threads=torch.get_num_threads(),
               slices=n, seconds=round(dt, 3), ms_per_slice=round(1000 * dt / max(n, 1), 1),
               volume_mb=round(vol_mb, 1), result_mb=round(sess.result.nbytes / 2 ** 20, 1),
               peak_rss_mb=round(peak, 1), rss_before_volume_mb=round(rss0, 1), dice=round(dice(sess.result, obj), 4))
    if len(runs) > 1:
        out.update(seconds_runs=[round(r, 3) for r in runs],
                   ms_per_slice_warm=round(1000 * float(np.median(runs[1:])) / max(n, 1), 1))
    print(json.dumps(out))
    return 0


def tasks(lbl: np.ndarray, min_vox: int = 200, min_slices: int = 3, max_labels: int = 4) -> List[int]:
    """The labels the reference protocol evaluates: largest first, enough voxels and slices."""
    ids, counts = np.unique(lbl[lbl > 0], return_counts=True)
    out = []
    for i, c in sorted(zip(ids, counts), key=lambda t: -t[1]):
        m = lbl == i
        if c >= min_vox and (m.sum(axis=(1, 2)) > 0).sum() >= min_slices:
            out.append(int(i))
    return out[:max_labels]


def _deepest(m: np.ndarray, spacing: Sequence[float]) -> Tuple[int, int]:
    """The most interior pixel of the 2D mask ``m`` (greatest distance in mm to its outside, the slice's border
    counting as outside)."""
    d = ndi.distance_transform_edt(np.pad(m, 1), sampling=spacing)[1:-1, 1:-1]
    r, c = np.unravel_index(int(d.argmax()), d.shape)
    return int(r), int(c)


def leak_share(pred: np.ndarray, gt: np.ndarray) -> float:
    """Predicted voxels on slices (along k) whose truth is empty, as a share of all predicted voxels (0 when nothing
    is predicted): issue 17's measure of a result that runs on past the structure's ends."""
    total = int(np.count_nonzero(pred))
    if total == 0:
        return 0.0
    outside = ~gt.any(axis=(1, 2))
    return int(np.count_nonzero(pred[outside])) / total


def simulated_prompt(kind: str, m: np.ndarray, s: int, spacing: Sequence[float] = (1.0, 1.0)):
    """A deterministic user-like prompt of ``kind`` for the 2D truth ``m`` on slice ``s`` (in-plane ``spacing``,
    rows then columns): issue 19's protocol, one click at the most interior truth pixel, one tight box."""
    from skimage.morphology import skeletonize

    from ..prompts import BBox, Click, Doodle, MaskPrompt

    if kind == "mask":
        return MaskPrompt(s, m)
    rr, cc = np.nonzero(m)
    if kind == "box":
        return BBox(s, float(rr.min()), float(cc.min()), float(max(rr.max(), rr.min() + 1)),
                    float(max(cc.max(), cc.min() + 1)))
    if kind == "click":
        r, c = _deepest(m, spacing)
        return Click(s, [(float(r), float(c))], [1])
    sk = skeletonize(m)
    return Doodle(s, sk if sk.any() else m, None)


def correction_click(pred: np.ndarray, gt: np.ndarray, spacing_kji: Sequence[float]):
    """A simulated correction click: on the largest connected error region (missed or wrongly held voxels, whichever
    region is larger), on the slice where it is widest, at its most interior pixel there; a positive click (Click
    label 1) on a missed region, a negative one on a wrong region.  None when there is no error.

    The centre in 3D (nnInteractive's choice) often fell on a region's first or last slice where slices are few
    (the volume's border counts as outside), a pixel from its edge: a user looks at the slice where the error is
    widest and clicks its middle.
    """
    from ..prompts import Click

    best = None
    for label, err in ((1, gt & ~pred), (0, pred & ~gt)):
        parts, n = ndi.label(err)
        if n:
            sizes = np.bincount(parts.ravel())[1:]
            if best is None or sizes.max() > best[0]:
                best = (int(sizes.max()), label, parts == int(sizes.argmax()) + 1)
    if best is None:
        return None
    _, label, region = best
    z = int(region.sum(axis=(1, 2)).argmax())
    r, c = _deepest(region[z], spacing_kji[1:])
    return Click(z, [(float(r), float(c))], [label])


def _correction_dice(model, settings, vol, gt: np.ndarray, k0: int, clicks: int) -> Tuple[List[float], List[float]]:
    """(volume Dice after each simulated correction click, seconds per refinement) after the drawn largest slice."""
    from ..session import PropagationSession
    from ..prompts import MaskPrompt

    sess = PropagationSession(model, settings)
    sess.set_volume(vol.array, "k", vol.spacing)
    sess.add_prompt(MaskPrompt(k0, gt[k0]))
    for _ in sess.propagate():
        pass
    out, times = [], []
    for _ in range(clicks):
        click = correction_click(sess.result.astype(bool), gt, vol.spacing_kji)
        if click is not None:
            t0 = time.perf_counter()
            sess.refine_slice(click.slice_index, click)
            times.append(time.perf_counter() - t0)
            for _ in sess.propagate():
                pass
        out.append(dice(sess.result, gt))
    return out, times


def _ends_dice(model, settings, vol, gt: np.ndarray, k0: int) -> float:
    """Volumetric Dice after what a user does first: draw the largest slice, and erase the first slice past each end
    of the structure (drawn empty).  Checks that the engine does not cut real slices when told where an end is."""
    from ..session import PropagationSession
    from ..prompts import MaskPrompt

    zs = np.flatnonzero(gt.any(axis=(1, 2)))
    sess = PropagationSession(model, settings)
    sess.set_volume(vol.array, "k", vol.spacing)
    sess.add_prompt(MaskPrompt(k0, gt[k0]))
    for z in (int(zs.min()) - 1, int(zs.max()) + 1):
        if 0 <= z < gt.shape[0]:
            sess.add_prompt(MaskPrompt(z, np.zeros_like(gt[z])))
    for _ in sess.propagate():
        pass
    return dice(sess.result, gt)


def _one_step(sess, gt: np.ndarray) -> Dict[str, float]:
    """Mean Dice over all neighbouring slice pairs holding the structure (both directions) of one model step from
    the neighbour's truth (``one_step``) and of copying that truth (``copy_step``).  Where slices are close the copy
    is hard to beat; a model below it drifts in a walk (BENCHMARKS.md, 2026-11-30)."""
    model_d, copy_d = [], []
    for k in range(1, gt.shape[0]):
        if gt[k - 1].any() and gt[k].any():
            for src, dst in ((k - 1, k), (k, k - 1)):
                model_d.append(dice(sess.predict_from(dst, src, gt[src]), gt[dst]))
                copy_d.append(dice(gt[src], gt[dst]))
    if not model_d:
        return {}
    return dict(one_step=round(float(np.mean(model_d)), 4), copy_step=round(float(np.mean(copy_d)), 4))


def cases(data_dir: str):
    for ip in sorted(glob.glob(os.path.join(data_dir, "**", "*_img.nii.gz"), recursive=True)):
        lp = ip.replace("_img.nii.gz", "_lbl.nii.gz")
        if os.path.exists(lp):
            yield ip, lp


def cmd_bench(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model
    from ..cli import settings_from_args
    from ..session import PropagationSession
    from ..io import read_label_volume, read_volume
    from ..prompts import MaskPrompt, PromptError

    warnings.simplefilter("ignore")
    model = load_model(args.model, args.device)
    settings = settings_from_args(model, args)
    kinds = [k for k in args.kinds.split(",") if k]
    rows: List[Dict] = []
    worst = None
    loaded = {}
    t_all = time.time()
    step_times: List[float] = []
    for ip, lp in cases(args.data):
        vol = read_volume(ip)
        lbl = read_label_volume(lp, vol)
        loaded[ip] = (vol, lbl)
        for lab in [] if args.transfer_only else tasks(lbl):
            gt = (lbl == lab)
            area = gt.sum(axis=(1, 2))
            k0 = int(area.argmax())
            row: Dict = dict(case=os.path.relpath(ip, args.data), label=lab, slices=int((area > 0).sum()))
            sess = PropagationSession(model, settings)
            sess.set_volume(vol.array, "k", vol.spacing)
            sess.add_prompt(MaskPrompt(k0, gt[k0]))
            t0 = time.time()
            n = sum(1 for _ in sess.propagate())
            step_times.append((time.time() - t0) / max(n, 1))
            pred = sess.result
            row["dice1"] = round(dice(pred, gt), 4)
            if args.figure and (worst is None or row["dice1"] < worst[0]):
                worst = (row["dice1"], vol.array, gt, pred.copy())
            lo, hi = max(0, k0 - 10), min(gt.shape[0], k0 + 11)
            row["win10"] = round(dice(pred[lo:hi], gt[lo:hi]), 4)
            row["leak1"] = round(leak_share(pred, gt), 4)
            anchors = [k0]
            d = row["dice1"]
            row["drawn2"] = row["dice1"]  # already at 0.90: the protocol draws no second slice
            while d < 0.90 and len(anchors) < args.max_anchors:
                per = [dice(pred[z], gt[z]) if (gt[z].any() or pred[z].any()) else 1.0 for z in range(gt.shape[0])]
                # numpy's default sort, as the reference script: among equally bad slices (often several at Dice 0)
                # it decides which one is drawn, and a stable sort (lowest index first) drew different slices
                cand = [int(z) for z in np.argsort(per) if int(z) not in anchors]
                if not cand:
                    break
                anchors.append(cand[0])
                sess.correct(cand[0], gt[cand[0]])
                for _ in sess.propagate():
                    pass
                pred = sess.result
                d = dice(pred, gt)
                if len(anchors) == 2:
                    row["drawn2"] = round(d, 4)
            row["noi90"] = len(anchors) if d >= 0.90 else None
            row["final"] = round(d, 4)
            row["drawn_empty"] = sum(1 for z in anchors if not gt[z].any())  # drawn to end a run past the structure
            row["ms_per_slice"] = round(1000 * step_times[-1], 1)
            if args.ends:
                row["ends_dice"] = round(_ends_dice(model, settings, vol, gt, k0), 4)
            if args.one_step:
                row.update(_one_step(sess, gt))
            if args.clicks:
                after, took = _correction_dice(model, settings, vol, gt, k0, args.clicks)
                row["click_dice"] = [round(v, 4) for v in after]
                row["ms_per_refine"] = round(1000 * float(np.mean(took)), 1) if took else None
            for kind in kinds:
                if kind == "mask":
                    continue
                s2 = PropagationSession(model, settings)
                s2.set_volume(vol.array, "k", vol.spacing)
                try:
                    t0 = time.perf_counter()
                    first = s2.add_prompt(simulated_prompt(kind, gt[k0], k0, vol.spacing_kji[1:]))
                    row[f"{kind}_ms"] = round(1000 * (time.perf_counter() - t0), 1)
                    for _ in s2.propagate():
                        pass
                    row[f"{kind}_first"] = round(dice(first, gt[k0]), 4)
                    row[f"{kind}_dice1"] = round(dice(s2.result, gt), 4)
                except PromptError:
                    row[f"{kind}_first"] = 0.0
                    row[f"{kind}_dice1"] = 0.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.transfer or args.transfer_only:
        from ..template import template_session

        by_ds: Dict[str, List[str]] = {}
        for ip in loaded:
            by_ds.setdefault(os.path.dirname(ip), []).append(ip)
        for ds, ips in by_ds.items():
            for a, b in zip(ips, ips[1:] + ips[:1]):
                if a == b:
                    continue
                (va, la), (vb, lb) = loaded[a], loaded[b]
                for lab in tasks(lb)[:2]:
                    if not (la == lab).any():
                        continue
                    ga, gb = la == lab, lb == lab
                    ka = int(ga.sum(axis=(1, 2)).argmax())
                    t0 = time.time()
                    sess = PropagationSession(model, settings)
                    sess.set_volume(vb.array, "k", vb.spacing)
                    try:
                        sess.add_reference(va.array, MaskPrompt(ka, ga[ka]), "k", va.spacing)
                        for _ in sess.propagate():
                            pass
                        dt = dice(sess.result, gb)
                    except PromptError:
                        dt = 0.0
                    t1 = time.time()
                    try:
                        tsess, prior = template_session(model, vb, va, ga, "k", settings)
                        t2 = time.time()
                        for _ in tsess.propagate():
                            pass
                        reg_d, template_d = dice(prior > 0.5, gb), dice(tsess.result, gb)
                    except PromptError:  # the registered structure fell outside the target
                        t2, reg_d, template_d = time.time(), 0.0, 0.0
                    r = dict(transfer_from=os.path.relpath(a, args.data), case=os.path.relpath(b, args.data),
                             label=lab, transfer_dice=round(dt, 4), reg_dice=round(reg_d, 4),
                             template_dice=round(template_d, 4), transfer_s=round(t1 - t0, 1),
                             registration_s=round(t2 - t1, 1), template_s=round(time.time() - t1, 1))
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    main_rows = [r for r in rows if "dice1" in r]
    summ: Dict = dict(tasks=len(main_rows), model=model.name, device=str(model.device),
                      dice1=_mean(main_rows, "dice1"), win10=_mean(main_rows, "win10"),
                      leak1=_mean(main_rows, "leak1"),
                      reached90=sum(1 for r in main_rows if r["noi90"]),
                      mean_noi90_capped=round(float(np.mean([r["noi90"] or args.max_anchors for r in main_rows])), 2)
                      if main_rows else None,
                      drawn_empty=(round(float(np.mean([r["drawn_empty"] for r in main_rows])), 2)
                                   if main_rows else None),
                      ms_per_slice=round(1000 * float(np.mean(step_times)), 1) if step_times else None,
                      seconds=round(time.time() - t_all, 1))
    for kind in kinds:
        if kind != "mask":
            summ[f"{kind}_first"] = _mean(main_rows, f"{kind}_first")
            firsts = [r[f"{kind}_first"] for r in main_rows if f"{kind}_first" in r]
            if firsts:
                summ[f"{kind}_first_min"] = round(float(min(firsts)), 4)
                summ[f"{kind}_first_below_0.3"] = sum(1 for v in firsts if v < 0.3)
            summ[f"{kind}_dice1"] = _mean(main_rows, f"{kind}_dice1")
            summ[f"{kind}_ms"] = _mean(main_rows, f"{kind}_ms")
    if args.clicks:
        summ["drawn2"] = _mean(main_rows, "drawn2")
        for n in sorted({1, 3, 5, args.clicks}):
            if n <= args.clicks:
                summ[f"click_dice_{n}"] = round(float(np.mean([r["click_dice"][n - 1] for r in main_rows])), 4)
        summ["ms_per_refine"] = _mean(main_rows, "ms_per_refine")
    if args.ends:
        summ["ends_dice"] = _mean(main_rows, "ends_dice")
    if args.one_step:
        summ["one_step"] = _mean(main_rows, "one_step")
        summ["copy_step"] = _mean(main_rows, "copy_step")
    tr = [r for r in rows if "transfer_dice" in r]
    if tr:
        for key in ("transfer_dice", "reg_dice", "template_dice", "transfer_s", "registration_s", "template_s"):
            summ[key] = _mean(tr, key)
        summ["transfer_pairs"] = len(tr)
    print(json.dumps(summ), flush=True)
    if args.figure and worst is not None:
        from ..cli import write_preview
        write_preview(args.figure, worst[1], worst[3], 2, truth=worst[2])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summ, rows=rows, settings=vars(settings)), f, indent=1)
    return 0


def _mean(rows: List[Dict], key: str) -> Optional[float]:
    v = [r[key] for r in rows if r.get(key) is not None]
    return round(float(np.mean(v)), 4) if v else None
