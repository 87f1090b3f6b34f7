"""A scan's anatomy embeddings in two halves: the windows (CPU, in a data-loader worker) and
the encoder (the main process, on the GPU when there is one).

:func:`prepare_windows` plans and cuts the model-space windows exactly as
:meth:`fvlm_core.zeroshot.analyzer.Analyzer.encode_model_space` does and applies the HU window;
:func:`encode_windows` runs the model's ``encode_image`` on them as that method does (same
inputs, same ``present`` mask, bf16 autocast on CUDA except for the reference windows). The two
together give the analyzer's embeddings bit for bit (``Testing/test_store.py`` checks all three
window strategies), so scores computed later from a store equal ``fvlm analyze``'s. Splitting
them lets ``fvlm embed`` read and cut the next scans while the encoder runs.

:func:`scan_record` turns one scan's encoding into the plain record the store keeps (per
anatomy: status, volume, window, embedding); :func:`embed_ct` does all of it for one CT in
memory (``fvlm search --like CT``, the Slicer module's "Similar cases").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fvlm_core.anatomy import get_catalog
from fvlm_core.errors import ConfigError
from fvlm_core.io import check_finite
from fvlm_core.preprocess import crop_window, resample_to_model_space
from fvlm_core.segmentation.base import compute_facts
from fvlm_core.store.format import encode_vector
from fvlm_core.zeroshot import windows as zw
from fvlm_core.zeroshot.analyzer import EncodedAnatomy, ModelSpaceEncoding, _status


@dataclass
class PreparedWindow:
    """One encoder input: ``image`` ``(Z, Y, X)`` float32 in [0, 1], ``labels`` ``(Z, Y, X)``
    (uint8 or int64; anatomy ``i`` = ``i + 1``) and the anatomies pooled from it."""

    image: torch.Tensor
    labels: torch.Tensor
    anatomies: tuple[str, ...]


@dataclass
class PreparedScan:
    """A model-space volume's windows, ready for the encoder (tensors travel from data-loader
    workers through shared memory)."""

    plans: list[zw.WindowPlan]
    dropped: dict[str, float]
    windows: list[PreparedWindow]
    strategy: str


def prepare_windows(
    ct_ms,
    labels_ms,
    anatomies: Sequence[str],
    model_space,
    strategy: str = "shared",
    max_size_zyx: Sequence[int] | None = None,
) -> PreparedScan:
    """Plan and cut the windows of a model-space volume (labels in model order), as
    ``Analyzer.encode_model_space`` does before its encoder calls.

    Args:
        ct_ms, labels_ms: :class:`~fvlm_core.io.CTVolume` / :class:`~fvlm_core.io.LabelVolume`
            on the model-space grid.
        anatomies: the model's anatomies.
        model_space: the model's :class:`~fvlm_core.preprocess.ModelSpaceConfig`.
        strategy: ``shared``, ``centred`` or ``reference`` (:mod:`fvlm_core.zeroshot.windows`).
        max_size_zyx: window size cap (not with ``reference``).
    """
    names = list(anatomies)
    if strategy == "reference":
        if max_size_zyx is not None:
            raise ConfigError(
                "the reference windows have no size cap (eval.py has none): drop the maximum "
                "window size or use the 'centred' or 'shared' windows"
            )
        cut = zw.reference_crops(ct_ms, labels_ms, names, model_space)
        plans, dropped = [plan for plan, _ in cut], {}
        crops = [crop for _, crop in cut]
    else:
        plans, dropped = zw.plan_windows(
            labels_ms.array,
            names,
            model_space.window_size_zyx,
            model_space.multiple_zyx,
            strategy=strategy,
            max_size_zyx=max_size_zyx,
        )
        crops = [crop_window(ct_ms, labels_ms, p.center_zyx, p.size_zyx) for p in plans]
    prepared = []
    for plan, crop in zip(plans, crops):
        lab = crop.labels if crop.labels.dtype == np.uint8 else crop.labels.astype(np.int64, copy=False)
        prepared.append(
            PreparedWindow(
                torch.from_numpy(np.ascontiguousarray(crop.image(model_space.hu_window))),
                torch.from_numpy(np.ascontiguousarray(lab)),
                tuple(plan.anatomies),
            )
        )
    return PreparedScan(plans, dropped, prepared, strategy)


@torch.inference_mode()
def encode_windows(analyzer, prepared: PreparedScan):
    """The anatomy embeddings of prepared windows: a
    :class:`~fvlm_core.zeroshot.analyzer.ModelSpaceEncoding` (no tokens) as
    ``analyzer.encode_model_space`` returns it for the same volume."""
    device = analyzer.device
    names = analyzer.anatomies
    use_bf16 = device.type == "cuda" and prepared.strategy != "reference"  # the reference runs in fp32
    out: dict[str, EncodedAnatomy] = {}
    for w, win in enumerate(prepared.windows):
        image = win.image[None, None].to(device)
        labels = win.labels[None].to(device)
        present = torch.zeros(1, len(names), dtype=torch.bool, device=device)
        for name in win.anatomies:
            present[0, names.index(name)] = True
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            enc = analyzer.model.encode_image(image, labels, present=present)
        for name in win.anatomies:
            a = names.index(name)
            if bool(enc.present[0, a]):
                out[name] = EncodedAnatomy(embedding=enc.embeddings[0, a].float(), window=w)
    return ModelSpaceEncoding(
        anatomies=out, plans=prepared.plans, dropped=prepared.dropped, strategy=prepared.strategy
    )


def anatomy_facts(labels, anatomies: Sequence[str]) -> dict[str, Any]:
    """Per model anatomy its :class:`~fvlm_core.segmentation.base.AnatomyFacts` (voxels, volume,
    cut by the field of view) from a label map in model order on the CT's grid."""
    return compute_facts(np.asarray(labels.array), labels.geometry, get_catalog(list(anatomies)))


def scan_record(
    encoding,
    facts: Mapping[str, Any],
    anatomies: Sequence[str],
    *,
    source: str | None = None,
    dataset: str | None = None,
    labels: Mapping[str, int | None] | None = None,
    texts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The plain-JSON record of one scan the store keeps (embeddings as base64 float32).

    Status and note per anatomy follow ``fvlm analyze`` (present / partial / absent; an anatomy
    no token touches, or cut by a window cap, is present but not scored).
    """
    rows = []
    for name in anatomies:
        fact = facts.get(name)
        voxels = int(getattr(fact, "voxels", 0))
        e = encoding.anatomies.get(name)
        status, _ = _status(voxels, fact, e is not None, encoding.dropped.get(name))
        plan = encoding.plans[e.window] if e is not None else None
        rows.append(
            {
                "anatomy": name,
                "status": status,
                "scored": e is not None,
                "voxels": voxels,
                "volume_ml": float(getattr(fact, "volume_ml", 0.0)),
                "window": None if e is None else int(e.window),
                "window_start_zyx": None if plan is None else [int(v) for v in plan.start_zyx],
                "window_size_zyx": None if plan is None else [int(v) for v in plan.size_zyx],
                "embedding": None if e is None else encode_vector(e.embedding.cpu().numpy()),
                "text": (texts or {}).get(name) or None,
            }
        )
    return {
        "source": source,
        "dataset": dataset,
        "labels": {k: (None if v is None else int(v)) for k, v in (labels or {}).items()},
        "anatomies": rows,
    }


@dataclass
class ScanEmbeddings:
    """One scan's anatomy embeddings in memory: ``vectors`` anatomy -> ``(D,)`` float32 (the
    anatomies scored), ``record`` the store record (status, volumes, windows)."""

    vectors: dict[str, np.ndarray]
    record: dict[str, Any]


def embed_ct(
    analyzer, ct, segmentation, strategy: str = "shared", source: str | None = None
) -> ScanEmbeddings:
    """Embed every anatomy of one CT as ``fvlm analyze`` does (same resampling and windows).

    Args:
        analyzer: an :class:`~fvlm_core.zeroshot.analyzer.Analyzer`.
        ct: :class:`~fvlm_core.io.CTVolume` in HU on its own grid.
        segmentation: an :class:`~fvlm_core.segmentation.AnatomySegmentation` of ``ct``.
        strategy: the store's window strategy.
    """
    check_finite(ct.array, ct.source)
    labels = analyzer.labels_in_model_order(segmentation)
    facts = anatomy_facts(labels, analyzer.anatomies)
    ct_ms, labels_ms = resample_to_model_space(ct, labels, analyzer.model_space)
    prepared = prepare_windows(ct_ms, labels_ms, analyzer.anatomies, analyzer.model_space, strategy)
    enc = encode_windows(analyzer, prepared)
    record = scan_record(enc, facts, analyzer.anatomies, source=source or ct.source)
    return ScanEmbeddings({k: e.embedding.cpu().numpy() for k, e in enc.anatomies.items()}, record)
