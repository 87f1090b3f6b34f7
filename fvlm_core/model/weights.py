"""A model folder's weights file, ``model.safetensors``: reading it (never unpickling), its metadata,
checking its tensors against a model, and its SHA-256, the model's identity in DICOM objects,
embedding stores and evaluation journals.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from fvlm_core.errors import CheckpointError

if TYPE_CHECKING:  # torch is not imported here: the digest serves readers of stores and DICOM too
    import torch

WEIGHTS_NAME = "model.safetensors"


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 (hex) of a model folder's weights file: the bytes of ``model.safetensors``.

    Raises:
        CheckpointError: the folder holds no weights file.
    """
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME} there; give a model folder.")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file (corrupt or truncated: {exc}); "
        "copy or download the checkpoint again"
    )


def read_safetensors(
    path: Path, device: str = "cpu", keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those whose name ``keep`` accepts, default all);
    :class:`CheckpointError` if it is missing, truncated or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found; the checkpoint folder is incomplete")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (``{}`` when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with contiguous CPU tensors that share no memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def check_state_dict(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Raise :class:`CheckpointError` when names or shapes of ``tensors`` do not match ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not any(s in k for s in allow_missing)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (model expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape, e.g. {'; '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match the model its config describes: {'; '.join(problems)}. "
            "The config and weights come from different models; re-save or re-import the checkpoint"
        )
