"""Analyse one CT: an :class:`AnalysisRequest` in, an :class:`~fvlm_core.zeroshot.results.AnalysisResult` out.

The one pipeline behind ``fvlm analyze`` and the 3D Slicer module's worker::

    request = AnalysisRequest(ct="chest.nii.gz", model="models/fvlm-tiny", segmentation="builtin")
    result = run(request, progress=lambda stage, fraction: print(stage, fraction))
    result.to_dict()

:func:`run` reads the CT (the library's reader and checks), reads the model's configuration and
checks the findings against it, loads the model (or reuses the one an :class:`AnalyzerCache`
holds), segments (the backend chosen by :func:`fvlm_core.segmentation.choice.choose_backend`) and
scores. Progress goes through :data:`STAGES`, each report a chance to cancel. A request is plain
data with exact JSON (:meth:`AnalysisRequest.to_dict` / :meth:`~AnalysisRequest.from_dict`) and a
file (:meth:`~AnalysisRequest.save` / :meth:`~AnalysisRequest.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.anatomy import get_catalog
from fvlm_core.atomic import atomic_write_text
from fvlm_core.devices import resolve_device
from fvlm_core.errors import CancelledError, ConfigError, recorded_warnings
from fvlm_core.findings import Finding, FindingSet
from fvlm_core.io import read_ct
from fvlm_core.model.config import load_config
from fvlm_core.segmentation.choice import SOURCES, choose_backend, segment
from fvlm_core.zeroshot.prompt_files import merge_findings

Progress = Callable[[str, float], None]

#: Stages :func:`run` reports, in order, with their share of the progress bar.
STAGES: dict[str, tuple[float, float]] = {
    "prepare": (0.0, 0.03),
    "load model": (0.03, 0.12),
    "segment": (0.12, 0.5),
    "analyze": (0.5, 0.98),
    "finish": (0.98, 1.0),
}
WINDOWS = ("shared", "centred", "reference")


@dataclass
class AnalysisRequest:
    """Everything one analysis needs, as plain data (paths, names, options).

    Attributes:
        ct: the CT: a NIfTI / NRRD / MHA file or a DICOM series folder (``series``: which UID).
        model: the model folder (``config.yaml`` + weights).
        segmentation: where the anatomies come from (:data:`fvlm_core.segmentation.choice.SOURCES`):
            ``builtin``, ``totalsegmentator``, ``labelmap`` (``labelmap``: a file or mask folder,
            ``class_map``: its class map) or ``segments`` (``segments``: label-map layers' segments
            in paint order, :class:`~fvlm_core.segmentation.labelmap.SegmentsBackend`).
        fast, allow_download, all_classes: TotalSegmentator's 3 mm model, permission to download
            its weights, all its classes instead of those the anatomies need.
        allow_non_hu: analyse a volume whose values do not look like CT in HU.
        findings: ``Finding`` dicts to score; ``None``: the model's findings.
        extra_findings: ``Finding`` dicts added to them (a name of the model's replaces it).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``gpu`` or ``mps`` (TotalSegmentator too).
        similarity_maps: ``True`` maps of flagged findings, ``"all"`` of every scored one, ``False``.
        windows: ``shared``, ``centred`` or ``reference`` (:mod:`fvlm_core.zeroshot.windows`).
        max_window: cap on the window size in model-space voxels ``(z, y, x)``.
        keep_labelmap: put the analysed anatomy label map into the result (for display).
        segmentation_check: whether each anatomy's intensities must look like its tissue (a
            segmentation of another scan does not): ``warn``, ``strict`` (refused) or ``off``;
            ``allow_non_hu`` turns it off.
        keep_embeddings: put the anatomy embeddings, with the model's store identity, into the
            result (:class:`~fvlm_core.zeroshot.results.AnatomyEmbeddings`: to search an
            embedding store with this CT, as the 3D Slicer module's "Similar cases" does).
    """

    ct: str
    model: str
    segmentation: str = "builtin"
    labelmap: str | None = None
    class_map: str | None = None
    segments: list[dict[str, Any]] | None = None
    fast: bool = False
    allow_download: bool = False
    all_classes: bool = False
    series: str | None = None
    allow_non_hu: bool = False
    findings: list[dict[str, Any]] | None = None
    extra_findings: list[dict[str, Any]] = field(default_factory=list)
    device: str = "auto"
    similarity_maps: bool | str = True
    windows: str = "shared"
    max_window: list[int] | None = None
    keep_labelmap: bool = False
    segmentation_check: str = "warn"
    keep_embeddings: bool = False

    def check(self) -> None:
        """Raise :class:`ConfigError` for an option no stage would accept (before any work)."""
        if self.segmentation not in SOURCES:
            raise ConfigError(f"segmentation {self.segmentation!r}: use one of {', '.join(SOURCES)}")
        if self.windows not in WINDOWS:
            raise ConfigError(f"windows {self.windows!r}: use one of {', '.join(WINDOWS)}")
        if self.similarity_maps not in (True, False, "all"):
            raise ConfigError(f"similarity_maps {self.similarity_maps!r}: use true, false or 'all'")
        if self.segmentation_check not in ("warn", "strict", "off"):
            raise ConfigError(
                f"segmentation_check {self.segmentation_check!r}: use 'warn', 'strict' or 'off'"
            )
        if self.max_window is not None and len(self.max_window) != 3:
            raise ConfigError(f"max_window {self.max_window!r}: give three sizes (z, y, x)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisRequest:
        """The inverse of :meth:`to_dict`; an unknown key is an error (not silently dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"analysis request: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnalysisRequest:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class AnalyzerCache:
    """The last model a process loaded, used again while its folder's files are unchanged.

    One model at a time: a second would double the (GPU) memory. ``reused`` says whether the
    last :meth:`get` found it loaded.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._analyzer: Any = None
        self._identity: tuple[tuple, dict] | None = None
        self.reused = False

    @staticmethod
    def key(model_dir: str, device: str) -> tuple:
        """The folder, the device and the state of every file that defines the model (``text/``
        included: :func:`fvlm_core.model.checkpoint.folder_state`): a changed model loads again."""
        from fvlm_core.model.checkpoint import folder_state

        folder = Path(model_dir).resolve()
        return (str(folder), device, folder_state(folder))

    def get(self, model_dir: str, device: str) -> Any:
        from fvlm_core.zeroshot.analyzer import Analyzer

        key = self.key(model_dir, device)
        self.reused = key == self._key
        if not self.reused:
            self._analyzer = self._key = None  # the old model goes before the new one loads
            self._analyzer, self._key = Analyzer.from_pretrained(model_dir, device=device), key
        return self._analyzer

    def identity(self, model_dir: str, config: Any) -> dict[str, Any]:
        """The model folder's identity as an embedding store records it (its weights hashed
        once while the folder's files are unchanged)."""
        from fvlm_core.store.format import ModelIdentity

        key = self.key(model_dir, "")
        if self._identity is None or self._identity[0] != key:
            self._identity = (key, ModelIdentity.of_folder(model_dir, config).to_dict())
        return self._identity[1]


class _Stages:
    """Maps a stage's own 0..1 onto the whole bar; every report is a chance to cancel."""

    def __init__(self, progress: Progress | None, should_cancel: Callable[[], bool] | None) -> None:
        self.progress, self.should_cancel = progress, should_cancel

    def __call__(self, name: str, fraction: float = 0.0, detail: str = "") -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("analysis cancelled")
        lo, hi = STAGES[name]
        if self.progress is not None:
            label = f"{name}: {detail}" if detail else name
            self.progress(label, lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0))

    def sub(self, name: str) -> Progress:
        """A library progress callback ``(message, fraction)`` scaled into stage ``name``."""
        return lambda message, fraction: self(name, fraction, message)


def _findings(request: AnalysisRequest, config: Any):
    """The findings to score: the request's, or the model's with the request's extras merged."""
    if request.findings is not None:
        findings = FindingSet([Finding.from_dict(f) for f in request.findings])
    else:
        findings = config.finding_set()
    if request.extra_findings:
        findings = merge_findings(
            findings, FindingSet([Finding.from_dict(f) for f in request.extra_findings])
        )
    findings.check_anatomies(list(config.anatomies))
    return findings


def run(
    request: AnalysisRequest,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    analyzers: AnalyzerCache | None = None,
) -> Any:
    """Analyse the CT of ``request``; returns an :class:`~fvlm_core.zeroshot.results.AnalysisResult`.

    Args:
        progress: ``(stage message, fraction of the whole)``, stages as :data:`STAGES`.
        should_cancel: polled at every progress report (of this function, the segmenter and the
            analyzer's windows); True raises :class:`~fvlm_core.errors.CancelledError`.
        analyzers: keep the loaded model for the next call (the 3D Slicer worker's).

    Raises:
        FVLMError subclasses: bad input, missing model, missing dependency (the messages say what
        to do); bad options and findings are refused before the CT is segmented.
    """
    import torch

    from fvlm_core.zeroshot.analyzer import check_model_folder

    stage = _Stages(progress, should_cancel)
    request.check()
    timings: dict[str, float] = {}
    with recorded_warnings() as warned:
        stage("prepare", 0.0, "reading the CT")
        t = time.perf_counter()
        ct = read_ct(request.ct, allow_non_hu=request.allow_non_hu, series=request.series)
        timings["read"] = time.perf_counter() - t
        config = load_config(check_model_folder(request.model))
        findings = _findings(request, config)
        device = str(resolve_device(request.device))
        backend = choose_backend(
            request.segmentation,
            labelmap=request.labelmap,
            class_map=request.class_map,
            segments=request.segments,
            fast=request.fast,
            device=device,
            allow_download=request.allow_download,
            roi_subset=not request.all_classes,
            should_cancel=should_cancel,
        )
        stage("load model", 0.0, device)
        t = time.perf_counter()
        analyzers = analyzers or AnalyzerCache()
        analyzer = analyzers.get(request.model, device)
        timings["load_model"] = time.perf_counter() - t
        stage("segment", 0.0, request.segmentation)
        t = time.perf_counter()
        seg = segment(ct, get_catalog(list(config.anatomies)), backend, progress=stage.sub("segment"))
        timings["segment"] = time.perf_counter() - t
        stage("analyze", 0.0)
        with torch.no_grad():  # scoped: the caller may be a longer-lived process
            result = analyzer.analyze(
                ct,
                seg,
                findings,
                similarity_maps=request.similarity_maps,
                strategy=request.windows,
                max_window_zyx=request.max_window,
                segmentation_check="off" if request.allow_non_hu else request.segmentation_check,
                progress=stage.sub("analyze"),
                should_cancel=should_cancel,
                keep_embeddings=request.keep_embeddings,
            )
        stage("finish", 0.0)
    result.timings = {**timings, **result.timings}
    result.warnings = list(warned)
    result.ct = str(request.ct)
    result.segmentation = {"source": request.labelmap or request.segmentation}
    if seg.details:  # how the backend produced it (TotalSegmentator: classes, stage times)
        result.segmentation["details"] = seg.details
    if request.keep_labelmap:
        result.labelmap = analyzer.labels_in_model_order(seg).array
    if result.embeddings is not None:
        result.embeddings.model = analyzers.identity(request.model, config)
    stage("finish", 1.0, "done")
    return result
