"""Segment a CT into anatomies and write the anatomy label map on the CT's own grid.

Backends: ``builtin`` (offline, classical: lungs and bone), ``totalsegmentator`` (needs the
optional ``totalsegmentator`` package and its weights), ``labelmap`` (reuse a segmentation: a
TotalSegmentator multilabel file, a folder of ``<class>.nii.gz`` masks, or any label map with
``--class-map``). Anatomies not found are reported as absent; if none of the catalog's
anatomies is found the command fails. Both outputs are checked before the work (neither may be
an input or the other output) and written both or neither; warnings (several DICOM series,
voxels much coarser than the segmenter works at) are printed and listed in the --json summary.

Examples::

    fvlm segment chest.nii.gz --out anatomy.nii.gz --json anatomy.json
    fvlm segment ct.nii.gz --backend labelmap --labelmap seg.nii.gz --catalog extended --out a.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fvlm_core.anatomy import get_catalog
from fvlm_core.errors import ConfigError, InputError, recorded_warnings
from fvlm_core.io import IMAGE_SUFFIXES, read_ct
from fvlm_core.outputs import OutputPlan
from fvlm_core.segmentation.choice import choose_backend, segment


def add_ct_arguments(parser: argparse.ArgumentParser) -> None:
    """The CT a command reads (``ct``, ``--series``, ``--allow-non-hu``: the arguments of
    :func:`fvlm_core.io.read_ct`); shared by ``fvlm segment`` and ``fvlm analyze``."""
    parser.add_argument("ct", help="CT volume: NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument(
        "--series", metavar="UID", help="DICOM folder with several series: the Series Instance UID to read"
    )
    parser.add_argument("--allow-non-hu", action="store_true", help="skip the check that the CT is in HU")


def add_totalsegmentator_arguments(parser: argparse.ArgumentParser) -> None:
    """The totalsegmentator backend's ``--fast`` and ``--allow-download``; shared by ``fvlm
    segment`` and ``fvlm analyze``."""
    parser.add_argument("--fast", action="store_true", help="totalsegmentator: use the 3 mm --fast model")
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="totalsegmentator: let it download missing weights (internet needed)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ct_arguments(parser)
    parser.add_argument(
        "--backend",
        default="builtin",
        choices=("builtin", "totalsegmentator", "labelmap"),
        help="default: builtin",
    )
    parser.add_argument("--labelmap", help="label map file or mask folder (for --backend labelmap)")
    parser.add_argument(
        "--class-map",
        help="class map for --labelmap: JSON file {value: class name}, 'total' (TotalSegmentator), "
        "'anatomy' (values are already the catalog's), or 'auto' (default)",
    )
    parser.add_argument("--catalog", default="ctrate", choices=("ctrate", "extended"), help="default: ctrate")
    parser.add_argument("--out", required=True, help="output anatomy label map (.nii.gz, .nrrd, ...)")
    parser.add_argument("--json", help="also write the per-anatomy summary to this JSON file")
    add_totalsegmentator_arguments(parser)
    parser.add_argument("--device", default="auto", help="totalsegmentator: auto | cpu | cuda[:N] | mps")
    parser.add_argument(
        "--all-classes",
        action="store_true",
        help="totalsegmentator: predict all its classes, not only those the catalog's anatomies need",
    )


def format_table(summary: dict) -> str:
    """Plain-text per-anatomy table of a segmentation summary."""
    rows = [("anatomy", "label", "status", "voxels", "volume_ml")]
    for a in summary["anatomies"]:
        status = ("partial (cut by FOV)" if a["cut_by_fov"] else "present") if a["present"] else "absent"
        rows.append((a["name"], str(a["label"]), status, str(a["voxels"]), f"{a['volume_ml']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def output_plan(args: argparse.Namespace):
    """The inputs and outputs of ``fvlm segment`` (:class:`fvlm_core.outputs.OutputPlan`)."""
    plan = OutputPlan()
    plan.input("CT", args.ct)
    plan.input("--labelmap", args.labelmap)
    if args.class_map and Path(args.class_map).exists():  # else a word: total, anatomy, auto
        plan.input("--class-map", args.class_map)
    plan.file("--out", args.out, suffixes=IMAGE_SUFFIXES, example="anatomy.nii.gz")
    plan.file("--json", args.json, example="anatomy.json")
    return plan


def run(args: argparse.Namespace) -> int:
    if args.backend == "labelmap" and not args.labelmap:
        raise ConfigError("--backend labelmap needs --labelmap FILE (a label map or a folder of masks)")
    if args.labelmap and args.backend != "labelmap":
        raise ConfigError("--labelmap is only used with --backend labelmap")
    catalog = get_catalog(args.catalog)
    plan = output_plan(args)
    plan.check()  # before the work
    with recorded_warnings() as warned:
        ct = read_ct(args.ct, allow_non_hu=args.allow_non_hu, series=args.series)
        backend = choose_backend(
            args.backend,
            labelmap=args.labelmap,
            class_map=args.class_map,
            fast=args.fast,
            device=args.device,
            allow_download=args.allow_download,
            roi_subset=not args.all_classes,
        )

        def progress(step: str, frac: float) -> None:
            print(f"[{frac * 100:3.0f}%] {step}", file=sys.stderr)

        seg = segment(ct, catalog, backend, progress=progress)
    summary = seg.summary()
    summary["ct"] = str(args.ct)
    if ct.dicom_series:
        summary["dicom_series"] = ct.dicom_series
    summary["warnings"] = warned
    print(format_table(summary))
    for note in seg.details.get("notes", []):  # e.g. TotalSegmentator: classes predicted, time per stage
        print(f"note: {note}")
    if not seg.present:
        raise InputError(
            f"{args.ct}: none of the {catalog.name!r} catalog's anatomies ({', '.join(catalog.names)}) was found "
            f"by the {backend.name} backend; nothing written. Check that the CT covers them"
            + (
                " and that the label map belongs to this CT and names its classes (--class-map)."
                if args.labelmap
                else "."
            )
            + (
                " The builtin backend finds only lung and bone: use --backend totalsegmentator or "
                "--backend labelmap for other anatomies."
                if backend.name == "builtin"
                else ""
            )
        )
    summary["output"] = str(args.out)
    with plan.writing() as staged:
        seg.save(staged.path("--out"))
        if args.json:
            staged.path("--json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if args.json:
        print(f"wrote {args.json}")
    return 0
