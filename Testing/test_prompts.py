"""Prompt kinds, their validation (every bad input a clear error), rendering, and the crop round trip."""
from __future__ import annotations

import numpy as np
import pytest

from OnePromptSegLib.sample import dice
from OnePromptSegLib.crops import CropBox, crop_around, extract, paste
from OnePromptSegLib.prompts import (BBox, Click, Doodle, MaskPrompt, PromptError, clicks_by_slice, drawn_axis,
                                     ijk_to_slice, masks_from_label_volume, render_prompt_maps, slice_shape,
                                     validate)

SHAPE = (20, 50, 60)  # (k, j, i)


def test_ijk_to_slice_for_each_axis():
    assert ijk_to_slice((5, 7, 9), "k") == (9, 7.0, 5.0)  # slice k, rows j, cols i
    assert ijk_to_slice((5, 7, 9), "j") == (7, 9.0, 5.0)  # slice j, rows k, cols i
    assert ijk_to_slice((5, 7, 9), "i") == (5, 9.0, 7.0)  # slice i, rows k, cols j
    assert slice_shape(SHAPE, "k") == (50, 60) and slice_shape(SHAPE, "i") == (20, 50)


def test_click_and_box_from_ijk():
    c = Click.from_ijk([(10, 20, 3), (12, 22, 3)], [1, 0], "k")
    assert c.slice_index == 3 and c.points == [(20.0, 10.0), (22.0, 12.0)] and c.labels == [1, 0]
    b = BBox.from_ijk((30, 5, 4), (10, 25, 4), "k")
    assert (b.slice_index, b.r0, b.c0, b.r1, b.c1) == (4, 5, 10, 25, 30)
    with pytest.raises(PromptError, match="different slices"):
        Click.from_ijk([(1, 1, 1), (1, 1, 2)], [1, 1], "k")
    with pytest.raises(PromptError, match="different slices"):
        BBox.from_ijk((1, 1, 1), (5, 5, 2), "k")
    with pytest.raises(PromptError, match="axis"):
        Click.from_ijk([(1, 1, 1)], [1], "x")


@pytest.mark.parametrize("prompt, message", [
    (Click(3, [(60.0, 10.0)], [1]), "outside the slice"),
    (Click(3, [(10.0, 10.0)], [0]), "at least one positive"),
    (Click(3, [], []), "at least one point"),
    (Click(25, [(10.0, 10.0)], [1]), "outside the volume"),
    (BBox(3, 10, 10, 10, 30), "zero area"),
    (BBox(3, 10, 10, 70, 30), "outside the slice"),
    (Doodle(3, np.zeros((50, 60), bool)), "doodle is empty"),
    (Doodle(3, np.ones((60, 50), bool)), "shape"),
    (MaskPrompt(3, np.zeros((20, 50, 60), bool)), "one 2D slice"),
    (MaskPrompt(3, np.zeros((50, 50), bool)), "shape"),
    (MaskPrompt(-1, np.zeros((50, 60), bool)), "outside the volume"),
])
def test_bad_prompts_raise_clear_errors(prompt, message):
    with pytest.raises(PromptError, match=message):
        validate(prompt, SHAPE, "k")


def test_masks_from_label_volume():
    lab = np.zeros(SHAPE, np.uint8)
    lab[4, 10:20, 10:20] = 2
    lab[9, 12:18, 12:18] = 2
    lab[9, 30:35, 30:35] = 1
    ps = masks_from_label_volume(lab, "k", 2, SHAPE)
    assert [p.slice_index for p in ps] == [4, 9] and ps[1].mask.sum() == 36
    assert [p.slice_index for p in masks_from_label_volume(lab, "k")] == [4, 9]
    assert [p.slice_index for p in masks_from_label_volume(lab, "i")] == list(range(10, 20)) + list(range(30, 35))
    with pytest.raises(PromptError, match="no voxels of label 3.*labels present: \\[1, 2\\]"):
        masks_from_label_volume(lab, "k", 3)
    with pytest.raises(PromptError, match="image's own grid"):
        masks_from_label_volume(lab, "k", 2, (20, 50, 61))


def test_rendering_puts_each_kind_in_its_channel():
    box = CropBox(0, 0, 50, 60)
    click = render_prompt_maps(Click(0, [(25.0, 30.0), (5.0, 5.0)], [1, 0]), box, 32)
    assert click[0].max() > 0.9 and click[1].max() > 0.9 and click[2:].max() == 0
    r, c = np.unravel_index(click[0].argmax(), click[0].shape)
    assert abs(r - 25 * 32 / 50 + 0.2) <= 1 and abs(c - 30 * 32 / 60 + 0.2) <= 1
    bb = render_prompt_maps(BBox(0, 10, 15, 30, 45), box, 32)
    assert bb[2].sum() > 0 and bb[[0, 1, 3]].max() == 0
    area = bb[2].sum() / 32 ** 2
    assert abs(area - (21 * 31) / (50 * 60)) < 0.05
    fg = np.zeros((50, 60), bool); fg[25, 10:50] = True  # a 1-pixel stroke survives down-sampling
    d = render_prompt_maps(Doodle(0, fg, None), box, 16)
    assert d[0].sum() >= 10 and d[1:].max() == 0
    m = np.zeros((50, 60), bool); m[10:40, 10:40] = True
    mm = render_prompt_maps(MaskPrompt(0, m), box, 32)
    assert mm[3].max() == pytest.approx(1.0) and mm[:3].max() == 0


def test_crop_round_trip_and_padding_outside_the_slice():
    m = np.zeros((120, 90), bool)
    yy, xx = np.mgrid[0:120, 0:90]
    m[(yy - 100) ** 2 + (xx - 80) ** 2 < 15 ** 2] = True  # touches the slice border: the crop reaches outside
    box = crop_around(m, m.shape, (1.0, 1.0), margin=0.6)
    assert box.r0 + box.h > 120 and box.c0 + box.w > 90
    crop = extract(m.astype(np.float32), box, 64)
    assert crop.shape == (64, 64)
    vals, (rs, cs) = paste(crop, box, m.shape)
    back = np.zeros(m.shape, bool)
    back[rs, cs] = vals > 0.5
    assert dice(back, m) > 0.95


def test_crop_is_square_in_millimetres():
    m = np.zeros((40, 200), bool)
    m[15:25, 80:120] = True  # 10 rows x 40 cols at 4 mm x 1 mm pixels: 40 mm x 40 mm
    box = crop_around(m, m.shape, (4.0, 1.0), margin=0.5)
    assert box.h * 4.0 == pytest.approx(box.w * 1.0)
    crop = extract(m.astype(np.float32), box, 64)
    rows = np.flatnonzero(crop.max(1) > 0.5)
    cols = np.flatnonzero(crop.max(0) > 0.5)
    assert abs(len(rows) - len(cols)) <= 2  # a square object stays square for the model


def test_clicks_grouped_by_slice():
    pts = [(10, 20, 3), (12, 22, 3.2), (5, 5, 7), (1, 1, 9)]
    clicks = clicks_by_slice(pts, [1, 0, 1, 0], "k")
    assert [c.slice_index for c in clicks] == [3, 7]  # the lone negative on slice 9 cannot prompt anything
    assert clicks[0].labels == [1, 0] and clicks[0].points[1] == (22.0, 12.0)
    with pytest.raises(PromptError, match="differ"):
        clicks_by_slice(pts, [1], "k")


def test_drawn_axis():
    d = np.zeros((10, 20, 30), np.uint8)
    d[4, 5:15, 3:20] = 1
    assert drawn_axis(d) == 2  # drawn on one k slice
    d2 = np.zeros_like(d)
    d2[2:8, 5:15, 11] = 1
    assert drawn_axis(d2) == 0  # drawn on one i slice (sagittal)
    assert drawn_axis(np.zeros_like(d)) is None
    cube = np.zeros_like(d)
    cube[2:5, 2:5, 2:5] = 1
    assert drawn_axis(cube) is None  # ambiguous
