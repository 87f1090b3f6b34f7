"""RAD-ChestCT's labels (Draelos et al., 2021) as CT-RATE findings: its abnormality x location CSV.

The CSV's abnormality x location labels are reduced to CT-RATE finding names by
:data:`RADCHEST_MAPPINGS` (the maximum over the abnormality's location columns). ``hlip`` is the
public mapping of HLIP (github:Zch0414/hlip, ``data/rad_chestct/notebooks/merge_label.ipynb``
then ``map_label.ipynb``: any location, ``calcification`` feeding both calcification labels,
15 CT-RATE names) plus ``Lymphadenopathy`` (a direct counterpart HLIP leaves out; fVLM does not
score it: no anatomy). ``location`` restricts the generic abnormalities by location:
calcification of the heart -> coronary, of the aorta -> arterial wall, a hernia at the
diaphragm/esophagus/stomach -> hiatal. CT-RATE findings without a counterpart: Medical material
(the release splits devices into a dozen abnormalities) and Mosaic attenuation pattern.

The volumes and the reader of a RAD-ChestCT folder are in :mod:`fvlm_core.data.radchest`; this
module needs no image library, so ``--help`` and :func:`~fvlm_core.data.labelled.detect_layout`
read the table's names without them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fvlm_core.data.readers import LabelCells
from fvlm_core.errors import DataError

ID_COLUMN = "NoteAcc_DEID"
LABEL_CSV_SUFFIX = "_Abnormality_and_Location_Labels.csv"


@dataclass(frozen=True)
class Counterpart:
    """The RAD-ChestCT abnormalities whose labels make one CT-RATE finding (positive when any
    is positive), at ``locations`` only (``None``: at any location)."""

    abnormalities: tuple[str, ...]
    locations: tuple[str, ...] | None = None


_DIRECT = {
    "Emphysema": "emphysema",
    "Atelectasis": "atelectasis",
    "Lung nodule": "nodule",
    "Lung opacity": "opacity",
    "Pulmonary fibrotic sequela": "fibrosis",
    "Pleural effusion": "pleural_effusion",
    "Peribronchial thickening": "bronchial_wall_thickening",
    "Consolidation": "consolidation",
    "Bronchiectasis": "bronchiectasis",
    "Interlobular septal thickening": "septal_thickening",
    "Cardiomegaly": "cardiomegaly",
    "Pericardial effusion": "pericardial_effusion",
    "Lymphadenopathy": "lymphadenopathy",
}

#: CT-RATE finding -> its RAD-ChestCT counterpart, per mapping (see the module docstring).
RADCHEST_MAPPINGS: dict[str, dict[str, Counterpart]] = {
    "hlip": {
        **{k: Counterpart((v,)) for k, v in _DIRECT.items()},
        "Coronary artery wall calcification": Counterpart(("calcification",)),
        "Arterial wall calcification": Counterpart(("calcification",)),
        "Hiatal hernia": Counterpart(("hernia",)),
    },
    "location": {
        **{k: Counterpart((v,)) for k, v in _DIRECT.items()},
        "Coronary artery wall calcification": Counterpart(("calcification",), ("heart",)),
        "Arterial wall calcification": Counterpart(("calcification",), ("aorta",)),
        "Hiatal hernia": Counterpart(("hernia",), ("diaphragm", "esophagus", "stomach")),
    },
}

#: CT-RATE findings no RAD-ChestCT abnormality stands for.
NO_COUNTERPART = ("Medical material", "Mosaic attenuation pattern")


def is_radchest_header(header: Sequence[str]) -> bool:
    """Whether a CSV header is RAD-ChestCT's: ``NoteAcc_DEID`` then ``abnormality*location`` columns."""
    return len(header) > 1 and header[0].strip() == ID_COLUMN and all("*" in c for c in header[1:])


def _any(values: Sequence[int | None]) -> int | None:
    """A finding from its locations' labels: 1 if any is 1, 0 if all are 0, else not known."""
    if 1 in values:
        return 1
    return None if None in values else 0


def _columns_of(
    header: Sequence[str], mapping: Mapping[str, Counterpart], path: Path
) -> dict[str, list[int]]:
    """Per CT-RATE finding, the indices of the CSV columns its counterpart reads."""
    by_abnormality: dict[str, list[tuple[str, int]]] = {}
    for i, column in enumerate(header[1:], start=1):
        abnormality, _, location = column.strip().partition("*")
        by_abnormality.setdefault(abnormality, []).append((location, i))
    out: dict[str, list[int]] = {}
    for finding, cp in mapping.items():
        idx = [
            i
            for a in cp.abnormalities
            for loc, i in by_abnormality.get(a, [])
            if cp.locations is None or loc in cp.locations
        ]
        if not idx:
            want = ", ".join(f"{a}*{'|'.join(cp.locations or ('*',))}" for a in cp.abnormalities)
            raise DataError(
                f"{path}: no column for {finding} ({want}). Is this an unmodified RAD-ChestCT "
                "abnormality x location CSV? (With --radchest-mapping location the location names "
                "must be the release's, e.g. calcification*heart.)"
            )
        out[finding] = idx
    return out


def read_radchest_labels(
    path: str | os.PathLike, mapping: str = "hlip"
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """``({NoteAcc_DEID: {CT-RATE finding: 0/1 or None}}, abnormalities without a counterpart)``
    of one abnormality x location CSV. Values follow the rule of every layout
    (:func:`~fvlm_core.data.readers.label_value`; a finding is 1 when any of its locations is,
    0 when all are 0, else not known); cells that are not labels, an accession listed twice, a
    missing column or another header raise :class:`DataError`."""
    path = Path(path)
    if mapping not in RADCHEST_MAPPINGS:
        raise DataError(f"--radchest-mapping {mapping!r}: choose one of {', '.join(RADCHEST_MAPPINGS)}.")
    table = RADCHEST_MAPPINGS[mapping]
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = csv.reader(fh)
            header = next(rows, [])
            if not is_radchest_header(header):
                raise DataError(
                    f"{path}: not a RAD-ChestCT label CSV (its header must be {ID_COLUMN} then "
                    f"abnormality*location columns; found {', '.join(header[:4]) or 'nothing'} ...)."
                )
            columns = _columns_of(header, table, path)
            truth: dict[str, dict[str, int | None]] = {}
            cells = LabelCells(path)
            for n, row in enumerate(rows, start=2):
                if not row or not row[0].strip():
                    continue
                acc = row[0].strip()
                if acc in truth:
                    raise DataError(f"{path}: {acc} is listed twice (line {n}); keep one row per scan.")
                if len(row) != len(header):
                    raise DataError(f"{path}, line {n} ({acc}): {len(row)} cells for {len(header)} columns.")
                truth[acc] = {
                    f: _any([cells.value(row[i], acc, header[i], n) for i in idx])
                    for f, idx in columns.items()
                }
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the label CSV ({exc}).") from exc
    cells.check()
    used = {a for cp in table.values() for a in cp.abnormalities}
    other = sorted({c.partition("*")[0] for c in header[1:]} - used)
    return truth, other
