"""The README's Slicer picture: the module's panel and slice views after a real analysis, offscreen.

    fvlm demo --out fvlm-demo                      # trains a small model, writes its test phantom
    fvlm synth --out cohort --n 40 --valid-fraction 1 && fvlm embed cohort --model fvlm-demo/model --out cohort.store
    python FVLMSlicer/Testing/render_result.py --demo fvlm-demo --store cohort.store --out docs/images/slicer_result.png

What runs is the module itself, outside the Slicer application:

* the panel is ``FVLMSlicer.py``'s widget built from the real ``.ui`` on the PythonQt-like layer
  (``slicer_app.py``, ``pythonqt.py``); the inputs are chosen in its widgets, **Analyze** starts
  the analysis in a worker process, the panel polls it and fills its results table, and a click
  on the strongest flagged row centres the views and shows that finding's similarity map;
  with ``--store``, **Find similar cases** searches that embedding store (in the worker) and
  lists the matches per anatomy;
* the slice views are rendered from the resulting MRML nodes by Slicer's slice logic and
  displayable managers (``render_views.py``): CT, segments in their result colours, the overlay
  with its colour table, threshold and legend.

Input: the demo's model and its example phantom CT with the phantom's anatomy label map, loaded
as an existing segmentation (what the Segment Editor or TotalSegmentator would give).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT / "FVLMSlicer", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def load_module(path: Path = ROOT / "FVLMSlicer" / "FVLMSlicer.py"):
    """Import FVLMSlicer.py as Slicer does (after ``slicer_app.install``)."""
    spec = importlib.util.spec_from_file_location("FVLMSlicer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["FVLMSlicer"] = module
    spec.loader.exec_module(module)
    return module


def load_inputs(scene, ct_path: Path, anatomy_path: Path):
    """The CT through Slicer's volume reader and the anatomy label map as a segmentation node."""
    import slicer
    from FVLMSlicerLib import mrml_io

    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.io import read_label_map

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", ct_path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(ct_path))
    if not storage.ReadData(volume):
        raise OSError(f"Slicer could not read {ct_path}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    display = volume.GetDisplayNode() or (volume.CreateDefaultDisplayNodes() or volume.GetDisplayNode())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(1500, -400)  # a lung/mediastinum window
    labels = read_label_map(anatomy_path, reference=mrml_io.volume_node_to_ct(volume).geometry)
    seg = mrml_io.labelmap_to_segmentation_node(
        labels.array.astype(np.uint8), labels.geometry, CTRATE_CATALOG, scene, "anatomies (input)"
    )
    seg.GetDisplayNode().SetVisibility(False)  # the result segmentation is what is shown
    return volume, seg


def choose_inputs(widget, volume, segmentation, model_dir: str) -> None:
    """Choose the CT, the segmentation, the model and the CPU in the panel's widgets."""
    ui = widget.ui
    ui.modelPathLineEdit.currentPath = str(model_dir)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.anatomySourceComboBox.currentIndex = 2  # "Existing segmentation"
    ui.inputSegmentationSelector.setCurrentNode(segmentation)
    ui.deviceComboBox.currentIndex = 2  # "CPU"


def run_panel(widget, volume, segmentation, model_dir: str, timeout_s: float = 600.0) -> None:
    """Choose the inputs in the panel's widgets, click Analyze, let its timers run until done."""
    from slicer_app import EventLoop

    choose_inputs(widget, volume, segmentation, model_dir)
    widget.ui.analyzeButton.click()
    EventLoop(holds_gil=True).run_until(lambda: widget._job is None, timeout_s)  # as in Slicer
    if widget._results is None:
        raise RuntimeError(f"no results: {widget.ui.statusLabel.text}")


def click_flagged_row(widget, prefer: str | None = None) -> tuple[str, str] | None:
    """Select a flagged row of the results table (``prefer``: a finding name), as a user would."""
    table = widget.ui.resultsTable
    flagged = [row for row in range(table.rowCount) if table.item(row, 2).text() == "Yes"]
    named = [row for row in flagged if table.item(row, 1).text() == prefer]
    if not (named or flagged):
        return None
    table.selectRow((named or flagged)[0])
    return widget._selectedResult()


def find_similar(widget, store: str, timeout_s: float = 120.0) -> None:
    """Choose the embedding store in the panel, click **Find similar cases**, wait for the matches."""
    from slicer_app import EventLoop

    widget.ui.storePathLineEdit.currentPath = str(store)
    widget.ui.findSimilarButton.click()
    EventLoop(holds_gil=True).run_until(lambda: widget._taskJob is None, timeout_s)
    if not widget._matches:
        raise RuntimeError(
            f"no similar cases: {widget.ui.statusLabel.text} {widget.ui.similarNoteLabel.text}"
        )


def grab_panel(widget, width: int = 440) -> np.ndarray:
    """``(H, W, 3)`` screenshot of the module panel."""
    import pythonqt
    from PySide6 import QtGui, QtWidgets

    panel = pythonqt.unwrap(widget.parent)
    panel.resize(width, panel.sizeHint().height())
    QtWidgets.QApplication.processEvents()
    image = panel.grab().toImage().convertToFormat(QtGui.QImage.Format_RGB888)
    rows = np.frombuffer(image.constBits(), dtype=np.uint8, count=image.sizeInBytes())
    rows = rows.reshape(image.height(), image.bytesPerLine())
    return rows[:, : image.width() * 3].reshape(image.height(), image.width(), 3).copy()


def compose(views: list[np.ndarray], panel: np.ndarray, gap: int = 6) -> np.ndarray:
    """Views stacked on the left, the panel on the right, on a dark background."""
    left = np.concatenate([np.pad(v, ((0, gap), (0, 0), (0, 0))) for v in views], axis=0)[:-gap]
    height = max(left.shape[0], panel.shape[0])
    pad = lambda a: np.pad(a, ((0, height - a.shape[0]), (0, 0), (0, 0)), constant_values=40)  # noqa: E731
    return np.concatenate([pad(left), np.full((height, gap, 3), 40, np.uint8), pad(panel)], axis=1)


def render(
    demo: Path,
    out: Path,
    model: Path | None = None,
    finding: str | None = "Emphysema",
    store: Path | None = None,
) -> Path:
    """Run the panel on the demo phantom with the demo model (and ``store``'s similar cases)
    and write the picture."""
    import slicer_app
    from FVLMSlicerLib.headless import new_scene
    from render_views import save_png

    scene = new_scene()
    app = slicer_app.install(scene, tempfile.mkdtemp(prefix="fvlm-picture-settings-"), view_size=(420, 420))
    module = load_module()
    widget = module.FVLMSlicerWidget()
    widget.setup()
    widget.parent.show()
    volume, seg = load_inputs(scene, demo / "example_ct.nii.gz", demo / "example_anatomy.nii.gz")
    run_panel(widget, volume, seg, str(model or demo / "model"))
    if store is not None:
        find_similar(widget, str(store))
    key = click_flagged_row(widget, finding)
    views = []
    for name in ("Red", "Green"):
        view = app.views[name]
        offset = view.logic.GetSliceOffset()  # where the row click put the slice
        view.fit()  # the whole CT in the view, at that slice
        view.set_offset(offset)
        views.append(view.render())
    picture = compose(views, grab_panel(widget))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(picture, out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB); shown: {key}; {widget.ui.statusLabel.text}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", required=True, help="output folder of `fvlm demo` (model/ + example_ct.nii.gz)"
    )
    parser.add_argument("--model", default=None, help="another model folder (default: DEMO/model)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "slicer_result.png"))
    parser.add_argument("--finding", default="Emphysema", help="flagged finding whose row is clicked")
    parser.add_argument("--store", default=None, help="an embedding store of the model: its similar cases")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    model = Path(args.model) if args.model else None
    render(Path(args.demo), Path(args.out), model, args.finding, Path(args.store) if args.store else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
