"""Evaluation reports: the Markdown tables, ROC curves and reliability diagrams.

What ``fvlm evaluate`` writes (``report.md``, ``metrics.json``, ``roc/``, ``reliability/``:
:func:`write_report`) and what ``fvlm demo`` shows (``results.md``, ``roc.png``,
``reliability.png``) are drawn and written here from the metrics of
:mod:`fvlm_training.protocol`. Plots use matplotlib's file-only Agg backend and are written
atomically (each file whole or not at all).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fvlm_training.label_tables import score_table_csv
from fvlm_training.protocol import CHECKED_ON, EvaluationReport, calibration_macro

#: A curve of an ROC panel: ``(legend or None, false-positive rates, true-positive rates)``.
RocCurve = tuple[str | None, Sequence[float], Sequence[float]]

# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals, ``n/a`` for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def metric_table(results: Mapping[str, Any], macro: Mapping[str, dict]) -> list[str]:
    """Markdown rows: per label (:class:`~fvlm_core.metrics.LabelEvaluation`) its AUC with CI and the
    metrics at its threshold; then the macro means."""
    head = "| label | n | pos | AUC [95% CI] | threshold | acc | wF1 | F1+ | prec | sens | spec |"
    lines = [head, "|" + "---|" * 11]
    for lbl, r in results.items():
        m = r.at_threshold
        ci = f"[{fmt(r.auc_ci[0])}, {fmt(r.auc_ci[1])}]"
        lines.append(
            f"| {lbl} | {r.n} | {r.n_positive} | {fmt(r.auc)} {ci} | {fmt(m.threshold)} ({r.threshold_source}) | "
            f"{fmt(m.accuracy)} | {fmt(m.f1_weighted)} | {fmt(m.f1_positive)} | {fmt(m.precision)} | "
            f"{fmt(m.sensitivity)} | {fmt(m.specificity)} |"
        )
    for name, mm in macro.items():
        n_auc = mm.get("n_defined", {}).get("auc", mm["n_labels"])
        auc_over = "" if n_auc == mm["n_labels"] else f" over {n_auc}"
        lines.append(
            f"| **macro {name}** ({mm['n_labels']} labels) | | | {fmt(mm['auc'])}{auc_over} | | {fmt(mm['accuracy'])} | "
            f"{fmt(mm['f1_weighted'])} | {fmt(mm['f1_positive'])} | {fmt(mm['precision'])} | "
            f"{fmt(mm['sensitivity'])} | {fmt(mm['specificity'])} |"
        )
    return lines


def auc_table_markdown(table: Mapping[str, Any], header: str = "") -> str:
    """AUCs side by side as Markdown: one row per finding, one column per (model, protocol) of
    ``table["models"][model][protocol]`` (``per_finding`` AUCs, ``macro_auc`` over
    ``macro_auc_over`` findings), as ``fvlm demo`` tabulates them."""
    cols = [(m, p) for m, by_p in table["models"].items() for p in by_p]
    lines = [header] if header else []
    lines.append("| finding | " + " | ".join(f"{m} ({p})" for m, p in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for finding in table["findings"]:
        cells = [fmt(table["models"][m][p]["per_finding"][finding]["auc"]) for m, p in cols]
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    macro = []
    for m, p in cols:
        v, k = table["models"][m][p]["macro_auc"], table["models"][m][p].get("macro_auc_over")
        n = len(table["findings"])
        over = f" (over {k} of {n})" if k is not None and k < n else ""
        macro.append("n/a" if v is None else f"**{v:.3f}**{over}")
    lines.append("| **macro AUC** | " + " | ".join(macro) + " |")
    return "\n".join(lines) + "\n"


def calibration_table(checks: Mapping[str, Any]) -> list[str]:
    """Markdown rows: per label the method, AUC raw / calibrated, Brier and ECE raw -> calibrated
    and the threshold on both scales; then the means."""
    head = "| label | n | pos | method | AUC raw / calibrated | Brier raw -> cal. | ECE raw -> cal. | threshold raw -> cal. |"
    lines = [head, "|" + "---|" * 8]
    for lbl, c in checks.items():
        thr = f"{fmt(c.threshold_raw, 4)} -> {fmt(c.threshold_calibrated, 4)}"
        lines.append(
            f"| {lbl} | {c.n} | {c.n_positive} | {c.method} | {fmt(c.auc_raw, 4)} / {fmt(c.auc_calibrated, 4)} | "
            f"{fmt(c.brier_raw, 4)} -> {fmt(c.brier_calibrated, 4)} | {fmt(c.ece_raw, 4)} -> "
            f"{fmt(c.ece_calibrated, 4)} | {thr} |"
        )
    m = calibration_macro(checks)
    lines.append(
        f"| **mean** ({m['n_labels']} labels) | | | | | {fmt(m['brier_raw'], 4)} -> {fmt(m['brier_calibrated'], 4)} "
        f"| {fmt(m['ece_raw'], 4)} -> {fmt(m['ece_calibrated'], 4)} | |"
    )
    return lines


def calibration_markdown(report: EvaluationReport) -> list[str]:
    """The report's calibration section: how it was checked, the table, each label's method."""
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
        cells = " | ".join(f"{fmt(r['recall'][k])} ({fmt(r['chance'][k])})" for k in r["recall"])
        lines.append(f"| {key} | {r['n']} | {cells} |")
    lines += [
        "",
        "| volume -> volume | queries | candidates | MAP@1 / 5 / 10 / 50 | without the query itself | CT-CLIP script's printout |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in retrieval.get("volume_to_volume", {}).items():
        row = [
            " / ".join(fmt(v) for v in r[m].values()) or "n/a"
            for m in ("map", "map_excluding_self", "map_ctclip_script")
        ]
        lines.append(f"| {key} | {r['n_queries']} | {r['n_candidates']} | " + " | ".join(row) + " |")
    return lines


def render_markdown(report: EvaluationReport, title: str = "Zero-shot evaluation") -> str:
    """The whole ``report.md`` of an :class:`~fvlm_training.protocol.EvaluationReport`."""
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
    lines += ["", "## Per label", "", *metric_table(report.per_label, report.macro)]
    if report.fixed:
        lines += [
            "",
            "## At thresholds fixed beforehand",
            "",
            *metric_table(report.fixed, report.macro_fixed),
        ]
    if report.calibration:
        lines += calibration_markdown(report)
    if report.retrieval is not None:
        lines += retrieval_markdown(report.retrieval)
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically: all of it or nothing) and free it."""
    from fvlm_core.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(path)


def panel_grid(n: int, cell_inches: float, cols: int = 4):
    """A figure of ``n`` small panels, ``cols`` a row: ``(fig, axes)`` with the ``n`` axes to
    draw in (the grid's spare cells are blank)."""
    rows = -(-n // cols)
    fig, axes = pyplot().subplots(
        rows, cols, figsize=(cell_inches * cols, cell_inches * rows), dpi=70, squeeze=False
    )
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()[:n]


def plot_roc_panels(
    panels: Mapping[str, Sequence[RocCurve]], path: str | os.PathLike, title: str = ""
) -> Path:
    """ROC curves, one small panel per label (its title the key of ``panels``), its curves
    (:data:`RocCurve`: with a legend where they have one) over the chance diagonal."""
    fig, axes = panel_grid(len(panels), 3)
    for ax, (name, curves) in zip(axes, panels.items()):
        for legend, fpr, tpr in curves:
            ax.plot(fpr, tpr, lw=1.2, label=legend)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.6)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("1 - specificity", fontsize=6)
        ax.set_ylabel("sensitivity", fontsize=6)
        ax.tick_params(labelsize=6)
        if any(legend for legend, _, _ in curves):
            ax.legend(loc="lower right", fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_rocs(report: EvaluationReport, out_dir: str | os.PathLike) -> list[Path]:
    """One ROC PNG per label (``roc/<label>.png``) and an overview (``roc_all.png``)."""
    from fvlm_core.outputs import file_stems

    plt = pyplot()
    out_dir = Path(out_dir)
    paths = []
    items = [(k, v) for k, v in report.per_label.items() if v.roc]
    stems = file_stems([k for k, _ in items])  # distinct files even for labels named alike
    for lbl, r in items:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.plot(r.roc["fpr"], r.roc["tpr"], lw=1.5, label=f"AUC {fmt(r.auc)}")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        m = r.at_threshold
        if not math.isnan(m.sensitivity) and not math.isnan(m.specificity):
            ax.plot([1 - m.specificity], [m.sensitivity], "o", c="red", label=f"t = {m.threshold:.3f}")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=lbl, xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        paths.append(save_png(fig, out_dir / "roc" / f"{stems[lbl]}.png"))
    if items:
        panels = {f"{lbl}\nAUC {fmt(r.auc)}": [(None, r.roc["fpr"], r.roc["tpr"])] for lbl, r in items}
        paths.append(plot_roc_panels(panels, out_dir / "roc_all.png"))
    return paths


def reliability_axes(ax, check, title: str, fontsize: int = 8) -> None:
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
            label=f"{name}, ECE {fmt(ece)}",
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

    plt = pyplot()
    paths = []
    items = [(k, c) for k, c in checks.items() if c.n]
    stems = file_stems([k for k, _ in items])
    for lbl, c in items if per_label_dir is not None else []:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        reliability_axes(ax, c, lbl, 9)
        fig.tight_layout()
        paths.append(save_png(fig, Path(per_label_dir) / f"{stems[lbl]}.png"))
    if items:
        fig, axes = panel_grid(len(items), 3.2)
        for ax, (lbl, c) in zip(axes, items):
            reliability_axes(ax, c, lbl, 8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        paths.append(save_png(fig, path))
    return paths


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


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
