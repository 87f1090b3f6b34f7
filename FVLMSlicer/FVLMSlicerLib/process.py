"""A background process the GUI can poll and stop: launched as Slicer launches console processes.

Inside Slicer the command is started by ``slicer.util.launchConsoleProcess`` (the environment
Slicer itself was started with, so no Slicer library paths leak in; on Windows no console
window); outside Slicer by the same ``Popen`` call on this process's environment. Output
(stdout + stderr) is read by a daemon thread into a bounded buffer, so the pipe never fills and
the panel can show a processing log.

Stopping kills the whole process tree: Slicer's ``PythonSlicer`` is a launcher that starts
``python-real``, so killing the launcher alone leaves the computation running (the rule
SlicerMONAIAuto3DSeg's ``BackgroundProcess._killProcess`` handles with psutil). psutil is used
when importable (it is in ``Resources/requirements.txt``); without it, Linux children are found
through ``/proc``. No Qt here.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


def _slicer_launch(args: list[str], env_update: dict[str, str], cwd: str | None) -> subprocess.Popen | None:
    """``slicer.util.launchConsoleProcess`` when running inside the Slicer application, else None."""
    try:
        import slicer

        if getattr(slicer, "app", None) is None:
            return None
        return slicer.util.launchConsoleProcess(
            args, useStartupEnvironment=True, updateEnvironment=env_update, cwd=cwd
        )
    except ImportError:
        return None


def launch_console_process(
    args: Sequence[str], env_update: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.Popen:
    """Start ``args`` with output piped as text, the way ``slicer.util.launchConsoleProcess`` does."""
    args = [str(a) for a in args]
    update = {str(k): str(v) for k, v in (env_update or {}).items()}
    cwd = None if cwd is None else str(cwd)
    proc = _slicer_launch(args, update, cwd)
    if proc is not None:
        return proc
    env = {**os.environ, **update}
    kwargs: dict = {}
    if os.name == "nt":  # no console window (what launchConsoleProcess does on Windows)
        info = subprocess.STARTUPINFO()
        info.dwFlags = 1
        info.wShowWindow = 0
        kwargs["startupinfo"] = info
    return subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        universal_newlines=True,
        cwd=cwd,
        **kwargs,
    )


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` from Linux ``/proc/<pid>/stat``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])  # fields 3 and 4, after the "(comm)" field


def _tree_proc(pid: int) -> list[int]:
    """``pid`` and its descendants from ``/proc`` (the fallback when psutil is absent)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    states: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            states[int(entry.name)] = stat[0]
            parents[stat[1]].append(int(entry.name))
    out, todo = [pid], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if states.get(p, "Z") != "Z"]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are running (zombies, already ended, are left out)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        running = []
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p.pid)
        return running
    if Path("/proc").is_dir():
        return _tree_proc(pid)
    return [pid]


def kill_process_tree(pid: int) -> list[int]:
    """Kill ``pid`` and every descendant (children before the parent, so none is re-parented alive).

    Returns:
        The process ids a kill was sent to.
    """
    tree = process_tree(pid)
    try:
        import psutil
    except ImportError:
        psutil = None
    for target in reversed(tree):  # descendants first
        if psutil is not None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                psutil.Process(target).kill()
        else:
            import signal

            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, getattr(signal, "SIGKILL", signal.SIGTERM))
    return tree


class BackgroundProcess:
    """One console process: start, read its output in a thread, poll, stop (with its children)."""

    def __init__(
        self, args: Sequence[str], env_update: Mapping[str, str] | None = None, cwd=None, max_lines=2000
    ):
        self.args = [str(a) for a in args]
        self.env_update = dict(env_update or {})
        self.cwd = cwd
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._count = 0  # lines read so far, including those the buffer dropped
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.killed: list[int] = []

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> BackgroundProcess:
        self._proc = launch_console_process(self.args, self.env_update, self.cwd)
        self._reader = threading.Thread(target=self._read, name="fvlm-process-output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        stream = self._proc.stdout
        while True:
            try:
                line = stream.readline()
            except (UnicodeDecodeError, ValueError):  # an undecodable line, or the pipe closed under us
                continue
            if not line:
                break
            with self._lock:
                self._lines.append(line.rstrip("\r\n"))
                self._count += 1

    def log(self) -> list[str]:
        """The output lines so far (the last ``max_lines``)."""
        with self._lock:
            return list(self._lines)

    def line_count(self) -> int:
        """How many lines the process has written so far (a mark for :meth:`log_since`)."""
        with self._lock:
            return self._count

    def log_since(self, mark: int) -> list[str]:
        """The lines written after :meth:`line_count` returned ``mark`` (those still buffered)."""
        with self._lock:
            kept = len(self._lines)
            return list(self._lines)[max(0, kept - (self._count - mark)) :]

    def returncode(self) -> int | None:
        """None while running; the exit code once it has ended."""
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        if self._proc.poll() is not None and self._reader is not None:
            self._reader.join(5)
        return self._proc.poll()

    def stop(self) -> None:
        """Kill the process and all its descendants (a no-op when it has ended)."""
        if self._proc is not None and self._proc.poll() is None:
            self.killed = kill_process_tree(self._proc.pid)
            self.wait(10)
