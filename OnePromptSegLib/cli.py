"""``onepromptseg``: propagate a one-slice prompt through a volume from the command line.

    onepromptseg propagate IMAGE -o OUT [--prompt-mask MASK [--label N] [--slices S1,S2]] [--click I,J,K[,neg]]...
                 [--box A0,B0,A1,B1,S]... [--scribble SCRIBBLE_MASK] [--axis i|j|k] [--device auto|cpu|cuda]
                 [--model NAME_OR_PATH] [--ssim-threshold T] [--no-reprompt] [--preview PNG]
                 [--result EARLIER_OUT]    # then the --click points correct EARLIER_OUT
    onepromptseg propagate IMAGE -o OUT --template-image T --template-mask TM [--template-label N]
                 (template mode: another patient's annotated volume, registered to IMAGE, seeds it)
    onepromptseg cohort CASES.csv --out-dir DIR [--template-image T --template-mask TM [--template-label N]]
                 [--workers N] [--scheduler ADDRESS|local]   (resumable; DIR/cohort.csv; status 1 if a case failed)
    onepromptseg demo [--out DIR]
    onepromptseg models

The developers' benchmark and timing commands are ``onepromptseg-dev`` (``OnePromptSegLib.tooling``).
Bad input exits with status 2 and one line on stderr, and leaves no output file behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoints import CheckpointError, DeviceFallbackWarning, list_models, load_model
from .io import Volume, VolumeIOError, check_readable, check_writable, read_label_volume, read_volume, write_mask
from .prompts import BBox, Click, Doodle, MaskPrompt, PromptError, ijk_axis, masks_from_label_volume, numpy_axis
from .sample import dice, make_demo_volume
from .session import PropagationSession
from .settings import NO_FLOW, EngineSettings
from .template import template_session


class UsageError(ValueError):
    """A command-line value that cannot be parsed."""


def _floats(text: str, n: Sequence[int], what: str) -> List[str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in n:
        raise UsageError(f"{what} {text!r}: expected {' or '.join(str(k) for k in n)} comma-separated values")
    return parts


def parse_click(text: str) -> Tuple[Tuple[float, float, float], int]:
    """'I,J,K' (positive) or 'I,J,K,neg' -> ((i, j, k), label)."""
    parts = _floats(text, (3, 4), "--click")
    label = 1
    if len(parts) == 4:
        if parts[3].lower() in ("neg", "negative", "0", "-"):
            label = 0
        elif parts[3].lower() not in ("pos", "positive", "1", "+"):
            raise UsageError(f"--click {text!r}: the 4th value must be 'neg' or 'pos'")
    try:
        return (float(parts[0]), float(parts[1]), float(parts[2])), label
    except ValueError:
        raise UsageError(f"--click {text!r}: I,J,K must be numbers") from None


def parse_box(text: str, axis: int) -> BBox:
    """'A0,B0,A1,B1,S': corners in the two in-plane IJK axes (in i, j, k order) and the slice index along axis."""
    parts = _floats(text, (5,), "--box")
    try:
        a0, b0, a1, b1, s = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--box {text!r}: values must be numbers") from None
    inplane = [d for d in range(3) if d != axis]
    c0, c1 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    c0[inplane[0]], c0[inplane[1]], c0[axis] = a0, b0, s
    c1[inplane[0]], c1[inplane[1]], c1[axis] = a1, b1, s
    return BBox.from_ijk(c0, c1, axis)


def parse_slices(text: str) -> List[int]:
    """'3,10,17' -> [3, 10, 17] (empty text -> [])."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(f"--slices {text!r}: expected comma-separated slice indices, e.g. 12,30,41") from None


def empty_drawn_slices(text: Optional[str], drawn: List, axis: int, shape: Tuple[int, int, int]) -> List[MaskPrompt]:
    """Empty mask prompts for the slices listed in ``--slices`` that have no foreground in the prompt mask.

    A label volume cannot tell a slice drawn empty ("the object is not here") from a slice nobody drew; ``--slices``
    can, and an empty drawn slice is what stops a leak past the object's end.
    """
    if not text:
        return []
    a = numpy_axis(axis)
    have = {p.slice_index for p in drawn}
    out = []
    for s in parse_slices(text):
        if not 0 <= s < shape[a]:
            raise UsageError(f"--slices: slice {s} is outside the volume (0..{shape[a] - 1} along {'ijk'[axis]})")
        if s not in have:
            plane = tuple(n for d, n in enumerate(shape) if d != a)
            out.append(MaskPrompt(s, np.zeros(plane, bool)))
            have.add(s)
    return out


def build_prompts(args: argparse.Namespace, vol: Volume) -> List:
    """All prompts given on the command line, validated against the volume."""
    axis = ijk_axis(args.axis)
    prompts: List = []
    if args.prompt_mask:
        lab = read_label_volume(args.prompt_mask, vol)
        prompts += masks_from_label_volume(lab, axis, args.label, vol.array.shape)
        prompts += empty_drawn_slices(args.slices, prompts, axis, vol.array.shape)
    elif args.slices:
        raise UsageError("--slices names drawn slices of --prompt-mask: give --prompt-mask too")
    if args.click and not args.result:
        by_slice: Dict[int, List] = {}
        for c in args.click:
            ijk, label = parse_click(c)
            by_slice.setdefault(int(round(ijk[axis])), []).append((ijk, label))
        for items in by_slice.values():
            prompts.append(Click.from_ijk([p for p, _ in items], [lab for _, lab in items], axis))
    for b in args.box or []:
        prompts.append(parse_box(b, axis))
    if args.scribble:
        lab = read_label_volume(args.scribble, vol)
        a = numpy_axis(axis)
        other = tuple(d for d in range(3) if d != a)
        slices = np.flatnonzero((lab == 1).any(axis=other))
        if not len(slices):
            raise PromptError(f"{args.scribble}: no foreground strokes (label 1) found; label 2 marks background")
        for s in slices:
            sl = np.take(lab, int(s), axis=a)
            prompts.append(Doodle(int(s), sl == 1, sl == 2))
    if not prompts and args.result:
        raise UsageError("--result needs the prompts it was made from (--prompt-mask, --box or --scribble): "
                         "they are the drawn slices that bound what a correction recomputes")
    if not prompts:
        raise UsageError("no prompt given: use --prompt-mask, --click, --box or --scribble")
    return prompts


def correction_clicks(texts: Sequence[str], axis: int) -> List[Click]:
    """``--click`` values given with ``--result``: one Click per slice, positive and negative points together (a
    slice may have negative points only: they remove a wrong part)."""
    by_slice: Dict[int, List] = {}
    for text in texts:
        ijk, label = parse_click(text)
        by_slice.setdefault(int(round(ijk[axis])), []).append((ijk, label))
    return [Click.from_ijk([p for p, _ in items], [lab for _, lab in items], axis) for items in by_slice.values()]


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, label: str, stream=None, unit: str = "slice"):
        stream = stream or sys.stderr  # looked up now, not at import: a redirected stderr is honoured
        self.label, self.stream, self.t0, self.last, self.unit = label, stream, time.time(), -1, unit
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if not self.tty and pct // 10 == self.last // 10 and done != total:
            return
        self.last = pct
        ms = 1000 * (time.time() - self.t0) / max(done, 1)
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        end = "\n" if (done == total or not self.tty) else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {self.unit}s, {ms:.0f} ms/{self.unit}{end}")
        self.stream.flush()


def _surroundings(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The voxels around the object (its bounding box grown by a quarter of its size on each side), or the whole
    image when the mask is empty: the preview's grey window comes from them, so a CT's air and bone do not wash out
    the organ."""
    if not mask.any():
        return image
    box = []
    for d in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(o for o in range(3) if o != d)))
        grow = max(2, (idx[-1] - idx[0] + 1) // 4)
        box.append(slice(max(0, idx[0] - grow), idx[-1] + grow + 1))
    return image[tuple(box)]


def write_preview(path: str, image: np.ndarray, mask: np.ndarray, axis: int, n: int = 12,
                  truth: Optional[np.ndarray] = None) -> None:
    """A PNG montage of up to ``n`` slices through the object with the mask outlined in red (truth in green)."""
    from scipy import ndimage as ndi
    from skimage.io import imsave

    a = numpy_axis(axis)
    other = tuple(d for d in range(3) if d != a)
    shown = mask if truth is None else (mask > 0) | (truth > 0)
    present = np.flatnonzero(shown.any(axis=other))
    picks = np.linspace(present.min(), present.max(), min(n, len(present))).round().astype(int) if len(present) else \
        np.linspace(0, image.shape[a] - 1, min(n, image.shape[a])).round().astype(int)
    lo, hi = np.percentile(_surroundings(image, shown), [1, 99])
    tiles = []
    for s in picks:
        im = np.clip((np.take(image, s, a).astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
        m = np.take(mask, s, a).astype(bool)
        edge = m & ~ndi.binary_erosion(m)
        rgb = np.stack([im, im, im], -1)
        if truth is not None:
            t = np.take(truth, s, a).astype(bool)
            rgb[t & ~ndi.binary_erosion(t)] = (0.1, 0.9, 0.1)
        rgb[edge] = (1.0, 0.1, 0.1)
        tiles.append((rgb * 255).astype(np.uint8))
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = t
    tmp = path + ".tmp.png"
    imsave(tmp, grid, check_contrast=False)
    os.replace(tmp, path)


def settings_from_args(model, args: argparse.Namespace) -> EngineSettings:
    """The checkpoint's engine settings with the command line's options and ``--set NAME=VALUE`` on top."""
    settings = EngineSettings.for_model(model, reprompt=not args.no_reprompt)
    if args.ssim_threshold is not None:
        settings.ssim_threshold = args.ssim_threshold
    if args.max_templates is not None:
        settings.max_templates = args.max_templates
    if args.no_stop:
        settings.stop_after_empty = 10 ** 9
    overrides = dict(NO_FLOW) if args.no_flow else {}
    overrides.update(EngineSettings.parse(args.set))  # --set last: it may turn one use back on
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


def run_propagation(model, vol: Volume, prompts: List, axis: int, settings: EngineSettings,
                    direction: str = "both", progress: Optional[Progress] = None,
                    earlier: Optional[np.ndarray] = None, corrections: Sequence[Click] = ()) -> np.ndarray:
    """Add every prompt to a session over ``vol`` and propagate; returns the (k,j,i) uint8 mask.

    With ``earlier`` (a result of the same prompts) the session takes it up and ``corrections`` refine their slices
    (``PropagationSession.refine_slice``): only the slices between the drawn slices around each corrected slice are
    propagated again."""
    sess = PropagationSession(model, settings)
    sess.set_volume(vol.array, axis, vol.spacing)
    for p in prompts:
        sess.add_prompt(p)
    if earlier is not None:
        sess.set_result(earlier)
        for click in corrections:
            sess.refine_slice(click.slice_index, click)
    adapting = Progress("adapting to the drawn slices", progress.stream, "step") if progress else None
    for done, total in sess.adapt():  # only with adapt_steps (off by default)
        if adapting:
            adapting.update(done, total)
    for r in sess.propagate(direction):
        if progress:
            progress.update(r.done, r.total)
    return sess.result


def check_propagate_args(args: argparse.Namespace) -> None:
    """Every ``propagate`` argument checked before any work starts (issue 18): input paths readable, output and
    preview names writable with a known extension, prompts parseable, numbers in their ranges.  Raises UsageError,
    VolumeIOError or PromptError (exit 2, one line, nothing written)."""
    check_readable(args.image, "image")
    for option in ("prompt_mask", "scribble", "template_image", "template_mask"):
        if getattr(args, option):
            check_readable(getattr(args, option), "--" + option.replace("_", "-"))
    check_writable(args.output, what="-o")
    if args.preview:
        check_writable(args.preview, (".png",), "--preview")
    axis = ijk_axis(args.axis)
    for option in ("label", "template_label"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: labels are 1 or more")
    if bool(args.template_image) != bool(args.template_mask):
        raise UsageError("--template-image and --template-mask go together: the template patient's image and its "
                         "label volume")
    if args.template_label is not None and not args.template_mask:
        raise UsageError("--template-label picks a label of --template-mask: give --template-mask too")
    own = [o for o in ("prompt_mask", "click", "box", "scribble") if getattr(args, o)]
    if args.template_image and own:
        raise UsageError(f"--template-image seeds a volume that has no prompt of its own: drop --"
                         f"{own[0].replace('_', '-')} or the template")
    if not own and not args.template_image:
        raise UsageError("no prompt given: use --prompt-mask, --click, --box, --scribble or --template-image")
    if args.slices:
        if not args.prompt_mask:
            raise UsageError("--slices names drawn slices of --prompt-mask: give --prompt-mask too")
        parse_slices(args.slices)
    for c in args.click or []:
        parse_click(c)
    for b in args.box or []:
        parse_box(b, axis)
    if args.result:
        check_readable(args.result, "--result")
        if args.template_image or not args.click:
            raise UsageError("--result takes correction clicks (--click) on an earlier result of the same prompts")
    if args.template_anchors < 1:
        raise UsageError(f"--template-anchors {args.template_anchors}: give 1 or more")
    settings_from_args(None, args).check()


def run_template(model, vol: Volume, args: argparse.Namespace, settings: EngineSettings,
                 progress: Optional[Progress] = None) -> np.ndarray:
    """Register ``--template-image`` to ``vol``, seed from its warped ``--template-mask`` and propagate."""
    template = read_volume(args.template_image)
    labels = read_label_volume(args.template_mask, template)
    structure = labels == args.template_label if args.template_label is not None else labels != 0
    if not structure.any():
        which = f"label {args.template_label}" if args.template_label is not None else "foreground"
        raise PromptError(f"{args.template_mask}: no voxels of {which}; pick the template's structure with "
                          "--template-label")
    if progress:
        progress.stream.write("registering the template to the image ...\n")
    session, _ = template_session(model, vol, template, structure, args.axis, settings,
                                  anchors=args.template_anchors)
    for r in session.propagate(args.direction):
        if progress:
            progress.update(r.done, r.total)
    return session.result


def cmd_propagate(args: argparse.Namespace) -> int:
    check_propagate_args(args)
    axis = ijk_axis(args.axis)
    model = load_model(args.model, args.device)
    settings = settings_from_args(model, args).check()
    vol = read_volume(args.image)
    progress = None if args.quiet else Progress("propagating")
    if args.template_image:
        mask = run_template(model, vol, args, settings, progress)
    else:
        prompts = build_prompts(args, vol)
        earlier, corrections = None, []
        if args.result:
            earlier = read_label_volume(args.result, vol)
            corrections = correction_clicks(args.click or [], axis)
            if not corrections:
                raise UsageError("--result: give the correction clicks with --click I,J,K[,neg]")
        mask = run_propagation(model, vol, prompts, axis, settings, args.direction, progress, earlier, corrections)
    write_mask(mask, vol, args.output)
    if args.preview:
        write_preview(args.preview, vol.array, mask, axis)
    if not args.quiet:
        in_plane = tuple(d for d in range(3) if d != numpy_axis(axis))
        print(f"wrote {args.output}: {int(mask.sum())} voxels on {int(mask.any(axis=in_plane).sum())} slices",
              file=sys.stderr)
    return 0


def cmd_cohort(args: argparse.Namespace) -> int:
    """``onepromptseg cohort``: every case of CASES.csv (``OnePromptSegLib.cohort``); status 1 when a case failed."""
    from .checkpoints import checkpoint_id
    from .cohort import Job, read_cases, run_cohort

    out_dir = os.path.abspath(args.out_dir)
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {args.out_dir}: is a file; give a folder")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {args.out_dir}: folder {parent} does not exist or is not writable")
    if bool(args.template_image) != bool(args.template_mask):
        raise UsageError("--template-image and --template-mask go together")
    for option in ("template_image", "template_mask"):
        if getattr(args, option):
            check_readable(getattr(args, option), "--" + option.replace("_", "-"))
    if args.template_label is not None and args.template_label < 1:
        raise UsageError(f"--template-label {args.template_label}: labels are 1 or more")
    if args.workers < 1 or args.template_anchors < 1:
        raise UsageError("--workers and --template-anchors take 1 or more")
    ijk_axis(args.axis)
    overrides = EngineSettings.parse(args.set)
    EngineSettings(**overrides).check()
    if args.workers > 1 or args.scheduler:
        try:
            import dask.distributed  # noqa: F401  (checked now: not after the first cases)
        except ImportError:
            raise UsageError("--workers N > 1 and --scheduler run on Dask: pip install 'dask[distributed]'") from None
    checkpoint_id(args.model)  # an unknown model name fails here
    job = Job(model=args.model, device=args.device, settings=overrides, axis=args.axis,
              template_image=args.template_image and os.path.abspath(args.template_image),
              template_mask=args.template_mask and os.path.abspath(args.template_mask),
              template_label=args.template_label, template_anchors=args.template_anchors)
    cases = read_cases(args.cases, out_dir, job)
    from tqdm import tqdm

    bars: List = []

    def start(todo: int, before: int) -> None:
        if not args.quiet:
            print(f"{len(cases)} cases: {before} done before, {todo} to run", file=sys.stderr)
        bars.append(tqdm(total=todo, unit="case", disable=args.quiet, file=sys.stderr))

    def step(row: Dict, done: int, todo: int) -> None:
        bars[0].update(1)
        if row["status"] != "ok":
            bars[0].write(f"{row['case']}: {row.get('error')}", file=sys.stderr)

    rows = run_cohort(cases, job, out_dir, args.workers, args.scheduler, start, step)
    if bars:
        bars[0].close()
    failed = sum(1 for r in rows if r["status"] == "failed")
    if not args.quiet:
        print(f"{len(rows) - failed} of {len(rows)} cases segmented, {failed} failed; summary in "
              f"{os.path.join(args.out_dir, 'cohort.csv')}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    img, truth, spacing = make_demo_volume()
    vol = Volume(img, spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), None)
    os.makedirs(args.out, exist_ok=True)
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    model = load_model(args.model, args.device)
    print(f"demo volume {img.shape[::-1]} (i,j,k), spacing {spacing} mm; one drawn slice k={k0}; "
          f"model {model.name} on {model.device}")
    t0 = time.time()
    mask = run_propagation(model, vol, [MaskPrompt(k0, truth[k0].astype(bool))], 2, EngineSettings.for_model(model),
                           progress=Progress("propagating"))
    dt = time.time() - t0
    steps = img.shape[0] - 1
    d = dice(mask, truth)
    write_mask(truth, vol, os.path.join(args.out, "demo_truth.nii.gz"))
    import SimpleITK as sitk
    sitk.WriteImage(vol.to_sitk(img), os.path.join(args.out, "demo_image.nii.gz"))
    write_mask(mask, vol, os.path.join(args.out, "demo_mask.nii.gz"))
    write_mask(mask, vol, os.path.join(args.out, "demo_mask.seg.nrrd"), segment_name="Lesion")
    write_preview(os.path.join(args.out, "demo_preview.png"), img, mask, 2)
    print(f"Dice {d:.3f} against the known truth; {1000 * dt / steps:.1f} ms per slice ({steps} slices, "
          f"{dt:.2f} s in all)")
    print(f"wrote {args.out}/demo_image.nii.gz, demo_mask.nii.gz, demo_mask.seg.nrrd, demo_preview.png")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for e in list_models():
        flag = "*" if e["default"] else " "
        where = "bundled" if os.path.exists(e["path"]) else (e.get("url") or "missing")
        print(f"{flag} {e['name']:24s} {e.get('bytes', 0) / 1e6:6.2f} MB  input {e.get('input_size')}  {where}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onepromptseg", description="Segment a structure through a volume from one "
                                 "prompted slice (OnePromptSeg).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("propagate", help="propagate prompts through a volume")
    p.add_argument("image", help="volume: NIfTI, NRRD, MHA, ... or a DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="output mask: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd")
    p.add_argument("--prompt-mask",
                   help="label volume on the image's grid: every slice with the label is a drawn slice")
    p.add_argument("--label", type=int, help="label value in --prompt-mask (default: any non-zero)")
    p.add_argument("--slices", metavar="S1,S2,...",
                   help="the drawn slices of --prompt-mask (indices along --axis); a listed slice without foreground "
                        "is drawn empty: the structure is absent there and propagation stops at it")
    p.add_argument("--click", action="append", metavar="I,J,K[,neg]",
                   help="a point in voxel indices; repeatable.  With --result: a correction of that result (a "
                        "positive click adds a part it missed, 'neg' removes a part it wrongly holds)")
    p.add_argument("--result", metavar="EARLIER_OUT",
                   help="an earlier output of the same prompts, to correct with --click points: their slices are "
                        "refined and locked, and only the slices between the drawn slices around them are "
                        "propagated again")
    p.add_argument("--box", action="append", metavar="A0,B0,A1,B1,S",
                   help="a box: corners in the two in-plane axes (i,j for axis k) and the slice index; repeatable")
    p.add_argument("--scribble", help="label volume of strokes: 1 foreground, 2 background")
    p.add_argument("--template-image", metavar="T",
                   help="template mode across patients: another patient's volume (any size, spacing, orientation), "
                        "registered to IMAGE; its --template-mask structure seeds IMAGE, then the engine refines")
    p.add_argument("--template-mask", metavar="TM",
                   help="label volume on --template-image's grid: the structure, fully drawn or on some slices")
    p.add_argument("--template-label", type=int, metavar="N", help="label value in --template-mask (default: any)")
    p.add_argument("--template-anchors", type=int, default=1, metavar="N",
                   help="slices of the registered template the engine starts from (default 1, the middle one)")
    p.add_argument("--axis", default="k", help="slice axis: i, j or k (default k)")
    p.add_argument("--direction", default="both", choices=["both", "forward", "backward"])
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda")
    p.add_argument("--model", default=None, help="checkpoint name from weights_manifest.json or a file path")
    p.add_argument("--ssim-threshold", type=float, default=None, help="re-prompt when SSIM drops below this")
    p.add_argument("--no-reprompt", action="store_true", help="disable SSIM-triggered re-prompting")
    p.add_argument("--max-templates", type=int, default=None, help="templates per step (K)")
    p.add_argument("--no-stop", action="store_true", help="do not stop where the object ends (ablation)")
    p.add_argument("--no-flow", action="store_true",
                   help="no optical flow between neighbouring slices (in the walks and between drawn slices): "
                        "about a quarter faster, less accurate")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any engine setting, e.g. --set adapt_steps=20 (test-time adaptation, off by default)")
    p.add_argument("--preview", help="write a PNG montage of the result")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_propagate)
    c = sub.add_parser("cohort", help="segment every volume listed in a CSV (resumable, parallel, Dask)",
                       description="Segment one structure in every volume of CASES.csv. Columns: image (required), "
                       "prompt_mask, label, slices, output (relative paths: from the CSV's folder; output from "
                       "--out-dir). A case without a prompt_mask is seeded from --template-image. A rerun skips "
                       "cases already done with the same inputs and settings (sha256). Writes DIR/cohort.csv; exit "
                       "status 1 when a case failed.")
    c.add_argument("cases", help="CSV with a header row")
    c.add_argument("--out-dir", required=True, help="folder of the masks and of cohort.csv")
    c.add_argument("--template-image", help="another patient's volume, registered to each case without a prompt")
    c.add_argument("--template-mask", help="its label volume (on --template-image's grid)")
    c.add_argument("--template-label", type=int, help="label value in --template-mask (default: any)")
    c.add_argument("--template-anchors", type=int, default=1, help="slices of the registered template to start from")
    c.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (more than 1: a local Dask cluster; default 1, in-process)")
    c.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing Dask distributed cluster (tcp://host:8786), or 'local' for a local "
                        "cluster of --workers processes")
    c.add_argument("--axis", default="k", help="slice axis: i, j or k (default k)")
    c.add_argument("--device", default="auto", help="auto (each worker's GPU if it has one), cpu or cuda")
    c.add_argument("--model", default=None, help="checkpoint name or file path")
    c.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any engine setting")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_cohort)
    d = sub.add_parser("demo", help="run the whole path on a generated volume and print Dice")
    d.add_argument("--out", default="demo_output")
    d.add_argument("--device", default="auto")
    d.add_argument("--model", default=None)
    d.set_defaults(func=cmd_demo)
    m = sub.add_parser("models", help="list the checkpoints in weights_manifest.json")
    m.set_defaults(func=cmd_models)
    return ap


def run_command(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with ``ap`` and run the chosen command: a user's error is one line on stderr and status 2,
    Ctrl-C status 130 (shared with ``onepromptseg-dev``)."""
    args = ap.parse_args(argv)
    warnings.simplefilter("default", DeviceFallbackWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{ap.prog}: warning: {msg}\n"
    try:
        return args.func(args)
    except (UsageError, PromptError, VolumeIOError, CheckpointError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{ap.prog}: cancelled; no output written", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``onepromptseg`` command."""
    return run_command(make_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
