"""Per-finding calibration: raw zero-shot scores become probabilities a radiologist can read.

The raw score ``p = softmax([v.t_neg, v.t_pos] / tau)[1]`` ranks cases (its AUC) but is not a
probability: a finding may be present in 30% of the cases scoring 0.02. A calibration maps it
through a strictly increasing function fitted on a labelled calibration set, per finding:

* ``platt``: ``P = sigmoid(a * logit(p) + b)`` with ``a > 0`` (Platt scaling on the score's logit):
  scikit-learn's ``LogisticRegression`` without penalty on ``logit(p)``, fitted to Platt's
  targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` (as ``CalibratedClassifierCV(method="sigmoid")``),
  so a perfectly separated calibration set still gives a finite slope.
* ``isotonic``: scikit-learn's ``IsotonicRegression`` on ``logit(p)``, made *strictly* increasing:
  one knot per block of equal fitted values, at the block's mean logit, its value clipped into
  ``[1 / (2N), 1 - 1 / (2N)]``; between knots linear in (logit raw, logit probability), beyond
  the end knots linear with the slope from the first to the last knot. The plain step function
  would tie every case of a block and change the AUC; this keeps every distinct score distinct.
* ``none``: the raw score is kept (and shown as an "uncalibrated score", not a probability).

Choice rule (:func:`fit_calibration`):

1. fewer than :data:`MIN_PER_CLASS` positives or negatives: ``none`` (too few to fit anything);
2. candidates: Platt always; isotonic only with at least :data:`ISOTONIC_MIN_PER_CLASS` of each
   class (it has one parameter per block and overfits small sets);
3. with both candidates, the lower stratified :data:`CV_FOLDS`-fold cross-validated log-loss wins
   (ties go to Platt, two parameters); the reason records both losses and the raw score's;
4. a Platt slope ``a <= 0`` means the score does not rise with the finding on this set: ``none``.

Both maps are strictly increasing, so the ranking of cases (hence every AUC) is unchanged, and
``p > t`` exactly when ``f(p) > f(t)``: a threshold ``t`` on the raw scale is ``f(t)`` on the
calibrated scale with the same decisions. In float64 this holds for every pair of distinct
scores except where both calibrated values lie within 1.1e-16 of 1 (no double lies between),
which a fitted map reaches only for scores saturated at 1 in float32 when its slope exceeds 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fvlm_core.errors import ConfigError

METHODS = ("platt", "isotonic", "none")
#: Fewer positives or negatives than this in the calibration set: the raw score is kept.
MIN_PER_CLASS = 10
#: Isotonic regression is a candidate only with at least this many positives and negatives.
ISOTONIC_MIN_PER_CLASS = 50
#: Folds of the cross-validated log-loss that chooses the method (and of :func:`cross_fit`).
CV_FOLDS = 5
#: A float32 softmax saturates to exactly 0 or 1, whose logit is infinite: they get the logits
#: just beyond those of the nearest float64 scores (5e-324 and 1 - 1.1e-16), so every distinct
#: score keeps a distinct, ordered logit.
LOGIT_OF_0 = -746.0
LOGIT_OF_1 = 38.0
#: The fits see logits clipped to +-FIT_LIMIT (a saturated score does not pull a fit around).
FIT_LIMIT = 36.0
#: Probabilities are clipped into [EPS, 1 - EPS] for the raw score's log-loss only.
EPS = 1e-15
#: Isotonic fitted values closer than this times ``1 / N**2`` are one block (rounding, not data).
_SAME_FRACTION = 0.25

_LABELS = {"platt": "Platt", "isotonic": "isotonic", "none": "uncalibrated"}


def logit(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` in float64, strictly increasing on [0, 1]: 0 and 1 map to
    :data:`LOGIT_OF_0` and :data:`LOGIT_OF_1` instead of infinities."""
    from scipy.special import logit as _logit

    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        x = _logit(p)
    return np.where(p <= 0.0, LOGIT_OF_0, np.where(p >= 1.0, LOGIT_OF_1, x))


def _fit_logit(p: Any) -> np.ndarray:
    return np.clip(logit(p), -FIT_LIMIT, FIT_LIMIT)


def sigmoid(z: Any) -> np.ndarray:
    from scipy.special import expit

    return expit(np.asarray(z, dtype=np.float64))


@dataclass(frozen=True)
class Calibration:
    """How one finding's raw score becomes a probability (see the module docstring).

    Attributes:
        method: ``platt`` | ``isotonic`` | ``none``.
        reason: why this method (or why the raw score is kept), in words.
        a, b: Platt's slope and intercept on ``logit(raw)``.
        knots_raw, knots_probability: isotonic knots (raw score -> probability), both strictly
            increasing.
        n, n_positive: size of the calibration set it was fitted on.
        cv_log_loss: cross-validated log-loss per candidate method, and ``raw`` (the raw score's).
    """

    method: str
    reason: str = ""
    a: float = 1.0
    b: float = 0.0
    knots_raw: tuple[float, ...] = ()
    knots_probability: tuple[float, ...] = ()
    n: int = 0
    n_positive: int = 0
    cv_log_loss: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def calibrated(self) -> bool:
        """Whether scores become probabilities (``False``: the raw score is kept)."""
        return self.method != "none"

    @property
    def label(self) -> str:
        """``Platt`` / ``isotonic`` / ``uncalibrated``."""
        return _LABELS[self.method]

    def apply(self, raw: Any) -> np.ndarray:
        """Probabilities of raw scores (any shape, float64; NaN stays NaN; ``none``: unchanged)."""
        raw = np.asarray(raw, dtype=np.float64)
        if not self.calibrated:
            return raw.copy()
        out = sigmoid(self._z(logit(raw)))
        return np.where(np.isnan(raw), np.nan, out)

    def probability(self, raw: float) -> float:
        """:meth:`apply` of one score."""
        return float(self.apply(raw))

    def _z(self, x: np.ndarray) -> np.ndarray:
        """Calibrated logit of raw logits ``x``: strictly increasing in ``x``."""
        if self.method == "platt":
            return self.a * x + self.b
        return _piecewise_linear(x, logit(self.knots_raw), logit(self.knots_probability))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the model config (YAML)."""
        d: dict[str, Any] = {"method": self.method, "reason": self.reason}
        if self.method == "platt":
            d.update(a=float(self.a), b=float(self.b))
        elif self.method == "isotonic":
            d.update(
                knots_raw=[float(v) for v in self.knots_raw],
                knots_probability=[float(v) for v in self.knots_probability],
            )
        d.update(n=int(self.n), n_positive=int(self.n_positive))
        if self.cv_log_loss:
            d["cv_log_loss"] = {k: float(v) for k, v in self.cv_log_loss.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "") -> Calibration:
        """Read :meth:`to_dict`'s data; :class:`ConfigError` naming ``name`` and the key when it
        is invalid (a wrong type, a number that is not finite, an unknown key)."""
        where = f"calibration of {name!r}" if name else "calibration"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} must be a mapping with a method, got {d!r}")
        known = {"method", "reason", "a", "b", "knots_raw", "knots_probability", "n", "n_positive"}
        unknown = sorted(set(d) - known - {"cv_log_loss"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        method = d.get("method")
        if method not in METHODS:
            raise ConfigError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise ConfigError(f"{where}: reason must be text, got {reason!r}")
        losses = d.get("cv_log_loss") or {}
        if not isinstance(losses, Mapping):
            raise ConfigError(f"{where}: cv_log_loss must map a method to its log-loss, got {losses!r}")
        n, n_pos = _count(d, "n", where), _count(d, "n_positive", where)
        if n_pos > n:
            raise ConfigError(f"{where}: n_positive ({n_pos}) exceeds n ({n})")
        try:
            return cls(
                method=method,
                reason=reason,
                a=_number(d.get("a", 1.0), f"{where}: a"),
                b=_number(d.get("b", 0.0), f"{where}: b"),
                knots_raw=_numbers(d.get("knots_raw", ()), f"{where}: knots_raw"),
                knots_probability=_numbers(d.get("knots_probability", ()), f"{where}: knots_probability"),
                n=n,
                n_positive=n_pos,
                cv_log_loss={str(k): _number(v, f"{where}: cv_log_loss {k!r}") for k, v in losses.items()},
            )
        except ValueError as exc:  # _check's: not a strictly increasing map
            raise ConfigError(f"{where}: {exc}") from exc


def _number(value: Any, where: str) -> float:
    """A finite real number from a config (YAML: not a bool, not text)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _numbers(values: Any, where: str) -> tuple[float, ...]:
    if isinstance(values, str | Mapping) or not isinstance(values, Sequence):
        raise ConfigError(f"{where} must be a list of numbers, got {values!r}")
    return tuple(_number(v, where) for v in values)


def _count(d: Mapping[str, Any], key: str, where: str) -> int:
    value = d.get(key, 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a count (an integer >= 0), got {value!r}")
    return value


def check_thresholds(thresholds: Any, where: str = "config option thresholds") -> dict[str, float]:
    """A config's ``thresholds`` (finding name -> decision threshold on the raw score, a
    probability in [0, 1]), checked: :class:`ConfigError` naming the finding and its value."""
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        raise ConfigError(f"{where} must map finding names to thresholds in [0, 1], got {thresholds!r}")
    out = {}
    for name, value in thresholds.items():
        v = _number(value, f"{where}: the threshold of {name!r}")
        if not 0.0 <= v <= 1.0:
            raise ConfigError(
                f"{where}: the threshold of {name!r} is {value!r}; a threshold on the raw score (a "
                "probability) lies in [0, 1]. Store thresholds with `fvlm evaluate --store-thresholds`."
            )
        out[str(name)] = v
    return out


def _check(c: Calibration) -> None:
    """Refuse a calibration that is not a strictly increasing map (it would change rankings)."""
    if c.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {c.method!r}")
    if c.method == "platt" and not (math.isfinite(c.a) and math.isfinite(c.b) and c.a > 0):
        raise ValueError(f"Platt needs a finite slope a > 0 and a finite b (got a={c.a}, b={c.b})")
    if c.method == "isotonic":
        x, y = np.asarray(c.knots_raw), np.asarray(c.knots_probability)
        if x.size < 2 or x.shape != y.shape:
            raise ValueError("isotonic needs at least 2 knots_raw and as many knots_probability")
        inside = np.all((x > 0) & (x < 1) & (y > 0) & (y < 1))
        if not inside or not _strict_knots(logit(x), logit(y)).all():
            raise ValueError("isotonic knots must lie in (0, 1) and be strictly increasing")


def _strict_knots(kx: np.ndarray, kz: np.ndarray) -> np.ndarray:
    """Mask of the knots to keep so that both ``kx`` and ``kz`` (``(K,)`` logits) strictly
    increase: each kept knot lies above the last kept one in both (all True: already strict)."""
    keep = np.zeros(kx.shape, dtype=bool)
    last = None
    for i in range(kx.size):
        if last is None or (kx[i] > kx[last] and kz[i] > kz[last]):
            keep[i], last = True, i
    return keep


def _piecewise_linear(x: np.ndarray, kx: np.ndarray, kz: np.ndarray) -> np.ndarray:
    """The isotonic map on logits: linear between the knots ``(kx, kz)`` (``(K,)``, K >= 2, both
    strictly increasing), beyond the end knots linear with the slope from the first to the last."""
    slope = (kz[-1] - kz[0]) / (kx[-1] - kx[0])
    inside = np.interp(x, kx, kz)
    return np.where(
        x < kx[0],
        kz[0] + slope * (x - kx[0]),
        np.where(x > kx[-1], kz[-1] + slope * (x - kx[-1]), inside),
    )


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _fit_platt(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of ``sigmoid(a x + b)`` fitted to Platt's targets (``x``: raw logits)."""
    from sklearn.linear_model import LogisticRegression

    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    # soft targets as two weighted copies of each case (LogisticRegression takes hard labels)
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    weights = np.concatenate([target, 1.0 - target])
    model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-6)
    model.fit(features, labels, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def _fit_isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(raw logits, calibrated logits)`` of the strictly increasing isotonic map, both
    ``(K,)`` and strictly increasing: one per block of equal fitted values (a single knot when
    the fit is constant).

    A block's value is its fraction of positives, computed here from the labels: scikit-learn's
    pooled means of one fraction can differ in the last bit (0.25 and 0.25000000000000006), which
    would split a block into two knots with the same logit. Distinct fractions of at most ``N``
    cases differ by at least ``1 / N**2``, so fitted values closer than :data:`_SAME_FRACTION`
    (times that) are one block."""
    from sklearn.isotonic import IsotonicRegression

    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order].astype(np.float64)
    n = xs.size
    eps = 1.0 / (2.0 * n)
    fitted = np.clip(IsotonicRegression(increasing=True).fit(xs, ys).predict(xs), eps, 1.0 - eps)
    start = np.r_[0, np.flatnonzero(np.abs(np.diff(fitted)) > _SAME_FRACTION / n**2) + 1]
    size = np.diff(np.r_[start, n])
    kx = np.add.reduceat(xs, start) / size
    kz = logit(np.clip(np.add.reduceat(ys, start) / size, eps, 1.0 - eps))
    keep = _strict_knots(kx, kz)  # a no-op unless a block mean rounds onto its neighbour's
    return kx[keep], kz[keep]


def _platt(x: np.ndarray, y: np.ndarray) -> Calibration | None:
    a, b = _fit_platt(x, y)
    return Calibration("platt", a=a, b=b) if a > 0 else None


def _isotonic(x: np.ndarray, y: np.ndarray) -> Calibration | None:
    """The isotonic :class:`Calibration` of raw logits ``x`` and labels ``y`` (None: the fit is
    constant). Knots are stored as probabilities: a knot whose logit does not survive the round
    trip through them strictly above its neighbour's is dropped (the map stays increasing)."""
    kx, kz = _fit_isotonic(x, y)
    if kx.size < 2:
        return None
    raw, prob = sigmoid(kx), sigmoid(kz)
    keep = _strict_knots(logit(raw), logit(prob))  # the very test Calibration's _check applies
    if keep.sum() < 2:
        return None
    return Calibration("isotonic", knots_raw=tuple(raw[keep]), knots_probability=tuple(prob[keep]))


def _fold_predictions(method: str, x_fit: np.ndarray, y_fit: np.ndarray, x_out: np.ndarray) -> np.ndarray:
    """Held-out probabilities of ``method`` fitted on one fold's training part. The isotonic map
    is applied on its logit knots as fitted (no round trip through probabilities, whose rounding
    can tie two knots: the choice is about the method, not about storing it)."""
    if method == "platt":
        a, b = _fit_platt(x_fit, y_fit)
        return sigmoid(a * x_out + b)
    kx, kz = _fit_isotonic(x_fit, y_fit)
    if kx.size < 2:
        return np.full(x_out.shape, float(sigmoid(kz[0])))
    return sigmoid(_piecewise_linear(x_out, kx, kz))


def _folds(y: np.ndarray, seed: int, folds: int = CV_FOLDS):
    from sklearn.model_selection import StratifiedKFold

    k = min(folds, int(y.sum()), int(y.size - y.sum()))
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(y.size), y))


def cv_log_loss(y: np.ndarray, raw: np.ndarray, methods: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Mean held-out log-loss per method over stratified :data:`CV_FOLDS` folds, and ``raw`` (the
    raw score's log-loss on the whole set, which needs no fit)."""
    from sklearn.metrics import log_loss

    x = _fit_logit(raw)
    held_out = {m: np.empty(y.size) for m in methods}  # every case once, from the fold that holds it out
    for fit, out in _folds(y, seed):
        for m in methods:
            held_out[m][out] = _fold_predictions(m, x[fit], y[fit], x[out])
    result = {m: float(log_loss(y, p, labels=[0, 1])) for m, p in held_out.items()}
    result["raw"] = float(log_loss(y, np.clip(raw, EPS, 1 - EPS), labels=[0, 1]))
    return result


def fit_calibration(y_true: Sequence[int], raw: Sequence[float], seed: int = 0) -> Calibration:
    """Calibrate one finding on a labelled set (``raw``: ``(N,)`` scores, NaN = not scored and
    left out; ``y_true``: ``(N,)`` 0/1) by the choice rule of the module docstring."""
    y = np.asarray(y_true, dtype=int).reshape(-1)
    s = np.asarray(raw, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    keep = ~np.isnan(s)
    y, s = y[keep], s[keep]
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    size = {"n": int(y.size), "n_positive": n_pos}
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        few = f"{n_pos} positives" if n_pos < MIN_PER_CLASS else f"{n_neg} negatives"
        reason = f"raw score kept: the calibration set has only {few} ({MIN_PER_CLASS} of each class needed)"
        return Calibration("none", reason, **size)
    methods = ["platt"] + (["isotonic"] if min(n_pos, n_neg) >= ISOTONIC_MIN_PER_CLASS else [])
    losses = cv_log_loss(y, s, methods, seed)
    x = _fit_logit(s)
    chosen = min(methods, key=lambda m: (losses[m], m != "platt"))
    fitted = _platt(x, y) if chosen == "platt" else _isotonic(x, y)
    if fitted is None and chosen == "isotonic":
        chosen, fitted = "platt", _platt(x, y)
    if fitted is None:
        reason = "raw score kept: it does not rise with the finding on the calibration set (Platt slope <= 0)"
        return Calibration("none", reason, cv_log_loss=losses, **size)
    reason = _reason(chosen, methods, losses, n_pos, n_neg)
    return replace(fitted, reason=reason, cv_log_loss=losses, **size)


def _reason(chosen: str, methods: Sequence[str], losses: Mapping[str, float], n_pos: int, n_neg: int) -> str:
    counts = f"{n_pos} positives / {n_neg} negatives"
    raw = f"raw score {losses['raw']:.4f}"
    if len(methods) == 1:
        return (
            f"Platt: {counts}, fewer than the {ISOTONIC_MIN_PER_CLASS} of each class isotonic regression "
            f"needs; cross-validated log-loss {losses['platt']:.4f} ({raw})"
        )
    other = "isotonic" if chosen == "platt" else "platt"
    return (
        f"{_LABELS[chosen]}: the lower cross-validated log-loss ({chosen} {losses[chosen]:.4f}, "
        f"{other} {losses[other]:.4f}; {raw}; {counts})"
    )


def fit_all(
    scores: Mapping[str, Sequence[float]], truth: Mapping[str, Sequence[int]], seed: int = 0
) -> dict[str, Calibration]:
    """:func:`fit_calibration` of every finding in ``scores`` that has labels in ``truth``."""
    return {name: fit_calibration(truth[name], s, seed) for name, s in scores.items() if name in truth}


def cross_fit(y_true: Sequence[int], raw: Sequence[float], seed: int = 0) -> np.ndarray:
    """Out-of-fold calibrated values ``(N,)``: each of :data:`CV_FOLDS` stratified folds is
    calibrated by :func:`fit_calibration` on the other folds (so no case is scored by a map
    fitted on it); NaN scores stay NaN. Where a fold's fit keeps the raw score, or the set has
    too few of a class to split, the raw scores are returned there."""
    y = np.asarray(y_true, dtype=int).reshape(-1)
    s = np.asarray(raw, dtype=np.float64).reshape(-1)
    out = s.copy()
    idx = np.flatnonzero(~np.isnan(s))
    yk = y[idx]
    if min(int(yk.sum()), int(yk.size - yk.sum())) < 2:
        return out
    for fit, held in _folds(yk, seed):
        cal = fit_calibration(yk[fit], s[idx[fit]], seed)
        out[idx[held]] = cal.apply(s[idx[held]])
    return out


# --------------------------------------------------------------------------------------------
# The model config's entries
# --------------------------------------------------------------------------------------------


def from_config(entries: Mapping[str, Any] | None) -> dict[str, Calibration]:
    """The model config's ``calibration`` field (finding name -> dict) as :class:`Calibration`\\ s."""
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        raise ConfigError(
            f"config option calibration must map finding names to calibrations, got {entries!r}"
        )
    return {str(k): Calibration.from_dict(v, str(k)) for k, v in entries.items()}


def to_config(calibrations: Mapping[str, Calibration]) -> dict[str, dict[str, Any]]:
    return {name: c.to_dict() for name, c in calibrations.items()}


# --------------------------------------------------------------------------------------------
# Checking a calibration on data not used to fit it
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationCheck:
    """One finding's scores before and after calibration, on data not used to fit the map.

    ``brier_*`` and ``ece_*`` compare ``raw`` and ``calibrated`` (``(N,)``, both on the checked
    volumes; ``calibrated`` held out from the fit: another split, or cross-fitted). ``auc_*`` are
    of the raw scores and of the one calibration map applied to them (equal: it is strictly
    increasing). ``same_decisions``: ``raw > t`` equals ``f(raw) > f(t)`` for every volume.
    """

    method: str
    reason: str
    checked_on: str  # "held-out split" | "stored calibration" | "cross-fitted"
    n: int
    n_positive: int
    auc_raw: float
    auc_calibrated: float
    brier_raw: float
    brier_calibrated: float
    ece_raw: float
    ece_calibrated: float
    threshold_raw: float | None
    threshold_calibrated: float | None
    same_decisions: bool
    y: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=int))
    raw: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    calibrated: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        keys = ("method", "reason", "checked_on", "n", "n_positive", "auc_raw", "auc_calibrated")
        keys += ("brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated")
        keys += ("threshold_raw", "threshold_calibrated", "same_decisions")
        return {k: _plain(getattr(self, k)) for k in keys}


def _plain(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if math.isnan(float(v)) else float(v)
    return v.item() if isinstance(v, np.generic) else v


def check_calibration(
    y_true: Sequence[int],
    raw: Sequence[float],
    calibration: Calibration,
    threshold: float | None = None,
    held_out: Sequence[float] | None = None,
    checked_on: str = "held-out split",
) -> CalibrationCheck:
    """Brier score, ECE and AUC of ``raw`` and of its calibrated values on one set.

    Args:
        y_true, raw: ``(N,)`` labels and raw scores (NaN scores are left out: not scored).
        calibration: the map (its AUC is checked on ``raw``).
        threshold: the decision threshold on the raw scale (shown on both scales).
        held_out: ``(N,)`` calibrated values to check instead of ``calibration.apply(raw)``
            (cross-fitted values when the map was fitted on this very set).
    """
    from fvlm_core.metrics import auc, brier_score, expected_calibration_error

    y = np.asarray(y_true, dtype=int).reshape(-1)
    s = np.asarray(raw, dtype=np.float64).reshape(-1)
    after = calibration.apply(s) if held_out is None else np.asarray(held_out, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(s)
    y, s, after = y[keep], s[keep], after[keep]
    mapped = calibration.apply(s)
    same = True
    t_cal = None
    if threshold is not None and not math.isnan(float(threshold)):
        t_cal = calibration.probability(float(threshold))
        same = bool(np.array_equal(s > threshold, mapped > t_cal))
    return CalibrationCheck(
        method=calibration.method,
        reason=calibration.reason,
        checked_on=checked_on,
        n=int(y.size),
        n_positive=int(y.sum()),
        auc_raw=auc(y, s),
        auc_calibrated=auc(y, mapped),
        brier_raw=brier_score(y, s),
        brier_calibrated=brier_score(y, after),
        ece_raw=expected_calibration_error(y, s),
        ece_calibrated=expected_calibration_error(y, after),
        threshold_raw=None if t_cal is None else float(threshold),
        threshold_calibrated=t_cal,
        same_decisions=same,
        y=y,
        raw=s,
        calibrated=after,
    )


def check_all(
    truth: Mapping[str, Sequence[int]],
    raw: Mapping[str, Sequence[float]],
    calibrations: Mapping[str, Calibration],
    thresholds: Mapping[str, float] | None = None,
    checked_on: str = "held-out split",
) -> dict[str, CalibrationCheck]:
    """:func:`check_calibration` of every finding of ``calibrations`` (raw thresholds from
    ``thresholds``, none where absent) on a set not used to fit them."""
    thresholds = thresholds or {}
    return {
        name: check_calibration(truth[name], raw[name], c, thresholds.get(name), checked_on=checked_on)
        for name, c in calibrations.items()
    }
