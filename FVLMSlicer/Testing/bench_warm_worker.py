"""First vs later analyses through the panel's warm worker, against a bare ViT-B forward (issue 17).

Runs what the panel runs (``AnalysisLogic.start``: the warm worker, headless MRML)
``--runs`` times on the chest CT with the built-in segmenter and fvlm-base in the official layout
(random weights, built as ``benchmarks/bench_analyze.py`` builds it), then times bare ViT-B
forwards in this process (``benchmarks/timing.py``). Wall time is from the job's start to its
results in the scene. Target: a warm analysis at most ~1.5x (one bare forward + the segmentation),
stated with the medians of the warm runs and of the bare forwards (one forward varies by ~10%
from run to run on a shared machine).

    python FVLMSlicer/Testing/bench_warm_worker.py [--model DIR] [--keep-model DIR] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "FVLMSlicer"), str(ROOT), str(ROOT / "benchmarks")]

SHARED = Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
CT = SHARED / "ct" / "totalsegmentator" / "chest_ct.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an fvlm model folder (default: build fvlm-base)")
    parser.add_argument("--keep-model", help="build fvlm-base into this folder")
    parser.add_argument("--ct", default=str(CT))
    parser.add_argument("--runs", type=int, default=4, help="analyses in one worker (the first is cold)")
    args = parser.parse_args()

    from bench_analyze import build_official_model
    from FVLMSlicerLib import mrml_io, warm
    from FVLMSlicerLib.headless import new_scene
    from FVLMSlicerLib.logic import AnalysisLogic
    from timing import load_note, vit_b_forward_s

    from fvlm_core.io import read_ct

    work = Path(tempfile.mkdtemp(prefix="fvlm-bench-warm-"))
    model = (
        Path(args.model)
        if args.model
        else build_official_model(Path(args.keep_model or work / "model"), work)
    )
    scene = new_scene()
    volume = mrml_io.ct_to_volume_node(read_ct(args.ct), scene, "chest")
    logic = AnalysisLogic(scene)
    runs = []
    try:
        for _ in range(max(args.runs, 2)):
            t = time.perf_counter()
            job = logic.start(volume, None, model_dir=str(model), anatomy_source="builtin", device="cpu")
            status = job.wait(1800)
            wall = time.perf_counter() - t
            if status.state != "done":
                raise SystemExit(f"analysis {status.state}: {status.error}")
            timings = {f"{k}_s": round(v, 2) for k, v in job.nodes.result.timings.items()}
            runs.append({"wall_s": round(wall, 2), **timings, **job.finished_info})
    finally:
        warm.stop_shared_worker()
    forward = statistics.median(vit_b_forward_s() for _ in range(3))
    warm_runs = runs[1:]
    wall = statistics.median(r["wall_s"] for r in warm_runs)
    segment = statistics.median(r["segment_s"] for r in warm_runs)
    report = {
        "first": runs[0],
        "second": warm_runs[0],
        "warm_runs": len(warm_runs),
        "warm_wall_s": [r["wall_s"] for r in warm_runs],
        "warm_analyze_s": [
            round(sum(r.get(f"{k}_s", 0) for k in ("preprocess", "embed", "score", "localize")), 2)
            for r in warm_runs
        ],
        "warm_median_wall_s": round(wall, 2),
        "warm_median_segment_s": round(segment, 2),
        "bare_vit_b_forward_s": round(forward, 2),
        "warm_over_forward_plus_segment": round(wall / (forward + segment), 2),
        "first_over_warm": round(runs[0]["wall_s"] / wall, 2),
        **load_note(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
