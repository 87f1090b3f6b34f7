"""Labelled CT datasets: the folder layouts ``fvlm evaluate`` and ``fvlm prepare`` read, behind
one small interface.

Layouts (:func:`detect_layout` tells them apart from the folder; a ``fvlm prepare`` cache is
read by :class:`~fvlm_core.data.cache.CacheSamples` instead):

- ``ctrate``: the CT-RATE release (``dataset/``, ``metadata/``, ...): :class:`~fvlm_core.data.ctrate.CTRATEReader`.
- ``radchest``: RAD-ChestCT as distributed (NPZ files and the abnormality x location label CSV):
  :class:`~fvlm_core.data.radchest.RadChestReader`.
- ``cohort``: your own cohort, CTs in any format the project reads plus one CSV with a row per
  scan: :class:`~fvlm_core.data.cohort.CohortReader`.

What the readers share (the label-cell rule, mask lookup, the reader base) is in
:mod:`fvlm_core.data.readers`. A reader (:func:`open_dataset`) offers ``records`` (:class:`~fvlm_core.data.ctrate.VolumeRecord`:
name, path, ``labels`` finding -> 0/1 or ``None`` when missing, report or ``None``, mask file),
``skipped`` (``(name, reason)`` of listed scans that cannot be used), ``notes`` (what it assumed
or left out, for the report), ``masks_dir``, ``layout`` and ``read_ct(record)`` (the CT in HU on
a correct LPS grid). Evaluation wraps it as ``names`` + ``load(name) -> (ct, labels, truth)``
(``training/volume_source.py``'s ``VolumeSource``); ``fvlm prepare`` builds one cached sample per record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_core.data.cohort import CohortReader
from fvlm_core.data.ctrate import CTRATEReader
from fvlm_core.data.radchest import RadChestReader
from fvlm_core.data.radchest_labels import LABEL_CSV_SUFFIX, is_radchest_header
from fvlm_core.data.readers import csv_header
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.findings import CTRATE_LABELS

#: Layout -> the name used in reports.
LAYOUT_NAMES = {"ctrate": "CT-RATE", "radchest": "RAD-ChestCT", "cohort": "labelled cohort"}


def detect_layout(root: str | os.PathLike, labels: str | os.PathLike | None = None) -> str:
    """``"ctrate"``, ``"radchest"`` or ``"cohort"``: which layout ``root`` (with ``labels``, the
    label CSV given on its own) is in.

    Raises:
        DataError: no such folder, or nothing that looks like a labelled dataset.
    """
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
        radchest_mapping: ``hlip`` or ``location`` (:data:`~fvlm_core.data.radchest_labels.RADCHEST_MAPPINGS`).
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
