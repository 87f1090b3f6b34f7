"""One analysis as plain data in, plain data out: progress per stage, cancel checks.

:func:`run_analysis` is the whole computation (segment if needed, load the model, score the
findings) on arrays; it never touches MRML, so it runs in a worker thread or in a separate
Python process (``jobs.py``). An :class:`AnalysisRequest` may carry an
:class:`~FVLMSlicerLib.snapshot.InputSnapshot` (views taken on the GUI thread) instead of
arrays; :meth:`AnalysisRequest.materialize` converts it in the background. No Qt here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import CancelledError, FVLMError
from fvlm_core.io import CTVolume

from .snapshot import InputSnapshot
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
        model_dir: folder of a saved model (``config.yaml`` + weights).
        ct: the CT in HU with its geometry (``None`` while only ``snapshot`` is set).
        labelmap: anatomy label map on the CT grid (anatomy ``i`` of the model = ``i + 1``),
            required when ``anatomy_source == "segmentation"``.
        snapshot: views of the input taken on the GUI thread, turned into ``ct`` and
            ``labelmap`` by :meth:`materialize` in the background.
        anatomy_source: ``"segmentation"`` (use ``labelmap``), ``"builtin"`` or
            ``"totalsegmentator"`` (segment in the worker with ``fvlm_core.segmentation``).
        findings: ``Finding`` dicts to score; ``None`` = the model's default findings.
        device: a name ``fvlm_core.devices.resolve_device`` accepts (``auto``, ``cpu``,
            ``cuda``, ``cuda:N``, ``gpu``, ``mps``); TotalSegmentator runs on it too.
        similarity_maps: also compute per-finding similarity maps.
        allow_non_hu: analyse a volume whose values do not look like HU (still refused: NaN
            or infinite values).
    """

    model_dir: str
    ct: CTVolume | None = None
    labelmap: np.ndarray | None = None
    snapshot: InputSnapshot | None = None
    anatomy_source: str = "segmentation"
    findings: list[dict[str, Any]] | None = None
    device: str = "auto"
    similarity_maps: bool = True
    segmentation_options: dict[str, Any] = field(default_factory=dict)
    allow_non_hu: bool = False

    def materialize(self) -> AnalysisRequest:
        """This request with ``ct`` and ``labelmap`` read from the snapshot (background thread).

        Raises:
            InputError: the volume does not look like CT in HU.
        """
        if self.ct is not None or self.snapshot is None:
            return self
        ct = self.snapshot.ct()
        labelmap = self.snapshot.labelmap() if self.labelmap is None else self.labelmap
        return dataclasses.replace(self, ct=ct, labelmap=labelmap, snapshot=None)


@dataclass
class AnalysisOutput:
    """What an analysis returns.

    Attributes:
        labelmap: ``(Z, Y, X)`` uint8, the anatomy label map that was analysed, on the CT grid.
        timings: seconds per stage (``segment_s``, ``load_model_s``, ``analyze_s``) and
            ``model_reused`` (the process's loaded model was used again); a worker process adds
            ``worker_pid`` and ``worker_jobs`` (jobs that process has run, this one included).
        warnings: the library's warnings about the input (``fvlm_core.io.recorded_warnings``).
    """

    summary: AnalysisSummary
    labelmap: np.ndarray
    anatomies: list[str]
    segmentation_backend: str = ""
    timings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def resolve_device(device: str) -> str:
    """``fvlm_core.devices.resolve_device`` as a string (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    from fvlm_core.devices import resolve_device as resolve

    return str(resolve(device))


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


_ANALYZER: dict[tuple, Any] = {}  # the last model loaded in this process
_ANALYZER_LOCK = threading.Lock()


def _model_key(model_dir: str, device: str) -> tuple:
    """The folder, the device and the state of every file that defines the model (``text/``
    included: :func:`fvlm_core.model.checkpoint.folder_state`): a changed model is loaded again."""
    from fvlm_core.model.checkpoint import folder_state

    folder = Path(model_dir).resolve()
    return (str(folder), device, folder_state(folder))


def load_analyzer_reused(model_dir: str, device: str, cache: bool = True) -> tuple[Any, bool]:
    """:func:`load_analyzer` and whether the process's loaded model was used again."""
    from fvlm_core.zeroshot import Analyzer

    key = _model_key(model_dir, device)
    with _ANALYZER_LOCK:
        if cache and key in _ANALYZER:
            return _ANALYZER[key], True
    analyzer = Analyzer.from_pretrained(model_dir, device=device)
    if cache:
        with _ANALYZER_LOCK:
            _ANALYZER.clear()  # one model at a time: a second would double the (GPU) memory
            _ANALYZER[key] = analyzer
    return analyzer, False


def load_analyzer(model_dir: str, device: str, cache: bool = True) -> Any:
    """``fvlm_core.zeroshot.Analyzer.from_pretrained``; with ``cache`` the last one is kept
    (and reused while the model folder's files are unchanged)."""
    return load_analyzer_reused(model_dir, device, cache)[0]


def _segment(request: AnalysisRequest, catalog, steps: _StageProgress, device: str):
    """The anatomy segmentation the request asks for (given, built-in or TotalSegmentator)."""
    from fvlm_core.segmentation import AnatomySegmentation, get_backend

    ct = request.ct
    if request.anatomy_source == "segmentation":
        if request.labelmap is None:
            raise FVLMError("anatomy source 'segmentation' needs a segmentation (none was given)")
        labelmap = np.asarray(request.labelmap, dtype=np.uint8)
        if labelmap.shape != ct.array.shape:
            raise FVLMError(f"label map shape {labelmap.shape} differs from the CT's {ct.array.shape}")
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, "slicer-segmentation")
    if request.anatomy_source not in ("builtin", "totalsegmentator"):
        raise FVLMError(f"anatomy source {request.anatomy_source!r}: use one of {', '.join(ANATOMY_SOURCES)}")
    options = dict(request.segmentation_options)
    if request.anatomy_source == "totalsegmentator":
        options.setdefault("device", device)  # the panel's device choice applies to TotalSegmentator too
    steps.stage("segment", 0.0, request.anatomy_source)
    backend = get_backend(request.anatomy_source, **options)
    segmentation = backend.segment(ct, catalog, progress=steps.sub("segment"))
    steps.stage("segment", 1.0)
    return segmentation


def run_analysis(
    request: AnalysisRequest,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    cache_model: bool = True,
) -> AnalysisOutput:
    """Segment (if asked), load the model and score the findings on one CT.

    Raises:
        CancelledError: ``should_cancel()`` returned True at a stage boundary, a progress
            report of the segmenter, or between the analyzer's windows.
        FVLMError subclasses: bad input, missing model, missing dependency (messages say what to do).
    """
    from fvlm_core.findings import Finding, FindingSet

    from .settings import read_model_info

    steps = _StageProgress(progress, should_cancel)
    steps.stage("prepare", 0.0, "reading the CT and the model configuration")
    request = request.materialize()
    info = read_model_info(request.model_dir)
    catalog = info.catalog()
    device = resolve_device(request.device)
    t = time.perf_counter()
    segmentation = _segment(request, catalog, steps, device)
    timings: dict[str, Any] = {"segment_s": time.perf_counter() - t}

    steps.stage("load model", 0.0, device)
    t = time.perf_counter()
    analyzer, reused = load_analyzer_reused(request.model_dir, device, cache=cache_model)
    timings.update(load_model_s=time.perf_counter() - t, model_reused=reused)
    steps.stage("load model", 1.0, "the loaded model reused" if reused else device)

    findings = None
    if request.findings is not None:
        findings = FindingSet([Finding.from_dict(f) for f in request.findings])
        findings.check_anatomies(catalog.names)

    steps.stage("analyze", 0.0)
    t = time.perf_counter()
    result = analyzer.analyze(
        request.ct,
        segmentation,
        findings=findings,
        similarity_maps=request.similarity_maps,
        progress=steps.sub("analyze"),
        should_cancel=should_cancel,
    )
    timings["analyze_s"] = time.perf_counter() - t
    steps.stage("finish", 0.0)
    labelmap = np.asarray(segmentation.labelmap, dtype=np.uint8)
    summary = AnalysisSummary.from_result(
        result, device=device, model_dir=str(request.model_dir), labelmap=labelmap, catalog=catalog
    )
    steps.stage("finish", 1.0, "done")
    return AnalysisOutput(
        summary=summary,
        labelmap=labelmap,
        anatomies=catalog.names,
        segmentation_backend=str(getattr(segmentation, "backend", request.anatomy_source)),
        timings=timings,
    )


def _no_finding_wording(model_findings: Sequence[dict[str, Any]]) -> bool:
    """Whether the model's findings are worded "{Finding}." vs "No {finding}." (fvlm demo's protocol)."""
    negatives = [n for f in model_findings for n in f.get("negative", [])]
    return bool(negatives) and all(n.startswith("No ") for n in negatives)


def findings_from_rows(
    rows: Sequence[tuple[str, str]], model_findings: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """``(finding name, anatomy)`` rows (the panel's table) as ``Finding`` dicts.

    A row that is one of the model's findings keeps the model's prompts (its calibrated
    threshold was fitted on them). Other known CT-RATE findings keep the reference wordings;
    anything else is a free-text finding worded like the model's findings: "{X}." / "No {x}."
    when the model uses that form, else "{X}." / "Not {X}.".
    """
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY, Finding

    known = {(f["name"], f["anatomy"]): dict(f) for f in model_findings}
    no_form = _no_finding_wording(model_findings)
    out = []
    for name, anatomy in rows:
        name, anatomy = name.strip(), anatomy.strip()
        if not name:
            continue
        if (name, anatomy) in known:
            out.append(known[(name, anatomy)])
            continue
        source = "ctrate" if CTRATE_LABEL_ANATOMY.get(name) == anatomy else "user"
        negative = f"No {name[0].lower()}{name[1:]}." if no_form and source == "user" else None
        out.append(Finding.from_name(name, anatomy, negative=negative, source=source).to_dict())
    return out
