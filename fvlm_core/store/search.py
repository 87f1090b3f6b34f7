"""Ranked scans of a store for a text or for a scan, per anatomy.

The score is the cosine similarity of L2-normalised embeddings: anatomy embedding against the
text's embedding (``--text``, the model's text encoder, as a prompt is encoded) or against the
same anatomy's embedding of another scan (``--like``: a scan of the store, a CT on disk, or the
embeddings of an analysis in memory).

Exact search is one matrix-vector product and a partial sort; it stays the default up to
:data:`INDEX_CROSSOVER` vectors of one anatomy, the size above which an approximate index
answers faster on the machine it was measured on (``benchmarks/bench_store.py``). Above it, an
inverted-file index of FAISS (``IndexIVFFlat``, inner product) is built from the anatomy's
vectors once and kept in ``STORE/index/`` (rebuilt when the store's parts change); its recall@10
against exact search is measured by the same benchmark.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fvlm_core.anatomy import get_catalog
from fvlm_core.atomic import atomic_path, atomic_write_text, make_parents
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.io import read_ct
from fvlm_core.segmentation import get_backend

#: Vectors of one anatomy above which ``method="auto"`` uses the FAISS index. Measured
#: (benchmarks/bench_store.py, 2 loaded cores, 256 floats): exact search 1 ms at 10,000 vectors,
#: 48 ms at 100,000, 270 ms at 1,000,000; the index 0.1-1.8 ms with recall@10 0.99-1.0, built
#: once in 1.3 s / 3.7 s / 24 s. Up to here (CT-RATE's 50,188 volumes) exact search answers in
#: well under a tenth of a second and its first query costs no index build.
INDEX_CROSSOVER = 100_000
#: Inverted lists probed per query (recall@10 against exact search in the benchmark's JSON).
NPROBE = 32
INDEX_DIR = "index"
METHODS = ("auto", "exact", "index")


@dataclass(frozen=True)
class Match:
    """One ranked scan: ``rank`` from 1, ``score`` the cosine similarity, ``source`` its volume
    file (``reachable``: it exists on this machine, so it can be loaded), ``status`` of the anatomy."""

    rank: int
    scan: str
    anatomy: str
    score: float
    source: str | None = None
    reachable: bool = False
    status: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "scan": self.scan,
            "anatomy": self.anatomy,
            "score": round(float(self.score), 6),
            "source": self.source,
            "reachable": self.reachable,
            "status": self.status,
        }


def exact_top_k(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, scores)`` of the ``k`` rows of ``matrix`` (n, D) with the largest inner product
    with ``query`` (D,), best first (equal scores in index order).

    torch's matrix-vector product: numpy's multithreaded BLAS spun for 12 ms on 10,000 x 256 on
    the loaded 2-core machine where torch took 0.8 ms; above ~100,000 rows both are bound by
    reading the matrix (benchmarks/bench_store.py).
    """
    import torch

    k = min(int(k), len(matrix))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    with warnings.catch_warnings():  # a memory-mapped store is read-only; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    scores = m @ torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    vals, top = torch.topk(scores, k)
    vals, top = vals.numpy(), top.numpy()
    order = np.lexsort((top, -vals))
    return top[order].astype(np.int64), vals[order]


class VectorIndex:
    """A FAISS inverted-file index (inner product) over one anatomy's vectors.

    ``nlist`` lists of about ``sqrt(n)`` (1,000 for a million vectors), k-means trained on at most
    ``64 * nlist`` vectors; ``nprobe`` lists searched per query. (``4 * sqrt(n)`` lists took
    minutes to train on 2 cores at a million vectors for no better latency.)
    """

    def __init__(self, index: Any, nprobe: int = NPROBE) -> None:
        self.index = index
        self.index.nprobe = int(nprobe)

    @classmethod
    def build(cls, matrix: np.ndarray, nprobe: int = NPROBE, seed: int = 0) -> VectorIndex:
        faiss = _faiss()
        x = np.ascontiguousarray(matrix, dtype=np.float32)
        n, d = x.shape
        nlist = max(1, min(round(np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= 64 * nlist else x[rng.choice(n, 64 * nlist, replace=False)]
        index.cp.seed = seed
        index.train(sample)
        index.add(x)
        return cls(index, nprobe)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        scores, idx = self.index.search(q, int(k))
        keep = idx[0] >= 0
        return idx[0][keep].astype(np.int64), scores[0][keep]

    def save(self, path: str | os.PathLike) -> None:
        make_parents(Path(path))
        with atomic_path(path) as tmp:
            _faiss().write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, nprobe: int = NPROBE) -> VectorIndex:
        return cls(_faiss().read_index(str(path)), nprobe)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        from fvlm_core.errors import DependencyError

        raise DependencyError(
            "the approximate index needs FAISS: pip install faiss-cpu (or search exactly: --method exact)"
        ) from exc
    return faiss


def _fingerprint(store) -> list[list[Any]]:
    return [[p.name, p.stat().st_size] for p in store.parts]


def anatomy_index(store, anatomy: str, matrix: np.ndarray) -> VectorIndex:
    """The store's index of ``anatomy`` (built and kept in ``STORE/index/`` when missing or
    stale; kept in memory only when the store folder is read-only)."""
    base = store.path / INDEX_DIR / anatomy
    meta_path, index_path = base.with_suffix(".json"), base.with_suffix(".faiss")
    want = {"parts": _fingerprint(store), "n": len(matrix)}
    try:
        if json.loads(meta_path.read_text()) == want and index_path.is_file():
            return VectorIndex.load(index_path)
    except (OSError, ValueError):
        pass
    index = VectorIndex.build(matrix)
    try:
        index.save(index_path)
        atomic_write_text(meta_path, json.dumps(want))
    except OSError:
        pass  # a read-only store: the index serves this process only
    return index


def search_vectors(
    store,
    anatomy: str,
    query: np.ndarray,
    k: int = 10,
    method: str = "auto",
) -> list[Match]:
    """The ``k`` scans whose ``anatomy`` embedding is closest to ``query`` (``(D,)``, normalised here).

    ``method``: ``exact``, ``index`` (FAISS, see :class:`VectorIndex`) or ``auto`` (the index above
    :data:`INDEX_CROSSOVER` vectors).
    """
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if int(k) < 1:
        raise ConfigError(f"-k {k}: give at least 1.")
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != store.info.model.embed_dim:
        raise DataError(
            f"the query has {q.shape[0]} values; the store's embeddings have {store.info.model.embed_dim}"
        )
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0:
        raise DataError("the query embedding is zero or not finite: nothing to compare with.")
    q = q / norm
    store.require_scans()
    ids, matrix = store.vectors(anatomy)
    if not len(ids):
        raise DataError(f"{store.path}: no scan of the store has its {anatomy} scored; nothing to search.")
    use_index = method == "index" or (method == "auto" and len(ids) > INDEX_CROSSOVER)
    if use_index:
        idx, scores = anatomy_index(store, anatomy, matrix).search(q, k)
    else:
        idx, scores = exact_top_k(matrix, q, k)
    return _matches(store, anatomy, ids[idx], scores)


def _matches(store, anatomy: str, scans: np.ndarray, scores: np.ndarray) -> list[Match]:
    t = store.table(["source", "status"])
    t = t.filter(
        pc.and_(pc.equal(t.column("anatomy"), anatomy), pc.is_in(t.column("scan"), pa.array(list(scans))))
    )
    info = dict(
        zip(t.column("scan").to_pylist(), zip(t.column("source").to_pylist(), t.column("status").to_pylist()))
    )
    out = []
    for rank, (scan, score) in enumerate(zip(scans, scores), start=1):
        source, status = info.get(scan, (None, ""))
        out.append(
            Match(
                rank,
                str(scan),
                anatomy,
                float(score),
                source,
                bool(source and os.path.exists(source)),
                status,
            )
        )
    return out


def search_text(store, analyzer, text: str, anatomy: str, k: int = 10, method: str = "auto") -> list[Match]:
    """Scans whose ``anatomy`` is most like ``text`` ("Large right pleural effusion.")."""
    if not str(text).strip():
        raise ConfigError("--text is empty: give a description to search for.")
    store.check_anatomy(anatomy)
    vec = analyzer.prompts.embed([str(text)])[0].numpy()
    return search_vectors(store, anatomy, vec, k, method)


def search_like(
    store,
    query: Any,
    anatomy: str,
    k: int = 10,
    *,
    analyzer=None,
    segmentation: Any = "builtin",
    method: str = "auto",
) -> list[Match]:
    """Scans whose ``anatomy`` is most like the query's (the Slicer module's "Similar cases").

    Args:
        store: an :class:`~fvlm_core.store.format.EmbeddingStore`.
        query: a scan id of the store; a mapping anatomy -> ``(D,)`` embedding (or a
            :class:`~fvlm_core.store.encode.ScanEmbeddings`) computed with the store's model; or a
            CT on disk (file or DICOM folder), embedded with ``analyzer`` (the store's model,
            checked) and ``segmentation``: an :class:`~fvlm_core.segmentation.AnatomySegmentation`,
            a label map file, or a backend name (``builtin`` / ``totalsegmentator``).
        anatomy: which anatomy to compare.
        k: how many matches (the query scan itself ranks first when it is in the store).
        method: ``auto`` / ``exact`` / ``index`` (:func:`search_vectors`).

    Returns:
        :class:`Match` es, best first, with each match's volume path and whether it is reachable.
    """
    store.check_anatomy(anatomy)
    store.require_scans()
    vectors = getattr(query, "vectors", query)
    if isinstance(vectors, Mapping):
        if anatomy not in vectors:
            raise DataError(
                f"the query scan has no {anatomy} embedding (absent or not scored): nothing to compare."
            )
        return search_vectors(store, anatomy, vectors[anatomy], k, method)
    if isinstance(query, np.ndarray):
        return search_vectors(store, anatomy, query, k, method)
    key = str(query)
    ids, matrix = store.vectors(anatomy)
    hit = np.flatnonzero(ids == key)
    if len(hit):
        return search_vectors(store, anatomy, matrix[hit[0]], k, method)
    if key in set(store.scans()):
        raise DataError(f"{key}: its {anatomy} is absent or was not scored in the store; nothing to compare.")
    if not Path(key).exists():
        raise DataError(
            f"--like {key}: neither a scan of the store nor a CT file or folder. Give a scan id (`fvlm query` "
            "lists them) or the path of a CT."
        )
    if analyzer is None:
        raise ConfigError(f"--like {key} is a CT: embedding it needs the store's model (--model).")
    from fvlm_core.store.encode import embed_ct

    ct, seg = _read_and_segment(key, analyzer, segmentation)
    found = embed_ct(analyzer, ct, seg, store.info.windows)
    return search_like(store, found, anatomy, k, method=method)


def _read_and_segment(path: str, analyzer, segmentation: Any):
    """The CT at ``path`` and its anatomy segmentation (given, a label map file, or a backend)."""
    ct = read_ct(path)
    if hasattr(segmentation, "labelmap"):
        return ct, segmentation
    catalog = get_catalog(analyzer.anatomies)
    name = str(segmentation or "builtin")
    backend = (
        get_backend(name) if name in ("builtin", "totalsegmentator") else get_backend("labelmap", path=name)
    )
    return ct, backend.segment(ct, catalog)
