"""The process that runs TotalSegmentator for the backend: ``python -m fvlm_core.segmentation.totalseg_run REQUEST``.

Why a process of its own: TotalSegmentator and nnU-Net change process-wide state (torch's thread
count, ``nnUNet_*`` environment variables, worker processes) and a running prediction cannot be
interrupted; a process can be killed when the user cancels and leaves the caller untouched.

``REQUEST`` is a JSON file with ``input``, ``output``, ``report``, ``result`` (paths), ``fast``,
``device`` (TotalSegmentator's word), ``roi_subset`` (class names or null) and ``offline``.
TotalSegmentator's own messages go to stdout, with ``[fvlm] ...`` lines marking this module's steps;
``result`` receives ``{"network_blocked": [...], "error": "..."}``.

Offline (``offline: true``): every internet connection attempt in this process (TotalSegmentator's
usage statistics, a weights download, a licence check) fails at once and is listed in the result.
The process ends itself, its workers and the request's folder when its parent closes its stdin
(the parent was cancelled, or ended without cleaning up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn

#: Hosts an offline run may still resolve and connect to (multiprocessing on some platforms).
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "", None}


def block_network(blocked: list[str]) -> None:
    """Make every non-loopback internet connection in this process fail and record it in ``blocked``."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str) -> NoReturn:
        blocked.append(what)
        print(f"[fvlm] blocked network access to {what} (offline run)", flush=True)
        raise OSError(f"network access to {what} blocked: fvlm runs TotalSegmentator offline")

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in _LOOPBACK:
            refuse(f"{host}:{port}")
        return real_getaddrinfo(host, port, *args, **kwargs)

    def outside(sock: socket.socket, address: Any) -> bool:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        return inet and not (isinstance(address, tuple) and address[0] in _LOOPBACK)

    def connect(self: socket.socket, address: Any) -> None:
        if outside(self, address):
            refuse(f"{address[0]}:{address[1]}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if outside(self, address):
            refuse(f"{address[0]}:{address[1]}")
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


def exit_with_parent(run_folder: Path) -> None:
    """When the parent closes our stdin or dies: delete ``run_folder`` (it holds a copy of the CT)
    and end this process with every worker TotalSegmentator started.

    The pipe is watched on a duplicate descriptor with ``os.read`` and stdin becomes the null
    device: a thread blocked in ``sys.stdin.read()`` would hold its lock, and the ``fork`` workers
    nnU-Net starts close ``sys.stdin`` first thing, so they would wait on that lock forever.
    """
    watched = os.dup(sys.stdin.fileno())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, sys.stdin.fileno())
    os.close(null)

    def watch() -> None:
        while os.read(watched, 4096):  # b"" at end of file only
            pass
        abandon(run_folder)

    threading.Thread(target=watch, name="fvlm-parent-watch", daemon=True).start()


def abandon(run_folder: Path) -> NoReturn:
    """The parent is gone: delete the run's folder, end this process and its workers."""
    shutil.rmtree(run_folder, ignore_errors=True)
    if os.name == "posix" and os.getpgid(0) == os.getpid():  # our own group: us and our workers
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(3)


def run(request: dict[str, Any], blocked: list[str]) -> None:
    """Call TotalSegmentator's Python API as the request says (multilabel output, its run report)."""
    print("[fvlm] importing TotalSegmentator", flush=True)
    from totalsegmentator.python_api import totalsegmentator

    print("[fvlm] running TotalSegmentator", flush=True)
    totalsegmentator(
        request["input"],
        request["output"],
        ml=True,
        task="total",
        fast=bool(request["fast"]),
        device=request["device"],
        roi_subset=request["roi_subset"],
        quiet=False,  # its stage messages are our progress and stage times
        nr_thr_saving=1,  # one multilabel file: a pool of savers only costs process starts
        report=request["report"],
    )
    print("[fvlm] TotalSegmentator finished", flush=True)


def main(argv: list[str]) -> int:
    """Run one request; exit code 0 done, 1 failed (the reason is in the result file)."""
    request = json.loads(Path(argv[0]).read_text())
    exit_with_parent(Path(argv[0]).parent)
    blocked: list[str] = []
    if request.get("offline", True):
        block_network(blocked)
    result: dict[str, Any] = {"network_blocked": blocked}
    code = 0
    try:
        run(request, blocked)
    except BrokenPipeError:  # our output's reader, the parent, is gone
        abandon(Path(argv[0]).parent)
    except (Exception, SystemExit) as exc:  # TotalSegmentator calls sys.exit() on some errors
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
        with contextlib.suppress(OSError):
            traceback.print_exc()
    Path(request["result"]).write_text(json.dumps(result))
    return code


if __name__ == "__main__":  # guarded: nnU-Net's spawned workers import this module again
    sys.exit(main(sys.argv[1:]))
