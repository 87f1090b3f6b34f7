"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only (model,
optimizer, scheduler and grad-scaler state dicts, RNG states of python / numpy / torch / CUDA,
the data position and the run's config), so it loads with ``torch.load(weights_only=True)``.

Atomicity: the file is written to a temporary name in the same folder, flushed and fsynced,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows) and the folder is
fsynced. A process that dies while writing leaves the previous checkpoint untouched; stale
temporary files (``.checkpoint.*.tmp.pt``) are removed by the next successful save (one run
writes a run folder at a time: ``fvlm train`` holds its lock). A full disk is an
:class:`~fvlm_core.errors.OutputError` that says so and that the last good checkpoint is kept.
Checkpoints follow the umask, as every file the project writes.

Layout in a run folder: ``checkpoints/last.pt`` (always the newest) plus, with ``keep > 1``,
``checkpoints/step_00001234.pt`` copies of the most recent ``keep - 1`` saves.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm_core.atomic import disk_full_error, final_mode, is_disk_full
from fvlm_core.errors import CheckpointError

LAST = "last.pt"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``RUN_DIR/checkpoints/last.pt`` if it exists."""
    path = checkpoint_dir(run_dir) / LAST
    return path if path.is_file() else None


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(
    obj: Any, target: str | os.PathLike, what: str = "a checkpoint", kept: str | None = None
) -> Path:
    """``torch.save(obj)`` to ``target`` via temp file + fsync + rename (see module docstring).
    The file follows the umask (or keeps the mode of the one it replaces).

    Raises:
        OutputError: the disk is full (the previous ``target`` is kept; the message says so).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.pt", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, final_mode(target))  # mkstemp's 0600 is not the user's choice
        os.replace(tmp_path, target)
    except BaseException as exc:
        full = isinstance(exc, OSError | RuntimeError) and is_disk_full(exc, target.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full:
            if kept is None:
                kept = (
                    f"The last good checkpoint, {target}, is kept unchanged: training continues from it."
                    if target.exists()
                    else "No earlier checkpoint was there."
                )
            raise disk_full_error(target.parent, f"{what} ({target.name})", kept) from exc
        raise
    _fsync_dir(target.parent)
    return target


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, step: int, keep: int = 1) -> Path:
    """Write ``state`` as ``RUN_DIR/checkpoints/last.pt`` (and a per-step copy when ``keep > 1``).

    Returns the path of ``last.pt``. Older per-step copies beyond ``keep - 1`` and stale
    temporary files are removed afterwards.
    """
    folder = checkpoint_dir(run_dir)
    what = f"the checkpoint of step {int(step)}"
    last = atomic_torch_save(state, folder / LAST, what)
    if keep > 1:
        atomic_torch_save(
            state, folder / f"step_{int(step):08d}.pt", what, kept=f"{last} holds this step's checkpoint."
        )
        copies = sorted(folder.glob("step_*.pt"))
        for old in copies[: max(0, len(copies) - (keep - 1))]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    for stale in folder.glob(".*.tmp.pt"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return last


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``); clear error when unusable."""
    path = Path(path)
    if path.is_dir():
        found = last_checkpoint(path) or (path / LAST if (path / LAST).is_file() else None)
        if found is None:
            raise CheckpointError(f"{path}: no training checkpoint (checkpoints/{LAST}) in this run folder")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: training checkpoint not found; check --resume or the run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc}). "
            "It may be truncated; delete it to start over, or resume from an older step_*.pt copy"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise CheckpointError(f"{path}: not an fvlm training checkpoint (no model/progress entries)")
    return state


# ---------------------------------------------------------------------------------------------
# RNG states as plain containers (weights_only-loadable)
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states as tensors / lists / numbers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64).copy()),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_from_plain(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_plain(x):
    # python's random state is (version, tuple_of_625_ints, gauss_next): lists keep it weights_only-safe
    if isinstance(x, tuple):
        return {"__tuple__": [_to_plain(v) for v in x]}
    return x


def _from_plain(x):
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_from_plain(v) for v in x["__tuple__"])
    return x
