"""CT-CLIP's retrieval metrics, whole-scan and per anatomy, from an embedding store.

Definitions, read from CT-CLIP's public scripts (``scripts/report_to_volume.py`` and
``volume_to_volume.py`` with their ``*_new.py`` versions, ``src/ct_clip/scripts/volume_to_volume.py``):

* **report -> volume recall@k**: for each scan's report, all volumes are ranked by the dot product
  of the report's text embedding with their image embedding; a hit when the report's own volume
  is in the top ``k``; recall = hits / scans (k = 5, 10, 50, 100). The script also prints a
  random-vector baseline; the chance level is given here as ``k / N``.
* **volume -> volume MAP@k**: for each volume (the query), the candidates are the volumes with at
  least one positive label; the top ``k`` by cosine similarity are taken and each scores
  ``|both positive| / (|both positive| + |differ|)`` (the Jaccard index of the two positive label
  sets, its ``calc_similarity``); the query's mean over its ``k``, averaged over queries (k = 1,
  5, 10, 50). The script keeps the query itself among the candidates (its own top-1, score 1 when
  it has a positive label): ``map`` does so too; ``map_excluding_self`` leaves it out, which is
  what "similar *other* cases" means. The script also never resets its list of per-query means
  between values of ``k``, so the number it prints for ``k`` averages all the ``k`` up to it:
  ``map_ctclip_script`` reproduces that printout for comparison with published tables.

fVLM has no whole-volume embedding; per anatomy the embedding is the anatomy's and the text its
description from the report (fVLM's training pairs); **whole-scan** similarity is the mean over
the model's anatomies of the per-anatomy cosine similarities (an anatomy missing on either side
adds 0), for images and for report -> volume alike. Ties rank the lower index first, as the
scripts' stable sorts do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fvlm_core.store.format import embedding_matrix

REPORT_KS = (5, 10, 50, 100)
VOLUME_KS = (1, 5, 10, 50)
_BLOCK = 1024


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of each row of ``scores`` (B, N), best first, ties by index."""
    k = min(k, scores.shape[1])
    top = (
        np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if k < scores.shape[1]
        else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    )
    vals = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -vals), axis=1)
    return np.take_along_axis(top, order, axis=1)


def report_to_volume_recall(similarity: Any, n: int, ks: Sequence[int] = REPORT_KS) -> dict[str, float]:
    """Recall@k of report ``i`` finding volume ``i``: ``similarity(rows) -> (len(rows), n)``
    gives the report-volume scores of a block of reports (computed blockwise)."""
    ranks = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _BLOCK):
        rows = np.arange(lo, min(lo + _BLOCK, n))
        s = similarity(rows)
        own = s[np.arange(len(rows)), rows][:, None]
        before = (s > own) | ((s == own) & (np.arange(n)[None, :] < rows[:, None]))
        ranks[rows] = before.sum(axis=1)
    return {str(k): float(np.mean(ranks < k)) if n else float("nan") for k in ks}


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CT-CLIP's ``calc_similarity`` of label rows: ``|a & b| / (|a & b| + |a xor b|)``
    (``a`` (L,), ``b`` (M, L) 0/1; 0 where neither has a positive)."""
    both = (a[None, :] & b).sum(axis=1)
    differ = (a[None, :] ^ b).sum(axis=1)
    return np.where(both + differ > 0, both / np.maximum(both + differ, 1), 0.0)


def volume_to_volume_map(
    similarity: Any,
    labels: np.ndarray,
    queries: np.ndarray,
    ks: Sequence[int] = VOLUME_KS,
) -> dict[str, Any]:
    """MAP@k (module docstring) of volume retrieval.

    Args:
        similarity: ``similarity(rows, cols) -> (len(rows), len(cols))`` image-image scores.
        labels: ``(N, L)`` 0/1 ground truth of every scan.
        queries: indices of the query scans (candidates: those of them with a positive label).
    """
    labels = np.asarray(labels, dtype=bool)
    queries = np.asarray(queries, dtype=np.int64)
    cand = queries[labels[queries].any(axis=1)]
    out: dict[str, Any] = {"n_queries": len(queries), "n_candidates": len(cand)}
    if not len(cand) or not len(queries):
        return {**out, "map": {}, "map_excluding_self": {}, "map_ctclip_script": {}}
    kmax = max(ks)
    per_k = {k: [] for k in ks}
    per_k_ex = {k: [] for k in ks}
    for lo in range(0, len(queries), _BLOCK):
        q = queries[lo : lo + _BLOCK]
        s = np.asarray(similarity(q, cand), dtype=np.float64)
        top = _ranked(s, kmax + 1)
        for r, i in enumerate(q):
            ranked = cand[top[r]]
            score = jaccard(labels[i], labels[ranked])
            keep = ranked != i
            for k in ks:
                per_k[k].append(score[:k].mean())
                per_k_ex[k].append(score[keep][:k].mean() if keep.any() else np.nan)
    cumulative, acc = {}, []
    for k in ks:  # the script's list of per-query means is never reset between k
        acc += per_k[k]
        cumulative[str(k)] = float(np.mean(acc))
    return {
        **out,
        "map": {str(k): float(np.mean(per_k[k])) for k in ks},
        "map_excluding_self": {str(k): float(np.nanmean(per_k_ex[k])) for k in ks},
        "map_ctclip_script": cumulative,
    }


def _normalised(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def retrieval_metrics(
    images: Mapping[str, np.ndarray],
    texts: Mapping[str, np.ndarray],
    labels: np.ndarray,
    label_names: Sequence[str],
    anatomy_labels: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Both metrics per anatomy and whole-scan.

    Args:
        images: anatomy -> ``(N, D)`` embeddings of the N scans (rows of zeros: not scored).
        texts: anatomy -> ``(N, D)`` embeddings of each scan's description of it (zeros: none).
        labels: ``(N, L)`` 0/1 (NaN: missing) in ``label_names`` order.
        anatomy_labels: anatomy -> the labels of its findings (its MAP uses those).

    Scans missing a label used by a metric are left out of that metric (counted in ``n_left_out``).
    """
    names = list(images)
    img = {a: _normalised(images[a]) for a in names}
    txt = {a: _normalised(texts[a]) for a in names if a in texts}
    has_img = {a: np.linalg.norm(img[a], axis=1) > 0 for a in names}
    has_txt = {a: np.linalg.norm(txt[a], axis=1) > 0 for a in txt}
    labels = np.asarray(labels, dtype=float)
    n = len(labels)
    out: dict[str, Any] = {"report_to_volume": {}, "volume_to_volume": {}}

    def whole_images(rows, cols):
        return sum(img[a][rows] @ img[a][cols].T for a in names) / len(names)

    # report -> volume: scans with a text of at least one anatomy (whole scan) / of the anatomy
    with_text = np.flatnonzero(np.any([has_txt[a] for a in txt], axis=0)) if txt else np.zeros(0, int)
    if len(with_text):
        out["report_to_volume"]["whole_scan"] = _recall(
            lambda r: sum(txt[a][with_text[r]] @ img[a][with_text].T for a in txt) / len(names),
            len(with_text),
        )
    for a in txt:
        idx = np.flatnonzero(has_txt[a] & has_img[a])
        if len(idx):
            out["report_to_volume"][a] = _recall(
                lambda r, a=a, idx=idx: txt[a][idx[r]] @ img[a][idx].T, len(idx)
            )
    # volume -> volume
    col = {lbl: j for j, lbl in enumerate(label_names)}
    groups = {"whole_scan": (list(label_names), np.arange(n), whole_images)}
    for a in names:
        used = [lbl for lbl in anatomy_labels.get(a, ()) if lbl in col]
        if used:
            groups[a] = (used, np.flatnonzero(has_img[a]), lambda r, c, a=a: img[a][r] @ img[a][c].T)
    for key, (used, rows, sim) in groups.items():
        y = labels[:, [col[lbl] for lbl in used]]
        complete = rows[~np.isnan(y[rows]).any(axis=1)]
        res = volume_to_volume_map(sim, np.nan_to_num(y).astype(bool), complete)
        out["volume_to_volume"][key] = {"labels": used, "n_left_out": int(len(rows) - len(complete)), **res}
    return out


def _recall(similarity, n: int) -> dict[str, Any]:
    return {
        "n": n,
        "recall": report_to_volume_recall(similarity, n),
        "chance": {str(k): min(1.0, k / n) for k in REPORT_KS},
    }


def store_retrieval(
    store, analyzer, anatomy_labels: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """:func:`retrieval_metrics` of a store: its embeddings, its anatomy texts (encoded with
    ``analyzer``'s text encoder) and its labels. ``anatomy_labels`` default: the findings of the
    model on each anatomy."""
    table = store.table(["scored", "embedding", "text", "labels"])
    scans = store.scans()
    where = {s: i for i, s in enumerate(scans)}
    d = store.info.model.embed_dim
    anatomies = list(store.info.model.anatomies)
    n = len(scans)
    images = {a: np.zeros((n, d), dtype=np.float32) for a in anatomies}
    text_of: dict[str, list[str | None]] = {a: [None] * n for a in anatomies}
    truth: list[dict[str, Any]] = [{} for _ in range(n)]

    flat = embedding_matrix(table.column("embedding"), d)
    for r, (scan, anatomy, scored, text, lab) in enumerate(
        zip(*(table.column(c).to_pylist() for c in ("scan", "anatomy", "scored", "text", "labels")))
    ):
        i = where[scan]
        if scored:
            images[anatomy][i] = flat[r]
        text_of[anatomy][i] = text
        truth[i] = dict(lab or [])
    unique = sorted({t for a in anatomies for t in text_of[a] if t})
    vecs = analyzer.prompts.embed(unique).numpy() if unique else np.zeros((0, d), dtype=np.float32)
    row = {t: j for j, t in enumerate(unique)}
    texts = {}
    for a in anatomies:
        m = np.zeros((n, d), dtype=np.float32)
        for i, t in enumerate(text_of[a]):
            if t:
                m[i] = vecs[row[t]]
        texts[a] = m
    label_names = sorted({k for t in truth for k in t})
    y = np.array(
        [[np.nan if t.get(k) is None else float(t[k]) for k in label_names] for t in truth], dtype=float
    )
    if anatomy_labels is None:
        anatomy_labels = {}
        for f in analyzer.default_findings():
            anatomy_labels.setdefault(f.anatomy, []).append(f.name)
    out = retrieval_metrics(images, texts, y.reshape(n, len(label_names)), label_names, anatomy_labels)
    out["n_scans"] = n
    out["n_scans_with_texts"] = int(sum(any(text_of[a][i] for a in anatomies) for i in range(n)))
    return out
