"""A plain, serialisable summary of an analysis (no Slicer, no Qt, no torch).

The worker (thread or subprocess) turns a :class:`fvlm_core.zeroshot.AnalysisResult` into an
:class:`AnalysisSummary`; the MRML side (``results.py``) only reads summaries. That keeps the
display code independent of how and where the model ran, and lets a subprocess hand results
back through a JSON file plus one ``.npy`` file per similarity map.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.atomic import atomic_path, atomic_write_text
from fvlm_core.boxes import nonzero_box

#: What an uncalibrated raw score is called (as ``fvlm_core.zeroshot.analyzer.UNCALIBRATED``).
UNCALIBRATED = "uncalibrated score"
_METHODS = {"platt": "Platt", "isotonic": "isotonic"}


@dataclass(frozen=True)
class FindingRow:
    """One row of the results table.

    ``value`` is what the user reads: the calibrated probability where the model holds a
    calibration of the finding (``calibration`` platt / isotonic), else the raw score, an
    uncalibrated score (NaN: not scored). ``threshold`` is on the scale of ``value``;
    ``raw_score`` and ``raw_threshold`` on the raw scale (similarity maps are on that scale).
    """

    anatomy: str
    finding: str
    value: float
    threshold: float
    flagged: bool
    threshold_source: str = "default"
    status: str = "present"
    raw_score: float = math.nan
    raw_threshold: float = math.nan
    calibration: str = "none"  # "platt" | "isotonic" | "none"
    calibration_note: str = ""  # why the raw score is kept

    def __post_init__(self) -> None:
        if not self.calibrated:  # the value is the raw score: the raw fields default to it
            if math.isnan(self.raw_score):
                object.__setattr__(self, "raw_score", float(self.value))
            if math.isnan(self.raw_threshold):
                object.__setattr__(self, "raw_threshold", float(self.threshold))

    @property
    def calibrated(self) -> bool:
        return self.calibration != "none"

    @property
    def scale(self) -> str:
        """``"probability"`` or ``"uncalibrated score"``: what :attr:`value` is."""
        return "probability" if self.calibrated else UNCALIBRATED

    @property
    def scale_text(self) -> str:
        """``probability (Platt)`` / ``probability (isotonic)`` / ``uncalibrated score``."""
        return f"probability ({_METHODS[self.calibration]})" if self.calibrated else UNCALIBRATED

    @property
    def scored(self) -> bool:
        return not math.isnan(self.value)


@dataclass
class AnatomySummary:
    name: str
    status: str  # 'present' | 'partial' | 'absent'
    volume_ml: float
    findings: list[FindingRow] = field(default_factory=list)
    note: str = ""  # why it was not scored, or scored on part of it (the analyzer's words)

    @property
    def flagged(self) -> list[FindingRow]:
        return [f for f in self.findings if f.flagged]

    @property
    def max_value(self) -> float:
        """Highest value (probability or uncalibrated score) over the anatomy's flagged findings
        (0 when none is flagged)."""
        return max((f.value for f in self.flagged), default=0.0)


@dataclass(frozen=True)
class AnatomyMap:
    """A similarity map as the display uses it: its raw scores inside its anatomy's bounding
    box, 0 on the box's voxels outside the anatomy (and implicitly everywhere else).

    Only this box crosses from the worker to the display, not the CT-sized map.

    Attributes:
        start: ``(z, y, x)`` CT index of ``values[0, 0, 0]``.
        values: float32 ``(z, y, x)`` box.
        shape: the CT grid's shape ``(Z, Y, X)``.
    """

    start: tuple[int, int, int]
    values: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def inside(
        cls, array: np.ndarray, anatomy_mask: np.ndarray, box: tuple[slice, ...] | None = None
    ) -> AnatomyMap | None:
        """``array`` (CT grid) inside ``anatomy_mask`` (``box``: its bounding box, if known); None if empty."""
        box = nonzero_box(anatomy_mask) if box is None else box
        if box is None:
            return None
        values = np.asarray(array, dtype=np.float32)[box] * anatomy_mask[box]  # float32 stays float32
        return cls(tuple(b.start for b in box), values, tuple(array.shape))

    @property
    def box(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.values.shape))

    def full(self) -> np.ndarray:
        """The map on the whole CT grid (0 outside the anatomy)."""
        out = np.zeros(self.shape, dtype=np.float32)
        out[self.box] = self.values
        return out


@dataclass
class AnalysisSummary:
    """What the display needs from an analysis."""

    anatomies: list[AnatomySummary]
    similarity_maps: dict[tuple[str, str], AnatomyMap] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    model_dir: str = ""
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[FindingRow]:
        return [f for a in self.anatomies for f in a.findings]

    def anatomy(self, name: str) -> AnatomySummary | None:
        return next((a for a in self.anatomies if a.name == name), None)

    # --- from the analyzer ------------------------------------------------------------------
    @classmethod
    def from_result(
        cls,
        result: Any,
        device: str = "",
        model_dir: str = "",
        labelmap: np.ndarray | None = None,
        catalog: Any = None,
    ) -> AnalysisSummary:
        """Summarise a ``fvlm_core.zeroshot.AnalysisResult`` (``anatomies`` of ``AnatomyResult``).

        Its similarity maps are kept inside their anatomies (:class:`AnatomyMap`): ``labelmap``
        (the CT's anatomy labels, values of ``catalog``, an ``AnatomyCatalog``) is needed when
        the result has maps.
        """
        anatomies = []
        for a in result.anatomies:
            rows = [_row(a, f) for f in a.findings]
            note = str(getattr(a, "note", "") or "")
            anatomies.append(AnatomySummary(a.name, str(a.status), float(a.volume_ml or 0.0), rows, note))
        maps: dict[tuple[str, str], AnatomyMap] = {}
        masks: dict[str, tuple[np.ndarray, tuple[slice, ...] | None]] = {}  # one per anatomy
        for (anatomy, finding), array in (getattr(result, "similarity_maps", None) or {}).items():
            if labelmap is None or catalog is None:
                raise ValueError("from_result: a result with similarity maps needs the label map and catalog")
            if anatomy not in masks:
                mask = labelmap == catalog.label(anatomy)
                masks[anatomy] = (mask, nonzero_box(mask))
            mask, box = masks[anatomy]
            if box is not None:  # an anatomy without voxels has nothing to show
                maps[(str(anatomy), str(finding))] = AnatomyMap.inside(array, mask, box)
        timings = {str(k): float(v) for k, v in (getattr(result, "timings", None) or {}).items()}
        notes = [str(n) for n in (getattr(result, "notes", None) or [])]
        return cls(anatomies, maps, timings, device=device, model_dir=model_dir, notes=notes)

    # --- files (for the subprocess worker) -------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``summary.json`` and ``map_<i>.npy`` files into ``folder`` (atomically).

        A map's file holds its :class:`AnatomyMap` box; the JSON its start and the CT grid's shape.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        maps = []
        for i, ((anatomy, finding), amap) in enumerate(self.similarity_maps.items()):
            name = f"map_{i}.npy"
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
                # contiguous: np.save writes a strided view element by element (10x slower)
                np.save(fh, np.ascontiguousarray(amap.values, dtype=np.float32))
            maps.append(
                {
                    "anatomy": anatomy,
                    "finding": finding,
                    "file": name,
                    "start": [int(v) for v in amap.start],
                    "shape": [int(v) for v in amap.shape],
                }
            )
        doc = {
            "anatomies": [
                {
                    "name": a.name,
                    "status": a.status,
                    "volume_ml": a.volume_ml,
                    "findings": [asdict(f) for f in a.findings],
                    "note": a.note,
                }
                for a in self.anatomies
            ],
            "similarity_maps": maps,
            "timings": self.timings,
            "device": self.device,
            "model_dir": self.model_dir,
            "notes": self.notes,
        }
        return atomic_write_text(folder / "summary.json", json.dumps(doc, indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> AnalysisSummary:
        folder = Path(folder)
        doc = json.loads((folder / "summary.json").read_text())
        anatomies = [
            AnatomySummary(
                a["name"],
                a["status"],
                float(a["volume_ml"]),
                [FindingRow(**f) for f in a["findings"]],
                a.get("note", ""),
            )
            for a in doc["anatomies"]
        ]
        maps = {
            (m["anatomy"], m["finding"]): AnatomyMap(
                tuple(m["start"]), np.load(folder / m["file"]), tuple(m["shape"])
            )
            for m in doc["similarity_maps"]
        }
        return cls(
            anatomies,
            maps,
            doc.get("timings", {}),
            doc.get("device", ""),
            doc.get("model_dir", ""),
            doc.get("notes", []),
        )


def _number(v: float | None) -> float:
    # None: the anatomy could not be scored (absent, or cut by the field of view)
    return math.nan if v is None else float(v)


def _row(anatomy: Any, f: Any) -> FindingRow:
    """A ``fvlm_core.zeroshot.FindingResult`` of ``anatomy`` as a table row."""
    return FindingRow(
        anatomy=anatomy.name,
        finding=f.name,
        value=_number(f.value),
        threshold=float(f.threshold),
        flagged=bool(f.flagged),
        threshold_source=str(f.threshold_source),
        status=str(anatomy.status),
        raw_score=_number(f.raw_score),
        raw_threshold=float(f.raw_threshold),
        calibration=str(f.calibration),
        calibration_note=str(f.calibration_note),
    )
