"""`fvlm segment`: writes the anatomy label map on the CT's grid, prints/writes the summary."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from fvlm_core.io import read_ct, read_label_map
from fvlm_training.cli import main


def test_segment_builtin_writes_labelmap_on_ct_grid(tmp_path, ts_dir, capsys):
    ct_path = ts_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "out" / "anatomy.nii.gz"
    js = tmp_path / "summary.json"
    rc = main(["segment", str(ct_path), "--catalog", "extended", "--out", str(out), "--json", str(js)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lung" in printed and "absent" in printed and "partial" in printed
    ct = read_ct(ct_path)
    lab = read_label_map(out)
    assert lab.geometry.same_grid(ct.geometry)  # same size, spacing, origin, direction
    np.testing.assert_allclose(lab.geometry.affine_ras, ct.geometry.affine_ras, atol=1e-4)
    summary = json.loads(js.read_text())
    facts = {a["name"]: a for a in summary["anatomies"]}
    assert summary["backend"] == "builtin" and summary["catalog"] == "extended"
    assert facts["lung"]["present"] and facts["lung"]["cut_by_fov"]  # lung bases cut by the top slice
    assert facts["heart"]["present"] is False and facts["heart"]["voxels"] == 0
    assert facts["lung"]["voxels"] == int((lab.array == facts["lung"]["label"]).sum())
    assert facts["bone"]["volume_ml"] == facts["bone"]["voxels"] * 27 / 1000
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def segment_chest_ct(tmp_path, ts_dir, labelmap: str, mapping: dict, out) -> int:
    """``fvlm segment chest_ct.nii.gz --backend labelmap`` with ``labelmap`` read through ``mapping``."""
    p = tmp_path / "classes.json"
    p.write_text(json.dumps(mapping))
    args = ["--backend", "labelmap", "--labelmap", str(ts_dir / labelmap), "--class-map", str(p)]
    return main(["segment", str(ts_dir / "chest_ct.nii.gz"), *args, "--out", str(out)])


def test_segment_labelmap_backend_with_resampling(tmp_path, ts_dir):
    out = tmp_path / "a.nrrd"
    assert segment_chest_ct(tmp_path, ts_dir, "chest_aorta_cropped.nii.gz", {"1": "aorta"}, out) == 0
    lab = sitk.ReadImage(str(out))
    ct = sitk.ReadImage(str(ts_dir / "chest_ct.nii.gz"))
    assert lab.GetSize() == ct.GetSize()
    np.testing.assert_allclose(lab.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    arr = sitk.GetArrayFromImage(lab)
    assert set(np.unique(arr).tolist()) == {0, 4}  # aorta is anatomy 4 of the CT-RATE catalog
    crop = sitk.ReadImage(str(ts_dir / "chest_aorta_cropped.nii.gz"))
    ml_crop = sitk.GetArrayFromImage(crop).sum() * np.prod(crop.GetSpacing()) / 1000
    ml_out = (arr == 4).sum() * np.prod(lab.GetSpacing()) / 1000
    assert abs(ml_out - ml_crop) < 0.02 * ml_crop


def test_segment_fails_when_no_catalog_anatomy_is_found(tmp_path, ts_dir, capsys):
    out = tmp_path / "none.nii.gz"
    # the heart mask named as a class the CT-RATE catalog does not hold
    assert segment_chest_ct(tmp_path, ts_dir, "chest_heart.nii.gz", {"1": "spleen"}, out) == 2
    err = capsys.readouterr().err
    assert "none of the 'ctrate' catalog's anatomies" in err and "chest_ct.nii.gz" in err
    assert not out.exists()


def test_segment_option_errors(tmp_path, ts_dir, capsys):
    ct = str(ts_dir / "example_ct_sm.nii.gz")
    assert main(["segment", ct, "--backend", "labelmap", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "--labelmap" in capsys.readouterr().err
    rc = main(
        [
            "segment",
            ct,
            "--backend",
            "labelmap",
            "--labelmap",
            str(ts_dir / "chest_heart.nii.gz"),
            "--out",
            str(tmp_path / "y.nii.gz"),
        ]
    )
    assert rc == 2 and "does not overlap" in capsys.readouterr().err


def test_segment_builtin_without_catalog_anatomy_explains_backend_limits(tmp_path, ts_dir, capsys):
    # the pelvis half of example_ct holds no lungs: the builtin backend finds no CT-RATE anatomy
    img = sitk.ReadImage(str(ts_dir / "example_ct.nii.gz"))
    pelvis = tmp_path / "pelvis.nii.gz"
    sitk.WriteImage(img[:, :, :50], str(pelvis))
    out = tmp_path / "anatomy.nii.gz"
    rc = main(["segment", str(pelvis), "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "only lung and bone" in capsys.readouterr().err
    # with the extended catalog it finds bone and writes the label map on that grid
    assert main(["segment", str(pelvis), "--catalog", "extended", "--out", str(out)]) == 0
    assert read_label_map(out).geometry.same_grid(read_ct(pelvis).geometry)
