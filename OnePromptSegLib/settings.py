"""Propagation settings (``EngineSettings``): every knob of ``PropagationSession``, its default and where it was
calibrated, and how a checkpoint's manifest entry and the command line override them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from .prompts import PromptError


@dataclass
class EngineSettings:
    """Propagation settings.  Defaults were calibrated on ../shared/data/train (see docs/BENCHMARKS.md)."""

    #: re-prompt when SSIM(current slice, prompt's slice) falls below this.  0.35 ~ the 5th percentile of
    #: neighbouring-slice SSIM on ../shared/data/train (python -m OnePromptSegLib.tooling.calibrate; BENCHMARKS.md).
    ssim_threshold: float = 0.35
    reprompt: bool = True  #: SSIM-triggered re-prompting from buffered predictions
    max_prompt_distance: int = 12  #: never prompt from a slice further away than this
    max_templates: int = 3  #: K: templates per step (previous slice + nearest anchors / trusted slices)
    stop_after_empty: int = 2  #: stop a direction after this many consecutive empty / low-quality slices
    min_quality: float = 0.35  #: predicted quality below this counts as "object ended"
    #: probability threshold of the binary mask.  0.7, not 0.5: at 0.5 the propagated masks were 1.6-2.5x the truth
    #: on the object's slices of a train/ subset (each step's slight excess is the next step's prompt); 0.7 gave
    #: Dice 0.68 against 0.65 there (30 tasks; BENCHMARKS.md), and first-slice box/click Dice within 0.01
    threshold: float = 0.7
    #: crop margin on each side, as a fraction of the object's extent.  0.4 gave Dice 0.698 from the largest slice
    #: on 30 train/ tasks against 0.680 at 0.6, but walks from a small drawn slice towards a growing object then fall
    #: behind (demo volume, three drawn slices: 0.755 against 0.841), so 0.6 stays (BENCHMARKS.md)
    margin: float = 0.6
    #: threshold of a slice segmented from a click, box or doodle on it (interactive mode); None = ``threshold``.
    #: The propagation's threshold counters masks that grow step after step, which one interactive prediction does
    #: not need: with ``onepromptseg-v6`` a box gave first-slice Dice 0.724 at 0.8 and 0.777 at 0.7 on train/
    #: (BENCHMARKS.md); each checkpoint's manifest entry sets its own
    interactive_threshold: Optional[float] = None
    #: a click is segmented in this many crops around it, each ``click_scale_step`` times narrower than the one
    #: before (the first as wide as the slice), and the crop whose mask stands out most from its surroundings is
    #: kept (``session._pick_extent``): the model segments a structure about the size its crop suggests, and a
    #: point does not say how big the structure is.  1 = the slice-wide crop only.  Measured on 30 train/ tasks
    #: (issue 19): one click's slice Dice 0.581 (1 crop) -> 0.646 (3 crops, step 2.6), eval 0.571 -> 0.625
    click_scales: int = 3
    click_scale_step: float = 2.6
    #: correction clicks (``refine_slice``): the band around the current outline that the random walker decides
    #: again, as a fraction of the mask's extent, and the walker's edge weight (scikit-image's ``beta``).  With
    #: simulated clicks after the drawn largest slice (``bench --clicks 5``), volume Dice after 1/3/5 clicks
    #: 0.735/0.741/0.745 on 30 train/ tasks (2 drawn slices: 0.732), 0.758/0.775/0.791 on eval (0.780; issue 19)
    refine_band: float = 0.1
    refine_beta: float = 130.0
    #: a negative click at least this deep into a connected part of the mask (as a fraction of the part's greatest
    #: depth) removes the whole part
    refine_whole: float = 0.5
    min_area_px: int = 3  #: a prediction smaller than this (pixels) counts as empty
    ssim_sigma: float = 1.0  #: blur (pixels at the model's input size) before SSIM
    #: run the independent walks (both directions, every gap between anchors) in lockstep, one batched model call
    #: per step (same result as one walk after the other).  On a GPU that is most of the speed; on the 2-core CPU
    #: it saves 8-20% since the model's attention skips masking when no template is padding (BENCHMARKS.md)
    batch_walks: bool = True
    #: between two drawn slices at most ``interp_gap`` slices apart, the model's probability is averaged (weight
    #: ``interp_weight``) with the shape interpolated between them (signed distances, as Fill between slices does):
    #: where the drawn slices are dense the interpolation is the better guess, where they are sparse the model.
    #: Calibrated on a train/ subset (docs/BENCHMARKS.md): gaps up to 24 with weight 0.5 took the drawn slices
    #: needed from 13.2 to 11.6; weights 0.5-0.7 and larger gaps were within 0.1 of it.
    interp_gap: int = 24
    interp_weight: float = 0.5
    #: the interpolation's weight grows as drawn slices get closer: ``interp_weight`` for gaps of ``interp_ramp``
    #: slices and more, rising linearly to 1 (interpolation alone) for a single missing slice; 2 or less = no ramp.
    #: Calibrated on two train/ subsets (BENCHMARKS.md): drawn slices to 0.90 from 11.45 / 8.95 (no ramp) to
    #: 11.0 / 8.37 (18); 6, 12 and 24 were in between
    interp_ramp: int = 18
    #: the interpolated shape follows the anatomy: each drawn slice's outline is carried along the optical flow
    #: between neighbouring slices before the two are blended (``_flow_interpolation``); False: in place, as Fill
    #: between slices does.  On 30 train/ tasks drawn slices to 0.90 8.87 -> 8.30 (BENCHMARKS.md)
    interp_flow: bool = True
    #: a walk that reaches a slice drawn empty without stopping ran past the structure's end: it is cut at its least
    #: confident slice (predicted quality) among the last ``1 - cut_from`` of its slices, if that slice is at least
    #: ``cut_drop`` below the walk's median quality (otherwise the structure ends just before the empty slice, as
    #: when the user erases the first slice past the end).  Calibrated (BENCHMARKS.md): drawn slices to 0.90 on eval
    #: 8.12 -> 7.88, on two train/ subsets 11.0 / 8.74 -> 10.82 / 8.74; smaller drops gained more on train/ but cut
    #: real slices when the first slice past each end of a generated volume was erased (bench --ends)
    cut_tail: bool = True
    cut_from: float = 0.25
    cut_drop: float = 0.2
    #: test-time adaptation (``adapt``, ``OnePromptSegLib.adapt``): before a propagation a copy of the model takes
    #: ``adapt_steps`` Adam steps (lr ``adapt_lr``, ``adapt_batch`` pairs each) on pairs made of the slices drawn in
    #: this volume.  Off (0) by default: on two train/ subsets 20 steps at 1e-4 raised the Dice from one drawn slice
    #: by 0.018, but on eval it lost 0.005 and did not lower the drawn slices needed, at ~10 s per propagation on
    #: one CPU core (docs/BENCHMARKS.md).  A checkpoint's manifest entry can turn it on.
    adapt_steps: int = 0
    adapt_lr: float = 1e-4
    adapt_batch: int = 8
    adapt_min_drawn: int = 1  #: adapt only when at least this many slices are drawn (2: only from real pairs)
    #: each step's probabilities are averaged (this weight) with the previous step's carried to the slice by the
    #: optical flow between the two images (``OnePromptSegLib.flow``; ``_with_flow``): the model keeps the prompt's
    #: size and place where the anatomy shrinks or moves (left atrium, spinal cord), the flow follows it.
    #: Calibrated on 30 train/ tasks (BENCHMARKS.md): Dice from one slice 0.697 (0) -> 0.705 / 0.708 / 0.713 (0.3 /
    #: 0.5 / 0.7; 0.7 lost more on generated volumes); on eval 0.747 -> 0.768.  About 5 ms of CPU a step (0: off)
    flow_weight: float = 0.5
    #: where a structure ends without a drawn empty slice (``OnePromptSegLib.ssim``): past the outermost drawn slices
    #: a slice whose ``end_score`` (logistic regression over quality, log area against the drawn slice's, and the
    #: share of its pixels in the drawn region's intensity range; ``end_weights`` = bias, then one per feature) is
    #: above ``end_threshold`` is doubtful; ``stop_after_empty`` doubtful or empty slices in a row end the walk and
    #: the doubtful ones among them are erased.  Off here (a score never exceeds 1): the weights read the model's own
    #: quality head, so each checkpoint's manifest entry sets both (``python -m OnePromptSegLib.tooling.ends``).
    #: onepromptseg-v6, 0.9 (BENCHMARKS.md, issue 17): on 30 train/ tasks drawn slices to 0.90 8.30 -> 8.03, leaked
    #: voxels 5.9% -> 4.4%, Dice from one slice 0.708 -> 0.715; on eval 6.82 -> 6.82, 2.1% -> 1.9%, 0.768 -> 0.769;
    #: 0.8 gained as much on train/ (8.00) but less Dice (0.713)
    end_weights: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    end_threshold: float = 1.0


    @classmethod
    def for_model(cls, model, **overrides) -> "EngineSettings":
        """The defaults with the checkpoint's own calibrated values (its manifest entry's ``engine`` block, e.g.
        the mask threshold, which moves from one checkpoint to the next), then ``overrides``."""
        own = dict(getattr(model, "entry", None) or {}).get("engine", {})
        unknown = set(own) - set(cls.__dataclass_fields__)
        if unknown:
            raise PromptError(f"the checkpoint's manifest entry sets unknown engine settings {sorted(unknown)}")
        return cls(**{**own, **overrides})


    def check(self) -> "EngineSettings":
        """Raise PromptError naming the first setting outside its valid range (``RANGES``); returns ``self``.

        Called before any work starts: a threshold of 7 would otherwise be accepted and silently make every slice
        empty, and a negative distance would be found out only half-way through a propagation.
        """
        for name, (lo, hi) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                valid = f"at least {lo}" if hi == float("inf") else f"from {lo} to {hi}"
                raise PromptError(f"{name} = {value} is out of range: it takes values {valid}")
        return self

    @classmethod
    def parse(cls, items: Sequence[str], option: str = "--set") -> Dict[str, object]:
        """['threshold=0.8', 'reprompt=no'] -> {'threshold': 0.8, 'reprompt': False}, checked against the fields and
        typed like their declarations (command-line sweeps and per-checkpoint calibration); an optional setting
        takes ``none``."""
        out: Dict[str, object] = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in cls.__dataclass_fields__ or not value:
                raise PromptError(f"{option} {item}: expected NAME=VALUE with NAME one of "
                                  f"{', '.join(cls.__dataclass_fields__)}")
            declared = str(cls.__dataclass_fields__[name].type)  # a string: this module has postponed annotations
            if declared.startswith("Optional[") and value.lower() == "none":
                out[name] = None
            elif "bool" in declared:
                out[name] = value.lower() in ("1", "true", "yes")
            elif declared.startswith("Tuple["):
                try:
                    out[name] = tuple(float(v) for v in value.split(","))
                except ValueError:
                    raise PromptError(f"{option} {item}: {name} takes numbers separated by commas") from None
            else:
                kind = {"int": int, "float": float}[declared.replace("Optional[", "").rstrip("]")]
                try:
                    out[name] = kind(value)
                except ValueError:
                    raise PromptError(f"{option} {item}: {name} takes a number") from None
        return out


#: the settings that turn off every use of the optical flow (``--no-flow``, the module's "Follow the anatomy"
#: checkbox): about a quarter faster a slice step, less accurate
NO_FLOW: Dict[str, object] = {"flow_weight": 0.0, "interp_flow": False}


_INF = float("inf")
#: the valid range of every numeric setting (inclusive), checked by ``EngineSettings.check``
RANGES: Dict[str, Tuple[float, float]] = {
    "ssim_threshold": (-1.0, 1.0), "max_prompt_distance": (1, _INF), "max_templates": (1, _INF),
    "stop_after_empty": (1, _INF), "min_quality": (0.0, 1.0), "threshold": (0.0, 1.0), "margin": (0.0, 10.0),
    "interactive_threshold": (0.0, 1.0), "min_area_px": (0, _INF), "ssim_sigma": (0.0, 20.0), "interp_gap": (0, _INF),
    "interp_weight": (0.0, 1.0), "interp_ramp": (0, _INF), "cut_from": (0.0, 1.0), "cut_drop": (0.0, 1.0),
    "adapt_steps": (0, _INF), "adapt_lr": (0.0, 1.0), "adapt_batch": (1, _INF), "adapt_min_drawn": (0, _INF),
    "flow_weight": (0.0, 1.0),
}
