"""What every labelled-dataset reader shares (:mod:`fvlm_core.data.labelled` chooses the reader):
the rule of a label cell (:func:`label_value`, :class:`LabelCells`), where a scan's anatomy label
map lies (:func:`find_mask`) and the attributes of a reader (:class:`LabelledReader`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.errors import DataError

#: Files of a label map or CT named after a scan (``<name><suffix>``).
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Label cells (any layout, and ``fvlm evaluate --labels`` tables), compared in lower case.
TRUE_VALUES = ("1", "1.0", "true", "yes")
FALSE_VALUES = ("0", "0.0", "false", "no")
MISSING_VALUES = ("", "na", "n/a", "nan", "?")
LABEL_RULE = (
    "Use 1 (present) or 0 (absent), or leave the cell empty (or NA) where the label is not known: "
    "that scan is then left out of that finding's evaluation, never counted as absent."
)


class LabelValueError(DataError):
    """Cells of a label table that are not labels (:class:`LabelCells`)."""


def label_value(cell: str | None) -> int | None:
    """One label cell by the rule every layout shares: ``1`` / ``0`` (also ``1.0`` / ``0.0``,
    ``true`` / ``false``, ``yes`` / ``no``), ``None`` for a missing value (empty, ``NA``,
    ``N/A``, ``nan``, ``?``). Raises ValueError for anything else (``2``, ``-1``, ``0.5``, text)."""
    v = (cell or "").strip().lower()
    if v in TRUE_VALUES:
        return 1
    if v in FALSE_VALUES:
        return 0
    if v in MISSING_VALUES:
        return None
    raise ValueError(f"{cell!r} is not a label")


class LabelCells:
    """Reads the label cells of one table by :func:`label_value` and collects every cell that is
    not a label, so that one :class:`LabelValueError` names them all (rows and columns) before any work.

    ::

        cells = LabelCells(path)
        labels = {c: cells.value(row[c], row_name, c, line) for c in columns}
        ...
        cells.check()   # raises when any cell was not a label
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.bad: list[tuple[str, str, str]] = []  # (row, column, cell)

    def value(self, cell: str | None, row: str, column: str, line: int | None = None) -> int | None:
        """The label, or None (missing, or not a label: recorded for :meth:`check`)."""
        try:
            return label_value(cell)
        except ValueError:
            where = f"line {line} ({row})" if line is not None else row
            self.bad.append((where, column, cell or ""))
            return None

    def check(self) -> None:
        """Raise one :class:`DataError` naming the cells that are not labels (if any)."""
        if not self.bad:
            return
        columns: dict[str, int] = {}
        for _, column, _ in self.bad:
            columns[column] = columns.get(column, 0) + 1
        shown = "; ".join(f"{row}, column {column!r}: {cell!r}" for row, column, cell in self.bad[:10])
        more = f"; and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
        per_column = ", ".join(f"{c!r} ({n})" for c, n in columns.items())
        raise LabelValueError(
            f"{self.path}: {len(self.bad)} cell(s) are not labels, in column(s) {per_column}: {shown}{more}. "
            f"{LABEL_RULE} Nothing was done."
        )


def find_mask(masks_dir: str | os.PathLike | None, name: str) -> Path | None:
    """The anatomy label map of scan ``name`` in ``masks_dir``: ``<name>.nii.gz`` (or another
    image suffix) or a per-class mask folder ``<name>/`` (TotalSegmentator's output); None when
    there is none."""
    if masks_dir is None:
        return None
    base = Path(masks_dir)
    for suffix in MASK_SUFFIXES:
        if (base / f"{name}{suffix}").is_file():
            return base / f"{name}{suffix}"
    return base / name if (base / name).is_dir() else None


@dataclass
class LabelledReader:
    """The attributes every reader has (:class:`~fvlm_core.data.ctrate.CTRATEReader` too) and
    ``get(name)``; the RAD-ChestCT and cohort readers derive from it."""

    records: list = field(default_factory=list, init=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, init=False)
    notes: list[str] = field(default_factory=list, init=False)
    has_labels: bool = field(default=True, init=False)

    def get(self, name: str) -> Any:
        """The record of scan ``name``."""
        for r in self.records:
            if r.name == name:
                return r
        raise DataError(f"{name}: not a usable scan of {getattr(self, 'root', 'the dataset')}.")


def csv_header(path: str | os.PathLike) -> list[str]:
    """The first row of a CSV (empty when unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
