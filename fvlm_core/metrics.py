"""Zero-shot classification metrics (the CT-RATE zero-shot protocol of CT-CLIP and fVLM).

Per label: ROC AUC with a bootstrap 95% confidence interval, a decision threshold and the
metrics at it (accuracy, weighted F1, positive-class F1, precision, sensitivity,
specificity). Every number comes from scikit-learn; this module only decides *which* numbers.

The reference threshold rule (CT-CLIP / fVLM eval scripts): over ``linspace(0, 1, 100)`` pick
the threshold whose operating point (predictions ``score > t``) is closest to the ROC corner
(FPR 0, TPR 1); on ties the *largest* such threshold wins (the scripts compare with ``<=``).
A threshold chosen on the evaluated set flatters the numbers, so the report also supports
thresholds fixed beforehand (``threshold_source="fixed"``).

Calibration (is a score of 0.3 right 30% of the time?): the Brier score and the expected
calibration error over :data:`ECE_BINS` equal-width bins, with the bins themselves for a
reliability diagram (:func:`reliability_bins`, the bins of ``sklearn.calibration.calibration_curve``
with ``strategy="uniform"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
    roc_curve,
)

#: Threshold grid of the reference evaluation.
REFERENCE_GRID = np.linspace(0.0, 1.0, 100)


def _as_arrays(y_true: Sequence, y_score: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(y_score, dtype=float).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0/1")
    return y, s


def predict(y_score: Sequence, threshold: float) -> np.ndarray:
    """Binary predictions of the reference: ``score > threshold`` (strictly greater)."""
    return (np.asarray(y_score, dtype=float) > threshold).astype(int)


def auc(y_true: Sequence, y_score: Sequence) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``); NaN when only one class is present."""
    y, s = _as_arrays(y_true, y_score)
    if y.min(initial=0) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, s))


def bootstrap_auc_ci(
    y_true: Sequence,
    y_score: Sequence,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of the AUC.

    Samples are drawn with replacement ``n_bootstrap`` times (fixed ``seed``, so reports are
    reproducible); draws holding a single class are skipped. Returns ``(nan, nan)`` when the
    AUC itself is undefined or ``n_bootstrap`` is 0.
    """
    y, s = _as_arrays(y_true, y_score)
    if n_bootstrap <= 0 or y.min(initial=0) == y.max(initial=0):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    chunk = max(1, 2_000_000 // y.size)  # draws per vectorised batch (bounded memory)
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, y.size, (min(chunk, n_bootstrap - start), y.size))
        values.append(rank_auc(y[idx], s[idx]))
    values = np.concatenate(values)
    values = values[np.isfinite(values)]  # draws holding a single class have no AUC
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def rank_auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Row-wise ROC AUC of ``(B, N)`` 0/1 labels and scores (Mann-Whitney U with mid-ranks).

    Equals ``roc_auc_score`` row by row (ties count one half) without a Python loop, which makes
    a 1,000-draw bootstrap cost milliseconds; rows holding a single class give NaN.
    """
    y = np.atleast_2d(y).astype(bool)
    ranks = rankdata(np.atleast_2d(s), method="average", axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def roc_corner_threshold(y_true: Sequence, y_score: Sequence, grid: Sequence[float] | None = None) -> float:
    """The reference threshold rule: the grid point closest to the ROC corner (FPR 0, TPR 1).

    For each ``t`` in ``grid`` (default ``linspace(0, 1, 100)``), predictions are
    ``score > t`` and the distance is ``sqrt((1 - TPR)^2 + FPR^2)``; the last ``t`` with the
    smallest distance is returned (the reference iterates upwards and keeps ``<=``).
    Needs both classes (TPR / FPR are undefined otherwise): returns NaN then.
    """
    y, s = _as_arrays(y_true, y_score)
    grid = REFERENCE_GRID if grid is None else np.asarray(grid, dtype=float)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # (T, N) predictions for all thresholds at once; N is a few thousand at most.
    pred = s[None, :] > grid[:, None]
    tpr = (pred & (y[None, :] == 1)).sum(axis=1) / n_pos
    fpr = (pred & (y[None, :] == 0)).sum(axis=1) / n_neg
    dist = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
    best = np.flatnonzero(dist <= dist.min())[-1]
    return float(grid[best])


@dataclass
class ThresholdMetrics:
    """Metrics of ``score > threshold`` against the labels (scikit-learn where it has them)."""

    threshold: float
    accuracy: float
    f1_weighted: float
    f1_positive: float
    precision: float
    sensitivity: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict:
        return asdict(self)


def metrics_at_threshold(y_true: Sequence, y_score: Sequence, threshold: float) -> ThresholdMetrics:
    """Accuracy, weighted F1 (``average="weighted"``, as the reference), positive-class F1,
    positive-class precision, sensitivity and specificity of ``score > threshold``.

    Undefined ratios (no predicted positives for precision, no positives for sensitivity, ...)
    are 0 for precision/F1 (scikit-learn ``zero_division=0``) and NaN for sensitivity/specificity.
    """
    y, s = _as_arrays(y_true, y_score)
    pred = predict(s, threshold)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return ThresholdMetrics(
        threshold=float(threshold),
        accuracy=float(accuracy_score(y, pred)),
        f1_weighted=float(f1_score(y, pred, average="weighted", zero_division=0)),
        f1_positive=float(f1_score(y, pred, pos_label=1, average="binary", zero_division=0)),
        precision=float(precision_score(y, pred, pos_label=1, average="binary", zero_division=0)),
        sensitivity=tp / (tp + fn) if tp + fn else float("nan"),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


@dataclass
class LabelEvaluation:
    """Everything the report shows for one label."""

    label: str
    n: int
    n_positive: int
    auc: float
    auc_ci: tuple[float, float]
    threshold_source: str  # "roc-corner" (chosen on this set) or "fixed" (given beforehand)
    at_threshold: ThresholdMetrics
    n_missing: int = 0  # samples whose anatomy could not be scored (see the protocol)
    roc: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_dict(self, with_roc: bool = False) -> dict:
        d = {
            "label": self.label,
            "n": self.n,
            "n_positive": self.n_positive,
            "n_missing": self.n_missing,
            "auc": _clean(self.auc),
            "auc_ci95": [_clean(v) for v in self.auc_ci],
            "threshold_source": self.threshold_source,
            **{k: _clean(v) for k, v in self.at_threshold.to_dict().items()},
        }
        if with_roc:
            d["roc"] = self.roc
        return d


def _clean(v):
    """NaN -> None so the JSON is standard."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def evaluate_label(
    label: str,
    y_true: Sequence,
    y_score: Sequence,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_missing: int = 0,
) -> LabelEvaluation:
    """AUC + bootstrap CI + metrics at ``threshold`` (``None``: the reference ROC-corner rule)."""
    y, s = _as_arrays(y_true, y_score)
    source = "roc-corner" if threshold is None else "fixed"
    thr = roc_corner_threshold(y, s) if threshold is None else float(threshold)
    if math.isnan(thr):
        thr = 0.5  # single-class label: no ROC; fall back to the default decision rule
        source = "default"
    roc = {}
    if y.min(initial=0) != y.max(initial=0):
        fpr, tpr, _ = roc_curve(y, s)
        roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return LabelEvaluation(
        label=label,
        n=int(y.size),
        n_positive=int(y.sum()),
        auc=auc(y, s),
        auc_ci=bootstrap_auc_ci(y, s, n_bootstrap=n_bootstrap, seed=seed),
        threshold_source=source,
        at_threshold=metrics_at_threshold(y, s, thr),
        n_missing=n_missing,
        roc=roc,
    )


#: Metrics averaged over labels in the macro rows.
MACRO_KEYS = ("auc", "accuracy", "f1_weighted", "f1_positive", "precision", "sensitivity", "specificity")


def macro_mean(
    results: Sequence[LabelEvaluation] | Mapping[str, LabelEvaluation], labels: Sequence[str] | None = None
) -> dict:
    """Unweighted mean of each metric over ``labels`` (default: all), ignoring undefined (NaN) values.

    Returns ``{metric: mean, ..., "n_labels": k, "labels": [...], "n_defined": {metric: how
    many labels it is defined for, hence averaged over}}``: an AUC is undefined for a label with
    a single class in the data, so a "macro AUC over 16 labels" may average fewer; ``n_defined``
    says how many.
    """
    by_name = dict(results) if isinstance(results, Mapping) else {r.label: r for r in results}
    names = [n for n in (labels if labels is not None else list(by_name)) if n in by_name]
    out: dict = {"n_labels": len(names), "labels": names, "n_defined": {}}
    for key in MACRO_KEYS:
        vals = []
        for n in names:
            r = by_name[n]
            v = r.auc if key == "auc" else getattr(r.at_threshold, key)
            if v is not None and not math.isnan(v):
                vals.append(v)
        out[key] = float(np.mean(vals)) if vals else None
        out["n_defined"][key] = len(vals)
    return out


def macro_label_count(macro: Mapping, key: str = "auc") -> str:
    """How many labels a macro mean of ``key`` is over, in words: ``16 labels`` when defined for
    all, else ``11 of 16 labels (AUC undefined for 5: a single class in the data)``."""
    n, k = macro["n_labels"], macro.get("n_defined", {}).get(key, macro["n_labels"])
    if k == n:
        return f"{n} labels"
    what = "AUC" if key == "auc" else key
    return f"{k} of {n} labels ({what} undefined for {n - k}: a single class in the data)"


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

#: Bins of the expected calibration error and of the reliability diagrams (equal width on [0, 1]).
ECE_BINS = 10


def _finite(y_true: Sequence, y_prob: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y, p = _as_arrays(y_true, y_prob)
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("calibration metrics need probabilities in [0, 1] (no NaN)")
    return y, p


def brier_score(y_true: Sequence, y_prob: Sequence) -> float:
    """Mean squared difference of the probabilities and the 0/1 labels (lower is better;
    ``sklearn.metrics.brier_score_loss``). NaN for an empty set."""
    y, p = _finite(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    return float(brier_score_loss(y, p, pos_label=1))


@dataclass
class ReliabilityBins:
    """Samples of ``(N,)`` probabilities grouped into ``B`` equal-width bins on [0, 1].

    Bin ``i`` holds ``edges[i] < p <= edges[i + 1]`` (the first also ``p = 0``), as
    ``sklearn.calibration.calibration_curve(strategy="uniform")`` assigns them. ``mean_predicted``
    and ``fraction_positive`` are NaN for empty bins.
    """

    edges: np.ndarray  # (B + 1,)
    count: np.ndarray  # (B,) int
    mean_predicted: np.ndarray  # (B,)
    fraction_positive: np.ndarray  # (B,)

    @property
    def nonempty(self) -> np.ndarray:
        return self.count > 0


def reliability_bins(y_true: Sequence, y_prob: Sequence, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """Group ``y_prob`` into ``n_bins`` equal-width bins: per bin the count, the mean probability
    and the observed fraction of positives (the points of a reliability diagram)."""
    y, p = _finite(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # sklearn's assignment: (lo, hi], the first [0, hi]
    count = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(ids, weights=p, minlength=n_bins) / count
        frac = np.bincount(ids, weights=y, minlength=n_bins) / count
    return ReliabilityBins(edges, count, mean_p, frac)


def expected_calibration_error(y_true: Sequence, y_prob: Sequence, n_bins: int = ECE_BINS) -> float:
    """``sum_b (n_b / N) * |fraction_positive_b - mean_predicted_b|`` over ``n_bins`` equal-width
    bins (0 for perfectly calibrated probabilities; NaN for an empty set)."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    n = int(bins.count.sum())
    if n == 0:
        return float("nan")
    keep = bins.nonempty
    gap = np.abs(bins.fraction_positive[keep] - bins.mean_predicted[keep])
    return float(np.sum(bins.count[keep] / n * gap))
