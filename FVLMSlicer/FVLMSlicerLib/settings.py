"""Where the module finds things: the remembered demo model, the model's anatomies and findings.

``fvlm demo`` (a source checkout's) writes the folder of the model it trained into
``$FVLM_CACHE/last_demo_model.txt`` (by default ``~/.cache/fvlm/``): one line, an absolute path
(``training/demo.py``); the panel offers that folder when none is chosen. No Slicer, no Qt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.errors import CheckpointError, ConfigError, DependencyError


def cache_dir() -> Path:
    """``$FVLM_CACHE`` (what ``fvlm demo`` uses), else ``~/.cache/fvlm``."""
    return Path(os.environ.get("FVLM_CACHE") or Path.home() / ".cache" / "fvlm").expanduser()


def last_demo_model_file() -> Path:
    """The file in which ``fvlm demo`` records its model folder."""
    return cache_dir() / "last_demo_model.txt"


def default_import_dir() -> Path:
    """Where the panel puts imported official weights: ``<cache>/models/fvlm-ctrate``."""
    return cache_dir() / "models" / "fvlm-ctrate"


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


def read_model_info(model_dir: str | os.PathLike) -> ModelInfo:
    """Anatomies, default findings and thresholds of a saved model (reads ``config.yaml`` only:
    yaml and numpy, not torch; milliseconds).

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
        from fvlm_core.model.config import load_config
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
    findings = [dict(f) for f in (cfg.findings or [])]
    return ModelInfo(str(path), list(cfg.anatomies), findings, dict(cfg.thresholds or {}), str(cfg.name))
