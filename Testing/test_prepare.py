"""``fvlm prepare``: CT-RATE layout -> model-space cache; shards, bad volumes, resuming after a crash."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fvlm_core.anatomy import CTRATE_CATALOG
from fvlm_core.data import synth
from fvlm_core.data.cache import CacheSamples, is_complete, list_samples, load_sample, sample_paths
from fvlm_core.data.prepare import parse_shard, prepare_dataset, select_shard, shard_of
from fvlm_core.data.samples import AugmentConfig, TrainingSamples
from fvlm_core.errors import ConfigError
from fvlm_core.findings import CTRATE_LABEL_ANATOMY
from fvlm_core.preprocess import ModelSpaceConfig
from fvlm_training.cli import main as fvlm

SIZE = (24, 32, 40)
NATIVE = synth.default_spacing_zyx(SIZE)  # model space = the phantoms' own grid: resampling is exact
CONFIG = ModelSpaceConfig(spacing_zyx=NATIVE, window_size_zyx=(24, 32, 40), multiple_zyx=(8, 8, 8))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep") / "cohort"
    synth.generate_cohort(root, 8, seed=5, size_zyx=SIZE, recon_fraction=0.3, valid_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def truth() -> dict:
    return {
        s.name: s
        for s in synth.iter_cohort(8, seed=5, size_zyx=SIZE, recon_fraction=0.3, valid_fraction=0.25)
    }


def _prep(cohort, out, **kw):
    kw.setdefault("config", CONFIG)
    return prepare_dataset(cohort, out, progress=False, **kw)


def test_prepare_writes_faithful_samples(cohort, truth, tmp_path):
    out = tmp_path / "cache"
    summary = _prep(cohort, out)
    train = sorted(n for n, s in truth.items() if s.split == "train")
    assert summary.processed == len(train) and not summary.failed and list_samples(out) == train
    for name in train:
        s, want = load_sample(out, name), truth[name]
        # Same grid as the source (LPS, native spacing): HU and anatomy labels survive exactly.
        assert s.geometry.same_grid(want.geometry, tol=1e-4)
        np.testing.assert_array_equal(s.hu, want.hu)
        np.testing.assert_array_equal(s.labels, np.where(want.labels == 5, 0, want.labels))
        assert s.finding_labels == want.label_row
        assert s.anatomies == CTRATE_CATALOG.names and set(s.texts) == set(CTRATE_CATALOG.names)
        # Reference rule: an anatomy is abnormal iff one of its findings is drawn (the impression names it).
        for a in CTRATE_CATALOG.names:
            assert s.abnormal[a] == any(CTRATE_LABEL_ANATOMY.get(f) == a for f in want.findings), (name, a)
        assert want.report["Impressions_EN"] in s.report
    summary_file = out / "_prepare" / "summary-train-0of1.json"
    assert json.loads(summary_file.read_text())["processed"] == len(train)
    items = TrainingSamples(
        CacheSamples(out), CTRATE_CATALOG.names, {}, AugmentConfig(crop_size=SIZE), seed=0
    )
    item = items[(0, 0, 0)]
    assert item["image"].shape == (1, *SIZE) and item["labels"].shape == SIZE


def test_resampled_to_coarser_model_space(cohort, tmp_path):
    cfg = ModelSpaceConfig(
        spacing_zyx=(16.0, 16.0, 16.0), window_size_zyx=(16, 16, 16), multiple_zyx=(8, 8, 8)
    )
    _prep(cohort, tmp_path / "c", config=cfg, split="valid")
    for name in list_samples(tmp_path / "c"):
        s = load_sample(tmp_path / "c", name)
        assert s.geometry.spacing == (16.0, 16.0, 16.0)
        assert s.hu.shape == s.geometry.shape_zyx and s.hu.shape[0] == 18  # 288 mm / 16 mm
        lung = s.hu[s.labels == 1]
        assert lung.size and np.median(lung) < -600  # lung stays lung after resampling


def test_shards_cover_every_volume_once(cohort, tmp_path):
    out = tmp_path / "cache"
    done = []
    for i in range(3):
        s = _prep(cohort, out, shard=(i, 3))
        done.append(s.processed)
    names = list_samples(out)
    assert sum(done) == len(names) == len({n for n in names})
    all_names = sorted(names)
    parts = [select_shard(all_names, i, 3) for i in range(3)]
    assert sorted(n for p in parts for n in p) == all_names
    assert all(shard_of(n, 3) == i for i, p in enumerate(parts) for n in p)


def test_parse_shard(monkeypatch):
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) == (0, 1)
    for bad in ("5/5", "-1/2", "a/b", "3"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert parse_shard("auto") == (3, 8)


def test_bad_volumes_are_skipped_counted_and_reported(cohort, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    with open(data / "metadata" / "train_metadata.csv") as fh:
        names = [r["VolumeName"].removesuffix(".nii.gz") for r in csv.DictReader(fh)]
    corrupt, missing, empty, foreign, no_sections = names[:5]
    vol = data / "dataset" / "train" / synth.volume_relpath(corrupt)
    vol.write_bytes(vol.read_bytes()[:200])  # truncated download
    (data / "dataset" / "train" / synth.volume_relpath(missing)).unlink()
    reports = data / "radiology_text_reports" / "train_reports.csv"
    with open(reports) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r["VolumeName"].startswith(empty + "."):
            r["Findings_EN"] = r["Impressions_EN"] = ""
        if r["VolumeName"].startswith(foreign + "."):
            r["Findings_EN"] = "Beide Lungen sind frei. Kein Pleuraerguss. Herz normal gross."
            r["Impressions_EN"] = "Unauffaelliger Befund."
        if r["VolumeName"].startswith(no_sections + "."):  # one block of text, no impression
            r["Findings_EN"] = r["Findings_EN"] + " " + r["Impressions_EN"]
            r["Impressions_EN"] = ""
    with open(reports, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    out = tmp_path / "cache"
    args = ["prepare", "--dataset", str(data), "--out", str(out), "--spacing", *map(str, NATIVE)]
    assert fvlm(args) == 0  # a few bad volumes never fail the whole run
    printed = capsys.readouterr().out
    assert (
        f"{len(names) - 4} written" in printed
        and "3 failed" in printed
        and "1 listed but unusable" in printed
    )
    summary = json.loads((out / "_prepare" / "summary-train-0of1.json").read_text())
    failed = {f["name"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {corrupt, empty, foreign}
    assert vol.name in failed[corrupt] and "empty" in failed[empty] and "English" in failed[foreign]
    assert [s["name"] for s in summary["skipped_listing"]] == [missing]
    assert sorted(list_samples(out)) == sorted(set(names) - {corrupt, missing, empty, foreign})
    assert load_sample(out, no_sections).texts["lung"]  # a report without sections still decomposes
    assert fvlm([*args, "--strict"]) == 1  # ...unless asked to
    # Re-running with another model space into the same cache is refused.
    with pytest.raises(ConfigError, match="spacing_zyx"):
        _prep(data, out, config=ModelSpaceConfig(spacing_zyx=(9.0, 9.0, 9.0)))


def test_rerun_after_interruption_finishes_without_redoing(cohort, tmp_path):
    out = tmp_path / "cache"
    first = _prep(cohort, out, limit=3)  # "interrupted" after 3 samples
    assert first.processed == 3
    done = list_samples(out)
    before = {n: [(p.stat().st_mtime_ns, p.read_bytes()) for p in sample_paths(out, n)] for n in done}
    todo = [n for n in select_shard(sorted(n for n in _names(cohort)), 0, 1) if n not in done]
    # Debris of a crash: a stale temporary file, a tensor file whose JSON was never written, and
    # a JSON whose tensor file is truncated.
    stale = out / f".{todo[0]}.k3j2h1.tmp.safetensors"
    stale.write_bytes(b"partial")
    sample_paths(out, todo[1])[0].write_bytes(b"half written")
    shutil.copy(sample_paths(out, done[0])[1], sample_paths(out, todo[2])[1])
    sample_paths(out, todo[2])[0].write_bytes(b"x" * 10)
    assert not any(is_complete(out, n) for n in todo)

    time.sleep(0.01)
    second = _prep(cohort, out)
    assert second.already_done == 3 and second.processed == len(todo) and not second.failed
    assert second.stale_temps_removed == 1 and not stale.exists()
    for n, files in before.items():  # finished samples untouched
        assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in sample_paths(out, n)] == files
    assert all(is_complete(out, n) for n in todo)
    assert load_sample(out, todo[2]).name == todo[2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _names(cohort: Path) -> list[str]:
    with open(cohort / "metadata" / "train_metadata.csv") as fh:
        return [r["VolumeName"].removesuffix(".nii.gz") for r in csv.DictReader(fh)]


def test_killed_run_resumes(cohort, tmp_path):
    """A real SIGKILL in the middle of a run, then a re-run: every sample complete and identical."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "fvlm_training.cli", "prepare", "--dataset", str(cohort), "--out", str(out)]
    cmd += ["--spacing", *map(str, NATIVE)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.json")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = {
        n: sample_paths(out, n)[0].stat().st_mtime_ns for n in list_samples(out) if is_complete(out, n)
    }
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    names = sorted(_names(cohort))
    assert list_samples(out) == names and all(is_complete(out, n) for n in names)
    assert {n: sample_paths(out, n)[0].stat().st_mtime_ns for n in survived} == survived
    clean = tmp_path / "clean"
    _prep(cohort, clean, config=ModelSpaceConfig(spacing_zyx=NATIVE))
    for n in names:
        a, b = load_sample(out, n), load_sample(clean, n)
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.texts == b.texts


def test_in_memory_phantoms_match_prepared_samples(cohort, truth, tmp_path):
    """``synth.to_cached_sample`` / ``iter_cohort(as_cached=True)`` (the demo's disk-free path)
    give what ``fvlm prepare`` writes for the same phantoms."""
    out = tmp_path / "cache"
    _prep(cohort, out, split="valid")
    names = list_samples(out)
    in_memory = {
        s.name: s
        for s in synth.iter_cohort(
            8,
            seed=5,
            size_zyx=SIZE,
            recon_fraction=0.3,
            valid_fraction=0.25,
            as_cached=True,
            model_space=CONFIG,
        )
    }
    for n in names:
        a, b = load_sample(out, n), in_memory[n]
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.geometry.same_grid(b.geometry, tol=1e-4)
        assert (a.texts, a.abnormal, a.finding_labels, a.report) == (
            b.texts,
            b.abnormal,
            b.finding_labels,
            b.report,
        )
    native = synth.to_cached_sample(truth[names[0]])  # no model space: the phantom grid itself
    np.testing.assert_array_equal(native.hu, truth[names[0]].hu)


def test_prepare_with_builtin_segmentation(cohort, truth, tmp_path):
    """Masks from a segmentation backend instead of the layout's label maps."""
    out = tmp_path / "cache"
    s = _prep(cohort, out, split="valid", backend="builtin")
    assert s.processed >= 1 and not s.failed
    for n in list_samples(out):
        got, want = load_sample(out, n), truth[n]
        assert got.meta["mask"] is None and got.meta["segmentation"] == "builtin"
        lung, ref = got.labels == 1, want.labels == 1
        assert (
            2 * (lung & ref).sum() / (lung.sum() + ref.sum()) > 0.8
        )  # the segmenter finds the phantom's lungs
