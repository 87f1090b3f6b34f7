"""The analysis worker: a separate Python (Slicer's ``PythonSlicer``) that keeps torch imported and
the last model loaded, and runs :func:`fvlm_core.zeroshot.pipeline.run` for the panel.

``python -m FVLMSlicerLib.worker CONTROL_DIR --owner PID [--idle-timeout SECONDS]``

A job is a folder holding ``request.json`` (an :class:`~fvlm_core.zeroshot.pipeline.AnalysisRequest`)
and the input files it names (``ct.nrrd``, segmentation layers), or ``task.json`` (a task of
``tasks.py``: similar cases, DICOM export). The panel hands it over by writing
``CONTROL_DIR/next.json`` (``{"job": folder}``). The worker writes ``JOB/taken`` when it takes
it, ``JOB/progress.json`` (stage, fraction) at every progress report and a line per stage on
stdout (the panel's processing log), then ``JOB/output/`` (``AnalysisResult.save``; a task:
``JOB/output.json``) or ``JOB/error.json``, and last ``JOB/finished.json``: ``{"rc": 0 done |
1 failed | 2 cancelled, "model_reused", "worker_pid", "worker_jobs"}``.

Cancel: ``JOB/cancel``, checked at every progress report; a stage that reports nothing for long
(loading a model) gets the worker's process tree killed by the panel. The worker ends on
``CONTROL_DIR/stop``, when its owner (Slicer) is gone, and after ``--idle-timeout`` seconds
without a job (to give back the memory of torch and the model, GPU memory included; the panel
starts a new worker with the next analysis). Needs no Slicer.
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

#: How often an idle worker looks for a job, a stop request, its owner and its idle time.
SERVE_POLL_S = 0.05


def alive(pid: int) -> bool:
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


def _write_json(job: Path, name: str, doc: dict) -> None:
    """``JOB/name``, atomically; never makes the folder again once the panel deleted it (the write
    fails with FileNotFoundError instead)."""
    from fvlm_core.atomic import atomic_write_text

    atomic_write_text(job / name, json.dumps(doc), parents=False)


def run_job(job: Path, analyzers) -> int:
    """Run the job in folder ``job`` (see the module docstring); its exit code."""
    from fvlm_core.errors import CancelledError, FVLMError
    from fvlm_core.zeroshot.pipeline import AnalysisRequest, run

    from .tasks import OUTPUT_FILE, TASK_FILE, run_task

    t0, last = time.monotonic(), [""]

    def progress(stage: str, fraction: float) -> None:
        _write_json(job, "progress.json", {"stage": stage, "fraction": fraction})
        if stage.split(":")[0] != last[0]:
            print(f"{time.monotonic() - t0:6.1f} s  {stage}", flush=True)
            last[0] = stage.split(":")[0]

    def cancelled() -> bool:  # asked, or the panel has gone and deleted the folder
        return (job / "cancel").exists() or not job.is_dir()

    error = None
    try:
        if (job / TASK_FILE).exists():
            output = run_task(json.loads((job / TASK_FILE).read_text()), job, progress, cancelled)
            _write_json(job, OUTPUT_FILE, output)
            return 0
        request = AnalysisRequest.load(job / "request.json")
        result = run(request, progress, cancelled, analyzers)
        for message in result.warnings:
            print(f"warning: {message}", flush=True)
        result.save(job / "output")
        return 0
    except CancelledError:
        print("cancelled", flush=True)
        return 2
    except FVLMError as exc:
        print(f"error: {exc}", flush=True)
        error = {"message": str(exc), "type": type(exc).__name__}
    except Exception as exc:  # a bug or a library error: report it, keep serving
        if cancelled():  # e.g. a progress report into the folder the panel deleted
            return 2
        traceback.print_exc()
        error = {"message": f"{type(exc).__name__}: {exc}"}
    with contextlib.suppress(OSError):
        _write_json(job, "error.json", error)
    return 1


class Server:
    """The serving loop (see the module docstring)."""

    def __init__(self, control: Path, owner: int, idle_timeout_s: float | None = None) -> None:
        self.control, self.owner, self.idle_timeout_s = control, owner, idle_timeout_s
        self.current: Path | None = None
        self.jobs = 0

    def _owner_gone(self) -> None:
        # Slicer is gone: nobody will read the results or delete the copy of the CT
        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
        shutil.rmtree(self.control, ignore_errors=True)
        os._exit(0)

    def _watch_owner(self) -> None:  # a thread of the worker, not of Slicer
        while alive(self.owner):
            time.sleep(0.5)
        self._owner_gone()

    def _next_job(self) -> Path | None:
        request = self.control / "next.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            job = Path(json.loads(request.read_text())["job"])
            request.unlink()
            (job / "taken").write_text(str(os.getpid()))
            return job
        return None

    def finish(self, job: Path, rc: int, analyzers) -> None:
        """``JOB/finished.json``; nothing where the panel has given the job up (deleted its
        folder, inputs and all): then what a task wrote meanwhile (which may have made the folder
        again) goes too."""
        from .tasks import TASK_FILE

        if not any((job / name).exists() for name in ("request.json", TASK_FILE)):
            shutil.rmtree(job, ignore_errors=True)
            return
        done = {
            "rc": rc,
            "model_reused": analyzers.reused,
            "worker_pid": os.getpid(),
            "worker_jobs": self.jobs,
        }
        with contextlib.suppress(FileNotFoundError):  # given up since
            _write_json(job, "finished.json", done)

    def serve(self) -> int:
        threading.Thread(target=self._watch_owner, name="fvlm-owner-watch", daemon=True).start()
        t = time.perf_counter()
        import torch  # noqa: F401  (the slow imports, once)

        from fvlm_core.zeroshot.pipeline import AnalyzerCache

        analyzers = AnalyzerCache()
        print(
            f"worker ready (pid {os.getpid()}): torch imported in {time.perf_counter() - t:.1f} s", flush=True
        )
        idle_since = time.monotonic()
        while not (self.control / "stop").exists():
            job = self._next_job()
            if job is None:
                idle = time.monotonic() - idle_since
                if self.idle_timeout_s is not None and idle > self.idle_timeout_s:
                    print(f"idle for {idle:.0f} s: the worker stops to give its memory back", flush=True)
                    break
                time.sleep(SERVE_POLL_S)
                continue
            self.current, self.jobs = job, self.jobs + 1
            print(f"job {self.jobs}: {job.name}", flush=True)
            self.finish(job, run_job(job, analyzers), analyzers)
            self.current, idle_since = None, time.monotonic()
        shutil.rmtree(self.control, ignore_errors=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    """``CONTROL_DIR --owner PID [--idle-timeout SECONDS]`` (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 5) or args[1] != "--owner" or (len(args) == 5 and args[3] != "--idle-timeout"):
        print(
            f"usage: python -m FVLMSlicerLib.worker {__doc__.split('``')[3].split(' ', 3)[-1]}",
            file=sys.stderr,
        )
        return 2
    return Server(Path(args[0]), int(args[2]), float(args[4]) if len(args) == 5 else None).serve()


if __name__ == "__main__":
    sys.exit(main())
