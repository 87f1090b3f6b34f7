"""FVLMSlicerLib parts that need neither Slicer nor Qt: terminology, settings, summary, deps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

# FVLMSlicerLib: on sys.path by conftest.py
from FVLMSlicerLib import dependencies, settings
from FVLMSlicerLib.runner import findings_from_rows
from FVLMSlicerLib.summary import AnalysisSummary, AnatomyMap, AnatomySummary, FindingRow
from FVLMSlicerLib.terminology import (
    TerminologyEntry,
    anatomy_terminology,
    map_segments,
    match_segment,
)

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG, load_class_map

ROOT = Path(__file__).resolve().parents[1]
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
        FindingRow("lung", "Emphysema", 0.8, 0.5, True, "calibrated", "present", 0.03, 0.01, "platt"),
        FindingRow("lung", "Atelectasis", 0.2, 0.5, False, "default", "present"),
    ]
    summary = AnalysisSummary(
        [AnatomySummary("lung", "present", 1234.5, rows), AnatomySummary("heart", "absent", 0.0, [])],
        {
            ("lung", "Emphysema"): AnatomyMap(
                (1, 0, 2), np.arange(24, dtype=np.float32).reshape(2, 3, 4), (4, 5, 6)
            )
        },
        {"analyze": 1.5},
        device="cpu",
    )
    summary.save(tmp_path)
    back = AnalysisSummary.load(tmp_path)
    assert back.rows() == rows
    assert back.rows()[0].scale_text == "probability (Platt)" and back.rows()[0].raw_score == 0.03
    assert back.rows()[1].scale_text == "uncalibrated score" and back.rows()[1].raw_score == 0.2
    assert back.anatomy("lung").max_value == pytest.approx(0.8)
    assert back.anatomy("heart").max_value == 0.0
    got, want = back.similarity_maps[("lung", "Emphysema")], summary.similarity_maps[("lung", "Emphysema")]
    assert (got.start, got.shape) == (want.start, want.shape)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.full()[1:3, 0:3, 2:6], want.values)
    assert got.full().sum() == want.values.sum()


def test_summary_keeps_each_map_inside_its_anatomy():
    # what crosses from the worker: the anatomy's bounding box, 0 outside the anatomy
    from fvlm_core.anatomy import get_catalog

    catalog = get_catalog("ctrate")
    labelmap = np.zeros((6, 7, 8), np.uint8)
    labelmap[1:4, 2:5, 3:7] = catalog.label("lung")
    labelmap[2, 3, 3] = 0  # a hole in the lung
    labelmap[5, 6, 7] = catalog.label("heart")
    similarity = np.random.default_rng(0).uniform(0.1, 1.0, labelmap.shape).astype(np.float32)

    class R:
        anatomies, timings = [], {}
        similarity_maps = {("lung", "Emphysema"): similarity, ("esophagus", "Hiatal hernia"): similarity}

    summary = AnalysisSummary.from_result(R(), labelmap=labelmap, catalog=catalog)
    assert set(summary.similarity_maps) == {("lung", "Emphysema")}  # the esophagus is absent: no map
    amap = summary.similarity_maps[("lung", "Emphysema")]
    assert amap.start == (1, 2, 3) and amap.values.shape == (3, 3, 4) and amap.shape == labelmap.shape
    lung = labelmap == catalog.label("lung")
    np.testing.assert_array_equal(amap.full(), np.where(lung, similarity, 0.0))
    with pytest.raises(ValueError, match="label map"):
        AnalysisSummary.from_result(R())


def test_unscored_finding_becomes_nan_not_an_error():
    class F:  # the attributes of fvlm_core.zeroshot.FindingResult for an anatomy that was absent
        name, value, raw_score, threshold, raw_threshold = "Cardiomegaly", None, None, 0.5, 0.5
        threshold_source, flagged, calibration, calibration_note = "default", False, "none", ""

    class A:
        name, status, volume_ml, findings = "heart", "absent", 0.0, [F()]

    class R:
        anatomies, similarity_maps, timings = [A()], {}, {}

    summary = AnalysisSummary.from_result(R())
    assert math.isnan(summary.rows()[0].value) and not summary.rows()[0].flagged
    assert not summary.rows()[0].scored


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


def test_model_findings_keep_the_models_prompts_and_free_text_follows_their_wording():
    """The model's thresholds were calibrated on its own prompts: a row of the model keeps them."""
    model = [
        {"name": "Emphysema", "anatomy": "lung", "positive": ["Emphysema."], "negative": ["No emphysema."]},
        {
            "name": "Cardiomegaly",
            "anatomy": "heart",
            "positive": ["Cardiomegaly."],
            "negative": ["No cardiomegaly."],
        },
    ]
    findings = findings_from_rows([("Emphysema", "lung"), ("Pneumothorax", "lung")], model)
    assert findings[0] == model[0]
    assert findings[1]["positive"] == ["Pneumothorax."] and findings[1]["negative"] == ["No pneumothorax."]
    reference = [{**model[0], "negative": ["Not Emphysema."]}]  # a model worded like the reference
    assert findings_from_rows([("Pneumothorax", "lung")], reference)[0]["negative"] == ["Not Pneumothorax."]


def test_panel_words_and_order():
    from FVLMSlicerLib import panel

    rows = [
        FindingRow("lung", "A", 0.30, 0.5, False),
        FindingRow("heart", "B", 0.20, 0.1, True),
        FindingRow("aorta", "C", float("nan"), 0.5, False, status="absent"),
        FindingRow("lung", "D", 0.90, 0.5, True),
    ]
    assert [r.finding for r in panel.result_order(rows)] == ["D", "B", "A", "C"]
    assert [panel.flagged_text(r) for r in rows] == ["No", "Yes", "n/a", "Yes"]
    assert panel.percent_text(0.8312) == "83.1 %" and panel.percent_text(float("nan")) == "n/a"
    assert panel.device_name("cuda:1") == "GPU (cuda:1)" and panel.device_name("cpu") == "CPU"
    summary = AnalysisSummary(
        [
            AnatomySummary(
                "lung", "partial", 10.0, rows[:1], "cut by the field of view: scored on the visible part"
            ),
            AnatomySummary("heart", "absent", 0.0, []),
            AnatomySummary("aorta", "absent", 0.0, []),
        ],
        device="cpu",
    )
    text = panel.absent_text(summary, "builtin")
    assert text.splitlines()[0].startswith("heart, aorta: not segmented by the built-in segmenter")
    assert "choose TotalSegmentator or a segmentation" in text and "lung: cut by the field of view" in text
    assert "no segment of the chosen segmentation" in panel.absent_text(summary, "segmentation")
    assert panel.done_text(summary, 12.3) == "Done in 12 s on CPU: 0 of 1 scored findings flagged."


def test_table_headers_say_probability_only_for_calibrated_findings():
    """A model without calibration shows "uncalibrated score", never "probability"."""
    from FVLMSlicerLib import panel

    plain = [FindingRow("lung", "A", 0.02, 0.01, True), FindingRow("aorta", "C", float("nan"), 0.5, False)]
    calibrated = [
        FindingRow("lung", "A", 0.41, 0.33, True, raw_score=0.02, raw_threshold=0.01, calibration="platt")
    ]
    assert panel.value_headers(plain) == ("Uncalibrated score (x100)", "Threshold (x100)")
    assert panel.value_headers(calibrated + plain[1:]) == ("Probability (%)", "Threshold (%)")
    assert panel.value_headers(calibrated + plain) == (
        "Probability (%) or uncalibrated score (x100)",
        "Threshold (same scale)",
    )
    assert [panel.calibration_text(r) for r in calibrated + plain] == [
        "probability (Platt)",
        "uncalibrated score",
        "uncalibrated score",
    ]
    assert set(panel.header_tips(plain)) <= set(panel.RESULT_COLUMNS)


class _FakeSlicer:
    """Stands in for the ``slicer`` module's installer entry points of one Slicer version.

    Reproduces what could break: Slicer < 5.12's ``slicer.util.pip_install`` splits a *string*
    with ``shlex`` (Base/Python/slicer/util.py), and 5.12's ``slicer.packaging.pip_ensure``
    returns None whether it installed, had nothing to do, or skipped in testing mode
    (Base/Python/slicer/packaging.py), and raises RuntimeError when the user declines.
    """

    def __init__(self, version: str, testing: bool = False, decline: bool = False):
        import shlex
        import types

        self.calls: list = []
        self.app = types.SimpleNamespace(testingEnabled=lambda: testing)

        def pip_install(requirements):
            args = shlex.split(requirements) if isinstance(requirements, str) else list(requirements)
            self.calls.append(("pip_install", args))

        def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None, **kwargs):
            self.calls.append(("pip_ensure", list(requirements), str(constraints), prompt_install))
            if decline:
                raise RuntimeError("User declined package installation")
            return None  # in testing mode it skips and returns None too

        self.util = types.SimpleNamespace(
            pip_install=pip_install,
            confirmOkCancelDisplay=lambda *a, **k: not decline,
            confirmYesNoDisplay=lambda *a, **k: False,
        )
        if version >= "5.12":
            self.packaging = types.SimpleNamespace(pip_ensure=pip_ensure)


@pytest.fixture
def missing_monai(monkeypatch, tmp_path):
    """As in a fresh Slicer: ``monai`` missing, the constraints file under a folder with a space."""
    real = dependencies.missing_requirements
    state = {"installed": False}
    monkeypatch.setattr(
        dependencies,
        "missing_requirements",
        lambda reqs: (
            ([] if state["installed"] else ["monai>=1.4"]) + [r for r in real(reqs) if "monai" not in r]
        ),
    )
    import threading

    monkeypatch.setattr(dependencies, "_PRESENT", threading.Event())  # nothing found present yet
    folder = tmp_path / "Documents and Settings"
    folder.mkdir()
    monkeypatch.setattr(dependencies, "write_constraints", lambda: folder / "constraints.txt")
    return state


def _install_with(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "slicer", fake)
    return dependencies.ensure_dependencies(ask=True)


def test_slicer_before_5_12_gets_pip_arguments_as_a_list(monkeypatch, missing_monai):
    fake = _FakeSlicer("5.10")
    fake.util.pip_install = (lambda orig: lambda r: (orig(r), missing_monai.update(installed=True)))(
        fake.util.pip_install
    )
    assert _install_with(monkeypatch, fake)
    ((name, args),) = fake.calls
    constraints = str(dependencies.write_constraints())
    assert name == "pip_install" and args[:2] == ["-c", constraints] and " " in constraints  # one argument
    assert args[2:] == ["monai>=1.4"]


def test_pip_ensure_returning_none_is_not_taken_for_success(monkeypatch, missing_monai):
    fake = _FakeSlicer("5.12")  # pip_ensure returns None but installs nothing
    with pytest.raises(dependencies.DependencyError, match="still missing: monai"):
        _install_with(monkeypatch, fake)
    assert fake.calls[0][:2] == ("pip_ensure", ["monai>=1.4"])
    assert not _install_with(monkeypatch, _FakeSlicer("5.12", decline=True))  # declined: not started


def test_testing_mode_installs_nothing_and_reports_missing(monkeypatch, missing_monai):
    for version in ("5.10", "5.12"):
        fake = _FakeSlicer(version, testing=True)
        assert _install_with(monkeypatch, fake) is False and fake.calls == []
    monkeypatch.setattr(dependencies, "torch_available", lambda: False)
    assert dependencies.ensure_torch(ask=False) is False  # no PyTorch download in a test either


LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', 'import time; time.sleep(120)']))"


def _launch_and_wait_for_child():
    """A launcher (like PythonSlicer) whose child (like python-real) runs on; ``(launcher, child pid)``."""
    import subprocess
    import time

    from FVLMSlicerLib.process import process_tree

    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER])
    for _ in range(200):
        tree = process_tree(launcher.pid)
        if len(tree) == 2:
            return launcher, tree[1]
        time.sleep(0.05)
    raise AssertionError("the launcher did not start its child")


@pytest.mark.parametrize("with_psutil", [True, False])
def test_stopping_kills_the_launchers_child_too(with_psutil, monkeypatch):
    import os
    import time

    from FVLMSlicerLib.process import kill_process_tree, process_tree

    if not with_psutil:
        monkeypatch.setitem(sys.modules, "psutil", None)  # the /proc fallback
    # the rule: killing only the launcher leaves its child running
    launcher, child = _launch_and_wait_for_child()
    launcher.kill()
    launcher.wait()
    time.sleep(0.2)
    assert process_tree(child) == [child]
    os.kill(child, 9)
    # killing the tree stops both
    launcher, child = _launch_and_wait_for_child()
    assert set(kill_process_tree(launcher.pid)) == {launcher.pid, child}
    launcher.wait(10)
    for _ in range(50):
        if not process_tree(child):
            break
        time.sleep(0.05)
    assert not process_tree(child) and not process_tree(launcher.pid)


def test_the_panels_device_reaches_totalsegmentator(monkeypatch, tmp_path):
    """Device "CPU" in the panel runs TotalSegmentator on the CPU too (not only the model)."""
    from FVLMSlicerLib import runner

    import fvlm_core.segmentation as segmentation
    from fvlm_core.io import CTVolume, Geometry

    seen = {}

    class Stop(Exception):
        pass

    def get_backend(name, **options):  # records the call the real get_backend would receive
        seen.update(name=name, **options)
        raise Stop

    monkeypatch.setattr(segmentation, "get_backend", get_backend)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("name: m\nanatomies: [lung, heart, esophagus, aorta]\n")
    ct = CTVolume(
        np.zeros((4, 4, 4), np.float32),
        Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    )
    request = runner.AnalysisRequest(
        model_dir=str(model), ct=ct, anatomy_source="totalsegmentator", device="cpu"
    )
    with pytest.raises(Stop):
        runner.run_analysis(request)
    assert seen == {"name": "totalsegmentator", "device": "cpu"}


def test_nan_or_inf_in_the_volume_is_refused_before_any_work(tmp_path):
    """Issue 16: a CT with NaN is refused with the library's message by the job's own thread,
    before a worker starts (also when non-HU values are allowed); an Inf that reaches a worker
    is refused there by fvlm_core.io.ct_from_array before the model is read."""
    import json

    from FVLMSlicerLib import worker
    from FVLMSlicerLib.jobs import ProcessJob
    from FVLMSlicerLib.runner import AnalysisRequest
    from FVLMSlicerLib.snapshot import InputSnapshot

    from fvlm_core.io import Geometry

    geometry = Geometry((8, 8, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = np.full(geometry.shape_zyx, -500.0, dtype=np.float32)
    volume[1, 2, 3] = np.nan
    for allow_non_hu in (False, True):
        snapshot = InputSnapshot(volume, geometry, "scan", None, check_intensities=not allow_non_hu)
        request = AnalysisRequest(
            model_dir=str(tmp_path / "no-model"), snapshot=snapshot, anatomy_source="builtin"
        )
        job = ProcessJob(request, job_dir=str(tmp_path / f"job{allow_non_hu}")).start()
        status = job.wait(60)
        assert status.state == "failed" and job.process is None  # no worker was started
        assert "scan" in status.error and "NaN" in status.error and "(1, 2, 3)" in status.error
    job = tmp_path / "worker-job"
    job.mkdir()
    volume[1, 2, 3] = np.inf
    np.save(job / "ct.npy", volume)
    doc = {"model_dir": str(tmp_path / "no-model"), "anatomy_source": "builtin", "allow_non_hu": True}
    (job / "request.json").write_text(
        json.dumps({**doc, "ct_source": "scan", "geometry": geometry.to_dict()})
    )
    assert worker.run_job(job) == 1
    message = json.loads((job / "error.json").read_text())["message"]
    assert "scan" in message and "infinite" in message and "no-model" not in message
