"""A console process the panel starts, reads and stops, with no Python thread in Slicer's process.

Slicer's GUI thread holds Python's GIL while Qt's event loop idles: PythonQt releases it only
with thread support (``PythonQt::setEnableThreadSupport``, compiled in with
``PYTHONQT_FULL_THREAD_SUPPORT``), which neither CTK nor Slicer enables. A Python thread in
Slicer's process therefore runs only while the GUI thread itself runs Python. So the output of
a process is read here without a reader thread: the pipe is made non-blocking and
:meth:`BackgroundProcess.read` takes what is there whenever the owner polls.

Inside Slicer the command is started by ``slicer.util.launchConsoleProcess`` (the environment
Slicer was started with; no console window on Windows); outside Slicer by the same ``Popen``
call. Stopping kills the whole process tree: Slicer's ``PythonSlicer`` is a launcher that starts
``python-real``, so killing the launcher alone leaves the computation running (the rule
SlicerMONAIAuto3DSeg's ``BackgroundProcess._killProcess`` handles with psutil; without psutil,
Linux children are found through ``/proc``). No Qt here.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def launch_console_process(
    args: Sequence[str], env_update: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.Popen:
    """Start ``args`` with stdout + stderr on one pipe, as ``slicer.util.launchConsoleProcess`` does."""
    args = [str(a) for a in args]
    update = {str(k): str(v) for k, v in (env_update or {}).items()}
    cwd = None if cwd is None else str(cwd)
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            return slicer.util.launchConsoleProcess(
                args, useStartupEnvironment=True, updateEnvironment=update, cwd=cwd
            )
    except ImportError:
        pass
    kwargs: dict = {}
    if os.name == "nt":  # no console window (what launchConsoleProcess does on Windows)
        info = subprocess.STARTUPINFO()
        info.dwFlags, info.wShowWindow = 1, 0
        kwargs["startupinfo"] = info
    env = {**os.environ, **update}
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, **kwargs
    )


def _readable_now(fd: int) -> int | None:
    """Bytes waiting in pipe ``fd`` (Windows: PeekNamedPipe); None where the pipe is non-blocking."""
    if os.name != "nt":
        return None
    import _winapi
    import msvcrt

    try:
        return _winapi.PeekNamedPipe(msvcrt.get_osfhandle(fd), 0)[0]
    except OSError:  # the writer closed the pipe: read() sees the end
        return 1


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` from Linux ``/proc/<pid>/stat``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


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
    if not Path("/proc").is_dir():
        return [pid]
    children: dict[int, list[int]] = collections.defaultdict(list)
    states: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            states[int(entry.name)] = stat[0]
            children[stat[1]].append(int(entry.name))
    out, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if states.get(p, "Z") != "Z"]


def kill_process_tree(pid: int) -> list[int]:
    """Kill ``pid`` and every descendant (children first, so none is re-parented alive); the pids."""
    tree = process_tree(pid)
    try:
        import psutil
    except ImportError:
        psutil = None
    for target in reversed(tree):
        if psutil is not None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                psutil.Process(target).kill()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, getattr(signal, "SIGKILL", signal.SIGTERM))
    return tree


class BackgroundProcess:
    """One console process: start, :meth:`read` its output when polled, stop it with its children."""

    def __init__(
        self,
        args: Sequence[str],
        env_update: Mapping[str, str] | None = None,
        cwd=None,
        max_lines: int = 2000,
    ) -> None:
        self.args = [str(a) for a in args]
        self.env_update = dict(env_update or {})
        self.cwd = cwd
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._proc: subprocess.Popen | None = None
        self._eof = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> BackgroundProcess:
        self._proc = launch_console_process(self.args, self.env_update, self.cwd)
        if os.name != "nt":
            os.set_blocking(self._proc.stdout.fileno(), False)
        return self

    def read(self) -> list[str]:
        """The complete lines written since the last call (never blocks)."""
        if self._proc is None or self._eof or self._proc.stdout.closed:
            return []
        fd, chunks = self._proc.stdout.fileno(), []
        while True:
            waiting = _readable_now(fd)
            if waiting == 0:
                break
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:  # a closed pipe on Windows
                data = b""
            if not data:
                self._eof = True
                break
            chunks.append(data)
        text = self._partial + self._decoder.decode(b"".join(chunks), final=self._eof)
        *lines, self._partial = text.split("\n")
        if self._eof and self._partial:
            lines, self._partial = [*lines, self._partial], ""
        lines = [line.rstrip("\r") for line in lines]
        self._lines.extend(lines)
        return lines

    def log(self) -> list[str]:
        """The output lines read so far (the last ``max_lines``)."""
        return list(self._lines)

    def returncode(self) -> int | None:
        """None while running; the exit code once it has ended."""
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the end (not for the GUI thread: tests, console, stopping), then read the rest."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        if self._proc.poll() is not None:
            self.read()
        return self._proc.poll()

    def stop(self) -> None:
        """Kill the process and all its descendants (a no-op when it has ended)."""
        if self._proc is not None and self._proc.poll() is None:
            kill_process_tree(self._proc.pid)
            self.wait(10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
