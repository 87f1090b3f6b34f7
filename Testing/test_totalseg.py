"""TotalSegmentator backend without running a model: install and weights checks, the datasets and
folders TotalSegmentator 2.x uses, devices, the class vocabulary (roi_subset, Slicer segments),
the stage clock over TotalSegmentator's real messages, the offline guard, and cancel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG
from fvlm_core.errors import CancelledError, ConfigError, DependencyError
from fvlm_core.io import read_ct
from fvlm_core.segmentation import totalseg as totalseg_module
from fvlm_core.segmentation.labelmap import merge_labels
from fvlm_core.segmentation.totalseg import TotalSegmentatorBackend
from fvlm_core.segmentation.totalseg_classes import (
    SLICER_TOTALSEG_CONTEXT,
    TOTAL_CLASS_MAP,
    anatomies_without_total_class,
    class_of_segment,
    total_class_anatomies,
    totalseg_segment_classes,
)
from fvlm_core.segmentation.totalseg_process import StageClock

#: CT-RATE's anatomies as the fVLM reference merges TotalSegmentator classes (fix_data.py).
CTRATE_CLASSES = {
    "lung_upper_lobe_left": "lung",
    "lung_lower_lobe_left": "lung",
    "lung_upper_lobe_right": "lung",
    "lung_middle_lobe_right": "lung",
    "lung_lower_lobe_right": "lung",
    "heart": "heart",
    "atrial_appendage_left": "heart",
    "esophagus": "esophagus",
    "aorta": "aorta",
}


@pytest.fixture
def empty_home(monkeypatch, tmp_path) -> Path:
    """TOTALSEG_HOME_DIR without weights."""
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    return tmp_path


def _put_checkpoints(home: Path, datasets) -> None:
    """The files TotalSegmentator's model folders hold (empty: only their presence is checked)."""
    for d in datasets:
        fold = (
            home
            / "nnunet"
            / "results"
            / totalseg_module.DATASET_FOLDERS[d]
            / "trainer__nnUNetPlans__3d_fullres"
        )
        (fold / "fold_0").mkdir(parents=True)
        (fold / "fold_0" / "checkpoint_final.pth").write_bytes(b"")


@pytest.fixture(scope="module")
def small_ct(ts_dir):
    return read_ct(ts_dir / "example_ct_sm.nii.gz")


def test_not_installed_says_how_to_install(monkeypatch, small_ct):
    # stands in for a Python without the package: importlib finds no "totalsegmentator"
    monkeypatch.setattr(totalseg_module, "totalsegmentator_available", lambda: False)
    with pytest.raises(DependencyError, match=r'pip install "fvlm\[totalseg\]"') as exc:
        TotalSegmentatorBackend().segment(small_ct, CTRATE_CATALOG)
    assert totalseg_module.INSTALL_REQUIREMENT in str(exc.value)
    status = totalseg_module.totalsegmentator_status()
    assert not status["installed"] and status["version"] is None
    assert status["install_requirement"] == "totalsegmentator>=2.4"


def test_missing_weights_say_how_to_get_them(empty_home, small_ct):
    for fast, flag in ((False, "-t total`"), (True, "-t total_fast`")):
        with pytest.raises(DependencyError) as exc:
            TotalSegmentatorBackend(fast=fast).segment(small_ct, CTRATE_CATALOG)
        msg = str(exc.value)
        assert "totalseg_download_weights" in msg and flag in msg
        assert "TOTALSEG_HOME_DIR" in msg and "--allow-download" in msg and str(empty_home) in msg
    # a folder TotalSegmentator would delete (its old "_v204" name) or one without a trained model
    results = empty_home / "nnunet" / "results"
    (results / "Dataset297_TotalSegmentator_total_3mm_1559subj_v204").mkdir(parents=True)
    (results / totalseg_module.DATASET_FOLDERS[298]).mkdir()
    assert totalseg_module.missing_weights(True, ["heart"]) == [297, 298]
    _put_checkpoints(empty_home, (297, 298))
    TotalSegmentatorBackend(fast=True).check()
    with pytest.raises(DependencyError, match=r"datasets 291, 293\)"):  # organs and cardiac parts only
        TotalSegmentatorBackend(fast=False).check(CTRATE_CATALOG)
    status = totalseg_module.totalsegmentator_status(fast=True)
    assert status["installed"] and status["missing_weights"] == [] and status["weights_dir"] == str(results)


def test_datasets_and_folders_are_totalsegmentators():
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    for d, folder in totalseg_module.DATASET_FOLDERS.items():
        assert TASK_ID_WEIGHTS_CONFIGS[d]["foldername"] == folder
    assert list(totalseg_module.TOTAL_DATASETS[False]) == TASK_TO_ID["total"]
    assert list(totalseg_module.TOTAL_DATASETS[True]) == TASK_TO_ID["total_fast"]
    modes = TASK_CONFIGS["total"]["sub_modes"]
    assert modes["fast"]["task_id"] == totalseg_module.FAST_DATASET
    assert tuple(modes["default"]["task_id"]) == totalseg_module.PART_DATASETS
    roi = list(CTRATE_CLASSES)
    assert totalseg_module.required_datasets(True, roi) == (297, 298)
    assert totalseg_module.required_datasets(True, None) == (297,)
    assert totalseg_module.required_datasets(False, roi) == (291, 293, 298)
    assert totalseg_module.required_datasets(False, ["rib_left_1"]) == (295, 298)


def test_device_words_are_what_totalsegmentator_accepts(empty_home, monkeypatch):
    import torch
    from totalsegmentator.python_api import validate_device_type_api

    _put_checkpoints(empty_home, (297, 298))
    monkeypatch.setattr("fvlm_core.devices._mps_available", lambda: False)
    assert TotalSegmentatorBackend(fast=True).device_word() == "cpu"  # auto on a CPU-only machine
    if not torch.cuda.is_available():
        for absent in ("cuda", "gpu", "mps"):  # an absent device is refused before anything runs
            with pytest.raises(ConfigError, match=f"device {'cuda' if absent == 'gpu' else absent}"):
                TotalSegmentatorBackend(fast=True, device=absent).check()
    with pytest.raises(ConfigError, match="'tpu'"):
        TotalSegmentatorBackend(fast=True, device="tpu").check()
    words = {
        torch.device("cuda"): "gpu",
        torch.device("cuda", 1): "gpu:1",
        torch.device("cpu"): "cpu",
        torch.device("mps"): "mps",
    }
    for device, word in words.items():
        assert totalseg_module.totalseg_device(device) == word
        assert validate_device_type_api(word) == word
    with pytest.raises(ConfigError, match="gpu, cpu or mps"):
        totalseg_module.totalseg_device(torch.device("meta"))


def test_roi_subset_is_the_classes_the_anatomies_need():
    from totalsegmentator.map_to_binary import class_map

    assert class_map["total"] == TOTAL_CLASS_MAP
    assert total_class_anatomies(CTRATE_CATALOG) == CTRATE_CLASSES
    assert sorted(TotalSegmentatorBackend().classes_needed(CTRATE_CATALOG)) == sorted(CTRATE_CLASSES)
    assert TotalSegmentatorBackend(roi_subset=False).classes_needed(CTRATE_CATALOG) is None
    extended = total_class_anatomies(EXTENDED_CATALOG)
    assert extended["vertebrae_T4"] == "bone" and extended["kidney_cyst_left"] == "kidney"
    assert "brain" not in extended and "spinal_cord" not in extended
    assert anatomies_without_total_class(EXTENDED_CATALOG) == ["pulmonary_artery"]
    assert anatomies_without_total_class(CTRATE_CATALOG) == []
    nothing = EXTENDED_CATALOG.subset(["pulmonary_artery"])
    with pytest.raises(ConfigError, match="none of its anatomies"):
        TotalSegmentatorBackend().classes_needed(nothing)


def _terminology(context: str, type_code: str, modifier: str = "^^", region: str = "^^") -> str:
    """A segment's TerminologyEntry tag as 3D Slicer serialises it."""
    category = "SCT^123037004^Anatomical Structure"
    return f"{context}~{category}~{type_code}~{modifier}~Anatomic codes - DICOM master list~{region}~^^|"


def test_segments_of_the_slicer_extension_are_recognised():
    # the extension's own IDs and names, its standard names with terminology, other sources
    upper_left = _terminology(SLICER_TOTALSEG_CONTEXT, "SCT^45653009^Upper lobe of lung", "SCT^7771000^Left")
    heart_dicom = _terminology("Segmentation category and type - DICOM master list", "SCT^80891009^Heart")
    segments = [
        ("lung_upper_lobe_right", "lung_upper_lobe_right", ""),
        ("Segment_1", "left upper lobe of lung", upper_left),
        ("Segment_2", "Heart", heart_dicom),
        ("Segment_3", "aorta", ""),
        ("Segment_4", "Pulmonary artery", ""),  # heartchambers_highres task: known, not "total"
        ("Segment_5", "my annotation", ""),
    ]
    classes = totalseg_segment_classes(segments)
    assert classes == {
        "lung_upper_lobe_right": "lung_upper_lobe_right",
        "Segment_1": "lung_upper_lobe_left",
        "Segment_2": "heart",
        "Segment_3": "aorta",
        "Segment_4": "pulmonary_artery",
    }
    assert class_of_segment("x", "y", _terminology(SLICER_TOTALSEG_CONTEXT, "SCT^1^Nothing")) is None
    # the segments exported to one label map (value = position + 1) merge into the catalog
    labels = np.arange(len(segments) + 1, dtype=np.uint8)
    value_class = {i + 1: classes[s[0]] for i, s in enumerate(segments) if s[0] in classes}
    merged = merge_labels(labels, value_class, EXTENDED_CATALOG)
    names = [EXTENDED_CATALOG.names[v - 1] if v else None for v in merged]
    assert names == [None, "lung", "lung", "heart", "aorta", "pulmonary_artery", None]


#: What TotalSegmentator 2.x prints for a --fast run with a roi_subset (python_api.py, nnunet.py).
FAST_ROI_LINES = [
    "[fvlm] importing TotalSegmentator",
    "[fvlm] running TotalSegmentator",
    "If you use this tool please cite: https://pubs.rsna.org/doi/10.1148/ryai.230024",
    "Using 'fast' option: resampling to lower resolution (3mm)",
    "Generating rough segmentation for cropping...",
    "Resampling...",
    "  Resampled in 0.09s",
    "Predicting...",
    "  Predicted in 37.67s",
    "Resampling...",
    "  cropping from (233, 167, 191) to (233, 167, 191)",
    "Resampling...",
    "Predicting...",
    "  0%|          | 0/150 [00:00<?, ?it/s]",
    " 50%|█████     | 75/150 [00:10<00:10,  7.1it/s]",
    "100%|██████████| 150/150 [00:20<00:00,  7.2it/s]",
    "  Predicted in 45.15s",
    "Resampling...",
    "Saving segmentations...",
    "  Saved in 0.09s",
]


def test_stage_clock_reads_totalsegmentators_messages():
    import importlib.util

    package = Path(next(iter(importlib.util.find_spec("totalsegmentator").submodule_search_locations)))
    source = (package / "python_api.py").read_text() + (package / "nnunet.py").read_text()
    for message in ("Generating rough segmentation for cropping", "cropping from", "Crop is empty"):
        assert message in source, f"TotalSegmentator no longer prints {message!r}"
    for message in ('"Resampling..."', '"Predicting..."', '"Saving segmentations..."'):
        assert message in source, f"TotalSegmentator no longer prints {message}"
    reports = []
    clock = StageClock(lambda step, f: reports.append((step, f)))
    clock.begin()
    for line in FAST_ROI_LINES:
        clock.line(line)
    timings = clock.finish()
    stages = ["start", "rough segmentation", "resample input", "predict", "resample output", "save"]
    assert list(timings) == stages and all(v >= 0 for v in timings.values())
    fractions = [f for _, f in reports]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] < 1.0
    predict = [f for step, f in reports if step == "TotalSegmentator: predict"]
    assert len(predict) == 3 and predict[0] < predict[1] < predict[2]  # start, 75/150, 150/150
    assert reports[0][0] == "TotalSegmentator: start"
    assert "Generating rough segmentation for cropping..." in clock.log
    assert not any("it/s" in line for line in clock.log)  # progress bars are not logged


def test_offline_guard_blocks_internet_but_not_loopback():
    code = """
import json, socket, threading
from fvlm_core.segmentation.totalseg_run import block_network
blocked = []
block_network(blocked)
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
threading.Thread(target=lambda: server.accept(), daemon=True).start()
socket.create_connection(server.getsockname(), timeout=5).close()  # loopback works
errors = []
import requests
for url in ("https://stats.totalsegmentator.com/log_totalseg_run", "http://93.184.216.34/"):
    try:
        requests.get(url, timeout=5)
    except Exception as exc:
        errors.append(type(exc).__name__)
print(json.dumps({"blocked": blocked, "errors": errors}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"] == ["stats.totalsegmentator.com:443", "93.184.216.34:80"]
    assert out["errors"] == ["ConnectionError", "ConnectionError"]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains ``text`` (Linux /proc): the
    backend's child (its request file) and nnU-Net's workers (their TMPDIR)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text.encode() in seen and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc to list processes")
def test_cancel_kills_the_totalsegmentator_process(empty_home, small_ct, monkeypatch):
    _put_checkpoints(empty_home, (297, 298))
    work = Path(tempfile.mkdtemp(prefix="fvlm-t-"))  # short: multiprocessing puts sockets below it
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # the backend's temporary folder
    seen = []

    def cancel_once_started() -> bool:
        seen.extend(processes_mentioning(str(work)))
        return bool(seen)

    backend = TotalSegmentatorBackend(fast=True, device="cpu", should_cancel=cancel_once_started)
    t0 = time.monotonic()
    with pytest.raises(CancelledError):
        backend.segment(small_ct, CTRATE_CATALOG)
    assert time.monotonic() - t0 < 60
    assert seen, "the TotalSegmentator process was never seen running"
    assert not processes_mentioning(str(work))
    assert not list(work.iterdir())  # its temporary folder (the CT copy) is gone
    # a progress callback that raises CancelledError (the Slicer module's way) also stops it

    def progress(step: str, fraction: float) -> None:
        if re.match(r"TotalSegmentator: start", step):
            raise CancelledError("cancelled by the user")

    with pytest.raises(CancelledError, match="by the user"):
        TotalSegmentatorBackend(fast=True, device="cpu").segment(small_ct, CTRATE_CATALOG, progress=progress)
    assert not processes_mentioning(str(work)) and not list(work.iterdir())
    work.rmdir()


def test_fvlm_analyze_passes_the_totalsegmentator_options(empty_home, ts_dir, tmp_path, capsys):
    import torch

    from fvlm_core.model import FVLM
    from fvlm_training.cli import main

    torch.manual_seed(0)
    FVLM.from_config("fvlm-tiny").save_pretrained(tmp_path / "model")
    out = tmp_path / "findings.json"
    argv = ["analyze", str(ts_dir / "example_ct_sm.nii.gz"), "--backend", "totalsegmentator", "--fast"]
    argv += ["--model", str(tmp_path / "model"), "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "-t total_fast`" in err and "datasets 297, 298" in err  # --fast reached the backend
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc to list processes")
def test_totalsegmentator_process_ends_when_its_parent_dies(empty_home, ts_dir):
    # the Slicer worker may be killed (its cancel watchdog, or the user closing Slicer) while
    # TotalSegmentator runs: the run must not outlive it, nor leave the CT copy behind
    _put_checkpoints(empty_home, (297, 298))
    work = Path(tempfile.mkdtemp(prefix="fvlm-t-"))
    code = (
        "from fvlm_core.io import read_ct\n"
        "from fvlm_core.segmentation.totalseg import TotalSegmentatorBackend\n"
        f"ct = read_ct({str(ts_dir / 'example_ct_sm.nii.gz')!r})\n"
        "TotalSegmentatorBackend(fast=True, device='cpu').segment(ct)\n"
    )
    env = {**os.environ, "TMPDIR": str(work)}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in processes_mentioning(str(work)) if p != parent.pid]:
            assert time.monotonic() < deadline and parent.poll() is None, "TotalSegmentator never started"
            time.sleep(0.2)
        assert list(work.glob("fvlm-ts-*/ct.nii.gz"))
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while processes_mentioning(str(work)) or list(work.iterdir()):
        assert time.monotonic() < deadline, (processes_mentioning(str(work)), list(work.iterdir()))
        time.sleep(0.2)
    work.rmdir()
