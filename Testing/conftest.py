"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent, as in a user's
fresh clone) and a deterministic, single-threaded torch setup."""

from __future__ import annotations

import atexit
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
