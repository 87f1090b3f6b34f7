"""CT-CLIP's retrieval metrics (fvlm_core.store.retrieval) against hand-computed values and a
plain loop written from the definitions in CT-CLIP's scripts (report_to_volume*.py,
volume_to_volume*.py): stable sort by score, top k, Jaccard of the positive labels, candidates
with a positive label, and the script's list of per-query means never reset between k."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm_core.store.retrieval import (
    jaccard,
    report_to_volume_recall,
    retrieval_metrics,
    volume_to_volume_map,
)


def test_recall_hand_computed_with_ties_to_the_lower_index():
    s = np.array([[0.9, 0.1, 0.5], [0.95, 0.2, 0.1], [0.3, 0.3, 0.3]])
    # own volume ranks 0, 1 (0.95 beats it) and 2 (ties with 0 and 1, which come first)
    got = report_to_volume_recall(lambda rows: s[rows], 3, ks=(1, 2, 3))
    assert got == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3), "3": 1.0}


def _script_map(sim: np.ndarray, labels: np.ndarray, ks) -> tuple[list[float], list[float]]:
    """CT-CLIP's volume_to_volume loop, written out: per k the mean over queries of the mean
    Jaccard index of the top k candidates (a volume with a positive label), and the printout of
    the script, whose list of per-query means carries over from one k to the next."""
    cand = [j for j in range(len(labels)) if labels[j].sum() > 0]
    per_k, printed, carried = [], [], []
    for k in ks:
        means = []
        for i in range(len(labels)):
            order = sorted(range(len(cand)), key=lambda c: -sim[i, cand[c]])[:k]  # stable: ties by index
            ratios = []
            for c in order:
                a, b = labels[i], labels[cand[c]]
                both, differ = int(((a == 1) & (b == 1)).sum()), int((a != b).sum())
                ratios.append(both / (both + differ))
            means.append(np.mean(ratios))
        per_k.append(float(np.mean(means)))
        carried += means
        printed.append(float(np.mean(carried)))
    return per_k, printed


def test_map_hand_computed_and_equal_to_the_scripts_loop():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)
    sim = np.array([[1.0, 0.8, 0.9, 0.1], [0.8, 1.0, 0.2, 0.3], [0.5, 0.4, 1.0, 0.45], [0.1, 0.3, 0.6, 1.0]])
    got = volume_to_volume_map(lambda r, c: sim[np.ix_(r, c)], labels, np.arange(4), ks=(1, 2))
    assert got["n_candidates"] == 3  # scan 2 has no positive label
    # query 0: candidates ranked 0 (J=1), 1 (J=1/2), 3 (J=0); query 2 (no positives): J=0 always
    assert got["map"]["1"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert got["map"]["2"] == pytest.approx((0.75 + 0.75 + 0 + 0.5) / 4)
    # without the query itself: query 0 -> 1 (1/2), 3 (0); query 1 -> 0 (1/2), 3 (0); query 3 -> 1, 0 (0)
    assert got["map_excluding_self"]["1"] == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    per_k, printed = _script_map(sim, labels.astype(int), (1, 2))
    assert [got["map"][k] for k in ("1", "2")] == pytest.approx(per_k)
    assert [got["map_ctclip_script"][k] for k in ("1", "2")] == pytest.approx(printed)
    assert jaccard(labels[1], labels[[0, 3]]).tolist() == [0.5, 0.0]


def test_random_store_matches_the_scripts_loop_and_whole_scan_averages_anatomies():
    rng = np.random.default_rng(0)
    n, d = 40, 8
    images = {a: rng.normal(size=(n, d)).astype(np.float32) for a in ("lung", "heart")}
    images["heart"][3] = 0  # heart not scored in scan 3
    texts = {a: v + 0.5 * rng.normal(size=v.shape).astype(np.float32) for a, v in images.items()}
    labels = (rng.random((n, 3)) < 0.3).astype(float)
    labels[5, 1] = np.nan  # missing: scan 5 leaves the metrics that use label b
    out = retrieval_metrics(images, texts, labels, ["a", "b", "c"], {"lung": ["a"], "heart": ["b", "c"]})
    unit = {k: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for k, v in images.items()}
    whole = (unit["lung"] @ unit["lung"].T + unit["heart"] @ unit["heart"].T) / 2
    keep = [i for i in range(n) if i != 5]
    per_k, printed = _script_map(whole[np.ix_(keep, keep)], labels[keep].astype(int), (1, 5, 10, 50))
    v = out["volume_to_volume"]["whole_scan"]
    assert v["n_left_out"] == 1 and list(v["map"].values()) == pytest.approx(per_k)
    assert list(v["map_ctclip_script"].values()) == pytest.approx(printed)
    assert out["volume_to_volume"]["heart"]["n_queries"] == n - 2  # not scored in 3, label missing in 5
    assert out["volume_to_volume"]["lung"]["labels"] == ["a"]
    r = out["report_to_volume"]
    assert r["heart"]["n"] == n - 1 and r["lung"]["recall"]["5"] > r["lung"]["chance"]["5"]
