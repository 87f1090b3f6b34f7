"""Where "Similar cases" must run: its search timed in a fresh Python (what Slicer's process would
pay: imports, the store's first read, a FAISS index above the crossover) and through the warm
worker (``TaskJob``: time to matches and the longest GUI-thread step).

    python FVLMSlicer/Testing/bench_similar_cases.py --work /tmp/similar --scans 1000 50188 200000

Stores: random unit vectors at fvlm-base's width (256) on its 4 anatomies, written as ``fvlm
embed`` lays them out (``benchmarks/bench_store.py``); made once in ``--work``. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT / "benchmarks", ROOT / "FVLMSlicer", ROOT):
    sys.path.insert(0, str(path))

IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from fvlm_core.store import EmbeddingStore, search_like
store = EmbeddingStore.open(sys.argv[1])
rng, seconds = np.random.default_rng(1), {}
for a in store.info.model.anatomies:
    t = time.perf_counter()
    search_like(store, {a: rng.normal(size=store.info.model.embed_dim).astype("float32")}, a, 5)
    seconds[a] = round(time.perf_counter() - t, 3)
print(json.dumps({"total_s": round(time.perf_counter() - t0, 3), "per_anatomy_s": seconds}))
"""


def make_store(path: Path, n: int) -> None:
    from bench_store import _synthetic_store

    from fvlm_core.model import load_config
    from fvlm_core.store.format import ModelIdentity

    config = load_config("fvlm-base")
    kept = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("thresholds", "calibration", "versions", "findings")
    }
    identity = ModelIdentity(
        "fvlm-base", "0" * 64, json.loads(json.dumps(kept)), config.embed_dim, tuple(config.anatomies)
    )
    _synthetic_store(path, n, identity)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the stores (kept for later runs)")
    parser.add_argument("--scans", type=int, nargs="+", default=[1000, 50188, 200000])
    args = parser.parse_args()
    import numpy as np
    from FVLMSlicerLib.headless import new_scene
    from FVLMSlicerLib.logic import AnalysisLogic
    from FVLMSlicerLib.results import ResultNodes
    from FVLMSlicerLib.warm import WarmWorker

    from fvlm_core.store import EmbeddingStore
    from fvlm_core.zeroshot.results import AnalysisResult, AnatomyEmbeddings, AnatomyResult

    logic, worker = AnalysisLogic(new_scene()), WarmWorker(sys.executable, idle_minutes=None)
    try:
        for n in args.scans:
            path = Path(args.work) / f"store-{n}"
            if not path.exists():
                make_store(path, n)
            cold = subprocess.run(
                [sys.executable, "-c", IN_PROCESS, str(path)], capture_output=True, text=True
            )
            print(json.dumps({"scans": n, "in_a_fresh_python": json.loads(cold.stdout)}))
            model = EmbeddingStore.open(path).info.model
            rng = np.random.default_rng(0)
            vectors = {a: rng.normal(size=model.embed_dim).astype("float32") for a in model.anatomies}
            result = AnalysisResult([AnatomyResult(a, "present", 1.0) for a in model.anatomies])
            result.embeddings = AnatomyEmbeddings(vectors, model=model.to_dict())
            for run in ("first", "second"):
                t = time.perf_counter()
                job = logic.wait(
                    logic.find_similar(ResultNodes(None, None, {}, result), path, 5, worker=worker)
                )
                seconds = time.perf_counter() - t
                print(json.dumps({"scans": n, "worker": run, "to_matches_s": round(seconds, 2),
                                  "gui_steps": job.status.steps,
                                  "longest_gui_step_ms": round(1000 * job.status.longest_step_s, 1)}))  # fmt: skip
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
