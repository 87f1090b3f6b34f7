"""Zero-shot evaluation with the CT-RATE protocol: per-label AUC (bootstrap 95% CI), thresholds, metrics.

Scores every volume of a dataset with a model (a CT-RATE layout, RAD-ChestCT, a folder of CTs with
one labels CSV: :mod:`fvlm_core.data.labelled`; or a ``fvlm prepare`` cache), or reads a score
table (``--scores``), then reports per label and as macro means: AUC with a bootstrap CI; at the
threshold, accuracy, weighted F1, positive-class F1, precision, sensitivity and specificity. A
label missing for a volume leaves that volume out of that label; findings without ground truth,
or whose anatomy was segmented in no volume, are named in the notes. Protocols:

* ``reference``: thresholds chosen on the evaluated set itself (closest ROC point to the corner
  over ``linspace(0, 1, 100)``), as the published numbers are; a volume whose anatomy could not
  be scored counts as probability 0 (the reference script's ``nan -> 0``).
* ``strict``: thresholds fixed beforehand, from a separate calibration set (``--calibration``) or
  the model folder's stored thresholds; volumes that could not be scored are left out and counted.

Windows (``--windows``; default ``reference`` under the reference protocol, ``centred`` under
strict): ``reference`` reproduces the public fVLM pipeline on a CT-RATE layout (``data/resize.py``
resizing, ``data/preprocess.py`` crop and -1150 HU padding, ``eval.py``'s windows, fp32): with the
official weights it gives eval.py's probabilities. RAD-ChestCT and cohort volumes go through the
same steps from their readers' LPS-ordered arrays (the CT-RATE volumes' axis order). A ``fvlm prepare`` cache cannot give them (its
HU are rounded and floored at -1024), so ``reference`` windows refuse a cache. ``centred`` and
``shared`` are the project's own windows on its physical resampling (:mod:`fvlm_core.zeroshot.windows`).

Calibration (:mod:`fvlm_core.calibration`): per label, a strictly increasing map from the raw
score to a probability (Platt or isotonic, chosen by cross-validated log-loss; the raw score is
kept with too few positives or negatives), checked on data not used to fit it: fitted on the
``--calibration`` split and checked on ``--data``; else the model's stored calibration checked on
``--data``; else (or with ``--store-thresholds``) fitted on ``--data`` and checked by 5-fold
cross-fitting (every volume calibrated by a map fitted on the other folds). The report gives the
Brier score and expected calibration error before and after, the AUC before and after (equal),
and the threshold on both scales.

Writes ``metrics.json``, ``report.md``, ``scores.csv``, ROC curves (``roc/*.png``, ``roc_all.png``)
and reliability diagrams (``reliability/*.png``, ``reliability_all.png``) to ``--out``;
``--store-thresholds`` saves the chosen thresholds and the fitted calibrations into the model
folder's config so that ``fvlm analyze`` uses them. The outputs are checked before any work
(:func:`output_plan`) and written all or none (the report and the stored config together).

Scoring with a model keeps its work. Each volume's scores go into ``--out/volume_scores/``
(``data.jsonl``; ``calibration.jsonl`` for the ``--calibration`` split; :mod:`fvlm_core.journal`)
as soon as they are computed, so a crash or a kill loses at most the volume in flight, and a
re-run with the same ``--out`` continues from them without encoding those volumes again. The
journal records the model (SHA-256 of its weights and text encoder files, its config), the
prompts, the windows and the dataset, and a re-run with any of them changed is refused before
any volume is encoded. Once every volume is scored, ``scores.csv`` is written at once; a failure
after that (metrics, calibration, the report or its plots) leaves the scores and says which step
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.data.labelled import LAYOUT_NAMES
from fvlm_core.data.layout import scan_id_of, volume_stem
from fvlm_core.errors import ConfigError, DataError, FVLMError, warn
from fvlm_core.findings import CTRATE_LABELS, FVLM_LABELS

#: Sizes of the CT-RATE validation split as released: 3,039 volumes (reconstructions) of 1,564 scans.
CTRATE_VALID_VOLUMES = 3039
CTRATE_VALID_SCANS = 1564


# --------------------------------------------------------------------------------------------
# Split description
# --------------------------------------------------------------------------------------------


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
# Calibration
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


def calibration_table(checks: Mapping[str, Any]) -> list[str]:
    """Markdown rows: per label the method, AUC raw / calibrated, Brier and ECE raw -> calibrated
    and the threshold on both scales; then the means."""
    head = "| label | n | pos | method | AUC raw / calibrated | Brier raw -> cal. | ECE raw -> cal. | threshold raw -> cal. |"
    lines = [head, "|" + "---|" * 8]
    for lbl, c in checks.items():
        thr = f"{_fmt(c.threshold_raw, 4)} -> {_fmt(c.threshold_calibrated, 4)}"
        lines.append(
            f"| {lbl} | {c.n} | {c.n_positive} | {c.method} | {_fmt(c.auc_raw, 4)} / {_fmt(c.auc_calibrated, 4)} | "
            f"{_fmt(c.brier_raw, 4)} -> {_fmt(c.brier_calibrated, 4)} | {_fmt(c.ece_raw, 4)} -> "
            f"{_fmt(c.ece_calibrated, 4)} | {thr} |"
        )
    m = calibration_macro(checks)
    lines.append(
        f"| **mean** ({m['n_labels']} labels) | | | | | {_fmt(m['brier_raw'], 4)} -> {_fmt(m['brier_calibrated'], 4)} "
        f"| {_fmt(m['ece_raw'], 4)} -> {_fmt(m['ece_calibrated'], 4)} | |"
    )
    return lines


def _calibration_markdown(report: EvaluationReport) -> list[str]:
    from fvlm_core.metrics import ECE_BINS

    how = sorted({c.checked_on for c in report.calibration.values()})
    lines = [
        "",
        "## Calibration (raw score -> probability)",
        "",
        "Brier score (mean squared error of the probability) and expected calibration error "
        f"({ECE_BINS} equal-width bins) before and after calibration, on volumes not used to fit it: "
        + "; ".join(CHECKED_ON[h] for h in how)
        + ". The AUC is unchanged by construction (strictly increasing maps), and so are the "
        "decisions at the threshold, shown on both scales. Reliability diagrams: `reliability_all.png`.",
        "",
        *calibration_table(report.calibration),
        "",
        "Method per label (chosen by cross-validated log-loss on the data it was fitted on):",
        "",
    ]
    return lines + [f"- {lbl}: {c.reason}" for lbl, c in report.calibration.items()]


# --------------------------------------------------------------------------------------------
# Report files
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(results: Mapping[str, Any], macro: Mapping[str, dict]) -> list[str]:
    head = "| label | n | pos | AUC [95% CI] | threshold | acc | wF1 | F1+ | prec | sens | spec |"
    lines = [head, "|" + "---|" * 11]
    for lbl, r in results.items():
        m = r.at_threshold
        ci = f"[{_fmt(r.auc_ci[0])}, {_fmt(r.auc_ci[1])}]"
        lines.append(
            f"| {lbl} | {r.n} | {r.n_positive} | {_fmt(r.auc)} {ci} | {_fmt(m.threshold)} ({r.threshold_source}) | "
            f"{_fmt(m.accuracy)} | {_fmt(m.f1_weighted)} | {_fmt(m.f1_positive)} | {_fmt(m.precision)} | "
            f"{_fmt(m.sensitivity)} | {_fmt(m.specificity)} |"
        )
    for name, mm in macro.items():
        n_auc = mm.get("n_defined", {}).get("auc", mm["n_labels"])
        auc_over = "" if n_auc == mm["n_labels"] else f" over {n_auc}"
        lines.append(
            f"| **macro {name}** ({mm['n_labels']} labels) | | | {_fmt(mm['auc'])}{auc_over} | | {_fmt(mm['accuracy'])} | "
            f"{_fmt(mm['f1_weighted'])} | {_fmt(mm['f1_positive'])} | {_fmt(mm['precision'])} | "
            f"{_fmt(mm['sensitivity'])} | {_fmt(mm['specificity'])} |"
        )
    return lines


def render_markdown(report: EvaluationReport, title: str = "Zero-shot evaluation") -> str:
    lines = [
        f"# {title}",
        "",
        f"- Protocol: **{report.protocol}**",
        f"- Data: {report.split['description']}",
        f"- AUC CI: percentile bootstrap, {report.meta.get('n_bootstrap')} resamples, seed {report.meta.get('seed')}",
    ]
    for k, v in report.meta.items():
        if k not in ("n_bootstrap", "seed"):
            lines.append(f"- {k}: {v}")
    lines += ["", "## Per label", "", *_table(report.per_label, report.macro)]
    if report.fixed:
        lines += ["", "## At thresholds fixed beforehand", "", *_table(report.fixed, report.macro_fixed)]
    if report.calibration:
        lines += _calibration_markdown(report)
    if report.retrieval is not None:
        lines += retrieval_markdown(report.retrieval)
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically: all of it or nothing) and free it."""
    from fvlm_core.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        _pyplot().close(fig)
    return Path(path)


def _panel_grid(n: int, cell_inches: float):
    """A figure of ``n`` small panels, 4 a row: ``(fig, axes)`` with the ``n`` axes to draw in
    (the grid's spare cells are blank)."""
    cols = 4
    rows = -(-n // cols)
    fig, axes = _pyplot().subplots(
        rows, cols, figsize=(cell_inches * cols, cell_inches * rows), dpi=70, squeeze=False
    )
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()[:n]


def plot_rocs(report: EvaluationReport, out_dir: str | os.PathLike) -> list[Path]:
    """One ROC PNG per label (``roc/<label>.png``) and an overview (``roc_all.png``)."""
    from fvlm_core.outputs import file_stems

    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    items = [(k, v) for k, v in report.per_label.items() if v.roc]
    stems = file_stems([k for k, _ in items])  # distinct files even for labels named alike
    for lbl, r in items:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.plot(r.roc["fpr"], r.roc["tpr"], lw=1.5, label=f"AUC {_fmt(r.auc)}")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        m = r.at_threshold
        if not math.isnan(m.sensitivity) and not math.isnan(m.specificity):
            ax.plot([1 - m.specificity], [m.sensitivity], "o", c="red", label=f"t = {m.threshold:.3f}")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=lbl, xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        paths.append(_save_png(fig, out_dir / "roc" / f"{stems[lbl]}.png"))
    if items:
        fig, axes = _panel_grid(len(items), 3)
        for ax, (lbl, r) in zip(axes, items):
            ax.plot(r.roc["fpr"], r.roc["tpr"], lw=1.2)
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.6)
            ax.set_title(f"{lbl}\nAUC {_fmt(r.auc)}", fontsize=8)
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        paths.append(_save_png(fig, out_dir / "roc_all.png"))
    return paths


def _reliability_axes(ax, check, title: str, fontsize: int = 8) -> None:
    """One reliability diagram: observed fraction of positives against the mean score per bin,
    raw and calibrated (marker area ~ volumes in the bin), and the diagonal."""
    from fvlm_core.metrics import reliability_bins

    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    for values, name, ece, color in (
        (check.raw, "raw score", check.ece_raw, "tab:orange"),
        (check.calibrated, f"calibrated ({check.method})", check.ece_calibrated, "tab:blue"),
    ):
        if check.method == "none" and name != "raw score":
            continue
        b = reliability_bins(check.y, values)
        keep = b.nonempty
        size = 8 + 60 * b.count[keep] / max(1, int(b.count.max()))
        ax.plot(b.mean_predicted[keep], b.fraction_positive[keep], "-", c=color, lw=1.0)
        ax.scatter(
            b.mean_predicted[keep],
            b.fraction_positive[keep],
            s=size,
            c=color,
            label=f"{name}, ECE {_fmt(ece)}",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted", ylabel="observed fraction")
    ax.set_title(title + (" (raw score kept)" if check.method == "none" else ""), fontsize=fontsize)
    ax.legend(loc="upper left", fontsize=fontsize - 2)


def plot_reliability(
    checks: Mapping[str, Any],
    path: str | os.PathLike,
    per_label_dir: str | os.PathLike | None = None,
    title: str = "",
) -> list[Path]:
    """Reliability diagrams of :class:`~fvlm_core.calibration.CalibrationCheck`\\ s: all labels in
    one PNG at ``path`` and, with ``per_label_dir``, one PNG per label there."""
    from fvlm_core.outputs import file_stems

    plt = _pyplot()
    paths = []
    items = [(k, c) for k, c in checks.items() if c.n]
    stems = file_stems([k for k, _ in items])
    for lbl, c in items if per_label_dir is not None else []:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        _reliability_axes(ax, c, lbl, 9)
        fig.tight_layout()
        paths.append(_save_png(fig, Path(per_label_dir) / f"{stems[lbl]}.png"))
    if items:
        fig, axes = _panel_grid(len(items), 3.2)
        for ax, (lbl, c) in zip(axes, items):
            _reliability_axes(ax, c, lbl, 8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        paths.append(_save_png(fig, path))
    return paths


def write_report(
    report: EvaluationReport,
    out_dir: str | os.PathLike,
    scores: Mapping[str, Sequence[float]] | None = None,
    volume_names: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md``, optional ``scores.csv`` and ROC PNGs into ``out_dir``."""
    from fvlm_core.atomic import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "json": atomic_write_text(out_dir / "metrics.json", json.dumps(report.to_dict(), indent=2)),
        "markdown": atomic_write_text(out_dir / "report.md", render_markdown(report)),
    }
    if scores is not None and volume_names is not None:
        written["scores"] = atomic_write_text(out_dir / "scores.csv", score_table_csv(scores, volume_names))
    if plots:
        written["roc"] = out_dir / "roc_all.png"
        plot_rocs(report, out_dir)
        if report.calibration:
            written["reliability"] = out_dir / "reliability_all.png"
            plot_reliability(
                report.calibration,
                written["reliability"],
                out_dir / "reliability",
                "Reliability (before/after calibration)",
            )
    return written


def store_thresholds(
    model_dir: str | os.PathLike,
    thresholds: Mapping[str, float],
    source: str = "",
    calibration: Mapping[str, Any] | None = None,
    to: str | os.PathLike | None = None,
    findings: Sequence[Any] | None = None,
) -> Path:
    """Save ``thresholds`` (finding name -> value on the raw scale) and ``calibration`` (finding
    name -> :class:`~fvlm_core.calibration.Calibration`) into ``model_dir/config.yaml``
    (atomically; only that file: the weights' record of the architecture stays as it was), or
    into ``to`` (a staged file that replaces it later: :func:`run` writes all outputs or none).

    Each is stored with what it was fitted with (``calibrated_with``: the finding's anatomy and
    wordings, from ``findings`` (the scored ones, ``--prompts`` included) or else the config's
    finding of that name, and the folder's text identity; :mod:`fvlm_core.model.calibrated_with`),
    so that it is used only for that finding as worded then, with that text side. A name with no
    known wording is not stored. Existing thresholds and calibrations of other findings are kept.
    ``fvlm analyze`` then reports them as ``threshold_source: calibrated`` and gives calibrated
    probabilities.
    """
    from fvlm_core.model.calibrated_with import fitted_with
    from fvlm_core.model.config import load_config
    from fvlm_core.model.prompt_store import folder_text_identity

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{model_dir}: no config.yaml; --store-thresholds needs a model folder.")
    cfg = load_config(model_dir)
    scored = {f.name: f for f in (findings if findings is not None else cfg.finding_set())}
    known = {**{f.name: f for f in cfg.finding_set()}, **scored}
    identity = folder_text_identity(model_dir, cfg)
    clean = {
        k: float(v)
        for k, v in thresholds.items()
        if v is not None and not math.isnan(float(v)) and k in known
    }
    fitted = {k: c for k, c in (calibration or {}).items() if k in known}
    cfg.thresholds = {**cfg.thresholds, **clean}
    cfg.calibration = {**cfg.calibration, **{k: c.to_dict() for k, c in fitted.items()}}
    for name in {*clean, *fitted}:
        cfg.calibrated_with[name] = fitted_with(known[name], identity)
    if source:
        cfg.versions = {**cfg.versions, "thresholds_from": source}
    cfg.save(Path(to) if to is not None else cfg_path)
    return cfg_path


# --------------------------------------------------------------------------------------------
# Score tables
# --------------------------------------------------------------------------------------------


def score_table_csv(scores: Mapping[str, Sequence[float]], volume_names: Sequence[str]) -> str:
    """A score table as CSV text: ``VolumeName`` and one column per label (empty = not scored)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["VolumeName", *scores])
    columns = [np.asarray(v, dtype=float) for v in scores.values()]
    for i, name in enumerate(volume_names):
        writer.writerow([name, *("" if math.isnan(c[i]) else repr(float(c[i])) for c in columns)])
    return buf.getvalue()


def _read_csv(path: str | os.PathLike, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a CSV with a ``VolumeName`` column (cells stripped)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV {what} ({exc})") from exc
    if "VolumeName" not in columns:
        raise DataError(f"{path}: a {what} needs a VolumeName column, found {columns}")
    if not rows:
        raise DataError(f"{path}: the {what} has a header but no rows: there is nothing to evaluate.")
    return [c for c in columns if c != "VolumeName"], rows


def _number(cell: str) -> float:
    """A CSV cell as a float: empty or ``nan`` -> NaN; raises ValueError for text."""
    return float("nan") if cell == "" or cell.lower() == "nan" else float(cell)


def read_score_table(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """A CSV with ``VolumeName`` and one probability column per label (empty / NaN = not scored)."""
    from fvlm_core.findings import same_name_groups

    labels, rows = _read_csv(path, "score table")
    clash = same_name_groups(labels)
    if clash:
        raise DataError(
            f"{path}: columns named alike ({'; '.join(' and '.join(map(repr, g)) for g in clash)}): labels that "
            "differ only in case, spaces or punctuation would share their report entries and files. Rename or "
            "merge them."
        )
    scores: dict[str, np.ndarray] = {}
    for lbl in labels:
        try:
            scores[lbl] = np.asarray([_number(r[lbl]) for r in rows], dtype=float)
        except ValueError as exc:
            raise DataError(
                f"{path}: column {lbl!r} holds a value that is not a probability ({exc})"
            ) from exc
    return [r["VolumeName"] for r in rows], scores


def read_label_table(
    path: str | os.PathLike, volume_names: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Ground truth for ``volume_names`` from a label CSV (``VolumeName`` + one column per label,
    e.g. CT-RATE's multi_abnormality_labels): label -> ``(N,)`` 0/1, NaN where missing.

    Volumes match by name with or without ``.nii.gz``; a volume listed twice counts once (its
    first row). ``labels``: the columns to read (the score table's; those the CSV lacks are left
    out); None: every column of numbers (text columns are left out). Cells follow
    the rule of every layout (:func:`fvlm_core.data.readers.label_value`): 1, 0, or missing
    (left out of that label); any other value in a column read is an error naming each row and
    column, raised before any work.
    """
    from fvlm_core.data.readers import MISSING_VALUES, LabelCells

    columns, rows = _read_csv(path, "label table")
    by_name: dict[str, tuple[int, dict[str, str]]] = {}
    for line, r in enumerate(rows, start=2):
        by_name.setdefault(volume_stem(r["VolumeName"]), (line, r))
    absent = [v for v in volume_names if volume_stem(v) not in by_name]
    if absent:
        raise DataError(f"{path}: no labels for {len(absent)} scored volume(s), e.g. {absent[:3]}")

    def numeric(column: str) -> bool:  # numbers (labels or not) and missing cells: not a text column
        try:
            for r in rows:
                if r[column].strip().lower() not in MISSING_VALUES:
                    float(r[column])
        except ValueError:
            return False
        return True

    wanted = [c for c in columns if numeric(c)] if labels is None else [c for c in labels if c in columns]
    cells = LabelCells(path)
    chosen = [by_name[volume_stem(v)] for v in volume_names]
    out = {}
    for c in wanted:
        values = [cells.value(r[c], r["VolumeName"], c, line) for line, r in chosen]
        out[c] = np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)
    cells.check()
    return out


# --------------------------------------------------------------------------------------------
# Scoring a dataset with a model
# --------------------------------------------------------------------------------------------


class VolumeSource:
    """Volumes of a labelled dataset or a ``fvlm prepare`` cache, loaded one at a time.

    Datasets (:mod:`fvlm_core.data.labelled`, the layout found from the folder): a CT-RATE
    layout, RAD-ChestCT (NPZ files and its abnormality x location CSV), or a labelled cohort
    (CTs in any format the project reads and one CSV). ``names`` are the volumes to score,
    sorted (CT-RATE: as its CSVs name them; otherwise scan names; a cache: sample names).
    ``load(name)`` gives ``(ct, labels, truth)``: ``ct`` a :class:`~fvlm_core.io.CTVolume` (its
    own grid for a dataset, model space for a cache), ``labels`` a
    :class:`~fvlm_core.io.LabelVolume` in the model's anatomy order on the same grid, ``truth``
    finding name -> 0/1, or ``None`` where the label is missing (left out of that finding).
    CT-RATE volumes are read as ``fvlm prepare`` reads them (geometry and HU scaling from the
    metadata CSV). Anatomies come from the segmentation ``backend`` through the same
    :func:`~fvlm_core.data.ctrate.make_segmenter` as ``fvlm prepare``: ``labelmap`` (label maps
    named like the volumes in ``masks_dir``, default ``DATA/anatomy_masks`` for CT-RATE; a
    ``class_map.json`` beside them names their values; the default when there are masks),
    ``totalsegmentator`` or ``builtin`` (lungs only).

    Before any volume is read it refuses: listed volumes missing on disk or unreadable, volumes
    without a mask for ``labelmap``, a cohort column that matches none of ``findings`` (unless
    in ``ignore_columns``; ``ignore_columns=None`` keeps every column as a label of its own
    name, as ``fvlm embed`` does), and a dataset with no labelled volume.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        model_anatomies: Sequence[str],
        split: str = "valid",
        masks_dir: str | os.PathLike | None = None,
        dedupe_scans: bool = False,
        limit: int | None = None,
        *,
        labels: str | os.PathLike | None = None,
        backend: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        radchest_mapping: str = "hlip",
        findings: Sequence[str] = (),
        ignore_columns: Sequence[str] | None = (),
    ) -> None:
        from fvlm_core.anatomy import get_catalog
        from fvlm_core.data.cache import CacheSamples, is_cache_folder

        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DataError(f"--data {self.data_dir}: no such folder")
        self.catalog = get_catalog(list(model_anatomies))
        self.is_cache = is_cache_folder(self.data_dir)
        self.notes: list[str] = []
        self.layout = "cache"
        if self.is_cache:
            cache = CacheSamples(self.data_dir, reconstruction="first" if dedupe_scans else "all")
            names = [volumes[0] for volumes in cache.items]
        else:
            from fvlm_core.data.labelled import DatasetOptions

            options = DatasetOptions(
                split=split,
                labels=str(labels) if labels else None,
                masks=str(masks_dir) if masks_dir else None,
                radchest_mapping=radchest_mapping,
                findings=tuple(findings),
            )
            names = self._open_layout(options, ignore_columns)
            self.segment = self._segmenter(backend, backend_options)
            names = self._one_per_scan(names) if dedupe_scans else names
        self.names: list[str] = names[:limit]

    def _open_layout(self, options, ignore_columns: Sequence[str]) -> list[str]:
        """Read the dataset's tables; the labelled volumes' names, sorted."""
        from fvlm_core.data.labelled import open_dataset
        from fvlm_core.data.readers import LabelValueError

        try:
            self.reader = open_dataset(self.data_dir, options)
        except LabelValueError:
            raise  # the folder is a dataset: its label cells are what is wrong
        except DataError as exc:
            raise DataError(
                f"{exc} --data must be a CT-RATE layout folder (see --split), a RAD-ChestCT or labelled "
                "cohort folder (see --labels), or a `fvlm prepare` cache."
            ) from exc
        self.layout = self.reader.layout
        if not self.reader.has_labels:
            raise DataError(
                f"{self.data_dir}: no multi_abnormality_labels CSV for split {options.split!r}; evaluation needs "
                "the ground-truth labels."
            )
        if self.reader.skipped:
            name, reason = self.reader.skipped[0]
            raise DataError(
                f"{self.data_dir}: {len(self.reader.skipped)} listed volume(s) cannot be evaluated, e.g. "
                f"{name}: {reason}. Complete the dataset, leave those rows out of the labels, or evaluate "
                "a `fvlm prepare` cache."
            )
        unknown = [
            c
            for c in getattr(getattr(self.reader, "table", None), "unmatched", [])
            if ignore_columns is not None and c not in ignore_columns
        ]
        if unknown:
            raise DataError(
                f"{self.reader.table.path}: column(s) {', '.join(map(repr, unknown))} match none of the findings "
                f"({', '.join(self.reader.findings)}). Rename a column to its finding's "
                "name, define a finding of that name with --prompts FILE to evaluate it, or leave it out with "
                f"--ignore-columns {','.join(unknown)}."
            )
        self.notes = list(self.reader.notes)
        self.records = {
            r.metadata.get("VolumeName", r.name).strip(): r
            for r in self.reader.records
            if r.labels is not None
        }
        if not self.records:
            raise DataError(f"--data {self.data_dir}: no labelled volume to evaluate (the cohort is empty).")
        return sorted(self.records)

    def _segmenter(self, backend: str | None, options: Mapping[str, Any] | None):
        """The anatomy segmenter (see the class docstring), checked before the work."""
        from fvlm_core.data.ctrate import make_segmenter
        from fvlm_core.segmentation import get_backend

        masks = self.reader.masks_dir
        self.backend = backend or "labelmap"
        if self.backend == "labelmap":
            lacking = sorted(n for n, r in self.records.items() if r.mask_path is None)
            if lacking:
                where = masks or (self.data_dir / "anatomy_masks" if self.layout == "ctrate" else None)
                raise DataError(
                    f"{len(lacking)} volume(s) have no anatomy mask{f' under {where}' if where else ''}, e.g. "
                    f"{lacking[0]}. Give --masks DIR (anatomy label maps named like the volumes), or segment "
                    "them: --backend totalsegmentator (all four CT-RATE anatomies) or --backend builtin "
                    "(lungs only: the lung findings)."
                )
        elif self.backend == "totalsegmentator":
            get_backend(self.backend, **(options or {})).check(self.catalog)
            self.notes.append("Anatomies segmented by TotalSegmentator.")
        elif self.backend == "builtin":
            self.notes.append(
                "Anatomies segmented by the built-in segmenter, which finds the lungs only: findings on "
                "other anatomies cannot be scored (use --backend totalsegmentator or --masks)."
            )
        extra = dict(options or {}) if self.backend == "totalsegmentator" else {}
        return make_segmenter(self.backend, self.catalog, masks_dir=masks, **extra)

    def _one_per_scan(self, names: Sequence[str]) -> list[str]:
        """The first volume (by name) of each scan."""
        seen: dict[str, str] = {}
        for name in sorted(names):
            seen.setdefault(self.records[name].scan_id, name)
        return sorted(seen.values())

    def __len__(self) -> int:
        return len(self.names)

    def files(self) -> set[str]:
        """The files of :attr:`names` (real paths): two sources sharing one share a volume."""
        if self.is_cache:
            from fvlm_core.data.cache import sample_paths

            return {os.path.realpath(sample_paths(self.data_dir, n)[0]) for n in self.names}
        return {os.path.realpath(self.records[n].path) for n in self.names}

    def labelled_findings(self) -> set[str]:
        """The findings with a label (not missing) for at least one of :attr:`names`."""
        return {k for name in self.names for k, v in self.truth(name).items() if v is not None}

    def may_segment(self, anatomy: str) -> bool:
        """Whether the segmentation can give ``anatomy`` (the built-in one finds lungs and bone
        only; masks and TotalSegmentator: yes, as far as is known before reading them)."""
        return self.is_cache or self.backend != "builtin" or anatomy in ("lung", "bone")

    def truth(self, name: str) -> dict[str, int]:
        """The CT-RATE labels of ``name`` as 0/1, without reading its image."""
        if self.is_cache:
            from fvlm_core.data.cache import read_sidecar, sample_paths

            info = read_sidecar(sample_paths(self.data_dir, name)[1])
            return {k: int(v) for k, v in info["finding_labels"].items()}
        return dict(self.records[name].labels)

    def load(self, name: str):
        from fvlm_core.io import CTVolume, LabelVolume

        if self.is_cache:
            from fvlm_core.data.cache import load_sample

            s = load_sample(self.data_dir, name)
            lab = self.catalog.relabel(s.labels, s.anatomies)
            ct = CTVolume(s.hu.astype(np.float32), s.geometry, source=f"{self.data_dir}/{name}")
            truth = {k: int(v) for k, v in s.finding_labels.items()}
            return ct, LabelVolume(lab, s.geometry, source=ct.source), truth
        record = self.records[name]
        ct = self.reader.read_ct(record)
        lab = self.segment(ct, record)
        source = str(record.mask_path) if self.backend == "labelmap" else f"<{self.backend} segmentation>"
        return ct, LabelVolume(lab, ct.geometry, source=source), dict(record.labels)


def _refuse_cache_for_reference(data_dir: str | os.PathLike) -> None:
    raise ConfigError(
        f"--data {data_dir} is a `fvlm prepare` cache: its volumes hold HU rounded to integers and "
        "floored at -1024 after the project's resampling, so the public eval.py's probabilities cannot "
        "be reproduced from it (the reference keeps [-1150, -1024) HU and resizes the original "
        "array). Give the CT-RATE folder instead (--data /data/CT-RATE --split valid), or evaluate "
        "the cache with the project's windows (--windows centred or shared)."
    )


def _to_model_space(ct, labels, ms, windows: str):
    """The volume the window planner works on: eval.py's resizing (``reference``), else the
    project's resampling (skipped for a volume already on a model-space grid, e.g. a cache)."""
    from fvlm_core.preprocess import reference_resize, resample_to_model_space

    if windows == "reference":
        return reference_resize(ct, labels, ms)
    g = ct.geometry
    in_model_space = np.allclose(g.spacing_zyx, ms.spacing_zyx) and np.allclose(
        g.direction_matrix, _direction(ms.orientation)
    )
    return (ct, labels) if in_model_space else resample_to_model_space(ct, labels, ms)


def score_dataset(
    analyzer,
    data_dir: str | os.PathLike,
    split: str = "valid",
    windows: str = "reference",
    dedupe_scans: bool = False,
    limit: int | None = None,
    masks_dir: str | os.PathLike | None = None,
    progress=None,
    journal=None,
    *,
    findings=None,
    source: VolumeSource | None = None,
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score the findings on every volume: ``(names, scores, truth)``.

    ``windows``: ``reference`` (the public eval.py pipeline), ``centred`` or ``shared``
    (:mod:`fvlm_core.zeroshot.windows`). ``findings``: default the model's. ``source``: the
    volumes, opened already (a RAD-ChestCT or cohort folder with its options); default a
    :class:`VolumeSource` of ``data_dir``. ``scores[label]`` holds one probability per volume,
    NaN where the label's anatomy could not be scored (absent from the volume);
    ``truth[label]`` 0/1 per volume, NaN where the label is missing.
    ``journal``: an :class:`~fvlm_core.journal.ItemJournal` opened with :func:`scoring_identity`:
    each volume's scores are added to it as soon as they are computed, and a volume already in
    it is not loaded or encoded again (its labels are read afresh: a corrected label table counts).
    """
    findings = list(findings if findings is not None else analyzer.default_findings())
    if source is None:
        source = VolumeSource(
            data_dir,
            analyzer.anatomies,
            split,
            masks_dir,
            dedupe_scans,
            limit,
            findings=[f.name for f in findings],
        )
    if windows == "reference" and source.is_cache:
        _refuse_cache_for_reference(data_dir)
    reused = [n for n in source.names if journal is not None and n in journal]
    if reused and progress:
        progress(f"{len(reused)} of {len(source)} volume(s) scored earlier, kept in {journal.path}", 0.0)
    emb = analyzer.finding_embeddings(findings) if len(reused) < len(source) else None  # once
    ms = analyzer.model_space
    from fvlm_core.segmentation.plausibility import check_intensities

    names: list[str] = []
    rows: list[dict[str, float]] = []
    truths: list[dict[str, int | None]] = []
    misfit: list[tuple[str, Any]] = []  # (volume, anatomy whose intensities do not fit its tissue)
    for i, name in enumerate(source.names):
        if journal is not None and name in journal:
            row, truth = _scores_from_record(journal[name]), source.truth(name)
            how = "scored earlier"
        else:
            ct, labels, truth = source.load(name)
            ct, labels = _to_model_space(ct, labels, ms, windows)
            misfit += [(name, f) for f in check_intensities(ct.array, labels.array, analyzer.anatomies)]
            enc = analyzer.encode_model_space(ct, labels, strategy=windows)
            probs = analyzer.score(enc, emb)
            row = {f.name: probs.get((f.anatomy, f.name), float("nan")) for f in findings}
            if journal is not None:
                journal.add(name, {"scores": {k: None if math.isnan(v) else v for k, v in row.items()}})
            how = f"{len(enc.plans)} window(s)"
        rows.append(row)
        names.append(name)
        truths.append(truth)
        if progress:
            progress(f"{name}: {how}", (i + 1) / max(len(source), 1))
    if not names:
        raise DataError(f"--data {data_dir}: no volumes to score")
    if misfit:  # a mask of another scan, or misaligned: named in the report's notes
        source.notes.append(_misfit_note(misfit))
        warn(source.notes[-1])
    scores = {f.name: np.asarray([r[f.name] for r in rows], dtype=float) for f in findings}
    return names, scores, truth_table(truths, scores)


def _misfit_note(misfit: Sequence[tuple[str, Any]]) -> str:
    """The note on volumes whose segmentation does not fit their CT (:mod:`fvlm_core.segmentation.plausibility`)."""
    volumes = sorted({name for name, _ in misfit})
    name, first = misfit[0]
    return (
        f"{len(volumes)} volume(s) have a segmentation whose intensities do not fit its anatomies (a mask of "
        f"another scan, or misaligned?), e.g. {name}: {first.describe()}. Their scores are kept; check the masks "
        f"of: {', '.join(volumes[:10])}{' ...' if len(volumes) > 10 else ''}."
    )


def truth_table(truths: Sequence[Mapping[str, int | None]], labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Per label of ``labels`` that some volume has, its 0/1 per volume (NaN: missing)."""
    return {
        lbl: np.asarray([np.nan if t.get(lbl) is None else float(t[lbl]) for t in truths], dtype=float)
        for lbl in labels
        if any(t.get(lbl) is not None for t in truths)
    }


def _scores_from_record(record: Mapping[str, Any]) -> dict[str, float]:
    """A volume's scores from its journal record (null: not scored, NaN)."""
    return {k: float("nan") if v is None else float(v) for k, v in record["scores"].items()}


#: Sub-folder of ``--out`` where the per-volume scores are kept as they are computed.
JOURNAL_DIR = "volume_scores"


def model_identity(model_dir: str | os.PathLike, config) -> dict[str, Any]:
    """What a model folder's scores depend on: SHA-256 of its weights and of its text encoder's
    files (tokenizer), its config (without what ``--store-thresholds`` changes: thresholds,
    calibrations, provenance) and its findings' prompts."""
    import hashlib

    from fvlm_core.model.weights import weights_sha256

    def digest(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            h.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
        return h.hexdigest()

    model_dir = Path(model_dir)
    cfg = config.encoder_dict()
    prompts = [[f.anatomy, f.name, list(f.negative), list(f.positive)] for f in config.finding_set()]
    text = sorted(p for p in (model_dir / "text").rglob("*") if p.is_file())
    return {
        "model weights (sha256)": weights_sha256(model_dir),
        "text encoder files (sha256)": digest(text),
        "model config": cfg,
        "prompts": prompts,
    }


def scoring_identity(
    model: Mapping[str, Any],
    data_dir: str | os.PathLike,
    split: str,
    windows: str,
    masks_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The identity of a score journal (:mod:`fvlm_core.journal`): the ``model`` (its
    :func:`model_identity`) and how the volumes are read and windowed. The choice of volumes (``--limit``,
    ``--one-per-scan``) is not part of it: any subset reuses what was scored."""
    from fvlm_core.data.cache import is_cache_folder

    data = Path(data_dir).resolve()
    return {
        **model,
        "windows": windows,
        "dataset": str(data),
        "split": None if is_cache_folder(data) else split,
        "masks": None if masks_dir is None else str(Path(masks_dir).resolve()),
    }


def _direction(orientation: str) -> np.ndarray:
    from fvlm_core.preprocess import _direction_for

    return _direction_for(orientation)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fvlm_core.commands.segment import add_totalsegmentator_arguments
    from fvlm_core.data.radchest_labels import RADCHEST_MAPPINGS

    parser.add_argument(
        "--data",
        help="dataset: a CT-RATE layout folder, a RAD-ChestCT folder (NPZ files + its abnormality x location "
        "CSV), a folder of CTs with one labels CSV (your cohort), or a `fvlm prepare` cache folder",
    )
    parser.add_argument("--model", help="model folder (config.yaml + weights)")
    parser.add_argument(
        "--scores", help="evaluate a score table CSV (VolumeName + one column per label) instead of a model"
    )
    parser.add_argument(
        "--embeddings",
        metavar="STORE",
        help="evaluate from an embedding store (`fvlm embed`) without reading a volume: its scans' labels "
        "(or --labels CSV), the model's findings and --prompts scored from the stored embeddings; adds "
        "CT-CLIP's retrieval metrics (report -> volume recall@k, volume -> volume MAP@k), per anatomy and "
        "whole-scan; --model defaults to the store's",
    )
    parser.add_argument(
        "--labels",
        help="with --data: the label CSV of a RAD-ChestCT or cohort folder (default: the one in the folder); "
        "with --scores: the ground-truth CSV (CT-RATE multi_abnormality_labels)",
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="YAML/JSON findings to score besides the model's (name, anatomy, positive, negative); a cohort "
        "CSV column of the same name is their ground truth",
    )
    parser.add_argument(
        "--ignore-columns",
        metavar="A,B",
        help="cohort CSV columns to leave out (a column that matches no finding is refused otherwise)",
    )
    parser.add_argument(
        "--radchest-mapping",
        choices=tuple(RADCHEST_MAPPINGS),
        default="hlip",
        help="RAD-ChestCT labels -> CT-RATE findings: hlip (HLIP's public mapping, any location; default) or "
        "location (calcification of the heart/aorta, hiatal hernias only)",
    )
    parser.add_argument(
        "--backend",
        choices=("labelmap", "totalsegmentator", "builtin"),
        default=None,
        help="anatomy segmentation: labelmap (the label maps of --masks or CT-RATE's anatomy_masks; the "
        "default), totalsegmentator, or builtin (lungs only: only lung findings can be scored)",
    )
    add_totalsegmentator_arguments(parser)
    parser.add_argument("--protocol", choices=("reference", "strict"), default="reference")
    parser.add_argument("--calibration", help="strict protocol: calibration split (same kinds as --data)")
    parser.add_argument("--split", default="valid", help="CT-RATE split folder to score (default: valid)")
    parser.add_argument(
        "--one-per-scan", action="store_true", help="score one reconstruction per scan (1,564-scan view)"
    )
    parser.add_argument(
        "--masks",
        help="anatomy label maps named like the volumes, as for `fvlm prepare` (CT-RATE default: "
        "DATA/anatomy_masks in its folder nesting; a class_map.json there names the mask values)",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N volumes")
    parser.add_argument(
        "--windows",
        choices=("reference", "centred", "shared"),
        default=None,
        help="reference: the public eval.py pipeline (resize, crop, -1150 HU padding, its windows; "
        "not a cache); centred: one window per anatomy centred on it; shared: anatomies "
        "share windows (fewer ViT passes). Default: reference with --protocol reference, else centred",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store-thresholds",
        action="store_true",
        help="save the chosen thresholds and the fitted calibrations (raw score -> probability) into "
        "the model folder's config; run it on a calibration split",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the ROC and reliability PNGs")
    parser.add_argument("--out", required=True, help="report folder")


def _scores_from_table(args: argparse.Namespace, meta: dict[str, Any]):
    """``(names, scores, truth, thresholds, calibration source, findings)`` of ``--scores`` and
    ``--labels``: thresholds and stored calibrations of the ``--model`` folder, if given (those
    that apply to its findings: :mod:`fvlm_core.model.calibrated_with`; the table is taken as
    scored with the model's own findings), and its findings (None without ``--model``)."""
    if not args.labels:
        raise ConfigError("--scores needs --labels (the ground-truth CSV)")
    names, scores = read_score_table(args.scores)
    truth = read_label_table(args.labels, names, list(scores))
    meta["scores"] = str(args.scores)
    thresholds: dict[str, float] = {}
    source = CalibrationSource(refit=args.store_thresholds)
    findings = None
    if args.model:
        from fvlm_core.model.calibrated_with import StoredCalibration
        from fvlm_core.model.config import load_config
        from fvlm_core.model.prompt_store import folder_text_identity

        config = load_config(args.model)
        findings = list(config.finding_set())
        stored = StoredCalibration(config, folder_text_identity(args.model, config))
        thresholds, source.stored = stored.thresholds(findings), stored.calibrations(findings)
    return names, scores, truth, thresholds, source, findings


def _findings_of(args: argparse.Namespace, config):
    """The findings to score: the model's, with the ``--prompts`` file's added (a finding named
    like one of the model's replaces it)."""
    from fvlm_core.zeroshot.prompt_files import load_findings_file, merge_findings

    findings = config.finding_set()
    if args.prompts:
        findings = merge_findings(findings, load_findings_file(args.prompts))
    findings.check_anatomies(list(config.anatomies))
    return findings


def _open_sources(args: argparse.Namespace, config, findings) -> dict[str, VolumeSource]:
    """The volumes of ``--data`` (and ``--calibration``), opened and checked before the model loads."""
    options: dict[str, Any] = {
        "backend": args.backend,
        "backend_options": {"fast": args.fast, "device": args.device, "allow_download": args.allow_download},
        "radchest_mapping": args.radchest_mapping,
        "findings": [f.name for f in findings],
        "ignore_columns": [c.strip() for c in (args.ignore_columns or "").split(",") if c.strip()],
    }
    out = {}
    if args.protocol == "strict" and args.calibration:
        out["calibration"] = VolumeSource(
            args.calibration, config.anatomies, args.split, args.masks, **options
        )
    out["data"] = VolumeSource(
        args.data, config.anatomies, args.split, args.masks, args.one_per_scan, args.limit,
        labels=args.labels, **options,
    )  # fmt: skip
    if "calibration" in out:
        shared = sorted(out["calibration"].files() & out["data"].files())
        if shared:
            raise ConfigError(
                f"--calibration {args.calibration} and --data {args.data} share {len(shared)} volume(s) (e.g. "
                f"{shared[0]}): a calibration fitted on the volumes it is checked on is in-sample, not held out. "
                "Give a calibration split of other volumes (e.g. a labelled set kept apart from the evaluated one)."
            )
    return out


def not_evaluable(
    scores: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], findings
) -> dict[str, str]:
    """The scored findings that cannot be evaluated, and why: no ground-truth column, or not
    scored on any volume (their anatomy segmented nowhere). Their scores are still written."""
    anatomy = {f.name: f.anatomy for f in findings}
    out = {}
    for lbl, s in scores.items():
        if lbl not in truth:
            out[lbl] = "no ground truth for it in the data"
        elif np.all(np.isnan(np.asarray(s, dtype=float))):
            out[lbl] = (
                f"its anatomy, {anatomy.get(lbl, '?')}, was segmented in none of the {len(s)} volumes; "
                "see the segmentation note"
            )
    return out


def _scores_from_model(args: argparse.Namespace, meta: dict[str, Any]):
    """``(names, scores, truth, thresholds, calibration source)`` of ``--model`` on ``--data``;
    thresholds and calibrations from the ``--calibration`` split (strict protocol) or the model
    folder."""
    if not args.data or not args.model:
        raise ConfigError(
            "give --data DIR and --model DIR (or --scores CSV --labels CSV, or --embeddings STORE)"
        )
    from fvlm_core.model.config import load_config

    windows = args.windows or ("reference" if args.protocol == "reference" else "centred")
    if windows == "reference":  # before the model loads
        from fvlm_core.data.cache import is_cache_folder

        for data in (args.data, args.calibration):
            if data and Path(data).is_dir() and is_cache_folder(Path(data)):
                _refuse_cache_for_reference(data)
    config = load_config(args.model)
    findings = _findings_of(args, config)
    sources = _open_sources(args, config, findings)  # bad data is refused before the model loads
    if args.protocol == "strict":
        _check_strict_thresholds(args, config, findings, sources)  # before any volume is scored
    from fvlm_core.zeroshot.analyzer import Analyzer

    analyzer = Analyzer.from_pretrained(args.model, device=args.device)
    data = sources["data"]
    meta.update({"model": str(args.model), "windows": windows, "device": str(analyzer.device)})
    meta["layout"] = data.layout
    if "calibration" in sources:
        meta["calibration"] = str(args.calibration)

    stored = analyzer.stored  # what applies to these findings as worded, with this text side
    source = CalibrationSource(stored=stored.calibrations(findings), refit=args.store_thresholds)
    scored = _score_splits(args, analyzer, windows, sources, findings)
    names, scores, truth = scored["data"]
    meta["notes"] = list(data.notes)  # the reader's, and the scoring's (masks that do not fit)
    # the scoring's result, kept whatever happens to the report (which is written all or none)
    from fvlm_core.atomic import atomic_write_text

    atomic_write_text(Path(args.out) / "scores.csv", score_table_csv(scores, names))
    if "calibration" in scored:
        from fvlm_core.metrics import roc_corner_threshold

        _, cal_scores, cal_truth = scored["calibration"]
        source.fit_scores, source.fit_truth = cal_scores, cal_truth
        thresholds = {}
        with _stage("choosing thresholds on the calibration split", args, len(names)):
            for lbl in set(cal_scores) & set(cal_truth):
                y, s, _ = labelled(cal_truth[lbl], cal_scores[lbl])
                keep = ~np.isnan(s)
                if keep.any():
                    thresholds[lbl] = roc_corner_threshold(y[keep], s[keep])
    else:
        thresholds = stored.thresholds(findings)
    meta["not_evaluated"] = not_evaluable(scores, truth, findings)
    if len(meta["not_evaluated"]) == len(scores):
        grouped: dict[str, list[str]] = {}
        for lbl, why in meta["not_evaluated"].items():
            grouped.setdefault(why, []).append(lbl)
        raise DataError(
            f"--data {args.data}: no finding can be evaluated (its scores are in {Path(args.out) / 'scores.csv'}). "
            + "; ".join(f"{', '.join(lbls)}: {why}" for why, lbls in grouped.items())
            + "."
        )
    return names, scores, truth, thresholds, source, list(findings)


def _check_strict_thresholds(args: argparse.Namespace, config, findings, sources: Mapping) -> None:
    """The strict protocol's thresholds are fixed beforehand: refuse, before any volume is scored,
    a finding with labels in ``--data`` (on an anatomy the segmentation can give) that has none,
    neither labels to choose one on in the ``--calibration`` split nor a stored one in the model
    folder (one fitted on this wording, with this text side)."""
    from fvlm_core.model.calibrated_with import StoredCalibration
    from fvlm_core.model.prompt_store import folder_text_identity

    data = sources["data"]
    labelled_now = data.labelled_findings()
    needed = [f.name for f in findings if f.name in labelled_now and data.may_segment(f.anatomy)]
    if "calibration" in sources:
        have = sources["calibration"].labelled_findings()
        where = f"the --calibration split {args.calibration} has no labels for them to choose one on"
    else:
        have = set(StoredCalibration(config, folder_text_identity(args.model, config)).thresholds(findings))
        where = (
            f"the model folder {args.model} stores none that was fitted on them as worded now (with "
            "this text encoder)"
        )
    lacking = [name for name in needed if name not in have]
    if lacking:
        raise ConfigError(
            "--protocol strict needs a threshold fixed beforehand for every label; none for: "
            + ", ".join(lacking)
            + f" ({where}). Give --calibration DIR (a separate labelled calibration split) or store "
            "thresholds first (fvlm evaluate ... --store-thresholds on a calibration split). Nothing was scored."
        )


def _score_splits(args: argparse.Namespace, analyzer, windows: str, sources: Mapping, findings) -> dict:
    """:func:`score_dataset` of each opened source (role -> :class:`VolumeSource`), each kept in
    its journal ``--out/volume_scores/<role>.jsonl``. Every journal is checked against this run's
    model, prompts (``findings``, ``--prompts`` included), windows, data and segmentation before any
    volume is encoded."""
    from fvlm_core.journal import ItemJournal

    model = model_identity(args.model, analyzer.config)
    model["prompts"] = [[f.anatomy, f.name, list(f.negative), list(f.positive)] for f in findings]
    paths = {"calibration": args.calibration, "data": args.data}
    segmentation = {"backend": args.backend, "fast": bool(args.fast)}
    with contextlib.ExitStack() as stack:
        journals = {
            role: stack.enter_context(
                ItemJournal(
                    Path(args.out) / JOURNAL_DIR / f"{role}.jsonl",
                    {
                        **scoring_identity(model, paths[role], args.split, windows, args.masks),
                        "segmentation": segmentation,
                    },
                    what=f"per-volume scores of {paths[role]}",
                )
            )
            for role in sources
        }
        return {
            role: score_dataset(
                analyzer,
                paths[role],
                windows=windows,
                progress=_print_progress,
                journal=journals[role],
                findings=findings,
                source=source,
            )
            for role, source in sources.items()
        }


def _scores_from_store(args: argparse.Namespace, meta: dict[str, Any]):
    """``(names, scores, truth, thresholds, calibration source)`` of the scans of an embedding
    store: the model's findings and ``--prompts`` scored from the stored embeddings (no volume is
    read), the truth from the store's labels (or ``--labels`` CSV); thresholds and calibrations
    from the model folder. Adds the retrieval metrics to ``meta["retrieval"]``."""
    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.commands.query import open_store_and_model
    from fvlm_core.store.query import query_store
    from fvlm_core.store.retrieval import store_retrieval

    if args.calibration:
        raise ConfigError(
            "--calibration with --embeddings: fix thresholds on a calibration split with `fvlm evaluate "
            "--embeddings CAL.store --store-thresholds` first, then evaluate with --protocol strict."
        )
    store, analyzer = open_store_and_model(args.embeddings, args.model, args.device, what="evaluate it")
    findings = _findings_of(args, analyzer.config)
    result = query_store(store, analyzer, findings)
    names, scores = result.raw_scores()
    if not names:
        raise DataError(f"--embeddings {args.embeddings}: the store holds no scan yet (run `fvlm embed`).")
    if args.labels:
        truth = {k: v.astype(float) for k, v in read_label_table(args.labels, names).items()}
    else:
        table = store.table(["labels"])
        labels = dict(zip(table.column("scan").to_pylist(), table.column("labels").to_pylist()))
        truth = truth_table([dict(labels.get(n) or []) for n in names], list(scores))
    atomic_write_text(Path(args.out) / "scores.csv", score_table_csv(scores, names))
    meta.update(
        {
            "embeddings": str(args.embeddings),
            "model": str(analyzer.name),
            "windows": store.info.windows,
            "layout": "embedding store",
        }
    )
    meta["retrieval"] = store_retrieval(store, analyzer)
    meta["not_evaluated"] = not_evaluable(scores, truth, findings)
    stored = analyzer.stored  # what applies to these findings as worded, with this text side
    thresholds = stored.thresholds(findings)
    source = CalibrationSource(stored=stored.calibrations(findings), refit=args.store_thresholds)
    return names, scores, truth, thresholds, source, list(findings)


def retrieval_markdown(retrieval: Mapping[str, Any]) -> list[str]:
    """The report's section on CT-CLIP's retrieval metrics (:mod:`fvlm_core.store.retrieval`)."""
    lines = [
        "",
        "## Retrieval (CT-CLIP's metrics)",
        "",
        "Report -> volume recall@k (a hit: the report's own volume in the top k; chance k/N) and volume -> "
        "volume MAP@k (mean Jaccard index of the positive labels of the top k; candidates: volumes with a "
        "positive label, the query included as in CT-CLIP's script; also without the query itself). "
        "Whole-scan: the mean over anatomies of the per-anatomy similarities.",
        "",
        "| report -> volume | N | " + " | ".join(f"R@{k}" for k in (5, 10, 50, 100)) + " |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in retrieval.get("report_to_volume", {}).items():
        cells = " | ".join(f"{_fmt(r['recall'][k])} ({_fmt(r['chance'][k])})" for k in r["recall"])
        lines.append(f"| {key} | {r['n']} | {cells} |")
    lines += [
        "",
        "| volume -> volume | queries | candidates | MAP@1 / 5 / 10 / 50 | without the query itself | CT-CLIP script's printout |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in retrieval.get("volume_to_volume", {}).items():
        row = [
            " / ".join(_fmt(v) for v in r[m].values()) or "n/a"
            for m in ("map", "map_excluding_self", "map_ctclip_script")
        ]
        lines.append(f"| {key} | {r['n_queries']} | {r['n_candidates']} | " + " | ".join(row) + " |")
    return lines


def output_plan(args: argparse.Namespace, parts: bool = True):
    """The inputs and outputs of ``fvlm evaluate`` (:class:`fvlm_core.outputs.OutputPlan`), checked.

    ``--out`` is a folder the report's files are added to (``parts``: each of those files and
    folders is checked too); ``--store-thresholds`` also replaces the model folder's
    ``config.yaml``, the only file of an input folder a command may change (the folder's other
    files stay protected inputs).
    """
    from fvlm_core.outputs import OutputPlan

    plan = OutputPlan()
    for option in ("data", "scores", "embeddings", "labels", "calibration", "masks", "prompts"):
        plan.input(f"--{option}", getattr(args, option, None))
    config = None
    if args.store_thresholds:
        if not args.model:
            raise ConfigError("--store-thresholds needs --model DIR")
        model = Path(args.model)
        config = model / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{model}: no config.yaml; --store-thresholds needs a model folder.")
        plan.input("--model", model, contents=False)
        plan.inputs("--model", (p for p in model.rglob("*") if p != config))
    else:
        plan.input("--model", args.model)
    plan.folder("--out", args.out)
    plan.check()  # the folder first: what is wrong with it would be wrong for everything in it
    plan.file("--store-thresholds", config, suffixes=(".yaml",))
    if parts:
        for name in ("metrics.json", "report.md", "scores.csv", "roc_all.png", "reliability_all.png"):
            plan.file(f"--out ({name})", Path(args.out) / name)
        for name in ("roc", "reliability", JOURNAL_DIR):
            plan.folder(f"--out ({name})", Path(args.out) / name)
    plan.check()
    return plan


def run(args: argparse.Namespace) -> int:
    from fvlm_core.locks import lock_folders

    output_plan(args)  # before any work: a bad --out is refused in a second, not after scoring
    written = [(args.out, "--out")] + ([(args.model, "--model")] if args.store_thresholds else [])
    with lock_folders(written, command="fvlm evaluate"):  # a second run into them is refused
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    meta: dict[str, Any] = {}
    if sum(bool(x) for x in (args.data, args.scores, args.embeddings)) > 1:
        raise ConfigError("give one of --data DIR, --scores CSV or --embeddings STORE")
    collect = _scores_from_table if args.scores else _scores_from_model
    if args.embeddings:
        collect = _scores_from_store
    names, scores, truth, thresholds, source, findings = collect(args, meta)
    not_evaluated = meta.pop("not_evaluated", {})
    with _stage("metrics", args, len(names)):
        report = evaluate_scores(
            {k: v for k, v in scores.items() if k not in not_evaluated},
            truth,
            names,
            args.protocol,
            thresholds,
            n_bootstrap=args.n_bootstrap,
            seed=args.seed,
            not_evaluated=not_evaluated,
        )
    with _stage("calibration", args, len(names)):
        calibrate_report(report, scores, truth, source, seed=args.seed)
    report.notes.extend(meta.pop("notes", []))
    layout = meta.get("layout")
    if layout in LAYOUT_NAMES and layout != "ctrate":
        report.split["description"] = f"{LAYOUT_NAMES[layout]}, {len(names):,} volumes"
    report.retrieval = meta.pop("retrieval", None)
    report.meta.update(meta)
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    with _stage("the report and plots", args, len(names)):
        _write_outputs(args, report, None if not args.scores else scores, names, findings)
    if args.store_thresholds:
        print(f"thresholds and calibrations stored in {Path(args.model) / 'config.yaml'}")
    from fvlm_core.metrics import macro_label_count

    m = report.macro["fvlm16"]
    print(
        f"{report.split['description']}: macro AUC {_fmt(m['auc'])} over {macro_label_count(m)}; ACC "
        f"{_fmt(m['accuracy'])}, wF1 {_fmt(m['f1_weighted'])}, precision {_fmt(m['precision'])} over "
        f"{macro_label_count(m, 'precision')} ({report.protocol} protocol). Report: {Path(args.out) / 'report.md'}"
    )
    c = calibration_macro(report.calibration)
    print(
        f"calibration (mean over {c['n_labels']} labels, on volumes not used to fit it): Brier "
        f"{_fmt(c['brier_raw'], 4)} -> {_fmt(c['brier_calibrated'], 4)}, ECE {_fmt(c['ece_raw'], 4)} -> "
        f"{_fmt(c['ece_calibrated'], 4)}"
    )
    return 0


class EvaluationFailed(FVLMError):
    """A step after scoring failed; the message says which, and where the scores are kept."""


@contextlib.contextmanager
def _stage(what: str, args: argparse.Namespace, n_volumes: int) -> Iterator[None]:
    """Run one step after scoring; on failure say which step failed and that the scores are
    kept (scored with ``--model``: in ``--out``, and a re-run continues from them)."""
    try:
        yield
    except Exception as exc:
        if args.scores:
            raise  # the scores are an input: nothing to keep
        if not isinstance(exc, FVLMError | OSError):
            traceback.print_exc()  # not the user's doing: keep the trace for a bug report
        out = Path(args.out)
        raise EvaluationFailed(
            f"{what} failed ({type(exc).__name__}: {exc}). The scores of all {n_volumes:,} volumes are "
            f"kept: {out / 'scores.csv'} (and per volume in {out / JOURNAL_DIR}); the report was not "
            "written. Re-run the same command to continue from them without encoding any volume "
            f"again, or evaluate the table with --scores {out / 'scores.csv'} --labels LABELS.csv."
        ) from exc


def _write_outputs(args: argparse.Namespace, report: EvaluationReport, scores, names, findings) -> None:
    """The report into ``--out`` and, with ``--store-thresholds``, the model's ``config.yaml``
    (each threshold with the ``findings`` wording it was fitted on): all of them or none."""
    with output_plan(args, parts=False).writing() as staged:
        write_report(report, staged.path("--out"), scores, names, plots=not args.no_plots)
        if args.store_thresholds:
            store_thresholds(
                args.model,
                report.thresholds,
                source=f"{args.protocol}: {report.split['description']}",
                calibration=report.calibrations,
                to=staged.path("--store-thresholds"),
                findings=findings,
            )


def _print_progress(message: str, fraction: float) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", flush=True)
