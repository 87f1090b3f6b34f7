"""Running an analysis off the GUI thread: progress per stage, cancel, same code everywhere.

:func:`run_analysis` is the whole computation (segment if needed, load the model, score the
findings) on plain arrays; it never touches MRML, so it can run in a worker thread
(:class:`ThreadJob`) or in a separate Python process (:class:`ProcessJob`, what the Slicer
panel uses: it keeps PyTorch's memory and any crash out of Slicer, and is killable). The
caller converts MRML nodes to arrays before starting and turns the
:class:`~FVLMSlicerLib.summary.AnalysisSummary` back into nodes on the main thread after; a
QTimer in the widget calls ``poll()``. No Qt here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import CancelledError, DependencyError, FVLMError
from fvlm_core.io import CTVolume, Geometry

from .summary import AnalysisSummary

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]

#: Stages reported, in order, with their share of the progress bar.
STAGES: dict[str, tuple[float, float]] = {
    "prepare": (0.0, 0.05),
    "segment": (0.05, 0.45),
    "load model": (0.45, 0.55),
    "analyze": (0.55, 0.97),
    "finish": (0.97, 1.0),
}
ANATOMY_SOURCES = ("segmentation", "builtin", "totalsegmentator")


@dataclass
class AnalysisRequest:
    """Everything an analysis needs, as plain data.

    Attributes:
        ct: the CT in HU with its geometry.
        labelmap: anatomy label map on the CT grid (anatomy ``i`` of the model = ``i + 1``),
            required when ``anatomy_source == "segmentation"``.
        anatomy_source: ``"segmentation"`` (use ``labelmap``), ``"builtin"`` or
            ``"totalsegmentator"`` (segment in the worker with ``fvlm_core.segmentation``).
        model_dir: folder of a saved model (``config.yaml`` + weights).
        findings: ``Finding`` dicts to score; ``None`` = the model's default findings.
        device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        similarity_maps: also compute per-finding similarity maps.
    """

    ct: CTVolume
    model_dir: str
    labelmap: np.ndarray | None = None
    anatomy_source: str = "segmentation"
    findings: list[dict[str, Any]] | None = None
    device: str = "auto"
    similarity_maps: bool = True
    segmentation_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnalysisOutput:
    summary: AnalysisSummary
    labelmap: np.ndarray  # the anatomy label map that was analysed, on the CT grid
    anatomies: list[str]
    segmentation_backend: str = ""


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; checks an explicit GPU."""
    device = (device or "auto").lower()
    aliases = {"gpu": "cuda", "auto": "auto", "cpu": "cpu", "cuda": "cuda"}
    if device not in aliases and not device.startswith("cuda:"):
        raise FVLMError(f"device {device!r}: use auto, GPU (cuda) or CPU")
    device = aliases.get(device, device)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DependencyError(
            "GPU requested but PyTorch sees no CUDA device (CPU-only PyTorch build, or no NVIDIA driver). "
            "Choose 'auto' or 'CPU', or install a CUDA build of PyTorch (PyTorch extension in Slicer)."
        )
    return device


class _StageProgress:
    """Maps a stage's own 0..1 to the overall bar and checks for cancel at every report."""

    def __init__(self, progress: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        self.progress = progress
        self.should_cancel = should_cancel

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("analysis cancelled")

    def stage(self, name: str, fraction: float = 0.0, detail: str = "") -> None:
        self.check()
        lo, hi = STAGES.get(name, (0.0, 1.0))
        if self.progress is not None:
            label = f"{name}: {detail}" if detail else name
            self.progress(label, lo + (hi - lo) * float(np.clip(fraction, 0.0, 1.0)))

    def sub(self, name: str) -> Callable[..., None]:
        """A progress callback for a library function, scaled into stage ``name``."""

        def report(*args: Any) -> None:
            detail, fraction = "", 0.0
            for a in args:
                if isinstance(a, str):
                    detail = a
                elif isinstance(a, (int, float)):
                    fraction = float(a)
            self.stage(name, fraction, detail)

        return report


_ANALYZERS: dict[tuple[str, str], Any] = {}
_ANALYZERS_LOCK = threading.Lock()


def load_analyzer(model_dir: str, device: str, cache: bool = True) -> Any:
    """``fvlm_core.zeroshot.Analyzer.from_pretrained`` (kept per (folder, device) in this process)."""
    try:
        from fvlm_core.zeroshot import Analyzer
    except ImportError:  # the package does not re-export it (CONTRACTS.md says it should)
        from fvlm_core.zeroshot.analyzer import Analyzer

    key = (str(Path(model_dir).resolve()), device)
    with _ANALYZERS_LOCK:
        if cache and key in _ANALYZERS:
            return _ANALYZERS[key]
    analyzer = Analyzer.from_pretrained(model_dir, device=device)
    if cache:
        with _ANALYZERS_LOCK:
            _ANALYZERS[key] = analyzer
    return analyzer


def clear_analyzer_cache() -> None:
    with _ANALYZERS_LOCK:
        _ANALYZERS.clear()


def run_analysis(
    request: AnalysisRequest,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    cache_model: bool = True,
) -> AnalysisOutput:
    """Segment (if asked), load the model and score the findings on one CT.

    Raises:
        CancelledError: ``should_cancel()`` returned True at a stage boundary or inside the analyzer.
        FVLMError subclasses: bad input, missing model, missing dependency (messages say what to do).
    """
    from fvlm_core.findings import Finding, FindingSet

    try:
        from fvlm_core.segmentation import AnatomySegmentation, get_backend
    except ImportError:  # package API not exported (older fvlm_core): use the module directly
        from fvlm_core.segmentation.base import AnatomySegmentation, get_backend

    from .settings import read_model_info

    steps = _StageProgress(progress, should_cancel)
    steps.stage("prepare", 0.0, "reading model configuration")
    info = read_model_info(request.model_dir)
    catalog = info.catalog()
    device = resolve_device(request.device)
    ct = request.ct

    if request.anatomy_source == "segmentation":
        if request.labelmap is None:
            raise FVLMError("anatomy source 'segmentation' needs a segmentation (none was given)")
        labelmap = np.asarray(request.labelmap, dtype=np.uint8)
        if labelmap.shape != ct.array.shape:
            raise FVLMError(f"label map shape {labelmap.shape} differs from the CT's {ct.array.shape}")
        segmentation = AnatomySegmentation.from_labelmap(
            labelmap, ct.geometry, catalog, "slicer-segmentation"
        )
    elif request.anatomy_source in ("builtin", "totalsegmentator"):
        steps.stage("segment", 0.0, request.anatomy_source)
        backend = get_backend(request.anatomy_source, **request.segmentation_options)
        segmentation = backend.segment(ct, catalog, progress=steps.sub("segment"))
    else:
        raise FVLMError(f"anatomy source {request.anatomy_source!r}: use one of {', '.join(ANATOMY_SOURCES)}")
    steps.stage("segment", 1.0)

    steps.stage("load model", 0.0, device)
    analyzer = load_analyzer(request.model_dir, device, cache=cache_model)
    steps.stage("load model", 1.0, device)

    findings = None
    if request.findings is not None:
        findings = FindingSet([Finding.from_dict(f) for f in request.findings])
        findings.check_anatomies(catalog.names)

    steps.stage("analyze", 0.0)
    result = analyzer.analyze(
        ct,
        segmentation,
        findings=findings,
        similarity_maps=request.similarity_maps,
        progress=steps.sub("analyze"),
        should_cancel=should_cancel,
    )
    steps.stage("finish", 0.0)
    summary = AnalysisSummary.from_result(result, device=device, model_dir=str(request.model_dir))
    steps.stage("finish", 1.0, "done")
    return AnalysisOutput(
        summary=summary,
        labelmap=np.asarray(segmentation.labelmap, dtype=np.uint8),
        anatomies=catalog.names,
        segmentation_backend=str(getattr(segmentation, "backend", request.anatomy_source)),
    )


# ------------------------------------------------------------------------------------------
# jobs: what the GUI polls
# ------------------------------------------------------------------------------------------


@dataclass
class JobStatus:
    """A snapshot for the GUI. ``state``: running | done | failed | cancelled."""

    state: str = "running"
    stage: str = "prepare"
    fraction: float = 0.0
    error: str = ""
    output: AnalysisOutput | None = None
    elapsed_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state != "running"


class ThreadJob:
    """Runs :func:`run_analysis` in a daemon thread; ``poll()`` from the GUI, ``cancel()`` any time."""

    def __init__(self, request: AnalysisRequest) -> None:
        self.request = request
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            self._status.stage, self._status.fraction = stage, fraction

    def _run(self) -> None:
        try:
            output = run_analysis(self.request, self._progress, self._cancel.is_set)
            state, error = "done", ""
        except CancelledError:
            output, state, error = None, "cancelled", "cancelled"
        except FVLMError as exc:
            output, state, error = None, "failed", str(exc)
        except Exception as exc:  # a bug or a library error: show it, keep Slicer alive
            output, state, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._status.state, self._status.error, self._status.output = state, error, output
            if state == "done":
                self._status.fraction = 1.0

    def start(self) -> ThreadJob:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="fvlm-analysis", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> JobStatus:
        with self._lock:
            s = self._status
            return JobStatus(s.state, s.stage, s.fraction, s.error, s.output, time.monotonic() - self._t0)

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()


def _lib_paths() -> list[str]:
    """Folders that must be on the worker's sys.path: this package's parent and fvlm_core's."""
    import fvlm_core

    here = Path(__file__).resolve().parent.parent
    core = Path(fvlm_core.__file__).resolve().parent.parent
    return list(dict.fromkeys([str(here), str(core)]))


class ProcessJob:
    """Runs the analysis in a separate Python (``python -m FVLMSlicerLib.worker JOB_DIR``).

    The job folder holds ``request.json``, ``ct.nrrd`` and ``labels.nrrd`` going in;
    ``progress.json`` (rewritten atomically), ``output/`` (summary + maps + ``labels.nrrd``)
    and ``error.json`` coming out. Cancel writes a ``cancel`` file the worker checks at every
    progress report, and kills the process if it has not stopped after ``kill_after_s``.
    """

    def __init__(
        self,
        request: AnalysisRequest,
        python: str | None = None,
        env: dict[str, str] | None = None,
        job_dir: str | None = None,
        kill_after_s: float = 10.0,
    ) -> None:
        self.request = request
        self.python = python or sys.executable
        self.env = dict(env if env is not None else os.environ)
        self._own_dir = job_dir is None
        self.job_dir = Path(job_dir or tempfile.mkdtemp(prefix="fvlm-job-"))
        self.kill_after_s = kill_after_s
        self._proc: subprocess.Popen | None = None
        self._t0 = 0.0
        self._cancel_t: float | None = None
        self._final: JobStatus | None = None
        self._log = None

    def start(self) -> ProcessJob:
        from fvlm_core.atomic import atomic_write_text
        from fvlm_core.io import write_image

        r = self.request
        self.job_dir.mkdir(parents=True, exist_ok=True)
        write_image(r.ct.array.astype(np.float32), r.ct.geometry, self.job_dir / "ct.nrrd")
        if r.labelmap is not None:
            write_image(np.asarray(r.labelmap, dtype=np.uint8), r.ct.geometry, self.job_dir / "labels.nrrd")
        doc = {
            "model_dir": str(r.model_dir),
            "anatomy_source": r.anatomy_source,
            "findings": r.findings,
            "device": r.device,
            "similarity_maps": r.similarity_maps,
            "segmentation_options": r.segmentation_options,
            "ct_source": r.ct.source,
            "geometry": r.ct.geometry.to_dict(),
        }
        atomic_write_text(self.job_dir / "request.json", json.dumps(doc))
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join([*_lib_paths(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._log = open(self.job_dir / "worker.log", "wb")  # noqa: SIM115 (closed in _finish)
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [self.python, "-m", "FVLMSlicerLib.worker", str(self.job_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.job_dir),
        )
        return self

    def _read_json(self, name: str) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.job_dir / name).read_text())
        return {}

    def _finish(self, rc: int) -> JobStatus:
        from fvlm_core.io import read_label_map

        if self._log is not None:
            self._log.close()
        elapsed = time.monotonic() - self._t0
        if rc == 0 and (self.job_dir / "output" / "summary.json").exists():
            summary = AnalysisSummary.load(self.job_dir / "output")
            labels = read_label_map(self.job_dir / "output" / "labels.nrrd").array.astype(np.uint8)
            meta = self._read_json("output/meta.json")
            output = AnalysisOutput(summary, labels, meta.get("anatomies", []), meta.get("backend", ""))
            return JobStatus("done", "finish", 1.0, "", output, elapsed)
        err = self._read_json("error.json")
        if err.get("cancelled") or self._cancel_t is not None:
            return JobStatus("cancelled", "cancelled", 0.0, "cancelled", None, elapsed)
        message = err.get("message") or self._log_tail() or f"worker exited with code {rc}"
        return JobStatus("failed", "failed", 0.0, message, None, elapsed)

    def _log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.job_dir / "worker.log").read_text(errors="replace")[-n:].strip()
        return ""

    def poll(self) -> JobStatus:
        if self._final is not None:
            return self._final
        if self._proc is None:
            return JobStatus()
        rc = self._proc.poll()
        if rc is not None:
            self._final = self._finish(rc)
            return self._final
        if self._cancel_t is not None and time.monotonic() - self._cancel_t > self.kill_after_s:
            self._proc.kill()
        p = self._read_json("progress.json")
        return JobStatus(
            "running",
            p.get("stage", "starting"),
            float(p.get("fraction", 0.0)),
            "",
            None,
            time.monotonic() - self._t0,
        )

    def cancel(self) -> None:
        if self._cancel_t is None:
            self._cancel_t = time.monotonic()
            (self.job_dir / "cancel").write_text("1")

    def cleanup(self) -> None:
        """Remove the job folder (only one this job created itself) once the job has finished."""
        if self._own_dir and self._final is not None:
            import shutil

            shutil.rmtree(self.job_dir, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        return self.poll()


def default_findings(model_dir: str) -> list[dict[str, Any]]:
    """The model's default findings (``Finding`` dicts) for pre-filling the findings table."""
    from .settings import read_model_info

    return read_model_info(model_dir).findings


def findings_from_rows(rows: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """``(finding name, anatomy)`` rows (the panel's table) as ``Finding`` dicts.

    Known CT-RATE findings keep the reference wordings; anything else is a free-text finding
    with ``"{X}."`` / ``"Not {X}."`` prompts.
    """
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY, Finding

    out = []
    for name, anatomy in rows:
        name, anatomy = name.strip(), anatomy.strip()
        if not name:
            continue
        source = "ctrate" if CTRATE_LABEL_ANATOMY.get(name) == anatomy else "user"
        out.append(Finding.from_name(name, anatomy, source=source).to_dict())
    return out


__all__ = [
    "ANATOMY_SOURCES",
    "STAGES",
    "AnalysisOutput",
    "AnalysisRequest",
    "Geometry",
    "JobStatus",
    "ProcessJob",
    "ThreadJob",
    "run_analysis",
]
