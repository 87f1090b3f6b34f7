"""Where the voxels of a 3D grid are in patient space: :class:`Geometry` (ITK / LPS convention).

Conventions used across the project:

* Arrays are numpy arrays in SimpleITK order ``(z, y, x)`` (slowest to fastest axis).
* :class:`Geometry` holds the ITK description of the grid: ``size`` ``(X, Y, Z)``, ``spacing``
  ``(sx, sy, sz)`` in mm, ``origin`` and ``direction`` in LPS patient coordinates (DICOM / ITK).
* ``Geometry.affine_ras`` is the voxel-to-RAS affine with the index ordered ``(i, j, k)`` =
  ``(x, y, z)``, exactly 3D Slicer's ``IJKToRAS`` and nibabel's ``affine``.

No axis is ever flipped or permuted silently: the array is the file's voxel order and the
geometry says where each voxel is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from fvlm_core.errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a 3D grid are in patient space (ITK / LPS convention).

    Attributes:
        size: number of voxels ``(X, Y, Z)`` (ITK order; the array shape is reversed).
        spacing: voxel size in mm ``(sx, sy, sz)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, row-major, columns are the x, y, z axis directions in LPS.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_affine_ras(cls, affine: np.ndarray, shape_zyx: tuple[int, int, int]) -> Geometry:
        """Build a geometry from a voxel(ijk)-to-RAS affine (nibabel / Slicer convention)."""
        affine = np.asarray(affine, dtype=float)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        m = lps[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise GeometryError(f"affine has zero or invalid voxel size {spacing.tolist()}")
        direction = m / spacing
        return cls(
            size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in lps[:3, 3]),
            direction=tuple(float(d) for d in direction.reshape(-1)),
        )

    # --- views ----------------------------------------------------------------------------
    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Shape of the numpy array holding this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k, 1)`` (i = x index) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k, 1)`` (i = x index) to RAS mm: Slicer's IJKToRAS, nibabel's affine."""
        a = self.affine_lps
        a[:3, :] = LPS_TO_RAS @ a[:3, :]
        return a

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_zyx_to_ras(self, index_zyx: Any) -> np.ndarray:
        """RAS position (mm) of array index ``(z, y, x)`` (works on ``(..., 3)`` arrays)."""
        idx = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return idx @ self.affine_ras[:3, :3].T + self.affine_ras[:3, 3]

    def ras_to_index_zyx(self, ras: Any) -> np.ndarray:
        """Continuous array index ``(z, y, x)`` of a RAS position (mm)."""
        inv = np.linalg.inv(self.affine_ras)
        ijk = np.asarray(ras, dtype=float) @ inv[:3, :3].T + inv[:3, 3]
        return ijk[..., ::-1]

    def physical_bounds_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel centres."""
        corners = np.array(
            [
                [i, j, k]
                for i in (0, self.size[0] - 1)
                for j in (0, self.size[1] - 1)
                for k in (0, self.size[2] - 1)
            ],
            dtype=float,
        )
        pts = corners @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]
        return pts.min(axis=0), pts.max(axis=0)

    def sub_grid(self, start_zyx: Sequence[int], shape_zyx: Sequence[int]) -> Geometry:
        """The grid of ``shape_zyx`` voxels whose first voxel is this grid's index ``start_zyx``.

        Same spacing and direction; ``start_zyx`` may lie outside this grid (a padded window).
        """
        start_xyz = np.asarray(start_zyx, dtype=float)[::-1]
        origin = self.affine_lps[:3, :3] @ start_xyz + self.affine_lps[:3, 3]
        return Geometry(
            size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
            spacing=self.spacing,
            origin=tuple(float(o) for o in origin),
            direction=self.direction,
        )

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when both describe the same voxel grid (sizes equal, positions within ``tol`` mm)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry (spacing, origin, direction) onto ``image`` and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def validate(self, source: str = "image") -> None:
        """Raise :class:`GeometryError` if spacing or direction cannot describe a real grid."""
        sp = np.asarray(self.spacing, dtype=float)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise GeometryError(
                f"{source}: voxel spacing {tuple(self.spacing)} is zero, negative or NaN. "
                "Fix the header (e.g. re-export the series) or pass the spacing from the scan's metadata."
            )
        d = self.direction_matrix
        if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
            raise GeometryError(
                f"{source}: direction cosines {tuple(np.round(self.direction, 4))} are not a rotation. "
                "Fix the image header before using it."
            )
        if not np.all(np.isfinite(self.origin)):
            raise GeometryError(f"{source}: origin {tuple(self.origin)} is not finite.")

    def to_dict(self) -> dict[str, list]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Geometry:
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


def check_overlap(moving: Geometry, reference: Geometry, source: str = "image") -> None:
    """Raise :class:`GeometryError` when two grids do not overlap in physical space (LPS boxes
    of their voxel centres, with one voxel of slack)."""
    lo_a, hi_a = moving.physical_bounds_lps()
    lo_b, hi_b = reference.physical_bounds_lps()
    tol = np.maximum(np.asarray(moving.spacing), np.asarray(reference.spacing))
    if np.any(hi_a + tol < lo_b) or np.any(hi_b + tol < lo_a):
        raise GeometryError(
            f"{source}: its grid does not overlap the CT in physical space "
            f"(image spans LPS {np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()}, "
            f"CT spans {np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()}). "
            "Check that the label map belongs to this CT (same patient and scan)."
        )
