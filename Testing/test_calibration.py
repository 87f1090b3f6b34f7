"""Per-finding calibration (fvlm_core.calibration) and the calibration metrics (fvlm_core.metrics).

Scores are simulated as a zero-shot model gives them: a softmax of two prompt similarities,
overconfident (most mass near 0 and 1) and shifted, from float32 (so some are exactly 0 or 1),
with the finding's probability a known function of the score, so what a good calibration must
return is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, logit

from fvlm_core import calibration as cal
from fvlm_core import metrics
from fvlm_core.errors import ConfigError


def _scores(n: int, seed: int, truth=lambda z: expit(0.4 * z + 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, raw scores)``: raw = float32 sigmoid of a logit z spread over +-40 (saturates to
    exactly 0 and 1), and P(finding | z) = ``truth(z)``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-4.0, 12.0, n)
    raw = expit(z).astype(np.float32).astype(np.float64)
    y = (rng.random(n) < truth(z)).astype(int)
    return y, raw


def test_platt_recovers_the_true_map_and_helps_held_out_brier_and_ece():
    y, raw = _scores(4000, 0)
    c = cal.fit_calibration(y, raw)
    assert c.method in ("platt", "isotonic")
    platt = cal.Calibration(
        "platt", a=cal._fit_platt(cal._fit_logit(raw), y)[0], b=cal._fit_platt(cal._fit_logit(raw), y)[1]
    )
    assert platt.a == pytest.approx(0.4, abs=0.05) and platt.b == pytest.approx(1.0, abs=0.15)
    yt, rt = _scores(4000, 1)
    check = cal.check_calibration(yt, rt, c, threshold=0.5)
    assert check.brier_calibrated < 0.8 * check.brier_raw
    assert check.ece_calibrated < 0.5 * check.ece_raw
    assert check.auc_calibrated == check.auc_raw and check.same_decisions


def test_isotonic_is_chosen_where_the_truth_is_not_logistic_and_there_is_enough_data():
    # P(finding) is a staircase in the score: no logistic curve fits it, isotonic regression does
    def stairs(z):
        return np.select([z < -10, z < 0, z < 10], [0.05, 0.4, 0.45], 0.95)

    y, raw = _scores(3000, 2, stairs)
    c = cal.fit_calibration(y, raw)
    assert c.method == "isotonic", c.reason
    assert c.cv_log_loss["isotonic"] < c.cv_log_loss["platt"] < c.cv_log_loss["raw"]
    assert c.reason.startswith("isotonic: the lower cross-validated log-loss")
    yt, rt = _scores(3000, 3, stairs)
    check = cal.check_calibration(yt, rt, c, threshold=0.3)
    assert check.auc_calibrated == check.auc_raw and check.same_decisions
    assert check.ece_calibrated < 0.05 < check.ece_raw


def test_small_sets_get_platt_and_too_few_positives_keep_the_raw_score():
    y, raw = _scores(200, 4)
    y[np.flatnonzero(y)[30:]] = 0  # 30 positives: fewer than isotonic needs
    c = cal.fit_calibration(y, raw)
    assert c.method == "platt" and "fewer than the 50 of each class isotonic regression needs" in c.reason
    assert set(c.cv_log_loss) == {"platt", "raw"}
    y[np.flatnonzero(y)[9:]] = 0  # 9 positives
    c = cal.fit_calibration(y, raw)
    assert (c.method, c.calibrated, c.label) == ("none", False, "uncalibrated")
    assert c.reason == "raw score kept: the calibration set has only 9 positives (10 of each class needed)"
    np.testing.assert_array_equal(c.apply(raw), raw)
    many = cal.fit_calibration(1 - y, raw)  # 9 negatives
    assert many.method == "none" and "only 9 negatives" in many.reason


def test_a_score_that_falls_with_the_finding_is_not_calibrated():
    y, raw = _scores(500, 5, lambda z: expit(-0.5 * z))
    c = cal.fit_calibration(y, raw)
    assert c.method == "none" and "does not rise with the finding" in c.reason


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_never_changes_the_ranking_auc_or_decisions(method):
    """AUCs before and after are equal (exactly), on data with ties and saturated scores; every
    distinct float32 score stays distinct and ordered; p > t exactly when f(p) > f(t)."""
    y, raw = _scores(2000, 6, lambda z: np.where(z > 3, 0.7, 0.2))
    if method == "platt":
        a, b = cal._fit_platt(cal._fit_logit(raw), y)
        c = cal.Calibration("platt", a=a, b=b)
    else:
        c = cal._isotonic(cal._fit_logit(raw), y)
    yt, rt = _scores(3000, 7, lambda z: np.where(z > 3, 0.7, 0.2))
    rt[:50] = rt[50:100]  # ties in the raw scores stay ties
    rt[100:130] = 0.0  # a float32 softmax underflows to 0 below a logit of -103
    assert np.mean(rt == 1.0) > 0.02 and np.mean(rt == 0.0) >= 0.01  # saturated float32 softmax
    after = c.apply(rt)
    assert metrics.auc(yt, after) == metrics.auc(yt, rt)
    assert np.array_equal(metrics.rank_auc(yt, after), metrics.rank_auc(yt, rt))
    grid = np.unique(np.concatenate([expit(np.linspace(-17, 17, 20001)).astype(np.float32), [0, 1]]))
    assert np.all(np.diff(c.apply(grid)) > 0), "strictly increasing over every float32 score"
    for t in (0.0, 1e-4, 0.02, 0.5, 0.97, float(rt[123])):
        assert np.array_equal(rt > t, after > c.probability(t))
    if method == "isotonic":
        # the plain isotonic step function ties whole blocks: it would change the AUC
        from sklearn.isotonic import IsotonicRegression

        steps = IsotonicRegression(out_of_bounds="clip").fit(cal.logit(raw), y).predict(cal.logit(rt))
        assert metrics.auc(yt, steps) != metrics.auc(yt, rt)


def _label_set(seed: int, n: int = 3039) -> tuple[np.ndarray, np.ndarray]:
    """One random finding at CT-RATE's validation size: float32 softmax scores (a random spread
    and shift, some saturated) and labels of a random prevalence (3-40 %) and strength of
    dependence on the score (from none to strong)."""
    rng = np.random.default_rng(1000 + seed)
    z = rng.normal(rng.uniform(-6.0, 1.0), rng.uniform(0.5, 12.0), n)
    raw = expit(z).astype(np.float32).astype(np.float64)
    prevalence = rng.uniform(0.03, 0.4)
    slope = rng.uniform(0.0, 2.0) / z.std()
    y = (rng.random(n) < expit(slope * (z - z.mean()) + logit(prevalence))).astype(int)
    return y, raw


def test_isotonic_fit_never_raises_at_ctrate_size():
    """Issue 25: a fold's isotonic knots went through sigmoid(logit(...)) and two of them became
    equal (scikit-learn's pooled means of one fraction differ in the last bit), so ``_check``
    raised after a whole evaluation had been scored. Over 200 random label sets of n = 3,039
    float32 scores, the per-fold fits (all of the cross-validated choice's isotonic work) and the
    final isotonic fit give finite losses and valid, strictly increasing maps. Platt's fit cannot
    reach ``_check`` with an invalid slope; the sets that raised before the fix are fitted end to
    end (Platt included) below."""
    for seed in range(200):
        y, raw = _label_set(seed)
        assert min(y.sum(), y.size - y.sum()) >= cal.ISOTONIC_MIN_PER_CLASS  # isotonic is a candidate
        loss = cal.cv_log_loss(y, raw, ["isotonic"], seed)["isotonic"]
        assert math.isfinite(loss), seed
        iso = cal._isotonic(cal._fit_logit(raw), y)
        if iso is not None:
            assert np.all(np.diff(cal.logit(iso.knots_raw)) > 0), seed
            assert np.all(np.diff(cal.logit(iso.knots_probability)) > 0), seed
            assert np.all(np.diff(iso.apply(np.unique(raw))) >= 0), seed
    for seed in (51, 89, 156):  # these raised ValueError before the fix
        y, raw = _label_set(seed)
        c = cal.fit_calibration(y, raw, seed)
        assert c.method in ("platt", "isotonic") and set(c.cv_log_loss) == {"platt", "isotonic", "raw"}


def test_isotonic_knots_are_one_per_fraction_of_positives():
    """A block's value is its exact fraction of positives: pooled means that differ only by
    rounding are one knot (before the fix, these folds gave knots at logits -2.2e-16 and 0, both
    0.5 as probabilities), so both
    knot sequences strictly increase and every calibrated knot is the logit of a fraction k / m."""
    for seed in (51, 89, 156):
        y, raw = _label_set(seed)
        x = cal._fit_logit(raw)
        for fit, _ in cal._folds(y, seed):
            kx, kz = cal._fit_isotonic(x[fit], y[fit])
            assert np.all(np.diff(kx) > 0) and np.all(np.diff(kz) > 0), seed
            p = expit(kz)
            # distinct fractions of at most m cases differ by >= 1 / m**2 (not 0.5 and 0.49999999999999994)
            assert np.all(np.diff(p) >= 0.99 / fit.size**2), seed
            eps = 1 / (2 * fit.size)  # fractions 0 and 1 are clipped to eps and 1 - eps
            m = np.arange(1, fit.size + 1)
            for v in p[(p > 1.01 * eps) & (p < 1 - 1.01 * eps)]:
                assert np.min(np.abs(np.round(v * m) / m - v)) < 1e-12  # k / m for a block size m


def test_stored_in_the_model_config_beside_the_thresholds(tmp_path):
    from fvlm_core.model.config import FVLMConfig, load_config

    y, raw = _scores(3000, 8, lambda z: np.select([z < -10, z < 0, z < 10], [0.05, 0.4, 0.45], 0.95))
    iso = cal.fit_calibration(y, raw)
    platt = cal.Calibration("platt", "why", a=0.4, b=1.0, n=10, n_positive=3)
    entries = {"Emphysema": iso.to_dict(), "Cardiomegaly": platt.to_dict(), "Atelectasis": {"method": "none"}}
    FVLMConfig(thresholds={"Emphysema": 0.2}, calibration=entries).save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.index("thresholds:") < text.index("calibration:") < text.index("versions:")
    back = cal.from_config(load_config(tmp_path).calibration)
    assert back["Cardiomegaly"] == platt and back["Atelectasis"].method == "none"
    assert back["Emphysema"].method == "isotonic" and len(back["Emphysema"].knots_raw) >= 2
    np.testing.assert_array_equal(back["Emphysema"].apply(raw), iso.apply(raw))  # YAML floats round-trip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "platt", "a": -1.0, "b": 0.0}, "slope a > 0"),
        (
            {"method": "isotonic", "knots_raw": [0.1, 0.2], "knots_probability": [0.3, 0.3]},
            "strictly increasing",
        ),
        ({"method": "isotonic", "knots_raw": [0.1], "knots_probability": [0.3]}, "at least 2 knots"),
        ({"method": "magic"}, "method must be one of platt, isotonic, none"),
        ({"method": "platt", "slope": 2}, "unknown key"),
        # each of these raised AttributeError or was accepted before
        ({"method": "platt", "a": 0.5, "cv_log_loss": [0.3, 0.4]}, "cv_log_loss must map a method"),
        ({"method": "platt", "a": 0.5, "cv_log_loss": "low"}, "cv_log_loss must map a method"),
        (
            {"method": "platt", "a": 0.5, "cv_log_loss": {"platt": "low"}},
            "cv_log_loss 'platt' must be a finite",
        ),
        ({"method": "platt", "a": True}, "a must be a finite number, got True"),
        ({"method": "platt", "a": "2"}, "a must be a finite number, got '2'"),
        ({"method": "platt", "a": 1.0, "b": float("inf")}, "b must be a finite number, got inf"),
        ({"method": "isotonic", "knots_raw": "0.1 0.2", "knots_probability": [0.3, 0.4]}, "list of numbers"),
        ({"method": "platt", "a": 1.0, "n": 5, "n_positive": 9}, "n_positive .9. exceeds n .5."),
        ({"method": "platt", "a": 1.0, "n": -1}, "n must be a count"),
        ({"method": ["platt"]}, "method must be one of"),
        ({"method": "none", "reason": ["why"]}, "reason must be text"),
    ],
)
def test_a_bad_calibration_in_the_config_is_refused_by_name(entry, message):
    from fvlm_core.model.config import FVLMConfig

    with pytest.raises(ConfigError, match=message) as err:
        FVLMConfig(calibration={"Emphysema": entry})
    assert "'Emphysema'" in str(err.value)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ([0.3, 0.4], "must map finding names to thresholds"),  # AttributeError before
        ("0.3", "must map finding names to thresholds"),
        ({"Emphysema": 2}, r"threshold of 'Emphysema' is 2; .* lies in \[0, 1\]"),
        ({"Emphysema": -1}, r"threshold of 'Emphysema' is -1"),
        ({"Emphysema": float("inf")}, "must be a finite number, got inf"),
        ({"Emphysema": True}, "must be a finite number, got True"),
        ({"Emphysema": "high"}, "must be a finite number, got 'high'"),
    ],
)
def test_bad_thresholds_in_the_config_are_refused_by_name(thresholds, message, tmp_path):
    import yaml

    from fvlm_core.model.config import FVLMConfig, load_config

    with pytest.raises(ConfigError, match=message):
        FVLMConfig(thresholds=thresholds)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"thresholds": thresholds}))
    with pytest.raises(ConfigError, match=r"config\.yaml: "):  # as a model folder's file says it
        load_config(tmp_path)
    assert FVLMConfig(thresholds={"Emphysema": 0, "Atelectasis": 1.0}).thresholds["Emphysema"] == 0.0


def test_cross_fitting_scores_each_fold_with_a_map_fitted_on_the_others():
    y, raw = _scores(600, 9)
    raw[::37] = np.nan  # not scored: stays NaN, and is not used
    out = cal.cross_fit(y, raw, seed=3)
    assert np.array_equal(np.isnan(out), np.isnan(raw))
    idx = np.flatnonzero(~np.isnan(raw))
    folds = cal._folds(y[idx], 3)
    assert len(folds) == cal.CV_FOLDS
    fit, held = folds[2]
    again = cal.fit_calibration(y[idx[fit]], raw[idx[fit]], 3).apply(raw[idx[held]])
    np.testing.assert_array_equal(out[idx[held]], again)
    assert not np.array_equal(out[idx], cal.fit_calibration(y, raw, 3).apply(raw[idx]))  # not in-sample


# ------------------------------------------------------------------------ metrics


def test_brier_and_ece_hand_computed():
    y = [0, 1, 1, 0, 1]
    p = [0.1, 0.9, 0.65, 0.35, 0.05]
    assert metrics.brier_score(y, p) == pytest.approx((0.01 + 0.01 + 0.1225 + 0.1225 + 0.9025) / 5)
    # bins (10 wide): [0, .1] holds 0.1 and 0.05 (y 0, 1): |0.5 - 0.075|; (.3, .4]: 0.35 (y 0);
    # (.6, .7]: 0.65 (y 1); (.8, .9]: 0.9 (y 1)
    want = (2 * abs(0.5 - 0.075) + 0.35 + 0.35 + 0.1) / 5
    assert metrics.expected_calibration_error(y, p) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.brier_score([0, 1], [0.2, math.nan])


def test_reliability_bins_are_sklearns_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(10)
    p = np.round(rng.random(500), 1)  # many values exactly on bin edges
    y = (rng.random(500) < p).astype(int)
    bins = metrics.reliability_bins(y, p)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(bins.fraction_positive[bins.nonempty], frac)
    np.testing.assert_allclose(bins.mean_predicted[bins.nonempty], mean)
    assert bins.count.sum() == 500
    # perfectly calibrated probabilities have a small ECE; squeezed toward 0 and 1 a large one
    q = rng.random(20000)
    yq = (rng.random(20000) < q).astype(int)
    assert metrics.expected_calibration_error(yq, q) < 0.02
    assert metrics.expected_calibration_error(yq, expit(4 * logit(q))) > 0.1
