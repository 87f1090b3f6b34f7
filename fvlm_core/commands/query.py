"""Score zero-shot findings over a whole embedding store (`fvlm embed`'s): only the text side runs.

For every scan of the store and every finding (the model's own, plus or instead of those of
--prompts), the same raw score ``softmax([v.t_neg, v.t_pos] / tau)[1]`` as ``fvlm analyze``,
from the stored anatomy embeddings: no volume is read and no image encoder runs. Thresholds and
calibrations are applied as ``fvlm analyze`` applies them: the model's calibrated threshold and
calibration where the finding and its wordings are the model's own (the value is then a
probability), else a threshold of 0.5 and the raw score, called an "uncalibrated score".

Writes one row per scan and finding (CSV, or Parquet with a .parquet name): scan, anatomy,
finding, scale (probability | uncalibrated score), value, raw_score, probability, threshold,
raw_threshold, threshold_source, flagged, calibration, source (the volume file). A cell is empty
where the finding's anatomy was absent or not scored in that scan.

--model defaults to the folder the store was made from; any model is checked against the
store's (weights SHA-256 and config) and another model's store is refused.

Examples::

    fvlm query ctrate-valid.store --out scores.csv
    fvlm query ctrate-valid.store --prompts pe.yaml --only-prompts --out pe.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fvlm_core.errors import ConfigError
from fvlm_core.outputs import OutputPlan
from fvlm_core.store.format import EmbeddingStore
from fvlm_core.zeroshot.prompt_files import load_findings_file, merge_findings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="an embedding store folder (`fvlm embed --out`)")
    parser.add_argument(
        "--prompts",
        help="YAML/JSON findings to score besides the model's (name, anatomy, positive, negative)",
    )
    parser.add_argument("--only-prompts", action="store_true", help="score only the --prompts findings")
    parser.add_argument("--model", help="the store's model folder (default: the folder it was made from)")
    parser.add_argument("--device", default="cpu", help="device of the text encoder (default cpu)")
    parser.add_argument("--out", required=True, help="the result table (.csv, or .parquet)")
    parser.add_argument("--quiet", action="store_true")


def open_store_and_model(store_path: str, model: str | None, device: str = "cpu", what: str = "use it"):
    """``(store, analyzer)``: the store and its model (``model`` or the folder the store was made
    from), checked to be the store's; the text encoder is loaded only if a prompt needs it."""
    store = EmbeddingStore.open(store_path)
    if model is None:
        model = store.info.model.folder
        if not model or not Path(model).is_dir():
            raise ConfigError(
                f"{store_path}: the model it was made from ({model or 'unknown'}) is not there any more; "
                "give it with --model DIR."
            )
    store.check_model(model, what=what)
    from fvlm_core.zeroshot.analyzer import Analyzer

    return store, Analyzer.from_pretrained(model, device=device)


def run(args: argparse.Namespace) -> int:
    from fvlm_core.store.query import query_store, write_query

    if args.only_prompts and not args.prompts:
        raise ConfigError("--only-prompts scores only the --prompts findings: give --prompts FILE too")
    plan = OutputPlan()
    plan.input("STORE", args.store)
    plan.input("--prompts", args.prompts)
    plan.input("--model", args.model)
    plan.file("--out", args.out, suffixes=(".csv", ".parquet"), example="scores.csv")
    plan.check()
    user = load_findings_file(args.prompts) if args.prompts else None
    store, analyzer = open_store_and_model(args.store, args.model, args.device, what="score it")
    findings = analyzer.default_findings()
    if user is not None:
        findings = user if args.only_prompts else merge_findings(findings, user)
    analyzer.check_findings(findings)
    result = query_store(store, analyzer, findings)
    write_query(result, args.out)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    n_scans = result.table.num_rows // max(len(result.findings), 1)
    for f in result.findings:
        say(
            f"{f['name']} ({f['anatomy']}): {f['scale']}, threshold {f['threshold']:.4g} ({f['threshold_source']}), "
            f"calibration {f['calibration']}"
        )
    for note in result.notes:
        say(f"note: {note}")
    say(f"{len(result.findings)} finding(s) on {n_scans:,} scans: {args.out}")
    return 0
