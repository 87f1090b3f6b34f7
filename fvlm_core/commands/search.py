"""Find the scans of an embedding store most like a text or a scan, per anatomy.

--text "..." ranks the scans whose anatomy embedding is closest to the text's embedding (the
model's text encoder); --like ranks them by similarity to a scan: a scan id of the store, or a CT
file / DICOM folder, embedded first with the store's model (segmented with --segmentation FILE
or --backend). Scores are cosine similarities. Exact search up to a size measured in
benchmarks/bench_store.py, a FAISS index above it (--method). Prints the ranked scans with their
scores and volume files; --out writes them as JSON.

Examples::

    fvlm search ctrate-valid.store --text "Large right pleural effusion." --anatomy lung -k 10
    fvlm search ctrate-valid.store --like valid_1_a_1.nii.gz --anatomy heart -k 5
    fvlm search ctrate-valid.store --like chest.nii.gz --segmentation seg.nii.gz --anatomy lung
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fvlm_core.atomic import atomic_write_text
from fvlm_core.commands.query import open_store_and_model
from fvlm_core.errors import ConfigError
from fvlm_core.outputs import OutputPlan
from fvlm_core.store.format import EmbeddingStore
from fvlm_core.store.search import search_like, search_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="an embedding store folder (`fvlm embed --out`)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a description to search for")
    what.add_argument(
        "--like", metavar="CT_OR_ID", help="a scan id of the store, or a CT file / DICOM folder"
    )
    parser.add_argument("--anatomy", required=True, help="which anatomy to compare (one of the model's)")
    parser.add_argument("-k", type=int, default=10, help="how many scans (default 10)")
    parser.add_argument(
        "--method", choices=("auto", "exact", "index"), default="auto",
        help="exact search, the FAISS index, or auto (the index above the measured crossover)",
    )  # fmt: skip
    parser.add_argument(
        "--segmentation", help="--like CT: its anatomy label map (else --backend segments it)"
    )
    parser.add_argument("--backend", default="builtin", help="--like CT: builtin | totalsegmentator")
    parser.add_argument("--model", help="the store's model folder (default: the folder it was made from)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default cpu)")
    parser.add_argument("--out", help="also write the matches as JSON")


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: give at least 1.")
    plan = OutputPlan()
    plan.input("STORE", args.store)
    plan.input("--segmentation", args.segmentation)
    plan.file("--out", args.out, suffixes=(".json",), example="matches.json")
    plan.check()
    store = EmbeddingStore.open(args.store)
    store.check_anatomy(args.anatomy)
    needs_model = args.text is not None or (args.like not in set(store.scans()) and Path(args.like).exists())
    analyzer = None
    if needs_model:
        store, analyzer = open_store_and_model(args.store, args.model, args.device, what="search it")
    if args.text is not None:
        matches = search_text(store, analyzer, args.text, args.anatomy, args.k, args.method)
        query = {"text": args.text}
    else:
        seg = args.segmentation or args.backend
        matches = search_like(
            store, args.like, args.anatomy, args.k, analyzer=analyzer, segmentation=seg, method=args.method
        )
        query = {"like": args.like}
    for m in matches:
        where = m.source if m.reachable else f"{m.source} (not reachable here)"
        partial = " [partial]" if m.status == "partial" else ""
        print(f"{m.rank:3d}  {m.score:.4f}  {m.scan}{partial}  {where}")
    if args.out:
        doc = {
            **query,
            "anatomy": args.anatomy,
            "store": str(store.path),
            "matches": [m.to_dict() for m in matches],
        }
        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0
