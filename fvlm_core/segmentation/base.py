"""Anatomy segmentations on a CT grid, their per-anatomy facts, and the backend interface
(:class:`SegmentationBackend`; :mod:`fvlm_core.segmentation.choice` builds one by name).

Rule for ``cut_by_fov``: an anatomy is cut by the field of view when at least one voxel of its
mask lies on any of the six faces of the volume (in practice mostly the first or last axial
slice). Such an anatomy is only partly imaged, so its volume is a lower bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog
from fvlm_core.errors import ConfigError, GeometryError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, write_image

#: progress callback: ``callback(step_description, fraction_done in [0, 1])``.
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class AnatomyFacts:
    """What a segmentation says about one anatomy."""

    name: str
    label: int
    voxels: int
    volume_ml: float
    present: bool
    cut_by_fov: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "voxels": self.voxels,
            "volume_ml": round(self.volume_ml, 3),
            "present": self.present,
            "cut_by_fov": self.cut_by_fov,
        }


def _face_labels(labelmap: np.ndarray) -> np.ndarray:
    """Label values found on any of the six faces of a 3D array."""
    faces = [
        labelmap[0],
        labelmap[-1],
        labelmap[:, 0],
        labelmap[:, -1],
        labelmap[:, :, 0],
        labelmap[:, :, -1],
    ]
    return np.unique(np.concatenate([f.ravel() for f in faces]))


def compute_facts(
    labelmap: np.ndarray, geometry: Geometry, catalog: AnatomyCatalog
) -> dict[str, AnatomyFacts]:
    """Voxel count, volume (ml), presence and field-of-view cut of every anatomy of ``catalog``.

    Args:
        labelmap: ``(Z, Y, X)`` integer array, anatomy ``i`` of ``catalog`` = ``i + 1``.
        geometry: its grid (voxel volume = product of the spacing).
    """
    labelmap = np.asarray(labelmap)
    if tuple(labelmap.shape) != geometry.shape_zyx:
        raise GeometryError(
            f"label map shape {labelmap.shape} does not match its geometry {geometry.shape_zyx}"
        )
    counts = np.bincount(labelmap.ravel().astype(np.int64), minlength=len(catalog) + 1)
    on_face = set(_face_labels(labelmap).tolist()) if labelmap.size else set()
    vml = geometry.voxel_volume_ml
    facts = {}
    for i, anatomy in enumerate(catalog.anatomies):
        n = int(counts[i + 1])
        facts[anatomy.name] = AnatomyFacts(
            name=anatomy.name,
            label=i + 1,
            voxels=n,
            volume_ml=n * vml,
            present=n > 0,
            cut_by_fov=n > 0 and (i + 1) in on_face,
        )
    return facts


@dataclass
class AnatomySegmentation:
    """An anatomy label map on a CT's grid.

    Attributes:
        labelmap: ``(Z, Y, X)`` uint8, anatomy ``i`` of ``catalog`` = ``i + 1``, 0 = background.
        geometry: the CT's grid.
        catalog: which anatomy each value is.
        facts: per-anatomy :class:`AnatomyFacts` (see :func:`compute_facts`).
        backend: name of the backend that produced it.
        classes: optional extra masks (``(Z, Y, X)`` bool) a backend offers beyond the catalog,
            e.g. the built-in segmenter's ``lung_left``, ``lung_right``, ``body``, ``airways``.
        details: JSON-ready facts about how the backend produced it (options, stage times,
            class-to-anatomy mapping; ``details["notes"]``: human-readable lines for the user).
    """

    labelmap: np.ndarray
    geometry: Geometry
    catalog: AnatomyCatalog
    facts: dict[str, AnatomyFacts]
    backend: str
    classes: dict[str, np.ndarray] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_labelmap(
        cls,
        labelmap: np.ndarray,
        geometry: Geometry,
        catalog: AnatomyCatalog,
        backend: str,
        classes: Mapping[str, np.ndarray] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AnatomySegmentation:
        """Wrap an anatomy label map and compute its facts."""
        lm = np.ascontiguousarray(labelmap, dtype=np.uint8)
        if lm.size and int(lm.max()) > len(catalog):
            raise ConfigError(
                f"label map holds value {int(lm.max())} but catalog {catalog.name!r} has only {len(catalog)} anatomies"
            )
        facts = compute_facts(lm, geometry, catalog)
        return cls(lm, geometry, catalog, facts, backend, dict(classes or {}), dict(details or {}))

    def mask(self, name: str) -> np.ndarray:
        """Bool ``(Z, Y, X)`` mask of a catalog anatomy (or of an extra class in ``classes``)."""
        if name not in self.catalog and name in self.classes:
            return np.asarray(self.classes[name], dtype=bool)
        return self.labelmap == self.catalog.label(name)

    @property
    def present(self) -> list[str]:
        return [n for n, f in self.facts.items() if f.present]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: backend, catalog, grid, per-anatomy facts (and the backend's details)."""
        summary = {
            "backend": self.backend,
            "catalog": self.catalog.name,
            "shape_zyx": list(self.geometry.shape_zyx),
            "spacing_mm": list(self.geometry.spacing),
            "anatomies": [f.to_dict() for f in self.facts.values()],
            "extra_classes": {
                k: round(float(np.count_nonzero(v)) * self.geometry.voxel_volume_ml, 3)
                for k, v in self.classes.items()
            },
        }
        if self.details:
            summary["details"] = self.details
        return summary

    def save(self, path: str | os.PathLike) -> Path:
        """Write the anatomy label map on the CT grid (atomic; format from the suffix)."""
        return write_image(self.labelmap, self.geometry, path)


@runtime_checkable
class SegmentationBackend(Protocol):
    """What a segmentation backend is: a ``name`` (its key in
    :data:`fvlm_core.segmentation.choice.BACKENDS`) and a ``segment`` method. The backends
    (:mod:`~fvlm_core.segmentation.builtin`, :mod:`~fvlm_core.segmentation.labelmap`,
    :mod:`~fvlm_core.segmentation.totalseg`) satisfy it by their shape; a caller may pass any
    object that does."""

    name: str

    def segment(
        self, ct: CTVolume, catalog: AnatomyCatalog = CTRATE_CATALOG, progress: Progress | None = None
    ) -> AnatomySegmentation:
        """Segment ``ct`` into the anatomies of ``catalog`` on the CT's own grid."""
        ...
