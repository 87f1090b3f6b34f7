"""Long work the panel drives in short steps on the GUI thread: an analysis, a task, an import of weights.

A job is a generator of steps. Its owner (the panel's timer, or :meth:`Job.wait` in the Python
console and the tests) calls :meth:`Job.step`, which does one bounded piece of work and returns
how long to wait before the next: write 8 MB of the CT, read what the worker wrote, copy a slab
of the results into VTK, attach one result node. Nothing runs in a Python thread of Slicer's
process (``process.py`` says why); the heavy work is the worker's (``worker.py``). Every step
is timed (``JobStatus.longest_step_s``).

:class:`AnalysisJob`: the CT (and the chosen segmentation's label-map layers) are written into
a job folder as raw NRRD, a slab per step, then a request
(:class:`fvlm_core.zeroshot.pipeline.AnalysisRequest`) is handed to the warm worker, which reads
them with the library's readers and checks. The job follows the worker's progress and output,
reads the :class:`~fvlm_core.zeroshot.results.AnalysisResult` back (arrays memory-mapped) and
runs the caller's ``show`` steps, which put it into the scene. The job folder (it holds a copy of
the CT) is deleted however the job ends. Cancel asks the worker to stop (checked at its every
progress report); when it has not stopped within :attr:`AnalysisJob.cancel_grace_s` the
worker's process tree is killed and the next analysis starts a new one.

:class:`TaskJob` hands the worker a task of ``tasks.py`` ("Similar cases", "Export to DICOM") the
same way (:class:`WorkerJob` is what the two share), with the caller's GUI-thread steps before
(``prepare``) and after (``finish``). :class:`ImportJob` runs ``fvlm import-checkpoint`` in its
own process. No Qt here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import CancelledError, FVLMError
from fvlm_core.geometry import Geometry

from .process import BackgroundProcess
from .warm import WarmWorker, python_env, python_executable

#: Bytes of voxels written or copied in one step (a few ms on the GUI thread).
CHUNK_BYTES = 8 << 20
#: Seconds between polls of the worker.
POLL_S = 0.1
#: numpy type -> NRRD type (what a scalar volume node can hold)
_NRRD_TYPES = dict(zip(
    ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"),
    ("int8", "uint8", "short", "ushort", "int", "uint", "longlong", "ulonglong", "float", "double"),
))  # fmt: skip


@dataclass
class JobStatus:
    """What the panel shows. ``state``: running | done | failed | cancelled."""

    state: str = "running"
    stage: str = "starting"
    fraction: float = 0.0
    error: str = ""
    elapsed_s: float = 0.0
    log: list[str] = field(default_factory=list)
    steps: int = 0
    longest_step_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state != "running"


class Job:
    """Steps, status, cancel and cleanup every job shares (see the module docstring)."""

    def __init__(self) -> None:
        self.status = JobStatus()
        self._cancel = False
        self._steps: Iterator[float] | None = None
        self._t0 = time.monotonic()

    def _run(self) -> Iterator[float]:
        raise NotImplementedError

    def _cleanup(self, state: str) -> None:
        """Runs once after every ending (``state``: done, failed, cancelled)."""

    def start(self) -> Job:
        self._t0 = time.monotonic()
        self._steps = self._run()
        return self

    def step(self) -> float | None:
        """Do the next step; the seconds to wait before the next one, ``None`` once finished."""
        if self.status.finished:
            return None
        t = time.perf_counter()
        delay, ending = 0.0, None
        try:
            delay = next(self._steps)
        except StopIteration:
            ending = ("done", "")
        except CancelledError:
            ending = ("cancelled", "cancelled")
        except FVLMError as exc:
            ending = ("failed", str(exc))
        except Exception as exc:  # a bug or a library error: report it, keep Slicer alive
            logging.exception("FVLM: a job step failed")
            ending = ("failed", f"{type(exc).__name__}: {exc}")
        self.status.steps += 1
        self.status.longest_step_s = max(self.status.longest_step_s, time.perf_counter() - t)
        self.status.elapsed_s = time.monotonic() - self._t0
        if ending is not None:
            self._end(*ending)
            return None
        return delay

    def _end(self, state: str, error: str) -> None:
        try:
            self._cleanup(state)
        finally:
            self.status.state, self.status.error = state, error
            if state == "done":
                self.status.fraction, self.status.stage = 1.0, "done"

    def cancel(self) -> None:
        """Stop at the next step (an analysis: once the worker has stopped or been killed)."""
        self._cancel = True

    def abandon(self) -> None:
        """End now, from the outside (the scene is closing): no further step, files removed."""
        if not self.status.finished:
            if self._steps is not None:
                self._steps.close()
            self._end("cancelled", "cancelled")

    def wait(self, timeout_s: float | None = None) -> JobStatus:
        """Run the steps to the end, sleeping between them (the console and tests; not the GUI)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (delay := self.step()) is not None:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(delay)
        return self.status

    def _log(self, line: str) -> None:
        self.status.log.append(line)

    def _stage(self, stage: str, fraction: float, log: bool = True) -> None:
        if log and stage.split(":")[0] != self.status.stage.split(":")[0]:
            self._log(f"{time.monotonic() - self._t0:6.1f} s  {stage}")
        self.status.stage = stage
        self.status.fraction = max(self.status.fraction, float(fraction))  # the bar never goes back

    def _check_cancel(self) -> None:
        if self._cancel:
            raise CancelledError("cancelled")


def nrrd_header(dtype: np.dtype, geometry: Geometry) -> bytes:
    """The header of a raw little-endian NRRD holding a ``(Z, Y, X)`` array on ``geometry`` (LPS)."""
    name = _NRRD_TYPES.get(np.dtype(dtype).name)
    if name is None:
        raise FVLMError(f"voxels of type {np.dtype(dtype).name} cannot be analysed: convert the volume first")
    axes = geometry.affine_lps[:3, :3]
    directions = " ".join("(" + ",".join(repr(float(v)) for v in axes[:, i]) + ")" for i in range(3))
    x, y, z = geometry.size
    origin = ",".join(f"{float(v)!r}" for v in geometry.origin)
    lines = [
        "NRRD0004",
        f"type: {name}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {x} {y} {z}",
        f"space directions: {directions}",
        "kinds: domain domain domain",
        "endian: little",
        "encoding: raw",
        f"space origin: ({origin})",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_nrrd_steps(path: Path, array: np.ndarray, geometry: Geometry) -> Iterator[float]:
    """Write ``array`` (``(Z, Y, X)``, any scalar type) as a raw NRRD, a slab of about
    :data:`CHUNK_BYTES` per step (yields the fraction written)."""
    little = array.dtype.newbyteorder("<")
    slab = max(1, CHUNK_BYTES // max(array[:1].nbytes, 1))
    with open(path, "wb") as out:
        out.write(nrrd_header(array.dtype, geometry))
        for z in range(0, array.shape[0], slab):
            np.ascontiguousarray(array[z : z + slab], dtype=little).tofile(out)
            yield min(1.0, (z + slab) / array.shape[0])


@dataclass
class JobInputs:
    """Views of an analysis' input taken on the GUI thread (no voxel is copied there).

    Attributes:
        volume: ``(Z, Y, X)`` view of the CT's scalars in their stored type; ``geometry`` its
            world grid (LPS), ``name`` its node name.
        layers: the chosen segmentation's label-map layers as ``(view, geometry)``.
        segments: ``(layer index, label value, anatomy)`` of the segments that are model
            anatomies, in the segmentation's order (later ones win where they overlap).
    """

    volume: np.ndarray
    geometry: Geometry
    name: str
    layers: list[tuple[np.ndarray, Geometry]] = field(default_factory=list)
    segments: list[tuple[int, int, str]] = field(default_factory=list)


def remove_folder(folder: str | Path) -> None:
    """Delete a job's folder, even while the worker still writes into it: the folder is first
    renamed (atomic), so the worker's next write fails and it sees the job gone, instead of a
    file it writes during the deletion keeping the folder alive."""
    folder = Path(folder)
    gone = folder.with_name(f".{folder.name}.removed")
    try:
        folder.rename(gone)
    except OSError:  # already gone, or a file system that refuses: delete in place
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


ShowSteps = Callable[[Any], Generator[float, None, Any]]


class WorkerJob(Job):
    """A job of the warm worker (one at a time): its job folder written in steps, handed over,
    followed until the worker's ``finished.json``, deleted however the job ends.

    Attributes:
        finished_info: the worker's ``finished.json`` (``model_reused``, ``worker_pid``, ``worker_jobs``).
        error_type: the worker's error class (``fvlm_core.errors``), when it failed.
    """

    cancel_grace_s = 2.0

    def __init__(self, worker: WarmWorker) -> None:
        super().__init__()
        self.worker = worker
        self.job_dir: Path | None = None
        self.finished_info: dict = {}
        self.killed_worker = False
        self.error_type = ""
        self._claimed = False

    def _claim(self) -> Iterator[float]:
        """Claim the worker (started when it is not running) and make the job folder."""
        self._stage("prepare: starting the analysis worker", 0.0)
        if self.worker.busy:
            raise FVLMError("the analysis worker is busy with another job: wait for it or cancel it.")
        self.worker.busy = self._claimed = True
        self.job_dir = Path(tempfile.mkdtemp(prefix="fvlm-job-"))
        self._log(self.worker.ensure_started())
        yield 0.0

    def _write_layers(
        self, layers: Sequence[tuple[np.ndarray, Geometry]], segments: Sequence[tuple[int, int, str]]
    ) -> Generator[float, None, list[dict]]:
        """Write label-map layers (:class:`JobInputs`' ``layers``) as NRRD, a slab per step; the
        ``segments`` as ``SegmentsBackend`` takes them."""
        for i, (array, geometry) in enumerate(layers):
            for _ in write_nrrd_steps(self.job_dir / f"layer_{i}.nrrd", array, geometry):
                self._check_cancel()
                yield 0.0
        return [
            {"file": str(self.job_dir / f"layer_{i}.nrrd"), "value": int(v), "anatomy": a}
            for i, v, a in segments
        ]

    def _hand_over(self) -> Generator[float, None, None]:
        """Submit the written job folder and follow it; raise as the worker ended it."""
        self.worker.submit(self.job_dir)
        self.finished_info = yield from self._follow()
        rc = int(self.finished_info.get("rc", 1))
        if rc == 2:
            raise CancelledError("cancelled")
        if rc != 0:
            error = _read_json(self.job_dir / "error.json")
            self.error_type = error.get("type", "")
            message = error.get("message") or f"the worker failed (exit code {rc}); see the log"
            raise FVLMError(self._named(message))

    def _named(self, text: str) -> str:
        return text

    def _read_worker(self) -> None:
        self.status.log.extend(self._named(line) for line in self.worker.process.read())

    def _follow(self) -> Generator[float, None, dict]:
        """Mirror the worker's progress and output until the job's ``finished.json``."""
        cancel_t, resubmitted = None, False
        while True:
            self._read_worker()
            finished = _read_json(self.job_dir / "finished.json")
            if finished:
                return finished
            progress = _read_json(self.job_dir / "progress.json")
            if progress:
                # the worker logs its stages itself (its lines are in the log)
                self._stage(str(progress.get("stage", "")), float(progress.get("fraction", 0.0)), log=False)
            if not self.worker.running():
                self._check_cancel()
                if not (self.job_dir / "taken").exists() and not resubmitted:
                    # it ended before taking the job (its idle timeout, a kill): a new one takes it
                    resubmitted = True
                    self._log(self.worker.ensure_started())
                    self.worker.submit(self.job_dir)
                    continue
                raise FVLMError(
                    f"the analysis worker ended during the job (exit code {self.worker.process.returncode()}); "
                    "see the log. A new worker starts with the next job."
                )
            if self._cancel:
                cancel_t = cancel_t or time.monotonic()
                with contextlib.suppress(OSError):
                    (self.job_dir / "cancel").write_text("1")
                if time.monotonic() - cancel_t > self.cancel_grace_s:
                    self.worker.kill()
                    self.killed_worker = True
                    self._log(
                        f"the job did not stop within {self.cancel_grace_s:g} s: the analysis worker was "
                        "stopped (a new one starts with the next job)"
                    )
                    raise CancelledError("cancelled")
            yield POLL_S

    def _cleanup(self, state: str) -> None:
        if self._claimed:
            self.worker.busy = False
        if self.job_dir is not None:
            remove_folder(self.job_dir)


class AnalysisJob(WorkerJob):
    """One analysis in the warm worker (see the module docstring).

    Attributes:
        result: the :class:`~fvlm_core.zeroshot.results.AnalysisResult` once read back.
        nodes: what ``show`` returned (the result nodes in the scene).
    """

    def __init__(
        self, worker: WarmWorker, inputs: JobInputs, request: Any, show: ShowSteps | None = None
    ) -> None:
        super().__init__(worker)
        self.inputs, self.request, self.show = inputs, request, show
        self.result = None
        self.nodes = None
        self._ct_file = ""

    def _run(self) -> Iterator[float]:
        yield from self._claim()
        ct = self.job_dir / (Path(self.request.ct).name or "ct.nrrd")
        self._ct_file = str(ct)
        for done in write_nrrd_steps(ct, self.inputs.volume, self.inputs.geometry):
            self._check_cancel()
            self._stage(f"prepare: handing the CT over ({100 * done:.0f}%)", 0.0)
            yield 0.0
        segments = yield from self._write_layers(self.inputs.layers, self.inputs.segments)
        request = dataclasses.replace(self.request, ct=str(ct), segments=segments or self.request.segments)
        request.save(self.job_dir / "request.json")
        yield from self._hand_over()
        from fvlm_core.zeroshot.results import AnalysisResult

        self._stage("finish: reading the results", 0.98)
        self.result = AnalysisResult.load(self.job_dir / "output", mmap=True)
        self.result.ct = self.inputs.name
        self.result.warnings = [self._named(w) for w in self.result.warnings]
        self.result.notes = [self._named(n) for n in self.result.notes]
        self._log(_reuse_line(self.finished_info, self.result.timings))
        for message in self.result.warnings:
            self._log(f"warning: {message}")
        yield 0.0
        if self.show is not None:
            self._stage("finish: showing the results", 0.99)
            self.nodes = yield from self.show(self.result)

    def _named(self, text: str) -> str:
        """``text`` with the job folder's CT file called by the volume's name (it is a copy)."""
        return text.replace(self._ct_file, repr(self.inputs.name)) if self._ct_file else text

    def _cleanup(self, state: str) -> None:
        if self.result is not None:  # let go of the memory-mapped files before they are deleted
            self.result.labelmap = None
            for amap in self.result.similarity_maps.values():
                amap.values = None
        super()._cleanup(state)


class TaskJob(WorkerJob):
    """A task of ``tasks.py`` in the warm worker ("Similar cases", "Export to DICOM").

    Args:
        task: its ``task.json`` (``{"task": name, ...}``).
        prepare: GUI-thread steps returning more fields of the task (e.g. the files of a DICOM
            series, looked up a chunk per step).
        layers, segments: label-map layers the task reads, as :class:`JobInputs` holds them
            (written as NRRD; the task gets them as ``segments``).
        finish: GUI-thread steps with the worker's ``output.json`` and the job folder (e.g. the
            DICOM files inserted into Slicer's database) before the folder is deleted.

    Attributes:
        output: the worker's ``output.json``; ``value``: what ``finish`` returned.
    """

    def __init__(
        self,
        worker: WarmWorker,
        task: dict[str, Any],
        prepare: Callable[[], Generator[float, None, dict]] | None = None,
        layers: Sequence[tuple[np.ndarray, Geometry]] = (),
        segments: Sequence[tuple[int, int, str]] = (),
        finish: Callable[[dict, Path], Generator[float, None, Any]] | None = None,
    ) -> None:
        super().__init__(worker)
        self.task, self.prepare, self.finish = dict(task), prepare, finish
        self.layers, self.segments = list(layers), list(segments)
        self.output: dict = {}
        self.value = None

    def _run(self) -> Iterator[float]:
        from fvlm_core.atomic import atomic_write_text

        from .tasks import OUTPUT_FILE, TASK_FILE

        yield from self._claim()
        task = dict(self.task)
        if self.prepare is not None:
            task.update((yield from self.prepare()))
        if self.layers:
            task["segments"] = yield from self._write_layers(self.layers, self.segments)
        atomic_write_text(self.job_dir / TASK_FILE, json.dumps(task))
        yield from self._hand_over()
        self.output = _read_json(self.job_dir / OUTPUT_FILE)
        if self.finish is not None:
            self.value = yield from self.finish(self.output, self.job_dir)


def _reuse_line(info: dict, timings: dict) -> str:
    """What the worker reused, for the log: its pid, its job count, the model loaded or reused."""
    pid, jobs = info.get("worker_pid", "?"), info.get("worker_jobs", "?")
    model = (
        "the loaded model reused"
        if info.get("model_reused")
        else f"model loaded in {timings.get('load_model', 0.0):.1f} s"
    )
    return f"analysis worker pid {pid}, job {jobs}: {model}"


class ImportJob(Job):
    """``fvlm import-checkpoint CHECKPOINT --text-encoder DIR --out DIR`` in a background process.

    On cancel or failure, an output folder this job created is removed again.
    """

    def __init__(self, checkpoint: str, text_encoder: str, out_dir: str, python: str | None = None) -> None:
        super().__init__()
        self.checkpoint, self.text_encoder, self.out_dir = str(checkpoint), str(text_encoder), str(out_dir)
        self.python = python or python_executable()
        self._created_out = not Path(out_dir).exists()
        self.process: BackgroundProcess | None = None

    def _run(self) -> Iterator[float]:
        self._stage("importing the official weights", 0.1)
        args = [self.python, "-m", "fvlm_core.cli", "import-checkpoint", self.checkpoint]
        args += ["--text-encoder", self.text_encoder, "--out", self.out_dir]
        self.process = BackgroundProcess(args, python_env()).start()
        while self.process.returncode() is None:
            self.status.log.extend(self.process.read())
            self._check_cancel()
            yield POLL_S
        self.status.log.extend(self.process.read())
        rc = self.process.returncode()
        if rc != 0 or not (Path(self.out_dir) / "config.yaml").is_file():
            lines = [line for line in self.status.log if line.strip()]
            raise FVLMError(lines[-1] if lines else f"the import exited with code {rc}")

    def _cleanup(self, state: str) -> None:
        if self.process is not None:
            self.process.stop()
        if state != "done" and self._created_out:
            remove_folder(self.out_dir)
