"""The walk scheduler: plans the walks of a propagation (``plan_walks``: both directions, every gap between
anchors) and runs them with batched model calls (``drive_walks``; ``session.propagate_together`` for several
sessions).

A walk is a generator (``Walker._walk``): it yields a ``WalkRequest`` when it needs the model and a
``SliceResult`` when a slice is done.  ``drive_walks`` advances the walks in lockstep so that one step of every walk
goes to the model as one batch; walks never read each other's slices, so the result is the same as one walk after
the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np


@dataclass
class SliceResult:
    """One propagated slice, as yielded by ``propagate``."""

    slice_index: int
    mask: np.ndarray
    quality: float
    reprompted: bool
    done: int
    total: int
    source: int  #: slice the main prompt came from


@dataclass
class WalkRequest:
    """What one walk step needs from the model: a query crop and its templates (see ``LoadedModel.predict``)."""

    query: np.ndarray
    templates: List[np.ndarray]
    prompts: List[np.ndarray]
    kinds: List[int]
    keys: List[tuple]


def drive_walks(walks: List[Iterator], model, batch: bool) -> Iterator[Tuple[int, "SliceResult"]]:
    """Run walk generators to the end; yields (walk index, SliceResult).

    A walk yields a ``WalkRequest`` when it needs the model and is sent back (probabilities, quality); it yields a
    ``SliceResult`` when a slice is done.  With ``batch`` every walk advances one step at a time and the requests
    of a step go to the model as one batch (``predict_many``); otherwise the walks run one after the other.  Walks
    never read each other's slices, so both give the same result.
    """
    groups = [list(range(len(walks)))] if batch else [[i] for i in range(len(walks))]
    many = getattr(model, "predict_many", None)
    for group in groups:
        inbox: Dict[int, Optional[Tuple[np.ndarray, float]]] = {i: None for i in group}
        active = list(group)
        while active:
            requests: Dict[int, WalkRequest] = {}
            for i in list(active):
                val = inbox[i]
                while True:
                    try:
                        msg = walks[i].send(val)
                    except StopIteration:
                        active.remove(i)
                        break
                    val = None
                    if isinstance(msg, WalkRequest):
                        requests[i] = msg
                        break
                    yield i, msg
            ids = list(requests)
            if len(ids) > 1 and many is not None:
                outs = many([requests[i] for i in ids])
            else:
                outs = [model.predict(r.query, r.templates, r.prompts, r.kinds, keys=r.keys)
                        for r in (requests[i] for i in ids)]
            for i, out in zip(ids, outs):
                inbox[i] = out


def plan_walks(anchors: Dict[int, np.ndarray], n: int, valid: Set[int], direction: str, lo: int, hi: int
               ) -> List[Tuple[str, int, List[int], Optional[int]]]:
    """The walks of one propagation over slices ``lo..hi`` of ``n``: (kind, start anchor, slices in order, anchor
    at the far end or None).  Slices in ``valid`` (computed since the last change) are not redone.  Kind "out" walks
    away from its start (past the outermost anchors, or through a gap with one end drawn empty); kind "gap"
    alternates from both ends of a gap between two drawn anchors so that the walks meet in the middle."""
    A = sorted(anchors)
    plan = []
    todo = lambda ks: [k for k in ks if lo <= k <= hi and k not in valid]  # noqa: E731
    if direction in ("both", "backward"):
        ks = todo(range(A[0] - 1, -1, -1))
        if ks:
            plan.append(("out", A[0], ks, None))
    for a, b in zip(A[:-1], A[1:]):
        gap = list(range(a + 1, b))
        if not todo(gap):
            continue
        full_a, full_b = anchors[a].any(), anchors[b].any()
        if direction == "both" and full_a != full_b:
            # Drawn empty at one end: the object ends somewhere in the gap, so the other end walks all the way
            # (with the stop rule) instead of meeting a walk that cannot start.
            ks = [k for k in gap if lo <= k <= hi]
            plan.append(("out", a, ks, b) if full_a else ("out", b, ks[::-1], a))
        elif direction == "both":
            # Alternate from both ends so that the walks meet in the middle.
            order = []
            i, j = a + 1, b - 1
            while i <= j:
                order.append(i)
                if j != i:
                    order.append(j)
                i, j = i + 1, j - 1
            plan.append(("gap", a, [k for k in order if lo <= k <= hi], b))
        elif direction == "forward":
            plan.append(("out", a, [k for k in gap if lo <= k <= hi], b))
        else:
            plan.append(("out", b, [k for k in gap[::-1] if lo <= k <= hi], a))
    if direction in ("both", "forward"):
        ks = todo(range(A[-1] + 1, n))
        if ks:
            plan.append(("out", A[-1], ks, None))
    return plan
