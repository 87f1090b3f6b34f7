"""The panel's analysis under a main loop that holds the GIL, as Slicer's does, vs a free one (issue 24).

Slicer's GUI thread keeps Python's GIL while Qt waits for events (``slicer_app.EventLoop``), so a
Python thread in Slicer's process runs only while the GUI thread runs Python. This runs the
module's panel (``FVLMSlicer.py`` on ``slicer_app``, headless MRML) on a chest-like CT with an
existing segmentation (lungs and heart, 0.7 x 0.7 x 1.5 mm), in the warm worker: a first (cold)
analysis, then ``--runs`` analyses under each loop, alternated. Wall time is from the Analyze
click to the results in the scene and the table. It also counts how far a Python thread gets in
0.5 s under each loop: what a design with a worker thread in Slicer's process would get.

Prints JSON: the runs, their medians, ``gil_over_free`` (target: at most 1.5) and the thread's share.

    python FVLMSlicer/Testing/bench_gil_loop.py [--shape Z Y X] [--runs N] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "FVLMSlicer"), str(ROOT)]


def chest_like(shape: tuple[int, int, int], spacing: tuple[float, float, float] | None = None):
    """An int16 chest-like CT (body, two lungs, a heart, as scanners store it), its anatomy label
    map and geometry (``spacing`` x, y, z mm; default: 360 x 360 x 180 mm in all)."""
    import numpy as np

    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.geometry import Geometry

    z, y, x = shape
    zz = np.linspace(-1, 1, z, dtype=np.float32)[:, None, None]
    yy = np.linspace(-1, 1, y, dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, x, dtype=np.float32)[None, None, :]
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[np.broadcast_to((yy / 0.8) ** 2 + (xx / 0.9) ** 2 < 1, shape)] = 30
    labels = np.zeros(shape, dtype=np.uint8)
    for cx in (-0.4, 0.4):
        lung = ((yy + 0.05) / 0.5) ** 2 + ((xx - cx) / 0.3) ** 2 + (zz / 0.8) ** 2 < 1
        hu[lung], labels[lung] = -850, CTRATE_CATALOG.label("lung")
    heart = ((yy - 0.3) / 0.25) ** 2 + (xx / 0.22) ** 2 + ((zz + 0.1) / 0.3) ** 2 < 1
    hu[heart], labels[heart] = 40, CTRATE_CATALOG.label("heart")
    spacing = spacing or (360.0 / x, 360.0 / y, 180.0 / z)
    return hu, labels, Geometry((x, y, z), spacing, (-180.0, -180.0, -90.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def thread_progress(loop, seconds: float = 0.5) -> int:
    """Loop iterations a Python thread gets while ``loop`` runs for ``seconds``."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        loop.run_until(lambda: time.monotonic() - t0 > seconds, seconds + 30)
    finally:
        stop.set()
        thread.join(5)
    return count[0]


def measure(shape=(120, 256, 256), runs: int = 3, model: str | None = None, timeout_s: float = 900) -> dict:
    """Run the benchmark (see the module docstring) in this process; the report."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("FVLM_CACHE", tempfile.mkdtemp(prefix="fvlm-bench-cache-"))
    import render_result
    import slicer_app
    from FVLMSlicerLib import mrml_io, warm
    from FVLMSlicerLib.headless import new_scene

    from fvlm_core.anatomy import CTRATE_CATALOG

    if model is None:
        import torch

        from fvlm_core.model import FVLM

        torch.manual_seed(0)
        model = tempfile.mkdtemp(prefix="fvlm-bench-model-")
        FVLM.from_config("fvlm-tiny").save_pretrained(model)
    scene = new_scene()
    slicer_app.install(scene, tempfile.mkdtemp(prefix="fvlm-bench-settings-"))
    widget = render_result.load_module().FVLMSlicerWidget()
    widget.setup()
    hu, labels, geometry = chest_like(tuple(shape))
    volume = mrml_io.add_volume_node(scene, hu, geometry, "CT")
    seg = mrml_io.labelmap_to_segmentation_node(labels, geometry, CTRATE_CATALOG, scene, "anatomies")
    render_result.choose_inputs(widget, volume, seg, model)
    loops = {"gil": slicer_app.EventLoop(holds_gil=True), "free": slicer_app.EventLoop(holds_gil=False)}

    def analysis(loop) -> float:
        t0 = time.monotonic()
        widget.ui.analyzeButton.click()
        loop.run_until(lambda: widget._job is None, timeout_s)
        if widget._results is None:
            raise RuntimeError(widget.ui.statusLabel.text)
        return time.monotonic() - t0

    try:
        report = {
            "shape_zyx": list(shape),
            "first_s": round(analysis(loops["free"]), 3),
            "gil_s": [],
            "free_s": [],
        }
        for _ in range(runs):
            for name in ("gil", "free"):
                report[f"{name}_s"].append(round(analysis(loops[name]), 3))
        longest = widget._doneJob.status.longest_step_s
        report["thread_iterations_in_0.5_s"] = {name: thread_progress(loop) for name, loop in loops.items()}
    finally:
        widget.cleanup()
        warm.stop_shared_worker()
    report["gil_median_s"] = statistics.median(report["gil_s"])
    report["free_median_s"] = statistics.median(report["free_s"])
    report["gil_over_free"] = round(report["gil_median_s"] / report["free_median_s"], 3)
    report["longest_gui_step_s"] = round(longest, 4)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(120, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--runs", type=int, default=3, help="analyses under each loop (after a cold one)")
    parser.add_argument("--model", help="a model folder (default: fvlm-tiny with random weights)")
    args = parser.parse_args()
    print(json.dumps(measure(tuple(args.shape), args.runs, args.model), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
