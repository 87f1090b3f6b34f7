"""Built-in classical segmenter against TotalSegmentator reference label maps (issue 2 bars).

Reference classes: lungs = the five TotalSegmentator lobes; bone = vertebrae, ribs, sternum,
sacrum, hips, femurs, humeri, scapulae, claviculae, skull (bone tissue). The catalog's "bone"
also holds TotalSegmentator's costal cartilages; Dice against that definition is checked too.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
from scipy import ndimage as ndi

from fvlm_core.anatomy import EXTENDED_CATALOG
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, read_ct, read_label_map
from fvlm_core.segmentation import morphology
from fvlm_core.segmentation.builtin import BuiltinBackend, BuiltinParams, segment_masks
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP

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
    assert dice(lungs, np.isin(ref, LEFT_LUNG + RIGHT_LUNG)) >= 0.95, name
    # sides come from the affine: patient-left lung vs TotalSegmentator's left lobes
    assert dice(masks["lung_left"], np.isin(ref, LEFT_LUNG)) >= 0.9, name
    assert dice(masks["lung_right"], np.isin(ref, RIGHT_LUNG)) >= 0.9, name
    # bowel gas is not lung
    bowel = np.isin(ref, [6, 18, 19, 20])  # stomach, small bowel, duodenum, colon
    assert np.count_nonzero(lungs & bowel) < 0.01 * np.count_nonzero(lungs)


def test_lungs_refined_from_blocks_twice_the_voxel_size(case):
    """The 3 mm references segmented on 6 mm blocks, then refined to 3 mm voxels: the refinement
    alone must recover the lung boundary (TotalSegmentator Dice still >= 0.95)."""
    name, ct, ref, _ = case
    masks = segment_masks(ct.array, ct.geometry, BuiltinParams(coarse_mm=6.0))
    lungs = masks["lung_left"] | masks["lung_right"]
    assert dice(lungs, np.isin(ref, LEFT_LUNG + RIGHT_LUNG)) >= 0.95, name
    assert dice(masks["lung_left"], np.isin(ref, LEFT_LUNG)) >= 0.9, name


def test_bone_dice_against_totalsegmentator(case):
    name, _, ref, masks = case
    assert dice(masks["bone"], np.isin(ref, BONE)) >= 0.80, name
    assert dice(masks["bone"], np.isin(ref, [*BONE, COSTAL_CARTILAGES])) >= 0.80, name


def _mirrored_x(ct: CTVolume) -> CTVolume:
    """The same patient with the array's x axis reversed (and its affine with it)."""
    g = ct.geometry
    d = g.direction_matrix.copy()
    flipped_origin = g.index_zyx_to_ras([0, 0, g.size[0] - 1]) * np.array([-1, -1, 1])  # LPS of new voxel 0
    d[:, 0] *= -1
    g2 = Geometry(g.size, g.spacing, tuple(flipped_origin), tuple(d.reshape(-1)))
    return CTVolume(ct.array[:, :, ::-1].copy(), g2)


def test_orientation_comes_from_the_geometry(case):
    """Mirroring the array left-right and its affine describes the same patient: same result."""
    _, ct, _, masks = case
    mirrored = _mirrored_x(ct)
    m2 = segment_masks(mirrored.array, mirrored.geometry)
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


def test_chest_bone_is_outside_the_contrast_filled_heart(chest):
    ct, heart, seg = chest
    bone = seg.classes["bone"]
    litres = np.count_nonzero(bone) * ct.geometry.voxel_volume_ml / 1000.0
    assert 0.5 <= litres <= 3.0, litres  # ribs, spine, sternum, shoulder girdle of a chest CT
    assert np.count_nonzero(bone & heart) < 0.01 * np.count_nonzero(bone)
    assert not np.any(bone & (seg.classes["lung_left"] | seg.classes["lung_right"]))
    assert not np.any(bone & ~seg.classes["body"])


def test_chest_sides_on_the_coarse_grid_come_from_the_geometry(chest):
    """chest_ct (1.5 mm) runs on 3 mm blocks: the mirrored scan's blocks differ, its sides must not."""
    ct, _, seg = chest
    mirrored = _mirrored_x(ct)
    m2 = segment_masks(mirrored.array, mirrored.geometry)
    for key in ("lung_left", "lung_right", "body"):
        assert dice(m2[key][:, :, ::-1], seg.classes[key]) >= 0.99, key
    assert dice(m2["bone"][:, :, ::-1], seg.classes["bone"]) >= 0.9


def test_coarse_grid_agrees_with_the_full_resolution_run(ts_dir):
    """Coarse-then-refine (default) against every step run on the 1.5 mm grid (``coarse_mm=0``),
    on a 75 mm slab of chest_ct with both lungs (the full-resolution run takes seconds)."""
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    g, z0, z1 = ct.geometry, 60, 110  # chest_ct is LPS: array axis 0 runs inferior -> superior
    origin = g.index_zyx_to_ras([z0, 0, 0]) * np.array([-1, -1, 1])
    slab = Geometry((g.size[0], g.size[1], z1 - z0), g.spacing, tuple(origin), g.direction)
    hu = ct.array[z0:z1].copy()
    coarse = segment_masks(hu, slab)
    full = segment_masks(hu, slab, BuiltinParams(coarse_mm=0))
    assert dice(coarse["body"], full["body"]) >= 0.995
    for side in ("lung_left", "lung_right"):
        assert full[side].sum() > 0 and dice(coarse[side], full[side]) >= 0.97, side
    assert dice(coarse["bone"], full["bone"]) >= 0.75


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


def _two_lung_phantom(junction: bool, mm: float = 2.0) -> CTVolume:
    """Water body with two noisy -850 HU lungs on an ``mm`` grid (240 x 200 x 120 mm; LPS grid:
    x index grows to the patient's left)."""
    n = (round(240 / mm), round(200 / mm), round(120 / mm))  # x, y, z
    g = Geometry(n, (mm, mm, mm), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    z, y, x = (a * mm / 2.0 for a in np.ogrid[: n[2], : n[1], : n[0]])  # in units of 2 mm
    hu = np.full(g.shape_zyx, -1000.0, np.float32)
    body = ((y - 50) / 40.0) ** 2 + ((x - 60) / 55.0) ** 2 <= 1
    hu[:, body[0]] = 40.0
    rng = np.random.default_rng(0)
    for cx in (35, 85):
        lung = ((z - 30) / 25.0) ** 2 + ((y - 50) / 25.0) ** 2 + ((x - cx) / 20.0) ** 2 <= 1
        hu[lung] = -850.0 + rng.normal(0, 30, size=int(lung.sum()))
    if junction:  # the lungs touch in front (anterior junction line)
        hu[(z >= 10) & (z < 50) & (y >= 28) & (y < 34) & (x >= 50) & (x < 71)] = -850.0
    return CTVolume(hu, g)


@pytest.mark.parametrize("mm", [2.0, 1.0])  # the scan's own grid; 3 mm blocks refined to 1 mm
@pytest.mark.parametrize("junction", [False, True])
def test_lungs_that_touch_are_split_and_sided_by_geometry(junction, mm):
    ct = _two_lung_phantom(junction, mm)
    m = segment_masks(ct.array, ct.geometry)
    left, right = m["lung_left"], m["lung_right"]
    assert not np.any(left & right)
    assert 0.45 < left.sum() / (left.sum() + right.sum()) < 0.55
    x_mm = ct.geometry.spacing[0]
    assert (
        np.argwhere(left)[:, 2].mean() * x_mm > 150 and np.argwhere(right)[:, 2].mean() * x_mm < 90
    )  # LPS x: left is +x
    # lung voxels are below the air threshold or inside the lung (vessels), never the water body
    lungs = left | right
    assert np.count_nonzero(lungs & (ct.array > -400)) < 0.01 * np.count_nonzero(lungs)


def _random_masks(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(12):
        shape = tuple(int(v) for v in rng.integers(1, 24, 3))
        spacing = tuple(float(v) for v in rng.choice([0.7, 1.5, 3.0, 5.0], 3))
        yield ndi.gaussian_filter(rng.random(shape), 1) > 0.5, spacing, rng


def test_shifted_morphology_equals_scipy():
    """morphology.dilate/erode/opening/closing/box_mean stand in for scipy.ndimage's: same result,
    borders included, on random masks and the anisotropic elements the segmenter builds."""
    for mask, spacing, rng in _random_masks(0):
        elements = [morphology.ball(r, spacing) for r in (2.0, 3.0, 5.0)] + [morphology.disk(4.0, spacing)]
        for se in [*elements, ndi.generate_binary_structure(3, 1)]:
            for ours, ref in (
                (morphology.dilate, ndi.binary_dilation),
                (morphology.erode, ndi.binary_erosion),
                (morphology.opening, ndi.binary_opening),
                (morphology.closing, ndi.binary_closing),
            ):
                np.testing.assert_array_equal(ours(mask, se), ref(mask, structure=se), err_msg=ours.__name__)
        hu = rng.normal(size=mask.shape).astype(np.float32)
        size = [int(k) for k in rng.choice([1, 3, 5], 3)]
        np.testing.assert_allclose(morphology.box_mean(hu, size), ndi.uniform_filter(hu, size), atol=1e-5)
        filled = np.stack([ndi.binary_fill_holes(s) for s in mask])
        np.testing.assert_array_equal(morphology.fill_slices(mask), filled)
