"""Model-space sample cache: exact round trip, completeness marker, the cache reader, training items
and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlm_core.anatomy import get_catalog
from fvlm_core.data.cache import (
    CachedSample,
    CacheSamples,
    is_complete,
    list_samples,
    load_sample,
    sample_paths,
    save_sample,
)
from fvlm_core.data.samples import AugmentConfig, TrainingSamples, collate, dataset_texts, make_item
from fvlm_core.errors import DataError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.geometry import Geometry
from fvlm_core.loss import UNKNOWN_FINDING_SET, finding_set_id, stable_text_id

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
        CacheSamples(tmp_path)


def test_save_refuses_mismatched_shapes(tmp_path):
    s = _sample("train_1_a_1")
    s.labels = s.labels[:-1]
    with pytest.raises(DataError, match="must be equal"):
        save_sample(s, tmp_path)


def _three_volumes(cache) -> None:
    save_sample(_sample("train_1_a_1", seed=1), cache)
    save_sample(_sample("train_1_a_2", seed=2), cache)  # second reconstruction of scan train_1_a
    save_sample(_sample("train_2_a_1", shape=(8, 16, 12), seed=3, present=(1, 2)), cache)


def test_reader_groups_reconstructions_by_scan(tmp_path):
    _three_volumes(tmp_path)
    assert len(CacheSamples(tmp_path, reconstruction="all")) == 3
    first = CacheSamples(tmp_path, reconstruction="first")
    assert len(first) == 2  # one item per scan
    assert [first[i].name for i in range(2)] == ["train_1_a_1", "train_2_a_1"]
    # A random reconstruction follows the generator it is given.
    rnd = CacheSamples(tmp_path, reconstruction="random")
    picks = [rnd.load(0, np.random.default_rng(s)).name for s in range(20)]
    assert set(picks) == {"train_1_a_1", "train_1_a_2"}
    assert picks == [rnd.load(0, np.random.default_rng(s)).name for s in range(20)]
    assert rnd.load(1, np.random.default_rng(0)).name == "train_2_a_1"
    # Texts for the text encoder, from the JSON sidecars, the same as from the samples.
    assert sorted(rnd.texts()) == sorted(
        t for n in list_samples(tmp_path) for t in load_sample(tmp_path, n).texts.values()
    )
    assert sorted(dataset_texts(rnd, reports=True)) == ["whole report 1", "whole report 2", "whole report 3"]
    assert dataset_texts([load_sample(tmp_path, "train_2_a_1")]) == [f"{a} text 3" for a in ANAT]
    with pytest.raises(DataError, match="reconstruction"):
        CacheSamples(tmp_path, reconstruction="last")


def test_items_and_batches(tmp_path):
    _three_volumes(tmp_path)
    cache = CacheSamples(tmp_path, reconstruction="first")
    augment = AugmentConfig(
        crop_size=(8, 12, 12), random_crop=False, flip_prob=0.0, hu_window=(-1000.0, 1000.0)
    )
    finding_anatomy = {CTRATE_LABELS[0]: "aorta", CTRATE_LABELS[3]: "lung"}  # labels 0 and 3 are positive
    item = make_item(cache[1], get_catalog(ANAT), finding_anatomy, augment, np.random.default_rng(0))
    assert item["name"] == "train_2_a_1"
    assert item["image"].shape == (1, 8, 12, 12) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["labels"].shape == (8, 12, 12) and item["labels"].dtype == torch.uint8
    assert item["present"].tolist() == [True, True, False, False]  # anatomies 3 and 4 are not in the volume
    assert item["abnormal"].tolist() == [True, False, False, True]
    assert item["texts"] == [f"{a} text 3" for a in ANAT] and item["report"] == "whole report 3"
    assert item["text_ids"].tolist() == [stable_text_id(t) for t in item["texts"]]
    assert item["finding_ids"].tolist() == [
        finding_set_id({CTRATE_LABELS[3]}),
        UNKNOWN_FINDING_SET,
        UNKNOWN_FINDING_SET,
        finding_set_id({CTRATE_LABELS[0]}),
    ]
    ds = TrainingSamples(cache, ANAT, finding_anatomy, augment, seed=0)
    batch = collate([ds[(0, 0, 0)], ds[(1, 0, 1)]])
    assert batch["size"] == 2 and batch["failed"] == 0 and batch["names"] == ["train_1_a_1", "train_2_a_1"]
    assert batch["image"].shape == (2, 1, 8, 12, 12) and batch["labels"].shape == (2, 8, 12, 12)
    assert batch["present"].shape == batch["text_ids"].shape == batch["finding_ids"].shape == (2, 4)
    assert len(batch["texts"]) == 2 and len(batch["texts"][0]) == 4 and len(batch["reports"]) == 2


def test_items_follow_the_model_anatomy_order(tmp_path):
    _three_volumes(tmp_path)
    raw = load_sample(tmp_path, "train_1_a_1")
    augment = AugmentConfig(crop_size=raw.hu.shape, random_crop=False, flip_prob=0.0)
    it = make_item(raw, get_catalog(["heart", "lung"]), {}, augment, np.random.default_rng(0))
    np.testing.assert_array_equal(it["labels"].numpy() == 1, raw.labels == 2)
    np.testing.assert_array_equal(it["labels"].numpy() == 2, raw.labels == 1)
    assert set(np.unique(it["labels"].numpy())) == {0, 1, 2}  # esophagus and aorta are not model anatomies
    assert it["texts"] == [raw.texts["heart"], raw.texts["lung"]]


def test_training_reconstruction_is_drawn_per_epoch_and_reproducible(tmp_path):
    _three_volumes(tmp_path)
    augment = AugmentConfig(crop_size=(8, 8, 8), flip_prob=0.5)
    ds = TrainingSamples(CacheSamples(tmp_path), ANAT, {}, augment, seed=4)
    names = [ds[(0, epoch, 0)]["name"] for epoch in range(16)]
    assert set(names) == {"train_1_a_1", "train_1_a_2"}
    again = TrainingSamples(CacheSamples(tmp_path), ANAT, {}, augment, seed=4)
    for epoch in range(4):
        a, b = ds[(0, epoch, 3)], again[(0, epoch, 3)]
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"])
    # the crop and flips of a scan do not depend on how many reconstructions it has
    single = TrainingSamples([load_sample(tmp_path, n) for n in names[:1]], ANAT, {}, augment, seed=4)
    assert torch.equal(single[(0, 0, 0)]["image"], ds[(0, 0, 0)]["image"])


def test_unusable_sample_gives_a_failed_record(tmp_path, caplog):
    _three_volumes(tmp_path)
    bad = load_sample(tmp_path, "train_2_a_1")
    bad.labels = bad.labels[0]
    ds = TrainingSamples([bad], ANAT, {}, AugmentConfig(crop_size=(8, 8, 8)), seed=0)
    item = ds[(0, 0, 0)]
    assert item["failed"] and item["name"] == "train_2_a_1" and "(Z, Y, X)" in item["error"]
    assert "train_2_a_1" in caplog.text
    assert collate([item])["failed_names"] == ["train_2_a_1"]
