"""The evaluation protocol: the metrics of a score table, and their calibration check.

A score table (finding -> one score per volume) against ground truth (finding -> 0/1, NaN where a
label is missing) under one protocol (:mod:`fvlm_training.evaluate` tells them apart):
per-label AUC with a bootstrap CI, the metrics at a threshold and macro means
(:func:`evaluate_scores`), then each label's calibration fitted and checked on data not used
to fit it (:func:`calibrate_report`). ``fvlm evaluate`` and ``fvlm demo`` both tabulate with
these; :mod:`fvlm_training.report` draws and writes what they give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fvlm_core.data.layout import scan_id_of
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.findings import CTRATE_LABELS, FVLM_LABELS

#: Sizes of the CT-RATE validation split as released: 3,039 volumes (reconstructions) of 1,564 scans.
CTRATE_VALID_VOLUMES = 3039
CTRATE_VALID_SCANS = 1564


def describe_split(volume_names: Sequence[str]) -> dict[str, Any]:
    """How many volumes and scans the numbers are on, and whether that is a full CT-RATE split."""
    n_vol = len(volume_names)
    n_scan = len({scan_id_of(v) for v in volume_names})
    if n_vol == CTRATE_VALID_VOLUMES and n_scan == CTRATE_VALID_SCANS:
        what = f"CT-RATE validation split, all {n_vol:,} volumes ({n_scan:,} scans)"
    elif n_vol == n_scan == CTRATE_VALID_SCANS:
        what = f"CT-RATE validation split, one reconstruction per scan ({n_scan:,} scans)"
    else:
        what = f"{n_vol:,} volumes from {n_scan:,} scans (not a full CT-RATE validation split)"
    return {"n_volumes": n_vol, "n_scans": n_scan, "description": what}


def one_per_scan(volume_names: Sequence[str]) -> list[str]:
    """The first volume (sorted by name) of each scan: the 1,564-scan view of CT-RATE validation."""
    seen: dict[str, str] = {}
    for v in sorted(volume_names):
        seen.setdefault(scan_id_of(v), v)
    return sorted(seen.values())


# --------------------------------------------------------------------------------------------
# Evaluation of a score table
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Per-label and macro metrics of one score table under one protocol."""

    protocol: str
    split: dict[str, Any]
    per_label: dict[str, Any]  # label -> metrics.LabelEvaluation (primary threshold)
    fixed: dict[str, Any] = field(default_factory=dict)  # label -> LabelEvaluation at fixed thresholds
    macro: dict[str, dict] = field(default_factory=dict)
    macro_fixed: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: label -> fvlm_core.calibration.CalibrationCheck (before/after on data not used to fit)
    calibration: dict[str, Any] = field(default_factory=dict)
    #: label -> fvlm_core.calibration.Calibration fitted here (what --store-thresholds saves)
    calibrations: dict[str, Any] = field(default_factory=dict)
    #: CT-CLIP's retrieval metrics (``fvlm_core.store.retrieval``), with ``--embeddings``
    retrieval: dict[str, Any] | None = None

    @property
    def thresholds(self) -> dict[str, float]:
        """The primary threshold of each label that has one (what ``--store-thresholds`` saves);
        labels with a single class in the data (default 0.5) are left out."""
        return {
            k: float(v.at_threshold.threshold)
            for k, v in self.per_label.items()
            if v.threshold_source != "default"
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "split": self.split,
            "macro": self.macro,
            "labels": {k: v.to_dict() for k, v in self.per_label.items()},
            "fixed_threshold": {
                "macro": self.macro_fixed,
                "labels": {k: v.to_dict() for k, v in self.fixed.items()},
            }
            if self.fixed
            else None,
            "calibration": self.calibration_dict() if self.calibration else None,
            "notes": self.notes,
            "meta": self.meta,
            **({"retrieval": self.retrieval} if self.retrieval is not None else {}),
        }

    def calibration_dict(self) -> dict[str, Any]:
        from fvlm_core.metrics import ECE_BINS

        return {
            "ece_bins": ECE_BINS,
            "macro": calibration_macro(self.calibration),
            "labels": {k: v.to_dict() for k, v in self.calibration.items()},
        }


def _macros(results: Mapping[str, Any]) -> dict[str, dict]:
    from fvlm_core.metrics import macro_mean

    out = {"fvlm16": macro_mean(results, [lbl for lbl in FVLM_LABELS if lbl in results])}
    if all(lbl in results for lbl in CTRATE_LABELS):
        out["ctrate18"] = macro_mean(results, list(CTRATE_LABELS))
    extra = [lbl for lbl in results if lbl not in FVLM_LABELS]
    if extra:
        out["all_scored"] = macro_mean(results, list(results))
    return out


def labelled(truth: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    """``(truth as 0/1 ints, scores, n)`` of the volumes that have a label (a missing label is NaN
    in the truth: that volume is left out of this finding, never counted negative); ``n``: how
    many were left out."""
    y, s = np.asarray(truth, dtype=float), np.asarray(scores, dtype=float)
    known = ~np.isnan(y)
    return y[known].astype(int), s[known], int(np.count_nonzero(~known))


def evaluate_scores(
    scores: Mapping[str, Sequence[float]],
    labels: Mapping[str, Sequence[int]],
    volume_names: Sequence[str],
    protocol: str = "reference",
    thresholds: Mapping[str, float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    not_evaluated: Mapping[str, str] | None = None,
) -> EvaluationReport:
    """Evaluate a score table.

    Args:
        scores: label -> probabilities, one per volume (NaN: the anatomy could not be scored).
        labels: label -> 0/1 ground truth, same order (NaN: no label; left out of that label).
        volume_names: the volumes, same order (used to describe the split).
        protocol: ``"reference"`` (thresholds chosen on this set; NaN scores count as 0) or
            ``"strict"`` (``thresholds`` required; NaN scores left out).
        thresholds: fixed thresholds per label (from a calibration split or the model config).
            With ``reference`` they add a second block of metrics at these thresholds.
        n_bootstrap, seed: bootstrap of the AUC confidence interval.
        not_evaluated: findings the model scores that were left out before, and why (no ground
            truth in the data, anatomy segmented nowhere: see :func:`evaluable`); noted.

    Returns:
        :class:`EvaluationReport`; labels are in CT-RATE order, then any others.
    """
    from fvlm_core.metrics import evaluate_label

    if protocol not in ("reference", "strict"):
        raise ConfigError(f"--protocol {protocol!r}: use 'reference' or 'strict'")
    thresholds = dict(thresholds or {})
    order = [lbl for lbl in CTRATE_LABELS if lbl in scores] + [
        lbl for lbl in scores if lbl not in CTRATE_LABELS
    ]
    missing_truth = [lbl for lbl in order if lbl not in labels]
    if missing_truth:
        raise DataError(f"no ground-truth labels for scored label(s): {', '.join(missing_truth)}")
    if protocol == "strict":
        lacking = [lbl for lbl in order if lbl not in thresholds]
        if lacking:
            raise ConfigError(
                "--protocol strict needs a threshold fixed beforehand for every label; none for: "
                + ", ".join(lacking)
                + ". Give --calibration DIR (a separate calibration split) or a model folder with stored "
                "thresholds (fvlm evaluate ... --store-thresholds on the calibration split)."
            )
    notes: list[str] = []
    per_label, fixed = {}, {}
    for lbl in order:
        y, s, n_unlabelled = labelled(labels[lbl], scores[lbl])
        if n_unlabelled:
            notes.append(f"{lbl}: {n_unlabelled} volume(s) without a label (missing value) left out.")
        missing = np.isnan(s)
        n_missing = int(missing.sum())
        if protocol == "reference":
            s_ref, y_ref = np.where(missing, 0.0, s), y
        else:
            s_ref, y_ref = s[~missing], y[~missing]
        kw = {"n_bootstrap": n_bootstrap, "seed": seed, "n_missing": n_missing}
        if protocol == "reference":
            per_label[lbl] = evaluate_label(lbl, y_ref, s_ref, None, **kw)
            if lbl in thresholds:
                fixed[lbl] = evaluate_label(lbl, y_ref, s_ref, thresholds[lbl], **kw)
        else:
            per_label[lbl] = evaluate_label(lbl, y_ref, s_ref, thresholds[lbl], **kw)
        if n_missing:
            how = "counted as probability 0 (reference script)" if protocol == "reference" else "left out"
            notes.append(f"{lbl}: {n_missing} volume(s) whose anatomy could not be scored, {how}.")
    if protocol == "reference":
        notes.insert(
            0,
            "Thresholds were chosen on the evaluated set itself (reference protocol); this flatters "
            "accuracy/F1/precision. Use --protocol strict with a calibration split for unbiased numbers.",
        )
    not_evaluated = dict(not_evaluated or {})
    notes += [f"{lbl}: not evaluated ({why})." for lbl, why in not_evaluated.items()]
    not_covered = [lbl for lbl in CTRATE_LABELS if lbl not in scores and lbl not in not_evaluated]
    if not_covered:
        notes.append("Not scored by this model (no anatomy/finding): " + ", ".join(not_covered) + ".")
    return EvaluationReport(
        protocol=protocol,
        split=describe_split(volume_names),
        per_label=per_label,
        fixed=fixed,
        macro=_macros(per_label),
        macro_fixed=_macros(fixed) if fixed else {},
        notes=notes,
        meta={"n_bootstrap": n_bootstrap, "seed": seed},
    )


# --------------------------------------------------------------------------------------------


#: How each label's calibration was checked, in words for the report.
CHECKED_ON = {
    "held-out split": "fitted on the --calibration split, checked on the evaluated set (held out)",
    "stored calibration": "the model folder's stored calibration, checked on the evaluated set",
    "cross-fitted": "fitted on the evaluated set; checked by 5-fold cross-fitting (each volume "
    "calibrated by a map fitted on the other four folds)",
}


@dataclass
class CalibrationSource:
    """What the report's calibrations come from (see :func:`calibrate_report`)."""

    fit_scores: Mapping[str, np.ndarray] | None = None  # a separate calibration split's scores
    fit_truth: Mapping[str, np.ndarray] | None = None
    stored: Mapping[str, Any] = field(default_factory=dict)  # label -> the model's Calibration
    refit: bool = False  # --store-thresholds: fit on the evaluated set unless a split is given


def calibrate_report(
    report: EvaluationReport,
    scores: Mapping[str, Sequence[float]],
    truth: Mapping[str, Sequence[int]],
    source: CalibrationSource,
    seed: int = 0,
) -> None:
    """Fill ``report.calibration`` (before/after per label) and ``report.calibrations`` (maps
    fitted here). Per label: fitted on the calibration split and checked on this set; else the
    model's stored calibration checked on this set (unless ``source.refit``); else fitted on this
    set and checked by cross-fitting. Volumes whose anatomy was not scored are left out."""
    from fvlm_core.calibration import check_calibration, cross_fit, fit_calibration

    for lbl, r in report.per_label.items():
        y, s, _ = labelled(truth[lbl], scores[lbl])
        t = float(r.at_threshold.threshold)
        if source.fit_scores is not None and lbl in source.fit_scores and lbl in source.fit_truth:
            cal = report.calibrations[lbl] = fit_calibration(
                *labelled(source.fit_truth[lbl], source.fit_scores[lbl])[:2], seed
            )
            report.calibration[lbl] = check_calibration(y, s, cal, t, checked_on="held-out split")
        elif lbl in source.stored and not source.refit:
            report.calibration[lbl] = check_calibration(
                y, s, source.stored[lbl], t, checked_on="stored calibration"
            )
        else:
            cal = report.calibrations[lbl] = fit_calibration(y, s, seed)
            held_out = cross_fit(y, s, seed)
            report.calibration[lbl] = check_calibration(y, s, cal, t, held_out, checked_on="cross-fitted")


def calibration_macro(checks: Mapping[str, Any]) -> dict[str, float | None]:
    """Unweighted means over labels of the Brier score and ECE before and after calibration."""
    out: dict[str, float | None] = {"n_labels": len(checks)}
    for key in ("brier_raw", "brier_calibrated", "ece_raw", "ece_calibrated"):
        vals = [getattr(c, key) for c in checks.values() if not math.isnan(getattr(c, key))]
        out[key] = float(np.mean(vals)) if vals else None
    return out
