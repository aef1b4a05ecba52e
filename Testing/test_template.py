"""Template mode across patients (``OnePromptSegLib.template``) and the checks ``propagate`` makes before any work.

The "other patient" is a generated volume seen through another geometry (origin, direction, spacing, size) and
shifted: registration must carry the template's structure across all of it.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from OnePromptSegLib import cli
from OnePromptSegLib.io import Volume
from OnePromptSegLib.prompts import PromptError
from OnePromptSegLib.sample import dice, make_demo_volume
from OnePromptSegLib.template import (SLICEWISE, Cancelled, refine_slicewise, register_template,
                                      template_session, warp_mask)


@pytest.fixture(scope="module")
def pair():
    """(template, its truth, target, target truth): one generated volume, the target resampled from it on a grid
    with another origin, spacing, size and a 90-degree in-plane rotation, and its content shifted by 6 mm."""
    img, truth, spacing = make_demo_volume(shape=(24, 96, 96), seed=5)
    template = Volume(img.astype(np.float32), spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ref = sitk.Image([88, 100, 20], sitk.sitkFloat32)
    ref.SetSpacing((spacing[0] * 1.1, spacing[1] * 0.95, spacing[2] * 1.2))
    ref.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    ref.SetOrigin((92.0 * spacing[0], 4.0, 2.0))  # i runs along +y, j along -x
    shift = sitk.TranslationTransform(3, (6.0, -4.0, 0.0))
    moved = sitk.Resample(template.to_sitk(), ref, shift, sitk.sitkLinear, 0.0)
    moved_truth = sitk.Resample(template.to_sitk(truth.astype(np.uint8)), ref, shift, sitk.sitkNearestNeighbor, 0)
    target = Volume(sitk.GetArrayFromImage(moved), ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    return template, truth.astype(bool), target, sitk.GetArrayFromImage(moved_truth).astype(bool)


def test_registration_carries_the_structure_across_geometries(pair):
    template, truth, target, target_truth = pair
    prior = warp_mask(truth, template, target, register_template(template, truth, target))
    assert prior.shape == target.array.shape
    assert dice(prior > 0.5, target_truth) >= 0.85  # identity of geometry alone (no registration): below 0.5
    assert dice(warp_mask(truth, template, target, sitk.Transform(3, sitk.sitkIdentity)) > 0.5, target_truth) < 0.5


def test_slicewise_refinement_follows_each_slice():
    """Labels misplaced in-plane (a 3D fit that left each slice off by its own few mm) are brought back slice by
    slice."""
    img, truth, spacing = make_demo_volume(shape=(12, 96, 96), seed=5)
    template = Volume(img.astype(np.float32), spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    moved, moved_truth = img.copy(), truth.astype(bool).copy()
    for k in range(img.shape[0]):  # every slice shifted by its own 3 to 6 pixels
        shift = (3 + k % 4, -(3 + (k * 5) % 4))
        moved[k] = np.roll(img[k], shift, axis=(0, 1))
        moved_truth[k] = np.roll(truth[k].astype(bool), shift, axis=(0, 1))
    target = Volume(moved, spacing, (0.0, 0.0, 0.0), template.direction)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    prior = warp_mask(truth, template, target, identity)
    before = prior.copy()
    refined = refine_slicewise(prior, template, target, identity)
    assert np.array_equal(prior, before)  # the prior itself is left as it was
    assert dice(refined > 0.5, moved_truth) >= dice(prior > 0.5, moved_truth) + 0.1
    assert dice(refined > 0.5, moved_truth) >= 0.8


def test_a_failed_registration_is_a_prompt_error(pair, model):
    """A blank target (a wrong series picked, a failed export): ITK's own error, raised inside the registration,
    reaches the user as one clear PromptError, and template mode builds no session."""
    template, truth, target, _ = pair
    blank = Volume(np.zeros_like(target.array), target.spacing, target.origin, target.direction)
    with pytest.raises(PromptError, match="could not be registered to the target .*Zero-valued spacing"):
        register_template(template, truth, blank)
    with pytest.raises(PromptError, match="could not be registered"):
        template_session(model, blank, template, truth)


def test_template_session_refines_and_can_be_cancelled(pair, model):
    template, truth, target, target_truth = pair
    session, prior = template_session(model, target, template, truth)
    assert session.seed_slice is not None and session.anchors[session.seed_slice].any()
    for _ in session.propagate():
        pass
    assert dice(session.result, target_truth) >= 0.75
    with pytest.raises(Cancelled):
        template_session(model, target, template, truth, progress=lambda stage, step: step < 3)
    # The target is a short stack (20 slices): after the affine, the refinement slice by slice reports its own
    # stage and can be cancelled there too.
    stages = []

    def refusing_slices(stage, step):
        stages.append(stage)
        return stage != SLICEWISE
    with pytest.raises(Cancelled):
        template_session(model, target, template, truth, progress=refusing_slices)
    assert stages[-1] == SLICEWISE and set(stages[:-1]) <= {0, 1, 2}


def _write(volume: Volume, array, path) -> str:
    sitk.WriteImage(volume.to_sitk(array), str(path))
    return str(path)


def test_cli_template_mode(pair, tmp_path, capsys):
    template, truth, target, target_truth = pair
    t = _write(template, template.array, tmp_path / "t.nii.gz")
    tm = _write(template, truth.astype(np.uint8) * 4, tmp_path / "tm.nii.gz")
    img = _write(target, target.array, tmp_path / "img.nrrd")
    out = tmp_path / "out.seg.nrrd"
    code = cli.main(["propagate", img, "-o", str(out), "--template-image", t, "--template-mask", tm,
                     "--template-label", "4", "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    from OnePromptSegLib.io import read_segmentation_mask

    assert dice(read_segmentation_mask(str(out)), target_truth) >= 0.75
    code = cli.main(["propagate", img, "-o", str(tmp_path / "o2.nii.gz"), "--template-image", t, "--template-mask",
                     tm, "--template-label", "2", "--device", "cpu", "-q"])
    assert code == 2 and "no voxels of label 2" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--ssim-threshold", "7"], "ssim_threshold = 7.0 is out of range"),
    (["--set", "threshold=1.5"], "threshold = 1.5 is out of range"),
    (["--max-templates", "0"], "max_templates = 0 is out of range"),
    (["--label", "0"], "--label 0"),
    (["--preview", "p.jpg"], "unknown extension (--preview)"),
    (["--template-image", "IMG"], "go together"),
    (["--template-image", "IMG", "--template-mask", "IMG"], "drop --click"),
    (["--template-mask", "nope.nii.gz"], "nope.nii.gz: no such file"),
    (["--box", "1,2,3"], "expected 5"),
    (["--slices", "3"], "give --prompt-mask too"),
])
def test_every_argument_checked_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    """Bad values exit 2 with one line before the model, the image or anything else is loaded."""
    img = tmp_path / "img.nii.gz"
    img.write_bytes(b"not read before the checks")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("work started before the checks"))
    monkeypatch.setattr(cli, "read_volume", lambda *a, **k: pytest.fail("work started before the checks"))
    monkeypatch.chdir(tmp_path)
    args = [str(a).replace("IMG", str(img)) for a in extra]
    code = cli.main(["propagate", str(img), "-o", str(tmp_path / "o.nii.gz"), "--click", "1,1,1"] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    code = cli.main(["propagate", str(img), "-o", str(tmp_path / "o.xyz"), "--click", "1,1,1"])
    assert code == 2 and "unknown extension" in capsys.readouterr().err
