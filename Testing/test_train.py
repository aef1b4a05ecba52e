"""The training pipeline: task sources, prompt simulation, a resumable run, and the export's manifest entry."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from OnePromptSegLib.tooling import train
from OnePromptSegLib.checkpoints import load_model
from OnePromptSegLib.prompts import KIND_INDEX
from OnePromptSegLib.tooling.synth import random_volume


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two small labelled NIfTI volumes written the way ../shared/data is laid out."""
    d = tmp_path_factory.mktemp("traindata")
    rng = np.random.default_rng(5)
    for n in range(2):
        img, lab = random_volume(rng)
        for arr, suffix in (((img * 1000).astype(np.int16), "img"), (lab.astype(np.uint8), "lbl")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((0.8, 0.8, 2.0))
            sitk.WriteImage(im, str(d / f"case{n}_{suffix}.nii.gz"))
    return str(d)


def test_real_and_superpixel_tasks(data_dir):
    real = train.load_real_volumes(data_dir)
    assert real and all(v.label_sets for v in real)
    assert real[0].image.dtype == np.uint8 and np.allclose(real[0].spacing, (0.8, 0.8))
    rng = np.random.default_rng(0)
    sp = train.superpixel_volume(rng, real[0], depth=24)
    assert sp.image.shape[0] == min(24, real[0].image.shape[0]) and sp.labels.shape == sp.image.shape
    assert len(sp.label_sets) >= 5  # many structures per block
    for ls in sp.label_sets[:5]:
        m = np.isin(sp.labels, ls)
        assert m.sum() >= 60 and (sp.image[m] / 255.0).mean() >= 0.08  # no air supervoxels


@pytest.mark.parametrize("kind", ["mask", "box", "click", "doodle"])
def test_simulated_prompts_lie_on_the_object(kind):
    rng = np.random.default_rng(1)
    m = np.zeros((60, 60), bool)
    m[20:40, 15:45] = True
    p = train.simulate_prompt(rng, m, kind, 7)
    assert p.slice_index == 7 and KIND_INDEX[p.kind] == KIND_INDEX[kind]
    if kind == "click":
        pos = [pt for pt, lab in zip(p.points, p.labels) if lab == 1]
        assert pos and all(m[int(r), int(c)] for r, c in pos)
    if kind == "box":
        assert abs(p.r0 - 20) <= 3 and abs(p.c1 - 44) <= 4


def test_batches_include_empty_targets_past_the_object(data_dir):
    real = train.load_real_volumes(data_dir)
    rng = np.random.default_rng(2)
    q, T, P, Kd, V, y = train.make_batch(rng, real, 64, 96)
    assert q.shape == (64, 1, 96, 96) and T.shape[:2] == Kd.shape == V.shape and y.shape == q.shape
    assert V[:, 0].all()
    empty = int((y.flatten(1).sum(1) == 0).sum())
    assert 3 <= empty <= 40  # the model must learn where an object ends, but mostly it learns to follow it


def test_correction_pass_adds_a_drawn_slice_beyond_the_query(data_dir):
    real = train.load_real_volumes(data_dir)
    rng = np.random.default_rng(3)
    with_c = [train.sample_pair(rng, real[0], 96, max_extra=0, correction=1.0)[1].shape[0] for _ in range(60)]
    without = [train.sample_pair(rng, real[0], 96, max_extra=0)[1].shape[0] for _ in range(60)]
    assert max(without) == 1 and sum(n == 2 for n in with_c) >= 20


def test_training_resumes_and_exports(data_dir, tmp_path):
    out = str(tmp_path / "run")
    common = ["--out", out, "--data", data_dir, "--batch", "2", "--threads", "1", "--synth-pool", "2",
              "--superpixel-frac", "0.5", "--superpixel-pool", "2", "--correction", "0.2", "--save-every", "1000",
              "--cross", "0.3"]
    train.main(common + ["--steps", "3"])
    train.main(common + ["--steps", "5", "--workers", "1"])  # resumes at step 3, batches from a worker process
    events = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    starts = [e for e in events if e.get("event") == "start"]
    assert [e["step"] for e in starts] == [0, 3] and events[-1]["step"] == 5
    man = str(tmp_path / "weights_manifest.json")
    train.main(["--export", out, "--name", "tiny-run", "--manifest", man, "--machine", "test",
                "--engine", "threshold=0.8"])
    entry = json.load(open(man))["models"][0]
    assert entry["training"]["steps"] == 5
    assert entry["training"]["seconds"] > 0  # both segments counted, the first had no end event
    assert entry["training"]["command"].startswith("from step 0: python -m OnePromptSegLib.tooling.train")
    assert "from step 3:" in entry["training"]["command"] and "--superpixel-frac 0.5" in entry["training"]["command"]
    assert "--average" not in entry["training"]["command"]  # an export option, not part of the recipe
    lm = load_model("tiny-run", "cpu", manifest_path=man)  # sha256 checked, weights_only load
    assert lm.model.config.size == 96
    from OnePromptSegLib.session import PropagationSession
    from OnePromptSegLib.settings import EngineSettings
    assert entry["engine"] == {"threshold": 0.8}
    assert PropagationSession(lm).settings.threshold == 0.8  # the checkpoint's calibration is applied
    assert EngineSettings.for_model(lm, threshold=0.6).threshold == 0.6  # and explicit settings win
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        train.main(["--export", out, "--name", "x", "--manifest", man, "--engine", "thresh=0.8"])


def test_fine_tuning_starts_from_a_shipped_checkpoint(data_dir, tmp_path):
    import torch

    out = str(tmp_path / "ft")
    shipped = load_model("onepromptseg-v6", "cpu")  # by manifest name, sha256-verified
    train.main(["--out", out, "--data", data_dir, "--batch", "2", "--threads", "1", "--synth-pool", "2",
                "--steps", "1", "--lr", "1e-9", "--init", "onepromptseg-v6", "--save-every", "1000"])
    run = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["model"]
    ref = shipped.model.state_dict()
    # one step at lr 1e-9 (AdamW): the run still holds the shipped weights
    assert max(float((run[k] - ref[k]).abs().max()) for k in ref) < 1e-6


def test_export_averages_the_last_snapshots(data_dir, tmp_path):
    """``--snapshot-every`` keeps the weights along the run; ``--export --average K`` ships the mean of the final
    weights and the K-1 latest snapshots (SWA) and records which steps it averaged."""
    import torch

    out = str(tmp_path / "swa")
    train.main(["--out", out, "--data", data_dir, "--batch", "2", "--threads", "1", "--synth-pool", "2", "--steps",
                "4", "--lr", "0.05", "--snapshot-every", "1", "--save-every", "1000"])
    assert sorted(os.listdir(out)) == ["last.pt", "log.jsonl"] + [f"snap_00000{n}.pt" for n in range(1, 5)]
    man = str(tmp_path / "weights_manifest.json")
    train.main(["--export", out, "--name", "swa", "--manifest", man, "--average", "3"])
    entry = json.load(open(man))["models"][0]
    assert entry["training"]["averaged_steps"] == [2, 3, 4] and entry["training"]["steps"] == 4
    states = [torch.load(os.path.join(out, f"snap_00000{n}.pt"), weights_only=True)["model"] for n in (2, 3, 4)]
    shipped = load_model("swa", "cpu", manifest_path=man).model.state_dict()
    def flat(sd):
        return torch.cat([sd[k].float().flatten() for k in sorted(sd) if sd[k].is_floating_point()])
    got, mean, final = flat(shipped), sum(flat(st) for st in states) / 3, flat(states[2])
    assert float((mean - final).abs().max()) > 1e-4  # the averaged steps differ
    # the shipped (fp16) weights are the mean, not the final step's
    assert float((got - mean).norm()) < 0.2 * float((got - final).norm())
    with pytest.raises(SystemExit, match="has 3 snapshots before step 4.*4 needed"):
        train.main(["--export", out, "--name", "swa", "--manifest", man, "--average", "5"])


def test_run_states_are_read_as_weights_only(tmp_path):
    """``--init``/resume/``--export`` read a run's last.pt with weights_only=True: a file holding anything but
    tensors and plain values is refused with one line naming it, as is a torch file that is not a run state."""
    import torch

    bad = str(tmp_path / "object" / "last.pt")
    os.makedirs(os.path.dirname(bad))
    torch.save(dict(model={}, opt={}, step=0, config={}, extra=argparse.Namespace(a=1)), bad)  # an object: refused
    with pytest.raises(SystemExit, match="not a readable run state"):
        train.main(["--out", str(tmp_path / "ft"), "--steps", "1", "--init", bad])
    other = str(tmp_path / "other.pt")
    torch.save({"state_dict": {}}, other)
    with pytest.raises(SystemExit, match=r"missing \['config', 'model', 'opt', 'step'\]"):
        train._load_run_state(other)


def test_packed_volumes_train_like_the_nifti_files(data_dir, tmp_path):
    pack = str(tmp_path / "train.npz")
    train.main(["--data", data_dir, "--pack", pack])
    a, b = train.load_real_volumes(data_dir), train.load_real_volumes(pack)
    assert [v.name for v in a] == [v.name for v in b] and len(a) >= 2
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels)
        assert x.spacing == y.spacing and x.label_sets == y.label_sets
    with pytest.raises(SystemExit, match="needs --data"):
        train.main(["--pack", pack])
    # the point of the pack: a machine without SimpleITK (the GPU machine's image) trains from it
    import subprocess
    import sys
    code = (f"import sys; sys.modules['SimpleITK'] = None; from OnePromptSegLib.tooling import train; "
            f"print(len(train.load_real_volumes({pack!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(a)


def test_near_pairs_are_one_slice_apart_and_only_for_mask_prompts(data_dir):
    """``--near``: mask-prompted pairs one slice apart (propagation's own step); other kinds keep 1..12; without it
    the offsets are drawn as before."""
    rng = np.random.default_rng(4)
    assert {train._offset(rng, "mask", 1.0) for _ in range(50)} == {(1, True)}
    box = {train._offset(rng, "box", 1.0)[0] for _ in range(300)}
    plain = [train._offset(rng, "mask", 0.0) for _ in range(300)]
    assert len(box) >= 8 and not any(n for _, n in plain) and len({d for d, _ in plain}) >= 8
    half = [train._offset(rng, "mask", 0.5)[1] for _ in range(400)]
    assert 150 <= sum(half) <= 250
    real = train.load_real_volumes(data_dir)
    q, T, P, Kd, V, y = train.make_batch(np.random.default_rng(5), real, 16, 96, near=1.0)  # the batch path uses it
    assert q.shape == (16, 1, 96, 96) and V[:, 0].all()


def test_cross_pairs_take_the_template_from_another_patient(data_dir):
    """``--cross``: One-Prompt transfer pairs.  The two cases lie in one folder (one dataset), so each volume's
    partner is the other case along the same axis; the template is prompted on one, the target is the other's."""
    real = train.load_real_volumes(data_dir)
    partners = train.cross_partners(real)
    case = lambda tv: tv.name.rpartition(":")  # noqa: E731  (case, ":", axis)
    for i, js in partners.items():
        assert js and all(case(real[j])[0] != case(real[i])[0] and case(real[j])[2] == case(real[i])[2] for j in js)
    rng = np.random.default_rng(6)
    a, b = real[0], real[partners[0][0]]
    found = 0
    for _ in range(30):
        q, t, p, k, y = train.sample_cross_pair(rng, a, b, 96)
        assert q.shape == y.shape == (96, 96) and t.shape == (1, 96, 96) and p.shape[:2] == (1, 4) and p[0].any()
        found += bool(y.any())
    assert found >= 20  # the same relative place in the other patient mostly holds the structure
    q, T, P, Kd, V, y = train.make_batch(rng, real, 32, 96, cross=1.0, partners=partners)
    assert q.shape == (32, 1, 96, 96) and T.shape[1] == 1  # never the extra templates of ordinary pairs
