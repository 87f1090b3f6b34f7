"""Scoring every volume of a dataset with a model, each volume's scores kept as they come.

:func:`score_dataset` reads each volume of a :class:`~fvlm_training.volume_source.VolumeSource`,
brings it to the model's space (the public eval.py's resizing for the ``reference`` windows, the
project's resampling otherwise), encodes its anatomies and scores the findings; each volume's
scores go into the score journal (:mod:`fvlm_training.score_journal`) at once, and a volume
already there is not encoded again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fvlm_core.errors import DataError, warn
from fvlm_training.label_tables import truth_table
from fvlm_training.score_journal import record_of, scores_of
from fvlm_training.volume_source import VolumeSource, refuse_cache_for_reference


def to_model_space(ct, labels, ms, windows: str):
    """The volume the window planner works on: eval.py's resizing (``reference``), else the
    project's resampling (skipped for a volume already on a model-space grid, e.g. a cache)."""
    from fvlm_core.preprocess import _direction_for, reference_resize, resample_to_model_space

    if windows == "reference":
        return reference_resize(ct, labels, ms)
    g = ct.geometry
    in_model_space = np.allclose(g.spacing_zyx, ms.spacing_zyx) and np.allclose(
        g.direction_matrix, _direction_for(ms.orientation)
    )
    return (ct, labels) if in_model_space else resample_to_model_space(ct, labels, ms)


def score_dataset(
    analyzer,
    data_dir: str | os.PathLike,
    split: str = "valid",
    windows: str = "reference",
    dedupe_scans: bool = False,
    limit: int | None = None,
    masks_dir: str | os.PathLike | None = None,
    progress=None,
    journal=None,
    *,
    findings=None,
    source: VolumeSource | None = None,
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score the findings on every volume: ``(names, scores, truth)``.

    ``windows``: ``reference`` (the public eval.py pipeline), ``centred`` or ``shared``
    (:mod:`fvlm_core.zeroshot.windows`). ``findings``: default the model's. ``source``: the
    volumes, opened already (a RAD-ChestCT or cohort folder with its options); default a
    :class:`VolumeSource` of ``data_dir``. ``scores[label]`` holds one probability per volume,
    NaN where the label's anatomy could not be scored (absent from the volume);
    ``truth[label]`` 0/1 per volume, NaN where the label is missing.
    ``journal``: an :class:`~fvlm_core.journal.ItemJournal` opened with :func:`~fvlm_training.score_journal.scoring_identity`:
    each volume's scores are added to it as soon as they are computed, and a volume already in
    it is not loaded or encoded again (its labels are read afresh: a corrected label table counts).
    """
    findings = list(findings if findings is not None else analyzer.default_findings())
    if source is None:
        source = VolumeSource(
            data_dir,
            analyzer.anatomies,
            split,
            masks_dir,
            dedupe_scans,
            limit,
            findings=[f.name for f in findings],
        )
    if windows == "reference" and source.is_cache:
        refuse_cache_for_reference(data_dir)
    reused = [n for n in source.names if journal is not None and n in journal]
    if reused and progress:
        progress(f"{len(reused)} of {len(source)} volume(s) scored earlier, kept in {journal.path}", 0.0)
    emb = analyzer.finding_embeddings(findings) if len(reused) < len(source) else None  # once
    ms = analyzer.model_space
    from fvlm_core.segmentation.plausibility import check_intensities

    names: list[str] = []
    rows: list[dict[str, float]] = []
    truths: list[dict[str, int | None]] = []
    misfit: list[tuple[str, Any]] = []  # (volume, anatomy whose intensities do not fit its tissue)
    for i, name in enumerate(source.names):
        if journal is not None and name in journal:
            row, truth = scores_of(journal[name]), source.truth(name)
            how = "scored earlier"
        else:
            ct, labels, truth = source.load(name)
            ct, labels = to_model_space(ct, labels, ms, windows)
            misfit += [(name, f) for f in check_intensities(ct.array, labels.array, analyzer.anatomies)]
            enc = analyzer.encode_model_space(ct, labels, strategy=windows)
            probs = analyzer.score(enc, emb)
            row = {f.name: probs.get((f.anatomy, f.name), float("nan")) for f in findings}
            if journal is not None:
                journal.add(name, record_of(row))
            how = f"{len(enc.plans)} window(s)"
        rows.append(row)
        names.append(name)
        truths.append(truth)
        if progress:
            progress(f"{name}: {how}", (i + 1) / max(len(source), 1))
    if not names:
        raise DataError(f"--data {data_dir}: no volumes to score")
    if misfit:  # a mask of another scan, or misaligned: named in the report's notes
        source.notes.append(_misfit_note(misfit))
        warn(source.notes[-1])
    scores = {f.name: np.asarray([r[f.name] for r in rows], dtype=float) for f in findings}
    return names, scores, truth_table(truths, scores)


def _misfit_note(misfit: Sequence[tuple[str, Any]]) -> str:
    """The note on volumes whose segmentation does not fit their CT (:mod:`fvlm_core.segmentation.plausibility`)."""
    volumes = sorted({name for name, _ in misfit})
    name, first = misfit[0]
    return (
        f"{len(volumes)} volume(s) have a segmentation whose intensities do not fit its anatomies (a mask of "
        f"another scan, or misaligned?), e.g. {name}: {first.describe()}. Their scores are kept; check the masks "
        f"of: {', '.join(volumes[:10])}{' ...' if len(volumes) > 10 else ''}."
    )
