"""Prepare a labelled dataset for training or calibration: one model-space sample per volume in a cache.

Datasets (the layout is found from the folder): CT-RATE (each volume read with the metadata
CSV's geometry and HU rescale), RAD-ChestCT (its NPZ files and abnormality x location CSV, on
the grid its preprocessing code implies), or a folder of CTs with one labels CSV (--labels may
name it elsewhere). Gets each volume's anatomy masks (--backend labelmap: CT-RATE's
anatomy_masks/ or --masks; builtin; totalsegmentator), merges them into the anatomy catalog,
resamples to the model space of --config, decomposes the report (when there is one) into
per-anatomy texts, and writes {name}.safetensors + {name}.json into --out. Re-running skips
finished samples (safe after a crash). --shard i/n splits the volumes for SLURM arrays or
torchrun ranks (--shard auto reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE). Volumes that
are missing or fail are skipped, counted, and listed in out/_prepare/summary-*.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fvlm_core.anatomy import CTRATE_CATALOG, get_catalog
from fvlm_core.data.labelled import detect_layout
from fvlm_core.data.prepare import parse_shard, prepare_dataset
from fvlm_core.data.radchest_labels import RADCHEST_MAPPINGS
from fvlm_core.errors import FVLMError
from fvlm_core.model.config import load_config
from fvlm_core.outputs import OutputPlan
from fvlm_core.preprocess import ModelSpaceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="CT-RATE-layout root (dataset/, metadata/, ...), a RAD-ChestCT folder, or a folder of CTs with "
        "one labels CSV",
    )
    parser.add_argument("--out", required=True, help="cache folder for this split")
    parser.add_argument(
        "--split", choices=("train", "valid"), default="train", help="CT-RATE split (default train)"
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="the label CSV of a RAD-ChestCT or cohort folder (default: the one in it)",
    )
    parser.add_argument(
        "--radchest-mapping",
        choices=tuple(RADCHEST_MAPPINGS),
        default="hlip",
        help="RAD-ChestCT labels -> CT-RATE findings (as `fvlm evaluate`; default hlip)",
    )
    parser.add_argument("--shard", default=None, help="i/n (0 <= i < n) or 'auto'; default: everything")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument(
        "--backend",
        choices=("labelmap", "builtin", "totalsegmentator"),
        default="labelmap",
        help="anatomy masks: labelmap (dataset's anatomy_masks/ or --masks), builtin, totalsegmentator",
    )
    parser.add_argument("--masks", default=None, help="folder of label maps named like the volumes")
    parser.add_argument("--class-map", default=None, help="JSON {value: class or anatomy name} of the masks")
    parser.add_argument(
        "--config", default=None, help="model config name or YAML whose preprocessing defines the model space"
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="model-space voxel size (mm)",
    )
    parser.add_argument(
        "--catalog", default=None, help="anatomy catalog (ctrate, extended); default: the config's"
    )
    parser.add_argument(
        "--decomposition",
        default=None,
        metavar="DIR",
        help="folder with fVLM's per-anatomy decomposition files desc_info.json and conc_info.json (the "
        "authors' supplementary material): their texts and abnormal flags replace the rule-based "
        "decomposition of the reports, as the reference trains on them",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many volumes (for a trial run)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any volume failed")


def run(args: argparse.Namespace) -> int:
    output_plan(args).check()  # before the first volume
    config = ModelSpaceConfig()
    catalog = CTRATE_CATALOG
    if args.config:
        config, anatomies = _model_space_of(args.config)
        catalog = get_catalog(anatomies)
    if args.spacing:
        config = ModelSpaceConfig.from_dict({**config.to_dict(), "spacing_zyx": list(args.spacing)})
    if args.catalog:
        catalog = get_catalog(args.catalog)
    summary = prepare_dataset(
        args.dataset,
        args.out,
        split=args.split,
        shard=parse_shard(args.shard),
        workers=args.workers,
        backend=args.backend,
        masks_dir=args.masks,
        class_map=args.class_map,
        catalog=catalog,
        config=config,
        limit=args.limit,
        decomposition=args.decomposition,
        labels=args.labels,
        radchest_mapping=args.radchest_mapping,
    )
    d = summary.to_dict()
    print(
        f"prepare {d['split']} shard {d['shard']}: {d['processed']} written, {d['already_done']} already done, "
        f"{d['failed_count']} failed, {d['skipped_listing_count']} listed but unusable, "
        f"{d['stale_temps_removed']} stale temporary files removed ({d['seconds']:.1f} s)"
    )
    dec = d.get("decomposition")
    if dec and dec["volumes_without_entry"]:
        print(
            f"  {dec['volumes_without_entry']} volume(s) whose scan the decomposition files lack got the normal "
            f"templates (as the reference), e.g. {', '.join(dec['examples_without_entry'][:3])}"
        )
    for line in summary.problem_lines():
        print(line)
    for s in summary.skipped_listing[:10]:
        print(f"  skipped {s['name']}: {s['reason']}")
    if len(summary.failed) > 10 or len(summary.skipped_listing) > 10:
        print(
            f"  (full list in {args.out}/_prepare/summary-{d['split']}-{d['shard'].replace('/', 'of')}.json)"
        )
    if summary.failed and (args.strict or summary.processed + summary.already_done == 0):
        return 1
    return 0


def output_plan(args: argparse.Namespace):
    """The inputs and the output folder of ``fvlm prepare`` (checked only: the cache is written
    sample by sample, so a crash keeps the finished ones)."""
    plan = OutputPlan()
    root = Path(args.dataset)
    plan.input("--dataset", root, contents=False)  # the cache may live beside its input folders
    parts = ("dataset", "metadata", "radiology_text_reports", "multi_abnormality_labels", "anatomy_masks")
    try:
        layout = detect_layout(root, args.labels)
    except FVLMError:  # said when the dataset is read, after the outputs are checked
        layout = "ctrate"
    if layout != "ctrate":  # its label CSVs (the scans are read only)
        parts = tuple(p.name for p in root.glob("*.csv"))
    for part in parts:
        plan.input("--dataset", root / part)
    plan.input("--labels", args.labels)
    plan.input("--masks", args.masks)
    plan.input("--class-map", args.class_map)
    plan.input("--decomposition", args.decomposition)
    if args.config and Path(args.config).exists():  # else a bundled config name
        plan.input("--config", args.config)
    plan.folder("--out", args.out)
    return plan


def _model_space_of(name_or_path: str):
    """(ModelSpaceConfig, anatomy names) of a model config.

    A config YAML (bundled name or file) is read directly: importing the model package
    (torch, transformers) only for its preprocessing block costs seconds per process.
    """
    bundled = Path(__file__).resolve().parents[1] / "configs" / f"{name_or_path}.yaml"
    path = bundled if bundled.is_file() else Path(name_or_path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
        if isinstance(raw, dict) and "anatomies" in raw:
            defaults = ModelSpaceConfig().to_dict()
            return ModelSpaceConfig.from_dict({**defaults, **(raw.get("preprocessing") or {})}), list(
                raw["anatomies"]
            )

    cfg = load_config(name_or_path)
    return cfg.model_space(), list(cfg.anatomies)
