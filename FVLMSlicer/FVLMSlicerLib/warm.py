"""The panel's warm worker: one background Python that keeps torch imported and the last model loaded.

Started on first use (``python -m FVLMSlicerLib.worker --serve CONTROL_DIR --owner PID``, launched
as Slicer launches console processes: ``process.py``), restarted when it has died, stopped by
:func:`stop_shared_worker` (the module widget's ``cleanup``, Reload, and at interpreter exit).
It ends by itself when Slicer's process is gone. Each analysis is a :class:`WarmProcessJob`:
the same job folder as :class:`~FVLMSlicerLib.jobs.ProcessJob` (written, followed, read back and
deleted by the job's thread), handed to the worker through ``CONTROL_DIR/next.json``.

Cancel asks the job to stop (``JOB_DIR/cancel``, checked at every progress report): the worker
stays warm. When the job has not stopped within ``cancel_grace_s`` (a stage that reports
nothing, e.g. loading a model), the worker's whole process tree is killed and the next analysis
starts a new one. No Qt here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fvlm_core.errors import CancelledError, FVLMError

from .jobs import ProcessJob, _python_path_update, lib_paths, python_executable
from .process import BackgroundProcess, kill_process_tree
from .runner import AnalysisOutput, AnalysisRequest


class WarmWorker:
    """One serving worker process (see the module docstring).

    Attributes:
        process: the launched process (Slicer's ``PythonSlicer`` launcher, or Python itself),
            ``None`` before the first use.
        control: its control folder (``next.json``, ``stop``), removed when it stops.
    """

    def __init__(self, python: str | None = None, env_update: dict[str, str] | None = None) -> None:
        self.python = python or python_executable()
        self.env_update = dict(env_update or {})
        self.process: BackgroundProcess | None = None
        self.control: Path | None = None
        self._lock = threading.Lock()
        self._busy = False

    def running(self) -> bool:
        return self.process is not None and self.process.returncode() is None

    def ensure_started(self) -> str:
        """Start the worker unless it runs; a line for the processing log saying which."""
        if self.running():
            return f"analysis worker (process {self.process.pid}) is warm: torch imported, last model kept"
        note = ""
        if self.process is not None:
            note = (
                f"the analysis worker (process {self.process.pid}) had ended (exit code "
                f"{self.process.returncode()}): starting a new one"
            )
            self._discard()
        self.control = Path(tempfile.mkdtemp(prefix="fvlm-worker-"))
        args = [self.python, "-m", "FVLMSlicerLib.worker", "--serve", str(self.control)]
        args += ["--owner", str(os.getpid())]
        env = {**_python_path_update(lib_paths()), **self.env_update}
        self.process = BackgroundProcess(args, env, cwd=str(self.control)).start()
        return note or f"starting the analysis worker (process {self.process.pid})"

    @contextlib.contextmanager
    def claim(self) -> Iterator[WarmWorker]:
        """The worker for one job at a time."""
        with self._lock:
            if self._busy:
                raise FVLMError(
                    "the analysis worker is busy with another analysis: wait for it or cancel it."
                )
            self._busy = True
        try:
            yield self
        finally:
            with self._lock:
                self._busy = False

    def submit(self, job_dir: Path) -> None:
        from fvlm_core.atomic import atomic_write_text

        atomic_write_text(self.control / "next.json", json.dumps({"job": str(job_dir)}))

    def kill(self) -> None:
        """Kill the worker's whole process tree now (a new one starts on next use)."""
        if self.process is not None and self.process.returncode() is None:
            kill_process_tree(self.process.pid)
            self.process.wait(10)
        self._discard(keep_process=True)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Ask the worker to exit after its current job; kill its tree after ``timeout_s``."""
        if self.running():
            with contextlib.suppress(OSError):
                (self.control / "stop").write_text("1")
            if self.process.wait(timeout_s) is None:
                self.kill()
        self._discard()

    def _discard(self, keep_process: bool = False) -> None:
        if self.control is not None:
            shutil.rmtree(self.control, ignore_errors=True)
            self.control = None
        if not keep_process:
            self.process = None


_SHARED: WarmWorker | None = None
_SHARED_LOCK = threading.Lock()


def shared_worker(python: str | None = None, env_update: dict[str, str] | None = None) -> WarmWorker:
    """The module's warm worker (a new one when asked for another Python or environment)."""
    global _SHARED
    with _SHARED_LOCK:
        python = python or python_executable()
        if _SHARED is not None and (_SHARED.python, _SHARED.env_update) != (python, dict(env_update or {})):
            _SHARED.stop()
            _SHARED = None
        if _SHARED is None:
            _SHARED = WarmWorker(python, env_update)
        return _SHARED


def stop_shared_worker(timeout_s: float = 3.0) -> None:
    """Stop the module's warm worker, if any (its process tree is gone afterwards)."""
    global _SHARED
    with _SHARED_LOCK:
        worker, _SHARED = _SHARED, None
    if worker is not None:
        worker.stop(timeout_s)


atexit.register(stop_shared_worker)


class WarmProcessJob(ProcessJob):
    """An analysis run by the warm worker (job folder as :class:`ProcessJob`)."""

    name = "fvlm-analysis-warm"

    def __init__(
        self, request: AnalysisRequest, worker: WarmWorker, prepare: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(request, python=worker.python, prepare=prepare)
        self.worker = worker
        self.killed_worker = False

    def _compute(self) -> AnalysisOutput:
        self._progress("prepare: writing the input", 0.0)
        self._write_inputs()
        if self._cancel.is_set():
            raise CancelledError("cancelled")
        with self.worker.claim():
            self._log(self.worker.ensure_started())
            self.process = self.worker.process
            mark = self.process.line_count()
            self.worker.submit(self.job_dir)
            rc = self._follow_job(mark)
        output = self._read_output(rc)
        self._log(_reuse_line(output.timings))
        return self._log_warnings(output)

    def _follow_job(self, mark: int) -> int:
        """Mirror the job's progress and the worker's lines until ``finished.json``; its ``rc``."""
        head = self.poll().log
        cancel_t = None
        while True:
            finished = self._read_json("finished.json")
            with self._lock:
                self._status.log = head + self.process.log_since(mark)
            if finished:
                if self._cancel.is_set() and finished.get("rc") == 2:
                    raise CancelledError("cancelled")
                return int(finished.get("rc", 1))
            rc = self.process.returncode()
            if rc is not None:
                if self._cancel.is_set():
                    raise CancelledError("cancelled")
                raise FVLMError(
                    f"the analysis worker ended during the analysis (exit code {rc}); see the log. "
                    "A new worker starts with the next analysis."
                )
            self._mirror_progress()
            if self._cancel.is_set():
                cancel_t = cancel_t or time.monotonic()
                self._ask_to_stop()
                if time.monotonic() - cancel_t > self.cancel_grace_s:
                    self.worker.kill()
                    self.killed_worker = True
                    self._log(
                        f"the job did not stop within {self.cancel_grace_s:g} s: the analysis worker was "
                        "stopped (a new one starts with the next analysis)"
                    )
                    raise CancelledError("cancelled")
            time.sleep(self.poll_s)

    def _cleanup(self, state: str) -> None:
        # the worker stays warm; only the job folder (a copy of the CT) goes
        if self._own_dir:
            shutil.rmtree(self.job_dir, ignore_errors=True)


def _reuse_line(timings: dict[str, Any]) -> str:
    """What the worker reused, for the log: its pid, its job count, model loaded or reused."""
    pid, jobs = timings.get("worker_pid", "?"), timings.get("worker_jobs", "?")
    if timings.get("model_reused"):
        model = "the loaded model reused"
    else:
        model = f"model loaded in {float(timings.get('load_model_s', 0.0)):.1f} s"
    return f"analysis worker pid {pid}, job {jobs}: {model}"
