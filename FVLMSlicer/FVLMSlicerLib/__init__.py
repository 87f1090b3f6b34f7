"""Qt-free logic of the FVLM 3D Slicer module.

Submodules (import what you need; those that touch MRML import ``slicer``/``vtk``, the rest
need only fvlm_core):

* ``terminology`` - Slicer terminology strings; mapping segments to model anatomies (pure Python)
* ``summary`` - serialisable analysis summary (pure Python)
* ``settings`` - remembered demo model, model info from ``config.yaml`` (pure Python)
* ``runner`` - ``run_analysis`` and background jobs (thread / subprocess) with progress and cancel
* ``worker`` - the subprocess entry point
* ``dependencies`` - installing requirements into Slicer's Python safely
* ``mrml_io`` - volume / segmentation nodes <-> fvlm_core arrays with correct geometry
* ``results`` - analysis summary -> segment colours and tags, table node, similarity volumes
* ``logic`` - ``AnalysisLogic``: MRML nodes in, MRML nodes out
* ``headless`` - a MRML scene outside Slicer (slicer-core)
"""
