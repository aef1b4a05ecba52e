"""Training for OnePromptNet: seeded, logged, resumable, and it writes the manifest entry of what it ships.

    python -m OnePromptSegLib.tooling.train --out runs/v1 --steps 4000 [--data ../shared/data/train] [--minutes 60]
    python -m OnePromptSegLib.tooling.train --export runs/v1 --name onepromptseg-v1 [--default]
    python -m OnePromptSegLib.tooling.train --data ../shared/data/train --pack pack/train.npz   # then --data pack/train.npz

On a GPU machine (``--device auto`` picks CUDA, with bf16 autocast) give the batch makers their own processes, e.g.
``--workers 12 --batch 64``, and ``--minutes 9`` per call: each call resumes from ``--out``'s last.pt.

Tasks come from three sources mixed per batch: synthetic volumes (``synth.random_volume``, regenerated as training
goes); when ``--data`` is given, real labelled volumes (every label, and unions of neighbouring labels, along every
axis with enough slices); and with ``--superpixel-frac``, supervoxels of those real images (any structure).  A pair
is a template slice with a simulated prompt of one of the four kinds and a query slice 0..12 slices away (0 =
interactive mode, template == query), cropped exactly as the engine crops: around the template's object, square in
mm.  Some pairs get extra templates (growing context), some a deformed, re-contrasted query (template from "another
patient"), some an empty target so the model learns to stop, and with ``--correction`` some a drawn slice beyond the
query (the interactive pass: the query between two drawn slices). With ``--cross`` some real pairs are between two
patients of the same dataset (``sample_cross_pair``).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from scipy import ndimage as ndi

from ..crops import CropBox, crop_around, extract
from ..model import ModelConfig, OnePromptNet, count_parameters
from ..prompts import KIND_INDEX, MaskPrompt, render_prompt_maps
from ..training_parts import deform_query, loss_fn, simulate_prompt
from .synth import random_volume


@dataclass
class TaskVolume:
    """One training volume along one axis: image (D,H,W) uint8-quantised [0,1], labels, in-plane spacing."""

    image: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float]
    label_sets: List[Tuple[int, ...]]
    name: str


def _orient(img: np.ndarray, lab: np.ndarray, spacing_kji: Tuple[float, float, float], axis: int):
    """Move numpy ``axis`` first; returns image, labels and the in-plane spacing."""
    sp = [s for d, s in enumerate(spacing_kji) if d != axis]
    return np.moveaxis(img, axis, 0), np.moveaxis(lab, axis, 0), (sp[0], sp[1])


def label_sets_for(lab: np.ndarray, min_slices: int = 3, min_vox: int = 60,
                   max_labels: int = 24) -> List[Tuple[int, ...]]:
    """Single labels with enough extent along axis 0, plus a few unions of two labels that touch."""
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    order = [int(i) for i, c in sorted(zip(ids, counts), key=lambda t: -t[1]) if c >= min_vox]
    sets: List[Tuple[int, ...]] = []
    for i in order[:max_labels]:
        if ((lab == i).any(axis=(1, 2))).sum() >= min_slices:
            sets.append((i,))
    for a, b in zip(order[:6], order[1:7]):
        sets.append((a, b))
    return sets


def _read_cases(data_dir: str) -> Iterator[Tuple[str, np.ndarray, np.ndarray, Tuple[float, float, float]]]:
    """(name, image quantised to uint8, labels, spacing k,j,i) of every <case>_img.nii.gz + _lbl.nii.gz under
    ``data_dir``, or of every case in a file written by ``pack_real_volumes``."""
    if os.path.isfile(data_dir):
        with np.load(data_dir) as z:
            for name in json.loads(str(z["names"])):
                yield name, z[name + ":img"], z[name + ":lbl"].astype(np.int32), tuple(z[name + ":sp"].tolist())
        return
    import SimpleITK as sitk

    from ..io import normalize, robust_range

    for ip in sorted(glob.glob(os.path.join(data_dir, "**", "*_img.nii.gz"), recursive=True)):
        lp = ip.replace("_img.nii.gz", "_lbl.nii.gz")
        if not os.path.exists(lp):
            continue
        im = sitk.ReadImage(ip)
        arr = sitk.GetArrayFromImage(im)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(lp)).astype(np.int32)
        lo, hi = robust_range(arr)
        q = (normalize(arr, lo, hi) * 255).astype(np.uint8)
        yield os.path.relpath(ip, data_dir), q, lab, tuple(float(s) for s in im.GetSpacing()[::-1])


def pack_real_volumes(data_dir: str, path: str) -> int:
    """Write the training volumes of ``data_dir`` to one compressed .npz, as training reads them (images quantised
    to uint8), for ``--data``.  Why: a GPU machine whose image lacks SimpleITK can train from it, and it is smaller
    than the NIfTI files it comes from (a device call carries at most 64 MiB).  Returns the number of cases."""
    arrays, names = {}, []
    for name, q, lab, sp in _read_cases(data_dir):
        names.append(name)
        dtype = np.uint8 if lab.max() < 256 else np.uint16
        arrays.update({name + ":img": q, name + ":lbl": lab.astype(dtype), name + ":sp": np.asarray(sp)})
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, names=np.asarray(json.dumps(names)), **arrays)
    os.replace(tmp, path)
    return len(names)


def load_real_volumes(data_dir: str) -> List[TaskVolume]:
    """Every case of ``data_dir`` (a folder of NIfTI pairs, or a ``pack_real_volumes`` file), normalised per volume,
    along each usable axis."""
    out = []
    for name, q, lab, sp_kji in _read_cases(data_dir):
        axes = [0]
        # Isotropic-enough volumes with depth along every axis also give tasks along j and i.
        if max(sp_kji) / min(sp_kji) < 1.6 and min(q.shape) >= 40:
            axes = [0, 1, 2]
        for ax in axes:
            a_img, a_lab, sp = _orient(q, lab, sp_kji, ax)
            sets = label_sets_for(a_lab)
            if sets:
                out.append(TaskVolume(np.ascontiguousarray(a_img), np.ascontiguousarray(a_lab), sp, sets,
                                      f"{name}:{'kji'[ax]}"))
    return out


def synth_volume(rng: np.random.Generator) -> TaskVolume:
    img, lab = random_volume(rng)
    sets = label_sets_for(lab.astype(np.int32), min_vox=40)
    return TaskVolume((img * 255).astype(np.uint8), lab.astype(np.int32), (1.0, 1.0), sets, "synth")


def superpixel_volume(rng: np.random.Generator, tv: TaskVolume, depth: int = 48) -> TaskVolume:
    """Supervoxels of a block of a real image as tasks (One-Prompt's and UniverSeg's augmentation with real texture).

    Every supervoxel (skimage SLIC, 60-300 segments, so objects of very different sizes) is a structure the model
    must follow from slice to slice by its intensity and edges alone, not by what anatomy it is; air is dropped.
    """
    from skimage.segmentation import slic

    D = tv.image.shape[0]
    d = min(D, depth)
    z0 = int(rng.integers(0, D - d + 1))
    img = tv.image[z0:z0 + d]
    f = img.astype(np.float32) / 255.0
    seg = slic(f, n_segments=int(rng.integers(60, 300)), compactness=float(rng.uniform(0.05, 0.3)),
               channel_axis=None, start_label=1).astype(np.int32)
    means = ndi.mean(f, seg, index=np.arange(1, seg.max() + 1))
    seg[np.isin(seg, np.flatnonzero(means < 0.08) + 1)] = 0  # air and background are not structures
    sets = label_sets_for(seg, min_vox=60)
    return TaskVolume(np.ascontiguousarray(img), seg, tv.spacing, sets, f"{tv.name}:slic")


def _crop_for(rng: np.random.Generator, mask2d: np.ndarray, shape, spacing, loose: bool) -> CropBox:
    margin = rng.uniform(0.25, 1.0) if not loose else rng.uniform(0.5, 3.0)
    b = crop_around(mask2d, shape, spacing, margin=margin)
    jr, jc = rng.uniform(-0.1, 0.1, 2)
    return CropBox(b.r0 + jr * b.h, b.c0 + jc * b.w, b.h, b.w)


def _offset(rng: np.random.Generator, kind: str, near: float) -> Tuple[int, bool]:
    """Slices between template and query of an ordinary pair (1..12, nearer ones likelier), and whether it is a
    ``near`` pair (see ``sample_pair``).  No extra draw when ``near`` is 0: runs without it sample as before."""
    if near > 0 and kind == "mask" and rng.random() < near:
        return 1, True
    w = np.array([1 / d ** 0.8 for d in range(1, 13)])
    return int(rng.choice(np.arange(1, 13), p=w / w.sum())), False


def sample_pair(rng: np.random.Generator, tv: TaskVolume, size: int, max_extra: int = 2,
                predict=None, rollout: float = 0.0, correction: float = 0.0, near: float = 0.0):
    """One training example: query, templates, prompt maps, kinds, target (all at ``size``).

    With ``predict`` (crop -> probabilities) and probability ``rollout``, a mask prompt is the model's own binarised
    prediction of the template slice from a slice 1-3 further back, as in propagation, instead of a corrupted truth:
    the model learns to recover from its own errors rather than drift.  With probability ``correction`` a pair also
    gets a drawn slice beyond the query: the second, interactive pass, where the query lies between two drawn slices.
    With probability ``near`` a mask-prompted pair is one slice apart and its query is not deformed: propagation's
    own step, where one model step was measured below copying the previous slice on thin-slice volumes.
    """
    ls = tv.label_sets[rng.integers(len(tv.label_sets))]
    D = tv.image.shape[0]
    fg3 = np.isin(tv.labels, ls)
    area = fg3.sum(axis=(1, 2)).astype(np.float64)
    zs = np.flatnonzero(area > 0)
    z = int(rng.choice(zs, p=np.sqrt(area[zs]) / np.sqrt(area[zs]).sum()))
    shape = tv.image.shape[1:]
    interactive = rng.random() < 0.3
    near_pair = False
    ends = ([(int(zs.min()), -1)] if zs.min() > 0 else []) + ([(int(zs.max()), 1)] if zs.max() < D - 1 else [])
    if interactive:
        kind = ["click", "box", "doodle", "click"][rng.integers(4)]
        qz = z
    else:
        kind = "mask" if rng.random() < 0.85 else ["click", "box", "doodle"][rng.integers(3)]
        r = rng.random()
        if r < 0.18 and ends:
            # Where propagation must stop: template on one of the object's last slices, query just past its end.
            zend, sgn = ends[rng.integers(len(ends))]
            z = zend - sgn * int(rng.integers(0, 3))
            z = z if area[z] > 0 else zend
            qz = int(np.clip(zend + sgn * int(rng.integers(1, 4)), 0, D - 1))
        elif r < 0.24 and ends:
            outside = [k for k in range(D) if area[k] == 0 and abs(k - z) <= 12]
            qz = int(rng.choice(outside)) if outside else z
        else:
            step, near_pair = _offset(rng, kind, near)
            d = step * (1 if rng.random() < 0.5 else -1)
            qz = int(np.clip(z + d, 0, D - 1))
            if qz == z:
                qz = int(np.clip(z - d, 0, D - 1))
    tmask = fg3[z]
    box = _crop_for(rng, tmask, shape, tv.spacing, loose=(kind == "click" and rng.random() < 0.5))
    gamma = rng.uniform(0.7, 1.4)

    def img_crop(k: int) -> np.ndarray:
        return np.clip(extract(tv.image[k], box, size) / 255.0, 0, 1) ** gamma

    first = simulate_prompt(rng, tmask, kind, z)
    if predict is not None and kind == "mask" and not interactive and qz != z and rng.random() < rollout:
        back = int(np.sign(z - qz))  # the template's predecessor lies away from the query
        zp = int(np.clip(z + back * rng.integers(1, 4), 0, D - 1))
        if zp != z and area[zp] > 0:
            pm = render_prompt_maps(MaskPrompt(zp, fg3[zp]), box, size)
            timg = img_crop(z)
            prob = predict(timg, img_crop(zp), pm)
            own = prob > 0.5
            if own.any():
                first = None
                own_maps = np.zeros_like(pm)
                own_maps[3] = own
    templates = [img_crop(z)]
    prompts = [render_prompt_maps(first, box, size) if first is not None else own_maps]
    kinds = [KIND_INDEX[kind]]
    if max_extra > 0 and not interactive and rng.random() < 0.35:
        for _ in range(int(rng.integers(1, max_extra + 1))):
            ez = int(np.clip(z - np.sign(qz - z + 1e-9) * rng.integers(1, 10), 0, D - 1))
            if area[ez] == 0:
                continue
            templates.append(img_crop(ez))
            prompts.append(render_prompt_maps(MaskPrompt(ez, fg3[ez]), box, size))
            kinds.append(KIND_INDEX["mask"])
    if not interactive and qz != z and rng.random() < correction:
        # The second, interactive pass: the user has drawn a correction beyond the query, so the query lies between
        # two drawn slices, as in the engine's gaps (it passes the anchors on both sides as extra templates).
        cz = int(qz + np.sign(qz - z) * rng.integers(1, 9))
        if 0 <= cz < D and area[cz] > 0:
            templates.append(img_crop(cz))
            prompts.append(render_prompt_maps(simulate_prompt(rng, fg3[cz], "mask", cz), box, size))
            kinds.append(KIND_INDEX["mask"])
    q = img_crop(qz)
    tgt = (extract(fg3[qz].astype(np.float32), box, size) > 0.5).astype(np.float32)
    if not interactive and not near_pair and rng.random() < 0.15:
        q, tgt = deform_query(rng, q, tgt)
    return q, np.stack(templates), np.stack(prompts), np.array(kinds), tgt


def _single_labels(tv: TaskVolume) -> Set[int]:
    """The labels of ``tv`` that are tasks on their own (not only in a union)."""
    return {ls[0] for ls in tv.label_sets if len(ls) == 1}


def cross_partners(volumes: List[TaskVolume]) -> Dict[int, List[int]]:
    """For each volume, the other volumes of its dataset (same folder), along the same axis, that share one of its
    single labels: where a template from another patient exists (``sample_cross_pair``)."""
    def key(tv: TaskVolume) -> Tuple[str, str]:
        case, _, axis = tv.name.rpartition(":")
        return os.path.dirname(case), axis

    singles = [_single_labels(tv) for tv in volumes]
    return {i: [j for j, tw in enumerate(volumes) if j != i and key(tw) == key(tv) and singles[i] & singles[j]]
            for i, tv in enumerate(volumes)}


def sample_cross_pair(rng: np.random.Generator, ta: TaskVolume, tb: TaskVolume, size: int
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-Prompt transfer as the engine runs it (``PropagationSession._seed_from_references``): a prompted slice
    of one patient (``ta``) is the template, and the query is the slice of another patient of the same dataset
    (``tb``) at the same relative position in the structure's extent, cropped where the engine crops it: the same
    relative place in the slice and the same field of view in mm.  The deformed query of ``sample_pair`` only
    imitates another patient; this is one.  Same return as ``sample_pair``."""
    common = sorted(_single_labels(ta) & _single_labels(tb))
    lab = int(common[rng.integers(len(common))])
    fa, fb = ta.labels == lab, tb.labels == lab
    area_a = fa.sum(axis=(1, 2)).astype(np.float64)
    za = np.flatnonzero(area_a > 0)
    z = int(rng.choice(za, p=np.sqrt(area_a[za]) / np.sqrt(area_a[za]).sum()))
    zb = np.flatnonzero(fb.any(axis=(1, 2)))
    rel = (z - za.min()) / max(za.max() - za.min(), 1)
    qz = int(np.clip(round(zb.min() + rel * (zb.max() - zb.min())) + rng.integers(-1, 2), 0, tb.image.shape[0] - 1))
    kind = "mask" if rng.random() < 0.7 else ["click", "box", "doodle"][rng.integers(3)]
    shape_a, shape_b = ta.image.shape[1:], tb.image.shape[1:]
    box = crop_around(fa[z], shape_a, ta.spacing, margin=rng.uniform(0.8, 1.6))  # the engine: 2 x its margin
    jr, jc = rng.uniform(-0.05, 0.05, 2)
    hmm = box.h * ta.spacing[0]
    qbox = CropBox((box.r0 / shape_a[0] + jr) * shape_b[0], (box.c0 / shape_a[1] + jc) * shape_b[1],
                   hmm / tb.spacing[0], hmm / tb.spacing[1])

    def img_crop(tv: TaskVolume, k: int, b: CropBox) -> np.ndarray:
        return np.clip(extract(tv.image[k], b, size) / 255.0, 0, 1) ** rng.uniform(0.7, 1.4)

    prompt = render_prompt_maps(simulate_prompt(rng, fa[z], kind, z), box, size)
    tgt = (extract(fb[qz].astype(np.float32), qbox, size) > 0.5).astype(np.float32)
    return (img_crop(tb, qz, qbox), img_crop(ta, z, box)[None], prompt[None], np.array([KIND_INDEX[kind]]), tgt)


def _augment(rng: np.random.Generator, arrs: List[np.ndarray]) -> List[np.ndarray]:
    """The same flip/transpose on every array (last two axes)."""
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    out = []
    for a in arrs:
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def make_batch(rng: np.random.Generator, sources: List[TaskVolume], batch: int, size: int, predict=None,
               rollout: float = 0.0, correction: float = 0.0, near: float = 0.0, cross: float = 0.0,
               partners: Optional[Dict[int, List[int]]] = None):
    """A batch of pairs from ``sources``; with ``partners`` (``cross_partners(sources)``) a fraction ``cross`` of
    them are pairs between two patients (``sample_cross_pair``) where the volume drawn has a partner."""
    qs, ts, ps, ks, ys = [], [], [], [], []
    for _ in range(batch):
        i = int(rng.integers(len(sources)))
        tv = sources[i]
        if cross > 0 and partners and partners.get(i) and rng.random() < cross:
            tw = sources[partners[i][int(rng.integers(len(partners[i])))]]
            q, t, p, k, y = sample_cross_pair(rng, tv, tw, size)
        else:
            q, t, p, k, y = sample_pair(rng, tv, size, predict=predict, rollout=rollout, correction=correction,
                                        near=near)
        q, t, p, y = _augment(rng, [q, t, p, y])
        qs.append(q); ts.append(t); ps.append(p); ks.append(k); ys.append(y)
    K = max(len(k) for k in ks)
    B = batch
    T = np.zeros((B, K, 1, size, size), np.float32)
    P = np.zeros((B, K, 4, size, size), np.float32)
    Kd = np.zeros((B, K), np.int64)
    V = np.zeros((B, K), bool)
    for i in range(B):
        n = len(ks[i])
        T[i, :n, 0] = ts[i]; P[i, :n] = ps[i]; Kd[i, :n] = ks[i]; V[i, :n] = True
    return (torch.from_numpy(np.stack(qs)[:, None]), torch.from_numpy(T), torch.from_numpy(P), torch.from_numpy(Kd),
            torch.from_numpy(V), torch.from_numpy(np.stack(ys)[:, None]))


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches from the task sources, for DataLoader worker processes (``--workers``).

    Each worker has its own generator seeded by (seed, step, worker), and its own synthetic and supervoxel pools;
    the real volumes are shared with the workers by fork (read only).  On a GPU machine the workers keep the GPU
    fed: one process alone samples ~10 pairs per second.
    """

    def __init__(self, args: argparse.Namespace, real: List[TaskVolume], step: int):
        self.args, self.real, self.step = args, real, step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.args.seed, self.step, info.id if info else 0])
        return batches(rng, self.args, self.real)


def batches(rng: np.random.Generator, args: argparse.Namespace, real: List[TaskVolume], predict=None):
    """Endless batches: synthetic, real and supervoxel tasks mixed as ``args`` says (see the module docstring)."""
    synth = [synth_volume(rng) for _ in range(args.synth_pool)]
    superpix = [v for v in (superpixel_volume(rng, real[int(rng.integers(len(real)))])
                            for _ in range(args.superpixel_pool if real and args.superpixel_frac > 0 else 0))
                if v.label_sets]
    cross = getattr(args, "cross", 0.0)
    partners = cross_partners(real) if real and cross > 0 else None
    n = 0
    while True:
        if n % 25 == 0:  # refresh part of the synthetic pool: unlimited tasks
            synth[rng.integers(len(synth))] = synth_volume(rng)
        if superpix and n % 50 == 0:
            v = superpixel_volume(rng, real[int(rng.integers(len(real)))])
            if v.label_sets:
                superpix[int(rng.integers(len(superpix)))] = v
        n += 1
        use_real = real and rng.random() < args.real_frac
        pool = real if use_real else synth
        if use_real and superpix and rng.random() < args.superpixel_frac:
            pool = superpix
        yield make_batch(rng, pool, args.batch, args.size, predict, args.rollout, args.correction,
                         args.near, cross, partners if pool is real else None)


def train(args: argparse.Namespace) -> None:
    from ..checkpoints import resolve_device

    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.rollout > 0 and args.workers > 0:
        raise SystemExit("--rollout needs the model in the batch loop: use it with --workers 0")
    device = resolve_device(args.device)
    ckpt = os.path.join(args.out, "last.pt")
    cfg = ModelConfig(size=args.size)
    model = OnePromptNet(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    step = 0
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if os.path.exists(ckpt):
        st = _load_run_state(ckpt)
        step = st["step"]
        own = model.state_dict()
        if set(st["model"]) == set(own):
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
        else:  # the architecture lost unused parameters since this run started: keep the weights, reset AdamW
            model.load_state_dict({k: v for k, v in st["model"].items() if k in own})
            print("resumed weights only (optimizer state reset: parameter set changed)", flush=True)
        rng = np.random.default_rng([args.seed, step])
        torch.manual_seed(args.seed + step)
        print(f"resumed from {ckpt} at step {step}", flush=True)
    if args.init and not os.path.exists(ckpt):
        own = model.state_dict()
        if os.path.basename(args.init) == "last.pt":
            st = _load_run_state(args.init)
            weights, origin = st["model"], f"step {st['step']}"
        else:  # a shipped checkpoint, by manifest name or path: verified like any other
            from ..checkpoints import load_model
            shipped = load_model(args.init, "cpu")
            weights, origin = shipped.model.state_dict(), f"checkpoint {shipped.name}"
        model.load_state_dict({k: v for k, v in weights.items() if k in own})
        print(f"initialised from {args.init} ({origin})", flush=True)
    real = load_real_volumes(args.data) if args.data else []
    print(f"{count_parameters(model)} parameters; {len(real)} real task volumes; {device}, "
          f"{args.workers} data workers", flush=True)
    if args.workers > 0:
        stream = iter(torch.utils.data.DataLoader(BatchStream(args, real, step), batch_size=None,
                                                  num_workers=args.workers, prefetch_factor=4,
                                                  pin_memory=device.type == "cuda"))
    else:
        stream = batches(rng, args, real, _own_prediction(model) if args.rollout > 0 else None)
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    json.dump(dict(event="start", step=step, args=vars(args), time=time.time()), log); log.write("\n")
    t_start = time.time()
    last_save = time.time()
    model.train()
    ema_loss = ema_dice = None
    while step < args.steps:
        if args.minutes and time.time() - t_start > args.minutes * 60:
            break
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0))))
        for g in opt.param_groups:
            g["lr"] = max(lr, args.lr * 0.02)
        q, T, P, Kd, V, y = (t.to(device, non_blocking=True) for t in next(stream))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, qual = model(q, T, P, Kd, V)
        loss, dice = loss_fn(logits.float(), qual.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        ema_dice = dice.item() if ema_dice is None else 0.98 * ema_dice + 0.02 * dice.item()
        if step % 20 == 0:
            rec = dict(step=step, loss=round(ema_loss, 4), dice=round(ema_dice, 4), lr=round(lr, 6),
                       elapsed=round(time.time() - t_start, 1))
            json.dump(rec, log); log.write("\n"); log.flush()
            print(json.dumps(rec), flush=True)
        if time.time() - last_save > args.save_every or step == args.steps:
            _save(model, opt, step, ckpt)
            last_save = time.time()
        if args.snapshot_every and step % args.snapshot_every == 0:
            torch.save(dict(model=model.state_dict(), step=step, config=model.config.to_dict()),
                       os.path.join(args.out, f"snap_{step:06d}.pt"))
    _save(model, opt, step, ckpt)
    json.dump(dict(event="end", step=step, time=time.time(), seconds=round(time.time() - t_start, 1)), log)
    log.write("\n")
    log.close()
    print(f"saved {ckpt} at step {step}", flush=True)


def _own_prediction(model: OnePromptNet):
    """query crop, template crop, prompt maps -> the model's probabilities (no gradient): the rollout's first pass."""
    def predict(query: np.ndarray, timg: np.ndarray, pm: np.ndarray) -> np.ndarray:
        dev = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            lg, _ = model(torch.from_numpy(query[None, None].astype(np.float32)).to(dev),
                          torch.from_numpy(timg[None, None, None].astype(np.float32)).to(dev),
                          torch.from_numpy(pm[None, None]).to(dev), torch.tensor([[KIND_INDEX["mask"]]], device=dev))
        model.train()
        return torch.sigmoid(lg)[0, 0].float().cpu().numpy()
    return predict


def _averaged_weights(run: str, last: dict, k: int) -> Tuple[Dict[str, torch.Tensor], List[int]]:
    """The run's final weights, or with ``k`` > 1 the mean of them and the k-1 latest snapshots before them
    (``--snapshot-every``): averaging the weights along the end of a run (SWA) evens out the step-to-step noise of a
    small-batch run.  Returns (weights, the steps averaged)."""
    if k <= 1:
        return last["model"], [last["step"]]
    snaps: Dict[int, dict] = {}  # by step: a step saved twice counts once
    for f in sorted(glob.glob(os.path.join(run, "snap_*.pt"))):
        st = _load_run_state(f, ("model", "step", "config"), "snapshot")
        if st["config"] != last["config"] or set(st["model"]) != set(last["model"]):
            raise SystemExit(f"{f}: a snapshot of another architecture than {run}/last.pt")
        if st["step"] < last["step"]:
            snaps[st["step"]] = st
    use = [snaps[n] for n in sorted(snaps)][-(k - 1):]
    if len(use) < k - 1:
        raise SystemExit(f"--average {k}: {run} has {len(snaps)} snapshots before step {last['step']} "
                         f"(--snapshot-every writes them), {k - 1} needed")
    states = [st["model"] for st in use] + [last["model"]]
    mean = {name: (sum(s[name].float() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for name, v in last["model"].items()}
    return mean, [st["step"] for st in use] + [last["step"]]


def _load_run_state(path: str, keys: Sequence[str] = ("model", "opt", "step", "config"),
                    what: str = "run state") -> dict:
    """A run's ``last.pt`` (weights, AdamW state, step, config) or a snapshot (``keys`` without the AdamW state):
    tensors and plain values only, so it is read with ``weights_only=True`` like any checkpoint; a file that is not
    such a state fails with one line naming it."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; the user needs the file and the reason
        raise SystemExit(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    missing = set(keys) - set(st if isinstance(st, dict) else ())
    if missing:
        raise SystemExit(f"{path}: not a {what} of this project (missing {sorted(missing)})")
    return st


def _save(model, opt, step, path):
    tmp = path + ".tmp"
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, config=model.config.to_dict()), tmp)
    os.replace(tmp, path)


def _training_seconds(events: List[dict]) -> float:
    """Wall time of all segments of a run, including those stopped by hand (no 'end' event: their last log line)."""
    total, seg = 0.0, 0.0
    for e in events:
        if e.get("event") == "start":
            total, seg = total + seg, 0.0
        elif e.get("event") == "end":
            seg = max(seg, float(e.get("seconds", 0)))
        else:
            seg = max(seg, float(e.get("elapsed", 0)))
    return total + seg


def export(args: argparse.Namespace) -> None:
    """Write the fp16 weights of a run under Resources/Models and its entry in weights_manifest.json."""
    from ..checkpoints import add_manifest_entry, save_weights

    from ..settings import EngineSettings
    from ..prompts import PromptError

    try:
        engine = EngineSettings.parse(args.engine, "--engine")
    except PromptError as e:
        raise SystemExit(str(e)) from None
    st = _load_run_state(os.path.join(args.export, "last.pt"))
    cfg = ModelConfig.from_dict(st["config"])
    weights, averaged = _averaged_weights(args.export, st, args.average)
    events = [json.loads(l) for l in open(os.path.join(args.export, "log.jsonl")) if l.strip()]
    starts = [e for e in events if e.get("event") == "start"]
    targs = starts[0]["args"] if starts else {}

    def command(a: dict) -> str:
        return "python -m OnePromptSegLib.tooling.train " + " ".join(
            f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in a.items()
            if k not in ("export", "name", "default", "machine", "manifest", "engine", "average")
            and v not in (None, "", []))

    # A run resumed with other arguments (more steps, fewer threads) lists each command in order, at its step.
    cmds = [f"from step {e['step']}: {command(e['args'])}" for e in starts]
    cmd = cmds[0].split(": ", 1)[1] if len(cmds) == 1 else " ; ".join(cmds)
    own = OnePromptNet(cfg).state_dict()
    folder = (os.path.join(os.path.dirname(os.path.abspath(args.manifest)), "Resources", "Models")
              if args.manifest else None)
    path = save_weights({k: v for k, v in weights.items() if k in own}, cfg, args.name, folder)
    training = dict(command=cmd, steps=st["step"], seconds=round(_training_seconds(events), 1),
                    machine=args.machine, seed=targs.get("seed"))
    if len(averaged) > 1:
        training["averaged_steps"] = averaged  # the weights are the mean of the run at these steps (SWA)
    add_manifest_entry(args.name, path, cfg, training=training, make_default=args.default,
                       manifest_path=args.manifest or None, engine=engine)
    print(f"exported {path}")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m OnePromptSegLib.tooling.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/v1", help="run folder: log.jsonl and last.pt (resumed if present)")
    ap.add_argument("--data", default="", help="folder of <case>_img.nii.gz/_lbl.nii.gz training volumes, or a file "
                    "written by --pack")
    ap.add_argument("--pack", default="", metavar="FILE.npz",
                    help="write --data's volumes to one compressed file that --data reads without SimpleITK (for a "
                         "GPU machine without it; smaller than the NIfTI files) instead of training")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=0, help="stop (and save) after this many minutes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda; bf16 autocast on CUDA")
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader worker processes that make batches (0 = in the training process)")
    ap.add_argument("--real-frac", type=float, default=0.6, help="fraction of batches from real volumes")
    ap.add_argument("--synth-pool", type=int, default=24)
    ap.add_argument("--superpixel-frac", type=float, default=0.0,
                    help="share of the real batches made of supervoxel tasks (SLIC) on the real images")
    ap.add_argument("--superpixel-pool", type=int, default=12,
                    help="supervoxel volumes kept (one refreshed per 50 steps)")
    ap.add_argument("--rollout", type=float, default=0.0,
                    help="share of mask-prompted pairs whose prompt is the model's own prediction (second pass)")
    ap.add_argument("--correction", type=float, default=0.0,
                    help="share of pairs that also get a drawn slice beyond the query (the interactive second pass)")
    ap.add_argument("--near", type=float, default=0.0,
                    help="extra share of mask-prompted pairs one slice apart, query not deformed (propagation's step)")
    ap.add_argument("--cross", type=float, default=0.0,
                    help="share of the real pairs whose template comes from another patient of the same dataset "
                         "(One-Prompt transfer, as the engine crops it)")
    ap.add_argument("--init", default="", help="start from these weights (fine-tuning): a run's last.pt, or a "
                    "shipped checkpoint by manifest name or path")
    ap.add_argument("--save-every", type=float, default=120, help="seconds between resumable checkpoints")
    ap.add_argument("--snapshot-every", type=int, default=0, metavar="STEPS",
                    help="also keep the weights every STEPS steps (snap_STEP.pt) for --average")
    ap.add_argument("--export", default="", help="export this run folder instead of training")
    ap.add_argument("--average", type=int, default=1, metavar="K",
                    help="with --export: ship the mean of the final weights and the K-1 latest snapshots (SWA)")
    ap.add_argument("--name", default="onepromptseg-v1")
    ap.add_argument("--machine", default="", help="recorded in the manifest, e.g. '2-core CPU'")
    ap.add_argument("--default", action="store_true", help="make the exported checkpoint the default")
    ap.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                    help="with --export: an engine setting calibrated for this checkpoint, e.g. threshold=0.8")
    ap.add_argument("--manifest", default="", help="export into this manifest (weights to Resources/Models beside it) "
                    "instead of the project's weights_manifest.json")
    args = ap.parse_args(argv)
    if args.pack:
        if not args.data:
            raise SystemExit("--pack FILE.npz needs --data FOLDER (the NIfTI training volumes to pack)")
        print(f"packed {pack_real_volumes(args.data, args.pack)} cases into {args.pack}", flush=True)
    elif args.export:
        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
