"""Zero-shot findings over a whole store: only the text side runs.

For each finding, ``p = softmax([v.t_neg, v.t_pos] / tau)[1]`` over every stored embedding of its
anatomy at once (one matrix product per anatomy), with ``tau`` as the analyzer takes it (the
stored temperature for reference windows, the clamped one otherwise), so the raw scores are
``fvlm analyze``'s on the same scans. Thresholds and calibrations come from the analyzer exactly
as ``fvlm analyze`` applies them (:meth:`~fvlm_core.zeroshot.analyzer.Analyzer.threshold`,
:meth:`~fvlm_core.zeroshot.analyzer.Analyzer.calibration`): the model's own where the finding
and its wordings are the model's, else 0.5 and the raw score, called an "uncalibrated score".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

from fvlm_core.atomic import atomic_path

#: Columns of a query result, one row per scan and finding (as ``fvlm analyze``'s findings).
COLUMNS = (
    "scan",
    "anatomy",
    "finding",
    "scale",
    "value",
    "raw_score",
    "probability",
    "threshold",
    "raw_threshold",
    "threshold_source",
    "flagged",
    "calibration",
    "source",
)


@dataclass
class QueryResult:
    """``table``: a :class:`pyarrow.Table` of :data:`COLUMNS` (scans sorted, then findings by
    anatomy in the model's order); ``findings``: per finding what ``fvlm analyze`` says of it
    besides the value (scale, thresholds, calibration, wordings); ``notes`` for the user."""

    table: Any
    findings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raw_scores(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """``(scans, finding -> raw score per scan, NaN where not scored)``: a score table as
        ``fvlm evaluate`` reads it."""
        t = self.table
        scans = t.column("scan").to_pylist()
        names = [f["name"] for f in self.findings]
        raw = np.asarray(t.column("raw_score").to_numpy(zero_copy_only=False), dtype=float)
        raw = raw.reshape(-1, len(names)) if names else raw.reshape(0, 0)
        return scans[:: max(len(names), 1)], {n: raw[:, j] for j, n in enumerate(names)}


def temperature_for(analyzer, windows: str) -> float:
    """The ``tau`` :meth:`Analyzer.score` divides by for encodings of ``windows``."""
    t = analyzer.model.temp if windows == "reference" else analyzer.model.temperature
    return float(t.detach())


def _probabilities(
    vectors: np.ndarray, positive: torch.Tensor, negative: torch.Tensor, tau: float
) -> np.ndarray:
    """``(n, F)``: ``softmax([v.t_neg, v.t_pos] / tau)[1]`` for every row of ``vectors``, as
    ``sigmoid((v.t_pos - v.t_neg) / tau)`` (the same number; one product with both prompt sets)."""
    with warnings.catch_warnings():  # a memory-mapped store is read-only; nothing writes to it here
        warnings.simplefilter("ignore", UserWarning)
        v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    f = positive.shape[0]
    logits = (v @ torch.cat([negative, positive]).float().T) / torch.tensor(tau, dtype=torch.float32)
    return torch.sigmoid(logits[:, f:] - logits[:, :f]).numpy()


def query_store(store, analyzer, findings=None) -> QueryResult:
    """Score ``findings`` (default: the model's) on every scan of ``store``.

    Args:
        store: an :class:`~fvlm_core.store.format.EmbeddingStore` of ``analyzer``'s model
            (the caller checks the model: :meth:`EmbeddingStore.check_model`).
        analyzer: an :class:`~fvlm_core.zeroshot.analyzer.Analyzer` (only its text side runs).
        findings: a :class:`~fvlm_core.findings.FindingSet` or sequence of findings.
    """
    from fvlm_core.zeroshot.analyzer import AnatomyResult, _result_notes

    fs = analyzer.check_findings(findings if findings is not None else analyzer.default_findings())
    by_anat = fs.by_anatomy()
    ordered = [f for a in analyzer.anatomies for f in by_anat.get(a, [])]
    emb = analyzer.finding_embeddings(ordered)
    tau = temperature_for(analyzer, store.info.windows)
    table = store.table(["scored", "embedding", "source"])  # one read: vectors() and scans() reuse it
    scans = store.require_scans()
    n, nf = len(scans), len(ordered)
    sorted_ids = pa.array(scans, pa.string())
    first = table.filter(pc.equal(table.column("anatomy"), analyzer.anatomies[0]))
    order = np.argsort(
        np.asarray(first.column("scan").to_numpy(zero_copy_only=False), dtype=str), kind="stable"
    )
    sources = first.column("source").take(pa.array(order)).to_pylist()  # one row per scan and anatomy
    raw = np.full((n, nf), np.nan)
    for anatomy in {f.anatomy for f in ordered}:
        cols = [j for j, f in enumerate(ordered) if f.anatomy == anatomy]
        for ids, vectors in store.vector_blocks(anatomy):
            p = _probabilities(vectors, emb.positive[cols], emb.negative[cols], tau)
            rows = pc.index_in(ids, value_set=sorted_ids).to_numpy(zero_copy_only=False)
            raw[rows[:, None], np.asarray(cols)[None, :]] = p
    info = [analyzer._finding_result(f, None) for f in ordered]  # thresholds, calibrations as analyze
    columns = _columns(analyzer, ordered, info, raw)
    per_scan = np.repeat(np.arange(n, dtype=np.int32), nf)
    columns["scan"] = pa.DictionaryArray.from_arrays(per_scan, pa.array(scans, pa.string()))
    columns["source"] = pa.DictionaryArray.from_arrays(per_scan, pa.array(sources, pa.string()))
    out = pa.table({c: columns[c] for c in COLUMNS})
    pseudo = [
        AnatomyResult(a, "absent", 0.0, findings=[r for f, r in zip(ordered, info) if f.anatomy == a])
        for a in analyzer.anatomies
    ]
    notes = _result_notes(pseudo)
    unscored = int(np.isnan(raw).sum())
    if unscored:
        notes.append(
            f"{unscored} of {raw.size} scan-finding pairs not scored: the finding's anatomy was absent or "
            "not scored in that scan (raw_score empty)."
        )
    meta = [{"anatomy": f.anatomy, **r.to_dict()} for f, r in zip(ordered, info)]
    for m in meta:
        for key in ("value", "probability", "raw_score", "flagged"):
            m.pop(key, None)
    return QueryResult(out, meta, notes)


def _columns(analyzer, ordered: Sequence, info: Sequence, raw: np.ndarray) -> dict[str, Any]:
    """The per-row columns (scan-major, ``n * F`` rows) as Arrow arrays: the finding's value on
    its scale (calibrated probability, else raw score), its thresholds and flag (``raw >
    threshold``, the reference's rule on the raw scale); empty where not scored."""
    n, nf = raw.shape
    prob = np.full((n, nf), np.nan)
    value = raw.copy()
    for j, (f, r) in enumerate(zip(ordered, info)):
        scored = ~np.isnan(raw[:, j])
        if r.calibrated and scored.any():
            prob[scored, j] = analyzer.calibration(f).apply(raw[scored, j])
            value[:, j] = prob[:, j]
    raw_thr = np.asarray([float(r.raw_threshold) for r in info])
    per_finding = np.tile(np.arange(nf, dtype=np.int32), n)

    def constant(values: Sequence[str]):
        return pa.DictionaryArray.from_arrays(per_finding, pa.array(list(values), pa.string()))

    def floats(a: np.ndarray):
        a = a.reshape(-1)
        return pa.array(a, pa.float64(), mask=np.isnan(a))

    return {
        "anatomy": constant([f.anatomy for f in ordered]),
        "finding": constant([f.name for f in ordered]),
        "scale": constant([r.scale for r in info]),
        "value": floats(value),
        "raw_score": floats(raw),
        "probability": floats(prob),
        "threshold": pa.array(np.tile(np.asarray([float(r.threshold) for r in info]), n)),
        "raw_threshold": pa.array(np.tile(raw_thr, n)),
        "threshold_source": constant([r.threshold_source for r in info]),
        "flagged": pa.array((np.nan_to_num(raw, nan=-np.inf) > raw_thr[None, :]).reshape(-1)),
        "calibration": constant([r.calibration for r in info]),
    }


def write_query(result: QueryResult, path) -> None:
    """Write the result table as CSV (empty cell: not scored) or Parquet (by the suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".parquet":
            pq.write_table(result.table, tmp)
        else:
            pcsv.write_csv(result.table, tmp)
