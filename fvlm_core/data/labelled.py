"""Labelled CT datasets: the folder layouts ``fvlm evaluate`` and ``fvlm prepare`` read, behind
one small interface.

Layouts (:func:`detect_layout` tells them apart from the folder; a ``fvlm prepare`` cache is
read by :class:`~fvlm_core.data.cache.CacheSamples` instead):

- ``ctrate``: the CT-RATE release (``dataset/``, ``metadata/``, ...): :class:`~fvlm_core.data.ctrate.CTRATEReader`.
- ``radchest``: RAD-ChestCT as distributed (NPZ files and the abnormality x location label CSV):
  :class:`~fvlm_core.data.radchest.RadChestReader`.
- ``cohort``: your own cohort, CTs in any format the project reads plus one CSV with a row per
  scan: :class:`~fvlm_core.data.cohort.CohortReader`.

A reader (:func:`open_dataset`) offers ``records`` (:class:`~fvlm_core.data.ctrate.VolumeRecord`:
name, path, ``labels`` finding -> 0/1 or ``None`` when missing, report or ``None``, mask file),
``skipped`` (``(name, reason)`` of listed scans that cannot be used), ``notes`` (what it assumed
or left out, for the report), ``masks_dir``, ``layout`` and ``read_ct(record)`` (the CT in HU on
a correct LPS grid). Evaluation wraps it as ``names`` + ``load(name) -> (ct, labels, truth)``
(``training/volume_source.py``'s ``VolumeSource``); ``fvlm prepare`` builds one cached sample per record.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.errors import ConfigError, DataError
from fvlm_core.findings import CTRATE_LABELS

#: Layout -> the name used in reports.
LAYOUT_NAMES = {"ctrate": "CT-RATE", "radchest": "RAD-ChestCT", "cohort": "labelled cohort"}

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


def detect_layout(root: str | os.PathLike, labels: str | os.PathLike | None = None) -> str:
    """``"ctrate"``, ``"radchest"`` or ``"cohort"``: which layout ``root`` (with ``labels``, the
    label CSV given on its own) is in.

    Raises:
        DataError: no such folder, or nothing that looks like a labelled dataset.
    """
    from fvlm_core.data.radchest import LABEL_CSV_SUFFIX, is_radchest_header

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder.")
    if labels is not None:
        if not Path(labels).is_file():
            raise DataError(f"--labels {labels}: no such file.")
        return "radchest" if is_radchest_header(csv_header(labels)) else "cohort"
    if (root / "dataset").is_dir() and (root / "metadata").is_dir():
        return "ctrate"
    if any(root.glob(f"*{LABEL_CSV_SUFFIX}")):
        return "radchest"
    if any(root.glob("*.csv")):
        return "cohort"
    raise DataError(
        f"{root}: not a dataset folder this project reads. Expected one of: a CT-RATE release "
        "(dataset/, metadata/, multi_abnormality_labels/ ...); RAD-ChestCT (its NPZ files and "
        f"*{LABEL_CSV_SUFFIX}); a folder of CTs (NIfTI, NRRD, MHA, DICOM series folders) with one "
        "labels CSV (give --labels FILE when the CSV lies elsewhere); or a `fvlm prepare` cache."
    )


@dataclass(frozen=True)
class DatasetOptions:
    """How to read a labelled folder (:func:`open_dataset`).

    Attributes:
        split: CT-RATE split (``train`` / ``valid``).
        labels: the label CSV when it is not (or not the only one) in the folder.
        masks: folder of anatomy label maps named like the scans (default CT-RATE: ``anatomy_masks``).
        radchest_mapping: ``hlip`` or ``location`` (:data:`~fvlm_core.data.radchest.RADCHEST_MAPPINGS`).
        findings: finding names a cohort CSV's columns are matched to, besides the 18 CT-RATE
            labels (e.g. the free-text findings of a prompts file).
        require_reports: CT-RATE: skip volumes without a report (training needs the text).
        check_files: look at every scan file's header before the work (unusable ones: ``skipped``).
    """

    split: str = "valid"
    labels: str | None = None
    masks: str | None = None
    radchest_mapping: str = "hlip"
    findings: tuple[str, ...] = ()
    require_reports: bool = False
    check_files: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetOptions:
        return cls(**{k: (tuple(v) if k == "findings" else v) for k, v in d.items()})


def open_dataset(root: str | os.PathLike, options: DatasetOptions | None = None) -> Any:
    """The reader of the labelled folder ``root`` (see the module docstring), by its layout."""
    from fvlm_core.data.cohort import CohortReader
    from fvlm_core.data.ctrate import CTRATEReader
    from fvlm_core.data.radchest import RadChestReader

    o = options or DatasetOptions()
    masks = Path(o.masks) if o.masks else None
    layout = detect_layout(root, o.labels)
    if layout == "ctrate":
        if o.labels:
            raise ConfigError(
                f"--labels {o.labels}: a CT-RATE folder's labels are its multi_abnormality_labels CSV; "
                "--labels names the label CSV of a RAD-ChestCT or cohort folder."
            )
        return CTRATEReader(Path(root), o.split, masks, require_reports=o.require_reports)
    if layout == "radchest":
        return RadChestReader(
            Path(root), o.labels and Path(o.labels), masks, o.radchest_mapping, o.check_files
        )
    findings = tuple(dict.fromkeys([*CTRATE_LABELS, *o.findings]))
    return CohortReader(Path(root), o.labels and Path(o.labels), masks, findings, o.check_files)
