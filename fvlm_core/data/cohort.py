"""Your own labelled cohort: a folder of CTs and one CSV with a row per scan.

Layout (``root``)::

    labels.csv          the only CSV in the folder (or give it with --labels FILE)
    scans               NIfTI / NRRD / MHA files or DICOM series folders, at any depth

The CSV: the **first column** names the scan, by id (``p001`` finds ``p001.nii.gz``,
``p001.nrrd``, ... or a DICOM folder ``p001/`` anywhere under ``root``) or by path (relative to
``root`` or to the CSV's folder, or absolute); then **one column per finding**; optionally the
report, as one ``report`` column (split at an ``Impression:`` heading when it has one, else the
whole text is both findings and impression) or ``findings`` and ``impression`` columns (also
CT-RATE's ``Findings_EN`` / ``Impressions_EN``).

**Finding columns** are matched to finding names ignoring case, spaces, ``_`` and ``-``
(``pleural_effusion`` is ``Pleural effusion``); a column that matches none is kept under its own
name and listed in ``unmatched`` (``fvlm evaluate`` refuses it unless a ``--prompts`` finding has
its name or ``--ignore-columns`` names it; ``fvlm prepare`` keeps it as a label of its own).

**Values**: the rule of every layout (:func:`fvlm_core.data.readers.label_value`): ``1`` /
``0`` (also ``1.0`` / ``0.0``, ``true`` / ``false``, ``yes`` / ``no``); a missing value (empty,
``NA``, ``N/A``, ``nan``, ``?``) leaves that scan out of that finding's evaluation, never counted
negative; anything else (``2``, ``-1``, ``0.5``, text) is an error naming every such row and column.

Every CT is put in LPS axis order (:func:`fvlm_core.preprocess.reorient`: a permutation or flip,
no interpolation), the order of the CT-RATE volumes the public pipeline resizes as stored.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from fvlm_core.data.ctrate import VolumeRecord
from fvlm_core.data.readers import MASK_SUFFIXES, LabelCells, LabelledReader, find_mask
from fvlm_core.errors import DataError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.io import CTVolume, read_ct
from fvlm_core.preprocess import reorient

#: Image files a cohort scan may be (a DICOM series is a folder).
SCAN_SUFFIXES = MASK_SUFFIXES
REPORT_COLUMNS = {
    "report": "report",
    "findings": "findings",
    "findings_en": "findings",
    "impression": "impression",
    "impressions": "impression",
    "impressions_en": "impression",
}
_IMPRESSION_HEADING = re.compile(r"\bimpressions?\s*:", re.IGNORECASE)


def normalise(name: str) -> str:
    """A column or finding name for matching: lower case, ``_`` / ``-`` / runs of spaces -> one space."""
    return " ".join(re.sub(r"[_\-\s]+", " ", name).lower().split())


def match_columns(columns: Sequence[str], findings: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """``({column: finding name}, unmatched columns)``; two columns for one finding raise."""
    known = {normalise(f): f for f in findings}
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for c in columns:
        f = known.get(normalise(c))
        if f is None:
            unmatched.append(c)
            continue
        twin = next((k for k, v in matched.items() if v == f), None)
        if twin is not None:
            raise DataError(f"columns {twin!r} and {c!r} are both the finding {f!r}; keep one.")
        matched[c] = f
    return matched, unmatched


def split_report(text: str) -> tuple[str, str]:
    """``(findings, impression)`` of one report text (see the module docstring)."""
    m = _IMPRESSION_HEADING.search(text or "")
    if m is None:
        return text, text
    return text[: m.start()].strip(), text[m.end() :].strip()


@dataclass
class CohortTable:
    """A cohort CSV, read and checked."""

    path: Path
    id_column: str
    label_columns: dict[str, str]  # column -> finding name (unmatched: its own name)
    unmatched: list[str]
    report_columns: dict[str, str]  # column -> "report" | "findings" | "impression"
    rows: list[tuple[int, str, dict[str, int | None], dict[str, str] | None]]  # line, id, labels, report


def read_cohort_csv(path: str | os.PathLike, findings: Iterable[str] = CTRATE_LABELS) -> CohortTable:
    """Read and check a cohort CSV (see the module docstring).

    Raises:
        DataError: unreadable, no rows, an id given twice, two columns of one finding, or a
            value that is not a label.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            body = [(n, row) for n, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the labels CSV ({exc}); save it as UTF-8 CSV.") from exc
    if len(header) < 2 or len(set(header)) != len(header):
        raise DataError(
            f"{path}: a labels CSV needs a scan id/path column then finding columns, each named once "
            f"(header: {', '.join(header) or 'none'})."
        )
    if not body:
        raise DataError(f"{path}: the labels CSV has no rows: the cohort is empty.")
    kinds = {c: REPORT_COLUMNS.get(normalise(c).replace(" ", "_")) for c in header[1:]}
    report = {c: kind for c, kind in kinds.items() if kind is not None}
    columns = [c for c in header[1:] if c not in report]
    matched, unmatched = match_columns(columns, findings)
    label_columns = {c: matched.get(c, c) for c in columns}
    rows, seen = [], {}
    cells = LabelCells(path)
    for n, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}, line {n}: {len(row)} cells for {len(header)} columns.")
        row_cells = dict(zip(header, row))
        scan = row_cells[header[0]].strip()
        if not scan:
            raise DataError(f"{path}, line {n}: no scan in column {header[0]!r}.")
        if scan in seen:
            raise DataError(f"{path}: scan {scan!r} is on lines {seen[scan]} and {n}; keep one row per scan.")
        seen[scan] = n
        labels = {f: cells.value(row_cells[c], scan, c, n) for c, f in label_columns.items()}
        texts = {kind: row_cells[c] for c, kind in report.items()} if report else None
        rows.append((n, scan, labels, texts))
    cells.check()
    return CohortTable(path, header[0], label_columns, unmatched, report, rows)


def _report_of(texts: dict[str, str] | None) -> dict[str, str] | None:
    """CT-RATE's report columns from a row's report cells."""
    if texts is None:
        return None
    if "report" in texts:
        findings, impression = split_report(texts["report"])
    else:
        findings, impression = texts.get("findings", ""), texts.get("impression", "")
    return {"Findings_EN": findings, "Impressions_EN": impression}


def _is_dicom_folder(folder: Path, files: Sequence[str]) -> bool:
    if any(f.lower().endswith(".dcm") for f in files):
        return True
    plain = [f for f in files if "." not in f]
    if not plain:
        return False
    try:
        with open(folder / plain[0], "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _scan_stem(name: str) -> str | None:
    low = name.lower()
    return next((name[: -len(s)] for s in SCAN_SUFFIXES if low.endswith(s)), None)


def scan_index(root: Path, skip: Path | None = None) -> dict[str, list[Path]]:
    """``{name: [paths]}`` of the scans under ``root``: image files by name without suffix,
    DICOM series folders by folder name (``skip``: a folder to leave out, e.g. the masks)."""
    index: dict[str, list[Path]] = {}
    skip_resolved = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip_resolved
        )
        if here != root and _is_dicom_folder(here, filenames):
            index.setdefault(here.name, []).append(here)
            continue
        for f in sorted(filenames):
            stem = _scan_stem(f)
            if stem is not None and not f.startswith("."):
                index.setdefault(stem, []).append(here / f)
    return index


@dataclass
class CohortReader(LabelledReader):
    """A folder of CTs and its labels CSV (see the module docstring).

    Args:
        root: the cohort folder.
        labels: the labels CSV (default: the only ``*.csv`` in ``root``).
        masks_dir: optional anatomy label maps named like the scans (``<name>.nii.gz`` or ``<name>/``).
        findings: finding names the columns are matched to.
        check_files: read every scan file's header before the work (unreadable: ``skipped``).

    Attributes:
        records, skipped, notes: as every reader of :mod:`fvlm_core.data.labelled`.
        table: the CSV (``table.unmatched``: columns that matched no finding).
    """

    root: Path
    labels: Path | None = None
    masks_dir: Path | None = None
    findings: Sequence[str] = CTRATE_LABELS
    check_files: bool = True
    layout: str = field(default="cohort", init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder.")
        self.table = read_cohort_csv(self._csv(), self.findings)
        index = scan_index(self.root, self.masks_dir)
        used: set[Path] = set()
        names: dict[str, int] = {}
        for line, scan, labels, texts in self.table.rows:
            path, why = self._resolve(scan, index)
            if path is None:
                self.skipped.append((scan, why))
                continue
            name = path.name if path.is_dir() else (_scan_stem(path.name) or path.stem)
            if name in names:
                raise DataError(
                    f"{self.table.path}: lines {names[name]} and {line} both name a scan called {name!r}; "
                    "rename one file so that each scan has its own name."
                )
            names[name] = line
            used.add(path)
            why = self._unreadable(path) if self.check_files else None
            if why:
                self.skipped.append((name, why))
                continue
            mask = find_mask(self.masks_dir, name)
            self.records.append(
                VolumeRecord(name, "cohort", path, {}, _report_of(texts), labels, mask, scan=name)
            )
        self.records.sort(key=lambda r: r.name)
        unlisted = sorted(p for paths in index.values() for p in paths if p not in used)
        self.notes = self._describe(unlisted)

    def _csv(self) -> Path:
        if self.labels is not None:
            return Path(self.labels)
        csvs = sorted(self.root.glob("*.csv"))
        if len(csvs) != 1:
            found = ", ".join(p.name for p in csvs) or "none"
            raise DataError(
                f"{self.root}: a cohort folder holds exactly one labels CSV (found: {found}); name it with --labels FILE."
            )
        return csvs[0]

    def _resolve(self, scan: str, index: dict[str, list[Path]]) -> tuple[Path | None, str]:
        """The file or DICOM folder a CSV cell names, or ``(None, why not)``."""
        given = Path(scan)
        bases = [given] if given.is_absolute() else [self.root / given, self.table.path.parent / given]
        for p in bases:
            if p.exists() and (p.is_file() or p.is_dir()) and p != self.root:
                return p, ""
        found = index.get(scan) or index.get(_scan_stem(given.name) or scan, [])
        if len(found) == 1:
            return found[0], ""
        if len(found) > 1:
            return None, f"several scans are named {scan!r}: {', '.join(map(str, found[:3]))}; give its path"
        return None, (
            f"no scan {scan!r} under {self.root} (looked for that path, {scan}.nii.gz / .nrrd / .mha "
            f"files and a DICOM folder {scan}/ at any depth)"
        )

    @staticmethod
    def _unreadable(path: Path) -> str | None:
        if path.is_dir():
            return None  # a DICOM series is checked when it is read
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            return f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})"
        return None

    def _describe(self, unlisted: Sequence[Path]) -> list[str]:
        t = self.table
        renamed = {c: f for c, f in t.label_columns.items() if c != f and c not in t.unmatched}
        lines = [
            f"Cohort: labels from {t.path} (scan column {t.id_column!r}; finding columns "
            + ", ".join(f"{c!r} -> {renamed[c]}" if c in renamed else repr(c) for c in t.label_columns)
            + "). Missing values leave a scan out of that finding; they are never counted negative."
        ]
        if t.unmatched:
            lines.append(
                "Columns that match no known finding (kept under their own names): "
                + ", ".join(t.unmatched)
                + "."
            )
        if not t.report_columns:
            lines.append("No report column: the samples carry labels but no report text.")
        if unlisted:
            lines.append(
                f"{len(unlisted)} scan(s) under {self.root} have no row in the labels CSV: not used "
                f"(e.g. {', '.join(p.name for p in unlisted[:3])})."
            )
        return lines

    def read_ct(self, record: VolumeRecord) -> CTVolume:
        """The CT in HU (``fvlm_core.io.read_ct``), in LPS axis order."""
        return reorient(read_ct(record.path))
