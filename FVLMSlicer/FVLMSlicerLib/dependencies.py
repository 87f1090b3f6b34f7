"""Installing what FVLM needs into Slicer's Python without replacing anything that is there.

The rules, as the anchors do it (read from their sources):

* PyTorch comes from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``,
  which picks the build for the machine's GPU or CPU); the user is told to install that
  extension when it is missing.
* Every distribution already installed (Slicer's numpy, SimpleITK, VTK, pydicom, requests, ...;
  the torch and torchvision the PyTorch extension installed; the nnU-Net of the NNUNet
  extension) is pinned at its installed version in the pip constraints file. FVLM's own
  requirements are the only ones pip may upgrade, and only when they are below their
  specifier; so ``monai>=1.4`` resolves to a monai that runs on the installed torch instead of
  replacing it.
* Before anything is installed, pip resolves each step with ``--dry-run --report``: a step that
  would replace an installed distribution (or that pip cannot resolve without doing so) is
  refused with the names, and nothing is installed.
* TotalSegmentator: the TotalSegmentator extension's own installer when that extension is
  present; otherwise the way it installs the package (SlicerTotalSegmentator's
  ``setupPythonRequirements`` / ``pipInstallSelective``): ``dicom2nifti<=2.5.1`` first (2.6
  needs pydicom 3, replacing Slicer's), the package with ``--no-deps``, then its requirements
  except :data:`TOTALSEG_SKIP`; nnU-Net from the NNUNet extension when present.
* Slicer 5.12+: ``slicer.packaging.pip_ensure`` (imported explicitly: ``slicer/__init__`` does
  not import that submodule) for FVLM's requirements; 5.10/5.11: ``slicer.util.pip_install``
  with a list of arguments. In Slicer's testing mode nothing is installed.

The environment is queried through the Python that pip installs into (``python -c``), so the
same code runs against Slicer's Python and, in the tests, against a stand-in environment.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fvlm_core.errors import DependencyError

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"

#: Installed by the PyTorch extension (PyTorchUtils installs both), never by pip here.
TORCH_PACKAGES = ("torch", "torchvision")
#: Distributions Slicer ships; never in FVLM's requirements (installed ones are pinned anyway).
SLICER_PACKAGES = ("numpy", "SimpleITK", "vtk", "scipy", "Pillow", "packaging", "requests", "pydicom")
TOTALSEG_REQUIREMENT = "totalsegmentator>=2.4"
#: SlicerTotalSegmentator's ``packagesToSkip``: what stays out of TotalSegmentator's requirements.
TOTALSEG_SKIP = ("SimpleITK", "torch", "nnunetv2", "requests", "rt_utils", "dicom2nifti")
#: SlicerTotalSegmentator's dicom2nifti: 2.6 needs pydicom>=3, which would replace Slicer's.
DICOM2NIFTI_REQUIREMENT = "dicom2nifti<=2.5.1"
#: nnU-Net when no NNUNet extension installs it: 2.6.2+ needs timm and with it torchvision,
#: which pip would fetch from PyPI (a CUDA build) where the PyTorch extension installed none.
NNUNET_REQUIREMENT = "nnunetv2>=2.3.1,<2.6.2"

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

PipRun = Callable[[list[str]], None]  # runs ``pip install ARGS`` in the target environment


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements.txt (comments and blanks dropped)."""
    lines = (raw.split("#", 1)[0].strip() for raw in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    match = _NAME_RE.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def _satisfies(installed: str, requirement: str) -> bool:
    from packaging.requirements import Requirement  # Slicer ships packaging
    from packaging.version import Version

    spec = Requirement(requirement).specifier
    return not spec or spec.contains(Version(installed), prereleases=True)


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """Requirements not installed in this Python, or installed outside their specifier."""
    missing = []
    for req in requirements:
        try:
            if not _satisfies(metadata.version(requirement_name(req)), req):
                missing.append(req)
        except metadata.PackageNotFoundError:
            missing.append(req)
    return missing


def installable(requirements: Iterable[str]) -> list[str]:
    """``requirements`` without PyTorch (the PyTorch extension's)."""
    skip = {canonical(n) for n in TORCH_PACKAGES}
    return [r for r in requirements if canonical(requirement_name(r)) not in skip]


def torch_available() -> bool:
    try:
        metadata.version("torch")
        return True
    except metadata.PackageNotFoundError:
        return False


def totalsegmentator_available() -> bool:
    """Whether the ``totalsegmentator`` package is importable here."""
    import importlib.util

    return importlib.util.find_spec("totalsegmentator") is not None


# ------------------------------------------------------------------------------------------
# an environment as pip sees it (Slicer's Python, or a stand-in's)
# ------------------------------------------------------------------------------------------


def _python_json(python: str, script: str) -> object:
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise DependencyError(
            f"could not read the Python environment of {python}: {run.stderr.strip()[-500:]}"
        )
    return json.loads(run.stdout)


def installed_versions(python: str) -> dict[str, str]:
    """``{canonical name: version}`` of every distribution installed in ``python``'s environment."""
    script = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
    )
    return {canonical(k): v for k, v in _python_json(python, script).items()}


def requires(python: str, distribution: str) -> list[str]:
    """The ``Requires-Dist`` entries of an installed distribution of ``python``'s environment."""
    script = f"import json, importlib.metadata as m; print(json.dumps(m.requires({distribution!r}) or []))"
    return list(_python_json(python, script))


def constraints_text(installed: dict[str, str], free: Iterable[str] = ()) -> str:
    """pip constraints pinning every installed distribution but those in ``free`` to its version."""
    from packaging.version import InvalidVersion, Version

    free = {canonical(n) for n in free}
    lines = []
    for name, version in sorted(installed.items()):
        try:
            Version(version)  # pip could not read a pin it cannot parse
        except InvalidVersion:
            continue
        if name not in free:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def write_constraints(text: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fvlm-pip-")) / "constraints.txt"
    path.write_text(text, encoding="utf-8")
    return path


def dry_run(python: str, args: Sequence[str], pip_options: Sequence[str] = ()) -> dict[str, str]:
    """What ``pip install ARGS`` would install in ``python``'s environment: ``{name: version}``.

    Raises:
        DependencyError: pip cannot resolve it (e.g. only by changing a pinned distribution).
    """
    cmd = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", *pip_options, *args]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
        raise DependencyError(
            f"pip cannot install {' '.join(a for a in args if not a.startswith('-'))} without replacing "
            f"packages Slicer or its extensions installed; nothing was installed. pip said: {' '.join(lines[-6:])}"
        )
    report = json.loads(run.stdout)
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report.get("install", [])}


def check_step(
    python: str, args: Sequence[str], installed: dict[str, str], pip_options: Sequence[str] = ()
) -> None:
    """Refuse a pip step that would replace an installed distribution (nothing is installed).

    ``installed``: the distributions that must stay as they are (``{canonical name: version}``).
    """
    changes = {
        name: (installed[name], version)
        for name, version in dry_run(python, args, pip_options).items()
        if name in installed and installed[name] != version
    }
    if changes:
        what = ", ".join(f"{n} {old} by {new}" for n, (old, new) in sorted(changes.items()))
        raise DependencyError(
            f"installing {' '.join(a for a in args if not a.startswith('-'))} would replace {what}, which "
            "Slicer or one of its extensions installed; nothing was installed."
        )


def _rewrite(requirement: str) -> str | None:
    """A ``Requires-Dist`` entry as pip takes it, or None for an extra's (SlicerTotalSegmentator's rule)."""
    if "extra ==" in requirement:
        return None
    return requirement.replace(" (", "").replace(")", "").strip()


def totalseg_dependencies(requirements: Iterable[str]) -> list[str]:
    """TotalSegmentator's requirements without :data:`TOTALSEG_SKIP` and extras."""
    skip = {canonical(n) for n in TOTALSEG_SKIP}
    out = []
    for req in requirements:
        req = _rewrite(req)
        if req and canonical(requirement_name(req)) not in skip:
            out.append(req)
    return out


def install_requirements_into(
    python: str, requirements: Sequence[str], run: PipRun, pip_options: Sequence[str] = ()
) -> None:
    """FVLM's ``requirements`` into ``python``'s environment, everything installed pinned but them."""
    installed = installed_versions(python)
    constraints = write_constraints(constraints_text(installed, (requirement_name(r) for r in requirements)))
    args = ["-c", str(constraints), *requirements]
    pinned = {
        n: v for n, v in installed.items() if n not in {canonical(requirement_name(r)) for r in requirements}
    }
    check_step(python, args, pinned, pip_options)
    run(args)


def install_totalsegmentator_into(
    python: str, run: PipRun, pip_options: Sequence[str] = (), nnunet: Callable[[], None] | None = None
) -> None:
    """TotalSegmentator into ``python``'s environment, SlicerTotalSegmentator's way (module
    docstring), every step checked first; ``nnunet``: the NNUNet extension's installer."""
    installed = installed_versions(python)
    constraints = str(write_constraints(constraints_text(installed)))
    steps: list[list[str]] = []
    if "dicom2nifti" not in installed:
        steps.append(["-c", constraints, DICOM2NIFTI_REQUIREMENT])
    steps.append(["--no-deps", "-c", constraints, TOTALSEG_REQUIREMENT])
    for args in steps:
        check_step(python, args, installed, pip_options)
        run(args)
    deps = totalseg_dependencies(requires(python, "TotalSegmentator"))
    if deps:
        args = ["-c", constraints, *deps]
        check_step(python, args, installed, pip_options)
        run(args)
    if "nnunetv2" not in installed:
        if nnunet is not None:
            nnunet()
        else:
            args = ["-c", constraints, NNUNET_REQUIREMENT]
            check_step(python, args, installed, pip_options)
            run(args)


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
    """Make PyTorch importable through the PyTorch extension; False in testing mode without it."""
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
    if not logic.torchInstalled() and logic.installTorch(askConfirmation=ask) is None:
        raise DependencyError("PyTorch installation was cancelled or failed; FVLM needs PyTorch to run.")
    return True


def _slicer_pip(slicer) -> PipRun:
    """``slicer.util.pip_install`` with a list of arguments (a string would be split with shlex,
    breaking a constraints path holding a space or a backslash)."""

    def run(args: list[str]) -> None:
        try:
            slicer.util.pip_install(list(args))
        except Exception as exc:
            raise DependencyError(
                f"installing {' '.join(a for a in args if not a.startswith('-'))} failed ({exc}). See the "
                "Python console for pip's output and check the network connection."
            ) from exc

    return run


def _pip_ensure_run(packaging, requirements: list[str]) -> PipRun:
    """Slicer 5.12+: ``slicer.packaging.pip_ensure`` (progress dialog, restart offer) for ``run``."""
    from subprocess import CalledProcessError

    def run(args: list[str]) -> None:
        try:
            packaging.pip_ensure(requirements, constraints=args[1], prompt_install=False, requester="FVLM")
        except (RuntimeError, CalledProcessError) as exc:
            raise DependencyError(f"installing {', '.join(requirements)} failed ({exc}).") from exc

    return run


def _slicer_packaging():
    """``slicer.packaging`` (Slicer 5.12+), imported explicitly, or None."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def _confirm(slicer, text: str, title: str) -> bool:
    return bool(slicer.util.confirmOkCancelDisplay(text, title))


def _offer_restart(slicer, requirements: Sequence[str]) -> None:
    loaded = [r for r in requirements if requirement_name(r).replace("-", "_").lower() in sys.modules]
    if loaded and slicer.util.confirmYesNoDisplay(
        "Updated packages were already loaded; Slicer must restart to use them. Restart now?",
        "FVLM: restart needed",
    ):
        slicer.util.restart()


def ensure_dependencies(ask: bool = True) -> bool:
    """Install missing requirements into Slicer's Python; ``True`` when everything is importable.

    Returns ``False`` when the user declined, and in Slicer's testing mode when something is
    missing (tests never install packages or download PyTorch; the self-test then skips).

    Raises:
        DependencyError: an install failed, would have replaced an installed package, or left
            something missing.
    """
    if torch_available() and not installable(missing_requirements(read_requirements())):
        return True
    if not ensure_torch(ask):
        return False
    missing = installable(missing_requirements(read_requirements()))
    if not missing:
        return True
    if testing_mode():
        return False
    import slicer

    from .warm import python_executable

    if ask and not _confirm(
        slicer,
        "FVLM needs these Python packages, which will be installed into Slicer now (what is installed "
        f"already, Slicer's numpy/SimpleITK/VTK and PyTorch included, is kept):\n\n{chr(10).join(missing)}",
        "FVLM: install dependencies",
    ):
        return False
    packaging = _slicer_packaging()
    run = _pip_ensure_run(packaging, missing) if packaging is not None else _slicer_pip(slicer)
    install_requirements_into(python_executable(), missing, run)
    if packaging is None:
        _offer_restart(slicer, missing)
    still = installable(missing_requirements(read_requirements()))
    if still:
        raise DependencyError(
            f"after installing, these packages are still missing: {', '.join(still)}. See the Python "
            "console for pip's output; restart Slicer and try again."
        )
    return True


def _extension_logic(module: str, logic: str):
    """The logic class of an installed Slicer extension's module (e.g. TotalSegmentator), or None."""
    try:
        import importlib

        return getattr(importlib.import_module(module), logic)
    except (ImportError, AttributeError):
        return None


def install_totalsegmentator(ask: bool = True) -> bool:
    """Install the TotalSegmentator package (only on the user's explicit request); ``True`` once
    it is importable. Its weights are not downloaded here (TotalSegmentator does that on its
    first run from its own module).

    Returns ``False`` when the user declined, and in Slicer's testing mode (nothing is installed).

    Raises:
        DependencyError: PyTorch is missing, or the install failed, would have replaced an
            installed package, or left the package missing.
    """
    if totalsegmentator_available():
        return True
    if testing_mode():
        return False
    if not torch_available():
        raise DependencyError(
            "TotalSegmentator needs PyTorch: click Install dependencies (or install the PyTorch extension) first."
        )
    import slicer

    from .warm import python_executable

    if ask and not _confirm(
        slicer,
        "Install the TotalSegmentator Python package into Slicer now? What is installed already "
        "(Slicer's packages, PyTorch, nnU-Net) is kept; its weights are downloaded later by "
        "TotalSegmentator's own module.",
        "FVLM: install TotalSegmentator",
    ):
        return False
    has_extension = hasattr(getattr(slicer, "modules", None), "totalsegmentator")
    extension = _extension_logic("TotalSegmentator", "TotalSegmentatorLogic") if has_extension else None
    if extension is not None:  # the TotalSegmentator extension installs it its way
        try:
            extension().setupPythonRequirements()
        except Exception as exc:
            raise DependencyError(
                f"the TotalSegmentator extension could not install its package ({exc})."
            ) from exc
    else:
        nnunet = _extension_logic("SlicerNNUNetLib", "InstallLogic")
        install_totalsegmentator_into(
            python_executable(),
            _slicer_pip(slicer),
            nnunet=(lambda: nnunet(doAskConfirmation=False).setupPythonRequirements("nnunetv2>=2.3.1"))
            if nnunet is not None
            else None,
        )
    import importlib

    importlib.invalidate_caches()
    if not totalsegmentator_available():
        raise DependencyError(
            "after installing, TotalSegmentator is still not importable. See the Python console for pip's "
            "output; restart Slicer and try again."
        )
    return True
