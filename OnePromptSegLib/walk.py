"""One walk of a propagation: from a drawn slice outwards, or across the gap between two drawn slices.

A walk is a generator that ``scheduler.drive_walks`` runs: it yields a ``WalkRequest`` when it needs the model (and
is sent back the probabilities and predicted quality) and a ``SliceResult`` when a slice is done.  Each step is
prompted by the previous slice's binarised prediction plus up to K-1 more templates (``_prepare``: growing context,
SSIM re-prompting), the model's probabilities are averaged with the previous result carried along the optical flow,
inside a gap with the shape interpolated between its drawn slices (``interpolation.gap_prior``), and the walk stops
where the structure ends (empty or doubtful slices: ``ssim.end_score``; ``_cut_tail`` towards a slice drawn empty).

``Walker`` is ``PropagationSession``'s base class, which starts the walks (``PropagationSession._walks``).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .crops import CropBox, steady_box
from .interpolation import gap_prior
from .prompts import KIND_INDEX, MaskPrompt, render_prompt_maps
from .scheduler import SliceResult, WalkRequest
from .ssim import DrawnLook, end_features, end_score, ssim


class Walker:
    """The walks of a ``PropagationSession`` (its base class): kept in a file of their own so that each reads in one
    sitting.  They read the volume, crops and flows and write results through the session's own members
    (``settings``, ``anchors``, ``quality``, ``end_features``, ``_slice``, ``_result_slice``, ``_store``, ``_crop``,
    ``_flow``, ``_with_flow``, ``_paste``)."""

    def _walk(self, kind: str, start: int, slices: List[int], far: Optional[int]) -> Iterator[SliceResult]:
        """A walk ``scheduler.plan_walks`` planned: ``kind`` "out" (from anchor ``start`` away from the other
        anchors, towards ``far``: a slice drawn empty, or None) or "gap" (between anchors ``start`` and ``far``,
        walked from both ends), over ``slices`` in their order.  Each slice is stored as it is done."""
        st = self.settings
        # An empty anchor says "not on this slice": it prompts nothing, so a walk from it ends at once.
        masks: Dict[int, np.ndarray] = {a: self.anchors[a] for a in (start, far)
                                        if a is not None and self.anchors[a].any()}
        # Slices of this walk's own span already computed (a walk resumed after a cancel) prompt the slices after
        # them; nothing beyond the walk's anchors is used (an empty anchor must stop what lies behind it).
        span = [start] + ([far] if far is not None else []) + list(slices)
        for k in range(min(span), max(span) + 1):
            if k in self._valid and k not in masks and k not in slices and k not in self.anchors:
                m = self._result_slice(k).astype(bool)
                if m.any():
                    masks[k] = m
        prior, weight = (gap_prior(st, start, far, self.anchors[start], self.anchors[far], self.spacing,
                                   self._slice(start).shape, self.model.size, self._flow)
                         if kind == "gap" else (None, 0.0))
        # Prompt maps of this walk's slices per crop: a slice prompts up to ``max_templates`` steps, and its mask in
        # ``masks`` never changes within a walk (set once), so each is drawn once.
        drawn_maps: Dict[Tuple[int, CropBox], np.ndarray] = {}
        # The last step's probabilities (after the flow average) and crop, carried to the next step (_with_flow).
        soft: Dict[int, Tuple[CropBox, np.ndarray]] = {}
        stopped: Dict[int, bool] = {1: False, -1: False}
        empties: Dict[int, int] = {1: 0, -1: 0}
        # Past the outermost drawn slices (or towards one drawn empty) the structure may end: each slice is compared
        # with the drawn slice the walk starts from (``ssim.end_score``).  Doubtful slices are kept unless a run of
        # them ends the walk; then the whole run is erased.
        look = DrawnLook.of(self._slice(start), self.anchors[start]) if kind == "out" and start in masks else None
        doubtful: Dict[int, List[int]] = {1: [], -1: []}
        boxes: Dict[int, Optional[CropBox]] = {1: None, -1: None}
        for s in slices:
            side = 1 if kind == "out" and s > start else -1 if kind == "out" else (1 if s - start <= far - s else -1)
            # In a gap, side +1 walks up from ``start`` and -1 walks down from ``far``.
            if kind == "gap":
                prev = s - 1 if side == 1 else s + 1
            else:
                prev = s - 1 if s > start else s + 1
            if stopped[side]:
                self._store(s, np.zeros(self._slice(s).shape, bool), 0.0)
                yield SliceResult(s, self._result_slice(s).astype(bool), 0.0, False, 0, 0, -1)
                continue
            req, src, rep, box = self._prepare(s, prev, masks, kind == "gap" and abs((far - s) - (s - start)) <= 1,
                                               boxes[side], drawn_maps)
            if req is None:
                mask, q = np.zeros(self._slice(s).shape, bool), 0.0
            else:
                prob, q = yield req
                before = soft.pop(src, None)  # used once: a later step prompted by ``src`` carries its mask
                prob = self._with_flow(prob, src, s, box, masks[src],
                                       before[1] if before is not None and before[0] == box else None)
                soft[s] = (box, prob)
                mask = self._paste(prob, box, self._slice(s).shape, prior(s) if prior else None, weight)
                boxes[side] = box
            # Between two drawn slices the object is known to go on: there only an empty prediction ends a walk.
            empty = not mask.any() or (kind != "gap" and q < st.min_quality)
            doubt = False
            if not empty and look is not None:
                self.end_features[s] = end_features(look, self._slice(s), mask, q)
                doubt = end_score(self.end_features[s], st.end_weights) > st.end_threshold
            empties[side] = empties[side] + 1 if empty or doubt else 0
            if doubt:
                doubtful[side].append(s)
            elif not empty:
                doubtful[side] = []  # the run is over: its doubtful slices stay
            if empty:
                mask = np.zeros_like(mask)
            else:
                masks[s] = mask
            self._store(s, mask, q)
            if empties[side] >= st.stop_after_empty:
                stopped[side] = True
            yield SliceResult(s, mask, q, rep, 0, 0, src)
            if stopped[side]:
                for k in doubtful[side]:  # the run that ended the walk lies past the structure's end
                    masks.pop(k, None)
                    self._store(k, np.zeros(self._slice(k).shape, bool), 0.0)
                    yield SliceResult(k, self._result_slice(k).astype(bool), 0.0, False, 0, 0, -1)
                doubtful[side] = []
        if (st.cut_tail and kind == "out" and far is not None and slices and abs(slices[-1] - far) == 1
                and not self.anchors[far].any()):
            yield from self._cut_tail(slices)

    def _cut_tail(self, slices: List[int]) -> Iterator[SliceResult]:
        """A walk that reached a slice drawn empty without stopping ran past the structure's end, somewhere on the
        way: cut it at its least confident slice, not in the first ``cut_from`` of the walk (near its anchor), if
        that slice stands out (``cut_drop`` below the walk's median quality)."""
        if not self._result_slice(slices[-1]).any():
            return
        late = [s for s in slices[int(len(slices) * self.settings.cut_from):] if self._result_slice(s).any()]
        weakest = min(late[::-1], key=lambda k: self.quality.get(k, 1.0))  # ties: cut the least
        typical = float(np.median([self.quality.get(k, 1.0) for k in slices if self._result_slice(k).any()]))
        if self.quality.get(weakest, 1.0) > typical - self.settings.cut_drop:
            return  # no slice stands out as doubtful: the structure ends just before the empty slice
        cut = slices.index(weakest)
        for s in slices[cut:]:
            self._store(s, np.zeros(self._slice(s).shape, bool), 0.0)
            yield SliceResult(s, self._result_slice(s).astype(bool), 0.0, False, 0, 0, -1)

    def _prepare(self, s: int, prev: int, masks: Dict[int, np.ndarray], meeting: bool,
                 prev_box: Optional[CropBox], drawn_maps: Dict[Tuple[int, CropBox], np.ndarray]
                 ) -> Tuple[Optional[WalkRequest], int, bool, Optional[CropBox]]:
        """What predicting slice ``s`` needs: (model request or None when no prompt is in reach, source slice,
        re-prompted, crop).  ``drawn_maps`` caches the walk's prompt maps by (slice, crop)."""
        st = self.settings
        # The main prompt: the nearest non-empty prediction on this side (prev, or further back after empties).
        src = prev
        step = prev - s
        while src not in masks and abs(src - s) <= st.max_prompt_distance and 0 <= src < self.n:
            src += step
        if src not in masks:
            return None, -1, False, prev_box
        box = steady_box(masks[src], prev_box, self.spacing, st.margin)
        reprompted = False
        # ``masks`` holds only non-empty masks (``_walk`` adds no other), so none is tested again here.
        cand = [k for k in masks if k != src and abs(k - s) <= st.max_prompt_distance]
        if st.reprompt and cand:
            sim_src = ssim(self._crop(s, box, st.ssim_sigma), self._crop(src, box, st.ssim_sigma))
            if sim_src < st.ssim_threshold:
                sims = {k: ssim(self._crop(s, box, st.ssim_sigma), self._crop(k, box, st.ssim_sigma)) for k in cand}
                best = max(sims, key=sims.get)
                if sims[best] > sim_src:
                    src, reprompted = best, True
                    box = steady_box(masks[src], None, self.spacing, st.margin)
        templates = [src]
        # Growing context: the meeting slice of a gap sees both sides; then anchors; then nearest trusted slices.
        extra = []
        if meeting:
            other = s + 1 if src < s else s - 1
            if other in masks:
                extra.append(other)
        # Beyond the meeting slice, only slices on the main prompt's side: a drawn slice on the far side, rendered
        # in a crop made for this side's object, can make the model lose the object (seen with onepromptseg-v2).
        behind = [k for k in masks if (k - s) * (src - s) > 0]
        extra += sorted((k for k in self.anchors if k in behind), key=lambda k: abs(k - s))
        extra += sorted((k for k in cand if k in behind), key=lambda k: abs(k - s))
        for k in extra:
            if len(templates) >= st.max_templates:
                break
            if k not in templates and abs(k - s) <= st.max_prompt_distance:
                templates.append(k)
        imgs = [self._crop(k, box) for k in templates]
        if len(drawn_maps) > 4 * st.max_templates:  # older crops are not read again: keep the cache small
            drawn_maps.clear()
        for k in templates:
            if (k, box) not in drawn_maps:
                drawn_maps[k, box] = render_prompt_maps(MaskPrompt(k, masks[k]), box, self.model.size)
        pms = [drawn_maps[k, box] for k in templates]
        keys = [(self._uid, k, box) for k in [s] + templates]
        request = WalkRequest(self._crop(s, box), imgs, pms, [KIND_INDEX["mask"]] * len(templates), keys)
        return request, src, reprompted, box
