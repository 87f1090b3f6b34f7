"""`fvlm analyze --dicom-out`: DICOM SEG, Comprehensive 3D SR (TID 1500) and Parametric Maps,
read back by tools no one here wrote.

* dciodvfy (dicom3tools: Debian's package, which .ci/run installs) must report no error;
* pydicom and highdicom read every object;
* dcmqi's segimage2itkimage, tid1500reader and paramap2itkimage -- what 3D Slicer's
  QuantitativeReporting runs to load SEG, SR TID 1500 and Parametric Maps -- read them, and what
  they read equals the NIfTI outputs and the results JSON.

Data: the shared TotalSegmentator example series (a real CT; its UIDs were emptied by
de-identification, so it is refused as it is and used through a copy with its identifiers
restored) with its TotalSegmentator label map, and a synthetic two-series study written with
pydicom. The model is a tiny random-weight one: the tests check the objects, not the findings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_study import Study, restore_identifiers, write_ct_series

from fvlm_core.anatomy import EXTENDED_CATALOG
from fvlm_core.calibration import Calibration
from fvlm_core.errors import OutputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import write_image
from fvlm_training.cli import main

ANATOMIES = ["lung", "heart", "esophagus", "aorta", "liver", "spleen"]
FINDINGS = [
    {"name": "Emphysema", "anatomy": "lung"},
    {"name": "Pleural effusion", "anatomy": "lung"},
    {"name": "Cardiomegaly", "anatomy": "heart"},
    {"name": "Arterial wall calcification", "anatomy": "aorta"},
    {
        "name": "Hepatic steatosis",
        "anatomy": "liver",
        "positive": ["Fatty liver."],
        "negative": ["Normal liver."],
    },
]
CALIBRATED = ("Emphysema", "Arterial wall calcification")  # the others: uncalibrated scores
DCMQI = (
    shutil.which("segimage2itkimage") and shutil.which("tid1500reader") and shutil.which("paramap2itkimage")
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_model_config) -> Path:
    """A tiny random-weight model on 6 anatomies, two of its findings calibrated."""
    import torch

    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dicom-model") / "model"
    platt = Calibration("platt", "test", a=0.5, b=-1.0).to_dict()
    FVLM(small_model_config(anatomies=ANATOMIES, findings=FINDINGS)).save_pretrained(
        folder, thresholds={n: 0.3 for n in CALIBRATED}, calibration={n: platt for n in CALIBRATED}
    )
    return folder


def analyze(*argv: str) -> int:
    return main(["analyze", *argv, "--device", "cpu", "--quiet"])


@pytest.fixture(scope="module")
def shared_run(ts_dir, model_dir, tmp_path_factory) -> dict:
    """The shared series (identifiers restored) analysed with its TotalSegmentator label map:
    DICOM objects with maps of every finding, the same maps as NIfTI, and the anatomy label map
    that `fvlm segment` writes."""
    root = tmp_path_factory.mktemp("dicom-shared")
    restore_identifiers(ts_dir / "example_ct_dicom", root / "ct", "fvlm-dicom-test")
    labels = ts_dir / "example_seg_dicom.nii.gz"
    common = ["--segmentation", str(labels), "--model", str(model_dir)]
    assert analyze(str(root / "ct"), *common, "--dicom-out", str(root / "dicom"), "--dicom-maps", "--all-maps",
                   "--maps-dir", str(root / "maps"), "--out", str(root / "results.json")) == 0  # fmt: skip
    segment = ["segment", str(root / "ct"), "--backend", "labelmap", "--labelmap", str(labels)]
    assert main([*segment, "--catalog", "extended", "--out", str(root / "anatomy.nii.gz")]) == 0
    return {"root": root, "results": json.loads((root / "results.json").read_text())}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A synthetic study of two CT series (32 slices; every other slice of them) and the phantom's
    anatomy label map on the second one's grid."""
    from fvlm_core.data.synth import make_phantom

    root = tmp_path_factory.mktemp("dicom-study")
    s = make_phantom(7, 0, "valid", (32, 32, 32))
    st = Study.new("fvlm-synthetic-study")
    full = write_ct_series(root / "study", s.hu, s.geometry, st, 2, "full")
    sx, sy, sz = s.geometry.spacing
    coarse_geometry = Geometry((32, 32, 16), (sx, sy, 2 * sz), s.geometry.origin, s.geometry.direction)
    coarse = write_ct_series(root / "study", s.hu[::2], coarse_geometry, st, 3, "coarse")
    labels = np.where(s.labels <= 4, s.labels, 0).astype(np.uint8)[::2]  # lung, heart, esophagus, aorta
    write_image(labels, coarse_geometry, root / "coarse_seg.nii.gz")
    return {"root": root, "study": st, "full": full, "coarse": coarse, "geometry": coarse_geometry}


# ---------------------------------------------------------------- helpers


def objects(folder: Path) -> list[Path]:
    return [folder / "seg.dcm", folder / "sr.dcm", *sorted((folder / "maps").glob("*.dcm"))]


def source_by_position(folder: Path) -> list[pydicom.Dataset]:
    """The source headers in increasing slice position (the CT grid's order for axial LPS series)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()]
    return sorted(headers, key=lambda d: float(d.ImagePositionPatient[2]))


def sr_tree(item) -> list:
    """Every content item of an SR, depth first."""
    out = []
    for child in item.get("ContentSequence", []):
        out.append(child)
        out += sr_tree(child)
    return out


def concept(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def groups_of(sr) -> list:
    return [i for i in sr_tree(sr) if i.ValueType == "CONTAINER" and concept(i) == ("DCM", "125007")]


def on_grid_of(image_path: Path, reference_path: Path) -> np.ndarray:
    """An image resampled (nearest) onto a reference image's grid by physical position, 0 outside."""
    image, reference = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(reference_path))
    return sitk.GetArrayFromImage(
        sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )


# ---------------------------------------------------------------- the shared series


def test_dciodvfy_reports_no_error_on_any_object(shared_run, study, model_dir, tmp_path):
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip(
            "dciodvfy not found: install Debian's dicom3tools (apt-get install dicom3tools; .ci/run does)"
        )
    out = tmp_path / "dicom"
    assert analyze(str(study["root"] / "study"), "--series", study["coarse"], "--segmentation",
                   str(study["root"] / "coarse_seg.nii.gz"), "--model", str(model_dir), "--dicom-out", str(out),
                   "--dicom-maps", "--out", str(tmp_path / "r.json")) == 0  # fmt: skip
    for path in [*objects(shared_run["root"] / "dicom"), *objects(out)]:
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        lines = (report.stdout + report.stderr).splitlines()
        assert lines and not [x for x in lines if x.startswith("Error")], f"{path.name}:\n" + "\n".join(lines)
        kind = {"seg.dcm": "Segmentation", "sr.dcm": "Comprehensive3DSR"}.get(path.name, "ParametricMap")
        assert kind in lines, lines  # dciodvfy recognised the IOD it checked


def test_seg_segments_are_the_nifti_label_map_on_the_source_series(shared_run):
    import highdicom as hd

    root, results = shared_run["root"], shared_run["results"]
    seg = hd.seg.segread(root / "dicom" / "seg.dcm")
    segments = results["dicom"]["seg"]["segments"]
    assert sorted(segments.values()) == ["aorta", "liver", "spleen"]  # the model's anatomies in this CT
    source = source_by_position(root / "ct")
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "anatomy.nii.gz")))  # on the CT grid
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in source],
        segment_numbers=[int(n) for n in segments],
        combine_segments=False,
    )
    for i, (number, anatomy) in enumerate(segments.items()):
        description = seg.get_segment_description(int(number))
        code = description.segmented_property_type
        assert (code.scheme_designator, code.value) == ("SCT", EXTENDED_CATALOG[anatomy].snomed[0])
        assert description.segmented_property_category.value == "123037004"
        expected = nifti == EXTENDED_CATALOG.label(anatomy)
        assert expected.any() and np.array_equal(masks[..., i].astype(bool), expected), anatomy
    # every frame references the source image it lies on
    by_uid = {d.SOPInstanceUID: d for d in source}
    for frame in pydicom.dcmread(
        root / "dicom" / "seg.dcm", stop_before_pixels=True
    ).PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert frame.PlanePositionSequence[0].ImagePositionPatient == by_uid[ref].ImagePositionPatient


@pytest.mark.skipif(not DCMQI, reason="dcmqi not installed (pip install dcmqi; the test extra has it)")
def test_slicer_quantitative_reporting_reads_the_seg_voxels(shared_run, tmp_path):
    """dcmqi's segimage2itkimage is what QuantitativeReporting runs to load a SEG into Slicer."""
    root, segments = shared_run["root"], shared_run["results"]["dicom"]["seg"]["segments"]
    subprocess.run(["segimage2itkimage", "--inputDICOM", str(root / "dicom" / "seg.dcm"), "--outputDirectory",
                    str(tmp_path), "--outputType", "nifti"], check=True, capture_output=True)  # fmt: skip
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "anatomy.nii.gz")))
    meta = json.loads((tmp_path / "meta.json").read_text())
    for group in meta["segmentAttributes"]:
        (attributes,) = group
        anatomy = segments[str(attributes["labelID"])]
        assert (
            attributes["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
            == EXTENDED_CATALOG[anatomy].snomed[0]
        )
        read = on_grid_of(tmp_path / f"{attributes['labelID']}.nii.gz", root / "anatomy.nii.gz")
        assert np.array_equal(read > 0, nifti == EXTENDED_CATALOG.label(anatomy)), anatomy


def test_sr_values_are_the_results_json(shared_run, model_dir):
    import highdicom as hd

    root, results = shared_run["root"], shared_run["results"]
    sr = pydicom.dcmread(root / "dicom" / "sr.dcm")
    seg = pydicom.dcmread(root / "dicom" / "seg.dcm", stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert results["dicom"]["model"]["weights_sha256"] == digest
    anatomies = {a["name"]: a for a in results["anatomies"]}
    segments = {int(n): a for n, a in results["dicom"]["seg"]["segments"].items()}
    groups = groups_of(sr)
    assert len(groups) == len(segments)
    seen = 0
    for group in groups:
        items = group.ContentSequence
        ref = next(i for i in items if i.ValueType == "IMAGE").ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        anatomy = anatomies[segments[ref.ReferencedSegmentNumber]]
        tracking = next(i for i in items if concept(i) == ("DCM", "112040")).UID
        assert tracking == seg.SegmentSequence[ref.ReferencedSegmentNumber - 1].TrackingUID
        algorithm = {concept(i): i.TextValue for i in sr_tree(group) if i.ValueType == "TEXT"}
        assert algorithm[("DCM", "111001")] == "fvlm-tiny" and algorithm[("DCM", "111003")] == digest
        volume = next(i for i in items if concept(i) == ("SCT", "118565006"))
        assert volume.MeasuredValueSequence[0].FloatingPointValue == anatomy["volume_ml"]
        evaluations = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in items if i.ValueType == "CODE"
                       and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99FVLM"}  # fmt: skip
        assert sorted(evaluations) == sorted(f["name"] for f in anatomy["findings"])
        for f in anatomy["findings"]:
            item = evaluations[f["name"]]
            assert item.ConceptCodeSequence[0].CodeMeaning == ("Yes" if f["flagged"] else "No")
            numbers = {
                concept(p): p.MeasuredValueSequence[0].FloatingPointValue for p in item.ContentSequence
            }
            scale = ("DCM", "122157") if f["scale"] == "probability" else ("SCT", "246262008")
            assert numbers == {scale: f["value"], ("DCM", "122411"): f["threshold"]}
            assert all(p.RelationshipType == "HAS PROPERTIES" for p in item.ContentSequence)
            seen += 1
    assert seen == 2  # aorta: calibrated probability; liver: uncalibrated score
    # highdicom reads it as a TID 1500 report with one volumetric group per segment
    report = hd.sr.srread(root / "dicom" / "sr.dcm")
    read = report.content.get_volumetric_roi_measurement_groups()
    assert sorted(g.tracking_identifier for g in read) == ["Aorta", "Liver", "Spleen"]


def test_sr_and_seg_reference_the_source_series_and_copy_its_patient_and_study(shared_run):
    root, results = shared_run["root"], shared_run["results"]
    source = source_by_position(root / "ct")
    seg = pydicom.dcmread(root / "dicom" / "seg.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(root / "dicom" / "sr.dcm")
    maps = [pydicom.dcmread(p, stop_before_pixels=True) for p in objects(root / "dicom")[2:]]
    evidence = {
        series.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence}
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert evidence == {
        source[0].SeriesInstanceUID: {d.SOPInstanceUID for d in source},
        seg.SeriesInstanceUID: {seg.SOPInstanceUID},
    }
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    new = [seg, sr, *maps]
    uids = [d.SOPInstanceUID for d in new] + [d.SeriesInstanceUID for d in new[:2]]
    old = {d.SOPInstanceUID for d in source} | {source[0].SeriesInstanceUID}
    assert len(set(uids)) == len(uids) and not set(uids) & old
    for d in new:
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "AccessionNumber"):  # fmt: skip
            assert d.get(keyword) == source[0].get(keyword), keyword
        assert d.FrameOfReferenceUID == source[0].FrameOfReferenceUID if "FrameOfReferenceUID" in d else True
    assert results["dicom"]["source_series"] == source[0].SeriesInstanceUID


def test_parametric_maps_equal_the_nifti_maps_frame_by_source_image(shared_run):
    root, results = shared_run["root"], shared_run["results"]
    source = source_by_position(root / "ct")
    slot = {d.SOPInstanceUID: k for k, d in enumerate(source)}
    files = {(m["anatomy"], m["finding"]): m["file"] for m in results["dicom"]["maps"]}
    nifti = {(m["anatomy"], m["finding"]): m["file"] for m in results["similarity_maps"]}
    assert sorted(files) == sorted(nifti) and len(files) == 2  # --all-maps: every scored finding
    for key, file in files.items():
        pm = pydicom.dcmread(root / "dicom" / file)
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.NumberOfFrames == len(source)
        frames = np.frombuffer(pm.FloatPixelData, "<f4").reshape(pm.NumberOfFrames, pm.Rows, pm.Columns)
        volume = np.zeros_like(frames)
        for frame, item in zip(frames, pm.PerFrameFunctionalGroupsSequence):
            volume[slot[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]] = (
                frame
            )
        expected = sitk.GetArrayFromImage(sitk.ReadImage(nifti[key]))
        assert expected.max() > 0 and np.array_equal(volume, expected), key
        anatomy = pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
        assert anatomy.AnatomicRegionSequence[0].CodeValue == EXTENDED_CATALOG[key[0]].snomed[0]


@pytest.mark.skipif(not DCMQI, reason="dcmqi not installed (pip install dcmqi; the test extra has it)")
def test_slicer_quantitative_reporting_reads_the_sr_and_the_maps(shared_run, tmp_path):
    """tid1500reader and paramap2itkimage: QuantitativeReporting's readers (DCMTK checks the SR's
    content tree against the Comprehensive 3D SR relationship rules while reading)."""
    root, results = shared_run["root"], shared_run["results"]
    done = subprocess.run(["tid1500reader", "--inputDICOM", str(root / "dicom" / "sr.dcm"), "--outputMetadata",
                           str(tmp_path / "sr.json")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "E:" not in done.stdout + done.stderr, done.stdout + done.stderr
    measured = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    anatomies = {a["name"]: a for a in results["anatomies"]}
    for group in measured:
        anatomy = anatomies[results["dicom"]["seg"]["segments"][str(group["ReferencedSegment"])]]
        (volume,) = group["measurementItems"]
        assert float(volume["value"]) == pytest.approx(anatomy["volume_ml"], rel=1e-6)
        flags = {
            q["conceptCode"]["CodeMeaning"]: q["conceptValue"]["CodeMeaning"]
            for q in group.get("qualitativeEvaluations", [])
        }
        assert flags == {f["name"]: "Yes" if f["flagged"] else "No" for f in anatomy["findings"]}
        assert (
            group["measurementAlgorithmIdentification"]["AlgorithmVersion"]
            == results["dicom"]["model"]["weights_sha256"]
        )
    for m, n in zip(results["dicom"]["maps"], results["similarity_maps"]):
        out = tmp_path / m["anatomy"]
        out.mkdir()
        subprocess.run(["paramap2itkimage", "--inputDICOM", str(root / "dicom" / m["file"]), "--outputDirectory",
                        str(out)], check=True, capture_output=True)  # fmt: skip
        expected = sitk.GetArrayFromImage(sitk.ReadImage(n["file"]))
        read = sitk.ReadImage(str(out / "pmap.nrrd"))
        assert read.GetOrigin() == pytest.approx(sitk.ReadImage(n["file"]).GetOrigin(), abs=1e-3)
        assert np.array_equal(sitk.GetArrayFromImage(read), expected), m["file"]  # not flipped
        assert json.loads((out / "meta.json").read_text())["QuantityValueCode"]["CodeValue"] == "246262008"


# ---------------------------------------------------------------- the synthetic study, refusals


def test_the_chosen_series_of_a_study_is_referenced_and_new_uids_every_run(study, model_dir, tmp_path):
    root, st = study["root"], study["study"]
    argv = [str(root / "study"), "--series", study["coarse"], "--segmentation", str(root / "coarse_seg.nii.gz"),
            "--model", str(model_dir)]  # fmt: skip
    for run in ("a", "b"):
        assert analyze(*argv, "--dicom-out", str(tmp_path / run), "--out", str(tmp_path / f"{run}.json")) == 0
    seg_a, seg_b = (pydicom.dcmread(tmp_path / r / "seg.dcm", stop_before_pixels=True) for r in "ab")
    sr_a, sr_b = (pydicom.dcmread(tmp_path / r / "sr.dcm") for r in "ab")
    assert len({d.SOPInstanceUID for d in (seg_a, seg_b, sr_a, sr_b)}) == 4
    assert len({d.SeriesInstanceUID for d in (seg_a, seg_b, sr_a, sr_b)}) == 4
    coarse = {d.SOPInstanceUID for d in (pydicom.dcmread(f) for f in (root / "study").glob("coarse_*"))}
    referenced = {
        i.ReferencedSOPInstanceUID
        for s in seg_a.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert seg_a.ReferencedSeriesSequence[0].SeriesInstanceUID == study["coarse"] and referenced == coarse
    assert len(coarse) == 16
    for d in (seg_a, sr_a):
        assert (d.StudyInstanceUID, d.PatientName, d.PatientID, d.PatientBirthDate, d.AccessionNumber) == (
            st.study_uid,
            st.patient_name,
            st.patient_id,
            st.birth_date,
            st.accession,
        )
    results = json.loads((tmp_path / "a.json").read_text())
    assert results["dicom_series"] == study["coarse"]
    assert sorted(results["dicom"]["seg"]["segments"].values()) == ["aorta", "esophagus", "heart", "lung"]


def _refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_file_ct_is_refused_before_the_work(study, tmp_path, capsys):
    import SimpleITK as sitk_

    image = sitk_.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    sitk_.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    code = analyze(str(tmp_path / "ct.nii.gz"), "--model", str(tmp_path / "no-model"), "--dicom-out",
                   str(tmp_path / "d"), "--out", str(tmp_path / "r.json"))  # fmt: skip
    _refused(capsys, code, "must be a DICOM series folder, not a file")  # before the model is even looked at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_the_shared_series_without_identifiers_is_refused_before_the_work(ts_dir, tmp_path, capsys):
    code = analyze(str(ts_dir / "example_ct_dicom"), "--model", str(tmp_path / "no-model"), "--dicom-out",
                   str(tmp_path / "d"), "--out", str(tmp_path / "r.json"))  # fmt: skip
    _refused(capsys, code, "Study Instance UID is empty in all 20 files", "SOP Instance UID is empty in all 20",
             "Series Instance UID is empty", "Without --dicom-out, fvlm analyze reads this series as it is")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_mixed_series_and_a_missing_attribute_are_refused(study, tmp_path, capsys):
    mixed, missing = tmp_path / "mixed", tmp_path / "missing"
    for folder, change in ((mixed, "study"), (missing, "frame")):
        shutil.copytree(study["root"] / "study", folder, ignore=shutil.ignore_patterns("full_*"))
        first = sorted(folder.iterdir())[3]
        ds = pydicom.dcmread(first)
        if change == "study":
            ds.StudyInstanceUID = pydicom.uid.generate_uid()
        else:
            del ds.FrameOfReferenceUID
        ds.save_as(first)
    common = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json")]
    _refused(capsys, analyze(str(mixed), "--dicom-out", str(tmp_path / "d1"), *common),
             "the files mix 2 values of Study Instance UID")  # fmt: skip
    _refused(capsys, analyze(str(missing), "--dicom-out", str(tmp_path / "d2"), *common),
             "Frame of Reference UID is missing or empty in 1 of 16 files (e.g. coarse_0003.dcm)")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing", "mixed"]


def test_an_existing_output_folder_is_refused_and_nothing_is_written(study, model_dir, tmp_path, capsys):
    (tmp_path / "dicom").mkdir()  # empty: refused all the same (DICOM outputs never mix with earlier ones)
    argv = [str(study["root"] / "study"), "--series", study["coarse"], "--segmentation",
            str(study["root"] / "coarse_seg.nii.gz"), "--model", str(model_dir)]  # fmt: skip
    code = analyze(*argv, "--dicom-out", str(tmp_path / "dicom"), "--out", str(tmp_path / "r.json"))
    _refused(capsys, code, "--dicom-out", "already exists; give a folder that does not exist yet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom"] and not list(
        (tmp_path / "dicom").iterdir()
    )
    code = analyze(*argv, "--dicom-maps", "--out", str(tmp_path / "r.json"))
    _refused(capsys, code, "--dicom-maps adds the maps to the DICOM objects: give --dicom-out FOLDER too")


def test_all_or_nothing_and_the_umask(study, model_dir, tmp_path, monkeypatch, capsys):
    import fvlm_core.dicom.export as export

    argv = [str(study["root"] / "study"), "--series", study["coarse"], "--segmentation",
            str(study["root"] / "coarse_seg.nii.gz"), "--model", str(model_dir), "--out", str(tmp_path / "r.json")]  # fmt: skip
    real = export.build_report

    def fail_after_the_seg(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "build_report", fail_after_the_seg)
    _refused(capsys, analyze(*argv, "--dicom-out", str(tmp_path / "dicom")), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the JSON nor a partial folder
    monkeypatch.setattr(export, "build_report", real)
    old = os.umask(0o027)
    try:
        assert analyze(*argv, "--dicom-out", str(tmp_path / "dicom")) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "dicom").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "dicom").iterdir()} == {0o640}


def test_export_analysis_is_the_whole_export_in_one_call(study, model_dir, tmp_path):
    """What 3D Slicer's "Export to DICOM" calls: the series' files (from its DICOM database, any
    order), the CT grid, the label map, the results JSON; a new folder, all at once."""
    from fvlm_core.anatomy import get_catalog
    from fvlm_core.dicom import Algorithm, export_analysis
    from fvlm_core.io import read_ct, read_label_map

    root = study["root"]
    argv = [str(root / "study"), "--series", study["coarse"], "--segmentation", str(root / "coarse_seg.nii.gz"),
            "--model", str(model_dir), "--dicom-out", str(tmp_path / "cli"), "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert analyze(*argv) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    files = sorted((root / "study").glob("coarse_*"), reverse=True)
    ct = read_ct(root / "study", series=study["coarse"])
    labels = read_label_map(root / "coarse_seg.nii.gz", ct.geometry).array
    call = dict(
        model_dir=model_dir,
        model_name="fvlm-tiny",
        segmenter=Algorithm("label map", "unknown", "SEMIAUTOMATIC", "manual"),
    )
    written = export_analysis(
        files, ct.geometry, results, labels, get_catalog(ANATOMIES), tmp_path / "lib", **call
    )
    assert written["seg"]["segments"] == results["dicom"]["seg"]["segments"]
    assert written["model"] == results["dicom"]["model"]
    cli, lib = (pydicom.dcmread(tmp_path / d / "seg.dcm") for d in ("cli", "lib"))
    assert lib.PixelData == cli.PixelData and lib.SOPInstanceUID != cli.SOPInstanceUID
    numbers = [[i.MeasuredValueSequence[0].FloatingPointValue for i in sr_tree(pydicom.dcmread(tmp_path / d / "sr.dcm"))
                if i.ValueType == "NUM"] for d in ("cli", "lib")]  # fmt: skip
    assert numbers[0] == numbers[1] and len(numbers[0]) > 4
    with pytest.raises(OutputError, match="already exists"):
        export_analysis(files, ct.geometry, results, labels, get_catalog(ANATOMIES), tmp_path / "lib", **call)


def test_a_series_off_the_ct_grid_is_refused(study):
    """The files must lie on the grid the CT was read on (e.g. the folder changed meanwhile)."""
    from fvlm_core.dicom import read_source_series
    from fvlm_core.errors import InputError

    source = read_source_series(study["root"] / "study", study["coarse"])
    g = study["geometry"]
    assert [float(d.ImagePositionPatient[2]) for d in source.on_grid(g).datasets] == sorted(
        float(d.ImagePositionPatient[2]) for d in source.datasets
    )
    shifted = Geometry(
        g.size, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + g.spacing[2] / 2), g.direction
    )
    with pytest.raises(InputError, match="lies off the CT's slices"):
        source.on_grid(shifted)
    with pytest.raises(InputError, match="has 16 files, the CT read from it 15 slices"):
        source.on_grid(Geometry((32, 32, 15), g.spacing, g.origin, g.direction))
