"""Cohort runs: one structure segmented in many volumes, resumable, in parallel on this machine or a Dask cluster.

    cases = read_cases("cases.csv", out_dir="out", job=job)       # every value checked before any work
    rows = run_cohort(cases, job, "out", workers=2)                # or scheduler="tcp://host:8786" / "local"

``CASES.csv`` has a header; columns (any order, only ``image`` required): ``image``, ``prompt_mask`` (a label volume
on the image's grid, as ``propagate --prompt-mask``), ``label``, ``slices`` (drawn slices, ``3;17`` or ``3,17`` in
quotes), ``output`` (relative to the output folder; default ``<image name>.nii.gz``).  A case without its own
``prompt_mask`` is seeded from the job's template (``OnePromptSegLib.template``).  Relative paths are relative to the
CSV's folder.

Resuming: each finished case leaves a record (``DIR/.onepromptseg/<case>.json``) holding the sha256 of its inputs
(image, prompt, template files) and of the job's settings; a rerun skips a case whose output exists and whose
record matches, and reruns everything else (failed, missing, changed).  Outputs are written atomically
(``io.write_mask``), records after their output, so a killed run never leaves a half-written mask nor a record of
one.  A failing case (unreadable file, empty prompt, out of memory, a worker killed) is recorded with its reason and
the cohort goes on.  ``DIR/cohort.csv`` (rewritten after every case) summarises the run.

Parallelism: one process (``workers=1``) runs the cases in turn; more workers, or ``scheduler`` (an address, or
``"local"``), go through Dask distributed: a ``LocalCluster`` of worker processes on this machine, or the cluster
behind the address.  Each worker process loads the model once and sets torch's threads to its share of the CPU
(``device="auto"`` puts workers on their GPU where they have one).  Dask is imported only here, on that path: the
Slicer extension ships this module without needing Dask.
"""
from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .io import MASK_EXTENSIONS, VolumeIOError, check_readable, check_writable

#: the columns CASES.csv may have
COLUMNS = ("image", "prompt_mask", "label", "slices", "output")
#: the columns of DIR/cohort.csv
SUMMARY = ("case", "status", "seconds", "voxels", "volume_ml", "quality", "peak_mb", "output", "error")
RECORDS = ".onepromptseg"


@dataclass
class Case:
    """One volume of the cohort and where its mask goes."""

    name: str
    image: str
    output: str
    prompt_mask: Optional[str] = None
    label: Optional[int] = None
    slices: List[int] = field(default_factory=list)


@dataclass
class Job:
    """What every case shares: model, device, engine settings, slice axis and the template (if any)."""

    model: Optional[str] = None
    device: str = "auto"
    settings: Dict[str, object] = field(default_factory=dict)  #: EngineSettings overrides (``--set``)
    axis: str = "k"
    template_image: Optional[str] = None
    template_mask: Optional[str] = None
    template_label: Optional[int] = None
    template_anchors: int = 1
    threads: Optional[int] = None  #: torch threads per worker (None: the worker's share of its CPUs)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise VolumeIOError(f"{what}: {text!r} is not an integer") from None


def _stem(path: str) -> str:
    """A file's name without its image extension (``a.seg.nrrd`` -> ``a``): the case's name."""
    name = os.path.basename(path)
    for ext in MASK_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_cases(path: str, out_dir: str, job: Job) -> List[Case]:
    """The cases of ``path`` (CASES.csv), every value checked before any work: known columns, readable inputs,
    integer labels and slices, output names with a known extension, no two cases writing one output, and a
    prompt or the job's template for every case.  Raises VolumeIOError naming the row."""
    check_readable(path, "cases")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        unknown = [h for h in header if h not in COLUMNS]
        if "image" not in header or unknown:
            raise VolumeIOError(f"{path}: columns {unknown or header} not understood; the header must have 'image' "
                                f"and may have {', '.join(COLUMNS[1:])}")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise VolumeIOError(f"{path}: no cases listed")
    cases, outputs = [], {}
    for n, r in enumerate(rows, start=2):
        where = f"{path} line {n}"
        if not r.get("image"):
            raise VolumeIOError(f"{where}: no image")
        image = os.path.join(base, r["image"])
        check_readable(image, where)
        output = os.path.join(out_dir, r.get("output") or f"{_stem(image.rstrip(os.sep))}.nii.gz")
        folder = os.path.dirname(output)
        if os.path.abspath(folder) == os.path.abspath(out_dir) and not os.path.isdir(out_dir):
            check_writable(os.path.join(os.path.dirname(os.path.abspath(out_dir)) or ".", os.path.basename(output)),
                           what=where)  # the output folder is made once every check has passed
        else:
            check_writable(output, what=where)
        if output in outputs:
            raise VolumeIOError(f"{where}: writes {output}, as line {outputs[output]} does; give an output column")
        outputs[output] = n
        prompt = os.path.join(base, r["prompt_mask"]) if r.get("prompt_mask") else None
        if prompt:
            check_readable(prompt, where)
        elif not job.template_image:
            raise VolumeIOError(f"{where}: no prompt_mask, and no --template-image to seed it from")
        label = _int(r["label"], f"{where} label") if r.get("label") else None
        slices = [_int(s, f"{where} slices") for s in re.split(r"[;, ]+", r.get("slices", "")) if s]
        cases.append(Case(_stem(output), image, output, prompt, label, slices))
    return cases


def _hash_path(h, path: str) -> None:
    """Feed a file's bytes (or a folder's files, in name order) into ``h``."""
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in files:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


def case_key(case: Case, job: Job, model_id: str) -> str:
    """sha256 of everything a case's result depends on: its input files, its prompt options, the job (model,
    settings, axis, template files; ``model_id``: ``checkpoints.checkpoint_id``).  A rerun redoes a case only when
    this changes (or its output is gone)."""
    h = hashlib.sha256()
    for p in (case.image, case.prompt_mask, job.template_image if not case.prompt_mask else None,
              job.template_mask if not case.prompt_mask else None):
        if p:
            _hash_path(h, p)
    own = {k: v for k, v in asdict(job).items() if k not in ("device", "threads", "template_image", "template_mask")}
    h.update(json.dumps(dict(job=own, label=case.label, slices=case.slices, model=model_id),
                        sort_keys=True).encode())
    return h.hexdigest()


_LOADED: Dict[Tuple[Optional[str], str], object] = {}  #: one model per worker process


def _model(job: Job):
    """The worker's model, loaded once; torch's threads set to ``job.threads`` or, on a Dask worker, its threads
    (the CPUs the cluster gave it), so that worker processes sharing a machine do not oversubscribe it."""
    import torch

    from .checkpoints import load_model

    key = (job.model, job.device)
    if key not in _LOADED:
        threads = job.threads
        if threads is None:
            try:
                from distributed import get_worker

                threads = get_worker().state.nthreads
            except (ImportError, ValueError):  # in-process: torch's own default
                pass
        if threads:
            torch.set_num_threads(int(threads))
        _LOADED[key] = load_model(job.model, job.device)
    return _LOADED[key]


def _peak_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_case(case: Case, job: Job, key: str) -> Dict[str, object]:
    """Segment one case (in whichever process runs it) and write its mask and record; returns its summary row.
    Never raises for the case's own failure: the row says ``failed`` and why."""
    from .io import read_label_volume, read_volume, write_mask
    from .prompts import MaskPrompt, masks_from_label_volume, slice_shape
    from .session import PropagationSession
    from .settings import EngineSettings

    t0 = time.time()
    row: Dict[str, object] = dict(case=case.name, output=case.output)
    try:
        model = _model(job)
        settings = EngineSettings.for_model(model, **job.settings).check()
        vol = read_volume(case.image)
        if case.prompt_mask:
            sess = PropagationSession(model, settings)
            sess.set_volume(vol.array, job.axis, vol.spacing)
            prompts = masks_from_label_volume(read_label_volume(case.prompt_mask, vol), job.axis, case.label,
                                              vol.array.shape)
            drawn = {p.slice_index for p in prompts}
            plane = slice_shape(vol.array.shape, job.axis)
            prompts += [MaskPrompt(s, np.zeros(plane, bool)) for s in case.slices if s not in drawn]  # drawn empty
            for p in prompts:
                sess.add_prompt(p)
        else:
            from .template import template_session

            template = read_volume(job.template_image)
            labels = read_label_volume(job.template_mask, template)
            structure = labels == job.template_label if job.template_label is not None else labels != 0
            sess, _ = template_session(model, vol, template, structure, job.axis, settings,
                                       anchors=job.template_anchors)
        for _ in sess.propagate():
            pass
        mask = sess.result
        write_mask(mask, vol, case.output)
        voxels = int(np.count_nonzero(mask))
        q = [v for s, v in sess.quality.items() if s not in sess.anchors]
        row.update(status="ok", voxels=voxels, volume_ml=round(voxels * float(np.prod(vol.spacing)) / 1000, 3),
                   quality=round(float(np.mean(q)), 3) if q else "")
    except Exception as e:  # the case fails, the cohort goes on
        reason = str(e).strip().splitlines()[0] if str(e).strip() else traceback.format_exception_only(e)[-1]
        row.update(status="failed", error=f"{type(e).__name__}: {reason}"[:300])
    row.update(seconds=round(time.time() - t0, 2), peak_mb=_peak_mb())
    if row["status"] == "ok":
        _write_atomic(_record_path(case), json.dumps(dict(key=key, row=row)))
    return row


def _record_path(case: Case) -> str:
    return os.path.join(os.path.dirname(case.output), RECORDS, case.name + ".json")


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def finished(case: Case, key: str) -> Optional[Dict[str, object]]:
    """The summary row of an earlier run of ``case`` with the same inputs and settings, if its output exists."""
    try:
        with open(_record_path(case), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record["row"] if record.get("key") == key and os.path.exists(case.output) else None


def write_summary(rows: Iterable[Dict[str, object]], path: str) -> None:
    """``DIR/cohort.csv``: one line per case (``SUMMARY`` columns), written atomically."""
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, SUMMARY, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY})
    _write_atomic(path, buf.getvalue())


def _results(todo: List[Tuple[Case, str]], job: Job, workers: int, scheduler: Optional[str]):
    """(case, row) as cases finish: in this process, or on a Dask cluster."""
    if workers <= 1 and not scheduler:
        for case, key in todo:
            yield case, run_case(case, job, key)
        return
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler in (None, "local"):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        job = Job(**{**asdict(job), "threads": job.threads or max(1, (os.cpu_count() or 1) // workers)})
    try:
        with Client(cluster or scheduler) as client:
            futures = {client.submit(run_case, case, job, key, pure=False, key=f"case-{case.name}-{key[:12]}"): case
                       for case, key in todo}
            for fut in as_completed(futures):
                case = futures[fut]
                try:
                    yield case, fut.result()
                except Exception as e:  # the worker died (killed, out of memory): the case failed, not the cohort
                    yield case, dict(case=case.name, output=case.output, status="failed",
                                     error=f"{type(e).__name__}: {e}"[:300])
    finally:
        if cluster is not None:
            cluster.close()


def run_cohort(cases: List[Case], job: Job, out_dir: str, workers: int = 1, scheduler: Optional[str] = None,
               on_start: Optional[Callable[[int, int], None]] = None,
               on_case: Optional[Callable[[Dict[str, object], int, int], None]] = None) -> List[Dict[str, object]]:
    """Run every case not already finished with the same inputs and settings; returns the summary rows (in the
    CSV's order) and writes ``out_dir/cohort.csv`` after each case.  ``on_start(to_do, done_before)`` is called
    once the finished cases are known, ``on_case(row, done, to_do)`` as each case ends (a progress bar); rows of
    skipped cases have status ``done before``."""
    os.makedirs(out_dir, exist_ok=True)
    rows: Dict[str, Dict[str, object]] = {}
    todo = []
    from .checkpoints import checkpoint_id

    model_id = checkpoint_id(job.model)
    for case in cases:
        key = case_key(case, job, model_id)
        earlier = finished(case, key)
        if earlier is not None:
            rows[case.name] = {**earlier, "status": "done before"}
        else:
            todo.append((case, key))
    if on_start:
        on_start(len(todo), len(rows))
    summary = os.path.join(out_dir, "cohort.csv")
    order = [c.name for c in cases]
    for done, (case, row) in enumerate(_results(todo, job, workers, scheduler), start=1):
        rows[case.name] = row
        write_summary([rows[n] for n in order if n in rows], summary)
        if on_case:
            on_case(row, done, len(todo))
    write_summary([rows[n] for n in order if n in rows], summary)
    return [rows[n] for n in order]
