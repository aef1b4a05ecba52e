"""The Slicer module (OnePromptSeg/OnePromptSeg.py) on real MRML (slicer-core): its in-Slicer test cases that need
no Qt, and what the module adds to the MRML adapter (dependencies, the manifest's models, engine settings, progress
of test-time adaptation).  Only Qt and the scripted-module framework are stand-ins (mrml_support._framework)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from mrml_support import module_with_scene, new_scene

import slicer
from OnePromptSegMRML import segments


@pytest.fixture
def module():
    with module_with_scene(new_scene()) as module:
        yield module


@pytest.mark.parametrize("case", ["test_SyntheticMaskPrompt", "test_SyntheticPointBoxScribblePrompts",
                                  "test_CorrectionAndUndo", "test_CancelKeepsWork", "test_OnePromptMode"])
def test_the_in_slicer_test_case_passes_on_real_mrml(module, case):
    """OnePromptSegTest's own cases with the bundled checkpoint; test_MRHead (a download) and
    test_SegmentEditorEffect (Qt widgets) run inside Slicer only."""
    test = module.OnePromptSegTest(case)
    test.setUp()
    getattr(test, case)()


def _scene_with_drawing(module, seed=3):
    from OnePromptSegLib.sample import make_demo_volume
    image, truth, spacing = make_demo_volume(shape=(16, 64, 64), seed=seed)
    volume = slicer.util.addVolumeFromArray(image, name="demo")
    volume.SetSpacing(spacing)
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.GetSegmentation().AddEmptySegment("lesion", "lesion")
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    drawn = np.zeros_like(truth)
    drawn[k] = truth[k]
    segments.writeSegment(drawn, volume, seg, "lesion")
    return volume, seg, truth, k


def test_the_manifests_model_loads_and_propagates_a_slice_range(module):
    logic = module.OnePromptSegLogic()
    assert os.path.isfile(logic.manifestPath())
    models = logic.availableModels()
    assert len(models) == 1 and models[0]["default"] and os.path.isfile(models[0]["path"])
    volume, seg, truth, k = _scene_with_drawing(module)
    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, device="cpu", sliceRange=(k - 1, k + 1))
    assert summary["computed"] == 2 and summary["device"] == "cpu"
    result = segments.readSegment(seg, "lesion", volume)
    assert np.array_equal(result[k], truth[k]) and not result[: k - 1].any() and not result[k + 2:].any()


def test_follow_anatomy_switches_the_engines_optical_flow(module, monkeypatch):
    from OnePromptSegLib.session import PropagationSession
    from OnePromptSegLib.settings import EngineSettings

    logic = module.OnePromptSegLogic()
    volume, seg, _truth, k = _scene_with_drawing(module)
    used = []
    plain = PropagationSession.__init__

    def init(self, model, settings=None):
        used.append((settings.flow_weight, settings.interp_flow))
        plain(self, model, settings)
    monkeypatch.setattr(PropagationSession, "__init__", init)
    assert module.OnePromptSegParameterNode.followAnatomy is True
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK, sliceRange=(k, k + 1))
    logic.segment(volume, seg, "lesion", module.PROMPT_MASK, sliceRange=(k, k + 1), followAnatomy=False)
    assert used == [(EngineSettings.flow_weight, True), (0.0, False)] and used[0][0] > 0


def test_adaptation_shows_progress_and_cancel_writes_nothing_new(module, model, monkeypatch):
    from OnePromptSegLib.settings import EngineSettings

    logic = module.OnePromptSegLogic()
    monkeypatch.setattr(logic, "loadModel", lambda modelName="", device="auto": model)
    volume, seg, _truth, _k = _scene_with_drawing(module)
    drawn = segments.readSegment(seg, "lesion", volume)
    plain = EngineSettings.for_model
    monkeypatch.setattr(EngineSettings, "for_model", classmethod(
        lambda cls, model, **kw: plain(model, adapt_steps=3, adapt_batch=2, **kw)))
    messages = []

    def progress(result=None, message=None):
        messages.append(message)
        return not (message or "").startswith("Adapting")  # cancel at the first adaptation step

    summary = logic.segment(volume, seg, "lesion", module.PROMPT_MASK, progressCallback=progress)
    assert summary["cancelled"] and summary["computed"] == 0
    assert [m for m in messages if m and m.startswith("Adapting")] == [
        "Adapting the model to the drawn slices (step 1 of 3)..."]
    assert np.array_equal(segments.readSegment(seg, "lesion", volume), drawn)


def test_module_settings(module):
    logic = module.OnePromptSegLogic()
    assert logic.ensureDependencies(askConfirmation=False) is True  # all present: nothing to install
    pn = module.OnePromptSegParameterNode
    assert pn.promptType in module.PROMPT_TYPES and pn.direction in module.DIRECTIONS
    assert pn.sliceView in module.VIEWS and pn.device in module.DEVICES
    assert set(module.DIRECTIONS.values()) == {"both", "forward", "backward"}


def test_a_manifest_model_not_bundled_is_downloaded_once_and_checked(module, monkeypatch):
    """A manifest entry with a URL and no file: Slicer's SampleData downloads it into its cache (a stand-in here:
    SampleData is a Slicer module, not in slicer-core), the sha256 is checked when loading, and the loaded model is
    cached by the adapter; a failed download says what to do."""
    import sys
    import types

    from OnePromptSegLib.checkpoints import CheckpointError

    logic = module.OnePromptSegLogic()
    bundled = logic.availableModels()[0]
    remote = dict(bundled, name="remote", url="https://example.org/remote.pt", path="/nonexistent/remote.pt",
                  default=False)
    monkeypatch.setattr(logic, "availableModels", lambda: [bundled, remote])
    calls = []

    class SampleDataLogic:
        def downloadFileIntoCache(self, url, fileName, checksum=None):
            calls.append((url, fileName, checksum))
            return bundled["path"] if url == remote["url"] else None

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    model = logic.loadModel("remote", device="cpu")
    assert model is logic.loadModel("remote", device="cpu")  # cached: downloaded once
    assert calls == [(remote["url"], os.path.basename(bundled["file"]), f"SHA256:{bundled['sha256']}")]
    broken = dict(remote, name="broken", url="https://example.org/broken.pt")
    monkeypatch.setattr(logic, "availableModels", lambda: [bundled, broken])
    with pytest.raises(CheckpointError, match="Downloading broken from https://example.org/broken.pt failed"):
        logic.loadModel("broken", device="cpu")
    assert logic.loadModel("", device="cpu") is not model  # the bundled default, loaded by name
