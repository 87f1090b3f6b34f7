"""Subprocess entry point: one job, or a warm worker that runs jobs one after the other.

``python -m FVLMSlicerLib.worker JOB_DIR`` runs one job (``jobs.ProcessJob``) and exits.
``python -m FVLMSlicerLib.worker --serve CONTROL_DIR --owner PID`` is the panel's warm worker
(``warm.WarmWorker``): it imports torch once, then runs every job named in
``CONTROL_DIR/next.json`` with the last model kept loaded, until ``CONTROL_DIR/stop`` appears or
process ``PID`` (Slicer) is gone.

A job reads ``request.json``, ``ct.npy`` (the CT in its stored type) and ``labels.npy``; writes
``progress.json`` at every progress report and ``output/`` (summary, maps, ``labels.npy``,
``meta.json`` with stage timings and, from a warm worker, its pid and job count) or
``error.json``; a warm worker then writes ``finished.json`` (``{"rc": ...}``). Progress lines go
to stdout: the panel's processing log.

Cancel: the panel writes ``JOB_DIR/cancel``. It is checked at every progress report (between
the analyzer's windows, at each report of the segmenter). A one-job process also has a watchdog
thread that ends it when a stage reports nothing for a while after cancel (loading a model,
TotalSegmentator's inference); a warm worker has none, its panel kills it when a cancelled job
does not stop in time (and starts a new one on next use). Exit codes of a job: 0 done, 1
failed, 2 cancelled. Needs no Slicer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

#: Seconds a stage may run on after cancel before the watchdog ends a one-job process.
CANCEL_WATCHDOG_S = 1.0
#: How often a warm worker looks for a job, a stop request and its owner.
SERVE_POLL_S = 0.05


def _watch_for_cancel(job: Path) -> None:
    while not (job / "cancel").exists():
        time.sleep(0.2)
    time.sleep(CANCEL_WATCHDOG_S)
    print("cancelled (stopped by the watchdog)", flush=True)
    os._exit(2)  # the main thread is inside a stage that does not check; nothing to save


def _request(job: Path):
    from fvlm_core.io import Geometry, ct_from_array

    from .runner import AnalysisRequest

    doc = json.loads((job / "request.json").read_text())
    geometry = Geometry.from_dict(doc["geometry"])
    # the library's checks (finite values, HU unless allowed), before any work
    ct = ct_from_array(
        np.load(job / "ct.npy"),
        geometry,
        source=doc.get("ct_source", "ct"),
        allow_non_hu=bool(doc.get("allow_non_hu", False)),
    )
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


def run_job(job: Path, cache_model: bool = False, worker: dict | None = None) -> int:
    """Run the job in folder ``job``; 0 done, 1 failed, 2 cancelled (outputs as the module says)."""
    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.errors import CancelledError, FVLMError, recorded_warnings

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
        with recorded_warnings() as warnings:
            output = run_analysis(_request(job), progress, should_cancel, cache_model=cache_model)
        out = job / "output"
        output.summary.save(out)
        np.save(out / "labels.npy", output.labelmap)
        meta = {
            "anatomies": output.anatomies,
            "backend": output.segmentation_backend,
            "timings": {**output.timings, **(worker or {})},
            "warnings": warnings,
        }
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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (psutil when present, else a signal 0 probe)."""
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # gone between the two calls
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class _Server:
    """The warm worker's loop (see the module docstring)."""

    def __init__(self, control: Path, owner: int) -> None:
        self.control, self.owner = control, owner
        self.current: Path | None = None  # the job folder being worked on
        self.jobs = 0

    def _watch_owner(self) -> None:
        while _alive(self.owner):
            time.sleep(0.5)
        # Slicer is gone: nobody will read the results or delete the copy of the CT
        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
        shutil.rmtree(self.control, ignore_errors=True)
        os._exit(0)

    def _next_job(self) -> Path | None:
        request = self.control / "next.json"
        if not request.exists():
            return None
        with contextlib.suppress(OSError, ValueError):
            job = Path(json.loads(request.read_text())["job"])
            request.unlink()
            return job
        return None

    def serve(self) -> int:
        from fvlm_core.atomic import atomic_write_text

        threading.Thread(target=self._watch_owner, name="fvlm-owner-watch", daemon=True).start()
        t = time.perf_counter()
        import torch  # noqa: F401  (the slow imports, once)

        import fvlm_core.zeroshot  # noqa: F401

        print(
            f"worker ready (pid {os.getpid()}): torch imported in {time.perf_counter() - t:.1f} s", flush=True
        )
        while not (self.control / "stop").exists():
            job = self._next_job()
            if job is None:
                time.sleep(SERVE_POLL_S)
                continue
            self.current, self.jobs = job, self.jobs + 1
            print(f"job {self.jobs}: {job.name}", flush=True)
            rc = run_job(job, cache_model=True, worker={"worker_pid": os.getpid(), "worker_jobs": self.jobs})
            atomic_write_text(job / "finished.json", json.dumps({"rc": rc}))
            self.current = None
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 4 and argv[0] == "--serve" and argv[2] == "--owner":
        return _Server(Path(argv[1]), int(argv[3])).serve()
    if len(argv) != 1:
        print(
            "usage: python -m FVLMSlicerLib.worker JOB_DIR | --serve CONTROL_DIR --owner PID",
            file=sys.stderr,
        )
        return 1
    job = Path(argv[0])
    threading.Thread(target=_watch_for_cancel, args=(job,), daemon=True).start()
    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
