"""The embedding store (`fvlm embed`, `query`, `search`, `evaluate --embeddings`) on synthetic
phantoms with a demo-size model (fvlm-tiny, random weights): the store's rows, equality with the
analyzer's embeddings and with `fvlm analyze`'s scores, resume after a kill, torchrun ranks,
search, another model refused, bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fvlm_core.errors import ConfigError, DataError
from fvlm_training.cli import main

ANATOMIES = ["lung", "heart", "esophagus", "aorta"]
N_SCANS = 6


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 phantoms as NIfTI in HU (a cohort folder + labels CSV with reports) and their anatomy
    masks; p005 has no heart in its mask (absent anatomy)."""
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.io import write_image

    root = tmp_path_factory.mktemp("store_cohort")
    data, masks = root / "data", root / "masks"
    rows = [["scan", "Pleural effusion", "Cardiomegaly", "Emphysema", "Report"]]
    for i in range(N_SCANS):
        prevalence = {"Pleural effusion": 0.5, "Cardiomegaly": 0.5, "Emphysema": 0.5}
        s = make_phantom(31, i, "valid", (32, 32, 32), prevalence=prevalence, normal_fraction=0.0)
        name = f"p{i:03d}"
        write_image(s.hu.astype(np.int16), s.geometry, data / f"{name}.nii.gz")
        lab = (s.labels * (s.labels <= 4)).astype(np.uint8)
        if i == 5:
            lab[lab == 2] = 0  # no heart
        write_image(lab, s.geometry, masks / f"{name}.nii.gz")
        y = [str(int(f in s.findings)) for f in ("Pleural effusion", "Cardiomegaly", "Emphysema")]
        rows.append([name, *y, f"{s.report['Findings_EN']} IMPRESSION: {s.report['Impressions_EN']}"])
    _write_csv(data / "labels.csv", rows)
    return data, masks


def _embed(cohort, model, out, *extra) -> int:
    data, masks = cohort
    argv = ["embed", str(data), "--masks", str(masks), "--model", str(model), "--out", str(out)]
    return main([*argv, "--device", "cpu", "--workers", "0", *extra])


@pytest.fixture(scope="module")
def store_dir(cohort, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.store"
    assert _embed(cohort, tiny_model_dir, out, "--workers", "2") == 0
    return out


def _sorted_rows(path) -> dict:
    from fvlm_core.store.format import EmbeddingStore

    t = EmbeddingStore.open(path).table().to_pylist()
    return {(r["scan"], r["anatomy"]): r for r in t}


def test_store_rows_and_other_readers(store_dir, cohort):
    import duckdb
    import pandas as pd

    from fvlm_core.store.format import EmbeddingStore

    store = EmbeddingStore.open(store_dir)
    assert store.scans() == [f"p{i:03d}" for i in range(N_SCANS)]
    rows = _sorted_rows(store_dir)
    assert len(rows) == N_SCANS * len(ANATOMIES)
    heart = rows[("p005", "heart")]
    assert heart["status"] == "absent" and not heart["scored"] and heart["embedding"] is None
    lung = rows[("p000", "lung")]
    assert lung["status"] in ("present", "partial") and lung["scored"] and lung["voxels"] > 0
    vec = np.frombuffer(lung["embedding"], "<f4")  # D float32 as little-endian bytes
    assert vec.shape == (128,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert lung["volume_ml"] > 0 and len(lung["window_size_zyx"]) == 3
    assert lung["source"] == str((cohort[0] / "p000.nii.gz").resolve())
    assert lung["text"] and dict(lung["labels"]).keys() >= {"Pleural effusion", "Cardiomegaly"}
    info = json.loads((store_dir / "store.json").read_text())
    assert info["model"]["weights_sha256"] == store.info.model.weights_sha256 and info["windows"] == "shared"
    # other tools read the parts as they are
    df = pd.read_parquet(store_dir / "parts")
    assert len(df) == N_SCANS * len(ANATOMIES)
    glob = str(store_dir / "parts" / "*.parquet")
    n = duckdb.sql(f"SELECT count(*) FROM '{glob}' WHERE anatomy = 'heart' AND scored").fetchall()[0][0]
    assert n == N_SCANS - 1
    blob = duckdb.sql(f"SELECT embedding FROM '{glob}' WHERE scan = 'p000' AND anatomy = 'lung'").fetchall()[
        0
    ][0]
    assert np.array_equal(np.frombuffer(blob, "<f4"), vec)
    assert np.array_equal(
        np.frombuffer(df[(df.scan == "p000") & (df.anatomy == "lung")].embedding.iloc[0], "<f4"), vec
    )


@pytest.mark.parametrize("strategy", ["shared", "centred", "reference"])
def test_windows_and_encoder_halves_equal_the_analyzer(cohort, tiny_model_dir, strategy):
    from fvlm_core.io import read_ct, read_label_map
    from fvlm_core.preprocess import reference_resize, resample_to_model_space
    from fvlm_core.store.encode import encode_windows, prepare_windows
    from fvlm_core.zeroshot.analyzer import Analyzer

    an = Analyzer.from_pretrained(tiny_model_dir, device="cpu")
    data, masks = cohort
    ct = read_ct(data / "p001.nii.gz")
    labels = read_label_map(masks / "p001.nii.gz")
    to_ms = reference_resize if strategy == "reference" else resample_to_model_space
    ct_ms, lab_ms = to_ms(ct, labels, an.model_space)
    want = an.encode_model_space(ct_ms, lab_ms, strategy=strategy)
    got = encode_windows(an, prepare_windows(ct_ms, lab_ms, an.anatomies, an.model_space, strategy))
    assert set(got.anatomies) == set(want.anatomies) and len(want.anatomies) == 4
    for name, e in want.anatomies.items():
        assert got.anatomies[name].window == e.window
        assert np.array_equal(got.anatomies[name].embedding.numpy(), e.embedding.numpy())
    assert [p.to_dict() for p in got.plans] == [p.to_dict() for p in want.plans]


def _calibrated_copy(model, tmp_path):
    """The model with a stored threshold and Platt calibration of Pleural effusion (as
    `fvlm evaluate --store-thresholds` writes them): same weights, so the store stays usable."""
    from fvlm_core.calibration import Calibration
    from fvlm_training.stored_thresholds import store_thresholds

    copy = tmp_path / "calibrated"
    shutil.copytree(model, copy)
    cal = Calibration(method="platt", a=2.0, b=-0.3, n=40, n_positive=12)
    store_thresholds(copy, {"Pleural effusion": 0.55}, calibration={"Pleural effusion": cal})
    return copy


def test_query_equals_analyze_on_the_same_scans(store_dir, cohort, tiny_model_dir, tmp_path):
    model = _calibrated_copy(tiny_model_dir, tmp_path)
    prompts = tmp_path / "mine.yaml"
    prompts.write_text("- {name: Dense spot, anatomy: lung, positive: [Dense spot.], negative: [No spot.]}\n")
    out = tmp_path / "q.csv"
    argv = ["query", str(store_dir), "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    with open(out, newline="") as fh:
        rows = {(r["scan"], r["anatomy"], r["finding"]): r for r in csv.DictReader(fh)}
    data, masks = cohort
    compared = 0
    for i in (0, 5):  # p005: its heart is absent
        scan = f"p{i:03d}"
        res = tmp_path / f"{scan}.json"
        ct, seg = data / f"{scan}.nii.gz", masks / f"{scan}.nii.gz"
        assert main(["analyze", str(ct), "--segmentation", str(seg), "--model", str(model), "--prompts",
                     str(prompts), "--device", "cpu", "--out", str(res), "--quiet"]) == 0  # fmt: skip
        for a in json.loads(res.read_text())["anatomies"]:
            for f in a["findings"]:
                r = rows[(scan, a["name"], f["name"])]
                assert r["scale"] == f["scale"] and r["threshold_source"] == f["threshold_source"]
                assert r["calibration"] == f["calibration"] and r["flagged"] == str(f["flagged"]).lower()
                assert float(r["threshold"]) == pytest.approx(f["threshold"], abs=1e-6)
                if f["raw_score"] is None:
                    assert r["raw_score"] == r["value"] == "" and a["name"] == "heart" and i == 5
                    continue
                assert float(r["raw_score"]) == pytest.approx(f["raw_score"], abs=1e-5)
                assert float(r["value"]) == pytest.approx(f["value"], abs=1e-5)
                compared += 1
    assert compared == 2 * 17 - 3  # 16 findings + Dense spot, less p005's three heart findings
    pe = rows[("p000", "lung", "Pleural effusion")]
    assert pe["scale"] == "probability" and pe["probability"] != ""
    assert rows[("p000", "lung", "Dense spot")]["scale"] == "uncalibrated score"


def test_search_ranks_the_scan_itself_first(store_dir, tiny_model_dir, tmp_path, capsys):
    from fvlm_core.store.format import EmbeddingStore
    from fvlm_core.store.search import VectorIndex, search_like, search_text
    from fvlm_core.zeroshot.analyzer import Analyzer

    store = EmbeddingStore.open(store_dir)
    for anatomy in ANATOMIES:
        ids, matrix = store.vectors(anatomy)
        index = VectorIndex.build(matrix)
        for scan in ids:
            exact = search_like(store, scan, anatomy, k=3, method="exact")
            assert exact[0].scan == scan and exact[0].score == pytest.approx(1.0, abs=1e-5)
            assert [m.rank for m in exact] == [1, 2, 3] and exact[0].reachable
            assert exact[0].score >= exact[1].score >= exact[2].score
            idx, _ = index.search(matrix[list(ids).index(scan)], 1)
            assert ids[idx[0]] == scan
    an = Analyzer.from_pretrained(tiny_model_dir, device="cpu")
    by_text = search_text(store, an, "Large right pleural effusion.", "lung", k=N_SCANS)
    assert sorted(m.scan for m in by_text) == store.scans()
    out = tmp_path / "m.json"
    assert (
        main(["search", str(store_dir), "--like", "p002", "--anatomy", "heart", "-k", "2", "--out", str(out)])
        == 0
    )
    assert "p002" in capsys.readouterr().out.splitlines()[0]
    assert json.loads(out.read_text())["matches"][0]["scan"] == "p002"
    # a CT on disk is embedded with the store's model and finds its own scan
    assert main(["search", str(store_dir), "--like", by_text[0].source, "--anatomy", "lung", "-k", "1",
                 "--segmentation", by_text[0].source.replace("/data/", "/masks/")]) == 0  # fmt: skip
    assert by_text[0].scan in capsys.readouterr().out


def test_another_models_store_is_refused(store_dir, cohort, tiny_model_dir, tmp_path, capsys):
    import torch

    from fvlm_core.model import FVLM

    torch.manual_seed(1)
    other = tmp_path / "other"
    FVLM.from_config("fvlm-tiny").save_pretrained(other)
    q = tmp_path / "q.csv"
    assert main(["query", str(store_dir), "--model", str(other), "--out", str(q)]) == 2
    err = capsys.readouterr().err
    assert "embeddings are of model fvlm-tiny" in err and "never mixes models" in err and not q.exists()
    assert main(["search", str(store_dir), "--text", "x.", "--anatomy", "lung", "--model", str(other)]) == 2
    assert "never mixes models" in capsys.readouterr().err
    before = sorted(p.name for p in (store_dir / "parts").iterdir())
    assert _embed(cohort, other, store_dir) == 2
    assert "cannot add to it" in capsys.readouterr().err
    assert _embed(cohort, tiny_model_dir, store_dir, "--windows", "centred") == 2
    assert "made with shared windows, not centred" in capsys.readouterr().err
    assert sorted(p.name for p in (store_dir / "parts").iterdir()) == before


def test_killed_run_resumes_without_encoding_again(cohort, tiny_model_dir, store_dir, tmp_path, monkeypatch):
    """A run that dies after 3 scans (no cleanup: as a kill leaves it) keeps them in its journal;
    the re-run encodes only the other 3 and the store equals one made in one go."""
    import fvlm_core.store.encode as encode
    from fvlm_training import embed

    calls = []
    real = encode.encode_windows

    def dies_after_three(analyzer, prepared):
        if len(calls) == 3:
            raise SystemExit("killed")  # BaseException: nothing of the run's own cleanup folds it
        calls.append(1)
        return real(analyzer, prepared)

    monkeypatch.setattr(encode, "encode_windows", dies_after_three)
    out = tmp_path / "resumed.store"
    with pytest.raises(SystemExit):
        _embed(cohort, tiny_model_dir, out)
    journal = out / "_journal" / "shard-0of1.jsonl"
    assert len(journal.read_text().splitlines()) == 1 + 3 and not (out / "parts").exists()
    monkeypatch.setattr(encode, "encode_windows", real)
    counted = []
    monkeypatch.setattr(embed, "ScanDataset", _counting(embed.ScanDataset, counted))
    assert _embed(cohort, tiny_model_dir, out) == 0
    assert counted == [N_SCANS - 3] and not journal.exists()
    assert _same_rows(_sorted_rows(out), _sorted_rows(store_dir))
    counted.clear()
    assert _embed(cohort, tiny_model_dir, out) == 0 and counted == [0]  # all stored: nothing to do


def _counting(cls, counted):
    class Counting(cls):
        def __init__(self, source, names, *a, **k):
            counted.append(len(names))
            super().__init__(source, names, *a, **k)

    return Counting


def _same_rows(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    for key, ra in a.items():
        rb = b[key]
        for col, va in ra.items():
            if col == "embedding" and va is not None:
                np.testing.assert_allclose(
                    np.frombuffer(va, "<f4"), np.frombuffer(rb[col], "<f4"), atol=1e-6, err_msg=str(key)
                )
            else:
                assert va == rb[col], (key, col)
    return True


def test_sigkill_mid_run_loses_at_most_the_scan_in_flight(cohort, tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "killed.store"
    data, masks = cohort
    argv = [sys.executable, "-m", "fvlm_training.cli", "embed", str(data), "--masks", str(masks), "--model",
            str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--workers", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "_journal" / "shard-0of1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 2:  # header + one scan
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "_embed").exists(), (
        "the run ended before the kill"
    )
    kept = len(journal.read_bytes().splitlines()) - 1
    assert 1 <= kept < N_SCANS
    assert _embed(cohort, tiny_model_dir, out) == 0
    assert _same_rows(_sorted_rows(out), _sorted_rows(store_dir))


@pytest.mark.distributed
def test_torchrun_two_ranks_give_the_store_of_one_process(cohort, tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "ranks.store"
    data, masks = cohort
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fvlm_training.cli",
            "embed", str(data), "--masks", str(masks), "--model", str(tiny_model_dir), "--out", str(out),
            "--device", "cpu", "--workers", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert [p.split("-")[1] for p in parts] == ["0of2", "1of2"]  # each rank wrote its own part
    assert _same_rows(_sorted_rows(out), _sorted_rows(store_dir))


def test_shards_cover_every_scan_once(cohort, tiny_model_dir, store_dir, tmp_path):
    out = tmp_path / "sharded.store"
    for i in range(3):
        assert _embed(cohort, tiny_model_dir, out, "--shard", f"{i}/3") == 0
    assert _same_rows(_sorted_rows(out), _sorted_rows(store_dir))


def test_evaluate_embeddings_equals_evaluate_data(cohort, tiny_model_dir, store_dir, tmp_path):
    data, masks = cohort
    common = ["--n-bootstrap", "20", "--no-plots", "--device", "cpu"]
    a, b = tmp_path / "from_store", tmp_path / "from_data"
    assert main(["evaluate", "--embeddings", str(store_dir), "--out", str(a), *common]) == 0
    assert main(["evaluate", "--data", str(data), "--masks", str(masks), "--model", str(tiny_model_dir),
                 "--windows", "shared", "--out", str(b), *common]) == 0  # fmt: skip
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["labels"].keys() == mb["labels"].keys() == {"Pleural effusion", "Cardiomegaly", "Emphysema"}
    for lbl, r in ma["labels"].items():
        assert r["auc"] == pytest.approx(mb["labels"][lbl]["auc"], abs=1e-9)
        assert r["threshold"] == pytest.approx(mb["labels"][lbl]["threshold"], abs=1e-9)
    with open(a / "scores.csv") as fa, open(b / "scores.csv") as fb:
        sa, sb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    for ra, rb in zip(sa, sb, strict=True):
        assert ra["VolumeName"] == rb["VolumeName"]
        for k in ra.keys() - {"VolumeName"}:
            assert (ra[k] == rb[k] == "") or float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-5)
    retrieval = ma["retrieval"]
    assert retrieval["report_to_volume"]["whole_scan"]["n"] == N_SCANS
    assert set(retrieval["volume_to_volume"]) >= {"whole_scan", "lung", "heart"}
    assert "Retrieval (CT-CLIP's metrics)" in (a / "report.md").read_text()


def test_bad_and_empty_inputs_are_refused_clearly(cohort, tiny_model_dir, store_dir, tmp_path, capsys):
    from fvlm_core.store.format import EmbeddingStore
    from fvlm_core.store.search import search_like

    def err(argv) -> str:
        assert main(argv) == 2, argv
        return capsys.readouterr().err

    assert "not an embedding store" in err(["query", str(tmp_path), "--out", str(tmp_path / "q.csv")])
    assert "no such embedding store" in err(
        ["query", str(tmp_path / "nope"), "--out", str(tmp_path / "q.csv")]
    )
    assert "anatomies lung, heart" in err(["search", str(store_dir), "--like", "p000", "--anatomy", "liver"])
    assert "-k 0" in err(["search", str(store_dir), "--like", "p000", "--anatomy", "lung", "-k", "0"])
    assert "neither a scan of the store nor a CT" in err(
        ["search", str(store_dir), "--like", "p999", "--anatomy", "lung"]
    )
    assert "its heart is absent or was not scored" in err(
        ["search", str(store_dir), "--like", "p005", "--anatomy", "heart"]
    )
    assert "no such folder" in err(["embed", str(tmp_path / "nodata"), "--model", str(tiny_model_dir),
                                    "--out", str(tmp_path / "s")])  # fmt: skip
    assert "--workers -1" in err(["embed", str(cohort[0]), "--model", str(tiny_model_dir), "--out",
                                  str(tmp_path / "s"), "--workers", "-1"])  # fmt: skip
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "holds other files" in err(_argv_embed(cohort, tiny_model_dir, busy))
    # an empty store (made, nothing finished) and a damaged one
    empty = tmp_path / "empty.store"
    shutil.copytree(store_dir, empty, ignore=shutil.ignore_patterns("parts", "_embed", "index"))
    assert "holds no finished scan yet" in err(["query", str(empty), "--out", str(tmp_path / "q.csv")])
    with pytest.raises(DataError, match="holds no finished scan yet"):
        search_like(EmbeddingStore.open(empty), "p000", "lung")
    (empty / "store.json").write_text("{")
    assert "unreadable" in err(["query", str(empty), "--out", str(tmp_path / "q.csv")])
    with pytest.raises(ConfigError, match="the store's model has the anatomies"):
        search_like(EmbeddingStore.open(store_dir), "p000", "liver")
    with pytest.raises(DataError, match="values; the store's embeddings have"):
        search_like(EmbeddingStore.open(store_dir), np.ones(3, dtype=np.float32), "lung")


def _argv_embed(cohort, model, out):
    data, masks = cohort
    return [
        "embed",
        str(data),
        "--masks",
        str(masks),
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
