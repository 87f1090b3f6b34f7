"""Datasets: a synthetic chest CT cohort in the CT-RATE layout, the readers of labelled datasets
(CT-RATE, RAD-ChestCT, your own cohort), the model-space sample cache written by ``fvlm prepare``,
and training items and batches.

- :mod:`fvlm_core.data.layout` — CT-RATE split names, volume paths, scan ids.
- :mod:`fvlm_core.data.synth` — phantoms with findings and CT-RATE-style reports:
  :func:`generate_cohort` (files), :func:`iter_cohort` (in memory), :func:`to_cached_sample`.
- :mod:`fvlm_core.data.ctrate` — :class:`CTRATEReader` (tables + files), :func:`build_sample`;
  :mod:`fvlm_core.data.ctrate_volume` — a volume read with its metadata row (geometry, HU rescale).
- :mod:`fvlm_core.data.labelled` — the labelled-dataset layouts behind one interface:
  :func:`detect_layout`, :func:`open_dataset` (CT-RATE, RAD-ChestCT, your own cohort);
  :mod:`fvlm_core.data.readers` — what the readers share (label cells, masks).
- :mod:`fvlm_core.data.radchest` — :class:`RadChestReader`, :func:`read_radchest_npz` (RAD-ChestCT's
  NPZ volumes); :mod:`fvlm_core.data.radchest_labels` — its abnormality x location labels, mapped to
  CT-RATE findings.
- :mod:`fvlm_core.data.cohort` — :class:`CohortReader` (a folder of CTs and one labels CSV).
- :mod:`fvlm_core.data.cache` — :class:`CachedSample`, :func:`save_sample` / :func:`load_sample`,
  :class:`CacheSamples` (the reader of a cache).
- :mod:`fvlm_core.data.samples` — samples -> training items (:func:`make_item`: crop, flips,
  intact anatomies) -> batches (:func:`collate`); :class:`TrainingSamples`, :class:`GlobalBatchSampler`.
- :mod:`fvlm_core.data.prepare` — :func:`prepare_dataset` (``fvlm prepare``).

Import the modules themselves (``from fvlm_core.data.synth import generate_cohort``): this package
imports none of them, so reading a layout's names does not load torch or MONAI.
"""
