"""The interpreter exits cleanly after the Slicer test infrastructure ran (CI once ended in exit
status 139, a segmentation fault after every test had passed).

Cause: ``vtkMRMLDisplayableManagerFactory.InstantiateDisplayableManagers`` returns a ``New()``
object that VTK's Python wrapping does not own, so a slice view's displayable managers leaked,
kept observing their scene, and held only a raw pointer to an application logic that was gone;
at exit VTK's wrapping released the scene's colour logic (kept by ``headless.new_scene``), whose
destructor removes the default colour nodes, and the colour legend manager's callback read the
freed application logic. Run in a fresh interpreter because the crash happens in its finalisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import gc, sys
    sys.path[:0] = [{testing!r}, {module!r}]
    from FVLMSlicerLib.headless import new_scene
    from render_views import SliceView, application_logic

    for _ in range(2):  # as two test modules do: a scene, its application logic and a view each
        scene = new_scene()
        view = SliceView(scene, application_logic(scene), "Red", (32, 32))
        view.render()
        del scene, view
        gc.collect()
    print("views rendered", flush=True)
    """
)


def test_slice_views_of_several_scenes_leave_a_clean_exit():
    code = SCRIPT.format(testing=str(ROOT / "FVLMSlicer" / "Testing"), module=str(ROOT / "FVLMSlicer"))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert "views rendered" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
