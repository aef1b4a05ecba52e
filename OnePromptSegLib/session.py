"""Slice propagation: a small session object in the spirit of SAM2's video predictor.

    sess = PropagationSession(load_model())            # settings: EngineSettings.for_model(model)
    sess.set_volume(array_kji, axis="k", spacing_ijk=(0.8, 0.8, 2.0))
    sess.add_prompt(MaskPrompt(30, mask2d))          # or Click / BBox / Doodle: segmented in interactive mode
    for r in sess.propagate():                        # a generator: show progress, stop iterating to cancel
        ...
    sess.correct(41, fixed_mask2d)                    # a locked anchor; the next propagate() redoes only its range
    sess.refine_slice(47, Click(47, [(r, c)], [0]))   # or correct with clicks (1 add, 0 remove): same locking
    mask = sess.result

How a slice is predicted (Prompt U-Net's propagation with One-Prompt's model):
* every prompted or corrected slice is a **locked anchor**, never overwritten;
* from each anchor the engine walks outwards; each step is prompted by the previous slice's **binarised**
  prediction (soft masks drift) plus up to K-1 more templates from the nearest anchors and trusted slices
  (growing context);
* **self-supervised re-prompting**: the SSIM of the (blurred) current slice against the slice its prompt came from
  is compared with a threshold calibrated on real data; when it drops below (an abrupt change) the prompt is
  replaced by the most similar trusted slice from the buffer of earlier predictions; no prompt is used that is more
  than ``max_prompt_distance`` slices away;
* a direction **stops** after ``stop_after_empty`` consecutive empty or low-quality slices, so masks do not leak;
* between two anchors the walks from both sides alternate and **meet**: the meeting slice is predicted from both
  sides' neighbours at once (fused), not overwritten by whichever came last;
* crops are square in mm around the prompt's object, resampled to the model's size and pasted back; only crops are
  ever converted to float.
"""
from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from scipy import ndimage as ndi

from .checkpoints import LoadedModel
from .clicks import drop_clicked_parts, pick_extent, pixel, refine_outline
from .crops import CropBox, crop_around, extract, paste
from .flow import pool, resize_flow, tvl1, warp_mask
from .io import normalize, robust_range
from .prompts import (KIND_INDEX, AxisLike, BBox, Click, MaskPrompt, Prompt, PromptError, ijk_axis,
                      numpy_axis, prompt_points, render_prompt_maps, validate)
from .scheduler import SliceResult, WalkRequest, drive_walks, plan_walks
from .settings import EngineSettings
from .ssim import blur
from .walk import Walker


class SeedWarning(UserWarning):
    """One-Prompt mode chose a seed slice in this volume (the message says which and with what quality)."""


def merge_into(current: np.ndarray, result: np.ndarray, axis: AxisLike, slices: Sequence[int],
               protected: Sequence[int]) -> np.ndarray:
    """``current`` (k,j,i) with ``result`` written on ``slices`` along ``axis``, never on ``protected`` slices.

    How a caller (the Slicer module) writes a propagation into a segment that may hold other work: slices the engine
    did not compute and slices the user drew keep their content.
    """
    merged = np.array(current, dtype=np.uint8, copy=True)
    a = numpy_axis(axis)
    for s in sorted(set(int(k) for k in slices) - set(int(k) for k in protected)):
        idx = [slice(None)] * 3
        idx[a] = s
        merged[tuple(idx)] = result[tuple(idx)] > 0
    return merged


@dataclass
class _Reference:
    """A prompted slice of another volume (One-Prompt's template from another patient)."""

    image: np.ndarray  # normalised 2D slice
    mask: np.ndarray
    spacing: Tuple[float, float]


_SESSION_IDS = itertools.count()


class PropagationSession(Walker):
    """Holds one volume, its anchors and the propagated result; see the module docstring.  The walks of a
    propagation are in ``walk.Walker``."""

    def __init__(self, model: LoadedModel, settings: Optional[EngineSettings] = None):
        self.model = model
        self._uid = next(_SESSION_IDS)
        self.settings = settings or EngineSettings.for_model(model)
        self.volume: Optional[np.ndarray] = None
        self.anchors: Dict[int, np.ndarray] = {}
        self.quality: Dict[int, float] = {}
        self._valid: Set[int] = set()
        self._references: List[_Reference] = []
        self.result: Optional[np.ndarray] = None
        self.seed_slice: Optional[int] = None  #: the slice One-Prompt mode seeded from, if it did
        self._guessed: Set[int] = set()  #: anchors that are the model's guess (a One-Prompt seed), not drawn
        self._pending = 0  #: slices the walks of the current propagation will write
        self._adapted: Optional[Tuple[tuple, LoadedModel]] = None  #: (drawn slices it was made for, model)
        self._clicks: Dict[int, List[Tuple[Tuple[float, float], int]]] = {}  #: correction clicks per slice
        #: ``ssim.end_features`` of the slices walks predicted past the outermost drawn slices (``tooling.ends`` fits
        #: the score on them)
        self.end_features: Dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------ set-up
    def set_volume(self, volume: np.ndarray, axis: AxisLike = "k",
                   spacing_ijk: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        """Use ``volume`` (k, j, i), slicing along IJK ``axis``.  The array is referenced, not copied."""
        if volume.ndim != 3:
            raise PromptError(f"the volume must be 3D (got shape {volume.shape})")
        if min(volume.shape) < 1:
            raise PromptError(f"the volume is empty (shape {volume.shape})")
        self.volume = volume
        self.axis = ijk_axis(axis)
        self.naxis = numpy_axis(axis)
        sp_kji = [float(s) for s in spacing_ijk][::-1]
        self.spacing = tuple(s for d, s in enumerate(sp_kji) if d != self.naxis)
        self.n = volume.shape[self.naxis]
        self.lo, self.hi = robust_range(volume)
        self.anchors, self.quality, self._valid, self._guessed = {}, {}, set(), set()
        self._clicks = {}
        self.end_features = {}
        self._adapted = None  # adapted to another volume's slices
        self.result = np.zeros(volume.shape, np.uint8)
        self._norm_cache: Dict[Tuple[int, CropBox, Optional[float]], np.ndarray] = {}
        self._flow_cache: "OrderedDict[Tuple[int, int, CropBox], Tuple[np.ndarray, np.ndarray]]" = OrderedDict()

    def _slice(self, s: int) -> np.ndarray:
        return np.take(self.volume, s, axis=self.naxis)

    def _result_slice(self, s: int) -> np.ndarray:
        idx = [slice(None)] * 3
        idx[self.naxis] = s
        return self.result[tuple(idx)]

    def _set_result(self, s: int, mask: np.ndarray) -> None:
        idx = [slice(None)] * 3
        idx[self.naxis] = s
        self.result[tuple(idx)] = mask

    def _crop(self, s: int, box: CropBox, sigma: Optional[float] = None) -> np.ndarray:
        """Slice ``s`` in crop ``box``, normalised; with ``sigma``, blurred for SSIM.  Cached: within a walk a
        slice is read as query, then as template and SSIM partner of the next steps, in the same crop."""
        key = (s, box, sigma)
        c = self._norm_cache.get(key)
        if c is None:
            if len(self._norm_cache) > 64:
                self._norm_cache.clear()
            if sigma is None:
                c = normalize(extract(self._slice(s), box, self.model.size), self.lo, self.hi)
            else:
                c = blur(self._crop(s, box), sigma)
            self._norm_cache[key] = c
        return c

    def _need_volume(self) -> None:
        if self.volume is None:
            raise PromptError("no volume set: call set_volume() first")

    # ------------------------------------------------------------------------------------------ prompts
    def add_prompt(self, prompt: Prompt) -> np.ndarray:
        """Add a prompt; its slice becomes a locked anchor.  Returns the slice's mask.

        Click, box and doodle prompts are segmented in interactive mode (template == query) first.
        """
        self._need_volume()
        validate(prompt, self.volume.shape, self.axis)
        s = int(prompt.slice_index)
        if isinstance(prompt, MaskPrompt):
            mask = np.asarray(prompt.mask, bool)
        else:
            mask = self.segment_slice(prompt)
            if not mask.any():
                raise PromptError(f"the {prompt.kind} prompt on slice {s} found no structure: place it on the "
                                  "structure, or draw a mask on this slice instead")
        self._lock(s, mask)
        return mask

    def predict_from(self, slice_index: int, source: int, mask: np.ndarray) -> np.ndarray:
        """One propagation step on its own: slice ``slice_index`` segmented from ``mask`` on slice ``source`` as the
        only template, in the crop and at the threshold a walk would use.  Changes nothing in the session: for
        diagnostics (``bench --one-step`` compares it with copying ``mask``)."""
        self._need_volume()
        mask = np.asarray(mask, bool)
        validate(MaskPrompt(int(source), mask), self.volume.shape, self.axis)
        if not mask.any():
            raise PromptError(f"the mask on slice {source} is empty: nothing to propagate from")
        box = crop_around(mask, mask.shape, self.spacing, self.settings.margin)
        pm = render_prompt_maps(MaskPrompt(int(source), mask), box, self.model.size)
        prob, _ = self.model.predict(self._crop(int(slice_index), box), [self._crop(int(source), box)], [pm],
                                     [KIND_INDEX["mask"]])
        prob = self._with_flow(prob, int(source), int(slice_index), box, mask)
        return self._paste(prob, box, self._slice(int(slice_index)).shape)

    def correct(self, slice_index: int, mask: np.ndarray) -> None:
        """A user-corrected slice: it becomes a locked anchor and its range is recomputed on the next propagate().

        An empty ``mask`` says "the structure is not here": in Slicer, a leak erased on this slice (the segment erased
        there, then re-propagate).  The nearest drawn slice with the structure then walks the whole gap up to it,
        judging each slice with the stop rule (``ssim.end_score``), and a walk that still reaches the empty slice is
        cut at its least confident slice (``Walker._cut_tail``).
        """
        self._need_volume()
        validate(MaskPrompt(int(slice_index), mask), self.volume.shape, self.axis)
        self._lock(int(slice_index), np.asarray(mask, bool))

    def set_result(self, mask: np.ndarray) -> None:
        """Take up a result computed before (an earlier run's output, read from a file) as this session's own: it
        stays on every slice but the anchors, and nothing is recomputed until a correction (``refine_slice``,
        ``correct``) invalidates the range around its slice.  Add the prompts the result was made from first."""
        self._need_volume()
        if tuple(np.shape(mask)) != tuple(self.volume.shape):
            raise PromptError(f"the earlier result has shape {tuple(np.shape(mask))[::-1]} (i,j,k) but the image is "
                              f"{tuple(self.volume.shape)[::-1]}")
        for s in range(self.n):
            if s not in self.anchors:
                self._set_result(s, np.take(mask, s, axis=self.naxis) > 0)
                self.quality[s] = 1.0
                self._valid.add(s)

    def refine_slice(self, slice_index: int, clicks: Click) -> np.ndarray:
        """Correct one slice of the shown result with clicks: a positive click (label 1) on a part the result missed,
        a negative one (label 0) on a part it wrongly holds.  Returns the slice's new mask.

        The slice becomes a locked anchor (as ``correct``), so the next ``propagate()`` recomputes only the slices
        between its neighbouring anchors.  Clicks on one slice add up: each refinement honours all the clicks given
        on that slice so far, and starts from its current mask: a negative click deep inside a part removes it
        (``_drop_clicked_parts``), a positive click far from the mask adds the part the model finds under it
        (``_add_missed_parts``), then the band around the outline, widened around each click, is decided again from
        the image by scikit-image's random walker (``_refine``).  New positive clicks only add to the mask, new
        negative ones only remove from it.
        """
        self._need_volume()
        s = int(clicks.slice_index)
        if clicks.slice_index != slice_index:
            raise PromptError(f"the clicks lie on slice {clicks.slice_index}, not on slice {slice_index}")
        if not clicks.points or len(clicks.points) != len(clicks.labels):
            raise PromptError("a correction needs at least one click, each with a label (1 add, 0 remove)")
        # ``validate`` asks a click prompt for a positive point; a correction may be negative clicks only.
        validate(Click(s, list(clicks.points), [1] * len(clicks.points)), self.volume.shape, self.axis)
        given = self._clicks.setdefault(s, [])
        given += [((float(r), float(c)), int(v == 1)) for (r, c), v in zip(clicks.points, clicks.labels)]
        current = drop_clicked_parts(self._result_slice(s).astype(bool), given, self.settings.refine_whole)
        current = self._add_missed_parts(s, current, given)
        mask = self._refine(s, current, given) if current.any() else current
        # What the new clicks ask for, and nothing against it: "add here" removes nothing, "remove here" adds nothing.
        new = {int(v == 1) for v in clicks.labels}
        if new == {1}:
            mask |= current
        elif new == {0}:
            mask &= current
        if mask.sum() < self.settings.min_area_px:
            mask[:] = False
        self._lock(s, mask)
        return mask

    def _add_missed_parts(self, s: int, mask: np.ndarray, clicks: Sequence[Tuple[Tuple[float, float], int]]
                          ) -> np.ndarray:
        """``mask`` with the parts that positive clicks far outside it point at (further from it than its own
        extent, or any positive click on an empty slice): found by the model near the structure's neighbouring
        slices (``_segment_near``), the part holding the click is added."""
        rr, cc = np.nonzero(mask)
        ext = max(np.ptp(rr), np.ptp(cc)) + 1 if len(rr) else 0
        away = ndi.distance_transform_edt(~mask) if len(rr) else None
        far = [(p, v) for p, v in clicks if v and (away is None or away[pixel(p, mask.shape)] > ext)]
        if not far:
            return mask
        found = self._segment_near(s, Click(s, [p for p, _ in far] + [p for p, v in clicks if not v],
                                            [1] * len(far) + [0] * sum(1 for _, v in clicks if not v)))
        parts, _ = ndi.label(found)
        keep = {parts[pixel(p, mask.shape)] for p, _ in far} - {0}
        return mask | np.isin(parts, list(keep))

    def _segment_near(self, s: int, clicks: Click) -> np.ndarray:
        """Positive clicks where the result holds nothing: the nearest slice holding the structure (within
        ``max_prompt_distance``) is carried to this one by a propagation step (``predict_from``) and its parts under
        the clicks are kept; where the clicks fall outside it, they are segmented as a click prompt in that slice's
        crop moved onto them (the structure has about that size).  With no such slice, as a click prompt
        (``segment_slice``)."""
        near = [k for k in range(self.n) if 0 < abs(k - s) <= self.settings.max_prompt_distance
                and k in self._valid and self._result_slice(k).any()]
        if not near:
            return self.segment_slice(clicks)
        k = min(near, key=lambda j: abs(j - s))
        source = self._result_slice(k).astype(bool)
        carried = self.predict_from(s, k, source)
        parts, _ = ndi.label(carried)
        under = {parts[pixel(p, carried.shape)] for p, v in zip(clicks.points, clicks.labels) if v} - {0}
        if under:
            return np.isin(parts, list(under))
        size = crop_around(source, source.shape, self.spacing, self.settings.margin)
        pts = prompt_points(clicks)
        centre = (pts.min(0) + pts.max(0) + 1) / 2
        return self._predict_interactive(clicks, s, [CropBox(centre[0] - size.h / 2, centre[1] - size.w / 2,
                                                             size.h, size.w)])

    def _refine(self, s: int, current: np.ndarray, clicks: Sequence[Tuple[Tuple[float, float], int]]) -> np.ndarray:
        """``current`` (slice ``s``) with its outline decided again where the clicks say it is wrong
        (``clicks.refine_outline`` on this slice's normalised image)."""
        return refine_outline(lambda win: blur(normalize(self._slice(s)[win], self.lo, self.hi), 1.0), current,
                              clicks, self.settings.refine_band, self.settings.refine_beta)

    def remove_anchor(self, slice_index: int) -> None:
        """Unlock a slice; its range is recomputed on the next propagate()."""
        self._clicks.pop(slice_index, None)
        if slice_index in self.anchors:
            del self.anchors[slice_index]
            self._guessed.discard(slice_index)
            self._invalidate_around(slice_index)

    def _lock(self, s: int, mask: np.ndarray) -> None:
        self._guessed.discard(s)  # drawn over the seed: now the user's
        self.anchors[s] = mask.copy()
        self._set_result(s, mask)
        self.quality[s] = 1.0
        self._invalidate_around(s)
        self._valid.add(s)

    def _invalidate_around(self, s: int) -> None:
        """Slices between the neighbouring anchors of ``s`` must be recomputed."""
        lower = [a for a in self.anchors if a < s]
        upper = [a for a in self.anchors if a > s]
        lo = max(lower) + 1 if lower else 0
        hi = min(upper) - 1 if upper else self.n - 1
        for k in range(lo, hi + 1):
            if k not in self.anchors:
                self._valid.discard(k)

    def add_reference(self, volume: np.ndarray, prompt: Prompt, axis: AxisLike = "k",
                      spacing_ijk: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        """One-Prompt mode: a prompted slice of another volume (template patient) used to seed this one.

        Returns the reference slice's mask (click/box/doodle are segmented on the reference first).
        """
        ref = PropagationSession(self.model, self.settings)
        ref.set_volume(volume, axis, spacing_ijk)
        mask = ref.add_prompt(prompt)
        full = ref._slice(int(prompt.slice_index))
        img = normalize(full.astype(np.float32, copy=False), ref.lo, ref.hi)
        self._references.append(_Reference(img, mask, ref.spacing))
        return mask

    # ------------------------------------------------------------------------------------------ one slice
    def segment_slice(self, prompt: Prompt) -> np.ndarray:
        """Interactive mode: the prompt's own slice is template and query.  Returns a full-slice bool mask."""
        self._need_volume()
        validate(prompt, self.volume.shape, self.axis)
        s = int(prompt.slice_index)
        shape = self._slice(s).shape
        pts = prompt_points(prompt)
        if isinstance(prompt, BBox):
            return self._predict_interactive(prompt, s, [crop_around(None, shape, self.spacing, margin=0.3,
                                                                     points=pts)])
        # Clicks and strokes say where, not how big: the crop is centred on them and as wide as the slice (a
        # second pass around the first result made this model under-segment on the demo volumes, BENCHMARKS.md).
        # A click is also tried in narrower crops (``click_scales``), and the crop whose mask stands out most from
        # its surroundings wins (``_pick_extent``): small structures vanish in the slice-wide crop.
        ext = max(shape[0] * self.spacing[0], shape[1] * self.spacing[1])
        n = max(1, self.settings.click_scales) if isinstance(prompt, Click) else 1
        boxes = [crop_around(None, shape, self.spacing, margin=0.0, points=pts,
                             min_mm=max(ext / self.settings.click_scale_step ** i, 48.0 if i == 0 else 24.0))
                 for i in range(n)]
        return self._predict_interactive(prompt, s, list(dict.fromkeys(boxes)))

    def _predict_interactive(self, prompt: Prompt, s: int, boxes: Sequence[CropBox]) -> np.ndarray:
        """``prompt`` segmented on its own slice in each crop of ``boxes`` (one batch; each crop is encoded once,
        as query and template); with several crops, the one ``_pick_extent`` prefers."""
        st = self.settings
        thr = st.threshold if st.interactive_threshold is None else st.interactive_threshold
        requests = [WalkRequest(self._crop(s, box), [self._crop(s, box)],
                                [render_prompt_maps(prompt, box, self.model.size)], [KIND_INDEX[prompt.kind]],
                                [(self._uid, s, box)] * 2) for box in boxes]
        many = getattr(self.model, "predict_many", None)  # a stand-in predictor may have ``predict`` only
        outs = many(requests) if many is not None else [self.model.predict(r.query, r.templates, r.prompts,
                                                                           r.kinds, r.keys) for r in requests]
        shape = self._slice(s).shape
        masks = [self._paste(p, box, shape, threshold=thr) for (p, _), box in zip(outs, boxes)]
        if len(masks) == 1:
            return masks[0]
        return masks[pick_extent(blur(normalize(self._slice(s), self.lo, self.hi), 1.0), masks)]

    def _flow(self, s: int, src: int, box: CropBox) -> Tuple[np.ndarray, np.ndarray]:
        """The optical flow from slice ``src``'s image to slice ``s``'s in crop ``box``, at the model's input size
        (``warp_mask`` carries a crop of ``src`` onto ``s``).

        TV-L1 at half the model's input size (levels of 48 and 24 pixels, 3 warps x 5 iterations), about 5 ms; on
        30 train/ tasks within 0.003 Dice of scikit-image's defaults at full size, which take 20x longer (one level
        only was as good there, but missed motions of a few pixels).

        A flow depends on the two images and the crop only, not on the drawn slices, so it is kept (at half size,
        18 kB, the last ``4 x slices`` of them) for the next propagation: after a correction the walks set off
        again from the same drawn slices in the same crops, and on 30 train/ tasks 36% of the flows of the
        drawn-slice protocol were such repeats (BENCHMARKS.md).
        """
        key = (s, src, box)
        half = self._flow_cache.get(key)
        if half is None:
            half = tvl1(pool(self._crop(s, box)), pool(self._crop(src, box)), num_warp=3, num_iter=5)
            self._flow_cache[key] = half
            if len(self._flow_cache) > 4 * self.n:
                self._flow_cache.popitem(last=False)
        else:
            self._flow_cache.move_to_end(key)
        size = self.model.size
        return resize_flow(half, (size, size))

    def _with_flow(self, prob: np.ndarray, src: int, s: int, box: CropBox, mask: np.ndarray,
                   soft: Optional[np.ndarray] = None) -> np.ndarray:
        """The model's probabilities for slice ``s`` (crop ``box``) averaged (``flow_weight``) with slice ``src``'s
        result carried along the optical flow from ``src``'s image to ``s``'s.

        What is carried: ``soft``, ``src``'s own averaged probabilities in this crop where the walk has them (its
        previous step, same crop), so that a walk averages the model's probabilities along the flow; otherwise
        ``mask`` (a drawn slice, or a new crop), rescaled so that its 0.5 falls on the threshold.  Carrying the
        thresholded mask at every step instead was a ratchet: a pixel outside the carried mask can never pass
        (``(1 - w) * p + 0 < threshold``), so masks could shrink but not grow, and on a generated volume with a blob
        of constant size a 50-slice walk lost a quarter of its area (BENCHMARKS.md).
        """
        w = self.settings.flow_weight
        if w <= 0:
            return prob
        flow = self._flow(s, src, box)
        if soft is not None:
            return (1 - w) * prob + w * warp_mask(soft, flow)
        carried = warp_mask(extract(mask, box, self.model.size), flow)
        t = self.settings.threshold
        carried = np.where(carried < 0.5, carried * (2 * t), t + (carried - 0.5) * (2 * (1 - t)))
        return (1 - w) * prob + w * carried

    def _paste(self, prob: np.ndarray, box: CropBox, shape: Tuple[int, int],
               prior: Optional[np.ndarray] = None, weight: float = 0.0,
               threshold: Optional[float] = None) -> np.ndarray:
        """The crop's probabilities on the slice grid, thresholded (``threshold``, default the propagation's);
        averaged first with ``prior`` (a full slice of probabilities, weight ``weight``) where one is given."""
        vals, (rs, cs) = paste(prob, box, shape)
        out = np.zeros(shape, bool)
        out[rs, cs] = self._decide(vals, None if prior is None else prior[rs, cs], weight, threshold)
        if out.sum() < self.settings.min_area_px:
            out[:] = False
        return out

    def _decide(self, prob: np.ndarray, prior: Optional[np.ndarray], w: float = 0.0,
                threshold: Optional[float] = None) -> np.ndarray:
        """Probabilities -> mask, averaged first with ``prior`` (weight ``w``) where one is given."""
        thr = self.settings.threshold if threshold is None else threshold
        if prior is not None:
            prob = (1 - w) * prob + w * prior
            thr = (1 - w) * thr + w * 0.5  # each at its own decision boundary adds nothing either way
        return prob > thr

    # ------------------------------------------------------------------------------------------ propagation
    def propagate(self, direction: str = "both", slice_range: Optional[Tuple[int, int]] = None
                  ) -> Iterator[SliceResult]:
        """Propagate from the anchors; yields each slice as it is done.  Stop iterating to cancel.

        ``direction``: 'both', 'forward' (increasing index) or 'backward'.  ``slice_range`` (lo, hi), inclusive,
        limits the slices written.  Slices already computed since the last change are not recomputed.
        """
        walks = self._walks(direction, slice_range)
        for done, (_, r) in enumerate(drive_walks(walks, self._walk_model(), self.settings.batch_walks), start=1):
            r.done, r.total = done, max(done, self._pending)
            yield r

    def adapt(self) -> Iterator[Tuple[int, int]]:
        """Test-time adaptation to this volume's drawn slices; yields (steps done, steps) so a caller can show
        progress and cancel (stop iterating: nothing is kept, and the next ``propagate`` adapts again).

        ``propagate`` runs it itself when needed; it does nothing when ``adapt_steps`` is 0, with fewer than
        ``adapt_min_drawn`` drawn slices, or when the model is already adapted to the same drawn slices.  One-Prompt
        mode's seed is the model's own guess, not drawn: it is not adapted to (until the user draws over it).
        """
        st = self.settings
        key, drawn = self._anchor_key(), self._drawn()
        if st.adapt_steps <= 0 or len(drawn) < st.adapt_min_drawn or (
                self._adapted is not None and self._adapted[0] == key):
            return
        from .adapt import adapt_model

        def crop(s: int, box: CropBox) -> np.ndarray:  # not self._crop: jittered boxes would fill its cache
            return normalize(extract(self._slice(s), box, self.model.size), self.lo, self.hi)

        net = yield from adapt_model(self.model, crop, drawn, self.spacing, st.adapt_steps, st.adapt_lr,
                                     st.adapt_batch, st.max_prompt_distance)
        self._adapted = (key, net)

    def _drawn(self) -> Dict[int, np.ndarray]:
        """The anchors the user drew (all but One-Prompt mode's seed, until drawn over)."""
        return {s: m for s, m in self.anchors.items() if s not in self._guessed}

    def _anchor_key(self) -> tuple:
        """The drawn slices an adaptation was made for."""
        return tuple(sorted((s, hash(m.tobytes())) for s, m in self._drawn().items()))

    def _walk_model(self) -> LoadedModel:
        """The model the walks use: the copy adapted to the current drawn slices, if adaptation is on."""
        for _ in self.adapt():
            pass
        if self._adapted is not None and self._adapted[0] == self._anchor_key() and self.settings.adapt_steps > 0:
            return self._adapted[1]
        return self.model

    def _walks(self, direction: str, slice_range: Optional[Tuple[int, int]]) -> List[Iterator]:
        """The walk generators of one propagation (``_pending`` = slices they will write)."""
        self._need_volume()
        if direction not in ("both", "forward", "backward"):
            raise PromptError(f"direction must be both, forward or backward (got {direction!r})")
        lo, hi = (0, self.n - 1) if slice_range is None else (max(0, int(slice_range[0])),
                                                            min(self.n - 1, int(slice_range[1])))
        if lo > hi:
            raise PromptError(f"slice range {slice_range} is empty (volume has slices 0..{self.n - 1})")
        if not self.anchors:
            if not self._references:
                raise PromptError("no prompt yet: add a click, box, scribble or mask on one slice first")
            self._seed_from_references(lo, hi)
        plan = plan_walks(self.anchors, self.n, self._valid, direction, lo, hi)
        self._pending = sum(len(p[2]) for p in plan)
        return [self._walk(kind, start, slices, other) for kind, start, slices, other in plan]

    def _store(self, s: int, mask: np.ndarray, q: float) -> None:
        if s in self.anchors:  # never overwrite a locked slice
            return
        self._set_result(s, mask)
        self.quality[s] = q
        self._valid.add(s)

    def _seed_from_references(self, lo: int, hi: int) -> None:
        """One-Prompt mode without an anchor: find the slice the references match best and make it the seed."""
        S = self.model.size
        best = (-1.0, None, None)
        ref_inputs = []
        for ref in self._references:
            rbox = crop_around(ref.mask, ref.image.shape, ref.spacing, self.settings.margin * 2)
            ref_inputs.append((rbox, extract(ref.image, rbox, S),
                               render_prompt_maps(MaskPrompt(0, ref.mask), rbox, S)))
        step = max(1, (hi - lo + 1) // 48)  # scan at most ~48 slices, then refine around the best
        for s in range(lo, hi + 1, step):
            shape = self._slice(s).shape
            for ref, (rbox, rimg, rpm) in zip(self._references, ref_inputs):
                # Same relative position and the same field of view in mm as on the reference.
                fr, fc = rbox.r0 / ref.image.shape[0], rbox.c0 / ref.image.shape[1]
                hmm = rbox.h * ref.spacing[0]
                box = CropBox(fr * shape[0], fc * shape[1], hmm / self.spacing[0], hmm / self.spacing[1])
                prob, q = self.model.predict(self._crop(s, box), [rimg], [rpm], [KIND_INDEX["mask"]])
                score = q * float((prob > self.settings.threshold).mean() > 0)
                if score > best[0]:
                    best = (score, s, self._paste(prob, box, shape))
        if best[1] is None or not best[2].any():
            raise PromptError("the template from the other volume matched nothing in this volume; "
                              "prompt one slice of this volume instead")
        self.add_seed(best[1], best[2], best[0])
        warnings.warn(f"One-Prompt mode: seeded from slice {best[1]} (quality {best[0]:.2f})", SeedWarning)

    def add_seed(self, slice_index: int, mask: np.ndarray, quality: float) -> None:
        """A slice guessed from another patient (One-Prompt's seed search, or a registered template's labels): an
        anchor the walks start from, but not *drawn* (test-time adaptation ignores it, and drawing over it makes it
        the user's)."""
        self._need_volume()
        s = int(slice_index)
        validate(MaskPrompt(s, mask), self.volume.shape, self.axis)
        self.anchors[s] = np.asarray(mask, bool).copy()
        self._set_result(s, self.anchors[s])
        self.quality[s] = float(quality)
        self._invalidate_around(s)
        self._valid.add(s)
        self.seed_slice = s
        self._guessed.add(s)


def propagate_together(sessions: Sequence[PropagationSession], direction: str = "both",
                       batch: bool = True) -> Iterator[Tuple[int, "SliceResult"]]:
    """Propagate several sessions (e.g. several labels of one volume) at once; yields (session index, SliceResult).

    With ``batch`` every step of every walk of every session goes to the model in one batch; otherwise the walks
    run one after the other (same result).  All sessions must share one model.  ``done``/``total`` in the results
    count over all sessions.
    """
    if not sessions:
        return
    if any(s.model is not sessions[0].model for s in sessions):
        raise PromptError("propagate_together needs sessions that share one model")
    # Sessions adapted to their own drawn slices (``adapt_steps``) each have their own model: one batch per model.
    groups: Dict[int, Tuple[LoadedModel, List[Iterator], List[int]]] = {}
    for n, sess in enumerate(sessions):
        mine = sess._walks(direction, None)  # first: One-Prompt mode may add a seed anchor here
        model = sess._walk_model()
        _, walks, owner = groups.setdefault(id(model), (model, [], []))
        for w in mine:
            walks.append(w)
            owner.append(n)
    total = sum(sess._pending for sess in sessions)
    done = 0
    for model, walks, owner in groups.values():
        for i, r in drive_walks(walks, model, batch):
            done += 1
            r.done, r.total = done, max(done, total)
            yield owner[i], r
