"""Subprocess entry point: ``python -m FVLMSlicerLib.worker JOB_DIR`` (see ``jobs.ProcessJob``).

Reads ``request.json``, ``ct.npy`` (the CT in its stored type) and ``labels.npy``; writes
``progress.json`` at every progress report and ``output/`` (summary, maps, ``labels.npy``) or
``error.json``. Progress lines go to stdout: the panel's processing log.

Cancel: the panel writes ``JOB_DIR/cancel``. It is checked at every progress report (between
the analyzer's windows, at each report of the segmenter); a watchdog thread also ends the
process when a stage reports nothing for a while after cancel (loading a model,
TotalSegmentator's inference). Exit codes: 0 done, 1 failed, 2 cancelled. Needs no Slicer.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

#: Seconds a stage may run on after cancel before the watchdog ends the process.
CANCEL_WATCHDOG_S = 1.0


def _watch_for_cancel(job: Path) -> None:
    while not (job / "cancel").exists():
        time.sleep(0.2)
    time.sleep(CANCEL_WATCHDOG_S)
    print("cancelled (stopped by the watchdog)", flush=True)
    os._exit(2)  # the main thread is inside a stage that does not check; nothing to save


def _request(job: Path):
    from fvlm_core.io import CTVolume, Geometry

    from .runner import AnalysisRequest

    doc = json.loads((job / "request.json").read_text())
    geometry = Geometry.from_dict(doc["geometry"])
    ct = CTVolume(np.load(job / "ct.npy").astype(np.float32), geometry, doc.get("ct_source", "ct"))
    labels = np.load(job / "labels.npy") if (job / "labels.npy").exists() else None
    return AnalysisRequest(
        model_dir=doc["model_dir"],
        ct=ct,
        labelmap=labels,
        anatomy_source=doc.get("anatomy_source", "segmentation"),
        findings=doc.get("findings"),
        device=doc.get("device", "auto"),
        similarity_maps=bool(doc.get("similarity_maps", True)),
        segmentation_options=doc.get("segmentation_options") or {},
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m FVLMSlicerLib.worker JOB_DIR", file=sys.stderr)
        return 1
    job = Path(argv[0])
    threading.Thread(target=_watch_for_cancel, args=(job,), daemon=True).start()

    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.errors import CancelledError, FVLMError

    from .runner import run_analysis

    t0 = time.monotonic()
    last = [""]

    def progress(stage: str, fraction: float) -> None:
        atomic_write_text(job / "progress.json", json.dumps({"stage": stage, "fraction": fraction}))
        if stage != last[0]:
            print(f"{time.monotonic() - t0:6.1f} s  {stage}", flush=True)
            last[0] = stage

    def should_cancel() -> bool:
        return (job / "cancel").exists()

    try:
        output = run_analysis(_request(job), progress, should_cancel, cache_model=False)
        out = job / "output"
        output.summary.save(out)
        np.save(out / "labels.npy", output.labelmap)
        meta = {"anatomies": output.anatomies, "backend": output.segmentation_backend}
        atomic_write_text(out / "meta.json", json.dumps(meta))
        return 0
    except CancelledError:
        atomic_write_text(job / "error.json", json.dumps({"cancelled": True, "message": "cancelled"}))
        return 2
    except FVLMError as exc:
        print(f"error: {exc}", flush=True)
        atomic_write_text(job / "error.json", json.dumps({"message": str(exc)}))
        return 1
    except Exception as exc:
        traceback.print_exc()
        atomic_write_text(job / "error.json", json.dumps({"message": f"{type(exc).__name__}: {exc}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
