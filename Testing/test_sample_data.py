"""`fvlm sample-data` offline: a small tarball with the TotalSegmentator sdist layout, built from
the shared copies (the network is never used here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from fvlm_core.commands import sample_data
from fvlm_core.errors import DataError, InputError
from fvlm_training.cli import main

TOP = "totalsegmentator-2.18.0"


def _make_sdist(tmp_path: Path, ts_dir: Path, files: dict[str, Path], extra: bool = True) -> Path:
    """A .tar.gz laid out like the TotalSegmentator sdist, holding ``files`` (sdist path -> source)."""
    tarball = tmp_path / f"{TOP}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for inner, src in files.items():
            tar.add(src, arcname=f"{TOP}/{inner}")
        if extra:  # things that must NOT be extracted
            for inner in (
                "totalsegmentator/python_api.py",
                "tests/reference_files/example_mr_sm.nii.gz",
                "../evil.txt",
            ):
                data = b"not a sample"
                info = tarfile.TarInfo(f"{TOP}/{inner}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return tarball


def _layout(ts_dir: Path) -> dict[str, Path]:
    dicom = sorted((ts_dir / "example_ct_dicom").iterdir())[:2]
    files = {
        "LICENSE": ts_dir / "LICENSE",
        "tests/reference_files/example_ct_sm.nii.gz": ts_dir / "example_ct_sm.nii.gz",
        "tests/reference_files/example_seg.nii.gz": ts_dir / "example_seg.nii.gz",
        "tests/reference_files/pulmonary_report/models/heart.nii.gz": ts_dir / "chest_heart.nii.gz",
        "tests/reference_files/aorta_report/test_result/models/aorta.nii.gz": ts_dir
        / "chest_aorta_cropped.nii.gz",
    }
    files.update({f"tests/reference_files/example_ct_dicom/{p.name}": p for p in dicom})
    return files


def test_sample_data_extracts_only_the_examples_and_caches(tmp_path, ts_dir, capsys):
    sdist = _make_sdist(tmp_path, ts_dir, _layout(ts_dir))
    dest = tmp_path / "cache" / "sample-data"
    assert main(["sample-data", "--dest", str(dest), "--sdist", str(sdist)]) == 0
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    dicom = sorted(p.name for p in (ts_dir / "example_ct_dicom").iterdir())[:2]
    assert got == sorted(
        [
            "LICENSE",
            "NOTICE.txt",
            "example_ct_sm.nii.gz",
            "example_seg.nii.gz",
            "chest_heart.nii.gz",
            "chest_aorta_cropped.nii.gz",
            *[f"example_ct_dicom/{n}" for n in dicom],
        ]
    )
    assert (dest / "example_ct_sm.nii.gz").read_bytes() == (ts_dir / "example_ct_sm.nii.gz").read_bytes()
    assert (dest / "chest_heart.nii.gz").read_bytes() == (ts_dir / "chest_heart.nii.gz").read_bytes()
    assert "Apache License" in (dest / "LICENSE").read_text()
    assert "Apache" in (dest / "NOTICE.txt").read_text()
    assert not (tmp_path / "cache" / "evil.txt").exists()
    err = capsys.readouterr().err
    assert "extracting" in err  # tqdm progress bar

    # second run: already cached, nothing rewritten, no tarball needed
    mtime = (dest / "example_seg.nii.gz").stat().st_mtime_ns
    assert main(["sample-data", "--dest", str(dest), "--sdist", str(tmp_path / "missing.tar.gz")]) == 0
    assert "already" in capsys.readouterr().out
    assert (dest / "example_seg.nii.gz").stat().st_mtime_ns == mtime


def test_extracted_examples_are_usable(tmp_path, ts_dir):
    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.io import read_ct
    from fvlm_core.segmentation.choice import choose_backend, segment

    dest = tmp_path / "d"
    sample_data.fetch_sample_data(dest, _make_sdist(tmp_path, ts_dir, _layout(ts_dir)))
    ct = read_ct(dest / "example_ct_sm.nii.gz")
    seg = segment(ct, CTRATE_CATALOG, choose_backend("labelmap", labelmap=str(dest / "example_seg.nii.gz")))
    assert seg.facts["lung"].present


def test_sample_data_bad_tarballs(tmp_path, ts_dir):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match="not a readable source distribution"):
        sample_data.extract_samples(junk, tmp_path / "a", progress=False)
    empty = _make_sdist(tmp_path, ts_dir, {"LICENSE": ts_dir / "LICENSE"})
    with pytest.raises(DataError, match="none of the example files"):
        sample_data.extract_samples(empty, tmp_path / "b", progress=False)


def test_default_destination_and_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sample_data.default_dest() == tmp_path / "fvlm" / "sample-data"
    assert (
        sample_data._wanted(f"{TOP}/tests/reference_files/aorta_report/example_ct.nii.gz")
        == "chest_ct.nii.gz"
    )
    assert sample_data._wanted(f"{TOP}/tests/reference_files/example_ct.nii.gz") == "example_ct.nii.gz"
    assert (
        sample_data._wanted(f"{TOP}/tests/reference_files/aorta_report/test_result/models/ct.nii.gz") is None
    )
