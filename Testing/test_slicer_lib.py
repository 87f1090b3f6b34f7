"""FVLMSlicerLib parts that need neither Slicer nor Qt: terminology, settings, panel words,
dependencies, processes read without a thread, the job folder's files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

# FVLMSlicerLib: on sys.path by conftest.py
from FVLMSlicerLib import dependencies, settings
from FVLMSlicerLib.panel import findings_from_rows
from FVLMSlicerLib.terminology import (
    TerminologyEntry,
    anatomy_terminology,
    map_segments,
    match_segment,
)

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG, load_class_map
from fvlm_core.zeroshot.results import AnalysisResult, AnatomyResult, FindingResult

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
    assert settings.last_demo_model_file() == tmp_path / "cache" / "last_demo_model.txt"
    settings.last_demo_model_file().parent.mkdir(parents=True)
    settings.last_demo_model_file().write_text(str(model.resolve()) + "\n")  # what training/demo.py writes
    assert settings.remembered_model_dir() == ""  # no config.yaml yet: not a model
    (model / "config.yaml").write_text("name: x\n")
    assert settings.remembered_model_dir() == str(model.resolve())


def _finding(name, raw, threshold, flagged, calibration="none", probability=None, note=""):
    return FindingResult(
        name, raw, threshold, "calibrated", flagged, calibration=calibration, probability=probability,
        raw_threshold=threshold, calibration_note=note,
    )  # fmt: skip


def test_findings_rows_keep_reference_wording_and_accept_free_text():
    findings = findings_from_rows([("Lung nodule", "lung"), ("Pneumothorax", "lung"), ("  ", "heart")])
    assert [f["name"] for f in findings] == ["Lung nodule", "Pneumothorax"]
    assert findings[0]["positive"] == ["Nodule."] and findings[0]["source"] == "ctrate"
    assert findings[1]["positive"] == ["Pneumothorax."] and findings[1]["negative"] == ["Not Pneumothorax."]
    assert findings[1]["source"] == "user"


def test_requirements_cover_fvlm_core_without_touching_slicer_packages():
    """Every dependency of the project is either installed into Slicer or deliberately left out,
    and nothing else is: the module's own extra, and no package the code imports nowhere."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["slicer"]
    wanted = {dependencies.canonical(dependencies.requirement_name(d)) for d in deps}
    listed = {
        dependencies.canonical(dependencies.requirement_name(r)) for r in dependencies.read_requirements()
    }
    slicers = {
        dependencies.canonical(p) for p in (*dependencies.SLICER_PACKAGES, *dependencies.TORCH_PACKAGES)
    }
    training_only = {"monai", "matplotlib", "tensorboard"}
    assert not listed & slicers, "requirements.txt must not (re)install packages Slicer ships"
    assert listed == wanted - slicers - training_only
    assert dependencies.installable(["torch", "monai>=1.4", "torchvision<1"]) == ["monai>=1.4"]


def test_constraints_pin_every_installed_distribution_but_the_ones_being_installed():
    installed = {"numpy": "1.26.4", "torch": "2.4.1+cpu", "monai": "1.3.0", "broken": "not a version"}
    lines = dependencies.constraints_text(installed, free=["MONAI"]).splitlines()
    assert lines == ["numpy==1.26.4", "torch==2.4.1+cpu"]  # monai may move to >=1.4; nothing else
    assert dependencies.missing_requirements(["numpy>=1.0", "surely-not-installed-pkg-fvlm"]) == [
        "surely-not-installed-pkg-fvlm"
    ]
    assert dependencies.missing_requirements(["numpy<1.0"]) == ["numpy<1.0"]
    reqs = ["torch>=2.1.2", "numpy", "SimpleITK", "nibabel (>=2.3.0)", "requests", "dicom2nifti"]
    reqs += ["nnunetv2>=2.3.1", "rt_utils", "pyarrow", 'mcp; extra == "mcp"']
    assert dependencies.totalseg_dependencies(reqs) == ["numpy", "nibabel>=2.3.0", "pyarrow"]


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

    a, b, c, d = (
        _finding("A", 0.30, 0.5, False),
        _finding("B", 0.20, 0.1, True),
        _finding("C", None, 0.5, False),
        _finding("D", 0.90, 0.5, True),
    )
    lung = AnatomyResult(
        "lung", "partial", 10.0, 5, True, 0, "cut by the field of view: scored on the visible part", [a, d]
    )
    heart = AnatomyResult("heart", "present", 5.0, 3, True, 0, "", [b])
    aorta = AnatomyResult("aorta", "absent", 0.0, 0, False, None, "", [c])
    rows = [(lung, a), (heart, b), (aorta, c), (lung, d)]
    assert [f.name for _, f in panel.result_order(rows)] == ["D", "B", "A", "C"]
    assert [panel.flagged_text(f) for _, f in rows] == ["No", "Yes", "n/a", "Yes"]
    assert panel.device_name("cuda:1") == "GPU (cuda:1)" and panel.device_name("cpu") == "CPU"
    result = AnalysisResult([lung, AnatomyResult("esophagus", "absent", 0.0), aorta], device="cpu")
    text = panel.absent_text(result, "builtin")
    assert text.splitlines()[0].startswith("esophagus, aorta: not segmented by the built-in segmenter")
    assert "choose TotalSegmentator or a segmentation" in text and "lung: cut by the field of view" in text
    assert "no segment of the chosen segmentation" in panel.absent_text(result, "segmentation")
    assert panel.done_text(result, 12.3) == "Done in 12 s on CPU: 1 of 2 scored findings flagged (lung)."


def test_table_headers_say_probability_only_for_calibrated_findings():
    """A model without calibration shows "uncalibrated score", never "probability"."""
    from FVLMSlicerLib import panel

    plain = [_finding("A", 0.02, 0.01, True), _finding("C", None, 0.5, False)]
    calibrated = [_finding("A", 0.02, 0.01, True, "platt", 0.41)]
    assert panel.value_headers(plain) == ("Uncalibrated score (x100)", "Threshold (x100)")
    assert panel.value_headers(calibrated + plain[1:]) == ("Probability (%)", "Threshold (%)")
    assert panel.value_headers(calibrated + plain) == (
        "Probability (%) or score (x100)",
        "Threshold (same scale)",
    )
    assert [f.scale_text for f in calibrated + plain] == [
        "probability (Platt)",
        "uncalibrated score",
        "uncalibrated score",
    ]
    assert set(panel.header_tips()) <= set(panel.RESULT_COLUMNS)
    assert panel.RESULT_COLUMNS.index("Flagged") == 2  # in view at the panel's default width


class _FakeSlicer:
    """Stands in for the ``slicer`` package's installer entry points of one Slicer version.

    Reproduces what could break: Slicer < 5.12's ``slicer.util.pip_install`` splits a *string*
    with ``shlex`` (Base/Python/slicer/util.py); 5.12's ``slicer.packaging`` is a submodule that
    ``slicer/__init__`` does not import (so ``slicer.packaging`` is not an attribute until it is
    imported), and its ``pip_ensure`` returns None whether it installed, had nothing to do, or
    skipped in testing mode (Base/Python/slicer/packaging.py), and raises RuntimeError when the
    user declines.
    """

    def __init__(self, version: str, testing: bool = False, decline: bool = False):
        import shlex
        import types

        self.calls: list = []
        self.app = types.SimpleNamespace(testingEnabled=lambda: testing)
        self.decline = decline

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
        self.packaging = types.SimpleNamespace(pip_ensure=pip_ensure) if version >= "5.12" else None


@pytest.fixture
def missing_monai(monkeypatch, tmp_path):
    """As in a fresh Slicer: ``monai`` missing, the constraints file under a folder with a space.
    The environment is read and pip's dry run answered here (no network in tests)."""
    real = dependencies.missing_requirements
    state = {"installed": False, "checked": []}
    monkeypatch.setattr(
        dependencies,
        "missing_requirements",
        lambda reqs: (
            ([] if state["installed"] else ["monai>=1.4"]) + [r for r in real(reqs) if "monai" not in r]
        ),
    )
    monkeypatch.setattr(dependencies, "installed_versions", lambda python: {"numpy": np.__version__})
    monkeypatch.setattr(dependencies, "check_step", lambda python, args, *rest: state["checked"].append(args))
    folder = tmp_path / "Documents and Settings"
    folder.mkdir()
    path = folder / "constraints.txt"
    monkeypatch.setattr(
        dependencies, "write_constraints", lambda text: (path.write_text(text) and path) or path
    )
    state["constraints"] = path
    return state


def _install_with(monkeypatch, fake):
    import types

    module = types.ModuleType("slicer")
    module.app, module.util = fake.app, fake.util
    monkeypatch.setitem(sys.modules, "slicer", module)
    if fake.packaging is not None:  # importable, but not an attribute of the package until imported
        monkeypatch.setitem(sys.modules, "slicer.packaging", fake.packaging)
    else:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    return dependencies.ensure_dependencies(ask=True)


def test_slicer_before_5_12_gets_pip_arguments_as_a_list(monkeypatch, missing_monai):
    fake = _FakeSlicer("5.10")
    fake.util.pip_install = (lambda orig: lambda r: (orig(r), missing_monai.update(installed=True)))(
        fake.util.pip_install
    )
    assert _install_with(monkeypatch, fake)
    ((name, args),) = fake.calls
    constraints = str(missing_monai["constraints"])
    assert name == "pip_install" and args[:2] == ["-c", constraints] and " " in constraints  # one argument
    assert args[2:] == ["monai>=1.4"] and missing_monai["checked"] == [args]  # checked before installing
    assert f"numpy=={np.__version__}" in missing_monai["constraints"].read_text().splitlines()


def test_slicer_5_12_imports_slicer_packaging_and_pip_ensure_none_is_not_success(monkeypatch, missing_monai):
    fake = _FakeSlicer("5.12")  # pip_ensure returns None but installs nothing
    with pytest.raises(dependencies.DependencyError, match="still missing: monai"):
        _install_with(monkeypatch, fake)
    assert fake.calls[0][:2] == ("pip_ensure", ["monai>=1.4"])  # slicer.packaging was imported and used
    assert fake.calls[0][2] == str(missing_monai["constraints"])
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


def test_process_output_is_read_without_a_thread_and_without_blocking():
    """The panel reads a process's output when it polls: no reader thread (one would barely run in
    Slicer's process), a read never waits for the process, and no line is lost or split."""
    import threading
    import time

    from FVLMSlicerLib.process import BackgroundProcess

    script = "import sys, time\nfor i in range(3):\n    print(f'line {i} é', flush=True); time.sleep(0.3)\n"
    script += "sys.stdout.write('partial'); sys.stdout.flush(); time.sleep(0.3); print(' end')"
    threads = threading.active_count()
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    assert threading.active_count() == threads
    reads, lines = [], []
    while process.returncode() is None or not lines or lines[-1] != "partial end":
        t = time.perf_counter()
        lines += process.read()
        reads.append(time.perf_counter() - t)
        time.sleep(0.02)
        assert len(reads) < 1000
    assert lines == ["line 0 é", "line 1 é", "line 2 é", "partial end"]
    assert max(reads) < 0.05 and process.log() == lines
    process.stop()


def test_the_ct_goes_to_the_worker_as_nrrd_that_the_librarys_reader_reads_back(tmp_path):
    """The job folder's CT (raw NRRD written a slab per step) is what ``fvlm_core.io.read_ct``
    reads: same voxels, same oblique LPS geometry, for the stored types of CT volumes."""
    from FVLMSlicerLib.job import write_nrrd_steps

    from fvlm_core.geometry import Geometry
    from fvlm_core.io import read_ct

    c, s_ = np.cos(0.3), np.sin(0.3)
    geometry = Geometry((7, 6, 5), (0.7, 0.8, 2.5), (-40.5, 60.25, 100.0), (c, -s_, 0, s_, c, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    for dtype in (np.int16, np.float32, np.uint16):
        array = rng.integers(0, 1000, geometry.shape_zyx).astype(dtype) - (0 if dtype == np.uint16 else 900)
        steps = list(write_nrrd_steps(tmp_path / "ct.nrrd", array, geometry))
        assert steps[-1] == 1.0
        back = read_ct(tmp_path / "ct.nrrd", allow_non_hu=True)
        np.testing.assert_array_equal(back.array, array.astype(np.float32))
        np.testing.assert_allclose(back.geometry.affine_lps, geometry.affine_lps, atol=1e-9)


def test_a_ct_with_nan_is_refused_by_the_worker_before_any_work(tmp_path):
    """A NaN voxel is refused with the library's message (count, first voxel, the volume's name)
    before the model or a segmenter is touched; so is an infinite one with non-HU values allowed."""
    import json

    from FVLMSlicerLib import worker
    from FVLMSlicerLib.job import write_nrrd_steps

    from fvlm_core.geometry import Geometry
    from fvlm_core.zeroshot.pipeline import AnalysisRequest, AnalyzerCache

    geometry = Geometry((8, 8, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for bad, allow_non_hu in ((np.nan, False), (np.inf, True)):
        job = tmp_path / f"job-{allow_non_hu}"
        job.mkdir()
        volume = np.full(geometry.shape_zyx, -500.0, dtype=np.float32)
        volume[1, 2, 3] = bad
        list(write_nrrd_steps(job / "scan.nrrd", volume, geometry))
        request = AnalysisRequest(ct=str(job / "scan.nrrd"), model=str(tmp_path / "no-model"))
        request.allow_non_hu = allow_non_hu
        request.save(job / "request.json")
        assert worker.run_job(job, AnalyzerCache()) == 1
        error = json.loads((job / "error.json").read_text())
        assert (
            error["type"] == "InputError"
            and "scan" in error["message"]
            and "no-model" not in error["message"]
        )
        assert ("NaN" if allow_non_hu is False else "infinite") in error["message"]
        assert "(1, 2, 3)" in error["message"]
        progress = json.loads((job / "progress.json").read_text())
        assert progress["stage"].startswith("prepare")  # nothing after reading the CT


def test_a_job_given_up_mid_run_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Closing the scene mid-analysis deletes the job's folder (``job.remove_folder``) while the
    worker runs it: the worker's next progress report, its result and its finished.json must not
    make the folder again (they did: every atomic write made its missing parents, and a closed
    scene left a job folder in Slicer's temp folder); a task that wrote into it meanwhile is
    cleared too."""
    from FVLMSlicerLib import worker
    from FVLMSlicerLib.job import remove_folder

    from fvlm_core.zeroshot import pipeline
    from fvlm_core.zeroshot.pipeline import AnalysisRequest, AnalyzerCache

    job = tmp_path / "fvlm-job-1"
    job.mkdir()
    AnalysisRequest(ct=str(job / "scan.nrrd"), model=str(tmp_path / "model")).save(job / "request.json")

    def given_up_while_running(request, progress, cancelled, analyzers):
        progress("prepare", 0.1)
        remove_folder(job)  # the panel, on File > Close scene
        progress("encode", 0.5)
        raise AssertionError("the analysis went on after its folder was deleted")

    monkeypatch.setattr(pipeline, "run", given_up_while_running)
    server, cache = worker.Server(tmp_path / "control", os.getpid()), AnalyzerCache()
    assert worker.run_job(job, cache) == 2  # cancelled
    server.finish(job, 2, cache)
    assert not job.exists() and list(tmp_path.iterdir()) == []
    job.mkdir()  # a task's output written after the folder went (it made it again) is cleared
    (job / "dicom").mkdir()
    server.finish(job, 0, cache)
    assert not job.exists()


def test_totalsegmentator_comes_from_its_extension_when_that_is_installed(monkeypatch):
    """With the TotalSegmentator extension in Slicer, its own installer runs (SlicerTotalSegmentator's
    ``TotalSegmentatorLogic.setupPythonRequirements``); without it, FVLM's steps, with the NNUNet
    extension's installer for nnU-Net when that extension is there."""
    import types

    calls, state = [], {"installed": False}
    monkeypatch.setattr(dependencies, "totalsegmentator_available", lambda: state["installed"])
    monkeypatch.setattr(dependencies, "torch_available", lambda: True)

    class TotalSegmentatorLogic:  # the extension's logic (TotalSegmentator/TotalSegmentator.py)
        def setupPythonRequirements(self, upgrade=False):
            calls.append("extension")
            state["installed"] = True

    class InstallLogic:  # SlicerNNUNetLib's
        def __init__(self, doAskConfirmation=True):
            calls.append(("nnunet ask", doAskConfirmation))

        def setupPythonRequirements(self, requirement):
            calls.append(("nnunet", requirement))

    fake = _FakeSlicer("5.12")
    module = types.ModuleType("slicer")
    module.app, module.util = fake.app, fake.util
    module.modules = types.SimpleNamespace(totalsegmentator=object())
    monkeypatch.setitem(sys.modules, "slicer", module)
    monkeypatch.setitem(
        sys.modules, "TotalSegmentator", types.SimpleNamespace(TotalSegmentatorLogic=TotalSegmentatorLogic)
    )
    monkeypatch.setitem(sys.modules, "SlicerNNUNetLib", types.SimpleNamespace(InstallLogic=InstallLogic))
    assert dependencies.install_totalsegmentator(ask=True) and calls == ["extension"]

    calls.clear()
    state["installed"] = False
    module.modules = types.SimpleNamespace()  # no TotalSegmentator extension

    def steps(python, run, pip_options=(), nnunet=None):
        calls.append("fvlm steps")
        nnunet()
        state["installed"] = True

    monkeypatch.setattr(dependencies, "install_totalsegmentator_into", steps)
    assert dependencies.install_totalsegmentator(ask=True)
    assert calls == ["fvlm steps", ("nnunet ask", False), ("nnunet", "nnunetv2>=2.3.1")]
