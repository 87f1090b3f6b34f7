"""Zero-shot evaluation with the CT-RATE protocol: per-label AUC (bootstrap 95% CI), thresholds, metrics.

Scores every volume of a dataset (CT-RATE layout or a ``fvlm prepare`` cache) with a model, or
reads a score table (``--scores``), then reports per label and as macro means: AUC with a
bootstrap CI; at the threshold, accuracy, weighted F1, positive-class F1, precision,
sensitivity and specificity. Protocols:

* ``reference``: thresholds chosen on the evaluated set itself (closest ROC point to the corner
  over ``linspace(0, 1, 100)``), as the published numbers are; a volume whose anatomy could not
  be scored counts as probability 0 (the reference script's ``nan -> 0``).
* ``strict``: thresholds fixed beforehand, from a separate calibration set (``--calibration``) or
  the model folder's stored thresholds; volumes that could not be scored are left out and counted.

Writes ``metrics.json``, ``report.md``, ``scores.csv`` and ROC curves (``roc/*.png``) to
``--out``; ``--store-thresholds`` saves the chosen thresholds into the model folder's config so
that ``fvlm analyze`` uses them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import ConfigError, DataError
from fvlm_core.findings import CTRATE_LABELS, FVLM_LABELS

#: Sizes of the CT-RATE validation split (DESIGN.md section 3).
CTRATE_VALID_VOLUMES = 3039
CTRATE_VALID_SCANS = 1564


# --------------------------------------------------------------------------------------------
# Split description
# --------------------------------------------------------------------------------------------


def scan_id(volume_name: str) -> str:
    """CT-RATE scan of a volume: ``valid_12_a_2.nii.gz`` -> ``valid_12_a`` (reconstructions share it)."""
    stem = Path(str(volume_name)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    parts = stem.split("_")
    return "_".join(parts[:-1]) if len(parts) >= 4 else stem


def describe_split(volume_names: Sequence[str]) -> dict[str, Any]:
    """How many volumes and scans the numbers are on, and whether that is a full CT-RATE split."""
    n_vol = len(volume_names)
    n_scan = len({scan_id(v) for v in volume_names})
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
        seen.setdefault(scan_id(v), v)
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
            "notes": self.notes,
            "meta": self.meta,
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


def evaluate_scores(
    scores: Mapping[str, Sequence[float]],
    labels: Mapping[str, Sequence[int]],
    volume_names: Sequence[str],
    protocol: str = "reference",
    thresholds: Mapping[str, float] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate a score table.

    Args:
        scores: label -> probabilities, one per volume (NaN: the anatomy could not be scored).
        labels: label -> 0/1 ground truth, same order.
        volume_names: the volumes, same order (used to describe the split).
        protocol: ``"reference"`` (thresholds chosen on this set; NaN scores count as 0) or
            ``"strict"`` (``thresholds`` required; NaN scores left out).
        thresholds: fixed thresholds per label (from a calibration split or the model config).
            With ``reference`` they add a second block of metrics at these thresholds.
        n_bootstrap, seed: bootstrap of the AUC confidence interval.

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
        s = np.asarray(scores[lbl], dtype=float)
        y = np.asarray(labels[lbl], dtype=int)
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
    not_covered = [lbl for lbl in CTRATE_LABELS if lbl not in scores]
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
        lines.append(
            f"| **macro {name}** ({mm['n_labels']} labels) | | | {_fmt(mm['auc'])} | | {_fmt(mm['accuracy'])} | "
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
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def plot_rocs(report: EvaluationReport, out_dir: str | os.PathLike) -> list[Path]:
    """One ROC PNG per label (``roc/<label>.png``) and an overview (``roc_all.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvlm_core.atomic import atomic_path

    out_dir = Path(out_dir)
    paths = []
    items = [(k, v) for k, v in report.per_label.items() if v.roc]
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
        path = out_dir / "roc" / f"{_slug(lbl)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    if items:
        cols = 4
        rows = -(-len(items) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=70, squeeze=False)
        for ax, (lbl, r) in zip(axes.ravel(), items):
            ax.plot(r.roc["fpr"], r.roc["tpr"], lw=1.2)
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.6)
            ax.set_title(f"{lbl}\nAUC {_fmt(r.auc)}", fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in axes.ravel()[len(items) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / "roc_all.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
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
        import pandas as pd

        df = pd.DataFrame({k: np.asarray(v, dtype=float) for k, v in scores.items()})
        df.insert(0, "VolumeName", list(volume_names))
        written["scores"] = atomic_write_text(out_dir / "scores.csv", df.to_csv(index=False))
    if plots:
        written["roc"] = out_dir / "roc_all.png"
        plot_rocs(report, out_dir)
    return written


def store_thresholds(model_dir: str | os.PathLike, thresholds: Mapping[str, float], source: str = "") -> Path:
    """Save ``thresholds`` (finding name -> value) into ``model_dir/config.yaml`` (atomically).

    Existing thresholds of other findings are kept. ``fvlm analyze`` then reports them as
    ``threshold_source: calibrated``.
    """
    from fvlm_core.model.config import load_config

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{model_dir}: no config.yaml; --store-thresholds needs a model folder.")
    cfg = load_config(model_dir)
    clean = {k: float(v) for k, v in thresholds.items() if v is not None and not math.isnan(float(v))}
    cfg.thresholds = {**cfg.thresholds, **clean}
    if source:
        cfg.versions = {**cfg.versions, "thresholds_from": source}
    cfg.save(cfg_path)
    return cfg_path


# --------------------------------------------------------------------------------------------
# Score tables
# --------------------------------------------------------------------------------------------


def read_score_table(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """A CSV with ``VolumeName`` and one probability column per label (empty / NaN = not scored)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV score table ({exc})") from exc
    if "VolumeName" not in df.columns:
        raise DataError(f"{path}: a score table needs a VolumeName column, found {list(df.columns)}")
    names = df["VolumeName"].astype(str).tolist()
    return names, {c: df[c].to_numpy(dtype=float) for c in df.columns if c != "VolumeName"}


def read_label_table(path: str | os.PathLike, volume_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Ground truth for ``volume_names`` from a CT-RATE multi-abnormality label CSV."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV label table ({exc})") from exc
    if "VolumeName" not in df.columns:
        raise DataError(f"{path}: a label table needs a VolumeName column")
    df = df.drop_duplicates("VolumeName")
    df.index = df["VolumeName"].astype(str)
    absent = [v for v in volume_names if v not in df.index]
    if absent:
        raise DataError(f"{path}: no labels for {len(absent)} scored volume(s), e.g. {absent[:3]}")
    sub = df.loc[list(volume_names)]
    numeric = [c for c in sub.columns if c != "VolumeName" and pd.api.types.is_numeric_dtype(sub[c])]
    return {c: sub[c].to_numpy(dtype=int) for c in numeric}


# --------------------------------------------------------------------------------------------
# Scoring a dataset with a model
# --------------------------------------------------------------------------------------------


def _is_cache(data_dir: Path) -> bool:
    from fvlm_core.data.cache import SIDECAR_SUFFIX, TENSOR_SUFFIX

    return any(p.with_suffix(SIDECAR_SUFFIX).exists() for p in data_dir.glob(f"*{TENSOR_SUFFIX}"))


def _ctrate_split_files(data_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """(volume folder, metadata CSV, label CSV) of a CT-RATE split (``valid`` or ``train``)."""
    meta_name = {"valid": "validation", "train": "train"}.get(split, split)
    vol_dir = data_dir / "dataset" / split
    meta = data_dir / "metadata" / f"{meta_name}_metadata.csv"
    labels = data_dir / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    for p, what in ((vol_dir, "volume folder"), (meta, "metadata CSV"), (labels, "label CSV")):
        if not p.exists():
            raise DataError(
                f"{data_dir}: not a CT-RATE layout (no {what} {p.relative_to(data_dir)}) and not a "
                "`fvlm prepare` cache. Point --data to one of them (see --split)."
            )
    return vol_dir, meta, labels


def _volume_relpath(name: str) -> Path:
    parts = name.split("_")
    return Path("_".join(parts[:2])) / "_".join(parts[:3]) / f"{name}.nii.gz"


def _to_model_order(labels: np.ndarray, names: Sequence[str], model_anatomies: Sequence[str]) -> np.ndarray:
    """Relabel a label map whose value ``i + 1`` is ``names[i]`` into the model's anatomy order."""
    lut = np.zeros(max(len(names), int(labels.max(initial=0))) + 1, dtype=np.uint8)
    for i, n in enumerate(names):
        if n in model_anatomies:
            lut[i + 1] = list(model_anatomies).index(n) + 1
    return lut[labels]


class VolumeSource:
    """Volumes of a CT-RATE layout or a ``fvlm prepare`` cache, loaded one at a time.

    ``load(name)`` gives ``(ct, labels, truth)``: ``ct`` a :class:`~fvlm_core.io.CTVolume`
    (original grid for CT-RATE, model space for a cache), ``labels`` a
    :class:`~fvlm_core.io.LabelVolume` in the model's anatomy order on the same grid, ``truth``
    the CT-RATE labels as 0/1. CT-RATE volumes take geometry and HU scaling from the metadata CSV
    and anatomy masks from ``masks_dir`` (default ``DATA/anatomy_masks/SPLIT``; values = the
    extended catalog, lung 1 .. aorta 4 as in the fVLM release).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        model_anatomies: Sequence[str],
        split: str = "valid",
        masks_dir: str | os.PathLike | None = None,
        dedupe_scans: bool = False,
        limit: int | None = None,
    ) -> None:
        import pandas as pd

        self.data_dir = Path(data_dir)
        self.model_anatomies = list(model_anatomies)
        if not self.data_dir.is_dir():
            raise DataError(f"--data {self.data_dir}: no such folder")
        self.is_cache = _is_cache(self.data_dir)
        if self.is_cache:
            from fvlm_core.data.cache import list_samples

            names = list_samples(self.data_dir)
        else:
            self.vol_dir, meta_csv, label_csv = _ctrate_split_files(self.data_dir, split)
            self.meta_csv = meta_csv
            self.masks = Path(masks_dir) if masks_dir else self.data_dir / "anatomy_masks" / split
            self.meta = pd.read_csv(meta_csv).drop_duplicates("VolumeName")
            self.meta.index = self.meta["VolumeName"].astype(str)
            self.labels_df = pd.read_csv(label_csv).drop_duplicates("VolumeName")
            self.labels_df.index = self.labels_df["VolumeName"].astype(str)
            names = sorted(self.labels_df.index)
        names = one_per_scan(names) if dedupe_scans else sorted(names)
        self.names: list[str] = names[:limit]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str):
        from fvlm_core.anatomy import EXTENDED_CATALOG
        from fvlm_core.io import CTVolume, LabelVolume, read_ct, read_label_map

        if self.is_cache:
            from fvlm_core.data.cache import load_sample

            s = load_sample(self.data_dir, name)
            lab = _to_model_order(s.labels, s.anatomies, self.model_anatomies)
            ct = CTVolume(s.hu.astype(np.float32), s.geometry, source=f"{self.data_dir}/{name}")
            truth = {k: int(v) for k, v in s.finding_labels.items()}
            return ct, LabelVolume(lab, s.geometry, source=ct.source), truth
        stem = name.removesuffix(".nii.gz").removesuffix(".nii")
        rel = _volume_relpath(stem)
        if name not in self.meta.index:
            raise DataError(f"{self.meta_csv}: no metadata row for {name}")
        ct = read_ct(self.vol_dir / rel, metadata=self.meta.loc[name].to_dict())
        mask_path = self.masks / rel
        if not mask_path.exists():
            raise DataError(
                f"{mask_path}: no anatomy mask for {name}. Give --masks DIR (anatomy label maps in the "
                "CT-RATE folder nesting) or evaluate a `fvlm prepare` cache instead."
            )
        lab = read_label_map(mask_path, reference=ct.geometry).array
        lab = _to_model_order(lab, EXTENDED_CATALOG.names, self.model_anatomies)
        truth = {c: int(self.labels_df.loc[name, c]) for c in CTRATE_LABELS if c in self.labels_df.columns}
        return ct, LabelVolume(lab, ct.geometry, source=str(mask_path)), truth


def score_dataset(
    analyzer,
    data_dir: str | os.PathLike,
    split: str = "valid",
    windows: str = "reference",
    dedupe_scans: bool = False,
    limit: int | None = None,
    masks_dir: str | os.PathLike | None = None,
    progress=None,
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score the model's findings on every volume: ``(names, scores, truth)``.

    ``scores[label]`` holds one probability per volume, NaN where the label's anatomy could not
    be scored (absent, or dropped by the reference 90% rule).
    """
    from fvlm_core.preprocess import resample_to_model_space

    findings = analyzer.default_findings()
    emb = analyzer.finding_embeddings(findings)  # once for the whole dataset
    ms = analyzer.model_space
    names: list[str] = []
    rows: list[dict[str, float]] = []
    truths: list[dict[str, int]] = []
    source = VolumeSource(data_dir, analyzer.anatomies, split, masks_dir, dedupe_scans, limit)
    for i, name in enumerate(source.names):
        ct, labels, truth = source.load(name)
        g = ct.geometry
        in_model_space = np.allclose(g.spacing_zyx, ms.spacing_zyx) and np.allclose(
            g.direction_matrix, _direction(ms.orientation)
        )
        if not in_model_space:
            ct, labels = resample_to_model_space(ct, labels, ms)
        enc = analyzer.encode_model_space(ct, labels, strategy=windows)
        probs = analyzer.score(enc, emb)
        rows.append({f.name: probs.get((f.anatomy, f.name), float("nan")) for f in findings})
        names.append(name)
        truths.append(truth)
        if progress:
            progress(f"{name}: {len(enc.plans)} window(s)", (i + 1) / max(len(source), 1))
    if not names:
        raise DataError(f"--data {data_dir}: no volumes to score")
    scores = {f.name: np.asarray([r[f.name] for r in rows], dtype=float) for f in findings}
    truth = {
        lbl: np.asarray([t.get(lbl, 0) for t in truths], dtype=int)
        for lbl in scores
        if all(lbl in t for t in truths)
    }
    return names, scores, truth


def _direction(orientation: str) -> np.ndarray:
    from fvlm_core.preprocess import _direction_for

    return _direction_for(orientation)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset: CT-RATE layout folder or a `fvlm prepare` cache folder")
    parser.add_argument("--model", help="model folder (config.yaml + weights)")
    parser.add_argument(
        "--scores", help="evaluate a score table CSV (VolumeName + one column per label) instead of a model"
    )
    parser.add_argument("--labels", help="ground-truth CSV for --scores (CT-RATE multi_abnormality_labels)")
    parser.add_argument("--protocol", choices=("reference", "strict"), default="reference")
    parser.add_argument("--calibration", help="strict protocol: calibration split (same kinds as --data)")
    parser.add_argument("--split", default="valid", help="CT-RATE split folder to score (default: valid)")
    parser.add_argument(
        "--one-per-scan", action="store_true", help="score one reconstruction per scan (1,564-scan view)"
    )
    parser.add_argument(
        "--masks", help="CT-RATE layout: anatomy mask folder (default DATA/anatomy_masks/SPLIT)"
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N volumes")
    parser.add_argument(
        "--windows",
        choices=("reference", "shared"),
        default="reference",
        help="window plan: one per anatomy (reference) or shared windows (fewer ViT passes)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store-thresholds",
        action="store_true",
        help="save the chosen thresholds into the model folder's config",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the ROC PNGs")
    parser.add_argument("--out", required=True, help="report folder")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    thresholds: dict[str, float] = {}
    meta: dict[str, Any] = {}
    if args.scores:
        if not args.labels:
            raise ConfigError("--scores needs --labels (the ground-truth CSV)")
        names, scores = read_score_table(args.scores)
        truth = read_label_table(args.labels, names)
        meta["scores"] = str(args.scores)
        if args.model:
            from fvlm_core.model.config import load_config

            thresholds = dict(load_config(args.model).thresholds)
    else:
        if not args.data or not args.model:
            raise ConfigError("give --data DIR and --model DIR (or --scores CSV --labels CSV)")
        from fvlm_core.zeroshot.analyzer import Analyzer

        analyzer = Analyzer.from_pretrained(args.model, device=args.device)
        meta.update({"model": str(args.model), "windows": args.windows, "device": str(analyzer.device)})
        if args.protocol == "strict" and args.calibration:
            _, cal_scores, cal_truth = score_dataset(
                analyzer,
                args.calibration,
                split=args.split,
                windows=args.windows,
                masks_dir=args.masks,
                progress=_print_progress,
            )
            from fvlm_core.metrics import roc_corner_threshold

            thresholds = {}
            for lbl, s in cal_scores.items():
                s = np.asarray(s, dtype=float)
                keep = ~np.isnan(s)
                thresholds[lbl] = roc_corner_threshold(np.asarray(cal_truth[lbl])[keep], s[keep])
            meta["calibration"] = str(args.calibration)
        else:
            thresholds = dict(analyzer.config.thresholds)
        names, scores, truth = score_dataset(
            analyzer,
            args.data,
            split=args.split,
            windows=args.windows,
            dedupe_scans=args.one_per_scan,
            masks_dir=args.masks,
            limit=args.limit,
            progress=_print_progress,
        )
    report = evaluate_scores(
        scores, truth, names, args.protocol, thresholds, n_bootstrap=args.n_bootstrap, seed=args.seed
    )
    report.meta.update(meta)
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, args.out, scores, names, plots=not args.no_plots)
    if args.store_thresholds:
        if not args.model:
            raise ConfigError("--store-thresholds needs --model DIR")
        path = store_thresholds(
            args.model, report.thresholds, source=f"{args.protocol}: {report.split['description']}"
        )
        print(f"thresholds stored in {path}")
    m = report.macro["fvlm16"]
    print(
        f"{report.split['description']}: macro AUC {_fmt(m['auc'])}, ACC {_fmt(m['accuracy'])}, "
        f"wF1 {_fmt(m['f1_weighted'])}, precision {_fmt(m['precision'])} over {m['n_labels']} labels "
        f"({report.protocol} protocol). Report: {Path(args.out) / 'report.md'}"
    )
    return 0


def _print_progress(message: str, fraction: float) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", flush=True)
