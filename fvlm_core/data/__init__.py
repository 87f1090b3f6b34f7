"""Datasets: a synthetic chest CT cohort in the CT-RATE layout, the readers of labelled datasets
(CT-RATE, RAD-ChestCT, your own cohort), the model-space sample cache written by ``fvlm prepare``,
and training items and batches.

- :mod:`fvlm_core.data.layout` — CT-RATE split names, volume paths, scan ids.
- :mod:`fvlm_core.data.synth` — phantoms with findings and CT-RATE-style reports:
  :func:`generate_cohort` (files), :func:`iter_cohort` (in memory), :func:`to_cached_sample`.
- :mod:`fvlm_core.data.ctrate` — :class:`CTRATEReader` (tables + files), :func:`build_sample`.
- :mod:`fvlm_core.data.labelled` — the labelled-dataset layouts behind one interface:
  :func:`detect_layout`, :func:`open_dataset` (CT-RATE, RAD-ChestCT, your own cohort).
- :mod:`fvlm_core.data.radchest` — :class:`RadChestReader`, :func:`read_radchest_npz` (RAD-ChestCT's
  NPZ volumes and abnormality x location labels, mapped to CT-RATE findings).
- :mod:`fvlm_core.data.cohort` — :class:`CohortReader` (a folder of CTs and one labels CSV).
- :mod:`fvlm_core.data.cache` — :class:`CachedSample`, :func:`save_sample` / :func:`load_sample`,
  :class:`CacheSamples` (the reader of a cache).
- :mod:`fvlm_core.data.samples` — samples -> training items (:func:`make_item`: crop, flips,
  intact anatomies) -> batches (:func:`collate`); :class:`TrainingSamples`, :class:`GlobalBatchSampler`.
- :mod:`fvlm_core.data.prepare` — :func:`prepare_dataset` (``fvlm prepare``).

Names are imported lazily so ``import fvlm_core.data`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generate_cohort": "synth",
    "iter_cohort": "synth",
    "make_phantom": "synth",
    "to_cached_sample": "synth",
    "SynthSample": "synth",
    "CTRATEReader": "ctrate",
    "VolumeRecord": "ctrate",
    "build_sample": "ctrate",
    "make_segmenter": "ctrate",
    "DatasetOptions": "labelled",
    "detect_layout": "labelled",
    "open_dataset": "labelled",
    "RadChestReader": "radchest",
    "read_radchest_npz": "radchest",
    "CohortReader": "cohort",
    "CachedSample": "cache",
    "CacheSamples": "cache",
    "save_sample": "cache",
    "load_sample": "cache",
    "AugmentConfig": "samples",
    "TrainingSamples": "samples",
    "make_item": "samples",
    "collate": "samples",
    "GlobalBatchSampler": "samples",
    "prepare_dataset": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fvlm_core.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fvlm_core.data' has no attribute {name!r}")
