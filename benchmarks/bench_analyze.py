"""Benchmark ``fvlm analyze`` on a real chest CT (CPU): every stage's share of the wall time.

Default (issue 17): the installed ``fvlm analyze chest_ct.nii.gz --backend builtin --model M``
runs in a subprocess, ``--repeats`` times, each followed by a bare ViT-B forward in this process
(fvlm-base's image encoder, one 112 x 256 x 352 window, ``--threads`` threads) so that the total
is also stated as a ratio that holds on a loaded machine. ``M`` is fvlm-base in the official
layout: a synthetic official checkpoint (every name and shape of ``checkpoint_keys.json``,
random values) imported by ``fvlm import-checkpoint`` with a CXR-BERT-sized BERT folder (CXR-BERT
itself is not available offline), as ``Testing/test_import_official.py`` builds it.

The subprocess is the real command with timestamps added around it (a wrapper calls
``fvlm_training.cli.main`` -- what the ``fvlm`` script runs -- and marks when ``analyze`` starts
and returns); stages inside come from the results JSON's ``timings_s``. Stages, summing to the
process's wall time: ``python start`` (interpreter up), ``imports: cli`` (the ``fvlm`` module and
every command module, argument parsing), ``read``, ``imports: torch + model code`` (inside the
command, before the model loads), ``load model``, ``segment``, ``resample`` (the analyzer's
``preprocess``), ``encode`` (``embed``), ``score`` (prompt embeddings included), ``write`` (JSON
out, messages) and ``exit`` (interpreter teardown). One plain run of the ``fvlm`` script
(no wrapper) checks that the wrapper changes nothing. ``analysis`` says what the levers did
(issue 17): prompts taken from the model folder's stored embeddings and prompts encoded,
whether the text encoder was built, and whether ``transformers`` / ``monai`` were imported.

Targets (issue 17): end to end at most 3 bare forwards, peak RSS at most 2.5 GB.

``--compare-windows`` instead runs the issue-5 comparison in-process: the project's shared
windows (one ViT forward for the 4 anatomies) against the reference evaluation's (one per
anatomy), with TotalSegmentator heart/aorta masks, the built-in lungs and a stand-in esophagus.

    python benchmarks/bench_analyze.py [--repeats 3] [--threads 2] [--model DIR] [--keep-model DIR]
    python benchmarks/bench_analyze.py --compare-windows [--repeat 3] [--out bench_analyze.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import (
    ROOT,
    SHARED,
    WINDOW,
    BenchParser,
    base_config,
    load_note,
    official_model,
    peak_rss_mb,
    text_folder,
    vit_b,
    vit_b_forward_s,
)

DEFAULT_DATA = SHARED / "ct" / "totalsegmentator"

# The subprocess: the real CLI with timestamps around the analyze command (no behaviour change).
WRAPPER = """
import json, os, sys, time
marks = {"python_started": time.time()}
import fvlm_training.cli as cli
marks["cli_imported"] = time.time()
import fvlm_core.commands.analyze as command
_analyze = command.analyze
seen = []
def analyze(args):
    marks["analyze_started"] = time.time()
    from fvlm_core.zeroshot.analyzer import Analyzer  # imported by analyze anyway
    load = Analyzer.from_pretrained.__func__
    Analyzer.from_pretrained = classmethod(lambda cls, *a, **k: seen.append(load(cls, *a, **k)) or seen[-1])
    try:
        return _analyze(args)
    finally:
        marks["analyze_returned"] = time.time()
command.analyze = analyze
rc = cli.main(sys.argv[1:])
marks["main_returned"] = time.time()
if seen:  # what the levers did: stored prompt embeddings, deferred text encoder, imports
    marks["facts"] = {
        "prompts_from_store": seen[0].prompts.texts_preloaded,
        "prompts_encoded": seen[0].prompts.texts_encoded,
        "text_encoder_built": seen[0].model.text_loaded,
        "imported": sorted(m for m in ("transformers", "monai") if m in sys.modules),
    }
with open(os.environ["FVLM_BENCH_MARKS"], "w") as f:
    json.dump(marks, f)
sys.exit(rc)
"""
# results JSON timings_s key -> stage name, in order
INNER = (("read", "read"), ("load_model", "load model"), ("segment", "segment"))
INNER += (("preprocess", "resample"), ("embed", "encode"), ("score", "score"), ("localize", "localize"))


def build_official_model(out: Path, work: Path) -> Path:
    """fvlm-base in the official layout with random weights, imported by ``fvlm import-checkpoint``
    (``timing.official_model``; FVLMSlicer/Testing/bench_warm_worker.py builds its model here)."""
    return official_model(out, work)


def run_analyze(model: Path, ct: Path, work: Path, wrapped: bool) -> dict:
    """One ``fvlm analyze`` process: wall seconds, peak RSS, results timings and (wrapped) marks."""
    out, marks = work / "results.json", work / "marks.json"
    for f in (out, marks):
        f.unlink(missing_ok=True)
    args = ["analyze", str(ct), "--backend", "builtin", "--model", str(model), "--out", str(out), "--quiet"]
    cmd = [sys.executable, "-c", WRAPPER, *args] if wrapped else ["fvlm", *args]
    env = {**os.environ, "FVLM_BENCH_MARKS": str(marks), "HF_HUB_OFFLINE": "1"}
    with open(work / "stderr.txt", "w") as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(
            f"fvlm analyze failed ({proc.returncode}): {(work / 'stderr.txt').read_text()[-3000:]}"
        )
    run = {"wall_s": t1 - t0, "peak_rss_gb": usage.ru_maxrss / 1024**2, "start": t0, "end": t1}
    run["timings"] = json.loads(out.read_text()).get("timings_s", {})
    if wrapped:
        run["marks"] = json.loads(marks.read_text())
    return run


def stages(run: dict) -> dict[str, float]:
    """Seconds per stage of one wrapped run (they sum to its wall time)."""
    m, t = run["marks"], run["timings"]
    inner = {name: float(t[key]) for key, name in INNER if key in t}
    analyze_s = m["analyze_returned"] - m["analyze_started"]
    out = {
        "python start": m["python_started"] - run["start"],
        "imports: cli": m["analyze_started"] - m["python_started"],
        "read": inner.pop("read", 0.0),
        "imports: torch + model code": analyze_s - sum(inner.values()) - float(t.get("read", 0.0)),
        **inner,
        "write": m["main_returned"] - m["analyze_returned"],
        "exit": run["end"] - m["main_returned"],
    }
    return out


def end_to_end(args) -> dict:
    """Wrapped runs alternated with bare forwards, one plain run; medians, shares and ratios."""
    import torch

    torch.set_num_threads(args.threads)
    ct = args.data / "chest_ct.nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or build_official_model(args.keep_model or work / "fvlm-base-official", work)
        encoder, image = vit_b(), torch.rand(1, 1, *WINDOW)
        vit_b_forward_s(encoder, image)  # warm-up
        runs, bare = [], []
        run_analyze(model, ct, work, wrapped=True)  # warm-up: file cache, bytecode
        for _ in range(args.repeats):
            runs.append(run_analyze(model, ct, work, wrapped=True))
            bare.append(vit_b_forward_s(encoder, image))
        plain = run_analyze(model, ct, work, wrapped=False)
    per_stage = [stages(r) for r in runs]
    median = {k: statistics.median(s[k] for s in per_stage) for k in per_stage[0]}
    total = statistics.median(r["wall_s"] for r in runs)
    ratio = statistics.median(r["wall_s"] / b for r, b in zip(runs, bare))
    return {
        "benchmark": "fvlm analyze chest_ct.nii.gz --backend builtin, CPU, end to end",
        "model": "fvlm-base, official layout (synthetic checkpoint, random weights) imported by "
        "fvlm import-checkpoint; text encoder BERT-base (CXR-BERT's size)",
        "total_s_median": round(total, 2),
        "stages_s_median": {k: round(v, 3) for k, v in median.items()},
        "stage_share_of_total": {k: round(v / sum(median.values()), 3) for k, v in median.items()},
        "bare_vit_forward_s_median": round(statistics.median(bare), 3),
        "total_over_bare_forward_median": round(ratio, 2),
        "peak_rss_gb_max": round(max(r["peak_rss_gb"] for r in runs), 2),
        "analysis": runs[0]["marks"].get("facts", {}),
        "plain_fvlm_script": {
            "wall_s": round(plain["wall_s"], 2),
            "peak_rss_gb": round(plain["peak_rss_gb"], 2),
        },
        "targets": {
            "total_le_3_bare_forwards": ratio <= 3.0,
            "peak_rss_le_2p5_gb": max(r["peak_rss_gb"] for r in runs) <= 2.5,
        },
        "threads_bare_forward": args.threads,
        **load_note(),
    }


# ------------------------------------------------------------------ --compare-windows (issue 5)


def build_model(folder: Path):
    """fvlm-base with a random BERT-base text encoder (CXR-BERT's size, read from ``folder``)."""
    from fvlm_core.model import FVLM, FVLMConfig

    return FVLM(FVLMConfig.from_dict(base_config(text_folder(folder))), load_text_weights=False).eval()


def esophagus_stand_in(seg, geometry):
    """Tube (radius 7 mm) from the carina down, between the airways' centre and the spine (timing only)."""
    import numpy as np

    air = seg.classes.get("airways")
    lung = seg.labelmap == 1
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if air is not None and air.any():
        _, ay, ax = (np.mean(v) for v in np.nonzero(air))
    else:
        _, ay, ax = (np.mean(v) for v in np.nonzero(lung))
    _, sy, sx = geometry.spacing_zyx
    cy = ay + 20.0 / sy  # ~20 mm posterior of the airway centre in LPS-ish arrays (y to posterior)
    z = np.arange(geometry.shape_zyx[0])[:, None, None]
    y = np.arange(geometry.shape_zyx[1])[None, :, None]
    x = np.arange(geometry.shape_zyx[2])[None, None, :]
    tube = ((y - cy) * sy) ** 2 + ((x - ax) * sx) ** 2 <= 7.0**2
    return tube & (z >= zs.min()) & (z <= zs.max())


def load_inputs(data: Path):
    """(ct, segmentation, timings) with lung (built-in), heart, aorta (reference masks), esophagus (stand-in)."""
    import numpy as np

    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.io import read_ct, read_label_map
    from fvlm_core.segmentation import AnatomySegmentation
    from fvlm_core.segmentation.builtin import BuiltinBackend

    t = time.perf_counter()
    ct = read_ct(data / "chest_ct.nii.gz")
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    lungs = BuiltinBackend().segment(ct, CTRATE_CATALOG)
    heart = read_label_map(data / "chest_heart.nii.gz", reference=ct.geometry).array > 0
    aorta = read_label_map(data / "chest_aorta_cropped.nii.gz", reference=ct.geometry).array > 0
    labelmap = lungs.labelmap.copy()
    eso = esophagus_stand_in(lungs, ct.geometry)
    for name, m in (("heart", heart), ("aorta", aorta), ("esophagus", eso)):
        labelmap[m & (labelmap == 0)] = CTRATE_CATALOG.label(name)
    seg = AnatomySegmentation.from_labelmap(labelmap, ct.geometry, CTRATE_CATALOG, "builtin+reference masks")
    t_seg = time.perf_counter() - t
    counts = {n: int(np.count_nonzero(labelmap == CTRATE_CATALOG.label(n))) for n in CTRATE_CATALOG.names}
    return ct, seg, {"read": t_read, "segment": t_seg}, counts


def run_mode(mode: str, data: Path, threads: int, repeat: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    out: dict = {"mode": mode, "threads": threads}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
    out["load_model_s"] = round(time.perf_counter() - t, 3)
    if mode == "bare":
        image = torch.rand(1, 1, *WINDOW)
        with torch.inference_mode():
            model.encode_tokens(image)  # warm-up
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                model.encode_tokens(image)
                times.append(time.perf_counter() - t)
        out["vit_forward_s"] = round(min(times), 3)
        out["vit_forward_all_s"] = [round(v, 3) for v in times]
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return out

    from fvlm_core.zeroshot.analyzer import Analyzer

    ct, seg, t_in, counts = load_inputs(data)
    out.update({k: round(v, 3) for k, v in t_in.items()})
    out["anatomy_voxels"] = counts
    analyzer = Analyzer(model, device="cpu", name="fvlm-base (random weights, BERT-base text)")
    strategy = "shared" if mode == "shared" else "reference"
    image = torch.rand(1, 1, *WINDOW)
    runs, bare = [], []
    for i in range(repeat + 1):  # run 0: cold prompt cache (text encoding included in score)
        res = analyzer.analyze(ct, seg, similarity_maps=False, strategy=strategy)
        runs.append({k: round(v, 3) for k, v in res.timings.items()})
        if i == 0:
            out["windows"] = [w.to_dict() for w in res.windows]
            out["statuses"] = {a.name: a.status for a in res.anatomies}
            out["prompt_encoder_calls_first"] = analyzer.prompts.encoder_calls
        else:
            # A bare forward right after each analysis: on a shared CPU the ratio of neighbours
            # is more trustworthy than the ratio of numbers taken minutes apart.
            with torch.inference_mode():
                t = time.perf_counter()
                model.encode_tokens(image)
                bare.append(time.perf_counter() - t)
    out["prompt_encoder_calls_total"] = analyzer.prompts.encoder_calls
    out["cold"] = runs[0]
    warm = runs[1:]
    out["warm"] = {k: min(r[k] for r in warm) for k in warm[0]}
    out["warm_all"] = warm
    out["embed_plus_score_s"] = round(out["warm"]["embed"] + out["warm"]["score"], 3)
    out["bare_vit_forward_interleaved_s"] = round(min(bare), 3)
    out["bare_vit_forward_interleaved_all_s"] = [round(v, 3) for v in bare]
    out["ratio_embed_plus_score_over_bare_interleaved"] = round(out["embed_plus_score_s"] / min(bare), 3)
    out["n_vit_forwards"] = len(out["windows"])
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def compare_windows(args) -> dict | None:
    """Shared vs reference windows, each mode in its own process (issue 5)."""
    results = {}
    for mode in ("bare", "shared", "reference"):
        cmd = [sys.executable, __file__, "--mode", mode, "--data", str(args.data)]
        cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return None
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: done", file=sys.stderr)
    bare = results["bare"]["vit_forward_s"]
    shared, ref = results["shared"], results["reference"]
    summary = {
        "benchmark": "fvlm analyze, chest_ct.nii.gz, CPU",
        "model": "fvlm-base (MONAI ViT-B, random weights); text encoder BERT-base (CXR-BERT's size, random "
        "weights: CXR-BERT is not available offline)",
        "segmentation": "lung: built-in backend; heart, aorta: TotalSegmentator reference masks; esophagus: "
        "stand-in tube (no reference mask for this CT; timing only)",
        "machine": {
            "cpu_threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "stages_shared_warm_s": {
            "read": shared["read"],
            "segment": shared["segment"],
            **shared["warm"],
        },
        "stages_reference_warm_s": {"read": ref["read"], "segment": ref["segment"], **ref["warm"]},
        "bare_vit_forward_s": bare,
        "embed_plus_score_shared_s": shared["embed_plus_score_s"],
        "embed_plus_score_reference_s": ref["embed_plus_score_s"],
        "vit_forwards": {"shared": shared["n_vit_forwards"], "reference": ref["n_vit_forwards"]},
        "ratio_shared_over_bare": round(shared["embed_plus_score_s"] / bare, 3),
        "ratio_shared_over_bare_interleaved": shared["ratio_embed_plus_score_over_bare_interleaved"],
        "ratio_reference_over_bare_interleaved": ref["ratio_embed_plus_score_over_bare_interleaved"],
        "load_average_at_end": os.getloadavg(),
        "ratio_reference_over_shared": round(ref["embed_plus_score_s"] / shared["embed_plus_score_s"], 3),
        "target_embed_plus_score_le_1p2_bare": shared["ratio_embed_plus_score_over_bare_interleaved"] <= 1.2,
        "peak_rss_mb": {m: results[m]["peak_rss_mb"] for m in results},
        "prompt_cache": {
            "encoder_calls_first_analysis": shared["prompt_encoder_calls_first"],
            "encoder_calls_after_all_runs": shared["prompt_encoder_calls_total"],
            "score_cold_s": shared["cold"]["score"],
            "score_warm_s": shared["warm"]["score"],
        },
        "details": results,
        **load_note(),
    }
    return summary


def main(argv=None) -> int:
    p = BenchParser(__doc__)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs (medians are reported)")
    p.add_argument("--model", type=Path, help="an fvlm-base model folder to use instead of building one")
    p.add_argument(
        "--keep-model", type=Path, help="build the official-layout model into this folder and keep it"
    )
    p.add_argument("--compare-windows", action="store_true", help="the in-process window comparison instead")
    p.add_argument("--repeat", type=int, default=3, help="--compare-windows: timed runs per mode (minimum)")
    p.add_argument("--mode", choices=("shared", "reference", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = args.repeat = 1
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.threads, args.repeat)))
        return 0
    if not (args.data / "chest_ct.nii.gz").exists():
        print(f"data not found: {args.data}/chest_ct.nii.gz (set FVLM_SHARED_DATA)", file=sys.stderr)
        return 1
    summary = compare_windows(args) if args.compare_windows else end_to_end(args)
    if summary is None:
        return 1
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "details"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
