"""Score zero-shot findings on one CT and write them as JSON (plus optional similarity maps).

Reads the CT (NIfTI, NRRD, MHA or a DICOM series folder), segments it (built-in backend:
lungs only; TotalSegmentator; or a given label map), embeds every anatomy of the model and scores
the model's findings (the 16 CT-RATE findings by default) plus any given with --prompts.
Per anatomy: present / partial (cut by the field of view) / absent, volume; per finding: the
calibrated probability where the model holds a calibration of it (else the raw score, called an
"uncalibrated score"), the raw score, the threshold used on both scales (calibrated or default
0.5) and flagged yes/no; the console lists every finding the same way. Warnings (a
DICOM folder holding several series, voxels much coarser than the model's, default prompt
wordings, a prompt replacing a built-in finding, ...) are printed and listed in the JSON.

The model's own findings are scored with the prompt embeddings stored in its folder (written
when the folder was saved, checked against its text encoder); the text encoder is loaded only
for --prompts wordings the folder lacks.

With --dicom-out (a DICOM series folder only): a new folder with the results as DICOM objects
that reference the source series (``fvlm_core.dicom``): the anatomies as a DICOM Segmentation,
the findings as a Comprehensive 3D SR measurement report (TID 1500) and, with --dicom-maps, the
similarity maps as Parametric Maps. The series is checked before the work (identifiers present,
one study, frame of reference, size and orientation).

Every output is checked before the work (none may be an input or another output; --out a
file, --maps-dir a folder, --dicom-out a folder that does not exist yet) and written all or none.

Examples::

    fvlm analyze chest.nii.gz --model models/fvlm-tiny --out results.json
    fvlm analyze chest.nii.gz --segmentation seg.nii.gz --model M --prompts my_findings.yaml \\
        --maps-dir maps/ --out results.json
    fvlm analyze dicom/series01 --backend totalsegmentator --model M --dicom-out dicom-results \\
        --dicom-maps --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fvlm_core import __version__
from fvlm_core.anatomy import get_catalog
from fvlm_core.commands.segment import add_ct_arguments, add_totalsegmentator_arguments
from fvlm_core.errors import ConfigError, recorded_warnings
from fvlm_core.model.config import load_config
from fvlm_core.outputs import OutputPlan
from fvlm_core.zeroshot.pipeline import AnalysisRequest
from fvlm_core.zeroshot.prompt_files import load_findings_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ct_arguments(parser)
    parser.add_argument("--model", required=True, help="model folder (config.yaml + model.safetensors)")
    seg = parser.add_mutually_exclusive_group()
    seg.add_argument(
        "--segmentation",
        help="reuse a label map (TotalSegmentator multilabel file or mask folder, or an anatomy label map)",
    )
    seg.add_argument("--backend", default="builtin", help="segmentation backend: builtin | totalsegmentator")
    parser.add_argument("--class-map", help="class map JSON for --segmentation (value -> class name)")
    add_totalsegmentator_arguments(parser)
    parser.add_argument(
        "--strict-segmentation",
        action="store_true",
        help="refuse a segmentation whose anatomies' intensities do not fit their tissue (a lung that is "
        "not mostly air, ...: made from another scan, or misaligned); default: a warning",
    )
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
        help="with --maps-dir or --dicom-maps: maps of every finding, not only flagged ones",
    )
    parser.add_argument(
        "--dicom-out",
        help="new folder for DICOM objects referencing the source series (a DICOM folder CT only): "
        "seg.dcm (DICOM Segmentation of the anatomies), sr.dcm (Comprehensive 3D SR, TID 1500, of "
        "the findings)",
    )
    parser.add_argument(
        "--dicom-maps",
        action="store_true",
        help="with --dicom-out: the similarity maps too, as DICOM Parametric Maps (maps/*.dcm)",
    )
    parser.add_argument(
        "--windows",
        choices=("shared", "centred", "reference"),
        default="shared",
        help="shared: one encoder pass per window of anatomies (default); centred: one window per "
        "anatomy, centred on it; reference: the public eval.py's volume preparation and windows",
    )
    parser.add_argument(
        "--max-window",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="cap window size in model-space voxels (low memory); anatomies cut by the cap are not scored",
    )
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.only_prompts and not args.prompts:
        raise ConfigError("--only-prompts scores only the --prompts findings: give --prompts FILE too")
    if args.all_maps and not (args.maps_dir or args.dicom_maps):
        raise ConfigError(
            "--all-maps chooses which similarity maps to write: give --maps-dir FOLDER too "
            "(or --dicom-maps with --dicom-out)"
        )
    if args.dicom_maps and not args.dicom_out:
        raise ConfigError("--dicom-maps adds the maps to the DICOM objects: give --dicom-out FOLDER too")
    plan = output_plan(args)
    plan.check()  # before the minutes of work
    source = dicom_source(args)  # a series DICOM objects cannot reference is refused before the work too
    with recorded_warnings() as warned:
        result = analyze(args)
    result.warnings = list(dict.fromkeys([*warned, *result.warnings]))
    with plan.writing() as staged:
        if args.maps_dir:
            written = result.write_maps(staged.path("--maps-dir"))
            result.map_files = {k: str(staged.final(v)) for k, v in written.items()}
        results = result.to_dict()
        if source is not None:
            results["dicom"] = write_dicom_objects(args, result, source, staged)
        staged.path("--out").write_text(json.dumps(results, indent=2), encoding="utf-8")
    say = _say(args.quiet)
    for anat in result.anatomies:
        for f in anat.findings:
            say(finding_line(anat.name, f))
    for note in result.notes:
        if note not in result.warnings:  # already printed as a warning
            say(f"note: {note}")
    if args.dicom_out:
        say(f"DICOM: {args.dicom_out} (seg.dcm, sr.dcm{', maps/' if args.dicom_maps else ''})")
    say(f"results: {args.out}")
    return 0


def output_plan(args: argparse.Namespace):
    """The inputs and outputs of ``fvlm analyze`` (:class:`fvlm_core.outputs.OutputPlan`)."""
    plan = OutputPlan()
    for option in ("ct", "segmentation", "class_map", "model", "prompts"):
        plan.input("CT" if option == "ct" else f"--{option.replace('_', '-')}", getattr(args, option))
    plan.file("--out", args.out, example="results.json")
    plan.folder("--maps-dir", args.maps_dir)
    plan.folder("--dicom-out", args.dicom_out, replace=True, new=True)
    return plan


def dicom_source(args: argparse.Namespace):
    """The checked source series for --dicom-out (None without it): a file CT, a series
    without its identifiers or mixing studies, sizes, ... is refused here, before the work."""
    if not args.dicom_out:
        return None
    from fvlm_core.dicom import read_source_series

    return read_source_series(args.ct, args.series)


def write_dicom_objects(args: argparse.Namespace, result, source, staged) -> dict:
    """Write the DICOM objects of ``result`` (an ``AnalysisResult`` with its label map) into the
    staged --dicom-out folder; returns the record of them for the results JSON (final paths)."""
    from fvlm_core.dicom import content_from_results, write_dicom
    from fvlm_core.dicom.export import model_record

    maps = {k: m.full() for k, m in result.similarity_maps.items()} if args.dicom_maps else None
    content = content_from_results(
        result.to_dict(),
        result.labelmap,
        get_catalog([a.name for a in result.anatomies]),
        model_dir=args.model,
        model_name=load_config(args.model).name,
        segmenter=segmenter_identity(args),
        maps=maps,
    )
    folder = staged.path("--dicom-out")
    say = _say(args.quiet)
    progress = lambda m, f: say(f"[{f * 100:5.1f}%] {m}")  # noqa: E731
    written = write_dicom(content, source.on_grid(result.geometry), folder, progress=progress)
    return {**written, "folder": str(staged.final(folder)), "model": model_record(content)}


def segmenter_identity(args: argparse.Namespace):
    """What made the anatomy label map, as the SEG records it: a given label map (how it was
    made is not known: SEMIAUTOMATIC), the built-in segmenter or TotalSegmentator (AUTOMATIC)."""
    from fvlm_core.dicom import Algorithm

    if args.segmentation:
        return Algorithm(f"label map {Path(args.segmentation).name}", "unknown", "SEMIAUTOMATIC", "manual")
    if args.backend == "totalsegmentator":
        try:
            ts_version = version("TotalSegmentator")
        except PackageNotFoundError:
            ts_version = "unknown"
        return Algorithm("TotalSegmentator", f"{ts_version} (total task{', fast' if args.fast else ''})")
    return Algorithm("fVLM built-in segmenter", __version__, "AUTOMATIC", "morphology")


def request_from(args: argparse.Namespace):
    """The :class:`~fvlm_core.zeroshot.pipeline.AnalysisRequest` the options describe (the
    --prompts file is read here: a bad one is refused before torch is even imported)."""
    user = [f.to_dict() for f in load_findings_file(args.prompts)] if args.prompts else []
    return AnalysisRequest(
        ct=str(args.ct),
        model=str(args.model),
        segmentation="labelmap" if args.segmentation else args.backend,
        labelmap=args.segmentation,
        class_map=args.class_map,
        fast=args.fast,
        allow_download=args.allow_download,
        series=args.series,
        allow_non_hu=args.allow_non_hu,
        findings=user if args.only_prompts else None,
        extra_findings=[] if args.only_prompts else user,
        device=args.device,
        similarity_maps=("all" if args.all_maps else True) if (args.maps_dir or args.dicom_maps) else False,
        keep_labelmap=bool(args.dicom_out),
        segmentation_check="off" if args.allow_non_hu else ("strict" if args.strict_segmentation else "warn"),
        windows=args.windows,
        max_window=args.max_window,
    )


def analyze(args: argparse.Namespace):
    """Read, segment and score (:func:`fvlm_core.zeroshot.pipeline.run`); the ``AnalysisResult``."""
    from fvlm_core.zeroshot.pipeline import run

    say = _say(args.quiet)
    request = request_from(args)
    return run(request, progress=lambda m, f: say(f"[{f * 100:5.1f}%] {m}"))


_METHOD = {"platt": "Platt calibration", "isotonic": "isotonic calibration"}


def finding_line(anatomy: str, f) -> str:
    """One finding as the console shows it: the calibrated probability (in percent) with its
    threshold on the same scale and the raw score, or the raw score called an uncalibrated score.

    ``Emphysema (lung): probability 41.2 % > threshold 33.1 % (raw score 0.0213 > 0.0100; Platt
    calibration, calibrated threshold) FLAGGED``
    """
    head = f"{f.name} ({anatomy}): "
    if f.raw_score is None:
        return head + "not scored (its anatomy was not scored: see the notes)"
    flag = "FLAGGED" if f.flagged else "not flagged"
    sign = ">" if f.flagged else "<="
    raw, raw_t = distinct_numbers(f.raw_score, f.raw_threshold, digits=4)
    if f.calibrated:
        p, t = distinct_numbers(100 * f.probability, 100 * f.threshold, digits=1)
        return (
            f"{head}probability {p} % {sign} threshold {t} % "
            f"(raw score {raw} {sign} {raw_t}; {_METHOD[f.calibration]}, {f.threshold_source} threshold) {flag}"
        )
    return f"{head}uncalibrated score {raw} {sign} threshold {raw_t} ({f.threshold_source} threshold) {flag}"


def distinct_numbers(a: float, b: float, digits: int = 3) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest decimals (at least ``digits``) that tell them apart, so
    ``p > threshold`` never prints as ``0.500 > 0.500``."""
    for d in range(digits, max(digits, 10)):
        x, y = f"{a:.{d}f}", f"{b:.{d}f}"
        if x != y:
            return x, y
    return repr(float(a)), repr(float(b))


def _say(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return say
