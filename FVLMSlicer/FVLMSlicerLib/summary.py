"""A plain, serialisable summary of an analysis (no Slicer, no Qt, no torch).

The worker (thread or subprocess) turns a :class:`fvlm_core.zeroshot.AnalysisResult` into an
:class:`AnalysisSummary`; the MRML side (``results.py``) only reads summaries. That keeps the
display code independent of how and where the model ran, and lets a subprocess hand results
back through a JSON file plus one ``.npy`` file per similarity map.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.atomic import atomic_path, atomic_write_text


@dataclass(frozen=True)
class FindingRow:
    """One row of the results table."""

    anatomy: str
    finding: str
    probability: float
    threshold: float
    flagged: bool
    threshold_source: str = "default"
    status: str = "present"


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
    def max_probability(self) -> float:
        """Highest probability over the anatomy's flagged findings (0 when none is flagged)."""
        return max((f.probability for f in self.flagged), default=0.0)


@dataclass
class AnalysisSummary:
    """What the display needs from an analysis."""

    anatomies: list[AnatomySummary]
    similarity_maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
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
    def from_result(cls, result: Any, device: str = "", model_dir: str = "") -> AnalysisSummary:
        """Summarise a ``fvlm_core.zeroshot.AnalysisResult`` (``anatomies`` of ``AnatomyResult``)."""
        anatomies = []
        for a in result.anatomies:
            rows = [
                FindingRow(
                    anatomy=a.name,
                    finding=f.name,
                    # None: the anatomy could not be scored (absent, or cut by the field of view)
                    probability=float("nan") if f.probability is None else float(f.probability),
                    threshold=float(f.threshold),
                    flagged=bool(f.flagged),
                    threshold_source=str(getattr(f, "threshold_source", "default")),
                    status=str(a.status),
                )
                for f in a.findings
            ]
            note = str(getattr(a, "note", "") or "")
            anatomies.append(AnatomySummary(a.name, str(a.status), float(a.volume_ml or 0.0), rows, note))
        maps = {
            (str(k[0]), str(k[1])): np.asarray(v, dtype=np.float32)
            for k, v in (getattr(result, "similarity_maps", None) or {}).items()
        }
        timings = {str(k): float(v) for k, v in (getattr(result, "timings", None) or {}).items()}
        notes = [str(n) for n in (getattr(result, "notes", None) or [])]
        return cls(anatomies, maps, timings, device=device, model_dir=model_dir, notes=notes)

    # --- files (for the subprocess worker) -------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``summary.json`` and ``map_<i>.npy`` files into ``folder`` (atomically).

        A map is stored cropped to its non-zero box (it is 0 outside its anatomy's window), with
        the box's start and the full shape in the JSON.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        maps = []
        for i, ((anatomy, finding), array) in enumerate(self.similarity_maps.items()):
            name = f"map_{i}.npy"
            start, crop = _nonzero_box(np.asarray(array, dtype=np.float32))
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, crop)
            maps.append(
                {
                    "anatomy": anatomy,
                    "finding": finding,
                    "file": name,
                    "start": start,
                    "shape": list(array.shape),
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
        maps = {(m["anatomy"], m["finding"]): _uncrop(folder, m) for m in doc["similarity_maps"]}
        return cls(
            anatomies,
            maps,
            doc.get("timings", {}),
            doc.get("device", ""),
            doc.get("model_dir", ""),
            doc.get("notes", []),
        )


def _nonzero_box(array: np.ndarray) -> tuple[list[int], np.ndarray]:
    """``(start, array[box])`` for the smallest box holding every non-zero value."""
    lo, hi = [], []
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        hit = np.flatnonzero(np.any(array != 0, axis=others))
        if not hit.size:
            return [0] * array.ndim, array[tuple(slice(0, 0) for _ in array.shape)]
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return lo, array[tuple(slice(a, b) for a, b in zip(lo, hi))]


def _uncrop(folder: Path, entry: dict) -> np.ndarray:
    crop = np.load(folder / entry["file"])
    if "shape" not in entry:  # written uncropped
        return crop
    out = np.zeros(entry["shape"], dtype=np.float32)
    out[tuple(slice(a, a + n) for a, n in zip(entry["start"], crop.shape))] = crop
    return out
