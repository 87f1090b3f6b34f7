"""Where the module finds things: the remembered demo model, the model's anatomies and findings.

``fvlm demo`` writes the folder of the model it trained into the text file
:data:`LAST_DEMO_MODEL_FILE` (``$FVLM_CACHE/last_demo_model.txt``, by default
``~/.cache/fvlm/last_demo_model.txt``): one line, an absolute path (``training/demo.py``). The Slicer module offers
that folder as the default model. No Slicer, no Qt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.atomic import atomic_write_text
from fvlm_core.errors import CheckpointError, ConfigError, DependencyError


def cache_dir() -> Path:
    """``$FVLM_CACHE`` (what ``fvlm demo`` uses), else ``~/.cache/fvlm``."""
    return Path(os.environ.get("FVLM_CACHE") or Path.home() / ".cache" / "fvlm").expanduser()


def last_demo_model_file() -> Path:
    """The file in which ``fvlm demo`` records its model folder."""
    return cache_dir() / "last_demo_model.txt"


#: Documented name; call :func:`last_demo_model_file` for the path under the current environment.
LAST_DEMO_MODEL_FILE = "~/.cache/fvlm/last_demo_model.txt"


def default_import_dir() -> Path:
    """Where the panel puts imported official weights: ``<cache>/models/fvlm-ctrate``."""
    return cache_dir() / "models" / "fvlm-ctrate"


def remember_model_dir(model_dir: str | os.PathLike) -> Path:
    """Record ``model_dir`` as the last demo model (what ``fvlm demo`` does when it finishes)."""
    return atomic_write_text(last_demo_model_file(), str(Path(model_dir).resolve()) + "\n")


def remembered_model_dir() -> str:
    """The last demo model folder if it still holds a model, else ``""``."""
    try:
        text = last_demo_model_file().read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    path = Path(text.splitlines()[0]) if text else None
    return str(path) if path is not None and (path / "config.yaml").is_file() else ""


@dataclass
class ModelInfo:
    """What the panel shows about a model before loading its weights."""

    model_dir: str
    anatomies: list[str]
    findings: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    name: str = ""

    def catalog(self):
        from fvlm_core.anatomy import get_catalog

        return get_catalog(self.anatomies)


_INFO_CACHE: dict[tuple[str, int, int], ModelInfo] = {}


def read_model_info(model_dir: str | os.PathLike) -> ModelInfo:
    """:func:`load_model_info`, remembered while ``config.yaml`` is unchanged (the panel reads it
    when the folder is chosen and again when Analyze starts: the second time is free)."""
    config = Path(model_dir).expanduser() / "config.yaml"
    try:
        stat = config.stat()
    except OSError:
        return load_model_info(model_dir)  # says what is wrong
    key = (str(config.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = load_model_info(model_dir)
    info = _INFO_CACHE[key]
    return ModelInfo(
        info.model_dir,
        list(info.anatomies),
        [dict(f) for f in info.findings],
        dict(info.thresholds),
        info.name,
    )


def load_model_info(model_dir: str | os.PathLike) -> ModelInfo:
    """Anatomies, default findings and thresholds of a saved model (reads ``config.yaml`` only).

    Raises:
        CheckpointError: the folder holds no model configuration.
        DependencyError: a Python package that reading needs is not installed (yet).
    """
    path = Path(model_dir).expanduser()
    if not (path / "config.yaml").is_file():
        raise CheckpointError(
            f"{path}: not a model folder (no config.yaml). Choose a folder holding config.yaml and "
            "model.safetensors, or click 'Import official fVLM weights...'."
        )
    try:
        from fvlm_core.model.config import load_config  # yaml and numpy, not torch
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise DependencyError(
            f"reading the model needs the Python package '{missing}', which is not installed in Slicer yet. "
            "Click 'Install dependencies' (or Analyze, which installs them first): FVLM installs its "
            "requirements into Slicer's Python and PyTorch through the PyTorch extension."
        ) from exc
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return ModelInfo(
        model_dir=str(path),
        anatomies=list(cfg.anatomies),
        findings=[dict(f) for f in (cfg.findings or [])],
        thresholds=dict(cfg.thresholds or {}),
        name=str(cfg.name),
    )
