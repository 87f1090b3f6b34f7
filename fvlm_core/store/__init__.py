"""Embed once, ask anything: a cohort's anatomy embeddings on disk, scored and searched later.

* :mod:`~fvlm_core.store.format`: the store (Parquet parts + ``store.json``), one model per store.
* :mod:`~fvlm_core.store.encode`: a scan's windows (CPU) and their embeddings (encoder), equal to
  the analyzer's.
* :mod:`~fvlm_core.store.query`: zero-shot findings over a whole store (only the text side runs).
* :mod:`~fvlm_core.store.search`: ranked scans for a text or a scan, exact or with a FAISS index.
* :mod:`~fvlm_core.store.retrieval`: CT-CLIP's retrieval metrics (report -> volume recall@k,
  volume -> volume MAP@k), per anatomy and whole-scan.

>>> from fvlm_core.store import EmbeddingStore, search_like
>>> store = EmbeddingStore.open("ctrate-valid.store")
>>> for m in search_like(store, "valid_1_a_1.nii.gz", "lung", k=5):
...     print(m.rank, m.scan, round(m.score, 3), m.source)

The names are imported on first use (:mod:`fvlm_core.lazy` says why).
"""

from __future__ import annotations

from fvlm_core.lazy import lazy_exports

_EXPORTS = {  # submodule -> the public names it defines
    "format": ("EmbeddingStore", "ModelIdentity", "StoreInfo", "StoreModelMismatch"),
    "encode": ("embed_ct", "prepare_windows", "encode_windows"),
    "query": ("query_store",),
    "search": ("Match", "search_like", "search_text"),
    "retrieval": ("retrieval_metrics",),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
