"""Background jobs the panel polls: an analysis in a thread or a process, and a model import.

Every job runs its whole life in one daemon thread, so the GUI thread only calls ``start()``,
``poll()`` (a copy of the status under a lock) and ``cancel()``. That thread

* for :class:`ProcessJob`: writes the input (the CT in its stored type, ``.npy``: no
  compression on any thread), launches ``python -m FVLMSlicerLib.worker JOB_DIR`` the way Slicer
  launches console processes (``process.py``), follows ``progress.json`` and the output, reads
  the results back, and deletes the job folder (it holds a copy of the CT) whatever the ending:
  done, failed or cancelled. Cancel asks the worker to stop, then kills its process tree;
* for :class:`ThreadJob`: runs :func:`~FVLMSlicerLib.runner.run_analysis` itself;
* runs the optional ``prepare(output)`` hook (turning results into VTK objects) before the job
  reports ``done``, so the GUI thread receives results it only has to attach to the scene.

:class:`ImportJob` runs ``fvlm import-checkpoint`` the same way. No Qt here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import CancelledError, FVLMError

from .process import BackgroundProcess
from .runner import AnalysisOutput, AnalysisRequest, run_analysis
from .summary import AnalysisSummary


@dataclass
class JobStatus:
    """A snapshot for the GUI. ``state``: running | done | failed | cancelled.

    Attributes:
        log: the processing log so far (worker output, or the stages a thread passed).
        prepared: what the job's ``prepare`` hook made of the output (off the GUI thread).
    """

    state: str = "running"
    stage: str = "starting"
    fraction: float = 0.0
    error: str = ""
    output: AnalysisOutput | None = None
    elapsed_s: float = 0.0
    log: list[str] = field(default_factory=list)
    prepared: Any = None

    @property
    def finished(self) -> bool:
        return self.state != "running"


class _Job:
    """The thread, the lock-protected status and the cancel flag every job shares."""

    name = "fvlm-job"

    def __init__(self, prepare: Callable[[Any], Any] | None = None) -> None:
        self.prepare = prepare
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self._status, key, value)

    def _log(self, line: str) -> None:
        with self._lock:
            self._status.log = [*self._status.log, line]

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            changed = stage.split(":")[0] != self._status.stage.split(":")[0]
            self._status.stage, self._status.fraction = stage, fraction
        if changed:
            self._log(f"{time.monotonic() - self._t0:6.1f} s  {stage}")

    def _compute(self) -> Any:
        raise NotImplementedError

    def _cleanup(self, state: str) -> None:
        """Runs after every ending (``state``: done, failed, cancelled), in the job's thread."""

    def _outcome(self) -> dict[str, Any]:
        """Run the job; the final status fields (never raises)."""
        try:
            output = self._compute()
            if self._cancel.is_set():
                raise CancelledError("cancelled")
            prepared = self.prepare(output) if self.prepare is not None else None
            return {"state": "done", "fraction": 1.0, "output": output, "prepared": prepared, "stage": "done"}
        except CancelledError:
            return {"state": "cancelled", "stage": "cancelled", "error": "cancelled"}
        except FVLMError as exc:
            return {"state": "failed", "stage": "failed", "error": str(exc)}
        except Exception as exc:  # a bug or a library error: report it, keep Slicer alive
            import traceback

            self._log(traceback.format_exc())
            return {"state": "failed", "stage": "failed", "error": f"{type(exc).__name__}: {exc}"}

    def _run(self) -> None:
        outcome = self._outcome()
        try:
            self._cleanup(outcome["state"])  # before the GUI can see the job as finished
        finally:
            self._update(**outcome)

    def start(self):
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def poll(self) -> JobStatus:
        with self._lock:
            return replace(self._status, elapsed_s=time.monotonic() - self._t0, log=list(self._status.log))

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()


class ThreadJob(_Job):
    """Runs :func:`run_analysis` in a daemon thread of this process."""

    name = "fvlm-analysis"

    def __init__(self, request: AnalysisRequest, prepare: Callable[[Any], Any] | None = None) -> None:
        super().__init__(prepare)
        self.request = request

    def _compute(self) -> AnalysisOutput:
        return run_analysis(self.request, self._progress, self._cancel.is_set)


def lib_paths() -> list[str]:
    """Folders that must be on the worker's sys.path: this package's parent and fvlm_core's."""
    import fvlm_core

    here = Path(__file__).resolve().parent.parent
    core = Path(fvlm_core.__file__).resolve().parent.parent
    return list(dict.fromkeys([str(here), str(core)]))


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` (found as ``slicer.util`` finds it: on PATH inside Slicer), else this Python."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            exe = shutil.which("PythonSlicer")
            if exe:
                return exe
    except ImportError:
        pass
    return sys.executable


def _python_path_update(paths: list[str]) -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.pathsep.join(paths)}


class _ProcessRunner(_Job):
    """Follows one :class:`BackgroundProcess` until it ends; cancel kills its process tree."""

    poll_s = 0.1
    cancel_grace_s = 2.0

    def _follow(self, process: BackgroundProcess, on_poll: Callable[[], None] | None = None) -> int:
        """Wait for ``process`` while mirroring its log; returns its exit code.

        Raises:
            CancelledError: cancel was asked (the process tree is killed if it does not stop
                within :attr:`cancel_grace_s`).
        """
        cancel_t = None
        while True:
            rc = process.returncode()
            with self._lock:
                self._status.log = process.log()
            if rc is not None:
                process.wait(5)  # let the reader thread drain the pipe
                with self._lock:
                    self._status.log = process.log()
                if self._cancel.is_set():
                    raise CancelledError("cancelled")
                return rc
            if on_poll is not None:
                on_poll()
            if self._cancel.is_set():
                cancel_t = cancel_t or time.monotonic()
                self._ask_to_stop()
                if time.monotonic() - cancel_t > self.cancel_grace_s:
                    process.stop()
                    raise CancelledError("cancelled")
            time.sleep(self.poll_s)

    def _ask_to_stop(self) -> None:
        """A polite request the process may honour before it is killed."""


class ProcessJob(_ProcessRunner):
    """Runs the analysis in a separate Python (``python -m FVLMSlicerLib.worker JOB_DIR``).

    The job folder holds ``request.json``, ``ct.npy`` and ``labels.npy`` going in;
    ``progress.json`` (rewritten atomically), ``output/`` (summary + maps + ``labels.npy``) and
    ``error.json`` coming out. It is removed when the job ends, unless the caller gave it.
    """

    name = "fvlm-analysis-process"

    def __init__(
        self,
        request: AnalysisRequest,
        python: str | None = None,
        env_update: dict[str, str] | None = None,
        job_dir: str | None = None,
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(prepare)
        self.request = request
        self.python = python or python_executable()
        self.env_update = dict(env_update or {})
        self._own_dir = job_dir is None
        self.job_dir = Path(job_dir or tempfile.mkdtemp(prefix="fvlm-job-"))
        self.process: BackgroundProcess | None = None

    def _write_inputs(self) -> None:
        """The CT in its stored type (checked first), the label map, the request (job thread)."""
        from fvlm_core.atomic import atomic_write_text

        r = self.request
        self.job_dir.mkdir(parents=True, exist_ok=True)
        if r.snapshot is not None:
            r.snapshot.check()
            volume, geometry, source = r.snapshot.volume, r.snapshot.geometry, r.snapshot.name
            labelmap = r.snapshot.labelmap() if r.labelmap is None else r.labelmap
        else:
            volume, geometry, source, labelmap = r.ct.array, r.ct.geometry, r.ct.source, r.labelmap
        np.save(self.job_dir / "ct.npy", np.ascontiguousarray(volume))
        if labelmap is not None:
            np.save(self.job_dir / "labels.npy", np.asarray(labelmap, dtype=np.uint8))
        doc = {
            "model_dir": str(r.model_dir),
            "anatomy_source": r.anatomy_source,
            "findings": r.findings,
            "device": r.device,
            "similarity_maps": r.similarity_maps,
            "segmentation_options": r.segmentation_options,
            "allow_non_hu": r.allow_non_hu,
            "ct_source": source,
            "geometry": geometry.to_dict(),
        }
        atomic_write_text(self.job_dir / "request.json", json.dumps(doc))

    def _read_json(self, name: str) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.job_dir / name).read_text())
        return {}

    def _mirror_progress(self) -> None:
        p = self._read_json("progress.json")
        if p:
            self._progress(str(p.get("stage", "starting")), float(p.get("fraction", 0.0)))

    def _ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            (self.job_dir / "cancel").write_text("1")

    def _compute(self) -> AnalysisOutput:
        self._progress("prepare: writing the input", 0.0)
        self._write_inputs()
        if self._cancel.is_set():
            raise CancelledError("cancelled")
        args = [self.python, "-m", "FVLMSlicerLib.worker", str(self.job_dir)]
        env = {**_python_path_update(lib_paths()), **self.env_update}
        self.process = BackgroundProcess(args, env, cwd=str(self.job_dir)).start()
        rc = self._follow(self.process, self._mirror_progress)
        return self._log_warnings(self._read_output(rc))

    def _log_warnings(self, output: AnalysisOutput) -> AnalysisOutput:
        for message in output.warnings:
            self._log(f"warning: {message}")
        return output

    def _read_output(self, rc: int) -> AnalysisOutput:
        out = self.job_dir / "output"
        if rc == 0 and (out / "summary.json").exists():
            self._progress("finish: reading the results", 0.98)
            summary = AnalysisSummary.load(out)
            labels = np.load(out / "labels.npy")
            meta = self._read_json("output/meta.json")
            return AnalysisOutput(
                summary,
                labels,
                meta.get("anatomies", []),
                meta.get("backend", ""),
                timings=meta.get("timings", {}),
                warnings=meta.get("warnings", []),
            )
        err = self._read_json("error.json")
        if err.get("cancelled"):
            raise CancelledError("cancelled")
        tail = "\n".join(self.poll().log[-20:])
        raise FVLMError(err.get("message") or tail or f"the analysis process exited with code {rc}")

    def _cleanup(self, state: str) -> None:
        if self.process is not None:
            self.process.stop()  # never leave a worker behind (a no-op once it has exited)
        if self._own_dir:
            shutil.rmtree(self.job_dir, ignore_errors=True)


class ImportJob(_ProcessRunner):
    """``fvlm import-checkpoint CHECKPOINT --text-encoder DIR --out DIR`` in a background process.

    On cancel or failure, an output folder this job created is removed again.
    """

    name = "fvlm-import"

    def __init__(self, checkpoint: str, text_encoder: str, out_dir: str, python: str | None = None) -> None:
        super().__init__()
        self.checkpoint, self.text_encoder, self.out_dir = str(checkpoint), str(text_encoder), str(out_dir)
        self.python = python or python_executable()
        self._created_out = not Path(out_dir).exists()
        self.process: BackgroundProcess | None = None

    def _compute(self) -> str:
        self._progress("importing the official weights", 0.1)
        args = [self.python, "-m", "fvlm_core.cli", "import-checkpoint", self.checkpoint]
        args += ["--text-encoder", self.text_encoder, "--out", self.out_dir]
        self.process = BackgroundProcess(args, _python_path_update(lib_paths())).start()
        rc = self._follow(self.process)
        if rc != 0 or not (Path(self.out_dir) / "config.yaml").is_file():
            lines = [line for line in self.process.log() if line.strip()]
            raise FVLMError(lines[-1] if lines else f"the import exited with code {rc}")
        return self.out_dir

    def _cleanup(self, state: str) -> None:
        if self.process is not None:
            self.process.stop()
        if state != "done" and self._created_out:
            shutil.rmtree(self.out_dir, ignore_errors=True)
