"""The Slicer module's panel and build files, checked without Slicer.

* The .ui loads offscreen with PySide6 (Slicer's custom widgets replaced by their Qt bases),
  every ``self.ui.<name>`` FVLMSlicer.py uses is a widget of it, and every SlicerParameterName
  binding names a field of the module's parameter node.
* FVLMSlicer/CMakeLists.txt lists exactly the module's scripts and resources.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FVLMSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "FVLMSlicer.ui"
MODULE_PY = MODULE / "FVLMSlicer.py"

#: Slicer/CTK widget classes -> the Qt class each derives from (stand-ins for loading offscreen).
STAND_INS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkPathLineEdit": "QLineEdit",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLTableView": "QTableView",
}


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
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QObject
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    text = UI_FILE.read_text()
    declared = {c.findtext("class") for c in _ui_xml().iter("customwidget")}
    assert declared == set(STAND_INS), (
        "every custom widget class needs a stand-in (and a <customwidget> entry)"
    )
    for cls, base in STAND_INS.items():
        text = text.replace(f'class="{cls}"', f'class="{base}"')
    # Slicer-only signal/slot connections (mrmlSceneChanged -> setMRMLScene) are checked by name below
    text = re.sub(r"<customwidgets>.*?</customwidgets>|<connections>.*?</connections>", "", text, flags=re.S)
    buffer = QBuffer()
    buffer.setData(QByteArray(text.encode()))
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
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
    assert type(children["inputVolumeSelector"]).__name__ == "QComboBox"  # stand-in for qMRMLNodeComboBox


def test_ui_connections_name_real_widgets():
    names = {w.get("name") for w in _ui_xml().iter("widget")}
    for c in _ui_xml().iter("connection"):
        assert c.findtext("sender") in names and c.findtext("receiver") in names


def test_every_binding_names_a_parameter_and_choices_match_the_combo_items(loaded_ui):
    _, children = loaded_ui
    fields = _parameter_fields()
    bindings = _bindings()
    assert set(bindings.values()) == set(fields), "each parameter is bound to exactly one widget"
    for widget_name, parameter in bindings.items():
        annotation = ast.unparse(fields[parameter])
        choices = re.search(r"Choice\((\[.*?\])\)", annotation)
        if choices:
            combo = children[widget_name]
            items = [combo.itemText(i) for i in range(combo.count())]
            assert items == ast.literal_eval(choices.group(1)), (
                f"{widget_name} items differ from {parameter}'s Choice"
            )


def test_anatomy_source_choices_match_the_runner():
    import sys

    sys.path.insert(0, str(MODULE))
    from FVLMSlicerLib.runner import ANATOMY_SOURCES

    fields = {k: ast.unparse(v) for k, v in _parameter_fields().items()}
    assert set(ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", fields["anatomySource"]).group(1))) == set(
        ANATOMY_SOURCES
    )


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
    for field in (
        "HOMEPAGE",
        "CATEGORY",
        "CONTRIBUTORS",
        "DESCRIPTION",
        "ICONURL",
        "SCREENSHOTURLS",
        "DEPENDS",
    ):
        assert re.search(rf"set\(EXTENSION_{field}\s", text), f"EXTENSION_{field} missing"
    # the screenshot and icon it advertises exist in the repository
    assert (ROOT / "docs" / "images" / "slicer_result.png").exists()
    assert (MODULE / "Resources" / "Icons" / "FVLMSlicer.png").exists()


def test_module_help_links_the_readme():
    tree = _module_tree()
    url = next(
        n.value.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "README_URL"
    )
    assert url.startswith("https://") and "README_URL" in MODULE_PY.read_text().split("helpText", 1)[1][:800]
