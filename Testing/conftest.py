"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent, as in a user's
fresh clone) and a deterministic, single-threaded torch setup."""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# the demo records its model folder there: a test's demo must not replace the user's
os.environ["FVLM_CACHE"] = tempfile.mkdtemp(prefix="fvlm-test-cache-")
atexit.register(shutil.rmtree, os.environ["FVLM_CACHE"], True)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# FVLMSlicerLib, which the project does not install, is imported as Slicer imports it: from the
# module's folder.
sys.path.insert(0, str(PROJECT_ROOT / "FVLMSlicer"))
SHARED_DATA = Path(os.environ.get("FVLM_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
TS_DIR = SHARED_DATA / "ct" / "totalsegmentator"
REPORTS_CSV = SHARED_DATA / "reports" / "ctrate_reports_labelled_800.csv"
CHECKPOINT_KEYS = SHARED_DATA / "fvlm_reference" / "checkpoint_keys.json"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set FVLM_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def ts_dir() -> Path:
    """Folder of the TotalSegmentator example CTs and reference segmentations."""
    return _require(TS_DIR)


@pytest.fixture(scope="session")
def reports_csv() -> Path:
    """The 800 manually labelled CT-RATE-style reports."""
    return _require(REPORTS_CSV)


@pytest.fixture(scope="session")
def checkpoint_keys() -> Path:
    """Names and shapes of the official fVLM checkpoint."""
    return _require(CHECKPOINT_KEYS)


@pytest.fixture(scope="session")
def small_model_config():
    """``make(**options)``: an ``fvlm-tiny`` config shrunk for unit tests (16^3 input, a 4^3 token
    grid of width 32, embeddings of 16), with top-level ``options`` applied."""
    from fvlm_core.model import FVLMConfig, load_config

    def make(**options):
        cfg = load_config("fvlm-tiny").to_dict()
        cfg["vision"].update(
            img_size=[16, 16, 16],
            patch_size=[4, 4, 4],
            cnn_stem_patch=2,
            cnn_channels=[8, 16],
            hidden_size=32,
        )
        cfg.update(embed_dim=16, **options)
        return FVLMConfig.from_dict(cfg)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A demo-size model folder: ``fvlm-tiny`` with random weights (seed 0), for end-to-end
    evaluation tests."""
    import torch

    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    FVLM.from_config("fvlm-tiny").save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _autograd_stays_enabled():
    """Fail the test that leaves autograd disabled globally (it would break every later test)."""
    yield
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test (or the code it ran) left torch autograd disabled globally")


# ----------------------------------------------------------------- two workers, one machine
#
# The suite runs on two pytest-xdist workers (pyproject: ``-n 2 --dist loadfile``, a test file's
# tests on one worker, module fixtures built once). Most tests wait on child processes for much of
# their time, so two workers keep both cores busy. A test whose assertion depends on the CPU time
# it gets (a time-budgeted training run that must learn, the time budget on a busy machine, a ratio
# of two timings) is marked ``alone``: it runs while the other worker waits. A readers-writer lock
# on two files in the run's shared temp folder does it: a worker holds the room shared from the
# first to the last test of a file (module fixtures run background work between tests), an
# ``alone`` test holds it exclusively, and a worker waiting for it holds the gate, so that no new
# file starts meanwhile. Files with ``alone`` tests run first, then files with ``slow`` tests (the
# quick files fill the end), ``alone`` tests first within their file.


class MachineShare:
    """A worker's hold on the machine: None, "shared" or "alone"."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._gate = os.open(folder / "gate.lock", os.O_RDWR | os.O_CREAT)
        self._room = os.open(folder / "room.lock", os.O_RDWR | os.O_CREAT)
        self.held: str | None = None

    def hold(self, how: str) -> None:
        if self.held == how:
            return
        self.release()
        fcntl.flock(self._gate, fcntl.LOCK_EX)  # an "alone" test waiting holds it: no new file starts
        fcntl.flock(self._room, fcntl.LOCK_EX if how == "alone" else fcntl.LOCK_SH)
        if how == "shared":
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        self.held = how

    def release(self) -> None:
        if self.held is not None:
            fcntl.flock(self._room, fcntl.LOCK_UN)
            fcntl.flock(self._gate, fcntl.LOCK_UN)  # not held while "shared": a no-op then
            self.held = None


def pytest_configure(config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker; its basetemp is inside the run's own folder
        run = config.workerinput["testrunuid"]
        base = config.option.basetemp  # None without pytest's tmp_path plugin
        folder = Path(base).parent if base else Path(tempfile.gettempdir()) / f"fvlm-tests-{run}"
        config._fvlm_share = MachineShare(folder / "machine-share")


def _rank(item) -> int:
    return 0 if item.get_closest_marker("alone") else 1 if item.get_closest_marker("slow") else 2


def pytest_collection_modifyitems(config, items) -> None:
    by_file: dict[Path, list] = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    files = sorted(by_file.values(), key=lambda tests: min(_rank(t) for t in tests))  # stable
    items[:] = [t for tests in files for t in sorted(tests, key=lambda t: _rank(t) != 0)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    share = getattr(item.config, "_fvlm_share", None)
    if share is None:  # not under xdist: nothing else runs beside this test
        yield
        return
    share.hold("alone" if item.get_closest_marker("alone") else "shared")
    yield
    if nextitem is None or nextitem.path != item.path:
        share.release()
