"""Score zero-shot findings on one CT and write them as JSON (plus optional similarity maps).

Reads the CT (NIfTI, NRRD, MHA or a DICOM series folder), segments it (built-in backend:
lungs only; TotalSegmentator; or a given label map), embeds every anatomy of the model and scores
the model's findings (the 16 CT-RATE findings by default) plus any given with --prompts.
Per anatomy: present / partial (cut by the field of view) / absent, volume; per finding:
probability, the threshold used (calibrated or default 0.5) and flagged yes/no.

Examples::

    fvlm analyze chest.nii.gz --model models/fvlm-tiny --out results.json
    fvlm analyze chest.nii.gz --segmentation seg.nii.gz --model M --prompts my_findings.yaml \\
        --maps-dir maps/ --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", help="CT volume: NIfTI/NRRD/MHA file or DICOM series folder")
    seg = parser.add_mutually_exclusive_group()
    seg.add_argument(
        "--segmentation",
        help="reuse a label map (TotalSegmentator multilabel file or mask folder, or an anatomy label map)",
    )
    seg.add_argument("--backend", default="builtin", help="segmentation backend: builtin | totalsegmentator")
    parser.add_argument("--class-map", help="class map JSON for --segmentation (value -> class name)")
    parser.add_argument("--model", required=True, help="model folder (config.yaml + model.safetensors)")
    parser.add_argument(
        "--prompts",
        help="JSON/YAML list of extra findings: {name, anatomy, positive: [...], negative: [...]}",
    )
    parser.add_argument(
        "--only-prompts",
        action="store_true",
        help="score only the --prompts findings, not the model's defaults",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    parser.add_argument("--maps-dir", help="write similarity maps (NIfTI, on the CT grid) into this folder")
    parser.add_argument(
        "--all-maps",
        action="store_true",
        help="with --maps-dir: maps of every finding, not only flagged ones",
    )
    parser.add_argument(
        "--windows",
        choices=("shared", "reference"),
        default="shared",
        help="shared: one encoder pass per window of anatomies (default); reference: one per anatomy",
    )
    parser.add_argument(
        "--max-window",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="cap window size in model-space voxels (low memory); anatomies cut by the cap are not scored",
    )
    parser.add_argument("--allow-non-hu", action="store_true", help="skip the check that the CT is in HU")
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.findings import FindingSet
    from fvlm_core.io import read_ct
    from fvlm_core.zeroshot.analyzer import Analyzer, load_findings_file

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    timings = {}
    t = time.perf_counter()
    analyzer = Analyzer.from_pretrained(args.model, device=args.device)
    timings["load_model"] = time.perf_counter() - t
    findings = analyzer.default_findings()
    if args.prompts:
        user = load_findings_file(args.prompts)
        findings = user if args.only_prompts else FindingSet([*findings, *user])
    analyzer.check_findings(findings)  # fail before the slow steps

    t = time.perf_counter()
    ct = read_ct(args.ct, allow_non_hu=args.allow_non_hu)
    timings["read"] = time.perf_counter() - t
    say(f"read {args.ct}: {ct.array.shape[::-1]} voxels")

    t = time.perf_counter()
    segmentation = segment(ct, analyzer, args.segmentation, args.backend, args.class_map)
    timings["segment"] = time.perf_counter() - t

    maps = ("all" if args.all_maps else True) if args.maps_dir else False
    with torch.no_grad():  # scoped: `fvlm analyze` may run inside a longer-lived process
        result = analyzer.analyze(
            ct,
            segmentation,
            findings,
            similarity_maps=maps,
            strategy=args.windows,
            max_window_zyx=args.max_window,
            progress=(lambda m, f: say(f"[{f * 100:5.1f}%] {m}")),
        )
    if args.maps_dir:
        result.write_maps(args.maps_dir)
    result.timings = {**timings, **result.timings}
    out = result.to_dict()
    out["ct"] = str(args.ct)
    out["segmentation"] = {"source": args.segmentation or args.backend}
    atomic_write_text(args.out, json.dumps(out, indent=2))
    for anat, f in result.flagged:
        say(
            f"flagged: {f.name} on {anat} (p = {f.probability:.3f} > {f.threshold:.3f}, {f.threshold_source})"
        )
    for note in result.notes:
        say(f"note: {note}")
    say(f"results: {args.out}")
    return 0


def segment(ct, analyzer, segmentation_path: str | None, backend: str, class_map: str | None):
    """Segment ``ct`` (or read a given label map) into the model's anatomies."""
    from fvlm_core.anatomy import get_catalog
    from fvlm_core.segmentation import get_backend

    catalog = get_catalog(analyzer.anatomies)
    if segmentation_path:
        seg_backend = get_backend("labelmap", path=segmentation_path, class_map=class_map)
    else:
        seg_backend = get_backend(backend)
    return seg_backend.segment(ct, catalog)
