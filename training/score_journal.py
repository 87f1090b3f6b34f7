"""The per-volume score journal of ``fvlm evaluate``: its identity, and a volume's record.

Each volume's scores go into ``--out/volume_scores/<role>.jsonl`` (an
:class:`~fvlm_core.journal.ItemJournal`) as soon as they are computed. The journal's identity
(:func:`scoring_identity`) is everything those scores depend on: the model (its weights, text
encoder files, config and prompts: :func:`model_identity`), the windows, the dataset, the split
and the masks. A re-run with any of them changed is refused before any volume is encoded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Sub-folder of ``--out`` where the per-volume scores are kept as they are computed.
JOURNAL_DIR = "volume_scores"


def record_of(scores: Mapping[str, float]) -> dict[str, Any]:
    """A volume's journal record: its scores, NaN (not scored) as null."""
    return {"scores": {k: None if math.isnan(v) else v for k, v in scores.items()}}


def scores_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A volume's scores from its journal record (null: not scored, NaN)."""
    return {k: float("nan") if v is None else float(v) for k, v in record["scores"].items()}


def model_identity(model_dir: str | os.PathLike, config) -> dict[str, Any]:
    """What a model folder's scores depend on: SHA-256 of its weights and of its text encoder's
    files (tokenizer), its config (without what ``--store-thresholds`` changes: thresholds,
    calibrations, provenance) and its findings' prompts."""
    import hashlib

    from fvlm_core.model.weights import weights_sha256

    def digest(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            h.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
        return h.hexdigest()

    model_dir = Path(model_dir)
    cfg = config.encoder_dict()
    prompts = [[f.anatomy, f.name, list(f.negative), list(f.positive)] for f in config.finding_set()]
    text = sorted(p for p in (model_dir / "text").rglob("*") if p.is_file())
    return {
        "model weights (sha256)": weights_sha256(model_dir),
        "text encoder files (sha256)": digest(text),
        "model config": cfg,
        "prompts": prompts,
    }


def scoring_identity(
    model: Mapping[str, Any],
    data_dir: str | os.PathLike,
    split: str,
    windows: str,
    masks_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The identity of a score journal (:mod:`fvlm_core.journal`): the ``model`` (its
    :func:`model_identity`) and how the volumes are read and windowed. The choice of volumes (``--limit``,
    ``--one-per-scan``) is not part of it: any subset reuses what was scored."""
    from fvlm_core.data.cache import is_cache_folder

    data = Path(data_dir).resolve()
    return {
        **model,
        "windows": windows,
        "dataset": str(data),
        "split": None if is_cache_folder(data) else split,
        "masks": None if masks_dir is None else str(Path(masks_dir).resolve()),
    }
