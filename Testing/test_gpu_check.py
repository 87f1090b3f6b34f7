"""benchmarks/gpu_check.py's own rules, fast: its time limit (stages skipped with the reason,
the file still written), missing data refused before any work, a stage over its limit killed
with its process group, and the LZMA wheels that carry SimpleITK to the GPU machine. The check
itself runs end to end on the CPU in Testing/test_benchmarks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check
from timing import SMOKE_ENV


@pytest.fixture(autouse=True)
def _smoke_env_restored(monkeypatch):
    """``--small`` turns the smoke size on for the process; keep it to these tests."""
    monkeypatch.setenv(SMOKE_ENV, "0")


def test_gpu_check_out_of_time_skips_and_says_so(tmp_path):
    """With no time left every stage is skipped with the reason, and the file is still written."""
    out = tmp_path / "gc.json"
    rc = gpu_check.main(["--small", "--no-install", "--time-limit", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 1 and data["status"] == "incomplete"
    stages = data["stages"]
    assert list(stages) == ["install", *gpu_check.INFERENCE_STAGES, "analyze_cli", "torchrun", "train_step"]
    assert all(s["status"] == "skipped" for s in stages.values())
    assert stages["install"]["error"] == "--no-install"
    for name in ("environment", "model", "train_step"):
        assert "no time left" in stages[name]["error"]
    assert stages["torchrun"]["error"] == "needs stage model, train_data"


def test_gpu_check_skip_leaves_a_stage_out_by_name(tmp_path, capsys):
    """``--skip`` (a rerun of the other stages within a lease): the stage is skipped, said to
    be, and not counted as a failure; an unknown stage name is refused."""
    out = tmp_path / "gc.json"
    argv = ["--small", "--no-install", "--time-limit", "1", "--out", str(out)]
    gpu_check.main([*argv, "--skip", "train_step,inference"])
    data = json.loads(out.read_text())
    assert data["stages"]["train_step"]["error"] == "--skip" and data["stages"]["model"]["error"] == "--skip"
    assert "train_step" not in data["not_ok"] and "model" not in data["not_ok"]
    assert data["not_ok"] == {"analyze_cli": "skipped", "torchrun": "skipped"}  # they need the model
    with pytest.raises(SystemExit):
        gpu_check.main([*argv, "--skip", "trainstep"])
    assert "not a stage" in capsys.readouterr().err


def test_gpu_check_without_data_fails_before_any_work(tmp_path):
    out = tmp_path / "gc.json"
    rc = gpu_check.main(["--small", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 1 and data["status"] == "failed" and "chest_ct.nii.gz" in data["error"]
    assert data["stages"] == {}


def test_a_stage_over_its_limit_is_killed_and_what_it_reported_is_kept():
    """``run_streaming``: stage lines arrive as they are printed; at the limit the whole process
    group is killed (a child it started too) and rc is None."""
    code = (
        "import json, subprocess, sys, time\n"
        f"print({gpu_check.STAGE_MARK!r} + json.dumps({{'name': 'a', 'status': 'ok'}}), flush=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    seen = []
    run = gpu_check.run_streaming([sys.executable, "-c", code], dict(os.environ), 3, seen.append)
    assert run["rc"] is None and 3 <= run["seconds"] < 20
    assert seen == [{"name": "a", "status": "ok"}]


def test_lzma_wheel_installs_offline(tmp_path):
    """The device gets SimpleITK as a wheel recompressed with LZMA (to fit what a call carries):
    pip installs such a wheel offline, file for file."""
    whl = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    files = {
        "tiny_pkg/__init__.py": "VALUE = 42\n" * 200,
        "tiny_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n",
        "tiny_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tiny_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in {**files, "tiny_pkg-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    assert gpu_check.recompress_wheel(whl) and not gpu_check.recompress_wheel(whl)
    with zipfile.ZipFile(whl) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target)]
    subprocess.run([*cmd, str(whl)], check=True, capture_output=True)
    assert (target / "tiny_pkg" / "__init__.py").read_text() == files["tiny_pkg/__init__.py"]
