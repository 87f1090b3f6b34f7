"""Runs :mod:`fvlm_core.segmentation.totalseg_run` in a child process: its messages become named
stages with their durations and progress reports, and cancelling kills it with its workers.

TotalSegmentator prints one line per step (``Generating rough segmentation for cropping...``,
``Resampling...``, ``Predicting...``, ``Saving segmentations...``) and nnU-Net a progress bar
over the sliding-window tiles; :class:`StageClock` reads those. A line it does not know goes to
the log only, so a reworded message costs a stage name, never the run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fvlm_core.errors import CancelledError
from fvlm_core.segmentation.base import Progress

#: (stage, start, end) of the overall progress each stage covers; "predict" advances by tiles.
STAGE_SPAN = {
    "start": (0.0, 0.10),
    "rough segmentation": (0.10, 0.30),
    "resample input": (0.30, 0.35),
    "predict": (0.35, 0.88),
    "resample output": (0.88, 0.93),
    "save": (0.93, 0.95),
}

_TILES = re.compile(r"(\d+)/(\d+) \[")  # nnU-Net's tqdm bar over the sliding-window tiles
_CROPPED = re.compile(r"^\s*(cropping from|INFO: Crop is empty)")

#: How often the caller hears from a long stage that prints nothing (seconds).
HEARTBEAT_S = 10.0
#: Share of the sliding-window tiles between two progress reports of the prediction.
TILE_STEP = 0.1


@dataclass
class StageClock:
    """Names the stage each TotalSegmentator message starts, times it and reports progress.

    Attributes:
        timings: seconds per stage, in the order they ran.
        log: every line seen (progress bars excepted).
    """

    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    stage: str = "start"
    _since: float = field(default_factory=time.monotonic)
    _told: float = field(default_factory=time.monotonic)
    _fraction: float = 0.0
    _tiles_told: float = 0.0
    _in_rough: bool = False
    _predicted: bool = False

    def begin(self) -> None:
        """Start the clock (the child process is starting)."""
        self._since = time.monotonic()
        self._report(0.0)

    def line(self, text: str) -> None:
        """One line (or progress-bar update) of the child's output."""
        tiles = _TILES.search(text)
        if tiles and self.stage == "predict":
            done, total = int(tiles.group(1)), max(int(tiles.group(2)), 1)
            within = min(done / total, 1.0)
            if within >= self._tiles_told + TILE_STEP or within == 1.0:  # not a line per tile
                self._tiles_told = within
                self._report(within)
            return
        if not text.strip() or tiles:
            return
        self.log.append(text)
        stage = self._stage_of(text)
        if stage is not None and stage != self.stage:
            self.enter(stage)

    def _stage_of(self, text: str) -> str | None:
        """The stage a line starts; the rough (crop) segmentation swallows its own inner steps."""
        if text.startswith("Generating rough segmentation"):
            self._in_rough = True
            return "rough segmentation"
        if self._in_rough:
            if _CROPPED.match(text):
                self._in_rough = False
                return "resample input"
            return None
        if text.startswith("Resampling"):
            return "resample output" if self._predicted else "resample input"
        if text.startswith("Predicting"):
            self._predicted = True
            return "predict"
        if text.startswith("Saving segmentations"):
            return "save"
        return None

    def enter(self, stage: str) -> None:
        """Close the current stage's clock and start ``stage``'s."""
        now = time.monotonic()
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + now - self._since
        self.stage, self._since, self._tiles_told = stage, now, 0.0
        self._report(0.0)

    def finish(self) -> dict[str, float]:
        """Stop the clock; the seconds per stage."""
        self.enter("done")
        self.timings.pop("done", None)
        return {k: round(v, 2) for k, v in self.timings.items()}

    def _report(self, within: float) -> None:
        lo, hi = STAGE_SPAN.get(self.stage, (self._fraction, self._fraction))
        self._fraction = max(self._fraction, lo + (hi - lo) * within)
        self._told = time.monotonic()
        if self.progress is not None and self.stage != "done":
            self.progress(f"TotalSegmentator: {self.stage}", self._fraction)

    def heartbeat(self) -> None:
        """Report the running stage again when it has been quiet for :data:`HEARTBEAT_S`."""
        if time.monotonic() - self._told >= HEARTBEAT_S:
            self._report(0.0)


def _read_lines(stream, lines: queue.Queue) -> None:
    """Split the child's output on newlines and carriage returns (progress bars use ``\\r``)."""
    buffer = ""
    for chunk in iter(lambda: stream.read1(4096), b""):
        buffer += chunk.decode("utf-8", "replace")
        *complete, buffer = re.split(r"[\r\n]", buffer)
        for text in complete:
            lines.put(text)
    if buffer:
        lines.put(buffer)


def _temp_env(temp_dir: str | None) -> dict[str, str]:
    """Environment variables naming the temporary folder (POSIX and Windows spellings)."""
    return {} if temp_dir is None else {"TMPDIR": temp_dir, "TEMP": temp_dir, "TMP": temp_dir}


def _kill(process: subprocess.Popen) -> None:
    """Kill the child and every process it started (nnU-Net's workers share its process group)."""
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def run_child(
    request_file: str,
    clock: StageClock,
    should_cancel: Callable[[], bool] | None = None,
    temp_dir: str | None = None,
    poll_s: float = 0.2,
) -> int:
    """Run ``totalseg_run REQUEST`` until it ends; its exit code.

    ``temp_dir`` becomes the child's temporary folder (TotalSegmentator and nnU-Net write theirs
    there), so that nothing of a killed run outlives the caller's own temporary folder.

    Raises:
        CancelledError: ``should_cancel()`` returned True, or ``clock.progress`` raised it; the
            child and its workers are killed first (as they are on any other exception).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "fvlm_core.segmentation.totalseg_run", request_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **_temp_env(temp_dir)},
        start_new_session=os.name == "posix",  # its own process group: one kill ends all its workers
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        clock.begin()
        while True:
            ended = process.poll() is not None
            if ended:
                reader.join(timeout=5)  # the last lines (workers may hold the pipe: do not wait on them)
            while not lines.empty():
                clock.line(lines.get_nowait())
            if ended:
                return process.returncode
            if should_cancel is not None and should_cancel():
                raise CancelledError("TotalSegmentator cancelled")
            clock.heartbeat()
            time.sleep(poll_s)
    finally:
        _kill(process)  # cancelled or failed: stop it; finished: end any worker left behind
        with contextlib.suppress(OSError):
            process.stdin.close()
