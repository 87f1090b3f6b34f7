"""CT-RATE layout reader: a synthetic cohort loads unchanged; malformed tables fail clearly."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm_core.data import synth
from fvlm_core.data.ctrate import CTRATEReader, make_segmenter
from fvlm_core.errors import DataError, InputError

SIZE = (24, 32, 40)  # anisotropic on purpose: z, y, x must not be mixed up


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ctrate") / "cohort"
    synth.generate_cohort(root, 5, seed=21, size_zyx=SIZE, recon_fraction=0.6)
    return root


@pytest.fixture()
def copy(cohort, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cohort, dst)
    return dst


def _rewrite_csv(path: Path, edit) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows, columns = edit(rows, list(rows[0]))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def test_reader_loads_synthetic_cohort_unchanged(cohort):
    expected = {s.name: s for s in synth.iter_cohort(5, seed=21, size_zyx=SIZE, recon_fraction=0.6)}
    for split in ("train", "valid"):
        reader = CTRATEReader(cohort, split)
        assert not reader.skipped
        assert reader.has_labels
        names = {r.name for r in reader.records}
        assert names == {n for n, s in expected.items() if s.split == split}
        for rec in reader.records:
            ct = reader.read_ct(rec)
            want = expected[rec.name]
            # Geometry comes from the metadata CSV (the NIfTI header has unit spacing at 0).
            assert ct.geometry.same_grid(want.geometry, tol=1e-6)
            assert ct.array.shape == SIZE
            # HU = stored + RescaleIntercept exactly.
            np.testing.assert_array_equal(ct.array, want.hu.astype(np.float32))
            assert rec.labels == want.label_row
            assert rec.report["Findings_EN"] == want.report["Findings_EN"]
    scans = CTRATEReader(cohort, "train").scans
    assert any(len(v) == 2 for v in scans.values()), "second reconstructions are grouped under their scan"
    assert all(r.scan_id == sid for sid, recs in scans.items() for r in recs)


def test_masks_from_layout_map_to_catalog(cohort):
    from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG

    reader = CTRATEReader(cohort, "train")
    rec = reader.records[0]
    ct = reader.read_ct(rec)
    want = next(s for s in synth.iter_cohort(5, seed=21, size_zyx=SIZE) if s.name == rec.name)
    lab4 = make_segmenter("labelmap", CTRATE_CATALOG, masks_dir=reader.masks_dir)(ct, rec)
    np.testing.assert_array_equal(lab4, np.where(want.labels == 5, 0, want.labels))  # trachea not in CT-RATE
    ext = EXTENDED_CATALOG.subset(["lung", "trachea"])
    lab2 = make_segmenter("labelmap", ext, masks_dir=reader.masks_dir)(ct, rec)
    assert set(np.unique(lab2)) == {0, 1, 2}
    np.testing.assert_array_equal(lab2 == 2, want.labels == 5)


def test_missing_csv_is_named(copy):
    (copy / "metadata" / "train_metadata.csv").unlink()
    with pytest.raises(DataError, match=r"train_metadata\.csv"):
        CTRATEReader(copy, "train")
    (copy / "radiology_text_reports" / "validation_reports.csv").unlink()
    with pytest.raises(DataError, match=r"validation_reports\.csv"):
        CTRATEReader(copy, "valid")
    assert CTRATEReader(copy, "valid", require_reports=False).records  # reports optional on request


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("metadata/train_metadata.csv", "ZSpacing"),
        ("radiology_text_reports/train_reports.csv", "Findings_EN"),
        ("multi_abnormality_labels/train_predicted_labels.csv", "Lung nodule"),
    ],
)
def test_missing_column_is_named(copy, table, column):
    _rewrite_csv(copy / table, lambda rows, cols: (rows, [c for c in cols if c != column]))
    with pytest.raises(DataError, match=column) as err:
        CTRATEReader(copy, "train")
    assert Path(table).name in str(err.value)


def test_duplicate_volume_names(copy):
    _rewrite_csv(copy / "metadata/train_metadata.csv", lambda rows, cols: ([*rows, rows[0]], cols))
    first = None
    with open(copy / "metadata/train_metadata.csv") as fh:
        first = next(csv.DictReader(fh))["VolumeName"].removesuffix(".nii.gz")
    with pytest.raises(DataError, match=f"more than once: {first}"):
        CTRATEReader(copy, "train")


def test_listed_but_missing_volume_is_skipped_and_counted(copy):
    reader = CTRATEReader(copy, "train")
    victim = reader.records[1]
    victim.path.unlink()
    _rewrite_csv(
        copy / "radiology_text_reports/train_reports.csv",
        lambda rows, cols: (
            [r for r in rows if not r["VolumeName"].startswith(reader.records[0].name)],
            cols,
        ),
    )
    again = CTRATEReader(copy, "train")
    skipped = dict(again.skipped)
    assert victim.name in skipped and "no file" in skipped[victim.name]
    assert reader.records[0].name in skipped and "report" in skipped[reader.records[0].name]
    assert len(again.records) == len(reader.records) - 2


def test_corrupt_volume_raises_input_error(copy):
    reader = CTRATEReader(copy, "train")
    rec = reader.records[0]
    data = rec.path.read_bytes()
    rec.path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(InputError, match=rec.path.name):
        reader.read_ct(rec)


def test_prepared_cache_one_item_per_scan_and_robust(copy, tmp_path):
    """The layout -> `fvlm prepare` -> the cache reader: one item per scan; a corrupt
    reconstruction fails alone and its scan is read from the other one."""
    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.data.cache import CacheSamples
    from fvlm_core.data.prepare import prepare_dataset
    from fvlm_core.data.samples import AugmentConfig, TrainingSamples
    from fvlm_core.preprocess import ModelSpaceConfig

    cfg = ModelSpaceConfig(
        spacing_zyx=synth.default_spacing_zyx(SIZE), window_size_zyx=SIZE, multiple_zyx=(8, 8, 8)
    )
    reader = CTRATEReader(copy, "train")
    sid = next(s for s, recs in reader.scans.items() if len(recs) == 2)
    bad, good = reader.scans[sid]
    bad.path.write_bytes(bad.path.read_bytes()[:100])
    cache = tmp_path / "cache"
    summary = prepare_dataset(copy, cache, config=cfg, progress=False)
    assert [f["name"] for f in summary.failed] == [bad.name] and bad.path.name in summary.failed[0]["error"]
    samples = CacheSamples(cache, reconstruction="first")
    assert len(samples) == len(reader.scans) < len(reader.records)  # scans, not reconstructions
    firsts = [samples[i].name for i in range(len(samples))]
    assert good.name in firsts and bad.name not in firsts
    items = TrainingSamples(samples, CTRATE_CATALOG.names, {}, AugmentConfig(crop_size=SIZE), seed=0)
    item = items[(firsts.index(good.name), 0, 0)]
    assert item["name"] == good.name and item["image"].shape == (1, *SIZE)
    assert item["labels"].dtype == torch.uint8 and len(item["texts"]) == 4
