"""The module's panel and build files, checked without Slicer.

* The .ui loads offscreen through the PythonQt-like layer (``FVLMSlicer/Testing/pythonqt.py``:
  Slicer's custom widgets replaced by stand-ins declaring the real classes' properties), every
  ``self.ui.<name>`` FVLMSlicer.py uses is a widget of it, and every SlicerParameterName binding
  names a field of the module's parameter node.
* FVLMSlicer.py needs nothing Python 3.9 lacks (so an old Slicer can load it to say it is too old), and
  no Qt call in it calls a name that PythonQt resolves to a property.
* FVLMSlicer/CMakeLists.txt lists exactly the module's scripts and resources.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FVLMSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "FVLMSlicer.ui"
MODULE_PY = MODULE / "FVLMSlicer.py"
sys.path.insert(0, str(MODULE / "Testing"))
sys.path.insert(0, str(MODULE))


def _ui_xml() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text())


def _ui_names_used_by_module() -> set[str]:
    names = set()
    for node in ast.walk(_module_tree()):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def _parameter_fields() -> dict[str, ast.expr]:
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {
                stmt.target.id: stmt.annotation
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("FVLMSlicer.py defines no @parameterNodeWrapper class")


def _bindings() -> dict[str, str]:
    """widget name -> SlicerParameterName"""
    out = {}
    for widget in _ui_xml().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[widget.get("name")] = prop.findtext("string")
    return out


@pytest.fixture(scope="module")
def loaded_ui():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip(
        "PySide6.QtWidgets", reason="needs PySide6 (pip install PySide6-Essentials)"
    )
    import pythonqt
    from PySide6.QtCore import QFile, QIODevice, QObject

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    declared = {c.findtext("class") for c in _ui_xml().iter("customwidget")}
    assert declared <= set(pythonqt.STAND_INS), "every custom widget class needs a stand-in"
    qfile = QFile(str(UI_FILE))
    assert qfile.open(QIODevice.ReadOnly)
    widget = pythonqt.unwrap(pythonqt.UiLoader().load(qfile))
    assert widget is not None
    yield widget, {w.objectName(): w for w in widget.findChildren(QObject)}
    widget.deleteLater()
    app.processEvents()


def test_ui_loads_and_has_every_widget_the_module_uses(loaded_ui):
    _widget, children = loaded_ui
    used = _ui_names_used_by_module()
    assert {"analyzeButton", "cancelButton", "progressBar", "statusLabel", "findingsTable"} <= used
    missing = used - set(children)
    assert not missing, f"FVLMSlicer.py uses widgets the .ui does not define: {sorted(missing)}"
    assert children["findingsTable"].columnCount() == 2
    assert children["resultsTable"].columnCount() == 7 and children["resultsTable"].isSortingEnabled()
    assert type(children["inputVolumeSelector"]).__name__ == "qMRMLNodeComboBox"
    assert children["logCollapsibleButton"].property("collapsed") is True  # the log starts folded


def test_ui_connections_name_real_widgets():
    names = {w.get("name") for w in _ui_xml().iter("widget")}
    for c in _ui_xml().iter("connection"):
        assert c.findtext("sender") in names and c.findtext("receiver") in names


def test_every_binding_names_a_parameter_and_enums_are_bound_to_combo_boxes(loaded_ui):
    _, children = loaded_ui
    fields = _parameter_fields()
    bindings = _bindings()
    assert len(set(bindings.values())) == len(bindings), "each parameter is bound to one widget at most"
    # kept by hand: the findings table, and the model folder (a pathlib.Path binding shows "." unset)
    assert set(fields) - set(bindings.values()) == {"findings", "modelDir"}
    for widget_name, parameter in bindings.items():
        if ast.unparse(fields[parameter]) in ("AnatomySource", "Device"):  # items are the enum labels
            assert type(children[widget_name]).__name__ == "QComboBox"
            assert children[widget_name].count() == 0, "items come from the enum, not the .ui"


def test_anatomy_sources_and_devices_are_names_the_library_accepts():
    from FVLMSlicerLib.panel import AnatomySource, Device

    from fvlm_core.devices import DEVICE_CHOICES
    from fvlm_core.segmentation.choice import SOURCES

    # an existing segmentation goes to the worker as its label-map layers' segments
    assert {s.value for s in AnatomySource} - {"segmentation"} | {"segments"} <= set(SOURCES)
    assert {d.value for d in Device} <= set(DEVICE_CHOICES)
    members = (*AnatomySource, *Device)
    labels = [m.label() for m in members]
    assert len(set(labels)) == len(labels) and not {m.value for m in members} & set(labels)


def _needs_newer_python_than_3_9(path: Path) -> str:
    """What in ``path`` Python 3.9 lacks, found by vermin (it knows each version's syntax and
    standard library, keyword arguments included); "" when nothing."""
    flags = ["-q", "-t=3.9-", "--violations", "--no-tips", "--feature", "union-types"]
    run = "import sys, vermin; sys.exit(vermin.main())"  # what the `vermin` command runs
    proc = subprocess.run([sys.executable, "-c", run, *flags, str(path)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def test_module_file_runs_on_python_3_9(tmp_path):
    """Slicer <= 5.8 runs Python 3.9: the module must load there to say that it needs 5.10.
    ``ast.parse(feature_version=(3, 9))`` checks only the grammar: it passes
    ``dataclass(slots=True)``, ``zip(strict=True)`` or ``int | None`` outside annotations, which
    fail at import on 3.9. No Python 3.9 is installed here, so vermin reads the file for them."""
    newer = tmp_path / "newer.py"
    newer.write_text("import dataclasses\n\n\n@dataclasses.dataclass(slots=True)\nclass A:\n    x: int = 0\n")
    assert "3.10" in _needs_newer_python_than_3_9(newer)  # the checker sees what 3.9 lacks
    assert not _needs_newer_python_than_3_9(MODULE_PY)
    ast.parse(MODULE_PY.read_text(), feature_version=(3, 9))


def _qt_property_names() -> dict[str, set[str]]:
    """Qt property names of the Qt classes the panel's widgets are (and return)."""
    from PySide6 import QtCore, QtWidgets

    classes = (
        QtWidgets.QTableWidget, QtWidgets.QComboBox, QtWidgets.QLineEdit, QtWidgets.QLabel,
        QtWidgets.QPushButton, QtWidgets.QProgressBar, QtWidgets.QPlainTextEdit, QtWidgets.QCheckBox,
        QtWidgets.QHeaderView, QtWidgets.QFrame, QtCore.QItemSelectionModel, QtCore.QTimer,
        QtWidgets.QSpinBox,
    )  # fmt: skip
    out: dict[str, set[str]] = {}
    for cls in classes:
        mo = cls.staticMetaObject
        for i in range(mo.propertyCount()):
            out.setdefault(mo.property(i).name(), set()).add(cls.__name__)
    return out


#: Calls whose name is a Qt property somewhere, made on objects that have no such property.
NOT_PROPERTY_CALLS = {
    "text": "QTableWidgetItem.text(): a QTableWidgetItem is not a QObject (PythonQt: no properties)",
    "value": "QSettings.value(key, default): a QSettings has no 'value' property",
}


def test_no_qt_call_names_a_property():
    """PythonQt reads a property before a method of the same name (issue 18: the results row
    click called ``selectionModel().selectedIndexes()``, a list): no ``x.<property>(...)``."""
    properties = _qt_property_names()
    tree = ast.parse(MODULE_PY.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FVLMSlicerWidget")
    called = {
        node.func.attr
        for node in ast.walk(widget)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    clashes = {n: sorted(properties[n]) for n in called & set(properties) if n not in NOT_PROPERTY_CALLS}
    assert not clashes, f"called as methods but PythonQt returns these Qt properties: {clashes}"


def _cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, flags=re.S)
    assert block, f"{variable} not set"
    return [item.replace("${MODULE_NAME}", "FVLMSlicer") for item in block.group(1).split()]


def test_cmake_lists_every_module_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = {"FVLMSlicer.py"} | {
        str(p.relative_to(MODULE))
        for p in (MODULE / "FVLMSlicerLib").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    on_disk_resources = {
        str(p.relative_to(MODULE))
        for p in (MODULE / "Resources").rglob("*")
        if p.is_file() and p.name != ".gitignore"
    }
    assert set(scripts) == on_disk_scripts
    assert set(resources) == on_disk_resources
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text


#: The metadata names of Slicer's extension description (Slicer's
#: Extensions/CMake/SlicerExtensionDescriptionSpec.cmake: SCM, SCMURL and SCMREVISION are
#: required there, and come from the extensions index, not from CMakeLists.txt).
SLICER_EXTENSION_METADATA = {
    "SCM", "SCMURL", "SCMREVISION", "DEPENDS", "BUILD_SUBDIRECTORY", "HOMEPAGE", "CONTRIBUTORS",
    "CATEGORY", "ICONURL", "DESCRIPTION", "SCREENSHOTURLS", "ENABLED", "STATUS", "TIER",
}  # fmt: skip


def test_top_level_cmake_is_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needle in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(FVLMSlicer)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needle in text
    fields = dict(re.findall(r'set\(EXTENSION_(\w+)\s+"?(.*?)"?\)\n', text))
    # only metadata Slicer's extension description knows (a misspelt name is silently ignored)
    assert set(fields) <= SLICER_EXTENSION_METADATA, set(fields) - SLICER_EXTENSION_METADATA
    # what the Extensions Manager shows is there; the PyTorch extension provides torch
    assert all(fields.get(k) for k in ("CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "STATUS"))
    assert fields["DEPENDS"].split() == ["PyTorch"]
    # no invented web address: the project has none published, so none is given
    assert not re.search(r"https?://", text), "a web address in CMakeLists.txt: give only a real one"


def test_module_help_points_at_the_readme_section():
    """The help names a README section that exists (no made-up web address)."""
    tree = _module_tree()
    section = next(
        n.value.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "README_SECTION"
    )
    assert f"\n## {section}\n" in (ROOT / "README.md").read_text()
    assert "README_SECTION" in MODULE_PY.read_text().split("helpText", 1)[1][:1200]
    assert "github.com" not in MODULE_PY.read_text()
