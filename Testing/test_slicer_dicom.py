"""The panel's "Export to DICOM" (issue 31, item 2) and the module's terminology.

The CT is a phantom written as a DICOM series with pydicom (``dicom_study.py``), put into a
DICOM database and loaded from it as Slicer's ``DICOMScalarVolumePlugin`` does. slicer-core has
no ``ctkDICOMDatabase``: ``slicer_app.DICOMDatabase`` stands in for the calls the module makes
(``isOpen``, ``fileForInstance``, ``insert`` storing a copy in the database folder), checked
against CTK's sources (the class says where). What the panel writes into the database is
compared with ``fvlm analyze --dicom-out`` on the same series: the same SEG voxels, segments and
SR numbers, new UIDs.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import test_slicer_widget as panel_tests
from dicom_study import Study, write_ct_series
from test_slicer_widget import _choose, _idle, _run_until

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG
from fvlm_core.io import read_label_map, write_image

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
env, tiny_model, widget = panel_tests.env, panel_tests.tiny_model, panel_tests.widget
slicer_app = panel_tests.slicer_app  # FVLMSlicer/Testing: the stand-ins (DICOMDatabase, load_dicom_series)

#: What 3D Slicer's own terminology says of the catalog's anatomies: context, category code and
#: type code, transcribed from Slicer 583e9b3 (Modules/Loadable/Terminologies/Resources/
#: SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, and -DICOM-Master.json for the
#: pulmonary artery, which the General Anatomy list lacks).
GENERAL = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMICAL_STRUCTURE, TISSUE = "123037004", "85756007"
#: type codes of the General Anatomy list, all under Anatomical Structure
GENERAL_ANATOMY = {
    "lung": "39607008",
    "heart": "80891009",
    "esophagus": "32849002",
    "aorta": "15825003",
    "trachea": "44567001",
    "liver": "10200004",
    "gallbladder": "28231008",
    "spleen": "78961009",
    "pancreas": "15776009",
    "stomach": "69695003",
    "kidney": "64033007",
    "adrenal_gland": "23451007",
    "small_bowel": "30315005",
    "colon": "71854001",
    "urinary_bladder": "89837001",
    "thyroid_gland": "69748006",
    "prostate": "41216001",
}
SLICER_TERMINOLOGY = {name: (GENERAL, ANATOMICAL_STRUCTURE, code) for name, code in GENERAL_ANATOMY.items()}
SLICER_TERMINOLOGY["pulmonary_artery"] = (DICOM_MASTER, ANATOMICAL_STRUCTURE, "81040000")
SLICER_TERMINOLOGY["bone"] = (GENERAL, TISSUE, "272673000")  # Tissue, not Anatomical Structure


def test_terminology_puts_every_anatomy_where_slicers_terminology_does():
    """Bone under Tissue (as Slicer and the library's DICOM SEG have it), the rest under
    Anatomical Structure; the context that holds each code."""
    from FVLMSlicerLib.terminology import TerminologyEntry, anatomy_terminology, match_segment

    assert sorted(SLICER_TERMINOLOGY) == sorted(a.name for a in EXTENDED_CATALOG)
    for anatomy in EXTENDED_CATALOG:
        entry = TerminologyEntry.parse(anatomy_terminology(anatomy))
        assert (entry.context, entry.category.value, entry.type.value) == SLICER_TERMINOLOGY[anatomy.name]
        assert (entry.category.scheme, entry.category.meaning) == ("SCT", anatomy.category[2])
        assert match_segment(EXTENDED_CATALOG, "segment", anatomy_terminology(anatomy)) == anatomy.name
    bone = TerminologyEntry.parse(anatomy_terminology(EXTENDED_CATALOG["bone"]))
    assert bone.category.serialize() == "SCT^85756007^Tissue"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A phantom written as one CT series, and its anatomy label map (lung, heart, esophagus, aorta)."""
    from fvlm_core.data.synth import make_phantom

    root = tmp_path_factory.mktemp("slicer-dicom")
    s = make_phantom(7, 0, "valid", (32, 40, 40))
    uid = write_ct_series(root / "ct", s.hu, s.geometry, Study.new("fvlm-slicer-export"), 2, "chest")
    write_image(np.where(s.labels <= 4, s.labels, 0).astype(np.uint8), s.geometry, root / "labels.nii.gz")
    return {"root": root, "uid": uid}


@pytest.fixture
def database(tmp_path):
    """Slicer's DICOM database (the stand-in), as ``slicer.dicomDatabase``."""
    db = slicer_app.DICOMDatabase(tmp_path / "SlicerDICOMDatabase")
    slicer.dicomDatabase = db
    yield db
    del slicer.dicomDatabase


def _load_from_database(db, series, scene):
    """The series imported into the database and loaded from it; the phantom's anatomies as a
    segmentation node (what the Segment Editor or TotalSegmentator would give)."""
    from FVLMSlicerLib import mrml_io

    for f in sorted((series["root"] / "ct").iterdir()):
        db.insert(str(f))  # DICOM module: import, copying the files into the database
    volume = slicer_app.load_dicom_series(db, db.filesForSeries(series["uid"]), "chest")
    grid = mrml_io.volume_node_to_ct(volume).geometry
    labels = read_label_map(series["root"] / "labels.nii.gz", reference=grid)
    seg = mrml_io.labelmap_to_segmentation_node(labels.array, grid, CTRATE_CATALOG, scene, "anatomies")
    return volume, seg


def _sr_numbers(path) -> list[float]:
    from test_dicom_export import sr_tree

    return [
        i.MeasuredValueSequence[0].FloatingPointValue
        for i in sr_tree(pydicom.dcmread(path))
        if i.ValueType == "NUM"
    ]


@pytest.mark.slow
def test_export_to_dicom_from_the_panel_writes_what_the_command_line_writes(
    widget, env, tiny_model, series, database, tmp_path
):
    from fvlm_training.cli import main

    ui = widget.ui
    volume, seg = _load_from_database(database, series, env.scene)
    assert not ui.exportDicomButton.enabled and "first" in ui.exportDicomButton.toolTip
    _choose(widget, volume, seg, tiny_model)
    ui.analyzeButton.click()
    _run_until(lambda: _idle(widget), 300)
    assert widget._results is not None, ui.statusLabel.text
    assert ui.exportDicomButton.enabled, ui.exportDicomButton.toolTip
    assert ui.exportDicomButton.toolTip.startswith("Write the anatomies as a DICOM Segmentation")
    files_before = set(database._files)
    ui.exportDicomButton.click()
    job = widget._taskJob
    _run_until(lambda: _idle(widget), 300)
    assert ui.statusLabel.text.startswith("Exported to Slicer's DICOM database"), ui.statusLabel.text
    assert job.status.longest_step_s < 0.2, "a long step on the GUI thread"
    assert not job.job_dir.exists()  # the written folder went with the job, its files are in the database
    written = job.output
    stored = {name: database.fileForInstance(written[name]["sop_instance_uid"]) for name in ("seg", "sr")}
    assert all(stored.values()) and set(database._files) - files_before == set(stored.values())
    assert all(path.startswith(str(database.folder)) for path in stored.values())
    # the same objects as `fvlm analyze --dicom-out` on the series (new UIDs)
    cli = tmp_path / "cli"
    argv = [str(series["root"] / "ct"), "--segmentation", str(series["root"] / "labels.nii.gz"),
            "--class-map", "anatomy", "--model", str(tiny_model), "--device", "cpu", "--quiet",
            "--dicom-out", str(cli), "--out", str(tmp_path / "cli.json")]  # fmt: skip
    assert main(["analyze", *argv]) == 0
    results = json.loads((tmp_path / "cli.json").read_text())
    assert written["seg"]["segments"] == results["dicom"]["seg"]["segments"]
    assert sorted(written["seg"]["segments"].values()) == ["aorta", "esophagus", "heart", "lung"]
    assert written["model"] == results["dicom"]["model"]
    panel_seg, cli_seg = pydicom.dcmread(stored["seg"]), pydicom.dcmread(cli / "seg.dcm")
    assert panel_seg.PixelData == cli_seg.PixelData and panel_seg.SOPInstanceUID != cli_seg.SOPInstanceUID
    for a, b in zip(panel_seg.SegmentSequence, cli_seg.SegmentSequence):
        for keyword in (
            "SegmentLabel",
            "SegmentedPropertyCategoryCodeSequence",
            "SegmentedPropertyTypeCodeSequence",
        ):
            assert a[keyword].value == b[keyword].value
    assert _sr_numbers(stored["sr"]) == _sr_numbers(cli / "sr.dcm") and len(_sr_numbers(stored["sr"])) > 8
    source = pydicom.dcmread(database.filesForSeries(series["uid"])[0], stop_before_pixels=True)
    assert panel_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["uid"]
    assert panel_seg.StudyInstanceUID == source.StudyInstanceUID and panel_seg.PatientID == source.PatientID
    assert panel_seg.SeriesInstanceUID != cli_seg.SeriesInstanceUID
    # segments edited after the analysis: refused, nothing added to the database
    from FVLMSlicerLib import mrml_io
    from scene_tools import segment_mask, set_segment_mask

    nodes = widget._results
    grid = mrml_io.volume_node_to_ct(volume).geometry
    heart = segment_mask(nodes.segmentation, "heart", grid)
    heart[np.argwhere(heart)[0][0]] = False  # one slice of the heart erased
    set_segment_mask(nodes.segmentation, "heart", heart, grid)
    files_before = set(database._files)
    ui.exportDicomButton.click()
    _run_until(lambda: _idle(widget), 120)
    assert ui.statusLabel.text.startswith("Export to DICOM failed: the anatomy segments were changed after")
    assert "heart (" in ui.statusLabel.text and set(database._files) == files_before


def test_export_to_dicom_says_why_it_cannot_run(widget, env, series, database, tmp_path):
    """Disabled, with the reason as its tooltip: not from DICOM, no database open; files gone
    from the database are named before anything is written."""
    from FVLMSlicerLib import dicomdb, mrml_io
    from FVLMSlicerLib.results import ATTR_SOURCE_VOLUME, ResultNodes

    from fvlm_core.errors import InputError
    from fvlm_core.io import read_ct
    from fvlm_core.zeroshot.results import AnalysisResult, AnatomyResult

    ui = widget.ui
    ct = read_ct(series["root"] / "ct")
    plain = mrml_io.ct_to_volume_node(ct, env.scene, "from a file")
    table = env.scene.AddNewNodeByClass("vtkMRMLTableNode")
    table.SetAttribute(ATTR_SOURCE_VOLUME, plain.GetID())
    widget._results = ResultNodes(None, table, {}, AnalysisResult([AnatomyResult("lung", "present", 1.0)]))
    widget._updateButtons()
    assert not ui.exportDicomButton.enabled
    assert ui.exportDicomButton.toolTip.startswith(
        "'from a file' was not loaded from Slicer's DICOM database"
    )
    volume, _ = _load_from_database(database, series, env.scene)
    table.SetAttribute(ATTR_SOURCE_VOLUME, volume.GetID())
    widget._updateButtons()
    assert ui.exportDicomButton.enabled
    database.isOpen = False
    widget._updateButtons()
    assert not ui.exportDicomButton.enabled and "DICOM database is not open" in ui.exportDicomButton.toolTip
    database.isOpen = True
    uids = volume.GetAttribute("DICOM.instanceUIDs").split()
    volume.SetAttribute("DICOM.instanceUIDs", " ".join([*uids[:-2], "1.2.3.4", "Unknown"]))
    with pytest.raises(InputError, match=f"2 of the {len(uids)} files of 'chest' are not in Slicer's DICOM"):
        list(dicomdb.source_files_steps(database, volume))
    widget._results = None
