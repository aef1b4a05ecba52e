"""The propagation engine: bookkeeping with an oracle predictor, then the real model on generated volumes."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import bright_object_volume

from OnePromptSegLib.ssim import DrawnLook, end_features, end_score
from OnePromptSegLib.sample import dice
from OnePromptSegLib.session import PropagationSession, SeedWarning, merge_into
from OnePromptSegLib.settings import NO_FLOW, EngineSettings
from OnePromptSegLib.prompts import BBox, Click, Doodle, MaskPrompt, PromptError


def _session(model, img, settings=None, axis="k", spacing=(1.0, 1.0, 1.0)):
    # No shape interpolation unless a test asks for it: it has its own test, and with the oracle (a perfect model)
    # it can only blur the bookkeeping these tests check.  The oracle's 0/1 crops, resampled onto the slice, have
    # their edge at 0.5: threshold there.
    s = PropagationSession(model, settings or EngineSettings(interp_weight=0.0, threshold=0.5))
    s.set_volume(img, axis, spacing)
    return s


# ---------------------------------------------------------------------------------------------- oracle: bookkeeping

def test_propagates_both_ways_and_stops_at_object_end(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    results = list(s.propagate())
    done = [r.slice_index for r in results]
    assert min(done) < 8 and max(done) > 29  # walked down and up past both ends of the object
    assert dice(s.result, truth) > 0.97
    # The stop rule: after `stop_after_empty` empty slices a direction stops asking the model.
    assert oracle.calls <= (30 - 8) + 2 * EngineSettings().stop_after_empty
    assert not s.result[:7].any() and not s.result[31:].any()
    assert results[-1].done == results[-1].total == len(results)


def test_one_direction_only(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    list(s.propagate("forward"))
    assert not s.result[:20].any() and s.result[21:30].any()


def test_slice_range_limits_what_is_written(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    list(s.propagate(slice_range=(15, 25)))
    assert s.result[15:26].any(axis=(1, 2)).all()
    assert not s.result[:15].any() and not s.result[26:].any()


def test_anchors_are_never_overwritten(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    odd = np.zeros_like(truth[22], bool)
    odd[5:9, 5:9] = True  # a "drawn" slice that disagrees with the image: it must survive
    s.add_prompt(MaskPrompt(15, truth[15].astype(bool)))
    s.add_prompt(MaskPrompt(22, odd))
    for _ in s.propagate():
        pass
    assert np.array_equal(s.result[22].astype(bool), odd)
    assert np.array_equal(s.result[15], truth[15])


def test_cancel_keeps_earlier_slices_and_resumes(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    seen = []
    for r in s.propagate():
        seen.append(r.slice_index)
        if len(seen) == 16:
            break  # the user pressed Cancel: slices 19..8 (down) are done, the walk up has not started
    for k in seen:
        assert dice(s.result[k], truth[k]) > 0.9
    untouched = [k for k in range(40) if k not in seen and k != 20]
    assert not s.result[untouched].any()
    rest = [r.slice_index for r in s.propagate()]
    assert not set(rest) & set(seen)  # what was done is not redone
    assert dice(s.result, truth) > 0.97
    # Cancel in the middle of a walk, then resume: the resumed walk is prompted by what was kept.
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(8, truth[8].astype(bool)))
    for i, r in enumerate(s.propagate("forward")):
        if r.slice_index == 22:  # more than max_prompt_distance from the anchor
            break
    rest = [r.slice_index for r in s.propagate("forward")]
    assert rest[0] == 23 and dice(s.result, truth) > 0.97


def test_two_anchors_meet_in_the_middle(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img, EngineSettings(interp_weight=0.0, threshold=0.5))
    s.add_prompt(MaskPrompt(10, truth[10].astype(bool)))
    s.add_prompt(MaskPrompt(26, truth[26].astype(bool)))
    order = [r.slice_index for r in s.propagate() if 10 < r.slice_index < 26]
    assert order[:4] == [11, 25, 12, 24]  # alternating from both ends
    assert dice(s.result[10:27], truth[10:27]) > 0.97


def test_correct_reruns_only_the_affected_range(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(12, truth[12].astype(bool)))
    s.add_prompt(MaskPrompt(24, truth[24].astype(bool)))
    list(s.propagate())
    fixed = truth[18].astype(bool)
    s.correct(18, fixed)
    redone = sorted(r.slice_index for r in s.propagate())
    assert redone == [k for k in range(13, 24) if k != 18]
    assert np.array_equal(s.result[18].astype(bool), fixed)
    assert list(s.propagate()) == []  # nothing left to do


def test_ssim_reprompt_fires_on_an_abrupt_change(oracle):
    img, truth = bright_object_volume()
    rng = np.random.default_rng(0)
    img[21] = rng.uniform(0, 1, img[21].shape).astype(np.float32)  # a corrupt slice (artefact, motion)
    s = _session(oracle, img, EngineSettings(ssim_threshold=0.5))
    s.add_prompt(MaskPrompt(14, truth[14].astype(bool)))
    res = {r.slice_index: r for r in s.propagate("forward")}
    assert res[22].reprompted and res[22].source < 21  # prompted from a buffered slice, not the corrupt one
    assert not any(r.reprompted for k, r in res.items() if k < 21)
    s = _session(oracle, img, EngineSettings(ssim_threshold=0.5, reprompt=False))
    s.add_prompt(MaskPrompt(14, truth[14].astype(bool)))
    res = {r.slice_index: r for r in s.propagate("forward")}
    assert not any(r.reprompted for r in res.values()) and res[22].source == 21


def test_other_axes_and_anisotropic_spacing(oracle):
    img, truth = bright_object_volume()
    img_j = np.ascontiguousarray(np.swapaxes(img, 0, 1))  # object now runs along j
    truth_j = np.swapaxes(truth, 0, 1)
    s = _session(oracle, img_j, axis="j", spacing=(0.7, 1.0, 3.0))
    s.add_prompt(MaskPrompt(20, truth_j[:, 20].astype(bool)))
    list(s.propagate())
    # Crops are square in mm, so the 0.7 mm axis is resampled 4x coarser than the 3 mm one: a little is lost.
    assert dice(s.result, truth_j) > 0.92


def test_errors_are_clear(oracle):
    img, truth = bright_object_volume()
    s = PropagationSession(oracle)
    with pytest.raises(PromptError, match="set_volume"):
        s.add_prompt(MaskPrompt(3, truth[3]))
    s.set_volume(img, "k")
    with pytest.raises(PromptError, match="no prompt"):
        list(s.propagate())
    with pytest.raises(PromptError, match="direction"):
        list(s.propagate("sideways"))
    with pytest.raises(PromptError, match="outside the volume"):
        s.add_prompt(MaskPrompt(40, truth[3]))
    with pytest.raises(PromptError, match="3D"):
        s.set_volume(img[0], "k")


def test_merge_into_protects_drawn_slices():
    current = np.zeros((4, 3, 3), np.uint8)
    current[1] = 1
    current[3] = 1
    result = np.ones((4, 3, 3), np.uint8)
    result[1] = 0
    merged = merge_into(current, result, "k", {0, 1, 2}, {1, 2})
    assert merged[0].all() and merged[1].all() and not merged[2].any() and merged[3].all()
    assert current[0].sum() == 0  # the input is not modified


# ---------------------------------------------------------------------------------------------- the real model

def test_real_model_propagates_one_mask_prompt(model, demo):
    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings.for_model(model), spacing=spacing)
    s.add_prompt(MaskPrompt(k0, truth[k0].astype(bool)))
    res = list(s.propagate())
    # Measured 0.90 with onepromptseg-v2 (0.84 with v1) on the CPU; 0.916 with v6, 0.893 with v6 and the flow
    # (which lets a small blob go on past the object's ends of this generated volume), 0.927 with v6's end score
    assert dice(s.result, truth) >= 0.9
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    # Past the object's ends the model alone does not always stop (a small blob goes on: see MODEL_CARD.md's
    # failure cases); v6's end-of-structure score (manifest: end_weights, end_threshold) stops it.  Share of the
    # object's voxels predicted past its ends: 0.013 with onepromptseg-v2 (0.22 with v1), 0.064 with v6 and the
    # flow, 0 with the end score.
    outside = s.result[: zs.min()].sum() + s.result[zs.max() + 1:].sum()
    assert outside < 0.02 * truth.sum()
    assert all(0.0 <= r.quality <= 1.0 for r in res)


@pytest.mark.parametrize("kind", ["click", "box", "doodle"])
def test_real_model_interactive_prompts(model, demo, kind):
    from OnePromptSegLib.tooling.bench import simulated_prompt

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings(), spacing=spacing)
    first = s.add_prompt(simulated_prompt(kind, truth[k0].astype(bool), k0))
    assert dice(first, truth[k0]) >= 0.75
    list(s.propagate())
    assert dice(s.result, truth) >= 0.7


def test_prompt_that_finds_nothing_is_a_clear_error(model, demo):
    img, truth, spacing = demo
    s = _session(model, np.zeros_like(img), EngineSettings(), spacing=spacing)
    with pytest.raises(PromptError, match="found no structure"):
        s.add_prompt(BBox(10, 2.0, 2.0, 6.0, 6.0))


def test_one_prompt_transfer_from_another_volume(model):
    from OnePromptSegLib.sample import make_demo_volume

    ref_img, ref_truth, sp = make_demo_volume(shape=(40, 112, 112), seed=3)
    img, truth, _ = make_demo_volume(shape=(40, 112, 112), seed=11)
    k = int(ref_truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings(), spacing=sp)
    s.add_reference(ref_img, MaskPrompt(k, ref_truth[k].astype(bool)), "k", sp)
    with pytest.warns(SeedWarning, match="seeded from slice"):
        list(s.propagate())
    assert s.seed_slice is not None and truth[s.seed_slice].any()
    assert dice(s.result, truth) >= 0.6


def test_empty_anchor_stops_propagation_on_its_side(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img)
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    s.add_prompt(MaskPrompt(26, np.zeros_like(truth[26], bool)))  # the user says: not here any more
    list(s.propagate())
    assert not s.result[26:].any()  # nothing beyond the empty anchor, although the image shows the object
    # The anchor with the object walks the whole gap: where the object ends in it is for the stop rule to find (the
    # oracle is equally sure of every slice, so no slice stands out for ``cut_tail`` to cut at).
    assert s.result[21:26].any(axis=(1, 2)).all()


class _LeakyModel:
    """Thresholds the query like the oracle; its quality is the crop's brightest value, so a faint look-alike past
    the object's end is found with less confidence than the object."""

    size = 64

    def predict(self, query, templates, prompts, kinds, keys=None):
        prob = (query > 0.6).astype(np.float32)
        return prob, float(query.max())


def test_walk_that_runs_into_an_empty_drawn_slice_is_cut_at_its_least_confident_slice():
    img, truth = bright_object_volume()  # object on slices 8..29
    tail = truth[29].astype(bool)
    for k in range(30, 40):  # a fainter look-alike goes on past the object's end; faintest where it starts
        img[k][tail] = 0.8 if k == 30 else 0.85
    ends = {}
    for cut in (False, True):
        s = _session(_LeakyModel(), img, EngineSettings(interp_weight=0.0, threshold=0.5, cut_tail=cut))
        s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
        s.add_prompt(MaskPrompt(38, np.zeros_like(tail)))  # the user: not here
        results = list(s.propagate())
        ends[cut] = int(np.flatnonzero(s.result.any(axis=(1, 2))).max())
        assert results[-1].done == results[-1].total
        assert [r.slice_index for r in results if not r.mask.any() and r.slice_index in range(30, 38)] == (
            list(range(30, 38)) if cut else [])  # the cut slices are reported again, now empty
    assert ends == {False: 37, True: 29}


def _volume_with_faint_tail():
    """bright_object_volume (object on slices 8..29) with a fainter look-alike going on over slices 30..39."""
    img, truth = bright_object_volume()
    for k in range(30, 40):
        img[k][truth[29].astype(bool)] = 0.8
    return img, truth


#: end_score weights that call a slice past the end when its pixels lie outside the drawn region's intensities
_BY_INTENSITY = (2.0, 0.0, 0.0, -4.0)


def test_end_features_and_score():
    image = np.zeros((10, 10), np.float32)
    drawn = np.zeros((10, 10), bool)
    drawn[2:8, 2:8] = True
    image[drawn] = 1.0
    look = DrawnLook.of(image, drawn)
    assert (look.area, look.low, look.high) == (36, 1.0, 1.0)
    half = np.zeros_like(drawn)
    half[2:8, 2:5] = True  # 18 pixels, all within the drawn intensities
    assert np.allclose(end_features(look, image, half, 0.7), [0.7, np.log(0.5), 1.0])
    assert end_score(np.array([0.7, np.log(0.5), 1.0]), _BY_INTENSITY) == pytest.approx(1 / (1 + np.exp(2.0)))
    off = np.zeros_like(drawn)
    off[0, :4] = True  # on the background
    assert end_features(look, image, off, 0.7)[2] == 0.0


def test_a_walk_stops_where_slices_look_past_the_structures_end():
    img, truth = _volume_with_faint_tail()
    img[15][truth[15].astype(bool)] = 0.8  # one odd slice inside the structure: doubtful alone, so it is kept
    ends = {}
    for threshold in (1.0, 0.5):  # 1.0: never doubtful (the rule off)
        s = _session(_LeakyModel(), img, EngineSettings(interp_weight=0.0, threshold=0.5, end_weights=_BY_INTENSITY,
                                                        end_threshold=threshold))
        s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
        results = list(s.propagate())
        found = np.flatnonzero(s.result.any(axis=(1, 2)))
        ends[threshold] = int(found.max())
        assert s.result[15].any() and int(found.min()) == 8
    assert ends == {1.0: 39, 0.5: 29}  # the two doubtful slices that stopped the walk (30, 31) were erased
    for k in (30, 31):  # reported found, then again, empty
        assert [r.mask.any() for r in results if r.slice_index == k] == [True, False]


def test_batched_walks_give_the_same_result(model, demo):
    """Both directions and every gap in one batched model call per step (the default) == one walk at a time."""
    img, truth, spacing = demo
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    anchors = (int(zs.min()) + 3, int(truth.sum(axis=(1, 2)).argmax()), int(zs.max()) - 3)
    out = {}
    for batch in (False, True):
        s = _session(model, img, EngineSettings(batch_walks=batch), spacing=spacing)
        for k in anchors:
            s.add_prompt(MaskPrompt(k, truth[k].astype(bool)))
        res = list(s.propagate())
        assert [r.done for r in res] == list(range(1, len(res) + 1)) and res[-1].total == len(res)
        out[batch] = (s.result.copy(), sorted(r.slice_index for r in res))
    assert out[True][1] == out[False][1]
    assert dice(out[True][0], out[False][0]) >= 0.999  # float summation order may differ by a pixel


def test_predict_many_equals_predict(model, demo):
    from OnePromptSegLib.scheduler import WalkRequest
    from OnePromptSegLib.prompts import render_prompt_maps
    from OnePromptSegLib.crops import crop_around, extract

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    box = crop_around(truth[k0].astype(bool), truth.shape[1:], spacing[:2], 0.6)
    S = model.size
    crop = lambda k: extract(img[k].astype(np.float32) / img.max(), box, S)  # noqa: E731
    pm = lambda k: render_prompt_maps(MaskPrompt(k, truth[k].astype(bool)), box, S)  # noqa: E731
    reqs = [WalkRequest(crop(k0 + 1), [crop(k0)], [pm(k0)], [3], [("t", k0 + 1), ("t", k0)]),
            WalkRequest(crop(k0 - 2), [crop(k0), crop(k0 - 4), crop(k0 + 2)], [pm(k0), pm(k0 - 4), pm(k0 + 2)],
                     [3, 3, 3], [("t", k0 - 2), ("t", k0), ("t", k0 - 4), ("t", k0 + 2)])]
    many = model.predict_many(reqs)
    for r, (p, q) in zip(reqs, many):
        p1, q1 = model.predict(r.query, r.templates, r.prompts, r.kinds)  # no cache: a fresh forward pass
        assert np.abs(p - p1).max() < 1e-4 and abs(q - q1) < 1e-4


def test_several_labels_propagate_together(model, demo):
    from OnePromptSegLib.session import propagate_together

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    other = np.zeros_like(truth)
    other[k0 - 4:k0 + 5, 10:26, 10:26] = 1  # a second "label": a block in the corner
    alone = []
    for t in (truth, other):
        s = _session(model, img, EngineSettings(), spacing=spacing)
        s.add_prompt(MaskPrompt(k0, t[k0].astype(bool)))
        list(s.propagate())
        alone.append(s.result.copy())
    sessions = []
    for t in (truth, other):
        s = _session(model, img, EngineSettings(), spacing=spacing)
        s.add_prompt(MaskPrompt(k0, t[k0].astype(bool)))
        sessions.append(s)
    res = list(propagate_together(sessions, batch=True))
    assert {i for i, _ in res} == {0, 1} and res[-1][1].done == res[-1][1].total == len(res)
    for s, a in zip(sessions, alone):
        assert dice(s.result, a) >= 0.999


class _UnsureModel:
    """Probability 0.5 everywhere: the model has no opinion, so a blended gap shows the interpolated shape alone."""

    size = 64

    def predict(self, query, templates, prompts, kinds, keys=None):
        return np.full((self.size, self.size), 0.5, np.float32), 1.0


def _disc_gap(model, settings: EngineSettings, a: int = 10, b: int = 18) -> np.ndarray:
    """Areas of slices a+1..b-1 between a drawn disc of radius 6 on slice a and one of radius 14 on slice b."""
    yy, xx = np.mgrid[0:80, 0:80]
    disc = lambda r: (yy - 40) ** 2 + (xx - 40) ** 2 <= r * r  # noqa: E731
    img = np.zeros((30, 80, 80), np.float32)
    img[0, 0, 0] = 1.0
    s = _session(model, img, settings)
    s.add_prompt(MaskPrompt(a, disc(6)))
    s.add_prompt(MaskPrompt(b, disc(14)))
    list(s.propagate(slice_range=(a + 1, b - 1)))
    return s.result[a + 1:b].sum(axis=(1, 2))


def test_short_gaps_blend_in_the_interpolated_shape():
    # The flow is off: the stand-in model and the interpolation alone decide (the flow is tested in test_flow.py)
    areas = {}
    for gap in (8, 4):  # drawn slices 10 and 18, interpolation allowed for gaps up to ``gap``
        areas[gap] = _disc_gap(_UnsureModel(), EngineSettings(interp_gap=gap, interp_ramp=1, threshold=0.5,
                                                              reprompt=False, **NO_FLOW))
    r_mid = np.sqrt(areas[8][3] / np.pi)  # slice 14, halfway: radius ~ (6 + 14) / 2
    assert abs(r_mid - 10) <= 0.7
    assert np.all(np.diff(areas[8]) > 0)  # grows steadily from the small disc to the large one
    assert not areas[4].any()  # gap 8 > interp_gap 4: no blending, and the unsure model alone finds nothing


class _SureModel:
    """Probability 1 on the whole crop: the model sees the object everywhere it looks."""

    size = 64

    def predict(self, query, templates, prompts, kinds, keys=None):
        return np.ones((self.size, self.size), np.float32), 1.0


def test_interpolation_weight_ramps_up_as_drawn_slices_get_closer():
    # (The flow is off, as above.)  Weight 0.5 lets the over-eager model fill its crop (1 - w) * 0.7 > 0.5 * w;
    # the ramp gives a gap of three slices weight 1 - 0.5 * 1/6 = 0.92, and the interpolated shape wins.
    flat = _disc_gap(_SureModel(), EngineSettings(interp_ramp=1, threshold=0.3, reprompt=False, **NO_FLOW), 10, 13)
    ramp = _disc_gap(_SureModel(), EngineSettings(interp_weight=0.5, interp_ramp=8, threshold=0.3, reprompt=False,
                                                  **NO_FLOW), 10, 13)
    r = np.sqrt(ramp / np.pi)  # radii 6 + 8/3 and 6 + 16/3
    assert np.all(np.abs(r - (6 + 8 / 3 * np.array([1, 2]))) <= 0.7)
    assert np.all(flat > 1.5 * ramp)


# ---------------------------------------------------------------------------------------------- test-time adaptation

def _adapting(model, img, spacing, anchors, steps=3):
    s = _session(model, img, EngineSettings(adapt_steps=steps, adapt_batch=4, adapt_lr=1e-4), spacing=spacing)
    for k, m in anchors.items():
        s.correct(k, m)
    return s


def test_adaptation_trains_a_copy_reports_progress_and_repeats(model, demo):
    import torch

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    before = [p.detach().clone() for p in model.model.parameters()]
    s = _adapting(model, img, spacing, {k0: truth[k0].astype(bool), k0 + 6: truth[k0 + 6].astype(bool)})
    assert list(s.adapt()) == [(1, 3), (2, 3), (3, 3)]
    assert list(s.adapt()) == []  # already adapted to these drawn slices
    adapted = s._walk_model()
    assert adapted is not model and adapted.device == model.device
    changed = sum(not torch.equal(a, b) for a, b in zip(adapted.model.parameters(), model.model.parameters()))
    assert changed > 10  # the copy moved...
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.parameters()))  # ...the shared model did not
    list(s.propagate())
    again = _adapting(model, img, spacing, {k0: truth[k0].astype(bool), k0 + 6: truth[k0 + 6].astype(bool)})
    list(again.propagate())  # adapts by itself, seeded: the same drawn slices give the same result
    assert np.array_equal(again.result, s.result)
    assert dice(s.result, truth) > 0.8
    s.correct(k0 - 5, truth[k0 - 5].astype(bool))
    assert len(list(s.adapt())) == 3  # new drawn slice: adapted again
    s.set_volume(img.max() - img, "k", spacing)  # another volume, the same drawn masks: adapted again
    s.correct(k0 - 5, truth[k0 - 5].astype(bool))
    assert len(list(s.adapt())) == 3


def test_cancelled_adaptation_keeps_nothing_and_off_means_the_shared_model(model, demo):
    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    s = _adapting(model, img, spacing, {k0: truth[k0].astype(bool)})
    gen = s.adapt()
    assert next(gen) == (1, 3)
    gen.close()  # the user cancelled
    assert s._adapted is None and len(list(s.adapt())) == 3
    off = _adapting(model, img, spacing, {k0: truth[k0].astype(bool)}, steps=0)
    assert list(off.adapt()) == [] and off._walk_model() is model


def test_a_one_prompt_seed_is_not_adapted_to_until_drawn_over(model):
    """One-Prompt mode's seed is the model's own guess: adaptation trains on drawn slices only."""
    from OnePromptSegLib.sample import make_demo_volume

    ref_img, ref_truth, sp = make_demo_volume(shape=(40, 112, 112), seed=3)
    img, truth, _ = make_demo_volume(shape=(40, 112, 112), seed=11)
    k = int(ref_truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings(adapt_steps=2, adapt_batch=2), spacing=sp)
    s.add_reference(ref_img, MaskPrompt(k, ref_truth[k].astype(bool)), "k", sp)
    with pytest.warns(SeedWarning):
        list(s.propagate())
    assert s.seed_slice in s.anchors and s._adapted is None and s._walk_model() is model
    s.correct(s.seed_slice, truth[s.seed_slice].astype(bool))  # the user draws over the seed
    assert list(s.adapt()) == [(1, 2), (2, 2)]


def test_adapted_sessions_propagate_together_as_alone(model, demo):
    from OnePromptSegLib.session import propagate_together

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    other = np.zeros_like(truth)
    other[k0 - 4:k0 + 5, 10:26, 10:26] = 1
    alone = []
    for t in (truth, other):
        s = _adapting(model, img, spacing, {k0: t[k0].astype(bool)}, steps=2)
        list(s.propagate())
        alone.append(s.result.copy())
    sessions = [_adapting(model, img, spacing, {k0: t[k0].astype(bool)}, steps=2) for t in (truth, other)]
    res = list(propagate_together(sessions, batch=True))  # two adapted models: one batch each
    assert {i for i, _ in res} == {0, 1} and res[-1][1].done == res[-1][1].total == len(res)
    for s, a in zip(sessions, alone):
        assert np.array_equal(s.result, a)


def test_adaptation_needs_a_trainable_checkpoint(oracle):
    img, truth = bright_object_volume()
    s = _session(oracle, img, EngineSettings(adapt_steps=2, interp_weight=0.0, threshold=0.5))
    s.add_prompt(MaskPrompt(20, truth[20].astype(bool)))
    with pytest.raises(TypeError, match="set adapt_steps=0"):
        list(s.propagate())


def test_interactive_threshold_is_its_own_setting(model, demo):
    """A click/box/doodle slice is thresholded at ``interactive_threshold`` (calibrated per checkpoint); the
    propagation keeps ``threshold``; on the command line an optional setting takes ``none``."""
    from OnePromptSegLib.prompts import BBox

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    rr, cc = np.nonzero(truth[k0])
    box = BBox(k0, float(rr.min()), float(cc.min()), float(rr.max()), float(cc.max()))
    areas = {}
    for t in (0.3, 0.9):
        s = _session(model, img, EngineSettings(threshold=0.8, interactive_threshold=t), spacing=spacing)
        areas[t] = int(s.segment_slice(box).sum())
        assert s.settings.threshold == 0.8
    same = _session(model, img, EngineSettings(threshold=0.9), spacing=spacing).segment_slice(box)
    assert areas[0.3] > areas[0.9] > 0 and int(same.sum()) == areas[0.9]  # None = the propagation's threshold
    assert EngineSettings.parse(["interactive_threshold=0.7"]) == {"interactive_threshold": 0.7}
    assert EngineSettings.parse(["end_weights=1,-2,0.5,0"]) == {"end_weights": (1.0, -2.0, 0.5, 0.0)}
    assert EngineSettings.parse(["interactive_threshold=none", "batch_walks=no"]) == {
        "interactive_threshold": None, "batch_walks": False}
    with pytest.raises(PromptError, match="threshold takes a number"):
        EngineSettings.parse(["threshold=high"])


# ---------------------------------------------------------------------------------------------- issue 19: clicks

def test_click_finds_a_small_structure_in_a_wide_slice(model):
    """A click says where, not how big: a lesion 13 mm across in a 200 mm slice is lost by the slice-wide crop alone
    (``click_scales=1``); the narrower crops, chosen by the mask's contrast with its surroundings, find it."""
    from OnePromptSegLib.sample import blob_mask, smooth_noise
    from OnePromptSegLib.tooling.bench import simulated_prompt

    rng = np.random.default_rng(1)
    shape = (5, 256, 256)
    img = (40 + 12 * smooth_noise(rng, shape, (2, 8, 8))).astype(np.float32)
    img[~blob_mask(shape, (2, 128, 128), (50, 110, 115), wobble=0.05)] = -900  # a body in air
    lesion = blob_mask(shape, (2, 110, 140), (10, 8, 7.2), wobble=0.15)
    img[lesion] = 120
    img += rng.normal(0, 8, shape).astype(np.float32)
    click = simulated_prompt("click", lesion[2], 2)
    found = {n: dice(_session(model, img, EngineSettings(click_scales=n), spacing=(0.8, 0.8, 3.0)).segment_slice(
        click), lesion[2]) for n in (1, 3)}
    assert found[3] >= 0.8 and found[1] < 0.3, found  # measured 0.87 and 0.10


def _corrected(model, demo, clicks):
    """The demo volume propagated from its largest slice, then ``clicks`` simulated correction clicks."""
    from OnePromptSegLib.tooling.bench import correction_click

    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings.for_model(model), spacing=spacing)
    s.add_prompt(MaskPrompt(k0, truth[k0].astype(bool)))
    list(s.propagate())
    scores = [dice(s.result, truth)]
    for _ in range(clicks):
        c = correction_click(s.result.astype(bool), truth.astype(bool), spacing[::-1])
        before = {k for k in range(truth.shape[0]) if k in s._valid}
        s.refine_slice(c.slice_index, c)
        assert c.slice_index in s.anchors
        redone = {r.slice_index for r in s.propagate()}
        lower = max([a for a in s.anchors if a < c.slice_index], default=-1)
        upper = min([a for a in s.anchors if a > c.slice_index], default=truth.shape[0])
        assert redone <= set(range(lower + 1, upper)) and redone <= before  # only the corrected slice's range
        scores.append(dice(s.result, truth))
    return s, scores


def test_correction_clicks_improve_the_volume(model, demo):
    """Simulated clicks at the centre of the largest error region (bench's protocol): each refines its slice,
    locks it and re-propagates only its range; three clicks leave the volume better than it was."""
    _, scores = _corrected(model, demo, 3)
    # measured 0.893 -> 0.913, 0.923, 0.927 before the end-of-structure score; with it 0.927 -> 0.933, 0.939, 0.942
    assert scores[-1] > scores[0] + 0.01 and all(b >= a for a, b in zip(scores, scores[1:])), scores


def test_negative_click_removes_a_wrong_part_and_positive_click_adds_one(model, demo):
    img, truth, spacing = demo
    k0 = int(truth.sum(axis=(1, 2)).argmax())
    s = _session(model, img, EngineSettings.for_model(model), spacing=spacing)
    s.add_prompt(MaskPrompt(k0, truth[k0].astype(bool)))
    earlier = truth.copy()
    earlier[k0 + 3, 5:15, 5:15] = 1  # a wrong part away from the structure
    earlier[k0 - 3] = 0  # a slice the result missed
    s.set_result(earlier)
    assert s.propagate is not None and not list(s.propagate())  # taken up as it is: nothing to recompute
    fixed = s.refine_slice(k0 + 3, Click(k0 + 3, [(10.0, 10.0)], [0]))
    assert not fixed[5:15, 5:15].any() and dice(fixed, truth[k0 + 3]) > 0.95
    rr, cc = np.nonzero(truth[k0 - 3])
    found = s.refine_slice(k0 - 3, Click(k0 - 3, [(float(np.median(rr)), float(np.median(cc)))], [1]))
    assert dice(found, truth[k0 - 3]) > 0.7
    with pytest.raises(PromptError, match="outside the slice"):
        s.refine_slice(k0, Click(k0, [(1e4, 0.0)], [0]))
    with pytest.raises(PromptError, match="end_weights takes numbers separated by commas"):
        EngineSettings.parse(["end_weights=1,x"])
