"""Built-in classical segmenter against TotalSegmentator reference label maps (issue 2 bars).

Reference classes: lungs = the five TotalSegmentator lobes; bone = vertebrae, ribs, sternum,
sacrum, hips, femurs, humeri, scapulae, claviculae, skull (bone tissue). The catalog's "bone"
also holds TotalSegmentator's costal cartilages; Dice against that definition is checked too.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest

from fvlm_core.anatomy import EXTENDED_CATALOG
from fvlm_core.io import CTVolume, Geometry, read_ct, read_label_map
from fvlm_core.segmentation import TOTAL_CLASS_MAP, BuiltinBackend, segment_masks

BONE_PATTERNS = ("vertebrae_*", "rib_*", "sternum", "sacrum", "hip_*", "femur_*", "humerus_*", "scapula_*")
BONE_PATTERNS += ("clavicula_*", "skull")
BONE = [v for v, c in TOTAL_CLASS_MAP.items() if any(fnmatch.fnmatchcase(c, p) for p in BONE_PATTERNS)]
COSTAL_CARTILAGES = 117
LEFT_LUNG = [10, 11]
RIGHT_LUNG = [12, 13, 14]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


@pytest.fixture(
    scope="module", params=[("example_ct_sm", "example_seg"), ("example_ct", "example_seg_fast_force_split")]
)
def case(request, ts_dir):
    ct_name, seg_name = request.param
    ct = read_ct(ts_dir / f"{ct_name}.nii.gz")
    ref = read_label_map(ts_dir / f"{seg_name}.nii.gz", reference=ct.geometry).array
    return ct_name, ct, ref, segment_masks(ct.array, ct.geometry)


def test_lung_dice_against_totalsegmentator(case):
    name, _, ref, masks = case
    lungs = masks["lung_left"] | masks["lung_right"]
    assert dice(lungs, np.isin(ref, LEFT_LUNG + RIGHT_LUNG)) >= 0.85, name
    # sides come from the affine: patient-left lung vs TotalSegmentator's left lobes
    assert dice(masks["lung_left"], np.isin(ref, LEFT_LUNG)) >= 0.85, name
    assert dice(masks["lung_right"], np.isin(ref, RIGHT_LUNG)) >= 0.85, name
    # bowel gas is not lung
    bowel = np.isin(ref, [6, 18, 19, 20])  # stomach, small bowel, duodenum, colon
    assert np.count_nonzero(lungs & bowel) < 0.01 * np.count_nonzero(lungs)


def test_bone_dice_against_totalsegmentator(case):
    name, _, ref, masks = case
    assert dice(masks["bone"], np.isin(ref, BONE)) >= 0.80, name
    assert dice(masks["bone"], np.isin(ref, [*BONE, COSTAL_CARTILAGES])) >= 0.80, name


def test_orientation_comes_from_the_geometry(case):
    """Mirroring the array left-right and its affine describes the same patient: same result."""
    _, ct, _, masks = case
    g = ct.geometry
    d = g.direction_matrix.copy()
    flipped_origin = g.index_zyx_to_ras([0, 0, g.size[0] - 1]) * np.array([-1, -1, 1])  # LPS of new voxel 0
    d[:, 0] *= -1
    g2 = Geometry(g.size, g.spacing, tuple(flipped_origin), tuple(d.reshape(-1)))
    m2 = segment_masks(ct.array[:, :, ::-1].copy(), g2)
    for key in ("lung_left", "lung_right", "bone"):
        np.testing.assert_array_equal(m2[key][:, :, ::-1], masks[key])


@pytest.fixture(scope="module")
def chest(ts_dir):
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    heart = read_label_map(ts_dir / "chest_heart.nii.gz", reference=ct.geometry).array > 0
    return ct, heart, BuiltinBackend().segment(ct, EXTENDED_CATALOG)


def test_chest_two_plausible_lungs_outside_the_heart(chest):
    ct, heart, seg = chest
    vml = ct.geometry.voxel_volume_ml
    for side in ("lung_left", "lung_right"):
        m = seg.classes[side]
        litres = np.count_nonzero(m) * vml / 1000.0
        assert 1.0 <= litres <= 4.0, (side, litres)
        assert np.count_nonzero(m & heart) < 0.01 * np.count_nonzero(m), side
    # patient-left lung lies at larger LPS x (patient left) than the right lung
    xs = {}
    for side in ("lung_left", "lung_right"):
        idx = np.argwhere(seg.classes[side])[::50]
        xs[side] = ct.geometry.index_zyx_to_ras(idx)[:, 0].mean()
    assert xs["lung_left"] < xs["lung_right"]  # RAS x grows to the patient's right


def test_chest_trachea_is_not_lung(chest):
    ct, _, seg = chest
    airways = seg.classes["airways"]
    litres = np.count_nonzero(airways) * ct.geometry.voxel_volume_ml
    assert 5.0 < litres < 150.0  # trachea + main bronchi, in ml
    lung = seg.mask("lung")
    assert not np.any(lung & airways)
    # the topmost slices of the scan hold the trachea only (neck): no lung there
    top = ct.geometry.shape_zyx[0] - 1  # chest_ct is LPS, z grows to superior
    assert np.count_nonzero(lung[top]) == 0 and np.count_nonzero(airways[top - 5]) > 0
    # both main bronchi are followed: the airway reaches >= 25 mm to each side of the trachea
    top_idx = np.argwhere(airways[top])
    trachea_x = ct.geometry.index_zyx_to_ras(np.c_[np.full(len(top_idx), top), top_idx])[:, 0].mean()
    x = ct.geometry.index_zyx_to_ras(np.argwhere(airways))[:, 0]
    assert x.min() < trachea_x - 25 and x.max() > trachea_x + 25


def test_builtin_backend_fills_catalog_and_reports_absent(chest):
    ct, _, seg = chest
    assert seg.backend == "builtin" and seg.geometry.same_grid(ct.geometry)
    assert seg.facts["lung"].present and seg.facts["bone"].present
    assert not seg.facts["liver"].present and seg.facts["liver"].volume_ml == 0.0
    assert set(seg.classes) == {"body", "lung_left", "lung_right", "airways", "bone"}
    lung = seg.classes["lung_left"] | seg.classes["lung_right"]
    np.testing.assert_array_equal(seg.mask("lung"), lung)


def test_builtin_on_a_volume_without_air_or_bone():
    g = Geometry((20, 20, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    hu = np.full(g.shape_zyx, -1000.0, dtype=np.float32)
    hu[:, 4:16, 4:16] = 40.0  # a water cylinder: body, no lungs, no bone
    seg = BuiltinBackend().segment(CTVolume(hu, g), EXTENDED_CATALOG)
    assert seg.present == []
    assert seg.classes["body"].sum() == 10 * 12 * 12


def _two_lung_phantom(junction: bool) -> CTVolume:
    """Water body with two noisy -850 HU lungs (LPS grid: x index grows to the patient's left)."""
    g = Geometry((120, 100, 60), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    z, y, x = np.ogrid[:60, :100, :120]
    hu = np.full(g.shape_zyx, -1000.0, np.float32)
    body = ((y - 50) / 40.0) ** 2 + ((x - 60) / 55.0) ** 2 <= 1
    hu[:, body[0]] = 40.0
    rng = np.random.default_rng(0)
    for cx in (35, 85):
        lung = ((z - 30) / 25.0) ** 2 + ((y - 50) / 25.0) ** 2 + ((x - cx) / 20.0) ** 2 <= 1
        hu[lung] = -850.0 + rng.normal(0, 30, size=int(lung.sum()))
    if junction:
        hu[10:50, 28:34, 50:71] = -850.0  # the lungs touch in front (anterior junction line)
    return CTVolume(hu, g)


@pytest.mark.parametrize("junction", [False, True])
def test_lungs_that_touch_are_split_and_sided_by_geometry(junction):
    ct = _two_lung_phantom(junction)
    m = segment_masks(ct.array, ct.geometry)
    left, right = m["lung_left"], m["lung_right"]
    assert not np.any(left & right)
    assert 0.45 < left.sum() / (left.sum() + right.sum()) < 0.55
    assert np.argwhere(left)[:, 2].mean() > 75 and np.argwhere(right)[:, 2].mean() < 45  # LPS x: left is +x
