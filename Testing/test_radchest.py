"""RAD-ChestCT as distributed: NPZ volumes written by the release's own preprocessing steps and the
abnormality x location label CSV in the release's format. Orientation (a marked left lung comes
out on the patient's left), the label mapping, clear errors, and `fvlm evaluate` / `fvlm prepare`
end to end with a demo-size model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from fvlm_core.data import radchest as rc
from fvlm_core.data.radchest_labels import read_radchest_labels
from fvlm_core.errors import DataError
from fvlm_training.cli import main

#: The release's 84 abnormalities (HLIP's merged imgtest.csv header) and 52 locations (the SARLE
#: labeler's location vocabulary, github:rachellea/sarle-labeler src/vocab/vocabulary_locations.py,
#: plus its other_location): the CSV has one column "abnormality*location" for each pair.
ABNORMALITIES = [
    "air_trapping",
    "airspace_disease",
    "aneurysm",
    "arthritis",
    "aspiration",
    "atelectasis",
    "atherosclerosis",
    "bandlike_or_linear",
    "breast_implant",
    "breast_surgery",
    "bronchial_wall_thickening",
    "bronchiectasis",
    "bronchiolectasis",
    "bronchiolitis",
    "bronchitis",
    "cabg",
    "calcification",
    "cancer",
    "cardiomegaly",
    "catheter_or_port",
    "cavitation",
    "chest_tube",
    "clip",
    "congestion",
    "consolidation",
    "coronary_artery_disease",
    "cyst",
    "debris",
    "deformity",
    "density",
    "dilation_or_ectasia",
    "distention",
    "emphysema",
    "fibrosis",
    "fracture",
    "gi_tube",
    "granuloma",
    "groundglass",
    "hardware",
    "heart_failure",
    "heart_valve_replacement",
    "hemothorax",
    "hernia",
    "honeycombing",
    "infection",
    "infiltrate",
    "inflammation",
    "interstitial_lung_disease",
    "lesion",
    "lucency",
    "lung_resection",
    "lymphadenopathy",
    "mass",
    "mucous_plugging",
    "nodule",
    "nodulegr1cm",
    "opacity",
    "other_path",
    "pacemaker_or_defib",
    "pericardial_effusion",
    "pericardial_thickening",
    "plaque",
    "pleural_effusion",
    "pleural_thickening",
    "pneumonia",
    "pneumonitis",
    "pneumothorax",
    "postsurgical",
    "pulmonary_edema",
    "reticulation",
    "scarring",
    "scattered_calc",
    "scattered_nod",
    "secretion",
    "septal_thickening",
    "soft_tissue",
    "staple",
    "stent",
    "sternotomy",
    "suture",
    "tracheal_tube",
    "transplant",
    "tree_in_bud",
    "tuberculosis",
]
LOCATIONS = [
    "left_upper",
    "left_mid",
    "left_lower",
    "right_upper",
    "right_mid",
    "right_lower",
    "right_lung",
    "left_lung",
    "lung",
    "airways",
    "heart",
    "mitral_valve",
    "aortic_valve",
    "tricuspid_valve",
    "pulmonary_valve",
    "aorta",
    "svc",
    "ivc",
    "pulmonary_artery",
    "pulmonary_vein",
    "right",
    "left",
    "anterior",
    "posterior",
    "superior",
    "inferior",
    "medial",
    "lateral",
    "interstitial",
    "subpleural",
    "centrilobular",
    "thyroid",
    "breast",
    "axilla",
    "chest_wall",
    "rib",
    "spine",
    "bone",
    "mediastinum",
    "diaphragm",
    "hilum",
    "abdomen",
    "esophagus",
    "stomach",
    "intestine",
    "liver",
    "gallbladder",
    "kidney",
    "adrenal_gland",
    "spleen",
    "pancreas",
    "other_location",
]

#: Where a phantom's finding is written in the abnormality x location table.
FINDING_CELLS = {
    "Pleural effusion": "pleural_effusion*left_lung",
    "Emphysema": "emphysema*lung",
    "Lung nodule": "nodule*right_lower",
    "Consolidation": "consolidation*left_lower",
    "Atelectasis": "atelectasis*right_lower",
    "Cardiomegaly": "cardiomegaly*heart",
    "Pericardial effusion": "pericardial_effusion*heart",
    "Arterial wall calcification": "calcification*aorta",
    "Coronary artery wall calcification": "calcification*heart",
    "Hiatal hernia": "hernia*diaphragm",
    "Lung opacity": "opacity*lung",
    "Lymphadenopathy": "lymphadenopathy*mediastinum",
    "Medical material": "catheter_or_port*svc",
}


def test_the_release_format_constants():
    assert len(ABNORMALITIES) == 84 and len(LOCATIONS) == 52 and len(set(LOCATIONS)) == 52


def write_label_csv(path, positives: dict[str, set[str]]) -> None:
    """An abnormality x location CSV as released: NoteAcc_DEID, then 84 x 52 columns of 0.0 / 1.0."""
    columns = [f"{a}*{loc}" for a in ABNORMALITIES for loc in LOCATIONS]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["NoteAcc_DEID", *columns])
        for acc, cells in positives.items():
            w.writerow([acc, *("1.0" if c in cells else "0.0" for c in columns)])


def release_array(hu_lps: np.ndarray, spacing_zyx, out_spacing: float = rc.SPACING_MM, label=False):
    """A volume as github:rachellea/ct-volume-preprocessing's preprocess_volumes.py makes it from a
    DICOM series (stand-in for running it on DICOM files; every step below is its code's).

    ``hu_lps`` (z, y, x): x to the patient's left, y posterior, z superior, i.e. the slices of a
    series with ImageOrientationPatient [1, 0, 0, 0, 1, 0] (asserted there). combine_slices puts
    ``pixel_array.T`` of each slice, sorted by position *descending*, into [column, row, slice];
    resample_volume makes a SimpleITK image of that array with spacing [z, yx, yx] (square pixels
    asserted) and resamples it with B-splines to 0.8 mm on the same origin (default value: the
    image's GetPixelIDValue()); then clip to [-1000, 1000], transpose [2, 1, 0], rint, int16.
    ``label``: a mask through the same axes with nearest neighbour (for test masks only).
    """
    assert spacing_zyx[1] == spacing_zyx[2]
    ctvol = np.transpose(hu_lps[::-1], (2, 1, 0)).astype(np.float32)  # [column, row, slice]
    image = sitk.GetImageFromArray(ctvol)
    original = [float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2])]
    image.SetSpacing(original)
    size = image.GetSize()
    out_shape = [int(np.round(size[i] * (original[i] / out_spacing))) for i in range(3)]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([out_spacing] * 3)
    f.SetSize(out_shape)
    f.SetOutputDirection(image.GetDirection())
    f.SetOutputOrigin(image.GetOrigin())
    f.SetTransform(sitk.Transform())
    f.SetDefaultPixelValue(0 if label else image.GetPixelIDValue())
    f.SetInterpolator(sitk.sitkNearestNeighbor if label else sitk.sitkBSpline)
    out = sitk.GetArrayFromImage(f.Execute(image))
    assert list(out.shape) == [out_shape[1], out_shape[2], out_shape[0]]
    if label:
        return np.transpose(out, (2, 1, 0)).astype(np.uint8)
    out = np.transpose(np.clip(out, -1000, 1000), (2, 1, 0))
    return np.rint(out).astype(np.int16)


def _lps_mm(ct, mask: np.ndarray) -> np.ndarray:
    """The LPS position (mm) of a mask's centroid on ``ct``'s grid."""
    zyx = np.argwhere(mask).mean(axis=0)
    return (ct.geometry.affine_lps @ np.array([zyx[2], zyx[1], zyx[0], 1.0]))[:3]


def test_geometry_follows_the_release_code_a_marker_lands_where_it_was(tmp_path):
    """A marker 14 mm left, 10 mm anterior and 12 mm superior of the volume centre comes out there
    (in LPS: +14, -10, +12) after the release's steps, resampling to 0.8 mm included; reading the
    array as stored (not reversing the slice axis) would put it 12 mm inferior: mirrored."""
    shape, spacing = (30, 40, 40), (2.0, 1.6, 1.6)
    z, y, x = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing))  # mm from the volume centre
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    hu = np.where((x / 28) ** 2 + (y / 24) ** 2 < 1, 0.0, -1000.0)
    marker = (14.0, -10.0, 12.0)  # x (left), y (posterior), z (superior)
    hu[(x - marker[0]) ** 2 + (y - marker[1]) ** 2 + (z - marker[2]) ** 2 < 25] = 800.0
    path = tmp_path / "tst00001.npz"
    np.savez_compressed(path, ct=release_array(hu, spacing))

    ct = rc.read_radchest_npz(path)
    assert ct.geometry.spacing == (0.8, 0.8, 0.8)
    assert ct.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    centre = ct.geometry.affine_lps @ np.array([*((np.array(ct.geometry.size) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)  # the volume is centred on the origin
    found = _lps_mm(ct, ct.array > 400)
    np.testing.assert_allclose(found, marker, atol=1.5)
    assert ct.array.min() == -1000 and ct.array.max() <= 1000  # the release's clipping

    # the assumption the test guards: the stored array runs superior -> inferior
    stored = np.load(path)["ct"]
    naive_z = (np.argwhere(stored > 400).mean(axis=0)[0] - (stored.shape[0] - 1) / 2) * 0.8
    assert naive_z == pytest.approx(-marker[2], abs=1.5)


def _phantom_with_marked_left_lung():
    """A synthetic chest (fvlm_core.data.synth, LPS with x to the patient's left) with a bright
    marker in the upper part of its left lung."""
    from fvlm_core.data.synth import make_phantom

    s = make_phantom(3, 0, "valid", (40, 48, 48), findings=[])
    hu, labels = s.hu.astype(np.float32), s.labels
    xs = np.arange(hu.shape[2])[None, None, :]
    lungs = labels == 1
    mid = np.argwhere(lungs)[:, 2].mean()
    left = lungs & (xs > mid)
    zyx = np.argwhere(left)
    top = zyx[zyx[:, 0] >= np.percentile(zyx[:, 0], 60)].mean(axis=0)
    z, y, x = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    sp = s.geometry.spacing_zyx
    d2 = sum(((a - c) * s_) ** 2 for a, c, s_ in zip((z, y, x), top, sp))
    hu[(d2 < 12.0**2) & left] = 1000.0
    return s, hu, left, lungs & ~left


def test_a_marked_left_lung_comes_out_on_the_left_in_lps_and_in_the_segmentation(tmp_path):
    """The phantom goes through the release's steps (here resampled to 6 mm, not 0.8, to stay
    small; the reader is told so); read back, its marker is on the patient's left and superior in
    LPS, and the built-in segmenter (which sides the lungs by the geometry) puts it in lung_left,
    which overlaps the phantom's own left lung taken through the same steps."""
    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.segmentation import get_backend

    s, hu, left, right = _phantom_with_marked_left_lung()
    sp = s.geometry.spacing_zyx
    path = tmp_path / "trn00001.npz"
    np.savez_compressed(path, ct=release_array(hu, sp, out_spacing=6.0))
    ct = rc.read_radchest_npz(path, spacing_mm=6.0)

    seg = get_backend("builtin").segment(ct, CTRATE_CATALOG)
    lung_left, lung_right = seg.classes["lung_left"], seg.classes["lung_right"]
    assert lung_left.sum() > 500 and lung_right.sum() > 500
    marker = ct.array > 900
    at = _lps_mm(ct, marker)
    lungs_at = _lps_mm(ct, lung_left | lung_right)
    assert at[0] > lungs_at[0] + 30  # patient's left is +x in LPS
    assert at[2] > lungs_at[2]  # placed in the upper part of the lung: superior is +z
    assert _lps_mm(ct, lung_left)[0] > _lps_mm(ct, lung_right)[0]
    assert np.linalg.norm(at - _lps_mm(ct, lung_left)) < np.linalg.norm(at - _lps_mm(ct, lung_right))
    # the phantom's left lung, through the same steps, is what the segmenter calls lung_left
    truth_left = release_array(left.astype(np.uint8), sp, 6.0, label=True)[::-1].astype(bool)
    truth_right = release_array(right.astype(np.uint8), sp, 6.0, label=True)[::-1].astype(bool)
    assert (lung_left & truth_left).sum() > 0.8 * lung_left.sum()
    assert (lung_left & truth_right).sum() < 0.02 * lung_left.sum()


def test_label_mapping_hlip_and_by_location(tmp_path):
    path = tmp_path / "imgtest_Abnormality_and_Location_Labels.csv"
    write_label_csv(
        path,
        {
            "tst1": {"calcification*aorta", "nodule*right_lower", "bronchial_wall_thickening*airways"},
            "tst2": {"calcification*lung", "hernia*abdomen", "groundglass*lung"},
            "tst3": {"hernia*diaphragm", "fibrosis*left_lower", "septal_thickening*interstitial"},
            "tst4": set(),
        },
    )
    hlip, other = read_radchest_labels(path, "hlip")
    loc, _ = read_radchest_labels(path, "location")
    assert set(hlip) == {"tst1", "tst2", "tst3", "tst4"}
    assert len(hlip["tst1"]) == 16 and "Mosaic attenuation pattern" not in hlip["tst1"]
    # HLIP: calcification anywhere feeds both calcification findings; a hernia anywhere is hiatal
    assert (
        hlip["tst1"]["Arterial wall calcification"] == hlip["tst1"]["Coronary artery wall calcification"] == 1
    )
    assert hlip["tst2"]["Arterial wall calcification"] == 1 and hlip["tst2"]["Hiatal hernia"] == 1
    # by location: aortic calcification is arterial, not coronary; a lung calcification is neither
    assert (
        loc["tst1"]["Arterial wall calcification"] == 1
        and loc["tst1"]["Coronary artery wall calcification"] == 0
    )
    assert loc["tst2"]["Arterial wall calcification"] == 0 and loc["tst2"]["Hiatal hernia"] == 0
    assert loc["tst3"]["Hiatal hernia"] == 1
    for m in (hlip, loc):
        assert m["tst1"]["Lung nodule"] == 1 and m["tst1"]["Peribronchial thickening"] == 1
        assert (
            m["tst3"]["Pulmonary fibrotic sequela"] == 1 and m["tst3"]["Interlobular septal thickening"] == 1
        )
        assert sum(m["tst4"].values()) == 0
        assert m["tst2"]["Lung opacity"] == 0  # ground glass is its own abnormality in RAD-ChestCT
    assert "groundglass" in other and "calcification" not in other and len(other) == 84 - 15


def test_bad_label_csvs_are_refused_clearly(tmp_path):
    path = tmp_path / "imgvalid_Abnormality_and_Location_Labels.csv"
    write_label_csv(path, {"val1": {"nodule*lung"}})
    text = path.read_text().replace("1.0", "2", 1)
    path.write_text(text)
    with pytest.raises(DataError, match=r"line 2 \(val1\), column 'nodule\*lung': '2'"):
        read_radchest_labels(path)
    path.write_text("NoteAcc_DEID,nodule,opacity\nval1,1,0\n")
    with pytest.raises(DataError, match="not a RAD-ChestCT label CSV"):
        read_radchest_labels(path)


# ------------------------------------------------------------------------------------------------
# A RAD-ChestCT folder end to end
# ------------------------------------------------------------------------------------------------


def _write_scan(root, masks, acc: str, sample) -> None:
    """The phantom's NPZ (its own voxel size stands for the release's 0.8 mm: small and fast; the
    reader calls it 0.8 mm) and an anatomy mask on the grid the reader gives the CT."""
    from fvlm_core.io import write_image

    sp = sample.geometry.spacing_zyx
    out = sp[1]
    (root / acc[:3]).mkdir(exist_ok=True)  # the release's archives unpack into sub-folders
    ct = release_array(sample.hu.astype(np.float32), sp, out)
    np.savez_compressed(root / acc[:3] / f"{acc}.npz", ct=ct)
    lab = release_array(sample.labels, sp, out, label=True)[::-1]
    write_image(np.ascontiguousarray(lab), rc.radchest_geometry(lab.shape), masks / f"{acc}.nii.gz")


@pytest.fixture(scope="module")
def radchest_dir(tmp_path_factory):
    from fvlm_core.data.synth import MASK_VALUES, make_phantom

    root = tmp_path_factory.mktemp("radchest")
    masks = tmp_path_factory.mktemp("radchest_masks")
    (masks / "class_map.json").write_text(json.dumps({str(v): k for k, v in MASK_VALUES.items()}))
    positives = {}
    prevalence = {"Pleural effusion": 0.5, "Cardiomegaly": 0.5, "Emphysema": 0.4}
    for i in range(8):
        s = make_phantom(11, i, "valid", (24, 32, 32), prevalence=prevalence, normal_fraction=0.0)
        acc = ("tst" if i < 5 else "val") + f"{30001 + i}"
        _write_scan(root, masks, acc, s)
        positives[acc] = {FINDING_CELLS[f] for f in s.findings}
    write_label_csv(
        root / "imgtest_Abnormality_and_Location_Labels.csv", {k: v for k, v in positives.items() if k < "u"}
    )
    write_label_csv(
        root / "imgvalid_Abnormality_and_Location_Labels.csv", {k: v for k, v in positives.items() if k > "u"}
    )
    return root, masks, positives


def test_reader_finds_scans_labels_and_masks(radchest_dir):
    from fvlm_core.data.labelled import DatasetOptions, detect_layout, open_dataset

    root, masks, positives = radchest_dir
    assert detect_layout(root) == "radchest"
    reader = open_dataset(root, DatasetOptions(masks=str(masks)))
    assert [r.name for r in reader.records] == sorted(positives) and not reader.skipped
    r = reader.get("tst30001")
    assert r.split == "test" and r.mask_path == masks / "tst30001.nii.gz" and r.scan_id == "tst30001"
    assert r.labels["Pleural effusion"] == int("pleural_effusion*left_lung" in positives["tst30001"])
    assert any("'hlip' mapping" in n for n in reader.notes)
    assert any("Mosaic attenuation pattern" in n for n in reader.notes)


def test_evaluate_a_radchest_folder_then_prepare_it_and_evaluate_the_cache(
    radchest_dir, tiny_model_dir, tmp_path
):
    """The reference protocol (eval.py's windows on the NPZ volumes, the masks' anatomies): the
    same per-label AUCs with CIs, metrics and calibration report as for CT-RATE; then `fvlm
    prepare` caches the folder and the cache evaluates with the same truth."""
    from fvlm_core.findings import FVLM_LABELS

    root, masks, positives = radchest_dir
    out = tmp_path / "report"
    argv = ["evaluate", "--data", str(root), "--masks", str(masks), "--model", str(tiny_model_dir)]
    assert main([*argv, "--out", str(out), "--n-bootstrap", "20", "--no-plots", "--device", "cpu"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["split"]["description"] == "RAD-ChestCT, 8 volumes" and rep["meta"]["layout"] == "radchest"
    assert set(rep["labels"]) == set(FVLM_LABELS) - {"Mosaic attenuation pattern"}
    effusion = rep["labels"]["Pleural effusion"]
    want = sum("pleural_effusion*left_lung" in p for p in positives.values())
    assert effusion["n"] == 8 and effusion["n_positive"] == want and 0 < want < 8
    assert len(effusion["auc_ci95"]) == 2 and rep["calibration"]["labels"]["Pleural effusion"]["n"] == 8
    notes = " ".join(rep["notes"])
    assert "Mosaic attenuation pattern: not evaluated (no ground truth for it in the data)" in notes
    assert "'hlip' mapping" in notes and "reversed slice axis" in notes
    report = (out / "report.md").read_text()
    assert "RAD-ChestCT, 8 volumes" in report and "## Calibration" in report

    cache = tmp_path / "cache"
    assert main(["prepare", "--dataset", str(root), "--masks", str(masks), "--out", str(cache)]) == 0
    summary = json.loads((cache / "_prepare" / "summary-radchest-0of1.json").read_text())
    assert summary["processed"] == 8 and not summary["failed"]
    sidecar = json.loads((cache / "tst30001.json").read_text())
    assert sidecar["texts"] == {} and sidecar["meta"]["texts"] == "none: no report"
    assert sidecar["finding_labels"]["Pleural effusion"] == int(
        "pleural_effusion*left_lung" in positives["tst30001"]
    )
    out2 = tmp_path / "report-cache"
    argv = ["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--windows", "shared"]
    assert main([*argv, "--out", str(out2), "--n-bootstrap", "20", "--no-plots", "--device", "cpu"]) == 0
    rep2 = json.loads((out2 / "metrics.json").read_text())
    assert rep2["labels"]["Pleural effusion"]["n_positive"] == want


def test_missing_and_unreadable_scans_are_refused_before_any_work(
    radchest_dir, tiny_model_dir, tmp_path, capsys
):
    import shutil

    root, masks, _ = radchest_dir
    data = tmp_path / "rad"
    shutil.copytree(root, data)
    (data / "val" / "val30007.npz").unlink()
    argv = ["evaluate", "--data", str(data), "--masks", str(masks), "--model", str(tiny_model_dir)]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert (
        "1 listed volume(s) cannot be evaluated, e.g. val30007: labelled in the CSV but no val30007.npz"
        in err
    )
    assert not (tmp_path / "r1").exists()

    np.savez_compressed(data / "val" / "val30007.npz", ct=np.zeros((4, 4, 4), np.int16))
    (data / "val" / "val30008.npz").write_bytes(b"PK\x03\x04 not a whole archive")
    assert main([*argv, "--out", str(tmp_path / "r2")]) == 2
    assert "val30008: " in (err := capsys.readouterr().err) and "not a zip archive" in err
    # an array stored under another key, or pickled objects (never unpickled)
    np.savez(data / "val" / "val30008.npz", image=np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match=r"no array 'ct' \(it holds: image\)"):
        rc.read_radchest_npz(data / "val" / "val30008.npz")
    np.savez(data / "val" / "val30008.npz", ct=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="not a readable RAD-ChestCT NPZ"):
        rc.read_radchest_npz(data / "val" / "val30008.npz")
    np.savez(data / "val" / "val30008.npz", ct=np.zeros((4, 4), np.int16))
    with pytest.raises(DataError, match="not a 3-D CT volume"):
        rc.read_radchest_npz(data / "val" / "val30008.npz")


def test_an_empty_label_csv_is_refused(tmp_path):
    from fvlm_core.data.labelled import open_dataset

    write_label_csv(tmp_path / "imgtest_Abnormality_and_Location_Labels.csv", {})
    with pytest.raises(DataError, match="no labelled scan"):
        open_dataset(tmp_path)
