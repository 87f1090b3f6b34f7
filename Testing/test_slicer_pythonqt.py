"""The PythonQt-like layer the widget tests run on reproduces the PythonQt rules that break code.

``FVLMSlicer/Testing/pythonqt.py`` wraps PySide6 objects with PythonQt's attribute lookup
(PythonQtInstanceWrapper_getattro / PythonQtClassInfo::member: a Qt property before any method
of the same name). The first test runs the results-row code that failed in Slicer (issue 18)
on it and shows the layer fails it the same way, and that the replacement works.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtWidgets", reason="needs PySide6 (pip install PySide6-Essentials)")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FVLMSlicer" / "Testing"))

import pythonqt  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402


@pytest.fixture(scope="module")
def qt():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    return pythonqt.qt_module()


@pytest.fixture
def table(qt):
    table = qt.QTableWidget()
    table.setColumnCount(2)
    for row, (anatomy, finding) in enumerate([("lung", "Emphysema"), ("heart", "Cardiomegaly")]):
        table.insertRow(row)
        table.setItem(row, 0, qt.QTableWidgetItem(anatomy))
        table.setItem(row, 1, qt.QTableWidgetItem(finding))
    table.selectionBehavior = qt.QAbstractItemView.SelectRows
    table.selectRow(1)
    return table


def test_the_old_row_click_fails_as_in_slicer_and_the_new_one_works(table):
    """The code FVLMSlicer.py had: ``view.selectionModel().selectedIndexes()``."""
    model = table.selectionModel()
    assert isinstance(model.selectedIndexes, list)  # QItemSelectionModel's Q_PROPERTY, not the method
    with pytest.raises(TypeError, match="not callable"):
        model.selectedIndexes()
    assert [item.text() for item in table.selectedItems()] == ["heart", "Cardiomegaly"]
    assert [i.row() for i in model.selectedRows()] == [1]  # selectedRows is a method: no clash


def test_properties_are_values_and_methods_of_the_same_name_are_hidden(qt, table):
    combo = qt.QComboBox()
    combo.addItem("lung")
    combo.addItem("heart")
    assert table.rowCount == 2 and combo.count == 2 and combo.currentText == "lung"
    with pytest.raises(TypeError):
        combo.currentText()
    combo.currentText = "heart"  # writable property
    assert combo.currentIndex == 1
    assert combo.itemText(0) == "lung"  # a method without a property of its name stays a method
    label = qt.QLabel("x")
    label.objectName = "status"
    assert label.name == "status"  # PYTHONQT_SUPPORT_NAME_PROPERTY (childWidgetVariables uses it)
    timer = qt.QTimer()
    assert timer.interval == 0 and callable(timer.singleShot)  # PythonQt skips QTimer's singleShot property


def test_assignments_follow_pythonqt(qt):
    line = qt.QLineEdit()
    with pytest.raises(AttributeError, match="not writable"):
        line.acceptableInput = False  # a read-only property
    with pytest.raises(AttributeError, match="can not be overwritten"):
        line.clear = None  # a slot
    with pytest.raises(AttributeError, match="creating new attributes on C\\+\\+ objects is not allowed"):
        line.myFlag = True
    line.setProperty("SlicerParameterName", "modelDir")  # dynamic properties read as attributes
    assert line.SlicerParameterName == "modelDir"


def test_string_connections_check_the_signature_and_pass_wrapped_arguments(qt, table):
    seen = []
    table.connect("itemChanged(QTableWidgetItem*)", lambda item: seen.append(item.text()))
    table.item(0, 0).setText("lungs")
    assert seen == ["lungs"]
    assert not isinstance(seen[0], pythonqt.Wrapper)
    with pytest.raises(pythonqt.PythonQtError, match="does not exist"):
        table.connect("selectionChanged()", lambda: None)  # the old code's signal: QTableWidget has none
    button = qt.QPushButton()
    clicks = []
    button.connect("clicked(bool)", lambda: clicks.append(1))  # fewer arguments than the signal: fine
    button.click()
    assert clicks == [1]


def test_static_functions_return_what_pythonqt_returns(qt, monkeypatch):
    monkeypatch.setattr(
        QtWidgets.QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: ("/data/ckpt.pth", "*.pth"))
    )
    assert qt.QFileDialog.getOpenFileName(None, "t", "", "*.pth") == "/data/ckpt.pth"  # PySide6: a tuple
    assert isinstance(qt.QTimer(), pythonqt.Wrapper) and qt.Qt.UserRole == QtCore.Qt.UserRole
