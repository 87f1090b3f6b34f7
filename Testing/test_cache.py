"""Model-space sample cache: exact round trip, completeness marker, torch Dataset and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_core.data.cache import (
    CachedDataset,
    CachedSample,
    collate_samples,
    is_complete,
    list_samples,
    load_sample,
    sample_paths,
    save_sample,
)
from fvlm_core.errors import DataError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.io import Geometry

ANAT = ["lung", "heart", "esophagus", "aorta"]


def _sample(name: str, shape=(10, 12, 14), seed=0, present=(1, 2, 3, 4)) -> CachedSample:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 2000, size=shape, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    for k, v in enumerate(present):
        labels[2 + k, 3:6, 4:8] = v
    geom = Geometry(
        size=shape[::-1],
        spacing=(1.5, 1.5, 3.0),
        origin=(-10.0, 5.0, -200.0),
        direction=tuple(np.eye(3).ravel()),
    )
    return CachedSample(
        name=name,
        hu=hu,
        labels=labels,
        geometry=geom,
        anatomies=ANAT,
        texts={a: f"{a} text {seed}" for a in ANAT},
        abnormal={"lung": True, "heart": False, "esophagus": False, "aorta": True},
        finding_labels={lbl: int(i % 3 == 0) for i, lbl in enumerate(CTRATE_LABELS)},
        report=f"whole report {seed}",
        meta={"split": "train", "model_space": {"hu_window": [-1000.0, 1000.0]}},
    )


def test_round_trip_is_exact(tmp_path):
    s = _sample("train_3_a_1")
    save_sample(s, tmp_path)
    assert is_complete(tmp_path, s.name)
    back = load_sample(tmp_path, s.name)
    np.testing.assert_array_equal(back.hu, s.hu)
    np.testing.assert_array_equal(back.labels, s.labels)
    assert back.hu.dtype == np.int16 and back.labels.dtype == np.uint8
    assert back.geometry == s.geometry
    assert (back.texts, back.abnormal, back.finding_labels, back.report) == (
        s.texts,
        s.abnormal,
        s.finding_labels,
        s.report,
    )
    assert back.scan_id == "train_3_a"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_incomplete_samples_are_not_listed(tmp_path):
    s = _sample("train_1_a_1")
    save_sample(s, tmp_path)
    tensors, sidecar = sample_paths(tmp_path, s.name)
    tensors.write_bytes(tensors.read_bytes()[:-10])  # truncated tensor file (e.g. disk full)
    assert not is_complete(tmp_path, s.name)
    sidecar.unlink()
    assert list_samples(tmp_path) == []
    with pytest.raises(DataError, match="no cached samples"):
        CachedDataset(tmp_path)


def test_save_refuses_mismatched_shapes(tmp_path):
    s = _sample("train_1_a_1")
    s.labels = s.labels[:-1]
    with pytest.raises(DataError, match="must be equal"):
        save_sample(s, tmp_path)


def test_dataset_items_and_batches(tmp_path):
    save_sample(_sample("train_1_a_1", seed=1), tmp_path)
    save_sample(_sample("train_1_a_2", seed=2), tmp_path)  # second reconstruction of scan train_1_a
    save_sample(_sample("train_2_a_1", shape=(8, 16, 12), seed=3, present=(1, 2)), tmp_path)
    assert len(CachedDataset(tmp_path, reconstruction="all")) == 3
    ds = CachedDataset(tmp_path, reconstruction="first", size_zyx=(8, 8, 8))
    assert len(ds) == 2  # one item per scan
    item = ds[1]
    assert item["name"] == "train_2_a_1"
    assert item["image"].shape == (1, 8, 8, 8) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["present"].tolist() == [True, True, False, False]
    assert item["abnormal"].tolist() == [True, False, False, True]
    assert item["finding_labels"].shape == (18,)
    assert item["texts"] == [f"{a} text 3" for a in ANAT]
    batch = collate_samples([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 8, 8, 8) and batch["labels"].shape == (2, 8, 8, 8)
    assert len(batch["texts"]) == 2 and len(batch["texts"][0]) == 4
    # Random reconstruction follows torch's seed.
    rnd = CachedDataset(tmp_path, reconstruction="random")
    torch.manual_seed(0)
    picks = {rnd[0]["name"] for _ in range(20)}
    assert picks == {"train_1_a_1", "train_1_a_2"}
    # Anatomy order can be changed: labels follow.
    sub = CachedDataset(tmp_path, reconstruction="all", anatomies=["heart", "lung"])
    it = sub[0]
    raw = load_sample(tmp_path, it["name"])
    np.testing.assert_array_equal(it["labels"].numpy() == 1, raw.labels == 2)
    assert it["texts"] == [raw.texts["heart"], raw.texts["lung"]]


def test_crop_keeps_anatomies_centered(tmp_path):
    s = _sample("valid_1_a_1", shape=(20, 30, 40))
    s.labels[:] = 0
    s.labels[15:18, 20:25, 30:36] = 1
    save_sample(s, tmp_path)
    item = CachedDataset(tmp_path, size_zyx=(8, 10, 12))[0]
    assert int(item["labels"].sum()) == 3 * 5 * 6  # the whole anatomy stays inside the crop
