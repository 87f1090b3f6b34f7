"""`fvlm evaluate` on a fixed score table: numbers equal hand-computed ones; files written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fvlm_core.cli import main
from training import evaluate as ev

# Same worked example as test_metrics: AUC 13/16, reference threshold 69/99 -> TP 3, FN 1, FP 0, TN 4.
Y = [0, 0, 0, 1, 1, 1, 0, 1]
S = [0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.6, 0.9]
NAMES = [f"valid_{i}_a_1.nii.gz" for i in range(1, 9)]


def _tables(tmp_path):
    # Cardiomegaly: one volume not scored (NaN). Its label is 1, so counting it as 0 (reference)
    # or leaving it out (strict) changes the numbers in a way we can compute by hand.
    card_s = [0.2, 0.3, 0.1, 0.9, 0.8, np.nan, 0.4, 0.7]
    card_y = [0, 0, 0, 1, 1, 1, 0, 1]
    scores = pd.DataFrame({"VolumeName": NAMES, "Emphysema": S, "Cardiomegaly": card_s})
    labels = pd.DataFrame(
        {"VolumeName": NAMES[::-1], "AccessionNo": "x", "Emphysema": Y[::-1], "Cardiomegaly": card_y[::-1]}
    )
    scores.to_csv(tmp_path / "scores.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
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
    names, scores = ev.read_score_table(s_csv)
    truth = ev.read_label_table(l_csv, names)
    with pytest.raises(Exception, match="threshold fixed beforehand"):
        ev.evaluate_scores(scores, truth, names, "strict", {"Emphysema": 0.5})
    rep = ev.evaluate_scores(
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
    path = ev.store_thresholds(model_dir, {"Emphysema": 0.7, "Cardiomegaly": float("nan")}, source="test")
    cfg = load_config(model_dir)
    assert cfg.thresholds == {"Emphysema": 0.7} and path.name == "config.yaml"
    with pytest.raises(Exception, match="config.yaml"):
        ev.store_thresholds(tmp_path / "nothing", {"Emphysema": 0.5})


def test_split_description():
    vols = [f"valid_{i}_a_{r}" for i in range(1, 4) for r in (1, 2)]
    d = ev.describe_split(vols)
    assert (d["n_volumes"], d["n_scans"]) == (6, 3)
    assert ev.one_per_scan(vols) == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    assert ev.scan_id("valid_12_b_2.nii.gz") == "valid_12_b"
