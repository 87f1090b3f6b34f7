"""Generate a synthetic chest CT cohort (phantoms with findings and reports) in the CT-RATE layout.

Writes dataset/{train,valid}/..., metadata/, radiology_text_reports/, multi_abnormality_labels/ and
anatomy_masks/ (lung 1, heart 2, esophagus 3, aorta 4, trachea 5). Volumes are stored as int16
with RescaleIntercept -1024 in the metadata CSV (NIfTI headers carry no geometry, as in CT-RATE).
The same --seed gives byte-identical files whatever --workers is. The cohort is written all or
none; an existing --out folder is refused unless --force, which replaces it as a whole (a cohort
mixed with files of an earlier one would not match its own tables).
"""

from __future__ import annotations

import argparse

from fvlm_core.data.synth import DEFAULT_PREVALENCE, generate_cohort
from fvlm_core.errors import InputError
from fvlm_core.outputs import OutputPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; see --force)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out folder (all its files are removed)"
    )
    parser.add_argument("--n", type=int, required=True, help="number of scans (train + valid)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[64],
        metavar="N",
        help="grid size: one value (cube) or Z Y X (default 64)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=None,
        metavar="MM",
        help="voxel size in mm: one value or Z Y X (default: a 288x360x360 mm field of view)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument(
        "--valid-fraction", type=float, default=0.2, help="fraction of scans in 'valid' (0.2)"
    )
    parser.add_argument(
        "--recon-fraction",
        type=float,
        default=0.2,
        help="fraction of scans with a second reconstruction (_2), as in CT-RATE (0.2)",
    )
    parser.add_argument(
        "--prevalence",
        type=float,
        default=None,
        help="one prevalence for every drawn finding (default: 0.25 core, 0.15 extras)",
    )
    parser.add_argument(
        "--normal-fraction", type=float, default=0.1, help="fraction of scans drawn fully normal first (0.1)"
    )
    parser.add_argument("--no-masks", action="store_true", help="do not write anatomy_masks/")


def _three(values, name: str):
    if values is None:
        return None
    if len(values) == 1:
        return tuple(values) * 3
    if len(values) == 3:
        return tuple(values)
    raise InputError(f"{name} takes one value or three (Z Y X), got {values}.")


def run(args: argparse.Namespace) -> int:
    if args.prevalence is not None and not 0.0 <= args.prevalence <= 1.0:
        raise InputError(f"--prevalence must be within 0..1 (got {args.prevalence}).")
    prevalence = None if args.prevalence is None else dict.fromkeys(DEFAULT_PREVALENCE, args.prevalence)
    plan = OutputPlan()
    plan.folder("--out", args.out, replace=True, force=args.force)
    plan.check()
    with plan.writing() as staged:
        summary = _generate(args, staged.path("--out"), prevalence)
    print(
        f"wrote {summary.n_volumes} volumes ({summary.n_scans} scans) to {args.out} in "
        f"{summary.seconds:.1f} s ({summary.volumes_per_second:.1f} volumes/s)"
    )
    return 0


def _generate(args: argparse.Namespace, out, prevalence: dict | None):
    """The cohort of ``args`` written into ``out``; returns its ``CohortSummary``."""
    return generate_cohort(
        out,
        args.n,
        args.seed,
        size_zyx=_three(args.size, "--size"),
        spacing_zyx=_three(args.spacing, "--spacing"),
        workers=max(1, args.workers),
        prevalence=prevalence,
        valid_fraction=args.valid_fraction,
        recon_fraction=args.recon_fraction,
        normal_fraction=args.normal_fraction,
        write_masks=not args.no_masks,
        progress=True,
    )
