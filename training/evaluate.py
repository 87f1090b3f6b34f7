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
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.data.labelled import LAYOUT_NAMES
from fvlm_core.errors import ConfigError, DataError, FVLMError
from fvlm_training.dataset_scoring import score_dataset
from fvlm_training.label_tables import read_label_table, read_score_table, score_table_csv, truth_table
from fvlm_training.protocol import (
    CalibrationSource,
    EvaluationReport,
    calibrate_report,
    calibration_macro,
    evaluate_scores,
    labelled,
)
from fvlm_training.report import fmt, write_report
from fvlm_training.score_journal import JOURNAL_DIR, model_identity, scoring_identity
from fvlm_training.stored_thresholds import store_thresholds
from fvlm_training.volume_source import VolumeSource, refuse_cache_for_reference

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
                refuse_cache_for_reference(data)
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
        f"{report.split['description']}: macro AUC {fmt(m['auc'])} over {macro_label_count(m)}; ACC "
        f"{fmt(m['accuracy'])}, wF1 {fmt(m['f1_weighted'])}, precision {fmt(m['precision'])} over "
        f"{macro_label_count(m, 'precision')} ({report.protocol} protocol). Report: {Path(args.out) / 'report.md'}"
    )
    c = calibration_macro(report.calibration)
    print(
        f"calibration (mean over {c['n_labels']} labels, on volumes not used to fit it): Brier "
        f"{fmt(c['brier_raw'], 4)} -> {fmt(c['brier_calibrated'], 4)}, ECE {fmt(c['ece_raw'], 4)} -> "
        f"{fmt(c['ece_calibrated'], 4)}"
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
