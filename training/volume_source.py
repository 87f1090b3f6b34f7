"""The volumes of a labelled dataset or a ``fvlm prepare`` cache, opened and checked for evaluation.

``fvlm evaluate`` and ``fvlm embed`` read their volumes through :class:`VolumeSource`: the layout
found from the folder (:mod:`fvlm_core.data.labelled`), every problem refused before the first
volume is read, then one volume at a time with its anatomy labels and its ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.errors import ConfigError, DataError


class VolumeSource:
    """Volumes of a labelled dataset or a ``fvlm prepare`` cache, loaded one at a time.

    Datasets (:mod:`fvlm_core.data.labelled`, the layout found from the folder): a CT-RATE
    layout, RAD-ChestCT (NPZ files and its abnormality x location CSV), or a labelled cohort
    (CTs in any format the project reads and one CSV). ``names`` are the volumes to score,
    sorted (CT-RATE: as its CSVs name them; otherwise scan names; a cache: sample names).
    ``load(name)`` gives ``(ct, labels, truth)``: ``ct`` a :class:`~fvlm_core.io.CTVolume` (its
    own grid for a dataset, model space for a cache), ``labels`` a
    :class:`~fvlm_core.io.LabelVolume` in the model's anatomy order on the same grid, ``truth``
    finding name -> 0/1, or ``None`` where the label is missing (left out of that finding).
    CT-RATE volumes are read as ``fvlm prepare`` reads them (geometry and HU scaling from the
    metadata CSV). Anatomies come from the segmentation ``backend`` through the same
    :func:`~fvlm_core.data.ctrate.make_segmenter` as ``fvlm prepare``: ``labelmap`` (label maps
    named like the volumes in ``masks_dir``, default ``DATA/anatomy_masks`` for CT-RATE; a
    ``class_map.json`` beside them names their values; the default when there are masks),
    ``totalsegmentator`` or ``builtin`` (lungs only).

    Before any volume is read it refuses: listed volumes missing on disk or unreadable, volumes
    without a mask for ``labelmap``, a cohort column that matches none of ``findings`` (unless
    in ``ignore_columns``; ``ignore_columns=None`` keeps every column as a label of its own
    name, as ``fvlm embed`` does), and a dataset with no labelled volume.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        model_anatomies: Sequence[str],
        split: str = "valid",
        masks_dir: str | os.PathLike | None = None,
        dedupe_scans: bool = False,
        limit: int | None = None,
        *,
        labels: str | os.PathLike | None = None,
        backend: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
        radchest_mapping: str = "hlip",
        findings: Sequence[str] = (),
        ignore_columns: Sequence[str] | None = (),
    ) -> None:
        from fvlm_core.anatomy import get_catalog
        from fvlm_core.data.cache import CacheSamples, is_cache_folder

        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DataError(f"--data {self.data_dir}: no such folder")
        self.catalog = get_catalog(list(model_anatomies))
        self.is_cache = is_cache_folder(self.data_dir)
        self.notes: list[str] = []
        self.layout = "cache"
        if self.is_cache:
            cache = CacheSamples(self.data_dir, reconstruction="first" if dedupe_scans else "all")
            names = [volumes[0] for volumes in cache.items]
        else:
            from fvlm_core.data.labelled import DatasetOptions

            options = DatasetOptions(
                split=split,
                labels=str(labels) if labels else None,
                masks=str(masks_dir) if masks_dir else None,
                radchest_mapping=radchest_mapping,
                findings=tuple(findings),
            )
            names = self._open_layout(options, ignore_columns)
            self.segment = self._segmenter(backend, backend_options)
            names = self._one_per_scan(names) if dedupe_scans else names
        self.names: list[str] = names[:limit]

    def _open_layout(self, options, ignore_columns: Sequence[str]) -> list[str]:
        """Read the dataset's tables; the labelled volumes' names, sorted."""
        from fvlm_core.data.labelled import open_dataset
        from fvlm_core.data.readers import LabelValueError

        try:
            self.reader = open_dataset(self.data_dir, options)
        except LabelValueError:
            raise  # the folder is a dataset: its label cells are what is wrong
        except DataError as exc:
            raise DataError(
                f"{exc} --data must be a CT-RATE layout folder (see --split), a RAD-ChestCT or labelled "
                "cohort folder (see --labels), or a `fvlm prepare` cache."
            ) from exc
        self.layout = self.reader.layout
        if not self.reader.has_labels:
            raise DataError(
                f"{self.data_dir}: no multi_abnormality_labels CSV for split {options.split!r}; evaluation needs "
                "the ground-truth labels."
            )
        if self.reader.skipped:
            name, reason = self.reader.skipped[0]
            raise DataError(
                f"{self.data_dir}: {len(self.reader.skipped)} listed volume(s) cannot be evaluated, e.g. "
                f"{name}: {reason}. Complete the dataset, leave those rows out of the labels, or evaluate "
                "a `fvlm prepare` cache."
            )
        unknown = [
            c
            for c in getattr(getattr(self.reader, "table", None), "unmatched", [])
            if ignore_columns is not None and c not in ignore_columns
        ]
        if unknown:
            raise DataError(
                f"{self.reader.table.path}: column(s) {', '.join(map(repr, unknown))} match none of the findings "
                f"({', '.join(self.reader.findings)}). Rename a column to its finding's "
                "name, define a finding of that name with --prompts FILE to evaluate it, or leave it out with "
                f"--ignore-columns {','.join(unknown)}."
            )
        self.notes = list(self.reader.notes)
        self.records = {
            r.metadata.get("VolumeName", r.name).strip(): r
            for r in self.reader.records
            if r.labels is not None
        }
        if not self.records:
            raise DataError(f"--data {self.data_dir}: no labelled volume to evaluate (the cohort is empty).")
        return sorted(self.records)

    def _segmenter(self, backend: str | None, options: Mapping[str, Any] | None):
        """The anatomy segmenter (see the class docstring), checked before the work."""
        from fvlm_core.data.ctrate import make_segmenter
        from fvlm_core.segmentation import get_backend

        masks = self.reader.masks_dir
        self.backend = backend or "labelmap"
        if self.backend == "labelmap":
            lacking = sorted(n for n, r in self.records.items() if r.mask_path is None)
            if lacking:
                where = masks or (self.data_dir / "anatomy_masks" if self.layout == "ctrate" else None)
                raise DataError(
                    f"{len(lacking)} volume(s) have no anatomy mask{f' under {where}' if where else ''}, e.g. "
                    f"{lacking[0]}. Give --masks DIR (anatomy label maps named like the volumes), or segment "
                    "them: --backend totalsegmentator (all four CT-RATE anatomies) or --backend builtin "
                    "(lungs only: the lung findings)."
                )
        elif self.backend == "totalsegmentator":
            get_backend(self.backend, **(options or {})).check(self.catalog)
            self.notes.append("Anatomies segmented by TotalSegmentator.")
        elif self.backend == "builtin":
            self.notes.append(
                "Anatomies segmented by the built-in segmenter, which finds the lungs only: findings on "
                "other anatomies cannot be scored (use --backend totalsegmentator or --masks)."
            )
        extra = dict(options or {}) if self.backend == "totalsegmentator" else {}
        return make_segmenter(self.backend, self.catalog, masks_dir=masks, **extra)

    def _one_per_scan(self, names: Sequence[str]) -> list[str]:
        """The first volume (by name) of each scan."""
        seen: dict[str, str] = {}
        for name in sorted(names):
            seen.setdefault(self.records[name].scan_id, name)
        return sorted(seen.values())

    def __len__(self) -> int:
        return len(self.names)

    def files(self) -> set[str]:
        """The files of :attr:`names` (real paths): two sources sharing one share a volume."""
        if self.is_cache:
            from fvlm_core.data.cache import sample_paths

            return {os.path.realpath(sample_paths(self.data_dir, n)[0]) for n in self.names}
        return {os.path.realpath(self.records[n].path) for n in self.names}

    def labelled_findings(self) -> set[str]:
        """The findings with a label (not missing) for at least one of :attr:`names`."""
        return {k for name in self.names for k, v in self.truth(name).items() if v is not None}

    def may_segment(self, anatomy: str) -> bool:
        """Whether the segmentation can give ``anatomy`` (the built-in one finds lungs and bone
        only; masks and TotalSegmentator: yes, as far as is known before reading them)."""
        return self.is_cache or self.backend != "builtin" or anatomy in ("lung", "bone")

    def truth(self, name: str) -> dict[str, int]:
        """The CT-RATE labels of ``name`` as 0/1, without reading its image."""
        if self.is_cache:
            from fvlm_core.data.cache import read_sidecar, sample_paths

            info = read_sidecar(sample_paths(self.data_dir, name)[1])
            return {k: int(v) for k, v in info["finding_labels"].items()}
        return dict(self.records[name].labels)

    def load(self, name: str):
        from fvlm_core.io import CTVolume, LabelVolume

        if self.is_cache:
            from fvlm_core.data.cache import load_sample

            s = load_sample(self.data_dir, name)
            lab = self.catalog.relabel(s.labels, s.anatomies)
            ct = CTVolume(s.hu.astype(np.float32), s.geometry, source=f"{self.data_dir}/{name}")
            truth = {k: int(v) for k, v in s.finding_labels.items()}
            return ct, LabelVolume(lab, s.geometry, source=ct.source), truth
        record = self.records[name]
        ct = self.reader.read_ct(record)
        lab = self.segment(ct, record)
        source = str(record.mask_path) if self.backend == "labelmap" else f"<{self.backend} segmentation>"
        return ct, LabelVolume(lab, ct.geometry, source=source), dict(record.labels)


def refuse_cache_for_reference(data_dir: str | os.PathLike) -> None:
    """Refuse a `fvlm prepare` cache for the `reference` windows, saying why and what to give."""
    raise ConfigError(
        f"--data {data_dir} is a `fvlm prepare` cache: its volumes hold HU rounded to integers and "
        "floored at -1024 after the project's resampling, so the public eval.py's probabilities cannot "
        "be reproduced from it (the reference keeps [-1150, -1024) HU and resizes the original "
        "array). Give the CT-RATE folder instead (--data /data/CT-RATE --split valid), or evaluate "
        "the cache with the project's windows (--windows centred or shared)."
    )
