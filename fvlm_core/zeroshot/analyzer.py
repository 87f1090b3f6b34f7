"""Zero-shot findings for one CT: segmentation -> model space -> anatomy embeddings -> prompts.

::

    analyzer = Analyzer.from_pretrained("models/fvlm-tiny", device="auto")
    result = analyzer.analyze(ct, segmentation)            # the model's findings
    result.to_dict()                                       # JSON-ready
    result.write_maps("maps/")                             # NIfTI similarity maps of flagged findings

Per anatomy the result says present / partial (cut by the field of view) / absent and its
volume; per finding on it the raw score ``softmax([v.t_neg, v.t_pos] / tau)[1]``, the threshold
used (the model config's calibrated one, else 0.5, and which) and whether it is flagged
(``raw score > threshold``, the reference's rule). Where the model config holds a calibration of
the finding (:mod:`fvlm_core.calibration`), the raw score becomes a probability and the threshold
is shown on that scale (a strictly increasing map: the same findings are flagged); otherwise the
raw score is reported as an "uncalibrated score", not a probability. A calibrated threshold and a
calibration apply only to the wordings and the text side they were fitted with
(:mod:`fvlm_core.model.calibrated_with`): a finding of that name worded otherwise, or a model
whose text encoder, tokenizer or text settings changed since, gets 0.5 and its raw score.

Cost: the CT is resampled to model space once; anatomies whose joint box fits in the model
window share one encoder forward (``windows.plan_shared``); prompt embeddings are kept by the
model's text identity (:class:`~fvlm_core.zeroshot.prompts.PromptCache`). On CUDA the encoder runs under bf16 autocast (``precision``;
``benchmarks/gpu_check.py`` measures its agreement with fp32).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm_core.anatomy import get_catalog
from fvlm_core.calibration import Calibration
from fvlm_core.devices import resolve_device
from fvlm_core.errors import CancelledError, ConfigError, InputError, warn
from fvlm_core.findings import Finding, FindingSet
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, LabelVolume, check_finite
from fvlm_core.model.calibrated_with import StoredCalibration
from fvlm_core.model.checkpoint import load_text_encoder
from fvlm_core.model.fvlm import FVLM
from fvlm_core.model.prompt_store import (
    STORE_NAME,
    encode_prompts,
    folder_text_identity,
    model_text_identity,
    read_store,
)
from fvlm_core.preprocess import crop_window, resample_to_model_space, spacing_warning
from fvlm_core.segmentation.plausibility import check_intensities, implausible_message
from fvlm_core.zeroshot import similarity, windows
from fvlm_core.zeroshot.prompt_files import load_findings_file, merge_findings
from fvlm_core.zeroshot.prompts import PROMPT_CACHE, FindingEmbeddings, ModelPrompts, PromptCache, probability
from fvlm_core.zeroshot.results import (
    UNCALIBRATED,
    AnalysisResult,
    AnatomyEmbeddings,
    AnatomyMap,
    AnatomyResult,
    FindingResult,
)

__all__ = [
    "UNCALIBRATED",
    "AnalysisResult",
    "Analyzer",
    "AnatomyMap",
    "AnatomyResult",
    "FindingResult",
    "load_findings_file",
    "merge_findings",
]

DEFAULT_THRESHOLD = 0.5

Progress = Callable[[str, float], None]


@dataclass
class EncodedAnatomy:
    """Embedding of one anatomy from one window (tokens kept for similarity maps)."""

    embedding: torch.Tensor  # (D,)
    window: int
    tokens: torch.Tensor | None = None  # (L, D)
    membership: torch.Tensor | None = None  # (L,) bool
    grid: tuple[int, int, int] | None = None
    patch: tuple[int, int, int] | None = None


@dataclass
class ModelSpaceEncoding:
    """All anatomy embeddings of one volume in model space."""

    anatomies: dict[str, EncodedAnatomy]
    plans: list[windows.WindowPlan]
    dropped: dict[str, float]
    crops: list[Any] = field(default_factory=list)  # ModelSpaceWindow per plan (kept for maps)
    strategy: str = "shared"


# --------------------------------------------------------------------------------------------
# Analyzer
# --------------------------------------------------------------------------------------------


def check_model_folder(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` as a Path when it is a model folder (holds ``config.yaml``).

    Raises:
        ConfigError: no such folder, or no ``config.yaml`` in it (the message says what to give).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder. Give the folder written by `fvlm train`.")
    if not (model_dir / "config.yaml").exists():
        raise ConfigError(
            f"--model {model_dir}: the folder has no config.yaml, so the model cannot be built. "
            "Give a folder written by `fvlm train` / `fvlm import-checkpoint` (config.yaml + model.safetensors)."
        )
    return model_dir


class Analyzer:
    """Zero-shot inference with one fVLM model.

    Args:
        model: an :class:`fvlm_core.model.FVLM` (moved to ``device``, put in eval mode).
        device: ``auto | cpu | cuda | cuda:N | mps | gpu`` or a torch device
            (:func:`fvlm_core.devices.resolve_device`; an absent device is a :class:`ConfigError`).
        name: label for outputs (the model folder).
        precision: the image encoder's arithmetic: ``auto`` (bf16 autocast on CUDA, fp32
            elsewhere), ``fp32`` or ``bf16`` (autocast on any device). The ``reference`` windows
            always run in fp32, as eval.py does.
    """

    PRECISIONS = ("auto", "fp32", "bf16")

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "auto",
        name: str = "",
        precision: str = "auto",
        *,
        model_dir: str | os.PathLike | None = None,
        text_identity: str | None = None,
        prompt_cache: PromptCache = PROMPT_CACHE,
    ) -> None:
        if precision not in self.PRECISIONS:
            raise ConfigError(f"precision {precision!r}: use one of {', '.join(self.PRECISIONS)}")
        self.precision = precision
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.anatomies: list[str] = list(model.anatomies)
        self.model_space = self.config.model_space()
        self.name = name or getattr(self.config, "name", "fvlm")
        #: the folder the model was loaded from (its text encoder comes from there when needed)
        self.model_dir = None if model_dir is None else Path(model_dir)
        #: the text side's identity (:mod:`fvlm_core.model.prompt_store`; None: not known, e.g. a
        #: model built in memory): stored calibrations apply only when fitted with the same
        self.text_identity = text_identity
        # the prompt embeddings are kept by text identity; a model in memory gets its own from its
        # weights, hashed when the first prompt is looked up (its weights must not change after)
        identity = text_identity or (lambda: model_text_identity(self.model))
        self.prompts = ModelPrompts(identity, self._encode_prompts, cache=prompt_cache)

    def _encode_prompts(self, texts: list[str]) -> torch.Tensor:
        if not getattr(self.model, "text_loaded", True):  # loaded without it: the store had the rest
            load_text_encoder(self.model, self.model_dir)
        return encode_prompts(self.model, texts)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, device: str | torch.device = "auto", precision: str = "auto"
    ) -> Analyzer:
        """Load a model folder (``config.yaml`` + weights) written by ``FVLM.save_pretrained``
        (``precision``: as the constructor's).

        The folder's stored prompt embeddings (:mod:`fvlm_core.model.prompt_store`) are taken
        when their text identity is the folder's own; the model is loaded without its text
        encoder, which is built only when a prompt they lack is scored.
        """
        model_dir = check_model_folder(model_dir)
        dev = resolve_device(device)
        model = FVLM.from_pretrained(model_dir, device=dev, lazy_text=True)
        identity = folder_text_identity(model_dir, model.config)
        if identity is None:  # an older folder: its prompts are keyed by the weights, hashed
            load_text_encoder(model, model_dir)
        analyzer = cls(model, dev, str(model_dir), precision, model_dir=model_dir, text_identity=identity)
        analyzer.prompts.preload(read_store(model_dir / STORE_NAME, identity))
        return analyzer

    @property
    def bf16(self) -> bool:
        """Whether the image encoder runs under bf16 autocast (``precision``, ``auto`` on CUDA)."""
        return self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda")

    # ------------------------------------------------------------------ findings / prompts
    def default_findings(self) -> FindingSet:
        """The model config's findings (default: CT-RATE findings on the model's anatomies)."""
        return self.config.finding_set()

    def check_findings(self, findings: FindingSet | Sequence[Finding]) -> FindingSet:
        fs = findings if isinstance(findings, FindingSet) else FindingSet(list(findings))
        fs.check_anatomies(self.anatomies)
        return fs

    def finding_embeddings(self, findings: FindingSet | Sequence[Finding]) -> FindingEmbeddings:
        """Prompt embeddings (cached per model: a repeated call does no text-encoder work)."""
        return self.prompts.findings(findings)

    @property
    def stored(self) -> StoredCalibration:
        """The config's thresholds and calibrations, and which apply to a finding
        (:mod:`fvlm_core.model.calibrated_with`: the wording and text identity they were fitted with)."""
        return StoredCalibration(self.config, self.text_identity)

    def threshold(self, finding: Finding) -> tuple[float, str]:
        """``(threshold on the raw scale, "calibrated" | "default")``: the config's stored
        threshold when it was fitted on this finding as worded and with this text side, else 0.5."""
        t = self.stored.threshold(finding)
        return (DEFAULT_THRESHOLD, "default") if t is None else (t, "calibrated")

    def calibration(self, finding: Finding) -> Calibration | None:
        """The config's calibration of ``finding`` (the same rule as :meth:`threshold`); None
        when there is none that applies."""
        return self.stored.calibration(finding)

    # ------------------------------------------------------------------ model space
    def labels_in_model_order(self, segmentation) -> LabelVolume:
        """The segmentation's label map with anatomy ``i`` of the *model* as value ``i + 1``
        (anatomies the model lacks become background)."""
        labels = get_catalog(self.anatomies).relabel(
            np.asarray(segmentation.labelmap), segmentation.catalog.names
        )
        return LabelVolume(labels, segmentation.geometry, source=f"segmentation ({segmentation.backend})")

    @torch.inference_mode()
    def encode_model_space(
        self,
        ct_ms: CTVolume,
        labels_ms: LabelVolume,
        strategy: str = "shared",
        return_tokens: bool = False,
        max_size_zyx: Sequence[int] | None = None,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> ModelSpaceEncoding:
        """Embed every anatomy of a model-space volume (labels in model order).

        ``strategy`` (:mod:`fvlm_core.zeroshot.windows`): ``"shared"`` (fewest encoder forwards),
        ``"centred"`` (one centred window per anatomy) or ``"reference"`` (the public eval.py:
        the volume prepared and the windows cut as the reference does, encoded in fp32). Returns
        the embeddings, the window plans (in ``ct_ms``'s frame) and the anatomies dropped by a
        size cap (the reference windows have none and drop nothing).
        """
        ms = self.model_space
        reference = strategy == "reference"
        if reference:
            if max_size_zyx is not None:
                raise ConfigError(
                    "the reference windows have no size cap (eval.py has none): drop the maximum "
                    "window size or use the 'centred' or 'shared' windows"
                )
            cut = windows.reference_crops(ct_ms, labels_ms, self.anatomies, ms)
            plans, dropped = [plan for plan, _ in cut], {}
        else:
            plans, dropped = windows.plan_windows(
                labels_ms.array,
                self.anatomies,
                ms.window_size_zyx,
                ms.multiple_zyx,
                strategy=strategy,
                max_size_zyx=max_size_zyx,
            )
        out: dict[str, EncodedAnatomy] = {}
        crops = []
        use_bf16 = self.bf16 and not reference  # the reference runs in fp32
        for w, plan in enumerate(plans):
            if should_cancel is not None and should_cancel():
                raise CancelledError("analysis cancelled")
            if progress:
                progress(
                    f"encoding window {w + 1}/{len(plans)} ({', '.join(plan.anatomies)})",
                    w / max(len(plans), 1),
                )
            crop = cut[w][1] if reference else crop_window(ct_ms, labels_ms, plan.center_zyx, plan.size_zyx)
            crops.append(crop if return_tokens else None)
            image = torch.from_numpy(crop.image(ms.hu_window))[None, None].to(self.device)
            # uint8 maps stay uint8 (the pooling reads any integer type; an int64 copy costs 0.1 s)
            lab = crop.labels if crop.labels.dtype == np.uint8 else crop.labels.astype(np.int64, copy=False)
            labels = torch.from_numpy(lab)[None].to(self.device)
            # Only the anatomies assigned to this window are pooled (others may be cut by it).
            present = torch.zeros(1, len(self.anatomies), dtype=torch.bool, device=self.device)
            for name in plan.anatomies:
                present[0, self.anatomies.index(name)] = True
            autocast = self.device.type if use_bf16 else "cuda"  # a disabled "cuda" autocast runs anywhere
            with torch.autocast(device_type=autocast, dtype=torch.bfloat16, enabled=use_bf16):
                enc = self.model.encode_image(image, labels, present=present, return_tokens=return_tokens)
            for name in plan.anatomies:
                a = self.anatomies.index(name)
                if not bool(enc.present[0, a]):
                    continue
                out[name] = EncodedAnatomy(
                    embedding=enc.embeddings[0, a].float(),
                    window=w,
                    tokens=enc.tokens[0, a].float() if return_tokens and enc.tokens is not None else None,
                    membership=enc.membership[0, a] if return_tokens and enc.membership is not None else None,
                    grid=tuple(enc.grid) if enc.grid is not None else None,
                    patch=tuple(enc.patch_size) if enc.patch_size is not None else None,
                )
        return ModelSpaceEncoding(anatomies=out, plans=plans, dropped=dropped, crops=crops, strategy=strategy)

    def score(self, encoding: ModelSpaceEncoding, emb: FindingEmbeddings) -> dict[tuple[str, str], float]:
        """``(anatomy, finding) -> probability`` for every finding whose anatomy was encoded.

        Reference encodings divide by the stored temperature as eval.py does (``self.temp``,
        which training clamps before each step, so the last step can leave it just outside the
        range); the others by the clamped one.
        """
        temperature = self.model.temp if encoding.strategy == "reference" else self.model.temperature
        tau = float(temperature.detach())
        out = {}
        by_anat: dict[str, list[int]] = {}
        for i, f in enumerate(emb.findings):
            by_anat.setdefault(f.anatomy, []).append(i)
        for anat, idx in by_anat.items():
            e = encoding.anatomies.get(anat)
            if e is None:
                continue
            v = e.embedding.cpu()[None]  # (1, D)
            p = probability(v, emb.positive[idx], emb.negative[idx], tau)
            for i, pi in zip(idx, p.tolist()):
                out[(anat, emb.findings[i].name)] = float(pi)
        return out

    # ------------------------------------------------------------------ one CT
    def analyze(
        self,
        ct: CTVolume,
        segmentation,
        findings: FindingSet | Sequence[Finding] | None = None,
        similarity_maps: bool | str = True,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        strategy: str = "shared",
        require_anatomy: bool = True,
        max_window_zyx: Sequence[int] | None = None,
        segmentation_check: str = "warn",
        keep_embeddings: bool = False,
    ) -> AnalysisResult:
        """Score findings on one CT.

        Stages, each timed in ``result.timings``: ``preprocess`` (the segmentation relabelled to
        the model's anatomies, CT and labels resampled to model space), ``embed`` (one encoder
        forward per window), ``score`` (prompt embeddings against anatomy embeddings) and, with
        maps, ``localize``.

        Args:
            ct: the CT in HU on its own grid.
            segmentation: an :class:`fvlm_core.segmentation.AnatomySegmentation` of ``ct``
                (any catalog; anatomies are matched to the model's by name).
            findings: what to score (default: the model config's findings). A finding on an
                anatomy the model does not have raises :class:`ConfigError`.
            similarity_maps: ``True`` maps of flagged findings, ``"all"`` of every scored finding,
                ``False`` none. Maps lie on ``ct``'s grid.
            progress: ``callback(message, fraction in [0, 1])``.
            should_cancel: polled between stages; True raises :class:`CancelledError`.
            strategy: window plan (:mod:`fvlm_core.zeroshot.windows`), ``"shared"``, ``"centred"`` or
                ``"reference"``.
            require_anatomy: raise :class:`InputError` when the CT holds none of the model's
                anatomies (instead of returning a result with every anatomy absent).
            max_window_zyx: cap on window size in model-space voxels (low-memory use); an
                anatomy keeping under 90% of its voxels inside its capped window is not scored.
            segmentation_check: whether each anatomy's intensities look like its tissue (a
                segmentation of another scan does not: :mod:`fvlm_core.segmentation.plausibility`):
                ``"warn"`` (a warning and a note), ``"strict"`` (:class:`InputError`, before the
                encoding) or ``"off"`` (a CT not in HU).
            keep_embeddings: put the scored anatomies' embeddings into the result
                (:class:`~fvlm_core.zeroshot.results.AnatomyEmbeddings`; its ``model`` is left
                to the caller, :func:`fvlm_core.zeroshot.pipeline.run` fills it).
        """
        timings: dict[str, float] = {}
        notes: list[str] = []
        fs = self._checked_inputs(ct, findings, segmentation_check, notes)

        def step(msg: str, frac: float) -> None:
            if should_cancel is not None and should_cancel():
                raise CancelledError("analysis cancelled")
            if progress:
                progress(msg, frac)

        step("preparing", 0.0)
        with _timed(timings, "preprocess"):
            labels, counts, ct_ms, labels_ms = self._prepare(
                ct, segmentation, require_anatomy, segmentation_check, notes
            )

        step("encoding anatomies", 0.15)
        with _timed(timings, "embed"):
            enc = self.encode_model_space(
                ct_ms,
                labels_ms,
                strategy=strategy,
                return_tokens=bool(similarity_maps),
                max_size_zyx=max_window_zyx,
                progress=(lambda m, f: progress(m, 0.15 + 0.6 * f)) if progress else None,
                should_cancel=should_cancel,
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize()

        step("scoring findings", 0.8)
        with _timed(timings, "score"):
            emb = self.finding_embeddings(fs)
            probs = self.score(enc, emb)
        results = self._anatomy_results(fs, counts, segmentation, enc, probs)
        boxes = windows.anatomy_boxes(labels.array, self.anatomies)
        for a in results:
            a.box_zyx = boxes.get(a.name)
        notes += _result_notes(results)

        maps: dict[tuple[str, str], AnatomyMap] = {}
        if similarity_maps:
            step("localising", 0.85)
            with _timed(timings, "localize"):
                full = self._similarity_maps(results, enc, emb, ct.geometry, every=similarity_maps == "all")
                maps = {key: AnatomyMap.from_full(array) for key, array in full.items()}
        step("done", 1.0)
        return AnalysisResult(
            anatomies=results,
            similarity_maps=maps,
            geometry=ct.geometry,
            windows=enc.plans,
            timings=timings,
            notes=notes,
            model=self.name,
            device=str(self.device),
            ct=str(ct.source),
            dicom_series=ct.dicom_series,
            segmentation={"source": str(getattr(segmentation, "backend", ""))},
            embeddings=_kept_embeddings(enc, strategy, max_window_zyx) if keep_embeddings else None,
        )

    def _checked_inputs(
        self,
        ct: CTVolume,
        findings: FindingSet | Sequence[Finding] | None,
        segmentation_check: str,
        notes: list[str],
    ) -> FindingSet:
        """The findings to score, checked with the options and the CT before any work; a warning
        about coarse voxels goes to ``notes``."""
        if segmentation_check not in ("warn", "strict", "off"):
            raise ConfigError(f"segmentation_check {segmentation_check!r}: use 'warn', 'strict' or 'off'")
        fs = self.check_findings(findings if findings is not None else self.default_findings())
        check_finite(ct.array, ct.source)  # NaN would spread through resampling and pooling
        coarse = spacing_warning(ct.geometry, self.model_space.spacing_zyx, "the model", ct.source)
        if coarse:
            warn(coarse)
            notes.append(coarse)
        return fs

    def _prepare(
        self, ct: CTVolume, segmentation, require_anatomy: bool, segmentation_check: str, notes: list[str]
    ) -> tuple[LabelVolume, np.ndarray, CTVolume, LabelVolume]:
        """The segmentation in the model's anatomy order, its voxel counts per anatomy, and the CT
        and labels in model space; notes (no anatomy, implausible intensities) go to ``notes``."""
        labels = self.labels_in_model_order(segmentation)
        counts = windows.voxel_counts(labels.array, len(self.anatomies))
        if not counts.any():
            msg = self._no_anatomy_message(ct, segmentation)
            if require_anatomy:
                raise InputError(msg)
            notes.append(msg)
        ct_ms, labels_ms = resample_to_model_space(ct, labels, self.model_space)
        if segmentation_check != "off":
            notes += self._implausible(ct_ms, labels_ms, ct.source, segmentation_check == "strict")
        return labels, counts, ct_ms, labels_ms

    def _implausible(self, ct_ms: CTVolume, labels_ms: LabelVolume, source: str, strict: bool) -> list[str]:
        """The segmentation's anatomies whose intensities do not fit their tissue, as a warning
        (``strict``: an :class:`InputError`), on the model-space volume (what is encoded)."""
        found = check_intensities(ct_ms.array, labels_ms.array, self.anatomies)
        if not found:
            return []
        msg = implausible_message(found, source)
        if strict:
            raise InputError(msg + " Refused (strict segmentation check); nothing was scored.")
        warn(msg)
        return [msg]

    def _no_anatomy_message(self, ct: CTVolume, segmentation) -> str:
        facts = getattr(segmentation, "facts", {}) or {}
        seg_has = [n for n, f in facts.items() if getattr(f, "present", False)]
        return (
            f"{ct.source}: the segmentation holds none of this model's anatomies "
            f"({', '.join(self.anatomies)}); found: {', '.join(seg_has) or 'nothing'}. "
            "Nothing can be scored: check that the CT covers the chest and that the segmentation "
            "belongs to it (or choose another model / segmentation backend)."
        )

    def _anatomy_results(
        self,
        fs: FindingSet,
        counts: np.ndarray,
        segmentation,
        enc: ModelSpaceEncoding,
        probs: Mapping[tuple[str, str], float],
    ) -> list[AnatomyResult]:
        """One :class:`AnatomyResult` per model anatomy (``counts``: voxels per label value)."""
        facts = getattr(segmentation, "facts", {}) or {}
        vox_ml = segmentation.geometry.voxel_volume_ml
        by_anat = fs.by_anatomy()
        results = []
        for i, name in enumerate(self.anatomies):
            voxels = int(counts[i])
            e = enc.anatomies.get(name)
            status, note = _status(voxels, facts.get(name), e is not None, enc.dropped.get(name))
            results.append(
                AnatomyResult(
                    name=name,
                    status=status,
                    volume_ml=voxels * vox_ml,
                    voxels=voxels,
                    scored=e is not None,
                    window=e.window if e is not None else None,
                    note=note,
                    findings=[
                        self._finding_result(f, probs.get((name, f.name))) for f in by_anat.get(name, [])
                    ],
                )
            )
        return results

    def _finding_result(self, finding: Finding, p: float | None) -> FindingResult:
        thr, src = self.threshold(finding)
        cal = self.calibration(finding)
        if cal is None:
            why = self.stored.why_not(finding)
            note = (
                f"{why}: not used (calibrate again with `fvlm evaluate --store-thresholds`)"
                if why
                else "the model config has no calibration for this finding"
            )
        else:
            note = "" if cal.calibrated else cal.reason
        calibrated = cal is not None and cal.calibrated
        return FindingResult(
            name=finding.name,
            raw_score=p,
            threshold=cal.probability(thr) if calibrated else thr,
            threshold_source=src,
            flagged=p is not None and p > thr,  # the reference's rule, on the raw scale
            source=finding.source,
            positive=finding.positive,
            negative=finding.negative,
            raw_threshold=thr,
            probability=cal.probability(p) if calibrated and p is not None else None,
            calibration=cal.method if cal is not None else "none",
            calibration_note=note,
        )

    def _similarity_maps(
        self,
        results: list[AnatomyResult],
        enc: ModelSpaceEncoding,
        emb: FindingEmbeddings,
        geometry: Geometry,
        every: bool = False,
    ) -> dict[tuple[str, str], np.ndarray]:
        """``(anatomy, finding) -> (Z, Y, X)`` float32 on ``geometry``: flagged findings (``every``: all scored).

        The maps of one window are put on the CT grid together (:func:`similarity.maps_to_ct`).
        """
        tau = float(self.model.temperature.detach())
        per_window: dict[int, tuple[list[tuple[str, str]], list[torch.Tensor], EncodedAnatomy]] = {}
        for a in results:
            e = enc.anatomies.get(a.name)
            if e is None or e.tokens is None:
                continue
            for fr in a.findings:
                if not (fr.flagged or every):
                    continue
                k = emb.index(fr.name, a.name)
                keys, values, _ = per_window.setdefault(e.window, ([], [], e))
                keys.append((a.name, fr.name))
                values.append(
                    similarity.token_scores(e.tokens, e.membership, emb.positive[k], emb.negative[k], tau)
                )
        maps = {}
        for w, (keys, values, e) in per_window.items():
            arrays = similarity.maps_to_ct(enc.crops[w], torch.stack(values), e.grid, e.patch, geometry)
            maps.update(zip(keys, arrays))
        return maps


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the ``with`` body took as ``timings[key]``."""
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def _status(voxels: int, fact: Any, scored: bool, dropped_fraction: float | None) -> tuple[str, str]:
    """``(status, note)`` of one anatomy: present / partial (cut by the field of view) / absent."""
    cut = bool(getattr(fact, "cut_by_fov", False))
    status = "absent" if voxels == 0 else ("partial" if cut else "present")
    if status == "absent":
        return status, "not in the segmentation: not scored"
    if not scored:
        return status, (
            f"not scored: its capped window holds only {dropped_fraction:.0%} of it (90% needed)"
            if dropped_fraction is not None
            else "not scored: no encoder token touches it in model space (too small)"
        )
    if status == "partial":
        return status, "cut by the field of view: scored on the visible part"
    return status, ""


def _kept_embeddings(enc, strategy: str, max_window_zyx: Sequence[int] | None) -> AnatomyEmbeddings:
    """The scored anatomies' embeddings of ``enc`` (a :class:`ModelSpaceEncoding`), for the result."""
    return AnatomyEmbeddings(
        {name: e.embedding.cpu().numpy() for name, e in enc.anatomies.items()},
        windows=strategy,
        max_window_zyx=None if max_window_zyx is None else tuple(int(v) for v in max_window_zyx),
    )


def _result_notes(results: list[AnatomyResult]) -> list[str]:
    """Notes for the user: findings scored against the default threshold, anatomies not scored."""
    notes = []
    uncalibrated = [f.name for a in results for f in a.findings if f.threshold_source == "default"]
    if uncalibrated:
        notes.append(
            f"No calibrated threshold in the model config for {len(uncalibrated)} finding(s) "
            f"({', '.join(sorted(set(uncalibrated)))}): {DEFAULT_THRESHOLD} used. Calibrate with "
            "`fvlm evaluate --store-thresholds` on a labelled calibration set."
        )
    plain = sorted({f.name for a in results for f in a.findings if not f.calibrated})
    if plain:
        notes.append(
            f"Uncalibrated scores, not probabilities, for {len(plain)} finding(s) ({', '.join(plain)}): "
            "calibrate the model with `fvlm evaluate --store-thresholds` on a labelled calibration set."
        )
    kept = {f.name: f.calibration_note for a in results for f in a.findings if f.calibration_note}
    notes += [f"{name}: {why}" for name, why in kept.items() if why.startswith("raw score kept")]
    notes += [f"{name}: {why}" for name, why in kept.items() if why.endswith("--store-thresholds`)")]
    notes += [f"{a.name}: {a.note}" for a in results if a.status != "absent" and not a.scored]
    return notes
