"""Reader for the CT-RATE layout (the folders and CSVs of the CT-RATE release), and the
model-space sample builder.

Layout (``root``; names and nesting in :mod:`fvlm_core.data.layout`)::

    dataset/{train,valid}/train_1/train_1_a/train_1_a_1.nii.gz
    metadata/{train,validation}_metadata.csv                 geometry + HU rescale (headers are unreliable)
    radiology_text_reports/{train,validation}_reports.csv    VolumeName, Findings_EN, Impressions_EN, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + 18 labels (optional)
    anatomy_masks/{train,valid}/...same names...             optional label maps (+ class_map.json)

A volume name ``train_1_a_1`` is patient 1, scan ``a``, reconstruction 1; one *scan* may have
several reconstructions. Bad rows never stop a long run: a volume listed but missing on disk, or
without a report, is skipped and listed in :attr:`CTRATEReader.skipped`; a file that fails to
load fails only its own sample (see ``fvlm prepare``'s failure summary). Malformed tables (missing
file or columns, duplicate names) raise :class:`~fvlm_core.errors.DataError` at once.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog
from fvlm_core.data.cache import CachedSample
from fvlm_core.data.ctrate_volume import read_ctrate_volume
from fvlm_core.data.layout import SPLITS, scan_id_of, volume_relpath, volume_stem
from fvlm_core.data.readers import LabelCells
from fvlm_core.errors import DataError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.io import CTVolume, LabelVolume
from fvlm_core.preprocess import ModelSpaceConfig, resample_to_model_space
from fvlm_core.reports import decompose_report, extract_labels
from fvlm_core.segmentation.choice import choose_backend, segment

METADATA_REQUIRED = ("VolumeName", "XYSpacing", "ZSpacing", "ImagePositionPatient", "ImageOrientationPatient")
REPORT_REQUIRED = ("VolumeName", "Findings_EN", "Impressions_EN")
LABELS_REQUIRED = ("VolumeName", *CTRATE_LABELS)


def read_table(path: Path, required: Sequence[str], what: str) -> dict[str, dict[str, str]]:
    """Read a CT-RATE CSV keyed by volume name (without ``.nii.gz``).

    Raises:
        DataError: file missing, required columns missing (named), or a volume listed twice.
    """
    if not path.is_file():
        raise DataError(
            f"{path}: {what} CSV not found. Expected the CT-RATE layout: dataset/, metadata/, "
            "radiology_text_reports/ and multi_abnormality_labels/ under the dataset root."
        )
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{path}: {what} CSV lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})."
            )
        rows: dict[str, dict[str, str]] = {}
        dupes: list[str] = []
        for row in reader:
            row = {(k or "").strip(): (v if v is not None else "") for k, v in row.items()}
            key = volume_stem(row["VolumeName"])
            if key in rows:
                dupes.append(key)
            rows[key] = row
    if dupes:
        raise DataError(
            f"{path}: volume name(s) listed more than once: {', '.join(sorted(set(dupes))[:5])}"
            f"{' ...' if len(set(dupes)) > 5 else ''} ({len(dupes)} duplicate rows). Keep one row per volume."
        )
    return rows


@dataclass
class VolumeRecord:
    """One listed volume and its table rows (any layout of :mod:`fvlm_core.data.labelled`).

    ``report``: the report columns (``Findings_EN``, ``Impressions_EN``), ``None`` when the
    dataset has no report for it. ``labels``: finding name -> 0/1, or ``None`` where the value
    is missing (left out of that finding's evaluation). ``scan``: the scan it belongs to, when
    the name does not say it in the CT-RATE way (``train_1_a_1`` -> ``train_1_a``).
    """

    name: str
    split: str
    path: Path
    metadata: dict[str, str]
    report: dict[str, str] | None = None
    labels: dict[str, int | None] | None = None
    mask_path: Path | None = None
    scan: str | None = None

    @property
    def scan_id(self) -> str:
        return self.scan or scan_id_of(self.name)

    @property
    def findings_text(self) -> str:
        return (self.report or {}).get("Findings_EN", "") or ""

    @property
    def impression_text(self) -> str:
        return (self.report or {}).get("Impressions_EN", "") or ""


@dataclass
class CTRATEReader:
    """The tables and files of one split of a CT-RATE-layout dataset.

    Args:
        root: dataset root (holds ``dataset/``, ``metadata/``, ...).
        split: ``"train"`` or ``"valid"``.
        masks_dir: optional folder of anatomy masks (same nesting as ``dataset/``; default
            ``root/anatomy_masks`` when it exists).
        require_reports: the reports CSV must exist and volumes without a report are skipped.

    Attributes:
        records: usable volumes, sorted by name.
        skipped: ``(name, reason)`` of listed volumes that cannot be used.
        has_labels: whether the 18-label CSV exists.
    """

    root: Path
    split: str = "train"
    masks_dir: Path | None = None
    require_reports: bool = True
    records: list[VolumeRecord] = field(default_factory=list, init=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, init=False)
    has_labels: bool = field(default=False, init=False)
    layout: str = field(default="ctrate", init=False)
    notes: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.split not in SPLITS:
            raise DataError(f"split {self.split!r}: choose one of {', '.join(SPLITS)}.")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found.")
        folder, prefix, label_prefix = SPLITS[self.split]
        meta = read_table(self.root / "metadata" / f"{prefix}_metadata.csv", METADATA_REQUIRED, "metadata")
        reports_path = self.root / "radiology_text_reports" / f"{prefix}_reports.csv"
        reports = (
            read_table(reports_path, REPORT_REQUIRED, "reports")
            if self.require_reports or reports_path.exists()
            else {}
        )
        labels_path = self.root / "multi_abnormality_labels" / f"{label_prefix}_predicted_labels.csv"
        labels = read_table(labels_path, LABELS_REQUIRED, "labels") if labels_path.exists() else {}
        self.has_labels = labels_path.exists()
        if self.masks_dir is None and (self.root / "anatomy_masks").is_dir():
            self.masks_dir = self.root / "anatomy_masks"
        vol_dir = self.root / "dataset" / folder
        cells = LabelCells(labels_path)
        for name in sorted(meta):
            path = self._find(vol_dir, name)
            if path is None:
                self.skipped.append((name, f"listed in the metadata but no file under {vol_dir}"))
                continue
            if self.require_reports and name not in reports:
                self.skipped.append((name, "no row in the reports CSV"))
                continue
            lab = None
            if name in labels:  # the rule of every layout: 0/1, missing left out, else an error
                lab = {k: cells.value(labels[name][k], name, k) for k in CTRATE_LABELS}
            self.records.append(
                VolumeRecord(
                    name, self.split, path, meta[name], reports.get(name), lab, self._find_mask(name)
                )
            )
        cells.check()  # every cell that is not a label, named before any work

    @staticmethod
    def _find(base: Path, name: str) -> Path | None:
        for cand in (base / volume_relpath(name), base / f"{name}.nii.gz", base / f"{name}.nii"):
            if cand.exists():
                return cand
        return None

    def _find_mask(self, name: str) -> Path | None:
        if self.masks_dir is None:
            return None
        base = self.masks_dir / SPLITS[self.split][0]
        for b in (base, self.masks_dir):
            found = self._find(b, name)
            if found is not None:
                return found
            if (b / name).is_dir():  # TotalSegmentator per-class mask folder
                return b / name
        return None

    @property
    def scans(self) -> dict[str, list[VolumeRecord]]:
        """Records grouped by scan (``train_1_a``), reconstructions in name order."""
        out: dict[str, list[VolumeRecord]] = {}
        for r in self.records:
            out.setdefault(r.scan_id, []).append(r)
        return out

    def get(self, name: str) -> VolumeRecord:
        for r in self.records:
            if r.name == volume_stem(name):
                return r
        raise DataError(f"{name}: not a usable volume of {self.root} ({self.split}).")

    def read_ct(self, record: VolumeRecord) -> CTVolume:
        """The volume in HU with the metadata's geometry and rescale
        (:func:`~fvlm_core.data.ctrate_volume.read_ctrate_volume`)."""
        return read_ctrate_volume(record.path, record.metadata)

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "split": self.split,
            "volumes": len(self.records),
            "scans": len(self.scans),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }


# ------------------------------------------------------------------------------------------------
# Segmentation source and sample building
# ------------------------------------------------------------------------------------------------

Segmenter = Callable[[CTVolume, VolumeRecord], np.ndarray]


def make_segmenter(
    backend: str = "labelmap",
    catalog: AnatomyCatalog = CTRATE_CATALOG,
    class_map: Mapping[int, str] | str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Segmenter:
    """A function ``(ct, record) -> uint8 anatomy label map on the CT grid`` (catalog values).

    ``labelmap``: the record's mask file (``anatomy_masks/...`` of the layout, or ``masks_dir``),
    read with :class:`fvlm_core.segmentation.LabelMapBackend`; ``class_map`` defaults to the mask
    folder's ``class_map.json`` when present. ``builtin`` / ``totalsegmentator``: segment the CT.
    """
    if backend == "labelmap":
        cmap = class_map
        if cmap is None and masks_dir is not None and (Path(masks_dir) / "class_map.json").is_file():
            cmap = Path(masks_dir) / "class_map.json"

        def from_masks(ct: CTVolume, record: VolumeRecord) -> np.ndarray:
            if record.mask_path is None:
                raise DataError(
                    f"{record.name}: no anatomy mask found (looked under {masks_dir or 'anatomy_masks/'}). "
                    "Pass --masks DIR, or segment with --backend builtin|totalsegmentator."
                )
            cm = cmap
            if cm is None and (record.mask_path.parent / "class_map.json").is_file():
                cm = record.mask_path.parent / "class_map.json"
            return segment(
                ct, catalog, choose_backend("labelmap", labelmap=record.mask_path, class_map=cm)
            ).labelmap

        from_masks.backend = "labelmap"  # type: ignore[attr-defined]
        return from_masks
    be = choose_backend(backend, **options)

    def segment_one(ct: CTVolume, record: VolumeRecord) -> np.ndarray:
        return segment(ct, catalog, be).labelmap

    segment_one.backend = backend  # type: ignore[attr-defined]
    return segment_one


def decompose_texts(
    findings: str, impression: str, anatomies: Sequence[str], name: str = "report"
) -> tuple[dict[str, str], dict[str, bool], dict[str, Any]]:
    """Per-anatomy texts, abnormal flags (the impression states an abnormality, negation-aware) and
    extras from a report (``fvlm_core.reports``).

    Raises:
        DataError / InputError: empty or non-English report (it would silently read as all normal).
    """
    findings, impression = (findings or "").strip(), (impression or "").strip()
    if not findings and not impression:
        raise DataError(f"{name}: the report is empty (no Findings_EN and no Impressions_EN).")
    dec = decompose_report(findings, impression, anatomies=list(anatomies), on_bad_report="error")
    extra = {"abnormal_findings": {k: bool(v) for k, v in getattr(dec, "abnormal_findings", {}).items()}}
    return dict(dec.texts), {k: bool(v) for k, v in dec.abnormal.items()}, extra


def decompose(record: VolumeRecord, anatomies: Sequence[str]) -> tuple[dict[str, str], dict[str, bool], dict]:
    """:func:`decompose_texts` of a record's report."""
    return decompose_texts(record.findings_text, record.impression_text, anatomies, record.name)


def finding_labels_of(record: VolumeRecord) -> tuple[dict[str, int], str]:
    """The finding labels: from the labels CSV when it lists the volume (missing values left
    out), else the 18 CT-RATE labels extracted from the report."""
    if record.labels is not None:
        return {k: int(v) for k, v in record.labels.items() if v is not None}, "labels_csv"

    text = f"{record.findings_text} {record.impression_text}"
    return {k: int(v) for k, v in extract_labels(text).items()}, "extracted"


def build_sample(
    reader: CTRATEReader,
    record: VolumeRecord,
    segmenter: Segmenter,
    catalog: AnatomyCatalog = CTRATE_CATALOG,
    config: Any = None,
    decomposition: Any = None,
) -> CachedSample:
    """Read, fix geometry/HU (metadata), segment, resample to model space, decompose the report.

    ``reader``: any reader of :mod:`fvlm_core.data.labelled` (its ``read_ct``). A record without
    a report (``record.report is None``: RAD-ChestCT, a cohort CSV without a report column) gets
    no texts, so the sample serves evaluation and calibration; training skips its anatomies.

    Args:
        config: a ``fvlm_core.preprocess.ModelSpaceConfig`` (default: the reference one).
        decomposition: the scan's ``fvlm_core.reports.ReportDecomposition`` from fVLM's
            decomposition files (``load_decomposition_files``): its texts and abnormal flags
            replace the rule-based decomposition of the report.

    Returns:
        :class:`CachedSample` with int16 HU and uint8 labels on the model-space grid.
    """
    if record.report is None:  # a dataset without reports: labels only (evaluation, calibration)
        texts, abnormal, extra = {}, {}, {"texts": "none: no report"}
    elif decomposition is not None:
        texts = {a: decomposition.texts[a] for a in catalog.names}
        abnormal = {a: bool(decomposition.abnormal[a]) for a in catalog.names}
        extra = {
            "abnormal_findings": {a: bool(decomposition.abnormal_findings[a]) for a in catalog.names},
            "decomposition": "files",
        }
    else:
        texts, abnormal, extra = decompose(record, catalog.names)  # cheap: fail early on a bad report
    ct = reader.read_ct(record)
    labelmap = segmenter(ct, record)
    finding_labels, label_source = finding_labels_of(record)
    meta = {
        "scan_id": record.scan_id,
        "split": record.split,
        "source": str(record.path),
        "segmentation": getattr(segmenter, "backend", "custom"),
        "mask": str(record.mask_path)
        if record.mask_path and getattr(segmenter, "backend", "") == "labelmap"
        else None,
        "label_source": label_source,
        **extra,
    }
    return model_space_sample(
        record.name,
        ct,
        labelmap,
        texts=texts,
        abnormal=abnormal,
        finding_labels=finding_labels,
        findings=record.findings_text,
        impression=record.impression_text,
        catalog=catalog,
        config=config or ModelSpaceConfig(),
        meta=meta,
    )


def model_space_sample(
    name: str,
    ct: CTVolume,
    labelmap: np.ndarray,
    *,
    texts: Mapping[str, str],
    abnormal: Mapping[str, bool],
    finding_labels: Mapping[str, int],
    findings: str,
    impression: str,
    catalog: AnatomyCatalog = CTRATE_CATALOG,
    config: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> CachedSample:
    """Assemble a :class:`CachedSample`: resample CT + anatomy label map (catalog values, CT grid)
    to model space (``config``; ``None`` keeps the CT's own grid) and attach the texts.
    """
    if config is not None:
        ct, lab = resample_to_model_space(ct, LabelVolume(labelmap.astype(np.uint8), ct.geometry), config)
        labelmap = lab.array
    hu = np.clip(np.rint(ct.array), -1024, 3071).astype(np.int16)
    labels = np.ascontiguousarray(labelmap, dtype=np.uint8)
    counts = np.bincount(labels.reshape(-1), minlength=len(catalog) + 1)
    report = " ".join(t for t in ((findings or "").strip(), (impression or "").strip()) if t)
    full_meta = {
        "scan_id": scan_id_of(name),
        "model_space": config.to_dict() if config is not None else None,
        "catalog": catalog.name,
        "anatomy_voxels": {a: int(counts[i + 1]) for i, a in enumerate(catalog.names)},
        "findings": findings,
        "impression": impression,
        **dict(meta or {}),
    }
    return CachedSample(
        name=name,
        hu=hu,
        labels=labels,
        geometry=ct.geometry,
        anatomies=catalog.names,
        texts=dict(texts),
        abnormal={k: bool(v) for k, v in abnormal.items()},
        finding_labels={k: int(v) for k, v in finding_labels.items()},
        report=report,
        meta=full_meta,
    )
