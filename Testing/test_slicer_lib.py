"""FVLMSlicerLib parts that need neither Slicer nor Qt: terminology, settings, summary, deps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FVLMSlicer"))

from FVLMSlicerLib import dependencies, settings  # noqa: E402
from FVLMSlicerLib.runner import findings_from_rows  # noqa: E402
from FVLMSlicerLib.summary import AnalysisSummary, AnatomySummary, FindingRow  # noqa: E402
from FVLMSlicerLib.terminology import (  # noqa: E402
    TerminologyEntry,
    anatomy_terminology,
    map_segments,
    match_segment,
)

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG, load_class_map  # noqa: E402

TS_EXT = "Segmentation category and type - Total Segmentator"


def _ts_term(code: str, meaning: str, modifier: str = "") -> str:
    mod = f"SCT^{modifier}^Left" if modifier else "^^"
    return f"{TS_EXT}~SCT^123037004^Anatomical Structure~SCT^{code}^{meaning}~{mod}~~^^~^^"


def test_anatomy_terminology_round_trips_with_snomed_code():
    text = anatomy_terminology(CTRATE_CATALOG["lung"])
    entry = TerminologyEntry.parse(text)
    assert entry.type.value == "39607008" and entry.type.scheme == "SCT"
    assert entry.category.value == "123037004"
    assert TerminologyEntry.parse(entry.serialize()) == entry
    assert match_segment(CTRATE_CATALOG, "anything", text) == "lung"


@pytest.mark.parametrize(
    ("name", "terminology", "expected"),
    [
        # TotalSegmentator extension: names from terminology, codes with laterality modifiers
        ("left upper lobe of lung", _ts_term("45653009", "Upper lobe of lung", "7771000"), "lung"),
        ("right middle lobe of lung", _ts_term("72481006", "Middle lobe of right lung"), "lung"),
        ("Left atrial appendage", _ts_term("305223006", "Entire atrial appendage", "7771000"), "heart"),
        ("aorta", _ts_term("15825003", "Aorta"), "aorta"),
        # no terminology: TotalSegmentator class names and plain names
        ("lung_lower_lobe_right", "", "lung"),
        ("Esophagus", "", "esophagus"),
        ("Upper lobe of left lung", "", "lung"),
        ("Lungs", "", "lung"),
        ("liver", "", None),  # not in the CT-RATE catalog
        ("Segment_1", "", None),
    ],
)
def test_segments_map_to_model_anatomies(name, terminology, expected):
    assert match_segment(CTRATE_CATALOG, name, terminology) == expected


def test_generic_terminology_does_not_hide_a_good_name():
    tissue = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~~^^~^^"
    assert match_segment(CTRATE_CATALOG, "Heart", tissue) == "heart"


def test_every_totalsegmentator_class_of_an_anatomy_maps_by_name(ts_dir):
    """All TotalSegmentator classes the catalog merges are recognised as segment names."""
    class_map = load_class_map(ts_dir / "total_class_map.json")
    segments = [(str(v), name, "") for v, name in class_map.items()]
    mapping = map_segments(EXTENDED_CATALOG, segments)
    lut = EXTENDED_CATALOG.lookup_table(class_map)
    for value, _name in class_map.items():
        expected = EXTENDED_CATALOG.names[lut[value] - 1] if lut[value] else None
        assert mapping.get(str(value)) == expected


def test_overrides_win_and_unknown_targets_are_ignored():
    assert match_segment(CTRATE_CATALOG, "blob", "", {"blob": "heart"}) == "heart"
    assert match_segment(CTRATE_CATALOG, "blob", "", {"blob": "spleen"}) is None


def test_demo_model_path_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("FVLM_CACHE", str(tmp_path / "cache"))  # as training/demo.py
    assert settings.remembered_model_dir() == ""
    model = tmp_path / "model"
    model.mkdir()
    settings.remember_model_dir(model)
    assert settings.last_demo_model_file() == tmp_path / "cache" / "last_demo_model.txt"
    assert settings.remembered_model_dir() == ""  # no config.yaml yet: not a model
    (model / "config.yaml").write_text("name: x\n")
    assert settings.remembered_model_dir() == str(model.resolve())


def test_summary_save_load_keeps_rows_and_maps(tmp_path):
    rows = [
        FindingRow("lung", "Emphysema", 0.8, 0.5, True, "calibrated", "present"),
        FindingRow("lung", "Atelectasis", 0.2, 0.5, False, "default", "present"),
    ]
    summary = AnalysisSummary(
        [AnatomySummary("lung", "present", 1234.5, rows), AnatomySummary("heart", "absent", 0.0, [])],
        {("lung", "Emphysema"): np.arange(24, dtype=np.float32).reshape(2, 3, 4)},
        {"analyze": 1.5},
        device="cpu",
    )
    summary.save(tmp_path)
    back = AnalysisSummary.load(tmp_path)
    assert back.rows() == rows
    assert back.anatomy("lung").max_probability == pytest.approx(0.8)
    assert back.anatomy("heart").max_probability == 0.0
    np.testing.assert_array_equal(
        back.similarity_maps[("lung", "Emphysema")], summary.similarity_maps[("lung", "Emphysema")]
    )


def test_unscored_finding_becomes_nan_not_an_error():
    class F:  # the attributes of fvlm_core.zeroshot.FindingResult for an anatomy that was absent
        name, probability, threshold, threshold_source, flagged = "Cardiomegaly", None, 0.5, "default", False

    class A:
        name, status, volume_ml, findings = "heart", "absent", 0.0, [F()]

    class R:
        anatomies, similarity_maps, timings = [A()], {}, {}

    summary = AnalysisSummary.from_result(R())
    assert math.isnan(summary.rows()[0].probability) and not summary.rows()[0].flagged


def test_findings_rows_keep_reference_wording_and_accept_free_text():
    findings = findings_from_rows([("Lung nodule", "lung"), ("Pneumothorax", "lung"), ("  ", "heart")])
    assert [f["name"] for f in findings] == ["Lung nodule", "Pneumothorax"]
    assert findings[0]["positive"] == ["Nodule."] and findings[0]["source"] == "ctrate"
    assert findings[1]["positive"] == ["Pneumothorax."] and findings[1]["negative"] == ["Not Pneumothorax."]
    assert findings[1]["source"] == "user"


def test_requirements_cover_fvlm_core_without_touching_slicer_packages():
    """Every dependency of the project is either installed into Slicer or deliberately left out."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {dependencies.canonical(dependencies.requirement_name(d)) for d in deps}
    listed = {
        dependencies.canonical(dependencies.requirement_name(r)) for r in dependencies.read_requirements()
    }
    protected = {dependencies.canonical(p) for p in (*dependencies.PROTECTED, *dependencies.TORCH_PACKAGES)}
    training_only = {"matplotlib", "tensorboard"}
    assert not listed & protected, "requirements.txt must not (re)install packages Slicer ships"
    assert wanted - protected - training_only <= listed
    assert dependencies.installable(["numpy>=2", "torch", "monai>=1.4", "SimpleITK"]) == ["monai>=1.4"]


def test_constraints_pin_installed_protected_packages():
    text = dependencies.constraints_text()
    assert f"numpy=={np.__version__}" in text.splitlines()
    assert dependencies.missing_requirements(["numpy>=1.0", "surely-not-installed-pkg-fvlm"]) == [
        "surely-not-installed-pkg-fvlm"
    ]
    assert dependencies.missing_requirements(["numpy<1.0"]) == ["numpy<1.0"]
