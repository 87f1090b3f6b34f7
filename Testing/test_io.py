"""CT reading: geometry, voxel order and HU scaling of NIfTI, NRRD, MHA and DICOM series, the
CT-RATE metadata override, and label maps on other grids (resampled by physical position)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fvlm_core.data.ctrate_volume import read_ctrate_volume
from fvlm_core.errors import GeometryError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import read_ct, read_label_map, write_image

LIVER = 5  # TotalSegmentator v2 "total" value of the liver


def _ras_of_ijk(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


@pytest.mark.parametrize("name", ["chest_ct.nii.gz", "example_ct_sm.nii.gz"])
def test_nifti_geometry_and_voxels_match_nibabel(ts_dir: Path, name: str) -> None:
    # chest_ct is stored LPS-like (affine diag -1.5, -1.5, 1.5), example_ct_sm RAS-like (+3, +3, +3).
    path = ts_dir / name
    ct = read_ct(path)
    img = nib.load(path)
    np.testing.assert_allclose(ct.geometry.affine_ras, img.affine, atol=1e-4)
    data = np.asarray(img.dataobj)  # (i, j, k)
    assert ct.array.shape == data.shape[::-1]
    np.testing.assert_array_equal(ct.array, data.transpose(2, 1, 0).astype(np.float32))
    # A specific, asymmetric voxel lands where nibabel says, and back.
    i, j, k = 7, data.shape[1] - 9, data.shape[2] // 3
    ras = _ras_of_ijk(img.affine, (i, j, k))
    np.testing.assert_allclose(ct.geometry.index_zyx_to_ras((k, j, i)), ras, atol=1e-4)
    np.testing.assert_allclose(ct.geometry.ras_to_index_zyx(ras), (k, j, i), atol=1e-6)
    assert ct.array[k, j, i] == data[i, j, k]


def _write_raw(tmp: Path, name: str, header: str, data: np.ndarray) -> Path:
    path = tmp / name
    path.write_bytes(header.encode() + np.ascontiguousarray(data).astype("<i2").tobytes())
    return path


def test_hand_written_nrrd_and_mha_give_the_header_geometry(tmp_path: Path) -> None:
    # Ground truth from hand-written headers (not from SimpleITK's writer): x runs to patient
    # right (direction -1), y posterior, z superior; spacing 0.7 x 0.8 x 2.5 mm.
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 1500, size=(6, 5, 4)).astype(np.int16)  # (z, y, x)
    origin = (12.5, -30.0, 100.0)
    nrrd = _write_raw(
        tmp_path,
        "ct.nrrd",
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 5 6\n"
        "space directions: (-0.7,0,0) (0,0.8,0) (0,0,2.5)\nkinds: domain domain domain\n"
        f"endian: little\nencoding: raw\nspace origin: ({origin[0]},{origin[1]},{origin[2]})\n\n",
        data,
    )
    mha = _write_raw(
        tmp_path,
        "ct.mha",
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = -1 0 0 0 1 0 0 0 1\nOffset = 12.5 -30 100\nElementSpacing = 0.7 0.8 2.5\n"
        "DimSize = 4 5 6\nElementType = MET_SHORT\nElementDataFile = LOCAL\n",
        data,
    )
    expect_lps = lambda z, y, x: np.array(origin) + np.array([-0.7 * x, 0.8 * y, 2.5 * z])  # noqa: E731
    for path in (nrrd, mha):
        ct = read_ct(path, allow_non_hu=True)  # random values: not a CT intensity distribution
        np.testing.assert_array_equal(ct.array, data.astype(np.float32))
        assert ct.geometry.spacing_zyx == pytest.approx((2.5, 0.8, 0.7))
        lps = expect_lps(5, 1, 3)
        np.testing.assert_allclose(ct.geometry.index_zyx_to_ras((5, 1, 3)), lps * [-1, -1, 1], atol=1e-5)


def test_write_then_read_keeps_array_and_geometry(ts_dir: Path, tmp_path: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = write_image(ct.array.astype(np.int16), ct.geometry, tmp_path / f"ct{suffix}")
        back = read_ct(out)
        assert back.geometry.same_grid(ct.geometry)
        np.testing.assert_array_equal(back.array, ct.array)


def test_dicom_series_geometry_voxels_and_hu(ts_dir: Path) -> None:
    folder = ts_dir / "example_ct_dicom"
    ct = read_ct(folder)
    g = ct.geometry
    assert g.size == (512, 512, 20)
    files = sorted(folder.iterdir())
    assert len(files) == 20
    normal = g.direction_matrix[:, 2]
    for f in files[::3]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        ipp = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        iop = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        dy, dx = (float(v) for v in reader.GetMetaData("0028|0030").split("\\"))
        # Row/column directions and pixel spacing straight from the tags.
        np.testing.assert_allclose(g.direction_matrix[:, 0], iop[:3], atol=1e-6)
        np.testing.assert_allclose(g.direction_matrix[:, 1], iop[3:], atol=1e-6)
        assert g.spacing[:2] == pytest.approx((dx, dy))
        # The file's slice sits at the index its position says (no flip of the stack).
        k = round(float((ipp - np.asarray(g.origin)) @ normal) / g.spacing[2])
        lps = g.affine_lps @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(lps[:3], ipp, atol=1e-3)
        one = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0]
        np.testing.assert_array_equal(ct.array[k], one.astype(np.float32))
    # Rescale intercept (-1024) applied: air around the patient is about -1000 HU.
    corner = ct.array[:, :20, :20]
    assert np.median(corner) < -900


def test_dicom_series_and_its_nifti_segmentation_align(ts_dir: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_dicom")
    seg_path = ts_dir / "example_seg_dicom.nii.gz"
    raw = nib.load(seg_path)
    # The segmentation's y axis runs the other way than the DICOM's: the grids differ.
    assert not Geometry.from_affine_ras(raw.affine, raw.shape[::-1]).same_grid(ct.geometry)
    seg = read_label_map(seg_path, reference=ct.geometry)
    assert seg.geometry == ct.geometry and seg.array.shape == ct.array.shape
    # Direct physical-point lookup: every labelled voxel of the file lands on that label.
    data = np.asarray(raw.dataobj)
    ijk = np.argwhere(data > 0)[::97]
    ras = ijk @ raw.affine[:3, :3].T + raw.affine[:3, 3]
    zyx = np.rint(ct.geometry.ras_to_index_zyx(ras)).astype(int)
    np.testing.assert_array_equal(seg.array[zyx[:, 0], zyx[:, 1], zyx[:, 2]], data[tuple(ijk.T)])
    np.testing.assert_array_equal(np.bincount(seg.array.ravel()), np.bincount(data.ravel()))
    # And it fits the anatomy: the liver is soft tissue, the lungs are air-filled.
    classes = {v: int(k) for k, v in json.loads((ts_dir / "total_class_map.json").read_text()).items()}
    liver_hu = np.median(ct.array[seg.array == classes["liver"]])
    assert 20 < liver_hu < 150
    lungs = np.isin(seg.array, [classes[n] for n in classes if n.startswith("lung_")])
    if lungs.any():
        assert np.median(ct.array[lungs]) < -600


def test_label_map_on_another_grid_is_resampled_by_position(ts_dir: Path, tmp_path: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    seg = read_label_map(ts_dir / "example_seg.nii.gz")
    # A sub-block of the segmentation, saved with its own (shifted) origin.
    z0, y0, x0 = 4, 10, 20
    block = seg.array[z0:20, y0:80, x0:100]
    origin = ct.geometry.affine_lps @ np.array([x0, y0, z0, 1.0])
    g = Geometry(
        size=block.shape[::-1],
        spacing=ct.geometry.spacing,
        origin=tuple(origin[:3]),
        direction=ct.geometry.direction,
    )
    path = write_image(block, g, tmp_path / "block.nii.gz")
    back = read_label_map(path, reference=ct.geometry)
    expected = np.zeros_like(seg.array)
    expected[z0:20, y0:80, x0:100] = block
    np.testing.assert_array_equal(back.array, expected)
    assert (block == LIVER).any()


def test_label_map_that_cannot_overlap_raises(ts_dir: Path, tmp_path: Path) -> None:
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    g = ct.geometry
    far = Geometry(size=g.size, spacing=g.spacing, origin=(5000.0, 5000.0, 5000.0), direction=g.direction)
    path = write_image(np.ones(g.shape_zyx, np.uint8), far, tmp_path / "far.nii.gz")
    with pytest.raises(GeometryError, match="does not overlap") as err:
        read_label_map(path, reference=g)
    assert str(path) in str(err.value)


def _ctrate_case(tmp_path: Path, *, header_scaling: bool):
    """A CT-RATE-like volume: stored raw values, a wrong header, and the metadata row that fixes it."""
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 1400, size=(7, 6, 5)).astype(np.int16)  # (z, y, x)
    hu[0] = -1000  # some air so it looks like CT
    slope, intercept = 1.0, -1024.0
    stored = ((hu - intercept) / slope).astype(np.int16)
    # Wrong header: 1 mm isotropic, origin 0, an axis flip, and (optionally) a wrong scl_slope/inter.
    img = nib.Nifti1Image(stored.transpose(2, 1, 0), np.diag([-1.0, 1.0, 1.0, 1.0]))
    if header_scaling:
        img.header.set_slope_inter(2.0, 7.0)
    path = tmp_path / "valid_1_a_1.nii.gz"
    nib.save(img, path)
    row = {
        "VolumeName": path.name,
        "XYSpacing": "[0.75, 0.8]",  # DICOM PixelSpacing: [row spacing (y), column spacing (x)]
        "ZSpacing": "2.5",
        "ImagePositionPatient": "[-120.5, -80.25, -300.0]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "RescaleSlope": "1.0",
        "RescaleIntercept": "-1024.0",
    }
    return path, row, hu


@pytest.mark.parametrize("header_scaling", [False, True])
def test_ctrate_metadata_row_overrides_wrong_header(tmp_path: Path, header_scaling: bool) -> None:
    path, row, hu = _ctrate_case(tmp_path, header_scaling=header_scaling)
    ct = read_ctrate_volume(path, row)
    np.testing.assert_array_equal(ct.array, hu.astype(np.float32))
    g = ct.geometry
    assert g.spacing == pytest.approx((0.8, 0.75, 2.5))
    assert g.origin == pytest.approx((-120.5, -80.25, -300.0))
    np.testing.assert_allclose(g.direction_matrix, np.eye(3), atol=1e-9)
    # Voxel (z=3, y=2, x=4) is at IPP + 4*0.8 along the row + 2*0.75 along the column + 3*2.5 up.
    lps = np.array([-120.5 + 4 * 0.8, -80.25 + 2 * 0.75, -300.0 + 3 * 2.5])
    np.testing.assert_allclose(g.index_zyx_to_ras((3, 2, 4)), lps * [-1, -1, 1], atol=1e-6)
    # Without the row the header is used (and is wrong): the override really did something.
    plain = read_ct(path, allow_non_hu=True)
    assert not plain.geometry.same_grid(g)


def test_ctrate_metadata_row_of_another_volume_is_refused(tmp_path: Path) -> None:
    path, row, _ = _ctrate_case(tmp_path, header_scaling=False)
    row["VolumeName"] = "valid_2_a_1.nii.gz"
    with pytest.raises(InputError, match="valid_2_a_1") as err:
        read_ctrate_volume(path, row)
    assert str(path) in str(err.value)
    row["VolumeName"] = "valid_1_a_1.nii"  # same volume, other suffix: fine
    assert read_ctrate_volume(path, row).geometry.spacing == pytest.approx((0.8, 0.75, 2.5))


def test_ctrate_metadata_oblique_orientation(tmp_path: Path) -> None:
    path, row, _ = _ctrate_case(tmp_path, header_scaling=False)
    c, s = np.cos(0.3), np.sin(0.3)
    row["ImageOrientationPatient"] = f"[{c}, {s}, 0.0, {-s}, {c}, 0.0]"
    g = read_ctrate_volume(path, row).geometry
    np.testing.assert_allclose(g.direction_matrix[:, 0], [c, s, 0], atol=1e-9)
    np.testing.assert_allclose(g.direction_matrix[:, 1], [-s, c, 0], atol=1e-9)
    np.testing.assert_allclose(g.direction_matrix[:, 2], [0, 0, 1], atol=1e-9)
