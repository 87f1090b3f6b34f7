"""Qt-free logic of the FVLM 3D Slicer module.

Submodules (import what you need; those that touch MRML import ``slicer``/``vtk``, the rest
need only fvlm_core):

* ``terminology`` - Slicer terminology strings; mapping segments to model anatomies (pure Python)
* ``summary`` - serialisable analysis summary (pure Python)
* ``snapshot`` - views of the input taken on the GUI thread, converted in the background
* ``settings`` - remembered demo model, model info from ``config.yaml`` (pure Python)
* ``totalseg`` - TotalSegmentator segmentations recognised and reused; its install state in words
* ``process`` - console processes launched as Slicer does, stopped with their whole tree
* ``dependencies`` - installing requirements into Slicer's Python safely
* ``panel`` - the panel's words: choices with labels, percentages, status lines (pure Python)
* ``runner`` - ``run_analysis``: one analysis on arrays, with progress and cancel checks
* ``mrml_io`` - volume / segmentation nodes <-> fvlm_core arrays with correct geometry
* ``overlay`` - similarity maps as overlays (inside the anatomy, above the threshold, legend)
* ``results`` - analysis summary -> segment colours and tags, table node, similarity volumes
* ``jobs`` - background jobs the GUI polls (thread, subprocess, model import)
* ``warm`` - the warm worker process: torch imported, last model loaded, one job at a time
* ``logic`` - ``AnalysisLogic``: MRML nodes in, MRML nodes out
* ``worker`` - the subprocess entry point
* ``headless`` - a MRML scene outside Slicer (slicer-core)
"""

#: Submodules in import-dependency order: a module comes after every submodule it imports,
#: so reloading them in this order (the panel's Reload) leaves no stale reference.
LIB_MODULES = (
    "terminology",
    "summary",
    "snapshot",
    "settings",
    "totalseg",
    "process",
    "dependencies",
    "panel",
    "runner",
    "mrml_io",
    "overlay",
    "results",
    "jobs",
    "warm",
    "logic",
    "worker",
    "headless",
)
