"""Run the built-in demo: synthetic CTs -> fVLM and a CLIP baseline trained on CPU -> zero-shot AUCs.

The first thing a new user runs. Everything happens offline on the CPU, within a wall-clock
budget (default 9 minutes end to end on 2 cores):

1. generate a synthetic chest-CT cohort in memory (:mod:`fvlm_core.data.synth`): a training
   set, a calibration set (for decision thresholds) and a held-out test set;
2. decompose each report into anatomy descriptions (:mod:`fvlm_core.reports`) and encode every
   distinct text once with the frozen offline MiniLM (the encoder never trains, so its token
   states are computed once; only the small text adapter on them and the projections learn);
3. train ``fvlm-tiny`` with the false-negative-aware fine-grained loss and, side by side with the
   same encoders and the same time budget, a global CLIP baseline (whole-volume embedding vs
   whole report) -- one process and one core each, in bf16 where this CPU runs it faster;
4. score the test phantoms zero-shot from text prompts and write, into ``--out``: the fVLM
   model folder (loadable by ``fvlm analyze`` and the Slicer module, with thresholds and
   per-finding probability calibrations fitted on the calibration set), the baseline, a
   per-finding AUC table and Brier/ECE before and after calibration (JSON + Markdown), ROC curves,
   reliability diagrams,
   a picture of one test phantom with its anatomies and flagged findings, and that phantom as
   NIfTI (CT + anatomy label map) to try ``fvlm analyze`` or Slicer on.

Prompt protocols are reported side by side, as the wording changes the conclusion:
``no-finding`` ("{Finding}." vs "No {finding}.", the headline), ``reference`` ("{X}." vs
"Not {X}.", the wording of the fVLM CT-RATE evaluation), ``normal-negative`` ("{X}." vs the
anatomy's normal description) and ``positive-only`` (similarity to "{X}." alone). The saved model carries the headline's prompts,
so ``fvlm analyze`` and Slicer score with the prompts its thresholds were calibrated on.

The stages live in :mod:`fvlm_training.demo_data` (1), :mod:`fvlm_training.demo_training` (2) and
here (3, 4); the tables and plots are :mod:`fvlm_training.report`'s, as ``fvlm evaluate``'s are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_training.demo_data import DEMO_FINDINGS, DemoData, phantom_splits
from fvlm_training.demo_training import FINISH_SECONDS, demo_precision, evaluation_plan, train_models

#: Prompt protocols, side by side: a frozen MiniLM places "X." and "No X." close together (cosine
#: 0.80-0.86), so the wording of the negative prompt changes the conclusion.
PROTOCOLS = ("no-finding", "reference", "normal-negative", "positive-only")
#: The headline: the prompts of the CPU prototype that set the demo's 0.85 macro-AUC target
#: (64^3 phantoms, 8 minutes on 2 cores: 0.906 for fVLM, 0.633 for a global CLIP). They deny a
#: finding as CT-RATE reports do: in the 800 labelled real reports, "no" appears in 26% of all
#: sentences, while a leading "Not" (the reference wording) opens 2 of 17,497; a frozen MiniLM
#: reads "Not X." almost as "X." (see README.md).
HEADLINE_PROTOCOL = "no-finding"


def last_demo_model_file() -> Path:
    """Where the demo records its model folder for the Slicer module's model field:
    ``$FVLM_CACHE/last_demo_model.txt``, else ``~/.cache/fvlm/`` (FVLMSlicerLib/settings.py reads it
    by the same rule), read when the demo ends."""
    cache = Path(os.environ.get("FVLM_CACHE") or Path.home() / ".cache" / "fvlm").expanduser()
    return cache / "last_demo_model.txt"


@dataclass
class DemoConfig:
    """What the demo does; defaults fit 2 CPU cores and about 9 minutes end to end."""

    out: str = "fvlm-demo"
    minutes: float = 9.25
    n_train: int = 2000
    n_calibration: int = 200
    n_test: int = 400
    size: int = 64
    seed: int = 0
    workers: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    model_config: str = "fvlm-tiny"
    disease_pairs: float = 0.5
    reserve_seconds: float = 45.0  # kept for evaluation and writing outputs (quiet machine; scaled when busy)
    baseline: bool = True
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where this CPU runs it faster, else fp32)


@dataclass
class DemoResult:
    out: Path
    model_dir: Path
    baseline_dir: Path | None
    table: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Zero-shot scoring
# ---------------------------------------------------------------------------------------------


def protocol_finding(protocol: str, finding: str, anatomy: str) -> Any:
    """The :class:`~fvlm_core.findings.Finding` (one positive and one negative prompt) that a
    two-prompt protocol scores ``finding`` with on ``anatomy``."""
    from fvlm_core.findings import Finding, no_finding
    from fvlm_core.reports import normal_template

    if protocol == "no-finding":
        return no_finding(finding, anatomy)
    reference = Finding.from_name(finding, anatomy, source="ctrate")
    if protocol == "reference":
        return reference
    if protocol == "normal-negative":
        return Finding.from_name(finding, anatomy, reference.positive, normal_template(anatomy))
    two = [p for p in PROTOCOLS if p != "positive-only"]
    raise ValueError(f"protocol {protocol!r} has no negative prompt; two-prompt protocols: {two}")


def _prompts(protocol: str, finding: str, anatomy: str) -> tuple[str, str | None]:
    if protocol == "positive-only":
        return protocol_finding("reference", finding, anatomy).positive[0], None
    f = protocol_finding(protocol, finding, anatomy)
    return f.positive[0], f.negative[0]


def headline_findings(model_config: Any) -> list[dict[str, Any]]:
    """The model's findings with the demo findings worded as the headline protocol scores them
    (the calibrated thresholds belong to those prompts); other findings keep their wording."""
    out = []
    for f in model_config.findings:
        if f["name"] in DEMO_FINDINGS:
            f = protocol_finding(HEADLINE_PROTOCOL, f["name"], f["anatomy"]).to_dict()
        out.append(dict(f))
    return out


@dataclass
class _Scores:
    scores: dict[str, dict[str, np.ndarray]]  # protocol -> finding -> (N,)


def score_split(model: Any, data: DemoData, kind: str, batch: int = 32, prompts: Any = None) -> _Scores:
    """Zero-shot scores of every demo finding on ``data`` for each protocol; ``prompts``: a
    :class:`~fvlm_core.model.text.TextCache` of the model's prompt features (each prompt is
    encoded once however often protocols and splits reuse it)."""
    import torch

    from fvlm_core.findings import CTRATE_LABEL_ANATOMY
    from fvlm_core.preprocess import window_hu
    from fvlm_core.zeroshot.prompts import probability

    model.eval()
    hu_window = model.config.model_space().hu_window
    embs = []
    with torch.no_grad():
        for i in range(0, len(data.names), batch):
            hu = torch.from_numpy(data.hu[i : i + batch].astype(np.float32))
            image = window_hu(hu, hu_window).unsqueeze(1)
            if kind == "fvlm":
                lab = torch.from_numpy(data.labels[i : i + batch].astype(np.int64))
                embs.append(model.encode_image(image, lab).embeddings)
            else:
                embs.append(model.encode_volume(image).unsqueeze(1))
        v_all = torch.cat(embs)  # (N, A or 1, D)
        tau = model.temperature
        out: dict[str, dict[str, np.ndarray]] = {p: {} for p in PROTOCOLS}
        for finding in DEMO_FINDINGS:
            anatomy = CTRATE_LABEL_ANATOMY[finding]
            v = v_all[:, model.anatomies.index(anatomy)] if kind == "fvlm" else v_all[:, 0]
            for protocol in PROTOCOLS:
                pos, neg = _prompts(protocol, finding, anatomy)
                t_pos = model.encode_text([pos], prompts)[0]
                if neg is None:
                    out[protocol][finding] = (v @ t_pos).numpy()
                else:
                    t_neg = model.encode_text([neg], prompts)[0]
                    out[protocol][finding] = probability(v, t_pos, t_neg, tau).numpy()
    return _Scores(out)


def evaluate_models(truth: dict[str, np.ndarray], scores: dict[str, _Scores], names: Sequence[str]) -> dict:
    """Each model's and protocol's :class:`~fvlm_training.protocol.EvaluationReport` of the demo
    findings (AUC with a 200-resample bootstrap CI), as ``fvlm evaluate`` tabulates."""
    from fvlm_training.protocol import evaluate_scores

    return {
        model_name: {
            protocol: evaluate_scores(by_finding, truth, names, n_bootstrap=200)
            for protocol, by_finding in sc.scores.items()
        }
        for model_name, sc in scores.items()
    }


def auc_table(evaluations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results.json block of :func:`evaluate_models`: per model and protocol each finding's
    AUC, CI and counts, and the macro AUC over the findings where it is defined."""
    table: dict[str, Any] = {"findings": list(DEMO_FINDINGS), "models": {}}
    for model_name, by_protocol in evaluations.items():
        table["models"][model_name] = {}
        for protocol, report in by_protocol.items():
            rows = {
                f: {"auc": ev.auc, "auc_ci95": list(ev.auc_ci), "n": ev.n, "n_positive": ev.n_positive}
                for f, ev in report.per_label.items()
            }
            macro = report.macro["fvlm16"]
            table["models"][model_name][protocol] = {
                "per_finding": rows,
                "macro_auc": macro["auc"],
                "macro_auc_over": macro["n_defined"]["auc"],  # findings with both classes present
            }
    return table


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def plot_roc(evaluations: dict[str, dict[str, Any]], path: Path) -> Path:
    """ROC curves of the headline protocol, a panel per finding, a curve per model."""
    from fvlm_training.report import fmt, plot_roc_panels

    panels = {}
    for finding in DEMO_FINDINGS:
        curves = [(m, by_p[HEADLINE_PROTOCOL].per_label[finding]) for m, by_p in evaluations.items()]
        panels[finding] = [(f"{m}, AUC {fmt(r.auc)}", r.roc["fpr"], r.roc["tpr"]) for m, r in curves if r.roc]
    title = f"Zero-shot ROC on held-out phantoms ({HEADLINE_PROTOCOL} prompts)"
    return plot_roc_panels(panels, path, title)


def plot_phantom(
    hu: np.ndarray, labels: np.ndarray, anatomies: Sequence[str], lines: Sequence[str], path: Path
) -> Path:
    """Axial and coronal slices of a phantom with anatomy contours, and its findings listed."""
    from matplotlib.lines import Line2D

    from fvlm_core.anatomy import EXTENDED_CATALOG
    from fvlm_training.report import pyplot, save_png

    plt = pyplot()

    z = (
        int(np.argmax((labels == anatomies.index("heart") + 1).sum((1, 2))))
        if "heart" in anatomies
        else hu.shape[0] // 2
    )
    y = hu.shape[1] // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    views = [(hu[z], labels[z], f"axial z={z}"), (hu[:, y][::-1], labels[:, y][::-1], f"coronal y={y}")]
    for ax, (img, lab, title) in zip(axes[:2], views):
        ax.imshow(np.clip(img, -1150, 350), cmap="gray", vmin=-1150, vmax=350)
        for i, name in enumerate(anatomies):
            m = lab == i + 1
            if m.any():
                color = np.asarray(EXTENDED_CATALOG[name].color) / 255.0
                ax.contour(m.astype(float), levels=[0.5], colors=[color], linewidths=1.2)
        ax.set_title(title)
        ax.axis("off")
    handles = [
        Line2D([0], [0], color=np.asarray(EXTENDED_CATALOG[n].color) / 255.0, lw=2, label=n)
        for n in anatomies
    ]
    axes[0].legend(handles=handles, loc="lower left", fontsize=7)
    axes[2].axis("off")
    axes[2].text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def demo_model_config(name_or_path: str, size: int) -> Any:
    """The model config for phantoms of ``size``^3 voxels: the same field of view as the config's
    window, sampled on ``size`` voxels per axis (the saved model then preprocesses real CTs the
    same way)."""
    from fvlm_core.model import load_config
    from fvlm_core.model.config import FVLMConfig

    base = load_config(name_or_path)
    ms = base.model_space()
    fov = [w * s for w, s in zip(ms.window_size_zyx, ms.spacing_zyx)]
    d = base.to_dict()
    d["preprocessing"] = {
        **d["preprocessing"],
        "spacing_zyx": [f / size for f in fov],
        "window_size_zyx": [size] * 3,
    }
    d["vision"] = {**d["vision"], "img_size": [size] * 3}
    return FVLMConfig.from_dict(d)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log(msg: str) -> None:
    print(f"[fvlm demo] {msg}", flush=True)


@dataclass
class _Evaluation:
    """Stage 3's results: the results.json table, the test phantoms' scores, their
    :func:`evaluate_models` reports and fVLM's calibration checks (headline protocol)."""

    table: dict[str, Any]
    scores: dict[str, _Scores]
    evaluations: dict[str, dict[str, Any]]
    checks: dict[str, Any]


def _evaluate_models(
    cfg: DemoConfig, splits: dict[str, DemoData], model_dir: Path, baseline_dir: Path | None
) -> _Evaluation:
    """Stage 3: zero-shot scores of the test phantoms and the AUC table; thresholds calibrated on
    the calibration phantoms (headline protocol) are saved into the fVLM model folder."""
    from fvlm_core.metrics import roc_corner_threshold
    from fvlm_core.model import FVLM
    from fvlm_training.baseline import GlobalCLIP

    models = {"fVLM": FVLM.from_pretrained(model_dir)}
    if baseline_dir is not None:
        models["CLIP baseline"] = GlobalCLIP.from_pretrained(baseline_dir)
    kinds_by_name = {"fVLM": "fvlm", "CLIP baseline": "clip"}
    from fvlm_core.model.text import TextCache

    prompts = {name: TextCache() for name in models}  # valid while the models are not trained further
    calib = score_split(models["fVLM"], splits["calibration"], "fvlm", prompts=prompts["fVLM"])
    thresholds = {
        f: float(roc_corner_threshold(splits["calibration"].truth[f], calib.scores[HEADLINE_PROTOCOL][f]))
        for f in DEMO_FINDINGS
    }
    thresholds = {f: v for f, v in thresholds.items() if not math.isnan(v)}
    models["fVLM"].save_pretrained(
        model_dir, thresholds=thresholds, findings=headline_findings(models["fVLM"].config)
    )
    calibration = _fit_calibration(splits["calibration"], calib, thresholds, model_dir)
    test = splits["test"]
    scores = {
        name: score_split(m, test, kinds_by_name[name], prompts=prompts[name]) for name, m in models.items()
    }
    evaluations = evaluate_models(test.truth, scores, test.names)
    checks = _calibration_checks(test, scores, calibration, thresholds)
    table = auc_table(evaluations)
    table["protocol_headline"] = HEADLINE_PROTOCOL
    table["n"] = {"train": cfg.n_train, "calibration": cfg.n_calibration, "test": cfg.n_test}
    table["thresholds"] = thresholds
    table["calibration"] = calibration_summary(checks, calibration)
    table["training"] = {
        k: json.loads((d / "train_summary.json").read_text())
        for k, d in (("fVLM", model_dir), ("CLIP baseline", baseline_dir))
        if d is not None
    }
    return _Evaluation(table, scores, evaluations, checks)


def _fit_calibration(
    data: DemoData, calib: _Scores, thresholds: dict[str, float], model_dir: Path
) -> dict[str, Any]:
    """Fit each demo finding's calibration on the calibration phantoms (headline protocol) and
    store it beside the thresholds in the model folder's config.yaml (only that file)."""
    from fvlm_core.calibration import fit_all
    from fvlm_training.stored_thresholds import store_thresholds

    raw = {f: calib.scores[HEADLINE_PROTOCOL][f] for f in DEMO_FINDINGS}
    calibration = fit_all(raw, data.truth)
    store_thresholds(model_dir, thresholds, "fvlm demo: calibration phantoms", calibration)
    return calibration


def _calibration_checks(
    test: DemoData, scores: dict[str, _Scores], calibration: dict[str, Any], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Brier score, ECE and AUC of fVLM's headline scores before/after calibration on the test phantoms."""
    from fvlm_core.calibration import check_all

    return check_all(test.truth, scores["fVLM"].scores[HEADLINE_PROTOCOL], calibration, thresholds)


def calibration_summary(checks: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """The results.json block: per finding the before/after numbers and the fitted map."""
    from fvlm_training.protocol import calibration_macro

    return {
        "fitted_on": "calibration phantoms",
        "checked_on": "test phantoms",
        "mean": calibration_macro(checks),
        "findings": {f: {**c.to_dict(), "map": calibration[f].to_dict()} for f, c in checks.items()},
    }


def _example_phantom(
    test: DemoData, scores: dict[str, _Scores], thresholds: dict[str, float], calibration: dict[str, Any]
) -> tuple[int, list[str]]:
    """A test phantom with several findings (a better picture) and the lines listing its scores:
    the calibrated probability and threshold (the raw score where a finding keeps it, marked *)."""
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY

    example = 0
    for i in range(len(test.names)):
        if sum(int(test.truth[f][i]) for f in DEMO_FINDINGS) >= 2:
            example = i
            break
    fvlm_scores = scores["fVLM"].scores[HEADLINE_PROTOCOL]
    lines = [
        f"test phantom {test.names[example]}",
        "",
        f"{'finding':<22} {'P':<5} {'thr':<5} {'raw':<6} flag truth",
    ]
    for f in DEMO_FINDINGS:
        raw, raw_thr = float(fvlm_scores[f][example]), thresholds.get(f, 0.5)
        c = calibration[f]
        p, thr = c.probability(raw), c.probability(raw_thr)
        lines.append(
            f"{f[:22]:<22} {p:.2f}{' ' if c.calibrated else '*'} {thr:.2f}  {raw:.3f}  "
            f"{'YES' if raw > raw_thr else ' - '}  {'+' if test.truth[f][example] else '-'}   ({CTRATE_LABEL_ANATOMY[f]})"
        )
    lines += ["", "P: calibrated probability, thr on the same scale; raw: the model's score"]
    if not all(calibration[f].calibrated for f in DEMO_FINDINGS):
        lines.append("*: uncalibrated score (too few positives to calibrate: raw score kept)")
    return example, lines


def _write_outputs(
    cfg: DemoConfig,
    test: DemoData,
    evaluation: _Evaluation,
    seconds: dict[str, float],
    t_start: float,
    out: Path,
) -> dict[str, str]:
    """Stage 4: the pictures, the example phantom as NIfTI, results.json and results.md; fills
    ``seconds["total"]`` and the table's ``seconds`` and ``config``."""
    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.calibration import from_config
    from fvlm_core.io import write_image
    from fvlm_training.report import auc_table_markdown, calibration_table, plot_reliability

    files: dict[str, str] = {}
    table, checks = evaluation.table, evaluation.checks
    calibration = from_config({f: c["map"] for f, c in table["calibration"]["findings"].items()})
    example, lines = _example_phantom(test, evaluation.scores, table["thresholds"], calibration)
    files["phantom_png"] = str(
        plot_phantom(test.hu[example], test.labels[example], test.anatomies, lines, out / "phantom.png")
    )
    files["roc_png"] = str(plot_roc(evaluation.evaluations, out / "roc.png"))
    title = f"Reliability on {len(test.names)} held-out phantoms (calibrated on the calibration phantoms)"
    plot_reliability(checks, out / "reliability.png", title=title)
    files["reliability_png"] = str(out / "reliability.png")
    geom = test.geometry[example]
    files["example_ct"] = str(write_image(test.hu[example].astype(np.int16), geom, out / "example_ct.nii.gz"))
    files["example_anatomy"] = str(write_image(test.labels[example], geom, out / "example_anatomy.nii.gz"))
    seconds["total"] = time.perf_counter() - t_start
    table["seconds"] = seconds
    table["config"] = asdict(cfg)
    files["results_json"] = str(
        atomic_write_text(out / "results.json", json.dumps(table, indent=2, default=float))
    )
    header = (
        f"# fVLM demo: zero-shot AUC on {cfg.n_test} held-out phantoms\n\n"
        f"Trained {table['training']['fVLM']['steps']} steps ({seconds['training']:.0f} s, "
        f"{table['training']['fVLM']['samples_per_s']:.1f} samples/s) on {cfg.n_train} phantoms; "
        f"{cfg.precision}; end to end {seconds['total']:.0f} s. Headline protocol: `{HEADLINE_PROTOCOL}`.\n"
    )
    calibrated = (
        f"\n## Calibration (fVLM, `{HEADLINE_PROTOCOL}` prompts)\n\nFitted on the {cfg.n_calibration} calibration "
        f"phantoms, checked on the {cfg.n_test} test phantoms (Brier score; ECE over 10 equal-width bins; "
        "`reliability.png`):\n\n" + "\n".join(calibration_table(checks)) + "\n"
    )
    files["results_md"] = str(
        atomic_write_text(out / "results.md", auc_table_markdown(table, header) + calibrated)
    )
    return files


#: What the demo writes into ``--out`` (folders, then files).
OUTPUT_FOLDERS = ("model", "baseline", "runs")
OUTPUT_FILES = (
    "results.json",
    "results.md",
    "phantom.png",
    "roc.png",
    "reliability.png",
    "example_ct.nii.gz",
    "example_anatomy.nii.gz",
)


def check_outputs(out: Path) -> None:
    """Refuse, before any work, an ``--out`` the demo could not write (a file in its place or
    above it, a read-only folder, a folder where one of its files goes):
    :class:`~fvlm_core.errors.OutputError` naming each problem."""
    from fvlm_core.outputs import OutputPlan

    plan = OutputPlan()
    plan.folder("--out", out)
    plan.check()  # the folder first: what is wrong with it would be wrong for everything in it
    for name in OUTPUT_FOLDERS:
        plan.folder(f"--out ({name})", out / name)
    for name in OUTPUT_FILES:
        plan.file(f"--out ({name})", out / name)
    plan.check()


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = _log) -> DemoResult:
    """Run the whole demo (see the module docstring) and return where everything went. A second
    demo into the same ``--out`` while this one runs is refused (:mod:`fvlm_core.locks`)."""
    from fvlm_core.locks import lock_folder

    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    check_outputs(out)
    with lock_folder(out, "--out", command="fvlm demo"):  # a second demo into it is refused
        return _run_demo(cfg, out, t_start, log)


def _run_demo(cfg: DemoConfig, out: Path, t_start: float, log: Callable[[str], None]) -> DemoResult:
    from fvlm_core.atomic import atomic_write_text

    deadline = t_start + cfg.minutes * 60.0
    seconds: dict[str, float] = {}
    model_cfg = demo_model_config(cfg.model_config, cfg.size)

    t = time.perf_counter()
    splits = phantom_splits(cfg, model_cfg)
    seconds["phantoms"] = time.perf_counter() - t
    train = splits["train"]
    n = len(train.names)
    log(
        f"{n} training phantoms, {len({t for row in train.anatomy_texts for t in row})} distinct anatomy texts; "
        + ", ".join(
            f"{name} {int(train.abnormal[:, i].sum())}/{n} abnormal" for i, name in enumerate(train.anatomies)
        )
    )
    precision = demo_precision(cfg.precision, model_cfg)
    cfg = replace(cfg, precision=precision)
    log(
        f"training precision: {precision}" + (" (measured faster on this CPU)" if precision == "bf16" else "")
    )

    t = time.perf_counter()
    reserve, threads = evaluation_plan(cfg, log)
    # the training processes stop this much before the stage's end: what they do after their
    # deadline (the step in progress, the checkpoint, the model folder, exiting), stretched as
    # the evaluation's time is on a busy machine
    finish = FINISH_SECONDS * reserve / cfg.reserve_seconds if cfg.reserve_seconds > 0 else FINISH_SECONDS
    model_dir, baseline_dir = train_models(cfg, model_cfg, train, out, deadline - reserve, log, finish)
    seconds["training"] = time.perf_counter() - t

    t = time.perf_counter()
    with _torch_threads(threads):
        evaluation = _evaluate_models(cfg, splits, model_dir, baseline_dir)
        seconds["evaluation"] = time.perf_counter() - t
        files = _write_outputs(cfg, splits["test"], evaluation, seconds, t_start, out)
    files["model"] = str(model_dir)
    if baseline_dir is not None:
        files["baseline"] = str(baseline_dir)
    try:  # remembered for the Slicer module's model field
        remembered = last_demo_model_file()
        remembered.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(remembered, str(model_dir))
    except OSError:
        pass
    return DemoResult(
        out=out,
        model_dir=model_dir,
        baseline_dir=baseline_dir,
        table=evaluation.table,
        files=files,
        seconds=seconds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="wall-clock budget, end to end (default: %(default)s)",
    )
    parser.add_argument(
        "--n-train", type=int, default=d.n_train, help="training phantoms (default: %(default)s)"
    )
    parser.add_argument(
        "--n-calibration", type=int, default=d.n_calibration, help="threshold calibration phantoms"
    )
    parser.add_argument(
        "--n-test", type=int, default=d.n_test, help="held-out test phantoms (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=d.size,
        help="phantom edge in voxels, a multiple of 8 (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=d.workers, help="processes generating phantoms")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=d.precision,
        help="training precision; auto = bf16 where this CPU runs it faster (default: %(default)s)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the CLIP baseline (twice the budget for fVLM)"
    )
    parser.add_argument(
        "--disease-pairs",
        type=float,
        default=d.disease_pairs,
        help="weight of the disease-aware pairing in the loss (0 = the public code's loss)",
    )


def run(args: argparse.Namespace) -> int:
    from fvlm_core.errors import ConfigError
    from fvlm_training.report import auc_table_markdown

    if args.size % 8 or args.size < 32:
        raise ConfigError(f"--size must be a multiple of 8 and at least 32 (got {args.size}).")
    if min(args.n_train, args.n_test, args.n_calibration) < 8:
        raise ConfigError("--n-train, --n-calibration and --n-test must each be at least 8.")
    same_name = ("out", "minutes", "n_train", "n_calibration", "n_test", "size", "seed", "workers")
    same_name += ("batch_size", "lr", "disease_pairs", "precision")
    cfg = DemoConfig(**{k: getattr(args, k) for k in same_name}, baseline=not args.no_baseline)
    result = run_demo(cfg)
    print()
    print(auc_table_markdown(result.table))
    print("Outputs:")
    for key, path in result.files.items():
        print(f"  {key:<16} {path}")
    print(
        f"\nTry it: fvlm analyze {result.files['example_ct']} --segmentation {result.files['example_anatomy']} "
        f"--model {result.model_dir} --out {result.out / 'example_analysis.json'}"
    )
    return 0
