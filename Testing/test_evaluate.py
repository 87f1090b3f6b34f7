"""`fvlm evaluate` on a fixed score table: numbers equal hand-computed ones; files written."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fvlm_training import evaluate
from fvlm_training.cli import main
from fvlm_training.label_tables import read_label_table, read_score_table
from fvlm_training.protocol import (
    CalibrationSource,
    calibrate_report,
    describe_split,
    evaluate_scores,
    one_per_scan,
)
from fvlm_training.score_journal import JOURNAL_DIR
from fvlm_training.stored_thresholds import store_thresholds
from fvlm_training.volume_source import VolumeSource

# Same worked example as test_metrics: AUC 13/16, reference threshold 69/99 -> TP 3, FN 1, FP 0, TN 4.
Y = [0, 0, 0, 1, 1, 1, 0, 1]
S = [0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.6, 0.9]
NAMES = [f"valid_{i}_a_1.nii.gz" for i in range(1, 9)]


def _write_csv(path, columns: dict) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(columns))
        w.writerows(zip(*columns.values()))


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _tables(tmp_path):
    # Cardiomegaly: one volume not scored (empty cell). Its label is 1, so counting it as 0 (reference)
    # or leaving it out (strict) changes the numbers in a way we can compute by hand.
    card_s = [0.2, 0.3, 0.1, 0.9, 0.8, "", 0.4, 0.7]
    card_y = [0, 0, 0, 1, 1, 1, 0, 1]
    _write_csv(tmp_path / "scores.csv", {"VolumeName": NAMES, "Emphysema": S, "Cardiomegaly": card_s})
    _write_csv(
        tmp_path / "labels.csv",
        {
            "VolumeName": NAMES[::-1],
            "AccessionNo": ["x"] * 8,
            "Emphysema": Y[::-1],
            "Cardiomegaly": card_y[::-1],
        },
    )
    return tmp_path / "scores.csv", tmp_path / "labels.csv"


def test_reference_protocol_reproduces_hand_computed_metrics(tmp_path):
    s_csv, l_csv = _tables(tmp_path)
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--scores",
                str(s_csv),
                "--labels",
                str(l_csv),
                "--out",
                str(out),
                "--n-bootstrap",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    emph = report["labels"]["Emphysema"]
    assert emph["auc"] == pytest.approx(13 / 16)
    assert emph["threshold"] == pytest.approx(69 / 99) and emph["threshold_source"] == "roc-corner"
    assert emph["accuracy"] == pytest.approx(7 / 8)
    assert emph["precision"] == pytest.approx(1.0)
    assert emph["f1_positive"] == pytest.approx(6 / 7)
    assert emph["f1_weighted"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert emph["sensitivity"] == pytest.approx(3 / 4) and emph["specificity"] == pytest.approx(1.0)
    lo, hi = emph["auc_ci95"]
    assert lo <= 13 / 16 <= hi
    # Cardiomegaly, reference: the NaN counts as 0 -> positives 0.9, 0.8, 0.0, 0.7 vs negatives
    # 0.2, 0.3, 0.1, 0.4: 12 of 16 pairs ranked right.
    card = report["labels"]["Cardiomegaly"]
    assert card["auc"] == pytest.approx(12 / 16) and card["n_missing"] == 1 and card["n"] == 8
    # macro over the fVLM labels present: mean of both
    assert report["macro"]["fvlm16"]["auc"] == pytest.approx((13 / 16 + 12 / 16) / 2)
    assert report["macro"]["fvlm16"]["n_labels"] == 2
    assert "ctrate18" not in report["macro"]
    assert report["split"]["n_volumes"] == 8 and report["split"]["n_scans"] == 8
    md = (out / "report.md").read_text()
    assert "Emphysema" in md and "0.812" in md and "reference" in md
    assert (out / "roc_all.png").stat().st_size > 0 and (out / "roc" / "emphysema.png").exists()


def test_strict_protocol_uses_fixed_thresholds_and_drops_unscored(tmp_path):
    s_csv, l_csv = _tables(tmp_path)
    names, scores = read_score_table(s_csv)
    truth = read_label_table(l_csv, names)
    with pytest.raises(Exception, match="threshold fixed beforehand"):
        evaluate_scores(scores, truth, names, "strict", {"Emphysema": 0.5})
    rep = evaluate_scores(
        scores, truth, names, "strict", {"Emphysema": 0.65, "Cardiomegaly": 0.5}, n_bootstrap=0
    )
    e = rep.per_label["Emphysema"]
    assert e.threshold_source == "fixed" and e.at_threshold.accuracy == pytest.approx(7 / 8)
    c = rep.per_label["Cardiomegaly"]
    # the unscored volume is left out: 7 volumes, perfectly separated at 0.5
    assert c.n == 7 and c.n_missing == 1 and c.auc == pytest.approx(1.0) and c.at_threshold.accuracy == 1.0


def test_thresholds_stored_into_model_config(tmp_path):
    from fvlm_core.model.config import FVLMConfig, load_config

    model_dir = tmp_path / "model"
    FVLMConfig().save(model_dir / "config.yaml")
    path = store_thresholds(model_dir, {"Emphysema": 0.7, "Cardiomegaly": float("nan")}, source="test")
    cfg = load_config(model_dir)
    assert cfg.thresholds == {"Emphysema": 0.7} and path.name == "config.yaml"
    with pytest.raises(Exception, match=r"config\.yaml"):
        store_thresholds(tmp_path / "nothing", {"Emphysema": 0.5})


def _miscalibrated_table(tmp_path, n: int = 600, seed: int = 0):
    """A score table whose scores rank well but are overconfident (P(finding) = sigmoid(0.3 z + 0.5)
    for a score sigmoid(z)), and its labels; Cardiomegaly has only 6 positives."""
    from scipy.special import expit

    rng = np.random.default_rng(seed)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(1, n + 1)]
    z = rng.normal(-2.0, 8.0, (2, n))
    y = (rng.random((2, n)) < expit(0.3 * z + 0.5)).astype(int)
    y[1] = 0
    y[1, np.argsort(z[1])[-6:]] = 1
    s = expit(z).astype(np.float32)
    _write_csv(tmp_path / "scores.csv", {"VolumeName": names, "Emphysema": s[0], "Cardiomegaly": s[1]})
    _write_csv(tmp_path / "labels.csv", {"VolumeName": names, "Emphysema": y[0], "Cardiomegaly": y[1]})
    return tmp_path / "scores.csv", tmp_path / "labels.csv"


def test_store_thresholds_fits_and_stores_calibration_checked_by_cross_fitting(tmp_path):
    from fvlm_core.model.config import FVLMConfig, load_config

    s_csv, l_csv = _miscalibrated_table(tmp_path)
    model_dir = tmp_path / "model"
    FVLMConfig().save(model_dir / "config.yaml")
    out = tmp_path / "report"
    argv = ["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--model", str(model_dir)]
    assert main([*argv, "--out", str(out), "--n-bootstrap", "0", "--store-thresholds"]) == 0
    rep = json.loads((out / "metrics.json").read_text())["calibration"]
    emph, card = rep["labels"]["Emphysema"], rep["labels"]["Cardiomegaly"]
    assert emph["checked_on"] == "cross-fitted" and emph["method"] in ("platt", "isotonic")
    assert emph["auc_calibrated"] == emph["auc_raw"] and emph["same_decisions"]  # the ranking is kept
    assert (
        emph["brier_calibrated"] < 0.9 * emph["brier_raw"] and emph["ece_calibrated"] < 0.5 * emph["ece_raw"]
    )
    assert card["method"] == "none" and "only 6 positives" in card["reason"]
    assert card["brier_calibrated"] == card["brier_raw"]
    md = (out / "report.md").read_text()
    assert "## Calibration (raw score -> probability)" in md and "5-fold cross-fitting" in md
    assert f"- Cardiomegaly: {card['reason']}" in md
    assert (out / "reliability_all.png").stat().st_size > 0 and (
        out / "reliability" / "emphysema.png"
    ).exists()
    # stored beside the thresholds; the calibrated threshold keeps the decisions of the raw one
    cfg = load_config(model_dir)
    from fvlm_core.calibration import from_config

    stored = from_config(cfg.calibration)
    assert set(stored) == {"Emphysema", "Cardiomegaly"} and stored["Emphysema"].method == emph["method"]
    assert stored["Emphysema"].probability(cfg.thresholds["Emphysema"]) == pytest.approx(
        emph["threshold_calibrated"]
    )
    # evaluated again without storing: the stored calibration is what is checked
    assert main([*argv, "--out", str(tmp_path / "again"), "--n-bootstrap", "0", "--no-plots"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["calibration"]["labels"]
    assert again["Emphysema"]["checked_on"] == "stored calibration"
    assert again["Emphysema"]["brier_calibrated"] <= emph["brier_calibrated"]  # in-sample now
    assert not (tmp_path / "again" / "reliability_all.png").exists()


def _tree(root) -> dict[str, bytes | None]:
    """Every path below ``root`` (hidden temporaries too) and its bytes (None: a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_bad_outputs_are_refused_before_any_work(tmp_path, capsys):
    """Issue 16: the outputs are checked first (the missing model and data are never reached)."""
    s_csv, l_csv = _tables(tmp_path)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "old" / "metrics.json").mkdir(parents=True)  # a folder where the report's file goes
    from fvlm_core.model.config import FVLMConfig

    FVLMConfig().save(tmp_path / "model" / "config.yaml")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    work = ["evaluate", "--data", str(tmp_path / "no-data"), "--model", str(tmp_path / "no-model")]
    cases = [
        ([*work, "--out", str(tmp_path / "afile")], "is an existing file"),
        ([*work, "--out", str(tmp_path / "afile" / "report")], "is a file, not a folder"),
        ([*work, "--out", str(tmp_path / "old")], "--out (metrics.json)"),
        (["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--out", str(s_csv)], "is the input --scores"),
        (
            ["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--model", str(tmp_path / "model"),
             "--store-thresholds", "--out", str(tmp_path / "model")],
            "is the input --model",
        ),
        (
            ["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--model", str(tmp_path / "model"),
             "--store-thresholds", "--out", str(tmp_path / "model" / "model.safetensors")],
            "is the input --model",
        ),
        (["evaluate", *work[1:], "--store-thresholds", "--out", str(tmp_path / "r")], "no config.yaml"),
    ]  # fmt: skip
    before = _tree(tmp_path)
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert _tree(tmp_path) == before


def test_report_and_stored_thresholds_are_written_all_or_none(tmp_path, capsys):
    """A file size limit (as a full disk) stops the report's plots: neither the earlier report in
    ``--out`` nor the model's config.yaml changes, and no temporary file is left; without the
    limit both are written."""
    resource = pytest.importorskip("resource")
    import signal

    from fvlm_core.model.config import FVLMConfig, load_config

    s_csv, l_csv = _miscalibrated_table(tmp_path, n=200)
    FVLMConfig().save(tmp_path / "model" / "config.yaml")
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text("an earlier report")
    argv = ["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--model", str(tmp_path / "model")]
    argv += ["--out", str(out), "--n-bootstrap", "0", "--store-thresholds"]
    before = _tree(tmp_path)
    limit = max(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) + 1000  # inputs stay readable
    old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))  # metrics.json fits, a PNG does not
    try:
        rc = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert _tree(tmp_path) == before
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["calibration"]["labels"]["Emphysema"]["n"] == 200
    assert set(load_config(tmp_path / "model").thresholds) == {"Emphysema", "Cardiomegaly"}
    assert not [p for p in tmp_path.rglob(".*")]  # no staging folder or temporary file left


def test_calibration_split_is_fitted_there_and_checked_on_the_evaluated_set(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "test").mkdir()
    cal_names, cal_scores = read_score_table(_miscalibrated_table(tmp_path / "cal", 600, 1)[0])
    cal_truth = read_label_table(tmp_path / "cal" / "labels.csv", cal_names)
    names, scores = read_score_table(_miscalibrated_table(tmp_path / "test", 600, 2)[0])
    truth = read_label_table(tmp_path / "test" / "labels.csv", names)
    rep = evaluate_scores(
        scores, truth, names, "strict", {"Emphysema": 0.3, "Cardiomegaly": 0.5}, n_bootstrap=0
    )
    calibrate_report(rep, scores, truth, CalibrationSource(cal_scores, cal_truth))
    c = rep.calibration["Emphysema"]
    assert (
        c.checked_on == "held-out split" and c.auc_calibrated == c.auc_raw == rep.per_label["Emphysema"].auc
    )
    assert c.brier_calibrated < c.brier_raw and c.ece_calibrated < c.ece_raw and c.same_decisions
    assert c.threshold_raw == 0.3 and c.threshold_calibrated == pytest.approx(
        rep.calibrations["Emphysema"].probability(0.3)
    )
    assert rep.calibrations["Emphysema"].n == 600  # fitted on the calibration split


def test_split_description():
    vols = [f"valid_{i}_a_{r}" for i in range(1, 4) for r in (1, 2)]
    d = describe_split(vols)
    assert (d["n_volumes"], d["n_scans"]) == (6, 3)
    assert one_per_scan(vols) == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    assert describe_split(["valid_12_b_2.nii.gz", "valid_12_b_1.nii.gz"])["n_scans"] == 1


# ---------------------------------------------------------------- scoring a dataset with a model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    FVLM.from_config("fvlm-tiny").save_pretrained(d)
    return d


def test_evaluate_ctrate_layout_then_analyze_uses_stored_thresholds(tiny_model_dir, tmp_path):
    from fvlm_core.data.ctrate_volume import read_ctrate_volume
    from fvlm_core.data.layout import volume_relpath
    from fvlm_core.data.synth import generate_cohort
    from fvlm_core.findings import FVLM_LABELS
    from fvlm_core.segmentation import get_backend
    from fvlm_core.zeroshot.analyzer import Analyzer

    data = tmp_path / "cohort"
    generate_cohort(
        data, 10, 3, size_zyx=(32, 32, 32), valid_fraction=0.5, prevalence={"Pleural effusion": 0.5}
    )
    out = tmp_path / "report"
    argv = ["evaluate", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--n-bootstrap", "20", "--device", "cpu", "--store-thresholds", "--no-plots"]
    assert main(argv) == 0
    rep = json.loads((out / "metrics.json").read_text())
    rows = _read_csv(out / "scores.csv")
    n_valid = len(_read_csv(data / "multi_abnormality_labels" / "valid_predicted_labels.csv"))
    assert rep["split"]["n_volumes"] == n_valid == len(rows)
    assert set(rep["labels"]) == set(FVLM_LABELS)
    probs = np.array([[float(r[lbl]) for lbl in FVLM_LABELS] for r in rows])
    assert probs.min() > 0 and probs.max() < 1
    # the written table reads back unchanged (the --scores path)
    names, back = read_score_table(out / "scores.csv")
    assert names == [r["VolumeName"] for r in rows]
    assert back["Pleural effusion"].tolist() == [float(r["Pleural effusion"]) for r in rows]
    # the stored thresholds are what analyze then uses
    an = Analyzer.from_pretrained(tiny_model_dir, device="cpu")
    chosen = {k: v["threshold"] for k, v in rep["labels"].items() if v["threshold_source"] == "roc-corner"}
    assert "Pleural effusion" in chosen and an.config.thresholds == pytest.approx(chosen)
    name = rows[0]["VolumeName"]  # as in the CT-RATE CSVs: valid_1_a_1.nii.gz
    assert name.endswith(".nii.gz")
    meta = {r["VolumeName"]: r for r in _read_csv(data / "metadata" / "validation_metadata.csv")}
    rel = volume_relpath(name)
    ct = read_ctrate_volume(data / "dataset" / "valid" / rel, meta[name])
    seg = get_backend("labelmap", path=data / "anatomy_masks" / "valid" / rel, class_map="anatomy")
    from fvlm_core.anatomy import EXTENDED_CATALOG

    res = an.analyze(
        ct, seg.segment(ct, EXTENDED_CATALOG.subset(EXTENDED_CATALOG.names[:5])), similarity_maps=False
    )
    f = res.finding("lung", "Pleural effusion")
    assert f.threshold_source == "calibrated" and f.threshold == pytest.approx(
        rep["labels"]["Pleural effusion"]["threshold"]
    )
    # reference windows (evaluate) and shared windows (analyze) see the same anatomy: scores agree closely
    assert f.raw_score == pytest.approx(float(rows[0]["Pleural effusion"]), abs=0.05)
    # a handful of volumes cannot be calibrated: stored as "raw score kept", shown as uncalibrated scores
    assert an.config.calibration["Pleural effusion"]["method"] == "none"
    assert f.scale == "uncalibrated score" and "raw score kept" in f.calibration_note


def _cache(model_dir, cache, n: int = 6):
    """A `fvlm prepare` cache of ``n`` phantoms in the model's space (every other has Cardiomegaly)."""
    from fvlm_core.data.cache import CachedSample, save_sample
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.io import CTVolume, LabelVolume
    from fvlm_core.model.config import load_config
    from fvlm_core.preprocess import resample_to_model_space

    ms = load_config(model_dir).model_space()
    for i in range(n):
        s = make_phantom(5, i, "valid", (32, 32, 32), findings=["Cardiomegaly"] if i % 2 else [])
        ct_ms, lab_ms = resample_to_model_space(
            CTVolume(s.hu.astype(np.float32), s.geometry), LabelVolume(s.labels, s.geometry), ms
        )
        save_sample(
            CachedSample(
                name=s.name, hu=ct_ms.array.astype(np.int16), labels=lab_ms.array, geometry=ct_ms.geometry,
                anatomies=["lung", "heart", "esophagus", "aorta", "trachea"], texts={}, abnormal={},
                finding_labels=s.label_row, report="",
            ),
            cache,
        )  # fmt: skip
    return cache


def test_evaluate_prepare_cache(tiny_model_dir, tmp_path, capsys):
    cache = _cache(tiny_model_dir, tmp_path / "cache")
    out = tmp_path / "rep"
    assert main(["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--out", str(out),
                 "--n-bootstrap", "10", "--no-plots", "--windows", "shared"]) == 0  # fmt: skip
    rep = json.loads((out / "metrics.json").read_text())
    card = rep["labels"]["Cardiomegaly"]
    assert card["n"] == 6 and card["n_positive"] == 3 and card["n_missing"] == 0
    # the reference protocol's default windows are eval.py's, which a cache cannot reproduce
    # (HU rounded and floored at -1024): refused with the reason, before anything is written
    refused = tmp_path / "refused"
    assert (
        main(["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--out", str(refused)]) == 2
    )
    err = capsys.readouterr().err
    assert "prepare` cache" in err and "-1024" in err and "--windows centred" in err
    assert not refused.exists()
    # strict: a calibration split that is the evaluated set is in-sample: refused before any work
    # (the report would call the calibration "checked on the evaluated set (held out)")
    strict = tmp_path / "strict"
    argv = ["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--out", str(strict),
            "--protocol", "strict", "--n-bootstrap", "10", "--no-plots"]  # fmt: skip
    assert main([*argv, "--calibration", str(cache)]) == 2
    err = capsys.readouterr().err
    assert f"--calibration {cache} and --data {cache} share 6 volume(s)" in err and "in-sample" in err
    assert not strict.exists()
    # with another split (here the same phantoms copied: a stand-in): the project's centred windows
    import shutil

    shutil.copytree(cache, tmp_path / "calibration")
    assert main([*argv, "--calibration", str(tmp_path / "calibration")]) == 0
    assert json.loads((strict / "metrics.json").read_text())["meta"]["windows"] == "centred"


def test_layout_masks_are_read_as_prepare_reads_them(tmp_path):
    """Evaluate reads a CT-RATE layout's masks as `fvlm prepare` does: the class_map.json beside
    them names their values (here in another order than the anatomy catalogue's)."""
    import SimpleITK as sitk

    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.data.ctrate import CTRATEReader, make_segmenter
    from fvlm_core.data.layout import volume_stem
    from fvlm_core.data.synth import MASK_VALUES, generate_cohort, iter_cohort

    data = tmp_path / "cohort"
    kw = dict(size_zyx=(24, 24, 24), valid_fraction=0.5, recon_fraction=0.0)
    generate_cohort(data, 4, 7, **kw)
    lut = np.arange(256, dtype=np.uint8)
    lut[1:6] = [5, 4, 3, 2, 1]  # lung 1 -> 5, ..., trachea 5 -> 1
    for path in (data / "anatomy_masks").rglob("*.nii.gz"):
        img = sitk.ReadImage(str(path))
        permuted = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(img)])
        permuted.CopyInformation(img)
        sitk.WriteImage(permuted, str(path), useCompression=True)
    class_map = {str(lut[v]): name for name, v in MASK_VALUES.items()}
    (data / "anatomy_masks" / "class_map.json").write_text(json.dumps(class_map))

    source = VolumeSource(data, CTRATE_CATALOG.names)
    truth = {s.name: s for s in iter_cohort(4, 7, **kw)}
    reader = CTRATEReader(data, "valid")
    prepare_reads = make_segmenter("labelmap", CTRATE_CATALOG, masks_dir=reader.masks_dir)
    assert source.names and len(source) == len(reader.records)
    for name in source.names:
        _, labels, found = source.load(name)
        want = truth[volume_stem(name)]
        np.testing.assert_array_equal(labels.array, np.where(want.labels == 5, 0, want.labels))
        record = reader.get(name)
        np.testing.assert_array_equal(labels.array, prepare_reads(reader.read_ct(record), record))
        assert found == want.label_row

    # a listed volume missing on disk stops the evaluation before it starts, naming the volume
    missing = reader.records[0]
    missing.path.unlink()
    with pytest.raises(Exception, match=f"{missing.name}: listed in the metadata but no file"):
        VolumeSource(data, CTRATE_CATALOG.names)


# ---------------------------------------------------------------- keeping the scores (issue 25)

#: Runs `fvlm evaluate` in another process whose third volume never finishes encoding, so that
#: the test can kill it (SIGKILL, as the OOM killer or a scheduler does) after two volumes.
_STALLING_EVALUATE = """
import sys, time
from fvlm_core.zeroshot.analyzer import Analyzer
encode, calls = Analyzer.encode_model_space, []
def stalling(self, *args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
        time.sleep(600)
    return encode(self, *args, **kwargs)
Analyzer.encode_model_space = stalling
from fvlm_training import evaluate
from fvlm_training.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def count_encodes(monkeypatch):
    """The volumes encoded in this process (Analyzer.encode_model_space calls)."""
    from fvlm_core.zeroshot.analyzer import Analyzer

    calls: list[str] = []
    encode = Analyzer.encode_model_space

    def counted(self, ct, *args, **kwargs):
        calls.append(ct.source)
        return encode(self, ct, *args, **kwargs)

    monkeypatch.setattr(Analyzer, "encode_model_space", counted)
    return calls


def _journal_lines(path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def test_killed_evaluate_resumes_without_encoding_again(tiny_model_dir, tmp_path, count_encodes, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = _cache(tiny_model_dir, tmp_path / "cache", n=4)
    out = tmp_path / "rep"
    argv = ["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--windows", "shared"]
    argv += ["--n-bootstrap", "10", "--no-plots", "--device", "cpu", "--out", str(out)]
    journal = out / JOURNAL_DIR / "data.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_EVALUATE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_journal_lines(journal)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = _journal_lines(journal)
    assert [e.get("item") for e in killed[1:]] == ["valid_1_a_1", "valid_2_a_1"]
    assert not (out / "metrics.json").exists() and not (out / "scores.csv").exists()
    with open(journal, "ab") as fh:  # as a kill in the middle of writing the next line leaves it
        fh.write(b'{"item":"valid_3_a_1","record":{"scores":{"Cardiom')

    assert main(argv) == 0
    assert sorted(Path(c).name for c in count_encodes) == ["valid_3_a_1", "valid_4_a_1"]  # only these
    assert "2 of 4 volume(s) scored earlier" in capsys.readouterr().out
    rows = _read_csv(out / "scores.csv")
    assert [r["VolumeName"] for r in rows] == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1", "valid_4_a_1"]
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["labels"]["Cardiomegaly"]["n"] == 4 and rep["labels"]["Cardiomegaly"]["n_positive"] == 2
    # the kept scores are those a run without the kill computes
    fresh = tmp_path / "fresh"
    assert main([*argv[:-1], str(fresh), "--limit", "2"]) == 0
    for a, b in zip(_read_csv(fresh / "scores.csv"), rows[:2]):
        assert a["VolumeName"] == b["VolumeName"]
        assert {k: float(v) for k, v in a.items() if k != "VolumeName"} == pytest.approx(
            {k: float(v) for k, v in b.items() if k != "VolumeName"}, abs=1e-6
        )
    # a second re-run encodes nothing at all
    count_encodes.clear()
    assert main(argv) == 0 and count_encodes == []


def test_a_rerun_with_another_model_or_prompts_is_refused_before_encoding(
    tiny_model_dir, tmp_path, count_encodes, capsys
):
    import shutil

    import torch
    import yaml

    from fvlm_core.model import FVLM

    cache = _cache(tiny_model_dir, tmp_path / "cache", n=2)
    out = tmp_path / "rep"
    common = ["evaluate", "--data", str(cache), "--windows", "shared", "--n-bootstrap", "0", "--no-plots"]
    assert main([*common, "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    journal = out / JOURNAL_DIR / "data.jsonl"
    kept = journal.read_bytes()
    count_encodes.clear()
    # the same weights with one prompt worded otherwise
    reworded = tmp_path / "reworded"
    shutil.copytree(tiny_model_dir, reworded)
    cfg = yaml.safe_load((reworded / "config.yaml").read_text())
    from fvlm_core.model.config import load_config

    findings = [
        {"name": f.name, "anatomy": f.anatomy, "positive": list(f.positive), "negative": list(f.negative)}
        for f in load_config(tiny_model_dir).finding_set()
    ]
    findings[0]["positive"] = ["a rather different wording"]
    cfg["findings"] = findings
    (reworded / "config.yaml").write_text(yaml.safe_dump(cfg))
    # other weights
    torch.manual_seed(1)
    retrained = tmp_path / "retrained"
    FVLM.from_config("fvlm-tiny").save_pretrained(retrained)
    for model, differs in ((reworded, "prompts"), (retrained, "model weights (sha256)")):
        assert main([*common, "--model", str(model), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{journal} holds per-volume scores of {cache}" in err and differs in err, err
        assert "from another run" in err and "another output folder" in err and "Traceback" not in err
        assert count_encodes == [] and journal.read_bytes() == kept
    # thresholds and calibrations stored into the config do not change the scores: continued
    assert main([*common, "--model", str(tiny_model_dir), "--out", str(out), "--store-thresholds"]) == 0
    assert main([*common, "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert count_encodes == []


def test_a_failure_after_scoring_keeps_the_scores_and_says_what_failed(
    tiny_model_dir, tmp_path, count_encodes, capsys, monkeypatch
):
    cache = _cache(tiny_model_dir, tmp_path / "cache", n=3)
    out = tmp_path / "rep"
    argv = ["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--windows", "shared"]
    argv += ["--n-bootstrap", "0", "--no-plots", "--out", str(out)]

    def broken(*args, **kwargs):
        raise ValueError("isotonic knots must lie in (0, 1) and be strictly increasing")

    monkeypatch.setattr(evaluate, "calibrate_report", broken)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "calibration failed (ValueError: isotonic knots" in err
    assert (
        f"scores of all 3 volumes are kept: {out / 'scores.csv'}" in err and "Re-run the same command" in err
    )
    assert (
        len(_read_csv(out / "scores.csv")) == 3 and len(_journal_lines(out / JOURNAL_DIR / "data.jsonl")) == 4
    )
    assert not (out / "metrics.json").exists() and len(count_encodes) == 3
    # fixed: the same command continues from the scores
    monkeypatch.undo()
    count_encodes.clear()
    from fvlm_core.zeroshot.analyzer import Analyzer

    monkeypatch.setattr(Analyzer, "encode_model_space", lambda *a, **k: count_encodes.append(a) or 1 / 0)
    assert main(argv) == 0 and count_encodes == []
    assert json.loads((out / "metrics.json").read_text())["labels"]["Cardiomegaly"]["n"] == 3


def test_labels_are_checked_before_any_work_by_one_rule_for_every_layout(tmp_path, monkeypatch):
    """A label of 2, -1 or 0.5 (or text) is refused before anything is scored, naming each row
    and column; an empty cell or NA is a missing label: that volume is left out of that finding,
    never counted as a negative. The same rule for a CT-RATE layout and a --labels score table
    (the cohort and RAD-ChestCT readers: test_cohort.py, test_radchest.py)."""
    from fvlm_core.data.synth import generate_cohort
    from fvlm_core.errors import DataError
    from fvlm_core.zeroshot import analyzer

    # --scores with --labels: Emphysema's row 3 unknown (empty), row 5 NA
    y = [str(v) for v in Y]
    y[2], y[4] = "", "NA"
    _write_csv(tmp_path / "scores.csv", {"VolumeName": NAMES, "Emphysema": S})
    _write_csv(tmp_path / "labels.csv", {"VolumeName": NAMES, "Emphysema": y, "Note": ["free text"] * 8})
    names, scores = read_score_table(tmp_path / "scores.csv")
    truth = read_label_table(tmp_path / "labels.csv", names)
    assert np.isnan(truth["Emphysema"][[2, 4]]).all() and list(truth) == ["Emphysema"]
    rep = evaluate_scores(scores, truth, names, n_bootstrap=0)
    kept = [i for i in range(8) if i not in (2, 4)]
    from fvlm_core.metrics import auc

    assert rep.per_label["Emphysema"].n == 6  # left out, not counted as 0
    assert rep.per_label["Emphysema"].auc == pytest.approx(auc(np.array(Y)[kept], np.array(S)[kept]))
    assert any("2 volume(s) without a label" in n for n in rep.notes)
    for bad, read in (
        ("2", None),
        ("-1", None),
        ("0.5", None),
        ("yes?", ["Emphysema"]),
    ):  # fvlm evaluate reads the scored columns
        y_bad = [str(v) for v in Y]
        y_bad[3], y_bad[6] = bad, "-1"
        _write_csv(tmp_path / "labels.csv", {"VolumeName": NAMES, "Emphysema": y_bad})
        with pytest.raises(
            DataError,
            match=rf"2 cell\(s\) are not labels, in column\(s\) 'Emphysema' \(2\): line 5 \({NAMES[3]}\), column 'Emphysema': '{re.escape(bad)}'",
        ):
            read_label_table(tmp_path / "labels.csv", names, read)

    # a CT-RATE layout: refused when the dataset is opened, before the model is loaded
    data = tmp_path / "ctrate"
    generate_cohort(data, 6, 3, size_zyx=(32, 32, 32), valid_fraction=0.5)
    labels_csv = data / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    rows = _read_csv(labels_csv)
    rows[0]["Emphysema"], rows[1]["Cardiomegaly"], rows[1]["Atelectasis"] = "2", "0.5", ""
    with open(labels_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(analyzer.Analyzer, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError) as err:
        VolumeSource(data, ["lung", "heart", "esophagus", "aorta"], "valid")
    msg = str(err.value)
    assert f"{rows[0]['VolumeName'].removesuffix('.nii.gz')}, column 'Emphysema': '2'" in msg
    assert "--split" not in msg  # not taken for another kind of folder
    assert "column 'Cardiomegaly': '0.5'" in msg and "Atelectasis" not in msg
    rows[0]["Emphysema"], rows[1]["Cardiomegaly"] = "1", "0"
    with open(labels_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    source = VolumeSource(data, ["lung", "heart", "esophagus", "aorta"], "valid")
    missing = source.truth(source.names[1])
    assert missing["Atelectasis"] is None and missing["Cardiomegaly"] == 0  # missing, not 0


def test_a_header_only_score_table_is_refused_clearly(tmp_path, capsys):
    _, l_csv = _tables(tmp_path)
    (tmp_path / "empty.csv").write_text("VolumeName,Emphysema\n")
    argv = ["evaluate", "--scores", str(tmp_path / "empty.csv"), "--labels", str(l_csv)]
    assert main([*argv, "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "empty.csv: the score table has a header but no rows" in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()


def test_the_macro_auc_says_how_many_labels_it_averages(tmp_path, capsys):
    """Cardiomegaly has one class only: no AUC. The macro AUC is Emphysema's, and the report,
    metrics.json and the console say it is over 1 of the 2 labels."""
    _write_csv(tmp_path / "scores.csv", {"VolumeName": NAMES, "Emphysema": S, "Cardiomegaly": S})
    _write_csv(tmp_path / "labels.csv", {"VolumeName": NAMES, "Emphysema": Y, "Cardiomegaly": [0] * 8})
    out = tmp_path / "rep"
    argv = ["evaluate", "--scores", str(tmp_path / "scores.csv"), "--labels", str(tmp_path / "labels.csv")]
    assert main([*argv, "--out", str(out), "--n-bootstrap", "10", "--no-plots"]) == 0
    macro = json.loads((out / "metrics.json").read_text())["macro"]["fvlm16"]
    assert (
        macro["auc"] == pytest.approx(13 / 16) and macro["n_labels"] == 2 and macro["n_defined"]["auc"] == 1
    )
    assert "| **macro fvlm16** (2 labels) | | | 0.812 over 1 |" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "macro AUC 0.812 over 1 of 2 labels (AUC undefined for 1: a single class in the data)" in printed


def test_strict_without_thresholds_is_refused_before_any_volume_is_scored(
    tiny_model_dir, tmp_path, count_encodes, capsys
):
    import shutil

    from fvlm_core.model.config import load_config

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = load_config(model)
    config.thresholds, config.calibration, config.calibrated_with = {}, {}, {}
    config.save(model / "config.yaml")
    cache = _cache(model, tmp_path / "cache", n=4)
    argv = ["evaluate", "--data", str(cache), "--model", str(model), "--protocol", "strict"]
    assert main([*argv, "--out", str(tmp_path / "rep"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--protocol strict needs a threshold fixed beforehand" in err and "Cardiomegaly" in err
    assert "stores none that was fitted on them" in err and "Nothing was scored" in err
    assert count_encodes == [] and not (tmp_path / "rep" / "scores.csv").exists()


def test_evaluate_never_writes_through_a_link_inside_out(tmp_path, capsys):
    """--out/roc is a link to a folder elsewhere: refused before any work, that folder untouched.
    A link made inside --out while the command runs is refused when the outputs are moved in."""
    from fvlm_core.errors import OutputError
    from fvlm_core.journal import ItemJournal
    from fvlm_core.outputs import OutputPlan

    s_csv, l_csv = _tables(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "emphysema.png").write_text("not a plot: someone's file")
    out = tmp_path / "rep"
    out.mkdir()
    (out / "roc").symlink_to(elsewhere, target_is_directory=True)
    assert main(["evaluate", "--scores", str(s_csv), "--labels", str(l_csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'roc'} is a symbolic link (to {elsewhere})" in err and "never writes through" in err
    assert [p.name for p in elsewhere.iterdir()] == ["emphysema.png"]
    assert (elsewhere / "emphysema.png").read_text() == "not a plot: someone's file"
    assert sorted(p.name for p in out.iterdir()) == ["roc"]  # nothing written

    plan = OutputPlan()
    plan.folder("--out", out / "maps")
    (out / "maps").mkdir()
    with pytest.raises(OutputError, match="through the symbolic link"), plan.writing() as staged:
        (staged.path("--out") / "sub").mkdir()
        (staged.path("--out") / "sub" / "emphysema.png").write_text("new")
        (out / "maps" / "sub").symlink_to(elsewhere, target_is_directory=True)  # meanwhile
    assert [p.name for p in elsewhere.iterdir()] == ["emphysema.png"]

    (out / "volume_scores").mkdir()
    (out / "volume_scores" / "data.jsonl").symlink_to(elsewhere / "emphysema.png")
    with pytest.raises(OutputError, match="is a symbolic link"):
        ItemJournal(out / "volume_scores" / "data.jsonl", {"model": "x"})
    assert (elsewhere / "emphysema.png").read_text() == "not a plot: someone's file"


def test_evaluate_names_volumes_whose_masks_do_not_fit_their_ct(tiny_model_dir, tmp_path, capsys):
    """A mask of another scan (here a volume's own mask moved by half the volume: heart and aorta
    over the lungs) is named in the report's notes, with the anatomy and its intensities."""
    import SimpleITK as sitk

    from fvlm_core.data.synth import generate_cohort

    data = tmp_path / "ctrate"
    generate_cohort(data, 6, 3, size_zyx=(32, 32, 32), valid_fraction=0.5)
    masks = sorted((data / "anatomy_masks" / "valid").rglob("*.nii.gz"))
    image = sitk.ReadImage(str(masks[0]))
    moved = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), 16, axis=2))
    moved.CopyInformation(image)
    sitk.WriteImage(moved, str(masks[0]))
    out = tmp_path / "rep"
    argv = ["evaluate", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main([*argv, "--n-bootstrap", "5", "--no-plots", "--device", "cpu"]) == 0
    assert "do not fit its anatomies" in capsys.readouterr().err  # the warning, as it happens
    notes = " ".join(json.loads((out / "metrics.json").read_text())["notes"])
    volume = masks[0].name.removesuffix(".nii.gz")
    assert "1 volume(s) have a segmentation whose intensities do not fit its anatomies" in notes
    assert f"check the masks of: {volume}" in notes and "of its voxels are below -400 HU (air)" in notes
