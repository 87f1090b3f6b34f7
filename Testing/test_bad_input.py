"""Bad input for CT reading and writing: every case raises an error that names the file and says
what to do, and nothing is written half-way."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import signal
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm_core.data.ctrate_volume import read_ctrate_volume
from fvlm_core.errors import GeometryError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import ct_from_array, read_ct, read_label_map, write_image

EYE = tuple(np.eye(3).ravel())


def _ct_like(shape=(12, 16, 16), seed=0) -> np.ndarray:
    """(i, j, k) array with CT-like HU: air around a soft-tissue body with some bone."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0) + rng.normal(0, 20, shape)
    a[3:-3, 3:-3, :] = 40 + rng.normal(0, 20, (shape[0] - 6, shape[1] - 6, shape[2]))
    a[6:8, 6:8, :] = 800
    return a.astype(np.int16)


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _raises(exc_type, path: Path, *words: str) -> pytest.ExceptionInfo:
    """Assert ``read_ct(path)`` raises ``exc_type`` whose message names the file and holds ``words``."""
    with pytest.raises(exc_type) as err:
        read_ct(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return err


def test_good_nifti_reads(tmp_path: Path) -> None:
    # The helper data is valid: the errors below come from what each case breaks.
    ct = read_ct(_nifti(tmp_path / "ok.nii.gz", _ct_like()))
    assert ct.array.shape == (16, 16, 12)


def test_2d_image(tmp_path: Path) -> None:
    _raises(InputError, _nifti(tmp_path / "slice2d.nii.gz", _ct_like()[:, :, 0]), "2D", "3D")


def test_single_slice_volume(tmp_path: Path) -> None:
    _raises(InputError, _nifti(tmp_path / "one.nii.gz", _ct_like()[:, :, :1]), "single slice")


def test_single_dicom_file_in_a_folder(ts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "one_dicom"
    folder.mkdir()
    shutil.copy(sorted((ts_dir / "example_ct_dicom").iterdir())[0], folder / "IM0001")
    _raises(InputError, folder, "single slice", "folder")


def test_4d_series(tmp_path: Path) -> None:
    data = np.stack([_ct_like(seed=s) for s in range(3)], axis=-1)
    _raises(InputError, _nifti(tmp_path / "dyn4d.nii.gz", data), "4D", "3 time points", "pick one")


def _dicom_copy(src: Path, dst: Path, skip: int | None = None, twice: bool = False) -> Path:
    dst.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        if i == skip:
            continue
        shutil.copy(f, dst / f.name)
        if twice:
            shutil.copy(f, dst / f"{f.name}.phase2")
    return dst


def test_4d_dicom_series(ts_dir: Path, tmp_path: Path) -> None:
    # Every slice position twice (as in a multi-phase series): ITK would stack 40 slices at 1 mm.
    folder = _dicom_copy(ts_dir / "example_ct_dicom", tmp_path / "two_phases", twice=True)
    _raises(InputError, folder, "same slice position", "one 3D volume")


def test_dicom_series_with_a_missing_slice(ts_dir: Path, tmp_path: Path) -> None:
    # ITK only warns and spreads 19 slices over an average spacing: refuse instead.
    folder = _dicom_copy(ts_dir / "example_ct_dicom", tmp_path / "gap", skip=9)
    _raises(GeometryError, folder, "unevenly spaced", "missing")


def test_file_that_is_not_an_image(tmp_path: Path) -> None:
    text = "PatientName,Findings\nA,normal\n" * 40
    for name in ("report.nii.gz", "report.nrrd", "report.mha", "report.nii"):
        path = tmp_path / name
        path.write_text(text)
        _raises(InputError, path)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _raises(InputError, empty, "empty")
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "readme.txt").write_text(text)
    _raises(InputError, folder, "no readable DICOM")
    _raises(InputError, tmp_path / "missing.nii.gz", "no such file")


def test_truncated_nii_gz(ts_dir: Path, tmp_path: Path) -> None:
    data = (ts_dir / "example_ct_sm.nii.gz").read_bytes()
    for frac in (0.5, 0.99):
        path = tmp_path / f"cut{int(frac * 100)}.nii.gz"
        path.write_bytes(data[: int(len(data) * frac)])
        _raises(InputError, path, "truncated", "again")
    # A complete gzip stream around a cut NIfTI (e.g. re-compressed after a broken copy).
    raw = gzip.decompress(data)
    path = tmp_path / "inner_cut.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))
    _raises(InputError, path, "truncated")
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) // 2])
    _raises(InputError, path, "truncated")
    # The label-map reader goes through the same checks.
    with pytest.raises(InputError, match="truncated"):
        read_label_map(tmp_path / "cut50.nii.gz")


def _nifti_with_pixdim(path: Path, pixdim_y: float, qform_code: int, byte_order: str = "<") -> Path:
    """A NIfTI whose only geometry is pixdim (no sform), with the y voxel size set to ``pixdim_y``,
    written in ``byte_order`` (NIfTI allows either; the reader tells them by ``sizeof_hdr``)."""
    img = nib.Nifti1Image(_ct_like(), np.eye(4))
    img.header.set_sform(None, code=0)
    img.header.set_qform(np.eye(4), code=qform_code)
    header = img.header.as_byteswapped(byte_order)
    raw = bytearray(header.binaryblock)
    struct.pack_into(byte_order + "f", raw, 80 + 4, pixdim_y)  # pixdim[2]
    body = np.asarray(img.dataobj).astype(byte_order + "i2").tobytes(order="F")
    path.write_bytes(bytes(raw) + b"\0" * 4 + body)
    return path


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("value", [0.0, float("nan")])
@pytest.mark.parametrize("qform_code", [0, 1])
def test_zero_or_nan_spacing_nifti(tmp_path: Path, value: float, qform_code: int, byte_order: str) -> None:
    # ITK itself would silently read these with 1 mm voxels.
    path = _nifti_with_pixdim(tmp_path / "badsp.nii", value, qform_code, byte_order)
    _raises(GeometryError, path, "voxel size", "header")
    # Same file with a valid voxel size reads fine.
    ok = _nifti_with_pixdim(tmp_path / "oksp.nii", 0.8, qform_code, byte_order)
    assert read_ct(ok).geometry.spacing[1] == pytest.approx(0.8)


@pytest.mark.parametrize("spacing", ["1 0 1", "1 nan 1"])
def test_zero_or_nan_spacing_mha(tmp_path: Path, spacing: str) -> None:
    path = tmp_path / "badsp.mha"
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementSpacing = {spacing}\nDimSize = 12 16 16\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + _ct_like().astype("<i2").tobytes())
    _raises(GeometryError, path, "spacing", "header")


def test_zero_spacing_from_metadata_or_array(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "ok.nii.gz", _ct_like())
    row = {
        "XYSpacing": "[0.7, 0.7]",
        "ZSpacing": "0",
        "ImagePositionPatient": "[0, 0, 0]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
    }
    with pytest.raises(GeometryError, match="spacing") as err:
        read_ctrate_volume(path, row)
    assert str(path) in str(err.value)
    g = Geometry((12, 16, 16), (1.0, float("nan"), 1.0), (0.0, 0.0, 0.0), EYE)
    with pytest.raises(GeometryError, match="my_volume"):
        ct_from_array(_ct_like().transpose(2, 1, 0), g, source="my_volume")


def test_mr_like_volume_needs_override(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mr = np.abs(rng.normal(0, 30, (32, 32, 20)))  # background noise near 0
    mr[8:24, 8:24, :] = rng.normal(1200, 150, (16, 16, 20))  # tissue at arbitrary MR units
    path = _nifti(tmp_path / "t1_mr.nii.gz", mr.astype(np.int16))
    _raises(InputError, path, "allow_non_hu", "--allow-non-hu")
    ct = read_ct(path, allow_non_hu=True)
    assert ct.array.max() > 1000


def test_normalised_array_needs_override(tmp_path: Path) -> None:
    hu = _ct_like().astype(np.float32)
    norm = np.clip((hu + 1150) / 1500, 0, 1).astype(np.float32)
    path = _nifti(tmp_path / "normalised.nii.gz", norm)
    _raises(InputError, path, "normalised", "original CT", "allow_non_hu")
    assert read_ct(path, allow_non_hu=True).array.max() <= 1.0
    g = Geometry(norm.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE)
    with pytest.raises(InputError, match="normalised"):
        ct_from_array(norm.transpose(2, 1, 0), g, source="slicer volume")
    assert ct_from_array(hu.transpose(2, 1, 0), g).array.dtype == np.float32
    assert ct_from_array(norm.transpose(2, 1, 0), g, allow_non_hu=True).array.max() <= 1.0


def test_label_map_with_another_grid_is_resampled(ts_dir: Path, tmp_path: Path) -> None:
    # A label map at half the CT resolution (6 mm) is put on the CT grid by physical position.
    ct = read_ct(ts_dir / "example_ct_sm.nii.gz")
    seg = read_label_map(ts_dir / "example_seg.nii.gz")
    coarse = seg.array[:, ::2, ::2]
    g = ct.geometry
    cg = Geometry((coarse.shape[2], coarse.shape[1], coarse.shape[0]), (6.0, 6.0, 3.0), g.origin, g.direction)
    path = write_image(coarse, cg, tmp_path / "coarse_seg.nii.gz")
    back = read_label_map(path, reference=g)
    assert back.geometry == g
    # Voxels of the CT that coincide with the coarse grid get exactly the coarse label.
    np.testing.assert_array_equal(back.array[:, ::2, ::2], coarse)
    liver = 5
    assert (
        abs(int((back.array == liver).sum()) - int((seg.array == liver).sum()))
        < 0.05 * (seg.array == liver).sum()
    )


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Make writes beyond ``nbytes`` fail like a full disk (EFBIG), then restore the limits."""
    resource = pytest.importorskip("resource")
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_write_image_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    arr = np.zeros((4, 5, 6), np.int16)
    g = Geometry((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE)
    # 1) The target exists as a folder: the image is fully written to a temporary file, then the
    #    rename fails; the temporary file must be gone.
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(OSError):
        write_image(arr, g, tmp_path / "out.nii.gz")
    # 2) Unknown type: refused up front, naming the file.
    with pytest.raises(InputError, match=r"\.nii\.gz"):
        write_image(arr, g, tmp_path / "out.xyz")
    # 3) A failed rewrite keeps the previous good file intact.
    good = write_image(arr + 7, g, tmp_path / "seg.nii.gz")
    before = good.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - shape mismatch, raised before anything is written
        write_image(np.zeros((3, 3, 3), np.int16), g, good)
    # 4) The disk fills up mid-write (file size limit): ITK's NIfTI writer does not notice, the
    #    check of the temporary file does.
    big = np.random.default_rng(0).integers(0, 30000, (32, 64, 64)).astype(np.int16)
    bg = Geometry((64, 64, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE)
    for name in ("full.nii.gz", "full.nii", "full.nrrd"):
        target = write_image(big * 0 + 3, bg, tmp_path / "full" / name)
        kept = target.read_bytes()
        with _file_size_limit(8000), pytest.raises(InputError, match="could not be written") as err:
            write_image(big, bg, target)
        assert str(target) in str(err.value)
        assert target.read_bytes() == kept
        assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
        target.unlink()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "seg.nii.gz").mkdir()  # an unwritable target in another folder
    with pytest.raises(OSError):
        write_image(arr, g, tmp_path / "ro" / "seg.nii.gz")
    assert good.read_bytes() == before
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p != good)
    assert leftovers == [], leftovers
    assert read_label_map(good).array.max() == 7


def _with_nonfinite(shape_zyx=(16, 16, 16)) -> np.ndarray:
    """(Z, Y, X) float32 CT-like HU with one NaN inside the lung-like air and one +Inf."""
    a = np.full(shape_zyx, -1000.0, np.float32)
    a[4:12, 4:12, 4:12] = 40.0
    a[6, 7, 8] = np.nan
    a[9, 9, 9] = np.inf
    return a


@pytest.mark.parametrize("name", ["ct.mha", "ct.nrrd", "ct.nii.gz", "ct.nii", "ct64.nii.gz"])
def test_nan_and_inf_voxels_are_refused_by_every_reader(tmp_path: Path, name: str) -> None:
    """One policy for every format: refuse, with the count, the first voxel and what to do.
    (ITK's NIfTI reader alone would return them as 0 HU, water.)"""
    import SimpleITK as sitk

    a = _with_nonfinite()
    path = tmp_path / name
    if name == "ct64.nii.gz":  # float64 written by nibabel, (i, j, k) = (x, y, z) order
        _nifti(path, a.transpose(2, 1, 0).astype(np.float64))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    for allow_non_hu in (False, True):  # not an intensity check: --allow-non-hu does not skip it
        with pytest.raises(InputError) as err:
            read_ct(path, allow_non_hu=allow_non_hu)
        msg = str(err.value)
        assert msg.startswith(f"{path}: 2 of 4096 voxels are NaN or infinite"), msg
        assert "(z, y, x) = (6, 7, 8)" in msg and "replace them" in msg and "save it again" in msg
    with pytest.raises(InputError, match="NaN or infinite"):
        read_label_map(path)
    a[6, 7, 8] = a[9, 9, 9] = -1000.0  # the same file without them reads
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "ok.mha"))
    assert np.isfinite(read_ct(tmp_path / "ok.mha").array).all()


def test_nan_in_an_array_is_refused_on_the_slicer_path() -> None:
    from fvlm_core.io import check_hu

    a = _with_nonfinite()
    g = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE)
    for allow_non_hu in (False, True):
        with pytest.raises(InputError, match=r"slicer volume: 2 of 4096 voxels are NaN or infinite"):
            ct_from_array(a, g, source="slicer volume", allow_non_hu=allow_non_hu)
    with pytest.raises(InputError, match=r"NaN or infinite.*replace them"):
        check_hu(np.full((4, 4, 4), np.nan, np.float32), "all nan")  # was: "holds no finite values."
    with pytest.raises(InputError, match="holds no voxels"):
        check_hu(np.zeros((0, 4, 4), np.float32), "empty")
