"""Segmentation core: facts, cut-by-FOV rule, label-map backend inputs, grids (TotalSegmentator: test_totalseg*.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG
from fvlm_core.errors import ConfigError, GeometryError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, read_ct, read_label_map
from fvlm_core.segmentation import (
    AnatomySegmentation,
    compute_facts,
    get_backend,
)
from fvlm_core.segmentation.labelmap import LabelMapBackend
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP

LOBES = [10, 11, 12, 13, 14]


def _geometry(shape_zyx=(10, 12, 14), spacing=(0.5, 0.8, 2.5)) -> Geometry:
    return Geometry(
        size=(shape_zyx[2], shape_zyx[1], shape_zyx[0]),
        spacing=spacing,
        origin=(10.0, -20.0, 30.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


def test_facts_volume_in_ml_and_presence():
    g = _geometry()
    lm = np.zeros(g.shape_zyx, dtype=np.uint8)
    lm[2:5, 3:7, 4:9] = 2  # heart: 3*4*5 = 60 voxels, away from every face
    facts = compute_facts(lm, g, CTRATE_CATALOG)
    assert list(facts) == CTRATE_CATALOG.names
    heart = facts["heart"]
    assert heart.voxels == 60 and heart.present and not heart.cut_by_fov and heart.label == 2
    assert heart.volume_ml == pytest.approx(60 * 0.5 * 0.8 * 2.5 / 1000.0)
    assert not facts["lung"].present and facts["lung"].volume_ml == 0.0 and not facts["lung"].cut_by_fov
    assert heart.to_dict()["volume_ml"] == pytest.approx(0.06)


@pytest.mark.parametrize(
    "index",
    [(0, 5, 5), (-1, 5, 5), (4, 0, 5), (4, -1, 5), (4, 5, 0), (4, 5, -1)],
    ids=["z0", "zN", "y0", "yN", "x0", "xN"],
)
def test_cut_by_fov_when_mask_touches_any_face(index):
    g = _geometry()
    lm = np.zeros(g.shape_zyx, dtype=np.uint8)
    lm[3:6, 3:8, 3:8] = 1
    assert not compute_facts(lm, g, CTRATE_CATALOG)["lung"].cut_by_fov
    lm[index] = 1
    assert compute_facts(lm, g, CTRATE_CATALOG)["lung"].cut_by_fov


def test_segmentation_save_keeps_geometry_and_masks(tmp_path):
    g = _geometry()
    lm = np.zeros(g.shape_zyx, dtype=np.uint8)
    lm[2:4, 2:4, 2:4] = 4
    seg = AnatomySegmentation.from_labelmap(lm, g, CTRATE_CATALOG, "test", classes={"extra": lm > 0})
    assert seg.mask("aorta").sum() == 8 and seg.mask("extra").sum() == 8
    assert seg.present == ["aorta"]
    out = seg.save(tmp_path / "a.nii.gz")
    back = read_label_map(out)
    assert back.geometry.same_grid(g)
    np.testing.assert_array_equal(back.array, lm)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    summary = json.loads(json.dumps(seg.summary()))
    assert summary["anatomies"][3]["voxels"] == 8 and summary["extra_classes"]["extra"] > 0
    with pytest.raises(ConfigError):
        AnatomySegmentation.from_labelmap(lm + 10, g, CTRATE_CATALOG, "test")


@pytest.fixture(scope="module")
def small_ct(ts_dir) -> CTVolume:
    return read_ct(ts_dir / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def ts_seg(ts_dir) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ts_dir / "example_seg.nii.gz")))


def test_labelmap_backend_multilabel_file(ts_dir, small_ct, ts_seg):
    backend = get_backend("labelmap", path=ts_dir / "example_seg.nii.gz")
    assert backend.name == "labelmap"  # the backend asked for, by name
    seg = backend.segment(small_ct, EXTENDED_CATALOG)
    assert seg.geometry.same_grid(small_ct.geometry)
    assert seg.facts["lung"].voxels == np.isin(ts_seg, LOBES).sum()
    assert seg.facts["liver"].voxels == (ts_seg == 5).sum()
    # absent anatomies are reported absent, not an error
    assert not seg.facts["heart"].present and not seg.facts["urinary_bladder"].present
    assert seg.facts["liver"].volume_ml == pytest.approx((ts_seg == 5).sum() * 27 / 1000)


def test_labelmap_backend_mask_folder(tmp_path, small_ct, ts_seg):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for value in (5, 10, 14, 52, 79):  # liver, two lobes, aorta, spinal cord (not in catalog)
        img = small_ct.geometry.apply_to(sitk.GetImageFromArray((ts_seg == value).astype(np.uint8)))
        sitk.WriteImage(img, str(folder / f"{TOTAL_CLASS_MAP[value]}.nii.gz"))
    (folder / "notes.txt").write_text("not a mask")
    seg = LabelMapBackend(folder).segment(small_ct, EXTENDED_CATALOG)
    assert seg.facts["lung"].voxels == np.isin(ts_seg, [10, 14]).sum()
    assert seg.facts["aorta"].voxels == (ts_seg == 52).sum()
    assert seg.facts["liver"].voxels == (ts_seg == 5).sum()
    assert not seg.facts["spleen"].present


def test_labelmap_backend_any_labelmap_with_class_map(tmp_path, small_ct, ts_seg):
    custom = np.zeros_like(ts_seg)
    custom[np.isin(ts_seg, LOBES)] = 7
    custom[ts_seg == 52] = 3
    path = tmp_path / "custom.nrrd"
    sitk.WriteImage(small_ct.geometry.apply_to(sitk.GetImageFromArray(custom)), str(path))
    cmap = tmp_path / "classes.json"
    cmap.write_text(json.dumps({"7": "lung", "3": "aorta"}))  # anatomy names work as class names
    for class_map in (str(cmap), {7: "lung", 3: "aorta"}):
        seg = LabelMapBackend(path, class_map=class_map).segment(small_ct, CTRATE_CATALOG)
        assert seg.facts["lung"].voxels == np.isin(ts_seg, LOBES).sum()
        assert seg.facts["aorta"].voxels == (ts_seg == 52).sum()
    # a label map already in anatomy values needs no class map
    anat = np.where(custom == 7, 1, np.where(custom == 3, 4, 0)).astype(np.uint8)
    path2 = tmp_path / "anatomy.nii.gz"
    sitk.WriteImage(small_ct.geometry.apply_to(sitk.GetImageFromArray(anat)), str(path2))
    seg = LabelMapBackend(path2).segment(small_ct, CTRATE_CATALOG)
    np.testing.assert_array_equal(seg.labelmap, anat)
    with pytest.raises(InputError, match="class-map"):
        LabelMapBackend(path, class_map="anatomy").segment(small_ct, CTRATE_CATALOG)
    with pytest.raises(InputError):
        LabelMapBackend(path, class_map=str(tmp_path / "missing.json"))


def test_labelmap_on_other_grid_is_resampled_by_geometry(tmp_path, ts_dir, small_ct, ts_seg):
    # put the reference segmentation on a finer, shifted, cropped grid in the same physical space
    src = sitk.ReadImage(str(ts_dir / "example_seg.nii.gz"))
    fine = sitk.Image([int(s * 2) for s in src.GetSize()], src.GetPixelID())
    fine.SetSpacing([s / 2 for s in src.GetSpacing()])
    fine.SetDirection(src.GetDirection())
    fine.SetOrigin(src.TransformContinuousIndexToPhysicalPoint([-0.25, -0.25, -0.25]))
    fine = sitk.Resample(src, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    path = tmp_path / "fine.nii.gz"
    sitk.WriteImage(fine, str(path))
    seg = LabelMapBackend(path).segment(small_ct, CTRATE_CATALOG)
    ref = np.isin(ts_seg, LOBES)
    got = seg.mask("lung")
    dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
    assert seg.geometry.same_grid(small_ct.geometry)
    assert dice > 0.97


def test_labelmap_that_does_not_overlap_is_an_error(ts_dir, small_ct):
    with pytest.raises(GeometryError, match="does not overlap"):
        LabelMapBackend(ts_dir / "chest_heart.nii.gz").segment(small_ct, CTRATE_CATALOG)
    with pytest.raises(InputError, match="not found"):
        LabelMapBackend(ts_dir / "nope.nii.gz").segment(small_ct, CTRATE_CATALOG)


def test_get_backend_errors():
    with pytest.raises(ConfigError, match="unknown segmentation backend"):
        get_backend("magic")
    with pytest.raises(ConfigError, match="--labelmap"):
        get_backend("labelmap")


def test_labelmap_with_fractional_values_is_rejected(tmp_path, small_ct):
    arr = np.zeros(small_ct.geometry.shape_zyx, dtype=np.float32)
    arr[10, 50, 50] = 0.5  # a probability map, not labels
    path = tmp_path / "prob.nii.gz"
    sitk.WriteImage(small_ct.geometry.apply_to(sitk.GetImageFromArray(arr)), str(path))
    with pytest.raises(InputError, match="non-integer"):
        LabelMapBackend(path).segment(small_ct, CTRATE_CATALOG)


def test_class_map_embedded_by_totalsegmentator_is_used(tmp_path, ts_dir, small_ct, ts_seg):
    import nibabel as nib

    from fvlm_core.segmentation.labelmap import embedded_class_map

    assert embedded_class_map(ts_dir / "example_seg.nii.gz") == TOTAL_CLASS_MAP
    assert embedded_class_map(ts_dir / "chest_heart.nii.gz") is None
    # a TotalSegmentator file holding only spleen (1) and kidneys (2, 3): its values fit in the
    # CT-RATE catalog's range, so only the embedded label table tells it is not anatomy values
    src = nib.load(str(ts_dir / "example_seg.nii.gz"))
    data = np.asarray(src.dataobj)
    few = np.where(np.isin(data, [1, 2, 3]), data, 0).astype(np.uint8)
    img = nib.Nifti1Image(few, src.affine, src.header)
    path = tmp_path / "few.nii.gz"
    nib.save(img, str(path))
    assert embedded_class_map(path) == TOTAL_CLASS_MAP
    seg = LabelMapBackend(path).segment(small_ct, EXTENDED_CATALOG)
    assert seg.facts["spleen"].voxels == (ts_seg == 1).sum() > 0
    assert seg.facts["kidney"].voxels == np.isin(ts_seg, [2, 3]).sum()
    assert not seg.facts["lung"].present and not seg.facts["heart"].present
