"""Checkpoints: a folder with ``model.safetensors``, ``config.yaml`` and ``text/``.

``text/`` holds the text encoder's ``config.json`` and tokenizer files, so loading needs nothing
but the folder (no hub, no pickles). Weights are read with safetensors only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fvlm_core.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TEXT_DIR = "text"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the weights' meaning."""
    import monai
    import transformers

    from fvlm_core import __version__

    return {
        "fvlm": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "transformers": transformers.__version__,
    }


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def save_text_files(model, directory: Path) -> None:
    """Write the text encoder's config and tokenizer into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.text_encoder.config.to_json_file(str(directory / "config.json"))
    model.tokenizer.save_pretrained(str(directory))


def save_pretrained(model, directory: str | os.PathLike, **config_updates) -> Path:
    """Save ``model`` (an :class:`~fvlm_core.model.FVLM`) to ``directory``.

    Args:
        model: the model.
        directory: output folder (created). Existing files are replaced atomically.
        **config_updates: config fields to set before saving (e.g. ``thresholds={...}``).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from fvlm_core.atomic import atomic_path
    from fvlm_core.model.config import FVLMConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_dict = model.config.to_dict()
    cfg_dict.update(config_updates)
    cfg_dict["versions"] = library_versions()
    config = FVLMConfig.from_dict(cfg_dict)
    # the text folder first, written next to its final place and swapped in
    tmp_text = directory / f".{TEXT_DIR}.tmp"
    shutil.rmtree(tmp_text, ignore_errors=True)
    save_text_files(model, tmp_text)
    final_text = directory / TEXT_DIR
    old = directory / f".{TEXT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final_text.exists():
        final_text.rename(old)
    tmp_text.rename(final_text)
    shutil.rmtree(old, ignore_errors=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(
            _unshared_state_dict(model), str(tmp), metadata={"format": "pt", "fvlm": config.versions["fvlm"]}
        )
    config.save(directory / CONFIG_NAME)
    model.config = config
    return directory


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; :class:`CheckpointError` if it is missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found; the checkpoint folder is incomplete")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated: {exc}); "
            "copy or download the checkpoint again"
        ) from exc


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


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a checkpoint folder written by :func:`save_pretrained`.

    Args:
        directory: folder with ``config.yaml``, ``model.safetensors`` and ``text/``.
        device: a ``torch.device`` or a name :func:`fvlm_core.devices.resolve_device` takes
            (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``gpu``, ``mps``).

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: the folder is missing, incomplete, or its weights do not fit its config.
        ConfigError: the device is unknown or not available here.
    """
    from fvlm_core.devices import resolve_device
    from fvlm_core.model.config import load_config
    from fvlm_core.model.fvlm import FVLM

    device = resolve_device(device)  # before reading anything: an absent GPU is reported first
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a checkpoint written by save_pretrained")
    try:
        config = load_config(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: invalid model config: {exc}") from exc
    tensors = read_safetensors(directory / WEIGHTS_NAME)
    text_dir = directory / TEXT_DIR
    model = FVLM(config, text_source=text_dir if text_dir.is_dir() else None, load_text_weights=False)
    check_state_dict(model, tensors, str(directory / WEIGHTS_NAME))
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
