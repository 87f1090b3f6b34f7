"""Qt-free logic of the FVLM 3D Slicer module.

Submodules (import what you need; those that touch MRML import ``slicer``/``vtk``, the rest
need only fvlm_core):

* ``terminology`` - Slicer terminology strings; mapping segments to model anatomies (pure Python)
* ``settings`` - remembered demo model, model info from ``config.yaml`` (pure Python)
* ``panel`` - the panel's words: choices with labels, percentages, status lines (pure Python)
* ``process`` - console processes launched as Slicer does, read without a thread, stopped with their tree
* ``warm`` - the warm worker seen from Slicer: started, handed jobs, restarted, stopped
* ``totalseg`` - TotalSegmentator segmentations recognised and reused; its install state in words
* ``dependencies`` - installing requirements into Slicer's Python without replacing anything
* ``tasks`` - what the worker runs besides analyses: similar cases (an embedding store), DICOM export
* ``job`` - an analysis, a task (and a weights import) driven in short steps on the GUI thread
* ``mrml_io`` - volume / segmentation nodes <-> fvlm_core arrays with correct geometry
* ``overlay`` - similarity maps as overlays (inside the anatomy, above the threshold, fixed scale)
* ``results`` - an analysis result -> segment colours and tags, table node, similarity volumes; and back
* ``dicomdb`` - Slicer's DICOM database: the analysed series' files, exported objects put into it
* ``logic`` - ``AnalysisLogic``: MRML nodes in, MRML nodes out (analysis, similar cases, DICOM export)
* ``worker`` - the analysis worker process (``fvlm_core.zeroshot.pipeline.run`` on job folders)
* ``headless`` - a MRML scene outside Slicer (slicer-core)

The analysis itself is ``fvlm_core.zeroshot.pipeline`` (request, ``run``) and
``fvlm_core.zeroshot.results`` (the result): the same as ``fvlm analyze``'s.
"""

#: Submodules in import-dependency order: a module comes after every submodule it imports,
#: so reloading them in this order (the panel's Reload) leaves no stale reference.
LIB_MODULES = (
    "terminology",
    "settings",
    "panel",
    "process",
    "warm",
    "totalseg",
    "dependencies",
    "tasks",
    "job",
    "mrml_io",
    "overlay",
    "results",
    "dicomdb",
    "logic",
    "worker",
    "headless",
)
