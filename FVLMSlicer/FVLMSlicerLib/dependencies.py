"""Installing what fvlm_core needs into Slicer's Python without breaking Slicer.

* Requirements come from ``Resources/requirements.txt`` (fvlm_core's dependencies minus what
  Slicer ships or what the analysis does not need).
* Packages Slicer ships (numpy, SimpleITK, VTK, ...) are never upgraded or replaced: their
  installed versions are pinned in a constraints file given to pip.
* PyTorch is installed by the PyTorch extension's ``PyTorchUtils`` helper when that extension
  is present (it picks the CUDA build for the machine); otherwise the user is told to install
  the PyTorch extension.
* Slicer 5.12+: ``slicer.packaging.pip_ensure`` (checks, asks, shows progress, offers a
  restart). Slicer 5.10/5.11: ``slicer.util.pip_install`` with a list of arguments after a
  confirmation dialog, then a restart prompt when an already-imported package changed.
* In Slicer's testing mode nothing is installed (``pip_ensure`` skips there too): the caller
  learns that something is missing and the self-test skips.

The pure-Python parts (requirement parsing, missing-package check, constraints) have no Slicer
or Qt dependency; the ``ensure_*`` functions import ``slicer`` only when called.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from fvlm_core.errors import DependencyError

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"

#: Distributions Slicer ships: never installed, upgraded or downgraded by this module.
PROTECTED = (
    "numpy",
    "SimpleITK",
    "vtk",
    "pydicom",
    "scipy",
    "Pillow",
    "packaging",
    "requests",
    "pip",
    "setuptools",
    "wheel",
)
#: Installed by the PyTorch extension (or by the user), not by pip here.
TORCH_PACKAGES = ("torch",)

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements.txt (comments and blanks dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    match = _NAME_RE.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def _satisfies(installed: str, requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # no 'packaging': presence is all we can check
        return True
    spec = Requirement(requirement).specifier
    return not spec or spec.contains(Version(installed), prereleases=True)


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """Requirements not installed, or installed at a version outside their specifier."""
    missing = []
    for req in requirements:
        name = requirement_name(req)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if not _satisfies(version, req):
            missing.append(req)
    return missing


def installable(requirements: Iterable[str]) -> list[str]:
    """``requirements`` without protected (Slicer-shipped) packages and PyTorch."""
    skip = {canonical(n) for n in (*PROTECTED, *TORCH_PACKAGES)}
    return [r for r in requirements if canonical(requirement_name(r)) not in skip]


def constraints_text(packages: Iterable[str] = PROTECTED) -> str:
    """pip constraints pinning every installed protected package to its current version."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def write_constraints(folder: str | os.PathLike | None = None) -> Path:
    folder = Path(folder or tempfile.mkdtemp(prefix="fvlm-pip-"))
    path = folder / "constraints.txt"
    path.write_text(constraints_text(), encoding="utf-8")
    return path


def torch_available() -> bool:
    try:
        metadata.version("torch")
        return True
    except metadata.PackageNotFoundError:
        return False


def totalsegmentator_available() -> bool:
    """Whether the ``totalsegmentator`` package (installed by the TotalSegmentator extension) is importable."""
    import importlib.util

    return importlib.util.find_spec("totalsegmentator") is not None


def status() -> dict[str, list[str] | bool]:
    """What is missing: ``{"missing": [...], "torch": bool}`` (no installs)."""
    return {"missing": installable(missing_requirements(read_requirements())), "torch": torch_available()}


# ------------------------------------------------------------------------------------------
# inside Slicer
# ------------------------------------------------------------------------------------------


def testing_mode() -> bool:
    """Whether Slicer runs its tests (``slicer.app.testingEnabled()``): nothing is installed then."""
    try:
        import slicer
    except ImportError:
        return False
    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def ensure_torch(ask: bool = True) -> bool:
    """Make PyTorch importable, through the PyTorch extension when it is installed.

    Returns ``False`` in Slicer's testing mode when PyTorch is missing: a test never downloads it.
    """
    if torch_available():
        return True
    if testing_mode():
        return False
    try:
        import PyTorchUtils  # the "PyTorch" Slicer extension
    except ImportError as exc:
        raise DependencyError(
            "PyTorch is not installed in Slicer. Install the 'PyTorch' extension (Extensions Manager), "
            "restart Slicer, and click Analyze again; it installs the PyTorch build that fits your GPU/CPU."
        ) from exc
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=ask)
        if torch is None:
            raise DependencyError("PyTorch installation was cancelled or failed; FVLM needs PyTorch to run.")
    return True


def _pip_ensure(packaging, missing: list[str], constraints: Path, ask: bool) -> bool:
    """Slicer 5.12+: ``slicer.packaging.pip_ensure`` (asks, shows progress, offers a restart).

    It returns None whatever happened (installed, nothing to do, skipped in testing mode) and
    raises RuntimeError when the user declines: the caller checks the packages again.
    """
    from subprocess import CalledProcessError

    try:
        packaging.pip_ensure(missing, constraints=constraints, prompt_install=ask, requester="FVLM")
    except RuntimeError as exc:
        if "declined" in str(exc).lower():
            return False
        raise DependencyError(f"installing {', '.join(missing)} failed ({exc}).") from exc
    except CalledProcessError as exc:
        raise DependencyError(
            f"installing {', '.join(missing)} failed (pip exited with code {exc.returncode}). See the "
            "Python console for pip's output and check the network connection."
        ) from exc
    return True


def _pip_install(slicer, missing: list[str], constraints: Path, ask: bool) -> bool:
    """Slicer before 5.12: ``slicer.util.pip_install`` after a confirmation, then a restart prompt.

    The arguments go as a list (one item per argument): given one string, ``pip_install``
    splits it with ``shlex``, which breaks a constraints path holding a space (a Windows user
    folder) or a backslash.
    """
    if ask and not slicer.util.confirmOkCancelDisplay(
        "FVLM needs these Python packages, which will be installed into Slicer now "
        f"(Slicer's own numpy/SimpleITK/VTK are kept):\n\n{chr(10).join(missing)}",
        "FVLM: install dependencies",
    ):
        return False
    already_imported = [r for r in missing if requirement_name(r).replace("-", "_").lower() in sys.modules]
    try:
        slicer.util.pip_install(["-c", str(constraints), *missing])
    except Exception as exc:
        raise DependencyError(
            f"installing {', '.join(missing)} failed ({exc}). See the Python console for pip's output; "
            "check the network connection or install them with Slicer's PythonSlicer -m pip."
        ) from exc
    if already_imported and slicer.util.confirmYesNoDisplay(
        "Updated packages were already loaded; Slicer must restart to use them. Restart now?",
        "FVLM: restart needed",
    ):
        slicer.util.restart()
    return True


_PRESENT = threading.Event()  # set once everything was found installed (packages do not vanish)


def _check_present() -> bool:
    if torch_available() and not installable(missing_requirements(read_requirements())):
        _PRESENT.set()
    return _PRESENT.is_set()


def check_in_background() -> threading.Thread:
    """Look for the requirements in a background thread (reading package metadata takes a while),
    so that the first Analyze does not do it on the GUI thread."""
    thread = threading.Thread(target=_check_present, name="fvlm-check-dependencies", daemon=True)
    thread.start()
    return thread


#: What "Install TotalSegmentator" installs. nnU-Net 2.6.2+ needs timm and with it torchvision,
#: which would replace a CPU PyTorch by a CUDA build from PyPI (pyproject.toml's test extra).
TOTALSEG_REQUIREMENTS = ("totalsegmentator>=2.4", "nnunetv2<2.6.2")


def totalseg_constraints_text() -> str:
    """Constraints for installing TotalSegmentator: Slicer's packages and the installed PyTorch
    pinned (never replaced), nnU-Net kept below 2.6.2."""
    return constraints_text((*PROTECTED, *TORCH_PACKAGES)) + "nnunetv2<2.6.2\n"


def _install(missing: list[str], constraints: Path, ask: bool) -> bool:
    """pip-install ``missing`` with ``constraints`` the way this Slicer offers (see the module)."""
    import slicer

    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
        return _pip_ensure(packaging, missing, constraints, ask)
    return _pip_install(slicer, missing, constraints, ask)


def install_totalsegmentator(ask: bool = True) -> bool:
    """Install the TotalSegmentator package (only on the user's explicit request); ``True`` once
    it is importable. Its weights are not downloaded here (TotalSegmentator does that on its
    first run from its own module).

    Returns ``False`` when the user declined, and in Slicer's testing mode (nothing is installed).

    Raises:
        DependencyError: PyTorch is missing (install FVLM's dependencies first), or the install
            failed or left the package missing.
    """
    if totalsegmentator_available():
        return True
    if testing_mode():
        return False
    if not torch_available():
        raise DependencyError(
            "TotalSegmentator needs PyTorch: click Install dependencies (or install the PyTorch extension) first."
        )
    folder = Path(tempfile.mkdtemp(prefix="fvlm-pip-"))
    constraints = folder / "constraints.txt"
    constraints.write_text(totalseg_constraints_text(), encoding="utf-8")
    if not _install(list(TOTALSEG_REQUIREMENTS), constraints, ask):
        return False
    import importlib

    importlib.invalidate_caches()
    if not totalsegmentator_available():
        raise DependencyError(
            "after installing, TotalSegmentator is still not importable. See the Python console for pip's "
            "output; restart Slicer and try again."
        )
    return True


def ensure_dependencies(ask: bool = True) -> bool:
    """Install missing requirements into Slicer's Python; ``True`` when everything is importable.

    Returns ``False`` when the user declined, and in Slicer's testing mode when something is
    missing (tests never install packages or download PyTorch; the self-test then skips).
    Raises :class:`DependencyError` when an install failed or left something missing.
    """
    if _PRESENT.is_set() or _check_present():
        return True
    if not ensure_torch(ask):
        return False
    missing = installable(missing_requirements(read_requirements()))
    if not missing:
        _PRESENT.set()
        return True
    if testing_mode():
        return False
    if not _install(missing, write_constraints(), ask):
        return False
    still = installable(missing_requirements(read_requirements()))
    if still:
        raise DependencyError(
            f"after installing, these packages are still missing: {', '.join(still)}. See the Python "
            "console for pip's output; restart Slicer and try again."
        )
    _PRESENT.set()
    return True
