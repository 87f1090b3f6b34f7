"""Score and label tables as CSV: one row per volume (``VolumeName``), one column per label.

``scores.csv`` (what ``fvlm evaluate`` writes and ``--scores`` reads back: a probability per
label, empty where the label's anatomy could not be scored) and ground-truth label tables
(``--labels``, e.g. CT-RATE's multi_abnormality_labels: 0/1, empty where missing).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fvlm_core.data.layout import volume_stem
from fvlm_core.errors import DataError


def score_table_csv(scores: Mapping[str, Sequence[float]], volume_names: Sequence[str]) -> str:
    """A score table as CSV text: ``VolumeName`` and one column per label (empty = not scored)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["VolumeName", *scores])
    columns = [np.asarray(v, dtype=float) for v in scores.values()]
    for i, name in enumerate(volume_names):
        writer.writerow([name, *("" if math.isnan(c[i]) else repr(float(c[i])) for c in columns)])
    return buf.getvalue()


def _read_csv(path: str | os.PathLike, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a CSV with a ``VolumeName`` column (cells stripped)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV {what} ({exc})") from exc
    if "VolumeName" not in columns:
        raise DataError(f"{path}: a {what} needs a VolumeName column, found {columns}")
    if not rows:
        raise DataError(f"{path}: the {what} has a header but no rows: there is nothing to evaluate.")
    return [c for c in columns if c != "VolumeName"], rows


def _number(cell: str) -> float:
    """A CSV cell as a float: empty or ``nan`` -> NaN; raises ValueError for text."""
    return float("nan") if cell == "" or cell.lower() == "nan" else float(cell)


def read_score_table(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """A CSV with ``VolumeName`` and one probability column per label (empty / NaN = not scored)."""
    from fvlm_core.findings import same_name_groups

    labels, rows = _read_csv(path, "score table")
    clash = same_name_groups(labels)
    if clash:
        raise DataError(
            f"{path}: columns named alike ({'; '.join(' and '.join(map(repr, g)) for g in clash)}): labels that "
            "differ only in case, spaces or punctuation would share their report entries and files. Rename or "
            "merge them."
        )
    scores: dict[str, np.ndarray] = {}
    for lbl in labels:
        try:
            scores[lbl] = np.asarray([_number(r[lbl]) for r in rows], dtype=float)
        except ValueError as exc:
            raise DataError(
                f"{path}: column {lbl!r} holds a value that is not a probability ({exc})"
            ) from exc
    return [r["VolumeName"] for r in rows], scores


def read_label_table(
    path: str | os.PathLike, volume_names: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Ground truth for ``volume_names`` from a label CSV (``VolumeName`` + one column per label,
    e.g. CT-RATE's multi_abnormality_labels): label -> ``(N,)`` 0/1, NaN where missing.

    Volumes match by name with or without ``.nii.gz``; a volume listed twice counts once (its
    first row). ``labels``: the columns to read (the score table's; those the CSV lacks are left
    out); None: every column of numbers (text columns are left out). Cells follow
    the rule of every layout (:func:`fvlm_core.data.readers.label_value`): 1, 0, or missing
    (left out of that label); any other value in a column read is an error naming each row and
    column, raised before any work.
    """
    from fvlm_core.data.readers import MISSING_VALUES, LabelCells

    columns, rows = _read_csv(path, "label table")
    by_name: dict[str, tuple[int, dict[str, str]]] = {}
    for line, r in enumerate(rows, start=2):
        by_name.setdefault(volume_stem(r["VolumeName"]), (line, r))
    absent = [v for v in volume_names if volume_stem(v) not in by_name]
    if absent:
        raise DataError(f"{path}: no labels for {len(absent)} scored volume(s), e.g. {absent[:3]}")

    def numeric(column: str) -> bool:  # numbers (labels or not) and missing cells: not a text column
        try:
            for r in rows:
                if r[column].strip().lower() not in MISSING_VALUES:
                    float(r[column])
        except ValueError:
            return False
        return True

    wanted = [c for c in columns if numeric(c)] if labels is None else [c for c in labels if c in columns]
    cells = LabelCells(path)
    chosen = [by_name[volume_stem(v)] for v in volume_names]
    out = {}
    for c in wanted:
        values = [cells.value(r[c], r["VolumeName"], c, line) for line, r in chosen]
        out[c] = np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)
    cells.check()
    return out


def truth_table(truths: Sequence[Mapping[str, int | None]], labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Per label of ``labels`` that some volume has, its 0/1 per volume (NaN: missing)."""
    return {
        lbl: np.asarray([np.nan if t.get(lbl) is None else float(t[lbl]) for t in truths], dtype=float)
        for lbl in labels
        if any(t.get(lbl) is not None for t in truths)
    }
