"""Checkpoint integrity (missing, truncated, tampered, mismatched), device choice, and the shipped manifest."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from OnePromptSegLib.checkpoints import (CheckpointError, DeviceFallbackWarning, add_manifest_entry,
                                         default_manifest_path, list_models, load_model, resolve_device,
                                         save_weights, sha256_file)
from OnePromptSegLib.model import ModelConfig, OnePromptNet, count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny(tmp_path):
    """A small checkpoint and its manifest in a temporary folder."""
    cfg = ModelConfig(size=32, channels=[8, 8, 16, 16], dim=16, heads=2, blocks=1, readout_dim=8)
    path = save_weights(OnePromptNet(cfg).state_dict(), cfg, "tiny", folder=str(tmp_path / "Models"))
    man = str(tmp_path / "weights_manifest.json")
    add_manifest_entry("tiny", path, cfg, training={"command": "test"}, manifest_path=man)
    return path, man, cfg


def test_shipped_manifest_lists_a_verified_default():
    man = json.load(open(os.path.join(ROOT, "weights_manifest.json")))
    assert man["default"] in [e["name"] for e in man["models"]]
    for e in man["models"]:
        for key in ("file", "sha256", "bytes", "input_size", "config", "training", "training_data"):
            assert key in e, f"manifest entry {e['name']} lacks {key}"
        p = os.path.join(ROOT, e["file"])
        if os.path.exists(p):
            assert sha256_file(p) == e["sha256"] and os.path.getsize(p) == e["bytes"]
            assert e["bytes"] <= 20 * 1024 * 1024  # <= 20 MB
        else:
            assert e.get("url"), f"{e['file']} is neither bundled nor downloadable"
    assert os.path.samefile(default_manifest_path(), os.path.join(ROOT, "weights_manifest.json"))


def test_default_model_loads_on_cpu_and_is_small(model):
    assert model.device.type == "cpu"
    assert count_parameters(model.model) * 2 <= 20 * 1024 * 1024


def test_load_by_name_and_by_path(tiny):
    path, man, cfg = tiny
    assert load_model("tiny", "cpu", man).config == cfg
    assert load_model(path, "cpu", man).name == "tiny"  # a listed file given by path is still verified
    assert [e["name"] for e in list_models(man)] == ["tiny"] and list_models(man)[0]["default"]


def test_missing_file(tiny):
    path, man, _ = tiny
    os.remove(path)
    with pytest.raises(CheckpointError, match=r"tiny.pt is missing: reinstall"):
        load_model("tiny", "cpu", man)


def test_truncated_file(tiny):
    path, man, _ = tiny
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model("tiny", "cpu", man)


def test_tampered_file(tiny):
    path, man, _ = tiny
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model("tiny", "cpu", man)


def test_architecture_mismatch(tiny, tmp_path):
    path, man, cfg = tiny
    m = json.load(open(man))
    m["models"][0]["config"]["dim"] = 32
    json.dump(m, open(man, "w"))
    with pytest.raises(CheckpointError, match="architecture"):
        load_model("tiny", "cpu", man)


def test_weights_that_do_not_fit(tmp_path):
    cfg = ModelConfig(size=32, channels=[8, 8, 16, 16], dim=16, heads=2, blocks=1, readout_dim=8)
    sd = OnePromptNet(cfg).state_dict()
    sd.pop("head.weight")
    path = save_weights(sd, cfg, "broken", folder=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="does not fit"):
            load_model(path, "cpu", str(tmp_path / "none.json"))


def test_not_a_weights_file(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"hello": torch.zeros(1)}, p)
    with pytest.warns(UserWarning, match="not listed"):
        with pytest.raises(CheckpointError, match="not a OnePromptSeg weights file"):
            load_model(str(p), "cpu", str(tmp_path / "none.json"))
    p.write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_model(str(p), "cpu", str(tmp_path / "none.json"))


def test_unknown_name(tiny):
    _, man, _ = tiny
    with pytest.raises(CheckpointError, match="no checkpoint named 'nope'.*known: tiny"):
        load_model("nope", "cpu", man)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_request_falls_back_to_cpu_with_a_warning():
    with pytest.warns(DeviceFallbackWarning, match="CPU"):
        assert resolve_device("cuda").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(CheckpointError, match="unknown device"):
        resolve_device("tpu")


def test_out_of_memory_moves_to_the_cpu_and_answers(model):
    """A CUDA OOM in the middle of a batch: a warning, the model on the CPU, and the same answer as without."""
    import numpy as np

    from OnePromptSegLib.scheduler import WalkRequest

    S = model.size
    rng = np.random.default_rng(0)
    img = rng.random((S, S)).astype(np.float32)
    pm = np.zeros((4, S, S), np.float32)
    pm[3, 30:60, 30:60] = 1
    req = WalkRequest(img, [img], [pm], [3], [("oom", 0), ("oom", 1)])
    want = model.predict(img, [img], [pm], [3])
    real_decode, calls = model.model.decode, []

    def failing_decode(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(*a, **k)

    model.model.decode = failing_decode
    try:
        with pytest.warns(DeviceFallbackWarning, match="ran out of memory"):
            (prob, q), = model.predict_many([req])
    finally:
        del model.model.decode  # back to the class's method
    assert model.device.type == "cpu" and len(calls) == 2
    assert np.abs(prob - want[0]).max() < 1e-4 and abs(q - want[1]) < 1e-4
