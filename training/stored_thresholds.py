"""Thresholds and calibrations saved into a model folder's ``config.yaml``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fvlm_core.errors import ConfigError


def store_thresholds(
    model_dir: str | os.PathLike,
    thresholds: Mapping[str, float],
    source: str = "",
    calibration: Mapping[str, Any] | None = None,
    to: str | os.PathLike | None = None,
    findings: Sequence[Any] | None = None,
) -> Path:
    """Save ``thresholds`` (finding name -> value on the raw scale) and ``calibration`` (finding
    name -> :class:`~fvlm_core.calibration.Calibration`) into ``model_dir/config.yaml``
    (atomically; only that file: the weights' record of the architecture stays as it was), or
    into ``to`` (a staged file that replaces it later: :func:`run` writes all outputs or none).

    Each is stored with what it was fitted with (``calibrated_with``: the finding's anatomy and
    wordings, from ``findings`` (the scored ones, ``--prompts`` included) or else the config's
    finding of that name, and the folder's text identity; :mod:`fvlm_core.model.calibrated_with`),
    so that it is used only for that finding as worded then, with that text side. A name with no
    known wording is not stored. Existing thresholds and calibrations of other findings are kept.
    ``fvlm analyze`` then reports them as ``threshold_source: calibrated`` and gives calibrated
    probabilities.
    """
    from fvlm_core.model.calibrated_with import fitted_with
    from fvlm_core.model.config import load_config
    from fvlm_core.model.prompt_store import folder_text_identity

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{model_dir}: no config.yaml; --store-thresholds needs a model folder.")
    cfg = load_config(model_dir)
    scored = {f.name: f for f in (findings if findings is not None else cfg.finding_set())}
    known = {**{f.name: f for f in cfg.finding_set()}, **scored}
    identity = folder_text_identity(model_dir, cfg)
    clean = {
        k: float(v)
        for k, v in thresholds.items()
        if v is not None and not math.isnan(float(v)) and k in known
    }
    fitted = {k: c for k, c in (calibration or {}).items() if k in known}
    cfg.thresholds = {**cfg.thresholds, **clean}
    cfg.calibration = {**cfg.calibration, **{k: c.to_dict() for k, c in fitted.items()}}
    for name in {*clean, *fitted}:
        cfg.calibrated_with[name] = fitted_with(known[name], identity)
    if source:
        cfg.versions = {**cfg.versions, "thresholds_from": source}
    cfg.save(Path(to) if to is not None else cfg_path)
    return cfg_path
