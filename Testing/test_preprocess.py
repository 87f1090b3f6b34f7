"""Model-space preprocessing: HU window, reorientation + resampling, windows around anatomies,
and the exact way back to the user's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fvlm_core.errors import ConfigError, GeometryError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, LabelVolume, read_ct, read_label_map
from fvlm_core.preprocess import (
    ModelSpaceConfig,
    bbox_zyx,
    crop_window,
    resample_to_model_space,
    window_hu,
)
from fvlm_core.zeroshot.windows import plan_centred, plan_windows

LIVER = 5  # TotalSegmentator v2 "total" value of the liver


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --- config and intensity --------------------------------------------------------------------


def test_config_defaults_and_dict_round_trip() -> None:
    cfg = ModelSpaceConfig()
    assert cfg.spacing_zyx == (3.0, 1.0, 1.0)
    assert cfg.hu_window == (-1150.0, 350.0)
    assert cfg.window_size_zyx == (112, 256, 352)
    assert cfg.multiple_zyx == (16, 16, 32)
    assert cfg.orientation == "LPS"
    other = ModelSpaceConfig(spacing_zyx=(2, 1.5, 1.5), orientation="ras")
    assert ModelSpaceConfig.from_dict(other.to_dict()) == other
    with pytest.raises(ConfigError, match="orientation"):
        ModelSpaceConfig(orientation="LLS")
    with pytest.raises(ConfigError, match="spacing_zyx"):
        ModelSpaceConfig(spacing_zyx=(3.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="unknown"):
        ModelSpaceConfig.from_dict({"spacing": [1, 1, 1]})


def test_window_hu_numpy_maps_and_clips() -> None:
    hu = np.array([-3000.0, -1150.0, -400.0, 350.0, 3000.0])
    out = window_hu(hu, (-1150.0, 350.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(window_hu(np.int16([-1000, 0]), (-1000, 0)), [0.0, 1.0])


def test_window_hu_torch_matches_numpy() -> None:
    torch = pytest.importorskip("torch")
    hu = np.linspace(-2000, 2000, 101).astype(np.float32).reshape(1, 101)
    t = window_hu(torch.from_numpy(hu.astype(np.int16)), (-1150, 350))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), window_hu(hu.astype(np.int16), (-1150, 350)), atol=1e-6)
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0


# --- windows ------------------------------------------------------------------------------------


def test_bbox_zyx() -> None:
    m = np.zeros((5, 6, 7), bool)
    assert bbox_zyx(m) is None
    m[1, 2, 3] = m[3, 4, 6] = True
    assert bbox_zyx(m) == ((1, 2, 3), (3, 4, 6))


def test_centred_window_size_rule() -> None:
    """A window per anatomy (``--windows centred``): ``max(min size, extent)`` rounded up to the
    patch multiple, centred on the anatomy's box (``(start, stop)``, stop exclusive)."""
    cfg = ModelSpaceConfig()

    def plan(box, min_size=cfg.window_size_zyx):
        (p,) = plan_centred({"a": box}, cfg.multiple_zyx, min_size)
        return p

    # Small anatomy: the minimum size wins, the window centred on it.
    small = plan(((10, 20, 30), (20, 60, 100)))
    assert small.size_zyx == (112, 256, 352)
    assert np.allclose(np.add(small.start_zyx, np.divide(small.size_zyx, 2)), (15, 40, 65), atol=1)
    # Reference evaluation minimum (112, 288, 352).
    assert plan(((0, 0, 0), (10, 10, 10)), (112, 288, 352)).size_zyx == (112, 288, 352)
    # Large anatomy: extent rounded up to the patch multiple (16, 16, 32).
    assert plan(((0, 0, 0), (120, 300, 401))).size_zyx == (128, 304, 416)
    assert plan(((0, 0, 0), (112, 256, 352))).size_zyx == (112, 256, 352)  # exactly the minimum
    # A minimum that is not a multiple is rounded up too.
    assert plan(((0, 0, 0), (1, 1, 1)), (100, 250, 300)).size_zyx == (112, 256, 320)


def _toy_ms(shape=(10, 12, 14)) -> tuple[CTVolume, LabelVolume]:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 100, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 3:9, 4:10] = 2
    g = Geometry(
        size=shape[::-1],
        spacing=(1.0, 1.0, 3.0),
        origin=(10.0, -20.0, 30.0),
        direction=tuple(np.eye(3).ravel()),
    )
    return CTVolume(arr, g), LabelVolume(lab, g)


def test_crop_window_slices_pads_and_shifts_origin() -> None:
    ct, lab = _toy_ms()
    win = crop_window(ct, lab, center_zyx=(1.0, 6.0, 13.0), size_zyx=(4, 6, 8), pad_hu=-1024)
    assert win.hu.shape == (4, 6, 8) and win.labels.shape == (4, 6, 8)
    assert win.hu.dtype == np.float32
    start = np.array(win.start_zyx)
    np.testing.assert_array_equal(start, [-1, 3, 9])  # centred: start = center - (size - 1) / 2, floored
    # Inside: the model-space voxels; outside: padding.
    np.testing.assert_array_equal(win.hu[1:, :, :5], ct.array[0:3, 3:9, 9:14])
    assert np.all(win.hu[0] == -1024) and np.all(win.hu[:, :, 5:] == -1024)
    assert np.all(win.labels[0] == 0) and np.all(win.labels[:, :, 5:] == 0)
    np.testing.assert_array_equal(win.labels[1:, :, :5], lab.array[0:3, 3:9, 9:14])
    # Geometry: window voxel (z, y, x) is model-space voxel start + (z, y, x).
    for zyx in [(0, 0, 0), (3, 5, 7), (1, 2, 3)]:
        np.testing.assert_allclose(
            win.geometry.index_zyx_to_ras(zyx), ct.geometry.index_zyx_to_ras(np.add(zyx, start)), atol=1e-9
        )
    assert win.geometry.shape_zyx == (4, 6, 8)
    np.testing.assert_allclose(win.image((-1150, 350)), window_hu(win.hu, (-1150, 350)))


def test_crop_window_rejects_mismatched_labels() -> None:
    ct, lab = _toy_ms()
    bad = LabelVolume(lab.array[:, :, :-1], lab.geometry)
    with pytest.raises(GeometryError, match="shape"):
        crop_window(ct, bad, (5, 5, 5), (4, 4, 4))


# --- resampling on real CTs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest(ts_dir: Path) -> tuple[CTVolume, LabelVolume]:
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    return ct, read_label_map(ts_dir / "chest_heart.nii.gz", reference=ct.geometry)


def test_model_space_grid_and_values(chest) -> None:
    ct, _ = chest
    ms, _ = resample_to_model_space(ct, None, ModelSpaceConfig())
    g = ms.geometry
    assert g.spacing_zyx == pytest.approx((3.0, 1.0, 1.0))
    np.testing.assert_allclose(g.direction_matrix, np.eye(3))  # LPS axes
    assert ms.array.dtype == np.float32
    # HU kept (not windowed) and every model voxel holds the CT value at its physical position:
    # model voxels on the original 1.5 mm grid points must equal the original voxel exactly.
    for zyx_ms in [(10, 30, 60), (40, 150, 300), (70, 90, 120)]:
        ras = g.index_zyx_to_ras(zyx_ms)
        idx = ct.geometry.ras_to_index_zyx(ras)
        np.testing.assert_allclose(idx, np.rint(idx), atol=1e-6)
        assert ms.array[zyx_ms] == pytest.approx(ct.array[tuple(np.rint(idx).astype(int))], abs=1e-3)
    # The model grid covers the CT: same physical extent within one model voxel.
    lo_a, hi_a = ct.geometry.physical_bounds_lps()
    lo_b, hi_b = g.physical_bounds_lps()
    assert np.all(lo_b <= lo_a + 1e-6) and np.all(hi_a - hi_b < np.array(g.spacing) + 1e-6)


def _flipped_copy(ct: CTVolume, axes_zyx: tuple[int, ...]) -> CTVolume:
    """The same CT stored with the given array axes reversed (geometry updated: same physical image)."""
    g = ct.geometry
    arr = np.flip(ct.array, axis=axes_zyx).copy()
    d = g.direction_matrix.copy()
    first = np.zeros(3)
    for ax in axes_zyx:
        itk = 2 - ax
        first[itk] = g.size[itk] - 1
        d[:, itk] *= -1
    origin = g.affine_lps[:3, :3] @ first + g.affine_lps[:3, 3]
    return CTVolume(arr, Geometry(g.size, g.spacing, tuple(origin), tuple(d.ravel())), ct.source)


def test_ras_and_lps_copies_give_the_same_model_space_array(chest) -> None:
    ct, heart = chest
    # chest_ct is stored LPS; an RAS copy flips x and y; a third copy also flips z and swaps x/y.
    ras = _flipped_copy(ct, (1, 2))
    assert np.allclose(ras.geometry.affine_ras[:3, :3], np.diag([1.5, 1.5, 1.5]))
    g = ct.geometry
    swapped = CTVolume(
        np.flip(ct.array, axis=0).transpose(0, 2, 1).copy(),
        Geometry(
            size=(g.size[1], g.size[0], g.size[2]),
            spacing=(g.spacing[1], g.spacing[0], g.spacing[2]),
            origin=tuple(g.affine_lps @ np.array([0, 0, g.size[2] - 1, 1.0]))[:3],
            direction=tuple(np.stack([[0, 1, 0], [1, 0, 0], [0, 0, -1]], axis=1).ravel().astype(float)),
        ),
    )
    cfg = ModelSpaceConfig()
    ref, _ = resample_to_model_space(ct, heart, cfg)
    for copy in (ras, swapped):
        ms, _ = resample_to_model_space(copy, None, cfg)
        assert ms.geometry.same_grid(ref.geometry)
        np.testing.assert_allclose(ms.array, ref.array, atol=1e-3)
    # A model space in RAS order is the LPS one with x and y reversed (chest_ct's extents are
    # whole multiples of the model spacing, so both grids hold the same points).
    ras_ms, _ = resample_to_model_space(ct, None, ModelSpaceConfig(orientation="RAS"))
    np.testing.assert_allclose(ras_ms.geometry.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(ras_ms.array, ref.array[:, ::-1, ::-1], atol=1e-3)


def _window_around_anatomy(ct_ms, lab_ms, cfg):
    """The window the analyzer cuts around anatomy 1 (a ``shared`` plan of that one anatomy)."""
    (plan,), _ = plan_windows(lab_ms.array, ["anatomy"], cfg.window_size_zyx, cfg.multiple_zyx)
    return crop_window(ct_ms, lab_ms, plan.center_zyx, plan.size_zyx)


def test_round_trip_heart_mask_chest(chest) -> None:
    ct, heart = chest
    assert heart.array.any()
    cfg = ModelSpaceConfig()
    ct_ms, lab_ms = resample_to_model_space(ct, heart, cfg)
    win = _window_around_anatomy(ct_ms, lab_ms, cfg)
    back = win.to_original(win.labels, ct.geometry, is_label=True)
    assert back.shape == ct.array.shape
    d = dice(back == 1, heart.array == 1)
    print(f"round-trip Dice heart (chest_ct): {d:.4f}")
    assert d >= 0.98
    # Continuous values come back by physical position too: CT voxels that sit on model grid
    # points (every 2nd voxel: 2 x 1.5 mm = 3 mm = 3 x 1 mm) get their own HU back exactly.
    hu_back = win.to_original(win.hu, ct.geometry, is_label=False)
    on_grid = np.zeros(ct.array.shape, bool)
    on_grid[::2, ::2, ::2] = True
    sel = on_grid & (back == 1)
    assert sel.sum() > 10000
    np.testing.assert_allclose(hu_back[sel], ct.array[sel], atol=1e-2)


def test_round_trip_liver_mask_example_ct_sm(ts_dir: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")  # stored RAS, 3 mm isotropic: x/y upsampled to 1 mm
    seg = read_label_map(ts_dir / "example_seg.nii.gz", reference=ct.geometry)
    liver = LabelVolume((seg.array == LIVER).astype(np.uint8), seg.geometry)
    cfg = ModelSpaceConfig()
    ct_ms, lab_ms = resample_to_model_space(ct, liver, cfg)
    assert lab_ms.array.sum() > 0
    # Liver is soft tissue in model space too (labels and HU stay aligned).
    assert 20 < np.median(ct_ms.array[lab_ms.array == 1]) < 150
    win = _window_around_anatomy(ct_ms, lab_ms, cfg)
    back = win.to_original(win.labels, ct.geometry, is_label=True)
    d = dice(back == 1, liver.array == 1)
    print(f"round-trip Dice liver (example_ct_sm): {d:.4f}")
    assert d >= 0.98


def test_oblique_ct_is_resampled_onto_lps_axes(ts_dir: Path) -> None:
    # The same voxels with a 20 degree in-plane rotation (gantry/oblique acquisition).
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    seg = read_label_map(ts_dir / "example_seg.nii.gz", reference=ct.geometry)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ ct.geometry.direction_matrix
    g = Geometry(ct.geometry.size, ct.geometry.spacing, ct.geometry.origin, tuple(rot.ravel()))
    ct_o, liver_o = CTVolume(ct.array, g), LabelVolume((seg.array == LIVER).astype(np.uint8), g)
    ct_ms, lab_ms = resample_to_model_space(ct_o, liver_o)
    np.testing.assert_allclose(ct_ms.geometry.direction_matrix, np.eye(3))
    # The axis-aligned box holds the whole rotated scan: no liver is lost, little is gained.
    ml = lab_ms.array.sum() * ct_ms.geometry.voxel_volume_ml
    ml0 = liver_o.array.sum() * g.voxel_volume_ml
    assert abs(ml - ml0) < 0.03 * ml0
    win = _window_around_anatomy(ct_ms, lab_ms, ModelSpaceConfig())
    back = win.to_original(win.labels, g, is_label=True)
    d = dice(back == 1, liver_o.array == 1)
    print(f"round-trip Dice liver, oblique copy of example_ct_sm: {d:.4f}")
    assert d > 0.95, d
    assert bbox_zyx(lab_ms.array == 7) is None  # an absent label has no window


def test_labels_on_another_grid_land_on_the_ct(ts_dir: Path) -> None:
    # The DICOM series and its NIfTI segmentation have opposite y axes; resampled to model space
    # separately from their own grids, the liver must still sit on soft tissue.
    ct = read_ct(ts_dir / "example_ct_dicom")
    raw = read_label_map(ts_dir / "example_seg_dicom.nii.gz")  # its own grid
    assert not raw.geometry.same_grid(ct.geometry)
    ct_ms, lab_ms = resample_to_model_space(ct, raw)
    assert lab_ms.geometry.same_grid(ct_ms.geometry)
    liver = lab_ms.array == LIVER
    assert liver.sum() > 1000
    assert 20 < np.median(ct_ms.array[liver]) < 150


def test_labels_that_do_not_overlap_raise(ts_dir: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    g = ct.geometry
    far = Geometry(g.size, g.spacing, (9000.0, 0.0, 0.0), g.direction)
    lab = LabelVolume(np.ones(g.shape_zyx, np.uint8), far, source="far_labels.nii.gz")
    with pytest.raises(GeometryError, match=r"far_labels\.nii\.gz"):
        resample_to_model_space(ct, lab)
