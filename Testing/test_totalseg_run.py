"""TotalSegmentator run for real, offline, on a real chest CT (../shared/data, cropped to a slab).

The package and nnU-Net are the installed ones; only the weights are made here
(``totalseg_weights.py``: nnU-Net's planner on a tiny dataset, the planned network with random
weights, in TotalSegmentator's folder layout). The weights being random, these tests check the
backend's plumbing, not segmentation quality: no network, the CT's grid, the class-to-anatomy
mapping, cut-by-FOV flags, fast/device/roi_subset passed through, stage times, progress.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_totalseg import CTRATE_CLASSES, processes_mentioning

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG
from fvlm_core.errors import CancelledError
from fvlm_core.io import read_ct, read_label_map, write_image
from fvlm_core.segmentation.labelmap import embedded_class_map
from fvlm_core.segmentation.totalseg import TotalSegmentatorBackend
from fvlm_core.segmentation.totalseg_process import STAGE_SPAN
from fvlm_training.cli import main

pytestmark = pytest.mark.slow

#: Loaded by every Python started with the test's PYTHONPATH (the backend's child, nnU-Net's
#: workers): an audit hook sees the socket module's own calls, below any patch in the code under
#: test, and refuses and logs every internet access.
NETWORK_GUARD = """
import os, sys
_LOG = os.environ.get("FVLM_TEST_NETWORK_LOG")
_LOCAL = (None, "", "localhost", "127.0.0.1", "::1", b"localhost")

def _target(event, args):
    if event == "socket.getaddrinfo" and args[0] not in _LOCAL:
        return f"{args[0]}:{args[1]}"
    if event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        return None if args[0] in _LOCAL else str(args[0])
    if event in ("socket.connect", "socket.sendto") and isinstance(args[1], tuple):
        return None if args[1][0] in _LOCAL else f"{args[1][0]}:{args[1][1]}"
    return None

def _hook(event, args):
    target = _target(event, args) if event.startswith("socket.") else None
    if target is not None:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {event} {target}\\n")
        raise OSError(f"test network guard: {event} {target} refused")

if _LOG:
    sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory, ts_dir) -> Path:
    """A TOTALSEG_HOME_DIR holding the --fast and crop models (random weights)."""
    home = tmp_path_factory.mktemp("totalseg-home")
    script = Path(__file__).with_name("totalseg_weights.py")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, str(script), str(home)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(built) == ["297", "298"]
    return home


@pytest.fixture
def short_tempdir(monkeypatch):
    """A fresh folder as the default temporary folder, with a short path: the backend's run folder
    lands in it, and multiprocessing's socket files in that (their path must stay ~100 characters)."""
    folder = Path(tempfile.mkdtemp(prefix="fvlm-t-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def offline(monkeypatch, weights_home, tmp_path, short_tempdir) -> Path:
    """TotalSegmentator pointed at the built weights; the network guard installed; the log it writes."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = tmp_path / "network.log"
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(weights_home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("FVLM_TEST_NETWORK_LOG", str(log))
    # OpenMP threads spin while waiting; on cores shared with other jobs that costs ~5x (CI runs alone)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    return log


@pytest.fixture(scope="module")
def chest_ct_file(ts_dir, tmp_path_factory) -> Path:
    """The chest CT of ../shared/data cropped to a 72 mm slab through the heart and lungs, cut
    at the sides (a quarter of its voxels, as NIfTI): TotalSegmentator's own start-up and nnU-Net's
    worker processes cost the same, its resampling and sliding windows less."""
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    start, stop = (64, 10, 20), (112, 150, 220)  # (z, y, x) voxels of the 191 x 167 x 233 CT
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    grid = ct.geometry.sub_grid(start, [b - a for a, b in zip(start, stop)])
    path = tmp_path_factory.mktemp("chest") / "chest_ct_slab.nii.gz"
    return write_image(ct.array[crop].astype(np.int16), grid, path)


@pytest.fixture(scope="module")
def chest_ct(chest_ct_file):
    return read_ct(chest_ct_file)


def _on_a_face(mask: np.ndarray) -> bool:
    return any(f.any() for f in (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]))


def _check_facts(seg, catalog) -> None:
    """Presence, voxels and the cut-by-FOV flag of every anatomy, recomputed from the label map."""
    for i, name in enumerate(catalog.names):
        mask = seg.labelmap == i + 1
        fact = seg.facts[name]
        assert fact.voxels == int(mask.sum()) and fact.present == bool(mask.any())
        assert fact.cut_by_fov == (fact.present and _on_a_face(mask)), name


def test_totalsegmentator_roi_subset_offline_on_chest_ct(offline, chest_ct_file, chest_ct, tmp_path):
    raw = tmp_path / "totalseg.nii.gz"
    reports = []
    backend = TotalSegmentatorBackend(fast=True, device="cpu", raw_output=raw)
    seg = backend.segment(chest_ct, CTRATE_CATALOG, progress=lambda step, f: reports.append((step, f)))
    details = seg.details

    # no network: nothing reached the socket layer; the only attempt, TotalSegmentator's usage
    # statistics, was refused by the backend's offline guard
    assert not offline.exists(), offline.read_text()
    assert details["network"]["offline"]
    assert all(t.startswith("stats.totalsegmentator.com") for t in details["network"]["blocked"])

    # TotalSegmentator's own run report: what it was asked to do
    ts = details["totalsegmentator_report"]
    assert ts["task"] == "total" and ts["fast"] is True and ts["device"] == "cpu" and ts["multilabel"]
    assert sorted(ts["roi_subset"]) == sorted(CTRATE_CLASSES) == sorted(details["roi_subset"])

    # the anatomy label map and TotalSegmentator's file are on the CT's grid
    assert seg.geometry is chest_ct.geometry and seg.labelmap.shape == chest_ct.array.shape
    ct_nifti, raw_nifti = nib.load(chest_ct_file), nib.load(raw)
    assert raw_nifti.shape == ct_nifti.shape
    np.testing.assert_allclose(raw_nifti.affine, ct_nifti.affine, atol=1e-4)
    saved = read_label_map(seg.save(tmp_path / "anatomy.nii.gz"))
    assert saved.geometry.same_grid(chest_ct.geometry)
    np.testing.assert_array_equal(saved.array, seg.labelmap)

    # only roi classes were predicted; each maps to its anatomy, voxel for voxel
    names = embedded_class_map(raw)
    assert set(names.values()) == set(CTRATE_CLASSES)
    values = read_label_map(raw, reference=chest_ct.geometry).array
    present = {names[v]: int(n) for v, n in zip(*np.unique(values, return_counts=True)) if v}
    assert present, "the random network predicted none of the classes: nothing to check"
    assert {c: d["voxels"] for c, d in details["classes"].items()} == present
    assert {c: d["anatomy"] for c, d in details["classes"].items()} == {c: CTRATE_CLASSES[c] for c in present}
    assert details["unused_classes"] == [] and details["anatomies_not_in_task"] == []
    for anatomy in CTRATE_CATALOG.names:
        classes = [v for v, n in names.items() if CTRATE_CLASSES[n] == anatomy]
        np.testing.assert_array_equal(seg.mask(anatomy), np.isin(values, classes))
    _check_facts(seg, CTRATE_CATALOG)
    assert any(f.cut_by_fov for f in seg.facts.values())

    # the time of every stage; progress from 0 to 1 through them
    stages = ["write input", "start", "rough segmentation", "resample input", "predict"]
    stages += ["resample output", "save", "read and merge"]
    assert list(details["timings_s"]) == stages and details["timings_s"]["predict"] > 0
    fractions = [f for _, f in reports]
    assert fractions == sorted(fractions) and reports[-1] == ("done", 1.0)
    steps = {s for s, _ in reports}
    assert {"TotalSegmentator: rough segmentation", "TotalSegmentator: predict"} <= steps
    assert any("roi_subset" in note for note in details["notes"])


def test_fvlm_segment_all_classes_offline_on_chest_ct(offline, chest_ct_file, chest_ct, tmp_path, capsys):
    out, js = tmp_path / "anatomy.nii.gz", tmp_path / "anatomy.json"
    args = ["--backend", "totalsegmentator", "--fast", "--all-classes", "--catalog", "extended"]
    rc = main(["segment", str(chest_ct_file), *args, "--out", str(out), "--json", str(js)])
    assert rc == 0
    printed = capsys.readouterr()
    assert not offline.exists(), offline.read_text()
    summary = json.loads(js.read_text())
    details = summary["details"]

    # device "auto" on this machine is the CPU; fast and all classes passed through
    ts = details["totalsegmentator_report"]
    assert ts["fast"] is True and ts["roi_subset"] is None and details["roi_subset"] is None
    assert ts["device"] == details["device"] == "cpu"
    assert "rough segmentation" not in details["timings_s"]  # no crop model without a roi_subset

    # every class found is mapped to its anatomy or reported unused; the sums add up
    anatomy_of = {
        name: a.name for a in EXTENDED_CATALOG.anatomies for name in details["classes"] if a.matches(name)
    }
    for name, info in details["classes"].items():
        assert info["anatomy"] == anatomy_of.get(name), name
    assert details["unused_classes"] == sorted(n for n in details["classes"] if n not in anatomy_of)
    assert details["unused_classes"], "the random network's output holds no class outside the catalog"
    assert details["anatomies_not_in_task"] == ["pulmonary_artery"]
    facts = {a["name"]: a for a in summary["anatomies"]}
    for anatomy, fact in facts.items():
        voxels = sum(i["voxels"] for i in details["classes"].values() if i["anatomy"] == anatomy)
        assert fact["voxels"] == voxels, anatomy

    # the label map on the CT's grid, its facts as written
    lab = read_label_map(out)
    assert lab.geometry.same_grid(chest_ct.geometry)
    for fact in facts.values():
        mask = lab.array == fact["label"]
        assert fact["voxels"] == int(mask.sum())
        assert fact["cut_by_fov"] == (fact["present"] and _on_a_face(mask))

    # the user sees the classes, what was left out, the stage times and the progress
    assert "note: classes found but used by no anatomy" in printed.out
    assert "note: time per stage: write input" in printed.out and "pulmonary_artery" in printed.out
    progress = [line for line in printed.err.splitlines() if "TotalSegmentator:" in line]
    assert any("predict" in line for line in progress) and "[100%] done" in printed.err


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc to list processes")
def test_cancel_during_prediction_kills_totalsegmentator_and_its_workers(offline, chest_ct, short_tempdir):
    seen: list[tuple[str, float]] = []

    def progress(step: str, fraction: float) -> None:
        seen.append((step, fraction))
        if step == "TotalSegmentator: predict" and fraction > STAGE_SPAN["predict"][0]:
            workers.extend(processes_mentioning(str(short_tempdir)))
            raise CancelledError("cancelled by the user")  # as the Slicer module's progress callback

    workers: list[int] = []
    t0 = time.monotonic()
    with pytest.raises(CancelledError, match="by the user"):
        TotalSegmentatorBackend(fast=True, device="cpu").segment(chest_ct, CTRATE_CATALOG, progress=progress)
    cancelled_after = time.monotonic() - t0
    assert len(workers) >= 2, "TotalSegmentator and nnU-Net's workers were running at the cancel"
    assert not processes_mentioning(str(short_tempdir)), "a process outlived the cancel"
    assert not list(short_tempdir.iterdir()), "the run's folder (a copy of the CT) outlived the cancel"
    assert "TotalSegmentator: rough segmentation" in {s for s, _ in seen} and cancelled_after < 600
