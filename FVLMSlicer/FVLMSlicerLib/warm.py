"""The warm analysis worker seen from Slicer's process: started on first use, started again when it
has ended (idle timeout, crash, kill), stopped with the module (``worker.py`` is its other side).

Nothing here waits: starting is a ``Popen``, handing over a job is one small file, the worker's
output is read when the panel polls (``process.py``). No Qt here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .process import BackgroundProcess, kill_process_tree

#: Minutes a worker waits for the next analysis before it ends and gives back its memory.
DEFAULT_IDLE_MINUTES = 10.0


def lib_paths() -> list[str]:
    """Folders the worker needs on its ``sys.path``: this package's parent and fvlm_core's."""
    import fvlm_core

    here = Path(__file__).resolve().parent.parent
    core = Path(fvlm_core.__file__).resolve().parent.parent
    return list(dict.fromkeys([str(here), str(core)]))


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` (on PATH inside Slicer, as ``slicer.util`` finds it), else this Python."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            exe = shutil.which("PythonSlicer")
            if exe:
                return exe
    except ImportError:
        pass
    return sys.executable


def python_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(lib_paths())}


class WarmWorker:
    """One serving worker process.

    Attributes:
        process: the launched process (``PythonSlicer`` launcher or Python itself), ``None`` before use.
        control: its control folder (``next.json``, ``stop``), removed when it ends.
        idle_minutes: how long it waits for the next analysis (``None``: for ever); read at start.
    """

    def __init__(
        self,
        python: str | None = None,
        env_update: dict[str, str] | None = None,
        idle_minutes: float | None = DEFAULT_IDLE_MINUTES,
    ) -> None:
        self.python = python or python_executable()
        self.env_update = dict(env_update or {})
        self.idle_minutes = idle_minutes
        self.process: BackgroundProcess | None = None
        self.control: Path | None = None
        self.busy = False  # a job is using it (one at a time)

    def running(self) -> bool:
        return self.process is not None and self.process.returncode() is None

    def _ended_note(self) -> str:
        """Why the last worker is gone, for the processing log."""
        rc = self.process.returncode()
        self.process.read()
        for line in reversed(self.process.log()):
            idle = re.match(r"idle for (\d+) s", line)
            if idle:
                return (
                    f"the analysis worker (process {self.process.pid}) had stopped after {idle.group(1)} s "
                    "without an analysis, giving its memory back: starting a new one"
                )
        return (
            f"the analysis worker (process {self.process.pid}) had ended (exit code {rc}): starting a new one"
        )

    def ensure_started(self) -> str:
        """Start the worker unless it runs; a line for the processing log saying which."""
        if self.running():
            return f"analysis worker (process {self.process.pid}) is warm: torch imported, last model kept"
        note = self._ended_note() if self.process is not None else ""
        self._discard()
        self.control = Path(tempfile.mkdtemp(prefix="fvlm-worker-"))
        args = [self.python, "-m", "FVLMSlicerLib.worker", str(self.control), "--owner", str(os.getpid())]
        if self.idle_minutes is not None:
            args += ["--idle-timeout", f"{60.0 * self.idle_minutes:g}"]
        self.process = BackgroundProcess(
            args, {**python_env(), **self.env_update}, cwd=str(self.control)
        ).start()
        return note or f"starting the analysis worker (process {self.process.pid})"

    def submit(self, job_dir: Path) -> None:
        """Hand a job folder over (raises OSError when the worker has just ended)."""
        from fvlm_core.atomic import atomic_write_text

        if not self.running() or self.control is None or not self.control.is_dir():
            raise OSError("the analysis worker is not running")
        atomic_write_text(self.control / "next.json", json.dumps({"job": str(job_dir)}))

    def kill(self) -> None:
        """Kill the worker's whole process tree now (a new one starts on next use)."""
        if self.running():
            kill_process_tree(self.process.pid)
            self.process.wait(10)
        self._discard(keep_process=True)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Ask the worker to exit (after its current job); kill its tree after ``timeout_s``."""
        if self.running():
            with contextlib.suppress(OSError):
                (self.control / "stop").write_text("1")
            if self.process.wait(timeout_s) is None:
                self.kill()
        self._discard()

    def _discard(self, keep_process: bool = False) -> None:
        if self.control is not None:
            shutil.rmtree(self.control, ignore_errors=True)
            self.control = None
        if not keep_process:
            if self.process is not None:
                self.process.stop()  # closes its pipe
            self.process = None


_SHARED: WarmWorker | None = None


def shared_worker(
    python: str | None = None,
    env_update: dict[str, str] | None = None,
    idle_minutes: float | None = DEFAULT_IDLE_MINUTES,
) -> WarmWorker:
    """The module's warm worker (a new one for another Python or environment); ``idle_minutes``
    applies from its next start."""
    global _SHARED
    python = python or python_executable()
    if _SHARED is not None and (_SHARED.python, _SHARED.env_update) != (python, dict(env_update or {})):
        _SHARED.stop()
        _SHARED = None
    if _SHARED is None:
        _SHARED = WarmWorker(python, env_update, idle_minutes)
    _SHARED.idle_minutes = idle_minutes
    return _SHARED


def stop_shared_worker(timeout_s: float = 3.0) -> None:
    """Stop the module's warm worker, if any (its process tree is gone afterwards)."""
    global _SHARED
    worker, _SHARED = _SHARED, None
    if worker is not None:
        worker.stop(timeout_s)


atexit.register(stop_shared_worker)
