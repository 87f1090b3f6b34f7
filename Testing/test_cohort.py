"""Your own labelled cohort: a folder of CTs (NIfTI, NRRD, MHA, DICOM series folders) and one CSV
with a row per scan. The CSV's rules (column matching, values, missing labels, reports), finding
the scans, and `fvlm evaluate` (reference and strict protocols, free-text findings from
--prompts, --store-thresholds) and `fvlm prepare` end to end with a demo-size model."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from dicom_study import Study, write_ct_series

from fvlm_core.data.cohort import read_cohort_csv
from fvlm_core.errors import DataError
from fvlm_training.cli import main
from fvlm_training.volume_source import VolumeSource

ANATOMIES = ["lung", "heart", "esophagus", "aorta"]
PROMPTS = [
    {"name": "Dense lung spot", "anatomy": "lung", "positive": ["Dense spot."], "negative": ["No spot."]}
]


def _write_csv(path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_columns_values_missing_labels_and_reports(tmp_path):
    path = tmp_path / "labels.csv"
    _write_csv(
        path,
        [
            ["scan", "pleural_effusion", "CARDIOMEGALY", "lung-nodule", "My finding", "report"],
            ["a", "1", "0.0", "", "yes", "Small effusion. Impression: Right pleural effusion."],
            ["b", "0", "NA", "1", "false", "Normal."],
        ],
    )
    t = read_cohort_csv(path)
    assert t.id_column == "scan" and t.report_columns == {"report": "report"}
    assert t.label_columns == {
        "pleural_effusion": "Pleural effusion",
        "CARDIOMEGALY": "Cardiomegaly",
        "lung-nodule": "Lung nodule",
        "My finding": "My finding",
    }
    assert t.unmatched == ["My finding"]
    (_, _, la, _), (_, _, lb, _) = t.rows
    assert la == {"Pleural effusion": 1, "Cardiomegaly": 0, "Lung nodule": None, "My finding": 1}
    assert lb == {"Pleural effusion": 0, "Cardiomegaly": None, "Lung nodule": 1, "My finding": 0}
    # a free-text finding named in --prompts is a known finding then
    assert read_cohort_csv(path, ["My finding", "Pleural effusion"]).unmatched == [
        "CARDIOMEGALY",
        "lung-nodule",
    ]

    bad = [
        (
            [["scan", "Emphysema"], ["a", "maybe"]],
            r"1 cell\(s\) are not labels, in column\(s\) 'Emphysema' \(1\): line 2 \(a\), column 'Emphysema': 'maybe'",
        ),
        ([["scan", "Emphysema"], ["a", "1"], ["a", "0"]], "scan 'a' is on lines 2 and 3"),
        ([["scan", "Emphysema", "emphysema"], ["a", "1", "1"]], "both the finding 'Emphysema'"),
        ([["scan", "Emphysema"]], "no rows: the cohort is empty"),
        ([["scan"], ["a"]], "needs a scan id/path column then finding columns"),
    ]
    for rows, message in bad:
        _write_csv(path, rows)
        with pytest.raises(DataError, match=message):
            read_cohort_csv(path)


def _write_ras(path, hu: np.ndarray, geometry) -> None:
    """The same voxels stored right-to-left and anterior-to-posterior (x and y axes flipped)."""
    from fvlm_core.geometry import Geometry
    from fvlm_core.io import write_image

    g = geometry
    far = np.array(g.origin) + np.array([(g.size[0] - 1) * g.spacing[0], (g.size[1] - 1) * g.spacing[1], 0.0])
    flipped = Geometry(g.size, g.spacing, (far[0], far[1], g.origin[2]), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    write_image(np.ascontiguousarray(hu[:, ::-1, ::-1]), flipped, path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """8 phantoms as NIfTI, NRRD in a sub-folder, MHA stored RAS, and DICOM series folders; anatomy
    masks in masks/; a labels CSV naming scans by id or path, finding columns in other spellings,
    a free-text finding, one missing value and a report column."""
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.io import write_image

    root = tmp_path_factory.mktemp("cohort")
    masks = tmp_path_factory.mktemp("cohort_masks")
    rows = [["scan", "pleural_effusion", "cardiomegaly", "Dense lung spot", "Report"]]
    truth = {}
    for i in range(8):
        prevalence = {"Pleural effusion": 0.5, "Cardiomegaly": 0.5, "Emphysema": 0.5}
        s = make_phantom(21, i, "valid", (32, 32, 32), prevalence=prevalence, normal_fraction=0.0)
        name, hu = f"p{i:03d}", s.hu.astype(np.int16)
        kind = i % 4
        if kind == 0:
            write_image(hu, s.geometry, root / f"{name}.nii.gz")
        elif kind == 1:
            write_image(hu, s.geometry, root / "batch2" / f"{name}.nrrd")
        elif kind == 2:
            _write_ras(root / "ras" / f"{name}.mha", hu, s.geometry)
        else:
            write_ct_series(root / "dicom" / name, hu, s.geometry, Study.new(name), 1, "IM")
        write_image((s.labels * (s.labels <= 4)).astype(np.uint8), s.geometry, masks / f"{name}.nii.gz")
        labels = {f: int(f in s.findings) for f in ("Pleural effusion", "Cardiomegaly", "Emphysema")}
        truth[name] = labels
        cardio = "" if i == 3 else str(labels["Cardiomegaly"])  # not known for p003
        report = f"{s.report['Findings_EN']} IMPRESSION: {s.report['Impressions_EN']}"
        scan = "batch2/p001.nrrd" if i == 1 else name  # by path or by id
        rows.append([scan, str(labels["Pleural effusion"]), cardio, str(labels["Emphysema"]), report])
    _write_csv(root / "labels.csv", rows)
    write_image(hu, s.geometry, root / "batch2" / "unlisted.nii.gz")
    return root, masks, truth


def test_reader_finds_every_format_by_id_or_path_and_puts_ct_in_lps_order(cohort):
    from fvlm_core.data.labelled import DatasetOptions, detect_layout, open_dataset
    from fvlm_core.io import read_ct

    root, masks, truth = cohort
    assert detect_layout(root) == "cohort"
    reader = open_dataset(root, DatasetOptions(masks=str(masks), findings=("Dense lung spot",)))
    assert [r.name for r in reader.records] == sorted(truth) and not reader.skipped
    paths = {r.name: r.path.relative_to(root).as_posix() for r in reader.records}
    assert (
        paths["p001"] == "batch2/p001.nrrd"
        and paths["p002"] == "ras/p002.mha"
        and paths["p003"] == "dicom/p003"
    )
    assert all(r.mask_path == masks / f"{r.name}.nii.gz" for r in reader.records)
    p3 = reader.get("p003")
    assert p3.labels["Cardiomegaly"] is None and p3.labels["Dense lung spot"] == truth["p003"]["Emphysema"]
    assert p3.report["Impressions_EN"] and "IMPRESSION" not in p3.report["Findings_EN"]
    assert any("1 scan(s)" in n and "unlisted.nii.gz" in n for n in reader.notes)
    # the RAS-stored scan comes back in LPS order: the very voxels of the LPS-stored original
    ras = reader.read_ct(reader.get("p002"))
    lps = read_ct(root / "ras" / "p002.mha")
    assert lps.geometry.direction[0] == -1.0 and ras.geometry.direction == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    np.testing.assert_array_equal(ras.array, lps.array[:, ::-1, ::-1])
    np.testing.assert_allclose(
        ras.geometry.affine_lps @ [0, 0, 0, 1], lps.geometry.affine_lps @ [31, 31, 0, 1]
    )

    # --labels may name the CSV elsewhere; paths in it are relative to the CSV's folder or the cohort
    elsewhere = root.parent / f"{root.name}-labels.csv"
    shutil.copy(root / "labels.csv", elsewhere)
    other = open_dataset(
        root, DatasetOptions(labels=str(elsewhere), masks=str(masks), findings=("Dense lung spot",))
    )
    assert [r.name for r in other.records] == sorted(truth)


def test_unknown_column_missing_scan_and_empty_cohort_are_refused_before_any_work(cohort, tmp_path):
    root, masks, _ = cohort
    data = tmp_path / "c"
    shutil.copytree(root, data)
    shutil.copytree(masks, data / "masks")
    source = dict(masks_dir=data / "masks")
    with pytest.raises(DataError, match=r"column\(s\) 'Dense lung spot' match none of the findings") as e:
        VolumeSource(data, ANATOMIES, **source)
    assert "--prompts FILE" in str(e.value) and "--ignore-columns Dense lung spot" in str(e.value)
    assert VolumeSource(data, ANATOMIES, **source, ignore_columns=["Dense lung spot"]).names
    assert len(VolumeSource(data, ANATOMIES, **source, findings=["Dense lung spot"])) == 8

    with open(data / "labels.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["p999", "1", "0", "0", "Normal."])
    with pytest.raises(
        DataError, match=r"1 listed volume\(s\) cannot be evaluated, e.g. p999: no scan 'p999'"
    ):
        VolumeSource(data, ANATOMIES, **source, findings=["Dense lung spot"])
    _write_csv(data / "labels.csv", [["scan", "Pleural effusion"]])
    with pytest.raises(DataError, match="the cohort is empty"):
        VolumeSource(data, ANATOMIES, **source)
    (data / "labels.csv").unlink()
    with pytest.raises(DataError, match="not a dataset folder this project reads"):
        VolumeSource(data, ANATOMIES, **source)
    # the masks, inside the folder but not named with --masks, are scans as well: which one is meant?
    _write_csv(data / "labels.csv", [["scan", "Pleural effusion"], ["p000", "1"]])
    with pytest.raises(DataError, match=r"several scans are named 'p000': .*; give its path"):
        VolumeSource(data, ANATOMIES)
    # without masks: which segmentation to use is asked for, with what each gives
    shutil.rmtree(data / "masks")
    with pytest.raises(DataError, match=r"have no anatomy mask.*--backend builtin \(lungs only"):
        VolumeSource(data, ANATOMIES)


@pytest.mark.slow
def test_evaluate_calibrate_and_strict_on_a_cohort(cohort, tiny_model_dir, tmp_path):
    """Reference protocol with a free-text finding scored against its own column and a missing
    label left out; --store-thresholds stores the chosen thresholds (the free-text finding's too);
    strict protocol with the built-in segmenter, which finds the lungs only: the heart findings are
    named as not evaluable, the lung findings are evaluated."""
    root, masks, truth = cohort
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    base = ["evaluate", "--data", str(root), "--model", str(model), "--prompts", str(prompts)]
    base += ["--n-bootstrap", "20", "--no-plots", "--device", "cpu"]
    out = tmp_path / "reference"
    assert main([*base, "--masks", str(masks), "--out", str(out), "--store-thresholds"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["labels"]) == {"Pleural effusion", "Cardiomegaly", "Dense lung spot"}
    spot = rep["labels"]["Dense lung spot"]
    assert spot["n"] == 8 and spot["n_positive"] == sum(t["Emphysema"] for t in truth.values())
    cardio = rep["labels"]["Cardiomegaly"]
    assert cardio["n"] == 7 and cardio["n_positive"] == sum(
        t["Cardiomegaly"] for k, t in truth.items() if k != "p003"
    )
    notes = " ".join(rep["notes"])
    assert "Cardiomegaly: 1 volume(s) without a label (missing value) left out." in notes
    assert (
        "'pleural_effusion' -> Pleural effusion" in notes
        and "Emphysema: not evaluated (no ground truth" in notes
    )
    assert rep["split"]["description"] == "labelled cohort, 8 volumes"
    from fvlm_core.model.config import load_config

    stored = load_config(model)
    assert stored.thresholds["Dense lung spot"] == pytest.approx(spot["threshold"])
    # stored with the --prompts wording it was fitted on: used only for that wording
    fitted = stored.calibrated_with["Dense lung spot"]
    assert (fitted["positive"], fitted["negative"]) == (["Dense spot."], ["No spot."])
    assert fitted["text_identity"]

    out = tmp_path / "strict"
    calibration = tmp_path / "calibration"  # stands in for a split of other scans: the same ones copied
    shutil.copytree(root, calibration)
    argv = [
        *base,
        "--protocol",
        "strict",
        "--calibration",
        str(calibration),
        "--backend",
        "builtin",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert {"Pleural effusion", "Dense lung spot"} <= set(rep["labels"]) and "Cardiomegaly" not in rep[
        "labels"
    ]
    notes = " ".join(rep["notes"])
    assert "Cardiomegaly: not evaluated (its anatomy, heart, was segmented in none of the 8 volumes" in notes
    assert "the built-in segmenter, which finds the lungs only" in notes
    assert rep["labels"]["Pleural effusion"]["threshold_source"] != "roc-corner"


def test_prepare_a_cohort_then_evaluate_the_cache(cohort, tiny_model_dir, tmp_path):
    root, masks, truth = cohort
    cache = tmp_path / "cache"
    assert main(["prepare", "--dataset", str(root), "--masks", str(masks), "--out", str(cache)]) == 0
    summary = json.loads((cache / "_prepare" / "summary-cohort-0of1.json").read_text())
    assert summary["processed"] == 8 and any("Dense lung spot" in n for n in summary["notes"])
    p3 = json.loads((cache / "p003.json").read_text())
    assert "Cardiomegaly" not in p3["finding_labels"]  # missing: not stored as 0
    assert p3["finding_labels"]["Dense lung spot"] == truth["p003"]["Emphysema"]
    assert p3["texts"]["lung"] and p3["report"]  # the report column gives training texts
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = tmp_path / "rep"
    argv = ["evaluate", "--data", str(cache), "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    assert main([*argv, "--windows", "shared", "--out", str(out), "--n-bootstrap", "10", "--no-plots"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["labels"]["Cardiomegaly"]["n"] == 7 and rep["labels"]["Dense lung spot"]["n"] == 8
