"""Metrics against hand-computed values and against a direct transcription of the reference rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fvlm_core import metrics

# 4 positives, 4 negatives. Worked by hand:
#   AUC: positive-vs-negative pairs ranked correctly: 0.8 -> 4, 0.7 -> 4, 0.3 -> 1, 0.9 -> 4 = 13/16.
#   Operating points of "score > t": t in [0.6, 0.7) gives TPR 3/4, FPR 0 (distance 0.25), the best;
#   the largest grid point there is 69/99.
Y = [0, 0, 0, 1, 1, 1, 0, 1]
S = [0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.6, 0.9]


def test_auc_hand_computed():
    assert metrics.auc(Y, S) == pytest.approx(13 / 16)


def test_reference_threshold_hand_computed():
    assert metrics.roc_corner_threshold(Y, S) == pytest.approx(69 / 99)


def test_metrics_at_threshold_hand_computed():
    # "score > 0.65": TP 3 (0.8, 0.7, 0.9), FN 1 (0.3), FP 0, TN 4.
    m = metrics.metrics_at_threshold(Y, S, 0.65)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 0, 4)
    assert m.accuracy == pytest.approx(7 / 8)
    assert m.precision == pytest.approx(1.0)
    assert m.sensitivity == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(1.0)
    assert m.f1_positive == pytest.approx(6 / 7)  # 2 * 1 * 0.75 / 1.75
    # negative class: precision 4/5, recall 1 -> F1 8/9; supports 4 and 4
    assert m.f1_weighted == pytest.approx((8 / 9 + 6 / 7) / 2)


def test_threshold_is_strictly_greater():
    # A score equal to the threshold is a negative prediction, as in the reference.
    m = metrics.metrics_at_threshold([0, 1], [0.5, 0.5], 0.5)
    assert (m.tp, m.fp) == (0, 0)


def _reference_find_threshold(probabilities, true_labels):
    """Direct transcription of the CT-CLIP / fVLM eval loop (confusion_matrix per threshold)."""
    from sklearn.metrics import confusion_matrix

    best_threshold, best_roc = 0, 10000
    for threshold in np.linspace(0, 1, 100):
        predictions = (probabilities > threshold).astype(int)
        c = confusion_matrix(true_labels, predictions)
        tp_r = c[1, 1] / (c[1, 1] + c[1, 0])
        fp_r = c[0, 1] / (c[0, 1] + c[0, 0])
        current = math.sqrt((1 - tp_r) ** 2 + fp_r**2)
        if current <= best_roc:
            best_roc, best_threshold = current, threshold
    return best_threshold


@pytest.mark.parametrize("seed", range(6))
def test_reference_threshold_matches_direct_computation(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y = (rng.random(n) < 0.3).astype(int)
    s = np.clip(rng.normal(0.45 + 0.2 * y, 0.2), 0, 1)
    if seed % 2:  # coarse scores: many ties with each other and with grid points
        s = np.round(s, 1)
    assert metrics.roc_corner_threshold(y, s) == pytest.approx(_reference_find_threshold(s, y))


def test_bootstrap_ci_brackets_auc_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.4).astype(int)
    s = rng.normal(y * 0.8, 1.0)
    a = metrics.auc(y, s)
    lo, hi = metrics.bootstrap_auc_ci(y, s, n_bootstrap=200, seed=1)
    assert lo < a < hi
    assert lo >= 0.0 and hi <= 1.0 and hi - lo < 0.25
    assert (lo, hi) == metrics.bootstrap_auc_ci(y, s, n_bootstrap=200, seed=1)
    # perfectly separated scores: every resample has AUC 1
    assert metrics.bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_bootstrap=50) == (1.0, 1.0)


def test_single_class_is_undefined_not_zero():
    assert math.isnan(metrics.auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.roc_corner_threshold([1, 1], [0.1, 0.2]))
    ev = metrics.evaluate_label("x", [0, 0, 0], [0.1, 0.2, 0.9], n_bootstrap=10)
    assert ev.threshold_source == "default" and ev.to_dict()["auc"] is None


def test_evaluate_label_and_macro_mean():
    a = metrics.evaluate_label("a", Y, S, n_bootstrap=20)
    assert a.threshold_source == "roc-corner"
    assert a.at_threshold.threshold == pytest.approx(69 / 99)
    assert a.at_threshold.accuracy == pytest.approx(7 / 8)
    b = metrics.evaluate_label("b", Y, S, threshold=0.5, n_bootstrap=20)
    assert b.threshold_source == "fixed"
    assert b.at_threshold.accuracy == pytest.approx(6 / 8)
    macro = metrics.macro_mean([a, b])
    assert macro["n_labels"] == 2
    assert macro["accuracy"] == pytest.approx((7 / 8 + 6 / 8) / 2)
    assert macro["auc"] == pytest.approx(13 / 16)
    only_a = metrics.macro_mean([a, b], labels=["a", "missing"])
    assert only_a["labels"] == ["a"] and only_a["accuracy"] == pytest.approx(7 / 8)


def test_rank_auc_equals_sklearn_row_by_row_including_ties():
    from sklearn.metrics import roc_auc_score

    from fvlm_core.metrics import rank_auc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (20, 57))
    s = np.round(rng.random((20, 57)), 1)  # coarse scores: many ties
    got = rank_auc(y, s)
    want = [roc_auc_score(yy, ss) for yy, ss in zip(y, s)]
    assert np.allclose(got, want, atol=1e-12)
    single = rank_auc(np.zeros((1, 5), dtype=int), np.arange(5.0))
    assert np.isnan(single).all()


def test_bootstrap_ci_brackets_the_auc_and_matches_a_direct_bootstrap():
    from sklearn.metrics import roc_auc_score

    from fvlm_core.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y * 0.6 + rng.random(300)
    lo, hi = bootstrap_auc_ci(y, s, n_bootstrap=400, seed=1)
    assert lo < roc_auc_score(y, s) < hi
    # the same draws done one by one with sklearn give the same interval
    draws = np.random.default_rng(1).integers(0, 300, (400, 300))
    vals = [roc_auc_score(y[i], s[i]) for i in draws if 0 < y[i].sum() < 300]
    assert np.allclose((lo, hi), np.percentile(vals, [2.5, 97.5]), atol=1e-12)
