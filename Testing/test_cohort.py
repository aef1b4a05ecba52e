"""``onepromptseg cohort``: a cohort of small generated volumes, killed half-way on a local Dask cluster of two
worker processes and resumed; failures recorded per case; bad arguments refused before any work."""
from __future__ import annotations

import csv
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from OnePromptSegLib.cli import main
from OnePromptSegLib.sample import make_demo_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 48, 48)


def _write(array, path, spacing):
    im = sitk.GetImageFromArray(array)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


def make_cohort(folder, n, extra_rows=()):
    """n generated cases, each prompted by its largest slice (label 2); returns the CSV path."""
    rows = ["image,prompt_mask,label"]
    for i in range(n):
        img, truth, sp = make_demo_volume(shape=SHAPE, seed=i)
        k0 = int(truth.sum(axis=(1, 2)).argmax())
        prompt = np.zeros(truth.shape, np.uint8)
        prompt[k0] = truth[k0] * 2
        _write(img.astype(np.int16), folder / f"c{i}.nii.gz", sp)
        _write(prompt, folder / f"c{i}_p.nii.gz", sp)
        rows.append(f"c{i}.nii.gz,c{i}_p.nii.gz,2")
    path = folder / "cases.csv"
    path.write_text("\n".join(rows + list(extra_rows)) + "\n")
    return path


def _summary(out):
    with open(out / "cohort.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _mask(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_killed_dask_run_resumes_only_the_missing_cases(tmp_path, capsys):
    n = 6
    cases = make_cohort(tmp_path, n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "OnePromptSegLib.cli", "cohort", str(cases), "--out-dir", str(out), "--workers", "2",
           "--device", "cpu", "-q"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(glob.glob(str(out / ".onepromptseg" / "*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and both workers, mid-cohort
    proc.wait()
    killed = sorted(os.path.basename(p)[:-5] for p in glob.glob(str(out / ".onepromptseg" / "*.json")))
    assert 2 <= len(killed) < n, (killed, proc.stderr.read().decode()[-2000:])
    for p in glob.glob(str(out / "*.nii.gz")):  # whatever is there is whole: written atomically
        assert _mask(p).shape == SHAPE
    before = {c: os.stat(out / f"{c}.nii.gz").st_mtime_ns for c in killed}

    code = main(["cohort", str(cases), "--out-dir", str(out), "--workers", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{n} cases: {len(killed)} done before, {n - len(killed)} to run" in err
    assert {c: os.stat(out / f"{c}.nii.gz").st_mtime_ns for c in killed} == before  # not redone
    rows = _summary(out)
    assert [rows[f"c{i}"]["status"] for i in range(n)] == [
        "done before" if f"c{i}" in killed else "ok" for i in range(n)]

    # The same cohort in one process, uninterrupted: identical masks.
    ref = tmp_path / "ref"
    assert main(["cohort", str(cases), "--out-dir", str(ref), "--device", "cpu", "-q"]) == 0
    for i in range(n):
        a, b = _mask(out / f"c{i}.nii.gz"), _mask(ref / f"c{i}.nii.gz")
        assert a.any() and np.array_equal(a, b), i
    assert all(float(r["volume_ml"]) > 0 and r["error"] == "" for r in _summary(ref).values())


def test_failures_are_recorded_and_retried_and_the_template_seeds(tmp_path, capsys):
    img, truth, sp = make_demo_volume(shape=SHAPE, seed=20)
    _write(img.astype(np.int16), tmp_path / "tpl.nii.gz", sp)
    _write(truth.astype(np.uint8) * 3, tmp_path / "tpl_lbl.nii.gz", sp)
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    _write(np.zeros(SHAPE, np.uint8), tmp_path / "empty.nii.gz", sp)
    cases = make_cohort(tmp_path, 2, ["broken.nii.gz,,,", "c0.nii.gz,empty.nii.gz,,c0_empty.nii.gz",
                                      "c1.nii.gz,,,c1_template.seg.nrrd"])
    text = cases.read_text().replace("image,prompt_mask,label", "image,prompt_mask,label,output")
    cases.write_text(text.replace("_p.nii.gz,2\n", "_p.nii.gz,2,\n"))
    out = tmp_path / "out"
    args = ["cohort", str(cases), "--out-dir", str(out), "--device", "cpu", "--template-image",
            str(tmp_path / "tpl.nii.gz"), "--template-mask", str(tmp_path / "tpl_lbl.nii.gz"), "--template-label", "3"]
    assert main(args) == 1  # some case failed
    rows = _summary(out)
    assert rows["broken"]["status"] == "failed" and "cannot be read" in rows["broken"]["error"]
    assert rows["c0_empty"]["status"] == "failed" and rows["c0_empty"]["error"]
    assert rows["c0"]["status"] == rows["c1"]["status"] == rows["c1_template"]["status"] == "ok"
    assert int(rows["c1_template"]["voxels"]) > 0
    assert not (out / "broken.nii.gz").exists()
    capsys.readouterr()
    assert main(args) == 1
    assert "5 cases: 3 done before, 2 to run" in capsys.readouterr().err  # failed cases are retried, not skipped


@pytest.mark.parametrize("csv_text, extra, message", [
    ("image,organ\nc0.nii.gz,x\n", [], "not understood"),
    ("image\nmissing.nii.gz\n", [], "missing.nii.gz: no such file"),
    ("image\nc0.nii.gz\n", [], "no prompt_mask, and no --template-image"),
    ("image,prompt_mask,output\nc0.nii.gz,c0_p.nii.gz,a.png\n", [], "unknown extension"),
    ("image,prompt_mask,label\nc0.nii.gz,c0_p.nii.gz,two\n", [], "not an integer"),
    ("image,prompt_mask\nc0.nii.gz,c0_p.nii.gz\n", ["--set", "threshold=7"], "out of range"),
    ("image,prompt_mask\nc0.nii.gz,c0_p.nii.gz\n", ["--workers", "0"], "1 or more"),
])
def test_bad_cohort_arguments_exit_2_before_any_work(tmp_path, capsys, csv_text, extra, message):
    make_cohort(tmp_path, 1)
    (tmp_path / "bad.csv").write_text(csv_text)
    out = tmp_path / "out"
    code = main(["cohort", str(tmp_path / "bad.csv"), "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
