"""What the analysis of one CT returns: per anatomy, per finding, similarity maps; JSON and files.

:class:`AnalysisResult` is the one result type of the library. ``fvlm analyze`` writes its
:meth:`~AnalysisResult.to_dict` as the results JSON, the 3D Slicer module's worker hands it to the
panel with :meth:`~AnalysisResult.save` / :meth:`~AnalysisResult.load`, and the module keeps its
JSON with the scene; outputs built on an analysis (DICOM SEG / SR) read it.

Exactness: ``AnalysisResult.from_dict(result.to_dict())`` gives back every field except the
arrays (the similarity maps' voxels and the anatomy label map: their place and size are in the
JSON); :meth:`~AnalysisResult.load` of a :meth:`~AnalysisResult.save` folder gives back
everything. Floats are written as Python's shortest exact repr, so nothing is rounded.

Field meanings a consumer needs:

* an anatomy's ``status`` is ``present``, ``partial`` (cut by the field of view: scored on the
  visible part) or ``absent``; ``scored`` says whether it was embedded; ``box_zyx`` its bounding
  box on the CT grid (``[[z0, y0, x0], [z1, y1, x1]]``, ends exclusive);
* a finding's ``raw_score`` is ``softmax([v.t_neg, v.t_pos] / tau)[1]`` (None: not scored);
  ``probability`` the calibrated probability where the model holds a calibration (else None);
  ``value`` the number to read (the probability, else the raw score, an *uncalibrated score*);
  ``threshold`` is on ``value``'s scale, ``raw_threshold`` on the raw one; ``flagged`` is
  ``raw_score > raw_threshold``;
* ``labelmap`` (arrays only): ``(Z, Y, X)`` uint8 on the CT grid, anatomy ``i`` of
  ``anatomies`` = ``i + 1``: what was analysed;
* ``embeddings`` (kept when asked, :class:`AnatomyEmbeddings`): the scored anatomies' embeddings
  with the model identity and windows they were made with, what an embedding store
  (``fvlm embed``) holds for a scan, so that the analysis can be searched against one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.boxes import nonzero_box
from fvlm_core.errors import InputError
from fvlm_core.geometry import Geometry

#: What an uncalibrated raw score is called wherever it is shown (never "probability").
UNCALIBRATED = "uncalibrated score"
_METHODS = {"platt": "Platt", "isotonic": "isotonic"}
RESULT_FILE = "result.json"
LABELS_FILE = "anatomy_labels.npy"


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class FindingResult:
    """One finding scored on one anatomy (``raw_score`` None: the anatomy was not scored).

    ``probability`` is the calibrated probability (None when the finding has no calibration, or
    was not scored); ``threshold`` is on the scale of :attr:`value` (calibrated probability, else
    raw score) and ``raw_threshold`` on the raw scale; ``flagged`` is ``raw_score > raw_threshold``,
    which equals ``probability > threshold`` (the calibration is strictly increasing).
    """

    name: str
    raw_score: float | None
    threshold: float
    threshold_source: str  # "calibrated" (model config) | "default" (0.5)
    flagged: bool
    source: str = "ctrate"  # "ctrate" | "user"
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    raw_threshold: float = 0.5
    probability: float | None = None
    calibration: str = "none"  # "platt" | "isotonic" | "none"
    calibration_note: str = ""  # why the raw score is kept (empty when calibrated)

    @property
    def calibrated(self) -> bool:
        return self.calibration != "none"

    @property
    def scored(self) -> bool:
        return self.raw_score is not None

    @property
    def value(self) -> float | None:
        """The number to read: the calibrated probability, else the raw score."""
        return self.probability if self.calibrated else self.raw_score

    @property
    def scale(self) -> str:
        """``"probability"`` or ``"uncalibrated score"``: what :attr:`value` is."""
        return "probability" if self.calibrated else UNCALIBRATED

    @property
    def scale_text(self) -> str:
        """``probability (Platt)`` / ``probability (isotonic)`` / ``uncalibrated score``."""
        return f"probability ({_METHODS[self.calibration]})" if self.calibrated else UNCALIBRATED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scale": self.scale,
            "value": _float(self.value),
            "probability": _float(self.probability),
            "raw_score": _float(self.raw_score),
            "threshold": float(self.threshold),
            "raw_threshold": float(self.raw_threshold),
            "threshold_source": self.threshold_source,
            "flagged": bool(self.flagged),
            "calibration": self.calibration,
            "calibration_note": self.calibration_note,
            "source": self.source,
            "positive": list(self.positive),
            "negative": list(self.negative),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FindingResult:
        """The inverse of :meth:`to_dict` (``scale`` and ``value`` are derived, not read)."""
        return cls(
            name=d["name"],
            raw_score=_float(d.get("raw_score")),
            threshold=float(d["threshold"]),
            threshold_source=d.get("threshold_source", "default"),
            flagged=bool(d["flagged"]),
            source=d.get("source", "ctrate"),
            positive=tuple(d.get("positive", ())),
            negative=tuple(d.get("negative", ())),
            raw_threshold=float(d.get("raw_threshold", d["threshold"])),
            probability=_float(d.get("probability")),
            calibration=d.get("calibration", "none"),
            calibration_note=d.get("calibration_note", ""),
        )


@dataclass
class AnatomyResult:
    """One anatomy of the model (see the module docstring for ``status`` and ``box_zyx``)."""

    name: str
    status: str  # "present" | "partial" (cut by the field of view) | "absent"
    volume_ml: float
    voxels: int = 0
    scored: bool = False
    window: int | None = None  # index into AnalysisResult.windows
    note: str = ""
    findings: list[FindingResult] = field(default_factory=list)
    box_zyx: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    @property
    def flagged(self) -> list[FindingResult]:
        return [f for f in self.findings if f.flagged]

    @property
    def max_flagged_value(self) -> float:
        """The highest value (probability or uncalibrated score) of a flagged finding (0: none)."""
        return max((f.value for f in self.flagged), default=0.0)

    @property
    def box(self) -> tuple[slice, ...] | None:
        """``box_zyx`` as index slices into the CT grid."""
        if self.box_zyx is None:
            return None
        return tuple(slice(a, b) for a, b in zip(*self.box_zyx))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "volume_ml": float(self.volume_ml),
            "voxels": int(self.voxels),
            "scored": self.scored,
            "window": self.window,
            "note": self.note,
            "box_zyx": None if self.box_zyx is None else [list(self.box_zyx[0]), list(self.box_zyx[1])],
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnatomyResult:
        box = d.get("box_zyx")
        return cls(
            name=d["name"],
            status=d["status"],
            volume_ml=float(d["volume_ml"]),
            voxels=int(d.get("voxels", 0)),
            scored=bool(d.get("scored", False)),
            window=d.get("window"),
            note=d.get("note", ""),
            findings=[FindingResult.from_dict(f) for f in d.get("findings", [])],
            box_zyx=None if box is None else (tuple(box[0]), tuple(box[1])),
        )


@dataclass
class AnatomyMap:
    """A similarity map cropped to where it is non-zero: the tokens that touch its anatomy.

    Attributes:
        start: ``(z, y, x)`` CT index of ``values[0, 0, 0]``.
        size: ``(z, y, x)`` size of the box.
        shape: the CT grid's shape ``(Z, Y, X)``.
        values: float32 box of raw token scores in [0, 1] (0 where no token of the anatomy is),
            ``None`` for a map read from JSON only.
    """

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    shape: tuple[int, int, int]
    values: np.ndarray | None = None

    @classmethod
    def from_full(cls, array: np.ndarray) -> AnatomyMap:
        """Crop a map on the whole CT grid to its non-zero box (lossless: :meth:`full` restores it)."""
        box = nonzero_box(array) or tuple(slice(0, 0) for _ in array.shape)
        values = np.ascontiguousarray(array[box], dtype=np.float32)
        return cls(tuple(b.start for b in box), values.shape, tuple(array.shape), values)

    def crop(self, box: tuple[slice, ...]) -> np.ndarray:
        """The map's values in ``box`` of the CT grid (0 where the map box does not reach)."""
        out = np.zeros([b.stop - b.start for b in box], dtype=np.float32)
        src, dst = [], []
        for b, s, n in zip(box, self.start, self.size):
            lo, hi = max(b.start, s), min(b.stop, s + n)
            if hi <= lo:
                return out
            src.append(slice(lo - s, hi - s))
            dst.append(slice(lo - b.start, hi - b.start))
        out[tuple(dst)] = self.values[tuple(src)]
        return out

    def full(self) -> np.ndarray:
        """The map on the whole CT grid."""
        return self.crop(tuple(slice(0, n) for n in self.shape))


@dataclass
class AnatomyEmbeddings:
    """The anatomy embeddings one analysis computed, as an embedding store keeps a scan's.

    Attributes:
        vectors: anatomy -> ``(D,)`` float32, the encoder's embedding of each scored anatomy
            (bit for bit what ``fvlm embed`` stores for the same CT, model and windows).
        model: the model's identity as a store records it
            (:meth:`fvlm_core.store.format.ModelIdentity.to_dict`: weights SHA-256, config
            without thresholds); ``{}`` when unknown.
        windows, max_window_zyx: the window strategy and size cap they were encoded with.

    A store compares ``model``, ``windows`` and ``max_window_zyx`` with its own before it
    compares vectors (:meth:`fvlm_core.store.format.EmbeddingStore.check_identity`). In JSON a
    vector is the base64 text of its little-endian float32 bytes (exact, and 4/3 the size).
    """

    vectors: dict[str, np.ndarray]
    model: dict[str, Any] = field(default_factory=dict)
    windows: str = "shared"
    max_window_zyx: tuple[int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "windows": self.windows,
            "max_window_zyx": None if self.max_window_zyx is None else list(self.max_window_zyx),
            "vectors": {
                name: base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                for name, v in self.vectors.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnatomyEmbeddings:
        cap = d.get("max_window_zyx")
        return cls(
            vectors={
                name: np.frombuffer(base64.b64decode(text), dtype="<f4")
                for name, text in d.get("vectors", {}).items()
            },
            model=dict(d.get("model") or {}),
            windows=str(d.get("windows", "shared")),
            max_window_zyx=None if cap is None else tuple(int(v) for v in cap),
        )


def _map_key(entry: dict[str, Any]) -> tuple[str, str]:
    return (entry["anatomy"], entry["finding"])


@dataclass
class AnalysisResult:
    """What the analysis of one CT returns (see the module docstring).

    Attributes:
        anatomies: one :class:`AnatomyResult` per model anatomy, in the model's order.
        similarity_maps: ``(anatomy, finding) -> AnatomyMap`` (flagged findings, or all scored).
        geometry: the CT grid.
        windows: the model-space windows encoded (one encoder forward each).
        timings: seconds per stage (``read``, ``segment``, ``load_model``, ``preprocess``,
            ``embed``, ``score``, ``localize`` as far as they ran).
        notes: messages for the user (default thresholds, anatomies not scored, ...).
        warnings: the library's warnings about this input, as they were printed.
        model, device: the model folder and the torch device.
        ct: where the CT was read from; ``dicom_series``: the series UID read from a DICOM folder.
        segmentation: ``{"source": backend or file, "details": {...}}``: how the anatomies were found.
        map_files: ``(anatomy, finding) -> file`` of maps written by :meth:`write_maps`.
        labelmap: the anatomy label map analysed (kept when asked; see the module docstring).
        embeddings: the anatomy embeddings (kept when asked), :class:`AnatomyEmbeddings`.
    """

    anatomies: list[AnatomyResult]
    similarity_maps: dict[tuple[str, str], AnatomyMap] = field(default_factory=dict)
    geometry: Geometry | None = None
    windows: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    device: str = ""
    map_files: dict[tuple[str, str], str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ct: str = ""
    dicom_series: str | None = None
    segmentation: dict[str, Any] = field(default_factory=dict)
    labelmap: np.ndarray | None = None
    embeddings: AnatomyEmbeddings | None = None

    def anatomy(self, name: str) -> AnatomyResult:
        for a in self.anatomies:
            if a.name == name:
                return a
        raise KeyError(name)

    def finding(self, anatomy: str, name: str) -> FindingResult:
        for f in self.anatomy(anatomy).findings:
            if f.name == name:
                return f
        raise KeyError(f"{name!r} on {anatomy!r}")

    @property
    def flagged(self) -> list[tuple[str, FindingResult]]:
        return [(a.name, f) for a in self.anatomies for f in a.findings if f.flagged]

    @property
    def anatomy_names(self) -> list[str]:
        return [a.name for a in self.anatomies]

    def write_maps(
        self, directory: str | os.PathLike, suffix: str = ".nii.gz"
    ) -> dict[tuple[str, str], Path]:
        """Write every similarity map as a float32 volume on the CT grid (NIfTI by default)."""
        from fvlm_core.zeroshot.similarity import map_filenames, write_map

        if self.geometry is None:
            raise InputError("this result has no CT geometry; similarity maps cannot be written")
        out = {}
        names = map_filenames(list(self.similarity_maps), suffix)  # distinct, even for alike names
        for (anat, name), amap in self.similarity_maps.items():
            path = write_map(amap.full(), self.geometry, Path(directory) / names[(anat, name)])
            out[(anat, name)] = path
            self.map_files[(anat, name)] = str(path)
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``fvlm analyze``'s results file); see the module docstring."""
        out: dict[str, Any] = {
            "model": self.model,
            "device": self.device,
            "anatomies": [a.to_dict() for a in self.anatomies],
            "flagged": [
                {"anatomy": a, "finding": f.name, "scale": f.scale, "value": _float(f.value)}
                for a, f in self.flagged
            ],
            "similarity_maps": [
                {
                    "anatomy": a,
                    "finding": n,
                    "file": self.map_files.get((a, n)),
                    "start_zyx": list(m.start),
                    "size_zyx": list(m.size),
                }
                for (a, n), m in self.similarity_maps.items()
            ],
            "windows": [w.to_dict() for w in self.windows],
            "timings_s": {k: float(v) for k, v in self.timings.items()},
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "ct": self.ct,
            "geometry": None if self.geometry is None else self.geometry.to_dict(),
            "segmentation": dict(self.segmentation),
        }
        if self.geometry is not None:
            out["ct_spacing_mm"] = list(self.geometry.spacing)
        if self.dicom_series:
            out["dicom_series"] = self.dicom_series
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisResult:
        """The inverse of :meth:`to_dict` (map voxels and the label map stay unread: :meth:`load`)."""
        from fvlm_core.zeroshot.windows import WindowPlan

        geometry = Geometry.from_dict(d["geometry"]) if d.get("geometry") else None
        shape = geometry.shape_zyx if geometry is not None else (0, 0, 0)
        maps = {
            _map_key(m): AnatomyMap(tuple(m["start_zyx"]), tuple(m["size_zyx"]), shape)
            for m in d.get("similarity_maps", [])
        }
        files = {_map_key(m): m["file"] for m in d.get("similarity_maps", []) if m.get("file")}
        return cls(
            anatomies=[AnatomyResult.from_dict(a) for a in d["anatomies"]],
            similarity_maps=maps,
            geometry=geometry,
            windows=[WindowPlan.from_dict(w) for w in d.get("windows", [])],
            timings={k: float(v) for k, v in d.get("timings_s", {}).items()},
            notes=list(d.get("notes", [])),
            model=d.get("model", ""),
            device=d.get("device", ""),
            map_files=files,
            warnings=list(d.get("warnings", [])),
            ct=d.get("ct", ""),
            dicom_series=d.get("dicom_series"),
            segmentation=dict(d.get("segmentation", {})),
            embeddings=AnatomyEmbeddings.from_dict(d["embeddings"]) if d.get("embeddings") else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> AnalysisResult:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``result.json``, one ``map_<i>.npy`` per similarity map and, when kept, the
        label map (``anatomy_labels.npy``) into ``folder``, all or nothing: a new folder, in a
        folder that exists (the folder above is never made: a caller that deleted it to give the
        work up must not see it come back)."""
        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"{folder}: exists; a result is saved into a new folder")
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            doc = self.to_dict()
            for i, (entry, amap) in enumerate(zip(doc["similarity_maps"], self.similarity_maps.values())):
                entry["array"] = f"map_{i}.npy"
                np.save(partial / entry["array"], np.ascontiguousarray(amap.values, dtype=np.float32))
            if self.labelmap is not None:
                np.save(partial / LABELS_FILE, np.ascontiguousarray(self.labelmap, dtype=np.uint8))
            (partial / RESULT_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
            partial.rename(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = False) -> AnalysisResult:
        """Read a :meth:`save` folder; ``mmap``: arrays are memory-mapped (read when touched)."""
        folder = Path(folder)
        doc = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        result = cls.from_dict(doc)
        mode = "r" if mmap else None
        for entry in doc.get("similarity_maps", []):
            if entry.get("array"):
                result.similarity_maps[_map_key(entry)].values = np.load(
                    folder / entry["array"], mmap_mode=mode
                )
        if (folder / LABELS_FILE).exists():
            result.labelmap = np.load(folder / LABELS_FILE, mmap_mode=mode)
        return result
