"""Installing FVLM's requirements and TotalSegmentator never changes a package Slicer has (issue 24).

A stand-in Slicer environment: a virtual environment holding, at pinned versions, the
distributions Slicer ships (numpy, SimpleITK, scipy, Pillow, requests, pydicom, ...) and the
torch / torchvision the PyTorch extension installed. pip installs from a local folder of wheels
(no network): stand-ins with the real names and, where they decide what pip does, the real
``Requires-Dist`` rules, copied from the distributions installed here (monai 1.6.1: torch>=2.8;
dicom2nifti 2.6.2: pydicom>=3; TotalSegmentator 2.18.0; nnunetv2 2.6.0) or written from the
packages' metadata (monai 1.4: torch>=1.9; dicom2nifti 2.5.1: pydicom>=2.2; nnU-Net 2.6.2:
timm, which needs torchvision); every other requirement is an empty wheel of a version that
satisfies it. Newer numpy, torch, torchvision, pydicom and requests are offered too.

The module's own install functions run against that environment (``pip install`` standing in
for ``slicer.util.pip_install``): each step is resolved with ``--dry-run --report`` first, and
after each install none of the pinned distributions has changed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# FVLMSlicerLib: on sys.path by conftest.py
from FVLMSlicerLib import dependencies
from packaging.requirements import Requirement
from packaging.version import Version

#: What the stand-in Slicer has installed (Slicer's packages, the PyTorch extension's torch).
PINNED = {
    "numpy": "1.26.4",
    "SimpleITK": "2.4.1",
    "scipy": "1.14.1",
    "Pillow": "10.4.0",
    "requests": "2.32.3",
    "pydicom": "2.4.4",
    "packaging": "24.1",
    "vtk": "9.4.2",
    "torch": "2.4.1",
    "torchvision": "0.19.1",
}
NEWER = {
    "numpy": "2.2.0",
    "torch": "2.9.0",
    "torchvision": "0.24.0",
    "pydicom": "3.0.1",
    "requests": "2.32.5",
}


def _real(name: str) -> tuple[str, list[str]]:
    return importlib.metadata.version(name), list(importlib.metadata.requires(name) or [])


def _rules() -> dict[tuple[str, str], list[str]]:
    """``(name, version) -> Requires-Dist`` of the wheels whose rules matter."""
    rules = {(name, version): [] for name, version in PINNED.items()}
    rules.update({(name, version): [] for name, version in NEWER.items()})
    rules[("torchvision", "0.24.0")] = ["torch==2.9.0"]
    rules[("torchvision", "0.19.1")] = ["torch==2.4.1"]
    for name in ("monai", "dicom2nifti", "TotalSegmentator", "nnunetv2"):
        version, requires = _real(name)
        rules[(name, version)] = requires
    rules[("monai", "1.4.0")] = ["torch>=1.9", "numpy>=1.24"]
    rules[("dicom2nifti", "2.5.1")] = ["nibabel", "numpy", "scipy", "pydicom>=2.2.0", "python-gdcm"]
    rules[("nnunetv2", "2.6.2")] = [*_real("nnunetv2")[1], "timm"]
    rules[("timm", "1.0.9")] = ["torch", "torchvision"]
    return rules


CANDIDATES = ("0.2.3", "0.3.1", "0.25.1", "1.0", "1.3", "2.2.1", "3.0", "4.40", "4.60", "5.9", "6.0", "24.1")


def _leaves(rules: dict[tuple[str, str], list[str]], fvlm: list[str]) -> dict[tuple[str, str], list[str]]:
    """An empty wheel for every other name the rules or FVLM's requirements need."""
    known = {dependencies.canonical(n) for n, _ in rules}
    specs: dict[str, list] = {}
    for requirement in [r for rs in rules.values() for r in rs] + fvlm:
        req = Requirement(requirement)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if dependencies.canonical(req.name) not in known:
            specs.setdefault(req.name, []).append(req.specifier)
    out = {}
    for name, found in specs.items():
        version = next(v for v in CANDIDATES if all(s.contains(Version(v), prereleases=True) for s in found))
        out[(name, version)] = []
    return out


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A pure-Python wheel holding only its metadata (what pip resolves and installs)."""
    stem = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{stem}.dist-info/METADATA": "Metadata-Version: 2.1\n"
        + f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fvlm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{stem}.dist-info/RECORD"] = "\n".join([*record, f"{stem}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """``(python, pip options, pinned)``: the stand-in Slicer environment and the wheel folder."""
    tmp = tmp_path_factory.mktemp("standin")
    wheels = tmp / "wheels"
    wheels.mkdir()
    rules = _rules()
    fvlm = dependencies.installable(dependencies.read_requirements())
    for (name, version), requires in {**rules, **_leaves(rules, fvlm)}.items():
        _wheel(wheels, name, version, requires)
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "env")], check=True, capture_output=True)
    python = str(tmp / "env" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
    options = ["--no-index", "--find-links", str(wheels), "--disable-pip-version-check"]
    pins = [f"{n}=={v}" for n, v in PINNED.items()]
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", *options, *pins], check=True, capture_output=True
    )
    return python, options, {dependencies.canonical(n): v for n, v in PINNED.items()}


def _pip(python: str, options: list[str]):
    """``pip install ARGS`` in the stand-in (what ``slicer.util.pip_install`` runs in Slicer)."""

    def run(args: list[str]) -> None:
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", *options, *args], check=True, capture_output=True
        )

    return run


def _unchanged(python: str, pinned: dict[str, str]) -> dict[str, str]:
    installed = dependencies.installed_versions(python)
    assert {n: installed.get(n) for n in pinned} == pinned
    return installed


@pytest.mark.slow
def test_installs_change_no_package_slicer_has(standin, monkeypatch):
    python, options, pinned = standin
    # the stand-in reproduces what breaks Slicer when nothing is pinned: monai>=1.4 resolves to
    # a monai that needs torch>=2.8, TotalSegmentator's dicom2nifti to one that needs pydicom>=3
    plain = dependencies.dry_run(python, ["monai>=1.4"], options)
    assert plain["torch"] == NEWER["torch"] and plain["monai"] == "1.6.1"
    plain = dependencies.dry_run(python, [dependencies.TOTALSEG_REQUIREMENT], options)
    assert plain["pydicom"] == NEWER["pydicom"]

    checked = []
    check = dependencies.check_step
    monkeypatch.setattr(dependencies, "check_step", lambda *a, **k: checked.append(a[1]) or check(*a, **k))
    fvlm = dependencies.installable(dependencies.read_requirements())
    assert not any(dependencies.requirement_name(r) == "monai" for r in fvlm)  # training only
    # monai stands in for any requirement whose newest release needs a newer torch than Slicer's
    dependencies.install_requirements_into(python, [*fvlm, "monai>=1.4"], _pip(python, options), options)
    installed = _unchanged(python, pinned)
    assert installed["monai"] == "1.4.0"  # the monai that runs on the installed torch
    assert all(dependencies.canonical(dependencies.requirement_name(r)) in installed for r in fvlm)
    dependencies.install_totalsegmentator_into(python, _pip(python, options), options)
    installed = _unchanged(python, pinned)
    assert installed["totalsegmentator"] == _real("TotalSegmentator")[0]
    assert installed["dicom2nifti"] == "2.5.1" and installed["nnunetv2"] == _real("nnunetv2")[0]
    assert "timm" not in installed
    assert len(checked) == 5  # every pip step was resolved with --dry-run first: FVLM, dicom2nifti,
    # TotalSegmentator (--no-deps), its requirements, nnU-Net
    assert any("--no-deps" in args for args in checked)


@pytest.mark.slow
def test_a_step_that_would_replace_a_slicer_package_is_refused_before_anything_is_installed(standin):
    python, options, _ = standin
    before = dependencies.installed_versions(python)
    ran = []
    with pytest.raises(dependencies.DependencyError, match="without replacing"):
        dependencies.install_requirements_into(python, ["monai>=1.6"], ran.append, options)
    assert ran == [] and dependencies.installed_versions(python) == before
