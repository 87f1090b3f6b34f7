"""Synthetic chest CT cohort in the CT-RATE layout (phantoms with visible findings and reports).

Every phantom is drawn in millimetres on the voxel grid with vectorised numpy (small objects are
drawn inside their own bounding box only), so a 64^3 phantom costs a few tens of milliseconds.
Anatomy: body ellipse (subcutaneous fat, muscle), ribs, sternum, spine, two lungs with vessels and
a domed diaphragm, upper abdomen, heart with epicardial fat, aorta (ascending, arch, descending),
esophagus, trachea and main bronchi.

Patient coordinates are LPS with an identity direction: array ``x`` grows to the patient's left,
``y`` to posterior (the dependent side of a supine patient), ``z`` to superior.

Anatomy masks use the extended catalog's first five values (``fvlm_core.anatomy``): lung 1,
heart 2, esophagus 3, aorta 4 (= the CT-RATE catalog) and trachea 5 (extended catalog; a CT-RATE
catalog reader drops it). Finding-related tissue belongs to its anatomy's mask, so a model that
pools over the mask sees it: pleural effusion is inside "lung" (the pleural space of that
hemithorax), the pericardial sac inside "heart", a hiatal hernia inside "esophagus".

Findings: one :class:`FindingSpec` row each in :data:`FINDINGS` (its anatomy, how it changes the
anatomy's shape and/or paints the tissue, its prevalence, its report section and phrasings).

Determinism: each phantom's random stream is ``SeedSequence([seed, split_id, index])``; the
cohort is byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from fvlm_core.anatomy import CTRATE_CATALOG, get_catalog
from fvlm_core.atomic import atomic_path, atomic_write_text
from fvlm_core.data.ctrate import decompose_texts, model_space_sample
from fvlm_core.data.layout import SPLITS, scan_id_of, volume_relpath
from fvlm_core.errors import InputError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume
from fvlm_core.preprocess import ModelSpaceConfig

#: Label values written in the anatomy masks (extended catalog order; see module docstring).
MASK_VALUES: dict[str, int] = {"lung": 1, "heart": 2, "esophagus": 3, "aorta": 4, "trachea": 5}

#: Fraction of scans drawn fully normal before the independent per-finding draws (so normal
#: reports are common, as in CT-RATE); a finding's overall rate is ``prevalence * (1 - this)``.
DEFAULT_NORMAL_FRACTION = 0.1
#: Calcified plaques are drawn as spheres of this radius: at the demo's 6 mm voxels a smaller
#: spot is one partial-volume voxel, below what the 8-voxel token grid can learn in minutes.
CALCIFICATION_RADIUS_MM = 4.5

#: Fraction of the cohort written to the validation split by default.
DEFAULT_VALID_FRACTION = 0.2

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = (
    "VolumeName",
    "XYSpacing",
    "ZSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "RescaleIntercept",
    "RescaleSlope",
)
#: Stored NIfTI value = HU - RESCALE_INTERCEPT (as CT scanners store it); the metadata CSV has the intercept.
RESCALE_INTERCEPT = -1024


def default_spacing_zyx(size_zyx: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size giving a 288 mm (z) x 360 mm (y, x) field of view, whatever the grid size."""
    return (288.0 / size_zyx[0], 360.0 / size_zyx[1], 360.0 / size_zyx[2])


# ------------------------------------------------------------------------------------------------
# Grid helpers (coordinates in mm, centred on the volume; points are (z, y, x))
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # zyx

    @property
    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).astype(np.float32)
            for n, s in zip(self.shape, self.spacing)
        )

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices covering the mm box [lo, hi] (None when outside the grid)."""
        out = []
        for lo_i, hi_i, n, s in zip(lo, hi, self.shape, self.spacing):
            a = max(math.floor(lo_i / s + (n - 1) / 2.0), 0)
            b = min(math.ceil(hi_i / s + (n - 1) / 2.0) + 1, n)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def sub(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = self.coords
        return z[sl[0]][:, None, None], y[sl[1]][None, :, None], x[sl[2]][None, None, :]


def _segment_distance(grid: _Grid, p0, p1, margin: float):
    """Slices of the bounding box of segment p0-p1 (+margin) and the distance (mm) to it there."""
    p0 = np.asarray(p0, dtype=np.float32)
    p1 = np.asarray(p1, dtype=np.float32)
    sl = grid.box(np.minimum(p0, p1) - margin, np.maximum(p0, p1) + margin)
    if sl is None:
        return None, None
    z, y, x = grid.sub(sl)
    d = p1 - p0
    l2 = float(d @ d) or 1e-6
    t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / l2, 0.0, 1.0)
    dist = np.sqrt((z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2)
    return sl, dist


def _soft_weight(dist: np.ndarray, radius: float, voxel: float) -> np.ndarray:
    """Partial-volume weight in [0, 1] of a solid of ``radius`` (at least ~one voxel stays visible)."""
    radius = max(radius, 0.6 * voxel)
    return np.clip((radius - dist) / voxel + 0.5, 0.0, 1.0)


def _paint_capsule(hu, grid, p0, p1, radius, value, within=None, voxel=None):
    voxel = voxel or min(grid.spacing)
    sl, dist = _segment_distance(grid, p0, p1, radius + voxel)
    if sl is None:
        return
    w = _soft_weight(dist, radius, voxel)
    if within is not None:
        w = w * within[sl]
    region = hu[sl]
    region += (w * (value - region)).astype(np.float32)


def _capsule_mask(mask, grid, p0, p1, radius):
    sl, dist = _segment_distance(grid, p0, p1, radius + max(grid.spacing))
    if sl is not None:
        mask[sl] |= dist <= max(radius, 0.5 * min(grid.spacing))


def _paint_sphere(hu, grid, center, radius, value, within=None):
    _paint_capsule(hu, grid, center, center, radius, value, within)


# ------------------------------------------------------------------------------------------------
# Random parameters of one phantom
# ------------------------------------------------------------------------------------------------


@dataclass
class PhantomParams:
    """Everything random about one phantom (mm, local coordinates centred on the grid).

    Finding parameters are drawn whether or not the finding is present, so toggling one finding
    leaves the rest of the phantom (and the noise) unchanged.
    """

    body_center: tuple[float, float]  # (y, x)
    body_axes: tuple[float, float]  # (b: AP, a: LR) semi-axes
    fat: float
    muscle: float
    contrast: bool
    blood_hu: float
    rib_period: float
    rib_phase: float
    z_base: float  # lung base (right side; left is lower)
    z_apex: float
    left_drop: float
    dome: float
    heart_scale: float
    heart_offset: tuple[float, float, float]
    noise_sigma: float
    vessels: list  # list of (side, p0, p1, radius)
    f: dict[str, Any] = field(default_factory=dict)  # finding parameters


def sample_params(rng: np.random.Generator, grid: _Grid) -> PhantomParams:
    fov_z = grid.shape[0] * grid.spacing[0]
    scale = rng.uniform(0.85, 1.1)
    a = 165.0 * scale * rng.uniform(0.95, 1.05)
    b = 110.0 * scale * rng.uniform(0.92, 1.08)
    z_base = -fov_z / 2 + rng.uniform(0.12, 0.25) * fov_z
    z_apex = fov_z / 2 + rng.uniform(-0.05, 0.1) * fov_z
    p = PhantomParams(
        body_center=(rng.uniform(-12, 12), rng.uniform(-15, 15)),
        body_axes=(b, a),
        fat=rng.uniform(6, 25),
        muscle=rng.uniform(8, 15),
        contrast=bool(rng.random() < 0.3),
        blood_hu=0.0,
        rib_period=rng.uniform(24, 32),
        rib_phase=rng.uniform(0, 1),
        z_base=z_base,
        z_apex=z_apex,
        left_drop=rng.uniform(5, 20),
        dome=rng.uniform(18, 32),
        heart_scale=rng.uniform(0.9, 1.08),
        heart_offset=(rng.uniform(-8, 8), rng.uniform(-6, 6), rng.uniform(-8, 8)),
        noise_sigma=rng.uniform(10, 22),
        vessels=[],
    )
    p.blood_hu = rng.uniform(160, 260) if p.contrast else rng.uniform(35, 50)
    # Lung vessels radiate from each hilum: directions drawn now, clipped to the lung when drawn.
    for side in (-1, 1):
        for _ in range(7):
            direction = rng.normal(size=3) * np.array([1.2, 0.6, 0.8])
            direction[2] = side * abs(direction[2]) + side * 0.6
            direction /= np.linalg.norm(direction)
            length = rng.uniform(50, 110)
            p.vessels.append((side, direction, length, rng.uniform(2.5, 4.5)))
    f = p.f
    f["effusion_side"] = int(rng.choice([-1, 1, 0]))  # -1 right, 1 left, 0 both
    f["effusion_depth"] = rng.uniform(0.25, 0.45)  # fraction of the hemithorax AP depth
    f["emph_blobs"] = [(rng.uniform(0, 1, 3), rng.uniform(16, 28)) for _ in range(9)]
    f["nodules"] = [(rng.uniform(0, 1, 3), rng.uniform(8, 14)) for _ in range(int(rng.integers(1, 4)))]
    f["consol_side"] = int(rng.choice([-1, 1]))
    f["consol"] = [(rng.uniform(0, 1, 3), rng.uniform(28, 40)) for _ in range(2)]
    f["atel_side"] = int(rng.choice([-1, 1]))
    f["atel_thickness"] = rng.uniform(14, 22)
    f["atel_tilt"] = rng.uniform(0.2, 0.6)
    f["cardio_scale"] = rng.uniform(1.25, 1.4)
    f["peri_thickness"] = rng.uniform(8, 14)
    f["aortic_calc"] = [
        (rng.uniform(0, 1), rng.uniform(0, 2 * np.pi), rng.uniform(600, 1000)) for _ in range(12)
    ]
    f["coronary_calc"] = [
        (rng.uniform(-0.6, 0.7), rng.uniform(0.2, 2.9), rng.uniform(500, 900)) for _ in range(8)
    ]
    f["hernia_radius"] = rng.uniform(22, 32)
    f["ggo_side"] = int(rng.choice([-1, 1]))
    f["ggo"] = [(rng.uniform(0, 1, 3), rng.uniform(28, 42)) for _ in range(3)]
    f["nodes"] = [(rng.uniform(-1, 1, 3), rng.uniform(8, 12)) for _ in range(2)]
    f["catheter_side"] = int(rng.choice([-1, 1]))
    return p


# ------------------------------------------------------------------------------------------------
# Normal anatomy
# ------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    """How the drawn findings change the normal anatomy (from the findings' ``shape`` hooks)."""

    heart_scale: float = 1.0  # multiplies the phantom's own heart size
    pericardial_mm: float = 0.0  # width of the fluid-filled pericardial space (0: none)
    hernia_radius_mm: float = 0.0  # stomach above the hiatus, part of the esophagus mask (0: none)


class _Scene:
    """A phantom being drawn: grid, coordinates (mm), landmarks, anatomy masks, HU and labels.

    Built by :func:`_draw_anatomy`; the tissue and the findings are then painted into ``hu``
    (float32 ``(Z, Y, X)``). ``labels`` (uint8 ``(Z, Y, X)``, :data:`MASK_VALUES`) is final once
    built: painters read it to stay inside their anatomy.
    """

    hu: np.ndarray  # float32 (Z, Y, X)
    # chest wall (mm): body centre (by, bx), semi-axes of the thoracic cavity, spine
    by: float
    bx: float
    cav_b: float
    cav_a: float
    spine_y: float
    spine_q: np.ndarray  # (1, Y, X)
    # lungs: side (-1 right, 1 left) -> mask, bounding box lo/hi, centre, axes, hilum, zb/zt
    lungs: dict[int, dict[str, Any]]
    # heart: centre, semi-axes, box, normalised radius q (in the box), pericardial sac
    h_c: np.ndarray
    h_ax: np.ndarray
    h_sl: tuple[slice, slice, slice]
    hq: np.ndarray
    sac: np.ndarray
    # tubes: aorta and esophagus centrelines ((p0, p1, radius) per segment), trachea
    zarch: float
    ant_y: float
    aorta_pts: list[tuple[tuple[float, float, float], tuple[float, float, float], float]]
    eso_pts: list[tuple[Any, Any, float]]
    hernia_c: np.ndarray
    z_top: float
    tr_y: float
    carina: np.ndarray
    # label map and its masks
    labels: np.ndarray
    lung: np.ndarray  # labels == lung
    lungf: np.ndarray  # the same as float32 (a painting weight)
    heart_only: np.ndarray  # labels == heart
    eso: np.ndarray  # labels == esophagus

    def __init__(self, params: PhantomParams, grid: _Grid) -> None:
        self.params = params
        self.grid = grid
        z, y, x = grid.coords
        self.Z = z[:, None, None]
        self.Y2 = y[None, :, None]
        self.X2 = x[None, None, :]
        self.extras: dict[str, Any] = {}

    def ellipse_q(self, cy, cx, sb, sa) -> np.ndarray:
        """Normalised squared radius of an axial ellipse, ``(1, Y, X)`` (<= 1 inside)."""
        return ((self.Y2 - cy) / sb) ** 2 + ((self.X2 - cx) / sa) ** 2

    def heart_q(self, scale: float = 1.0, sl=None) -> np.ndarray:
        """Normalised squared radius of the heart ellipsoid (``scale`` times its axes), in box ``sl``."""
        zz, yy, xx = (self.Z, self.Y2, self.X2) if sl is None else self.grid.sub(sl)
        h_c, h_ax = self.h_c, self.h_ax
        return (
            ((zz - h_c[0]) / (h_ax[0] * scale)) ** 2
            + ((yy - h_c[1]) / (h_ax[1] * scale)) ** 2
            + ((xx - h_c[2]) / (h_ax[2] * scale)) ** 2
        )

    def lung_point(self, side: int, u: np.ndarray) -> np.ndarray:
        """Map u in [0,1]^3 (z, y, x fractions) into the bounding box (mm) of lung ``side``."""
        lo, hi = self.lungs[side]["lo"], self.lungs[side]["hi"]
        return lo + u * (hi - lo)


def _draw_chest_wall(s: _Scene) -> None:
    """Body (fat, muscle, mediastinal tissue), upper abdomen, ribs, sternum and spine into ``s.hu``."""
    p, grid = s.params, s.grid
    Z, Y2, X2 = s.Z, s.Y2, s.X2
    by, bx = p.body_center
    b, a = p.body_axes
    s.by, s.bx = by, bx
    body_q = s.ellipse_q(by, bx, b, a)
    fat_in = s.ellipse_q(by, bx, b - p.fat, a - p.fat)
    cav_b, cav_a = b - p.fat - p.muscle, a - p.fat - p.muscle
    s.cav_b, s.cav_a = cav_b, cav_a
    cav_q = s.ellipse_q(by, bx, cav_b, cav_a)
    hu2 = np.full((1, grid.shape[1], grid.shape[2]), -1000.0, dtype=np.float32)
    hu2[body_q <= 1] = -95.0
    hu2[fat_in <= 1] = 45.0
    hu2[cav_q <= 1] = -40.0  # mediastinal fat / connective tissue
    hu = np.repeat(hu2, grid.shape[0], axis=0)
    s.hu = hu

    # Upper abdomen under the domed diaphragm (liver on the right is higher).
    z_dia_r = p.z_base + p.dome * (1 - np.clip(cav_q, 0, 1))
    z_dia = z_dia_r - p.left_drop * (bx < X2)
    hu[(z_dia > Z) & (cav_q <= 1)] = 55.0

    # Ribs: a shell just inside the chest wall, banded along z, sloping down anteriorly.
    rib_q = s.ellipse_q(by, bx, cav_b + 9, cav_a + 9)
    shell2 = (rib_q <= 1) & (cav_q > 1)
    phase = (Z + 0.35 * (Y2 - by)) / p.rib_period + p.rib_phase
    band = np.cos(2 * np.pi * phase) > 0.55
    hu[band & shell2 & ~((by > Y2) & (np.abs(X2 - bx) < 25))] = 650.0
    # Sternum and spine (vertebral bodies with discs, posterior elements).
    sternum = (np.abs(X2 - bx) < 14) & (by - b + p.fat < Y2) & (by - cav_b + 2 > Y2) & (p.z_base < Z)
    hu[np.broadcast_to(sternum, hu.shape)] = 450.0
    spine_y = by + cav_b - 22.0
    spine_q = ((Y2 - spine_y) / 20.0) ** 2 + ((X2 - bx) / 22.0) ** 2
    s.spine_y, s.spine_q = spine_y, spine_q
    disc = np.cos(2 * np.pi * Z / 28.0) > 0.8
    hu[np.broadcast_to(spine_q <= 1, hu.shape)] = 700.0
    hu[(spine_q <= 0.7) & ~disc] = 260.0
    hu[(spine_q <= 0.7) & disc] = 80.0
    post = (np.abs(X2 - bx) < 7) & (spine_y + 20 < Y2) & (by + b - p.fat - 3 > Y2)
    hu[np.broadcast_to(post, hu.shape)] = 500.0


def _draw_lungs(s: _Scene) -> None:
    """Both lungs: masks (domed bases, the left lower), bounding boxes and hila."""
    p = s.params
    s.lungs = {}
    for side in (-1, 1):  # -1: right (patient right = -x), 1: left
        la, lb = s.cav_a * 0.46, s.cav_b * 0.86
        cx = s.bx + side * s.cav_a * 0.47
        cy = s.by + s.cav_b * 0.05
        zb = p.z_base - (p.left_drop if side == 1 else 0.0)
        zt = p.z_apex
        zmid = zb + 0.45 * (zt - zb)
        q = s.ellipse_q(cy, cx, lb, la)
        t = np.clip((s.Z - zmid) / (zt - zmid), 0, None)
        m = (q + t**2 <= 1) & (zb + p.dome * (1 - np.clip(q, 0, 1)) <= s.Z) & (s.spine_q > 1.3)
        s.lungs[side] = {
            "mask": m,
            "lo": np.array([zb, cy - lb, cx - la], dtype=np.float32),
            "hi": np.array([zt, cy + lb, cx + la], dtype=np.float32),
            "center": (cy, cx),
            "axes": (lb, la),
            "hilum": np.array(
                [zb + 0.55 * (zt - zb), cy - 0.1 * lb, cx - side * 0.55 * la], dtype=np.float32
            ),
            "zb": zb,
            "zt": zt,
        }


def _draw_heart(s: _Scene, shape: _Shape) -> np.ndarray:
    """The heart ellipsoid (bool ``(Z, Y, X)``); sets its landmarks and the pericardial sac."""
    p, grid = s.params, s.grid
    hs = p.heart_scale * shape.heart_scale
    hz, hy, hx = p.heart_offset
    s.h_c = np.array(
        [p.z_base + 50 + hz, s.by - 0.3 * s.cav_b + hy, s.bx + 0.18 * s.cav_a + hx], dtype=np.float32
    )
    s.h_ax = np.array([48 * min(hs, 1.15), 42 * hs, 55 * hs], dtype=np.float32)
    s.extras["heart_center"] = s.h_c
    s.extras["heart_axes"] = s.h_ax
    outer = 1.0 + shape.pericardial_mm / float(s.h_ax.min())
    voxel = min(grid.spacing)
    s.h_sl = grid.box(s.h_c - s.h_ax * outer - voxel, s.h_c + s.h_ax * outer + voxel)
    s.hq = s.heart_q(1.0, s.h_sl)
    heart = np.zeros(grid.shape, dtype=bool)
    heart[s.h_sl] = s.hq <= 1
    s.sac = np.zeros(grid.shape, dtype=bool)
    if shape.pericardial_mm > 0:
        s.sac[s.h_sl] = (s.hq > 1) & (s.heart_q(outer, s.h_sl) <= 1)
    return heart


def _draw_tubes(s: _Scene, shape: _Shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aorta (ascending, arch, descending), esophagus (with any hernia) and trachea: bool masks."""
    p, grid, bx = s.params, s.grid, s.bx
    # Aorta: centreline polyline, radius per segment.
    zarch = p.z_apex - 0.3 * (p.z_apex - p.z_base)
    ant_y = s.h_c[1] + 5
    s.zarch, s.ant_y = zarch, ant_y
    desc_y = s.spine_y - 26
    desc_x = bx + 22
    s.aorta_pts = [
        ((s.h_c[0] + 15, ant_y, bx + 5), (zarch, ant_y - 3, bx - 8), 15.0),
        ((zarch, ant_y - 3, bx - 8), (zarch + 18, (ant_y + desc_y) / 2, bx + 5), 14.0),
        ((zarch + 18, (ant_y + desc_y) / 2, bx + 5), (zarch, desc_y, desc_x), 13.0),
        ((zarch, desc_y, desc_x), (-grid.shape[0] * grid.spacing[0], desc_y + 4, desc_x - 6), 12.0),
    ]
    aorta = np.zeros(grid.shape, dtype=bool)
    for p0, p1, r in s.aorta_pts:
        _capsule_mask(aorta, grid, p0, p1, r)
    s.extras["aorta_segments"] = s.aorta_pts

    # Esophagus (behind the trachea, right of the descending aorta) to the gastro-esophageal junction.
    eso_y = s.spine_y - 28
    z_top = grid.shape[0] * grid.spacing[0]
    s.z_top = z_top
    gej = (p.z_base - 25, eso_y - 20, bx + 35)
    s.eso_pts = [
        ((z_top, eso_y, bx + 2), (p.z_base + 15, eso_y - 4, bx + 8), 8.0),
        ((p.z_base + 15, eso_y - 4, bx + 8), gej, 8.0),
    ]
    esophagus = np.zeros(grid.shape, dtype=bool)
    for p0, p1, r in s.eso_pts:
        _capsule_mask(esophagus, grid, p0, p1, r)
    s.hernia_c = np.array([p.z_base + 12, eso_y - 8, bx + 14], dtype=np.float32)
    if shape.hernia_radius_mm > 0:
        _capsule_mask(esophagus, grid, s.hernia_c, s.hernia_c, shape.hernia_radius_mm)

    # Trachea down to the carina.
    s.tr_y = eso_y - 22
    s.carina = np.array([zarch - 12, s.tr_y + 4, bx], dtype=np.float32)
    trachea = np.zeros(grid.shape, dtype=bool)
    _capsule_mask(trachea, grid, (z_top, s.tr_y, bx), s.carina, 9.0)
    return aorta, esophagus, trachea


def _draw_anatomy(params: PhantomParams, grid: _Grid, shape: _Shape) -> _Scene:
    """The normal anatomy as ``shape`` changes it: chest wall HU, landmarks and the label map."""
    s = _Scene(params, grid)
    _draw_chest_wall(s)
    _draw_lungs(s)
    heart = _draw_heart(s, shape)
    aorta, esophagus, trachea = _draw_tubes(s, shape)
    # Label map: later structures win.
    lung_mask = s.lungs[-1]["mask"] | s.lungs[1]["mask"]
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[lung_mask] = MASK_VALUES["lung"]
    labels[heart | s.sac] = MASK_VALUES["heart"]
    labels[aorta] = MASK_VALUES["aorta"]
    labels[esophagus] = MASK_VALUES["esophagus"]
    labels[trachea] = MASK_VALUES["trachea"]
    s.labels = labels
    s.lung = labels == MASK_VALUES["lung"]
    s.lungf = s.lung.astype(np.float32)
    s.heart_only = labels == MASK_VALUES["heart"]
    s.eso = labels == MASK_VALUES["esophagus"]
    return s


def _paint_tissue(s: _Scene) -> None:
    """Normal tissue HU on the label map: lung parenchyma and vessels, blood, walls, air in the tubes."""
    p, grid, hu, labels = s.params, s.grid, s.hu, s.labels
    # Lung parenchyma: slightly denser posteriorly (gravity), vessels radiating from the hila.
    grad = 40.0 * np.clip((s.Y2 - s.by) / s.cav_b, -1, 1)
    hu[s.lung] = (-860.0 + np.broadcast_to(grad, hu.shape))[s.lung]
    for side, direction, length, radius in p.vessels:
        h = s.lungs[side]["hilum"]
        end = h + direction.astype(np.float32) * length
        _paint_capsule(hu, grid, h, end, radius, p.blood_hu, within=s.lungf)
        mid = h + direction.astype(np.float32) * length * 0.55
        branch = mid + np.roll(direction.astype(np.float32), 1) * length * 0.35
        _paint_capsule(hu, grid, mid, branch, radius * 0.7, p.blood_hu, within=s.lungf)
    for side in (-1, 1):  # main bronchi, drawn in the lung's own mask too
        _paint_capsule(hu, grid, s.carina, s.lungs[side]["hilum"], 6.0, -950.0)

    hu[s.heart_only] = p.blood_hu
    rim = np.zeros(grid.shape, dtype=bool)
    rim[s.h_sl] = (s.hq > 0.8) & (s.hq <= 1)
    hu[rim & s.heart_only] = -90.0  # epicardial fat
    hu[s.sac] = 12.0  # pericardial fluid (the sac is empty without a pericardial effusion)
    hu[labels == MASK_VALUES["aorta"]] = p.blood_hu
    hu[s.eso] = 42.0
    for p0, p1, _ in s.eso_pts:
        _paint_capsule(hu, grid, p0, p1, 2.5, -900.0, within=s.eso.astype(np.float32))
    hu[labels == MASK_VALUES["trachea"]] = 30.0
    _paint_capsule(hu, grid, (s.z_top, s.tr_y, s.bx), s.carina, 7.0, -1000.0)


# ------------------------------------------------------------------------------------------------
# Finding painters: paint(scene, params.f) -> extras for the report (what side, how large)
# ------------------------------------------------------------------------------------------------


def _paint_hiatal_hernia(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Stomach above the hiatus (inside the esophagus mask): air anterior, fluid dependent."""
    r = f["hernia_radius"]
    c = s.hernia_c
    sl = s.grid.box(c - r, c + r)
    zz, yy, xx = s.grid.sub(sl)
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    inside = (d <= r - 3) & s.eso[sl]
    content = np.where(yy < c[1] - 0.1 * r, -950.0, 20.0)
    region = s.hu[sl]
    region[inside] = np.broadcast_to(content, inside.shape)[inside]
    return {}


def _paint_pleural_effusion(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Fluid in the dependent part of one or both hemithoraces (inside the lung mask)."""
    sides = (-1, 1) if f["effusion_side"] == 0 else (f["effusion_side"],)
    for side in sides:
        lung = s.lungs[side]
        cy, _ = lung["center"]
        lb, _ = lung["axes"]
        level = cy + lb * (1 - 2 * f["effusion_depth"])
        zb, zt = lung["zb"], lung["zt"]
        z_lim = zb + 0.5 * (zt - zb)
        # Meniscus: the level rises towards the base.
        m = lung["mask"] & s.lung & (level - 0.2 * np.clip(z_lim - s.Z, 0, None) < s.Y2) & (z_lim > s.Z)
        s.hu[m] = 15.0
    return {"effusion_sides": sides}


def _paint_emphysema(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Near-air blobs in the upper halves of both lungs."""
    for side in (-1, 1):
        for u, r in f["emph_blobs"]:
            c = s.lung_point(side, np.array([0.5 + 0.5 * u[0], u[1], u[2]], dtype=np.float32))
            _paint_sphere(s.hu, s.grid, c, r, -975.0, within=s.lungf)
    return {}


def _paint_consolidation(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Soft-tissue density in the lower posterior part of one lung."""
    side = f["consol_side"]
    for u, r in f["consol"]:
        c = s.lung_point(side, np.array([0.1 + 0.35 * u[0], 0.4 + 0.5 * u[1], u[2]], dtype=np.float32))
        _paint_sphere(s.hu, s.grid, c, r, 35.0, within=s.lungs[side]["mask"] & s.lung)
    return {"consol_side": side}


def _paint_ground_glass(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Ground-glass density (-600 HU) in the upper part of one lung."""
    side = f["ggo_side"]
    for u, r in f["ggo"]:
        c = s.lung_point(side, np.array([0.35 + 0.5 * u[0], 0.2 + 0.6 * u[1], u[2]], dtype=np.float32))
        _paint_sphere(s.hu, s.grid, c, r, -600.0, within=s.lungs[side]["mask"] & s.lung)
    return {"ggo_side": side}


def _paint_atelectasis(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """A tilted band of collapsed lung near the base of one lung."""
    side = f["atel_side"]
    lung = s.lungs[side]
    zb, zt = lung["zb"], lung["zt"]
    cy, _ = lung["center"]
    plane = (s.Z - (zb + 0.2 * (zt - zb))) - f["atel_tilt"] * (s.Y2 - cy)
    band = np.abs(plane) < f["atel_thickness"] / 2
    s.hu[band & lung["mask"] & s.lung] = 30.0
    return {"atel_side": side}


def _paint_nodules(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """One to three solid nodules, alternating right and left lung."""
    sides = []
    for i, (u, r) in enumerate(f["nodules"]):
        side = -1 if i % 2 == 0 else 1
        c = s.lung_point(
            side, np.array([0.2 + 0.6 * u[0], 0.25 + 0.5 * u[1], 0.25 + 0.5 * u[2]], dtype=np.float32)
        )
        _paint_sphere(s.hu, s.grid, c, r, 40.0, within=s.lungf)
        sides.append(side)
    return {"nodule_sides": sides, "nodule_size_mm": 2 * max(r for _, r in f["nodules"])}


def _paint_aortic_calcification(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Calcified plaques in the aortic wall, only where the label map says aorta."""
    aorta_voxels = s.labels == MASK_VALUES["aorta"]
    for t, ang, val in f["aortic_calc"]:
        p0, p1, r = s.aorta_pts[3] if t > 0.45 else s.aorta_pts[int(t / 0.15) % 3]
        p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        tt = (t % 0.45) / 0.45 if t > 0.45 else 0.5
        c0 = p0 + (p1 - p0) * (0.1 + 0.6 * tt)
        axis = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-6)
        u = np.cross(axis, [1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.cross(axis, [0.0, 1.0, 0.0])
        u /= np.linalg.norm(u) + 1e-6
        v = np.cross(axis, u)
        c = c0 + (r - 1.5) * (math.cos(ang) * u + math.sin(ang) * v)
        _paint_sphere(s.hu, s.grid, c, CALCIFICATION_RADIUS_MM, val, within=aorta_voxels)
    return {}


def _paint_coronary_calcification(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Plaques on the upper/anterior heart surface (the coronary grooves), inside the fat rim."""
    for dz, ang, val in f["coronary_calc"]:
        ring = math.sqrt(max(1 - dz * dz, 0.0))
        c = (
            s.h_c
            + s.h_ax * np.array([dz, -ring * math.sin(ang), ring * math.cos(ang)], dtype=np.float32) * 0.93
        )
        _paint_sphere(s.hu, s.grid, c, CALCIFICATION_RADIUS_MM, val, within=s.heart_only)
    return {}


def _paint_lymph_nodes(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """Enlarged nodes around the carina, in the tissue no anatomy mask covers."""
    for u, r in f["nodes"]:
        c = s.carina + np.array([10 * u[0], 15 * u[1] - 5, 25 * u[2]], dtype=np.float32)
        _paint_sphere(s.hu, s.grid, c, r, 40.0, within=(s.labels == 0).astype(np.float32))
    return {}


def _paint_catheter(s: _Scene, f: Mapping[str, Any]) -> dict[str, Any]:
    """A central venous catheter from the subclavian region to the superior vena cava."""
    side = f["catheter_side"]
    p0 = np.array([s.z_top, s.by - 0.2 * s.cav_b, s.bx + side * 40], dtype=np.float32)
    p1 = np.array([s.zarch + 10, s.ant_y - 8, s.bx - 12], dtype=np.float32)
    p2 = np.array([s.h_c[0] + 20, s.ant_y, s.bx - 18], dtype=np.float32)
    _paint_capsule(s.hu, s.grid, p0, p1, 2.0, 1500.0)
    _paint_capsule(s.hu, s.grid, p1, p2, 2.0, 1500.0)
    return {}


# ------------------------------------------------------------------------------------------------
# Reports (CT-RATE style): sections, each with normal phrasings
# ------------------------------------------------------------------------------------------------

_SIDE = {-1: "right", 1: "left", 0: "bilateral"}


@dataclass(frozen=True)
class _Section:
    """One part of the Findings text: its findings' sentences, else one of ``normal``.

    ``heading`` opens the section when it holds findings; with ``rules_out`` an abnormal section
    also states absent findings (each with probability 1/2), as CT-RATE readers of an abnormal
    lung list what they ruled out.
    """

    name: str
    normal: tuple[str, ...]
    heading: str = ""
    rules_out: bool = False


#: Report sections in the order the Findings text lists them.
_SECTIONS: tuple[_Section, ...] = (
    _Section(
        "airway",
        (
            "Trachea and main bronchi are patent.",
            "Both main bronchi and the trachea are open.",
            "The trachea and main bronchi are patent. No occlusive pathology was observed in the lumen.",
        ),
    ),
    _Section(
        "mediastinum",
        (
            "Heart contour and size and the main mediastinal vessels are normal.",
            "Heart contour and size are normal. Mediastinal main vascular structures are normal.",
            "The heart size is within normal limits.",
        ),
    ),
    _Section(
        "aorta",
        (
            "The thoracic aorta is of normal diameter.",
            "The thoracic aorta has a normal calibre and no calcific plaque was observed.",
            "No calcified atherosclerotic plaque was detected in the thoracic aorta.",
        ),
    ),
    _Section(
        "pericardium",
        (
            "No pericardial effusion or thickening was seen.",
            "There is no pericardial effusion or pericardial thickening.",
            "Pericardial effusion or thickening was not detected.",
        ),
    ),
    _Section(
        "coronary",
        (
            "No calcification was observed in the coronary arteries.",
            "No coronary artery calcification was detected.",
        ),
    ),
    _Section(
        "esophagus",
        (
            "The thoracic esophagus has a normal calibre without significant wall thickening.",
            "Calibre of the thoracic esophagus is normal, with no pathological wall thickening.",
            "The esophagus is of normal calibre.",
        ),
    ),
    _Section(
        "nodes",
        (
            "No lymph nodes of pathological size were detected in the prevascular, paratracheal, subcarinal or hilar regions.",
            "No lymph node was observed in the mediastinum and hilar regions in pathological size and appearance.",
        ),
    ),
    _Section(
        "lung",
        (
            "In the lung window, aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the lung parenchyma.",
            "In the lung window, no mass or infiltrative lesion was detected in both lungs.",
            "Both lungs are clear; no focal nodule, consolidation or emphysematous change was observed.",
            "No consolidation, ground-glass opacity, atelectasis or emphysema was observed in either lung.",
        ),
        heading="Lung window evaluation:",
        rules_out=True,
    ),
    _Section(
        "pleura",
        (
            "No pleural effusion or thickening was detected.",
            "No pleural fluid was seen.",
            "There is no pleural effusion or pneumothorax.",
        ),
    ),
    _Section(
        "abdomen",
        (
            "The upper abdominal organs within the scan range are unremarkable.",
            "As far as can be seen, within the sections; upper abdominal organs are normal.",
        ),
    ),
    _Section(
        "bone",
        (
            "Bony structures in the scanned area are normal. Vertebral body heights are maintained.",
            "No lytic or destructive lesion was detected in the bone structures within the study area.",
        ),
    ),
)

NORMAL_IMPRESSIONS: tuple[str, ...] = (
    "Thoracic CT examination within normal limits.",
    "No significant pathology was detected in the thorax.",
    "Normal chest CT.",
)
_CLINICAL = ("Not given.", "Cough and dyspnea.", "Follow-up.", "Chest pain.", "Fever, suspected infection.")
_TECHNIQUE = (
    "Non-contrast thin-section axial images of the chest were obtained.",
    "Thorax CT was performed without contrast; axial sections with multiplanar reconstructions.",
    "Contrast-enhanced axial images of the thorax were obtained.",
)


def _side_words(key: str) -> Callable[[Mapping[str, Any]], dict[str, str]]:
    """Report words for a one-sided finding whose painter put its side in extras[key]."""
    return lambda extras: {"side": _SIDE[extras.get(key, 0)]}


def _nodule_words(extras: Mapping[str, Any]) -> dict[str, Any]:
    sides = {_SIDE[s] for s in extras.get("nodule_sides", [-1])}
    where = "both lungs" if len(sides) == 2 else f"the {sides.pop()} lung"
    return {"where": where, "size": round(extras.get("nodule_size_mm", 8))}


def _effusion_words(extras: Mapping[str, Any]) -> dict[str, str]:
    sides = extras.get("effusion_sides", (0,))
    side = "bilateral" if len(sides) == 2 else _SIDE[sides[0]]
    return {"side": side, "Side": side.capitalize()}


# ------------------------------------------------------------------------------------------------
# The findings: one row each
# ------------------------------------------------------------------------------------------------

#: Background of the label map (tissue no anatomy mask covers), as a ``FindingSpec.anatomy``.
BACKGROUND = "background"


@dataclass(frozen=True)
class FindingSpec:
    """One finding the generator draws: where, how, how often, and how a reader words it.

    Attributes:
        name: its CT-RATE label.
        anatomy: the mask whose voxels it may change (a :data:`MASK_VALUES` name; :data:`BACKGROUND`
            for label 0; ``None`` when it crosses anatomies, as a catheter does). A finding that
            changes an anatomy's shape makes the new voxels that anatomy.
        section: the report section that describes it (a ``_SECTIONS`` name).
        present: its sentences in the findings text; ``{name}`` fields come from ``words``.
        impression: its phrasings in the impression.
        prevalence: default probability of drawing it (independent per phantom).
        absent: sentences ruling it out, stated when its section ``rules_out``.
        paint: draws it into the HU of a :class:`_Scene`: ``paint(scene, params.f) -> extras``
            (what the report words need, e.g. the side).
        shape: how it changes the normal anatomy: ``shape(params.f) -> {_Shape field: value}``.
        words: the ``{name}`` fields of its phrasings from the render extras.
        layer: painting order (low first; in table order within a layer); where two findings
            overlap the later one wins. Findings on disjoint masks may share a layer.
    """

    name: str
    anatomy: str | None
    section: str
    present: tuple[str, ...]
    impression: tuple[str, ...]
    prevalence: float = 0.25
    absent: tuple[str, ...] = ()
    paint: Callable[[_Scene, Mapping[str, Any]], dict[str, Any]] | None = None
    shape: Callable[[Mapping[str, Any]], dict[str, float]] | None = None
    words: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    layer: int = 0


#: Every finding the generator draws, in the order reports state them (and draw their phrasings).
#: Core CT-RATE findings are drawn at 25%; extras (ground glass, enlarged mediastinal nodes, a
#: central venous catheter) at 15%.
FINDINGS: tuple[FindingSpec, ...] = (
    FindingSpec(
        "Medical material",
        None,
        "airway",
        (
            "A central venous catheter is observed with its tip in the superior vena cava.",
            "A port catheter extending from the subclavian vein to the superior vena cava is observed.",
        ),
        ("Central venous catheter.",),
        prevalence=0.15,
        paint=_paint_catheter,
        layer=5,  # a device crosses every tissue
    ),
    FindingSpec(
        "Cardiomegaly",
        "heart",
        "mediastinum",
        (
            "The heart size is increased (cardiomegaly).",
            "Cardiomegaly was observed.",
            "The heart is enlarged.",
        ),
        ("Cardiomegaly.", "Enlarged heart (cardiomegaly)."),
        shape=lambda f: {"heart_scale": f["cardio_scale"]},
    ),
    FindingSpec(
        "Arterial wall calcification",
        "aorta",
        "aorta",
        (
            "Calcified atherosclerotic plaques are observed in the wall of the thoracic aorta.",
            "Atheromatous calcifications were observed in the aortic arch and descending aorta.",
            "There are calcific plaques in the thoracic aorta wall.",
        ),
        ("Atherosclerotic changes in the thoracic aorta.", "Calcified plaques in the thoracic aorta."),
        paint=_paint_aortic_calcification,
    ),
    FindingSpec(
        "Coronary artery wall calcification",
        "heart",
        "coronary",
        (
            "Calcified plaques are observed in the coronary arteries.",
            "Coronary artery calcification is present.",
            "Atherosclerotic calcifications were observed in the coronary arteries.",
        ),
        ("Coronary artery calcification.", "Calcified plaques in the coronary arteries."),
        paint=_paint_coronary_calcification,
    ),
    FindingSpec(
        "Pericardial effusion",
        "heart",
        "pericardium",
        (
            "Pericardial effusion reaching 12 mm in its thickest part was observed.",
            "There is a pericardial effusion surrounding the heart.",
            "Fluid is observed in the pericardial space (pericardial effusion).",
        ),
        ("Pericardial effusion.", "Pericardial fluid."),
        shape=lambda f: {"pericardial_mm": f["peri_thickness"]},  # the sac's fluid is normal tissue
    ),
    FindingSpec(
        "Hiatal hernia",
        "esophagus",
        "esophagus",
        (
            "A hiatal hernia is observed at the lower end of the esophagus.",
            "A sliding hiatal hernia is present.",
            "Hiatal hernia is present at the esophagogastric junction.",
        ),
        ("Hiatal hernia.", "Sliding hiatal hernia."),
        shape=lambda f: {"hernia_radius_mm": f["hernia_radius"]},
        paint=_paint_hiatal_hernia,
    ),
    FindingSpec(
        "Lymphadenopathy",
        BACKGROUND,
        "nodes",
        (
            "Lymph nodes reaching 22 mm in short axis are observed in the subcarinal and right paratracheal regions.",
            "Enlarged mediastinal lymph nodes were observed.",
        ),
        ("Mediastinal lymphadenopathy.",),
        prevalence=0.15,
        paint=_paint_lymph_nodes,
    ),
    FindingSpec(
        "Emphysema",
        "lung",
        "lung",
        (
            "Centriacinar emphysematous changes are observed in both lungs, predominantly in the upper lobes.",
            "Emphysema is seen in both lungs.",
            "Paraseptal and centrilobular emphysema are observed in the upper lobes of both lungs.",
        ),
        ("Emphysema in both lungs.", "Emphysematous changes in the lungs."),
        absent=("No emphysematous change was observed.", "There is no emphysema."),
        paint=_paint_emphysema,
        layer=1,
    ),
    FindingSpec(
        "Lung nodule",
        "lung",
        "lung",
        (
            "A nodule measuring {size} mm was observed in {where}.",
            "Solid nodules up to {size} mm in diameter are observed in {where}.",
            "There is a pulmonary nodule of {size} mm in {where}.",
        ),
        ("Pulmonary nodule in {where}.", "Lung nodule in {where}."),
        absent=("No pulmonary nodule was detected.", "No nodular lesion was observed in either lung."),
        paint=_paint_nodules,
        words=_nodule_words,
        layer=4,  # solid nodules lie over any other lung change
    ),
    FindingSpec(
        "Consolidation",
        "lung",
        "lung",
        (
            "Consolidation areas are observed in the lower lobe of the {side} lung.",
            "Patchy consolidation with air bronchograms in the {side} lung lower lobe.",
            "There is a consolidation in the posterobasal segment of the {side} lung.",
        ),
        ("Consolidation in the {side} lung.", "Pneumonic consolidation in the {side} lung lower lobe."),
        absent=("No consolidation was observed.", "There is no pneumonic consolidation."),
        paint=_paint_consolidation,
        words=_side_words("consol_side"),
        layer=2,
    ),
    FindingSpec(
        "Lung opacity",
        "lung",
        "lung",
        (
            "Ground glass opacities are observed in the {side} lung.",
            "Patchy ground-glass densities were seen in the upper lobe of the {side} lung.",
        ),
        ("Ground glass opacity in the {side} lung.",),
        prevalence=0.15,
        absent=("No ground-glass opacity was seen.", "No ground glass density was observed in the lungs."),
        paint=_paint_ground_glass,
        words=_side_words("ggo_side"),
        layer=2,
    ),
    FindingSpec(
        "Atelectasis",
        "lung",
        "lung",
        (
            "Linear atelectasis is observed in the lower lobe of the {side} lung.",
            "Subsegmental atelectasis was observed in the {side} lung base.",
            "Atelectatic changes are observed in the {side} lung lower lobe.",
        ),
        ("Atelectasis in the {side} lung.", "Atelectatic changes in the {side} lung base."),
        absent=("No atelectasis was observed.", "There is no atelectatic change."),
        paint=_paint_atelectasis,
        words=_side_words("atel_side"),
        layer=3,
    ),
    FindingSpec(
        "Pleural effusion",
        "lung",  # the pleural space of each hemithorax lies in its lung mask
        "pleura",
        (
            "Pleural effusion is observed on the {side} side, measuring 25 mm in its thickest part.",
            "{Side} pleural effusion was detected.",
            "There is a {side} pleural effusion with adjacent compression of the lung.",
        ),
        ("{Side} pleural effusion.", "Pleural effusion on the {side} side."),
        paint=_paint_pleural_effusion,
        words=_effusion_words,
        layer=0,  # under every other lung change
    ),
)
#: The order of the per-finding random draws, fixed so that a seed keeps its cohort; a finding
#: added to the table draws after these (which, like any change to the draws, changes every cohort).
_DRAW_ORDER = (
    "Pleural effusion",
    "Emphysema",
    "Lung nodule",
    "Consolidation",
    "Atelectasis",
    "Cardiomegaly",
    "Pericardial effusion",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lung opacity",
    "Lymphadenopathy",
    "Medical material",
)
RENDERED_FINDINGS: tuple[str, ...] = (*_DRAW_ORDER, *(s.name for s in FINDINGS if s.name not in _DRAW_ORDER))
#: Findings drawn in the image, with their default prevalence (independent per phantom).
DEFAULT_PREVALENCE: dict[str, float] = {
    name: next(s.prevalence for s in FINDINGS if s.name == name) for name in RENDERED_FINDINGS
}
_PAINT_ORDER: tuple[FindingSpec, ...] = tuple(sorted(FINDINGS, key=lambda spec: spec.layer))


# ------------------------------------------------------------------------------------------------
# Rendering and reporting one phantom
# ------------------------------------------------------------------------------------------------


def render_phantom(
    params: PhantomParams,
    findings: frozenset[str] | set[str],
    size_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one noise-free phantom: the normal anatomy as the findings shape it, its tissue, then
    each finding's painter (:data:`FINDINGS`, in layer order).

    Returns:
        ``(hu, labels, extras)``: hu float32 ``(Z, Y, X)`` without noise, labels uint8 ``(Z, Y, X)``
        (:data:`MASK_VALUES`), and descriptive extras (sides, sizes) used by the report writer.
    """
    grid = _Grid(tuple(int(s) for s in size_zyx), tuple(float(s) for s in spacing_zyx))
    drawn = [spec for spec in _PAINT_ORDER if spec.name in findings]
    shape = _Shape()
    for spec in drawn:
        if spec.shape is not None:
            shape = replace(shape, **spec.shape(params.f))
    scene = _draw_anatomy(params, grid, shape)
    _paint_tissue(scene)
    for spec in drawn:
        if spec.paint is not None:
            scene.extras.update(spec.paint(scene, params.f))
    return scene.hu, scene.labels, scene.extras


def add_noise(hu: np.ndarray, rng: np.random.Generator, sigma: float, smooth: float = 0.0) -> np.ndarray:
    """Reconstruction: optional smoothing (soft kernel), Gaussian noise, HU rounded and clipped."""
    out = hu
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        out = gaussian_filter(out, smooth)
    out = out + rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options`` at random (a single option draws nothing from ``rng``)."""
    return options[0] if len(options) == 1 else options[int(rng.integers(len(options)))]


def write_report(
    findings: frozenset[str] | set[str], extras: Mapping[str, Any], rng: np.random.Generator
) -> dict[str, str]:
    """CT-RATE-style report columns for a phantom (several phrasings per finding and section).

    Findings are stated in :data:`FINDINGS` order, each a sentence in its section and a phrase in
    the impression; sections without findings get a normal sentence.
    """
    sentences: dict[str, list[str]] = {}
    impressions: list[str] = []
    sections = {section.name: section for section in _SECTIONS}
    for name, group in itertools.groupby(FINDINGS, key=lambda spec: spec.section):
        specs = list(group)
        said = []
        for spec in specs:
            if spec.name in findings:
                words = spec.words(extras) if spec.words is not None else {}
                said.append(_pick(rng, spec.present).format(**words))
                impressions.append(_pick(rng, spec.impression).format(**words))
        if said and sections[name].rules_out:  # each absent finding ruled out with probability 1/2
            for spec in specs:
                if spec.absent and spec.name not in findings and rng.random() < 0.5:
                    said.append(_pick(rng, spec.absent))
        if said:
            sentences[name] = [sections[name].heading, *said] if sections[name].heading else said
    parts = []
    for section in _SECTIONS:
        parts.extend(sentences.get(section.name) or [_pick(rng, section.normal)])
    impression = " ".join(impressions) if impressions else _pick(rng, NORMAL_IMPRESSIONS)
    return {
        "ClinicalInformation_EN": _pick(rng, _CLINICAL),
        "Technique_EN": _pick(rng, _TECHNIQUE),
        "Findings_EN": " ".join(parts),
        "Impressions_EN": impression,
    }


# ------------------------------------------------------------------------------------------------
# Samples and cohorts
# ------------------------------------------------------------------------------------------------


@dataclass
class SynthSample:
    """One synthetic scan.

    Attributes:
        name: CT-RATE volume name (``train_12_a_1``).
        hu: int16 HU ``(Z, Y, X)`` (with noise).
        labels: uint8 anatomy mask ``(Z, Y, X)`` (:data:`MASK_VALUES`).
        geometry: where the voxels are (LPS).
        findings: frozenset of rendered finding labels.
        report: CT-RATE report columns (without ``VolumeName``).
        split: ``"train"`` or ``"valid"``.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    geometry: Geometry
    findings: frozenset[str]
    report: dict[str, str]
    split: str = "train"

    @property
    def label_row(self) -> dict[str, int]:
        """The 18 CT-RATE labels as 0/1."""
        return {lbl: int(lbl in self.findings) for lbl in CTRATE_LABELS}

    @property
    def scan_id(self) -> str:
        return scan_id_of(self.name)

    def metadata_row(self) -> dict[str, str]:
        g = self.geometry
        return {
            "VolumeName": f"{self.name}.nii.gz",
            "XYSpacing": f"[{g.spacing[1]!r}, {g.spacing[0]!r}]",
            "ZSpacing": repr(g.spacing[2]),
            "ImagePositionPatient": "[" + ", ".join(repr(v) for v in g.origin) + "]",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
            "RescaleIntercept": str(RESCALE_INTERCEPT),
            "RescaleSlope": "1",
        }


def to_cached_sample(sample: SynthSample, catalog: Any = None, config: Any = None) -> Any:
    """The :class:`~fvlm_core.data.cache.CachedSample` ``fvlm prepare`` would write for a phantom,
    built in memory (no files): anatomy labels in ``catalog`` values, per-anatomy texts and
    abnormal flags from the report (``fvlm_core.reports``), the 18 drawn labels.

    Args:
        catalog: anatomy catalog (default: the 4 CT-RATE anatomies; trachea needs the extended one).
        config: ``ModelSpaceConfig`` to resample to; ``None`` keeps the phantom's own grid
            (the fastest path for a demo whose model space is the phantom grid).
    """
    catalog = catalog or CTRATE_CATALOG
    findings, impression = sample.report["Findings_EN"], sample.report["Impressions_EN"]
    texts, abnormal, extra = decompose_texts(findings, impression, catalog.names, sample.name)
    return model_space_sample(
        sample.name,
        CTVolume(sample.hu.astype(np.float32), sample.geometry, source=f"<phantom {sample.name}>"),
        catalog.relabel(sample.labels, {value: name for name, value in MASK_VALUES.items()}),
        texts=texts,
        abnormal=abnormal,
        finding_labels=sample.label_row,
        findings=findings,
        impression=impression,
        catalog=catalog,
        config=config,
        meta={"split": sample.split, "source": "synth", "findings_drawn": sorted(sample.findings), **extra},
    )


def _draw_findings(
    rng: np.random.Generator,
    prevalence: Mapping[str, float],
    normal_fraction: float = DEFAULT_NORMAL_FRACTION,
) -> frozenset[str]:
    draws = rng.random(len(RENDERED_FINDINGS) + 1)  # always the same number of draws
    if draws[-1] < normal_fraction:
        return frozenset()
    return frozenset(f for f, d in zip(RENDERED_FINDINGS, draws) if d < prevalence.get(f, 0.0))


def make_phantom(
    seed: int,
    index: int,
    split: str = "train",
    size_zyx: Sequence[int] = (64, 64, 64),
    spacing_zyx: Sequence[float] | None = None,
    prevalence: Mapping[str, float] | None = None,
    recon: int = 1,
    findings: Sequence[str] | None = None,
    normal_fraction: float = DEFAULT_NORMAL_FRACTION,
) -> SynthSample:
    """Phantom ``index`` of the cohort ``seed`` (``recon`` > 1: another reconstruction of the same scan).

    ``findings`` overrides the drawn finding set (e.g. to render one phantom with and without a finding).
    """
    if split not in SPLITS:
        raise InputError(f"split {split!r}: a phantom belongs to one of {list(SPLITS)}.")
    unknown = sorted(set(findings or ()) - set(RENDERED_FINDINGS))
    if unknown:
        raise InputError(f"findings {unknown} cannot be drawn; known: {list(RENDERED_FINDINGS)}")
    split_id = 0 if split == "train" else 1
    ss = np.random.SeedSequence([int(seed), split_id, int(index)])
    r_params, r_findings, r_report, r_origin, _r_noise = (np.random.default_rng(s) for s in ss.spawn(5))
    size_zyx = tuple(int(s) for s in size_zyx)
    spacing = tuple(float(s) for s in (spacing_zyx or default_spacing_zyx(size_zyx)))
    grid = _Grid(size_zyx, spacing)
    params = sample_params(r_params, grid)
    drawn = _draw_findings(
        r_findings, DEFAULT_PREVALENCE if prevalence is None else prevalence, normal_fraction
    )
    fset = drawn if findings is None else frozenset(findings)
    hu, labels, extras = render_phantom(params, fset, size_zyx, spacing)
    report = write_report(fset, extras, r_report)
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_id, int(index), int(recon)]))
    # Reconstruction 1: sharp kernel; others: softer kernel with less noise.
    smooth = 0.0 if recon == 1 else 0.7
    hu_n = add_noise(hu, noise_rng, params.noise_sigma * (1.0 if recon == 1 else 0.6), smooth)
    origin = (
        float(-(size_zyx[2] - 1) / 2 * spacing[2] + r_origin.uniform(-20, 20)),
        float(-(size_zyx[1] - 1) / 2 * spacing[1] + r_origin.uniform(-40, 40)),
        float(r_origin.uniform(-400, -100)),
    )
    geometry = Geometry(
        size=(size_zyx[2], size_zyx[1], size_zyx[0]),
        spacing=(spacing[2], spacing[1], spacing[0]),
        origin=tuple(round(o, 3) for o in origin),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    return SynthSample(
        name=f"{split}_{index + 1}_a_{recon}",
        hu=hu_n,
        labels=labels,
        geometry=geometry,
        findings=fset,
        report=report,
        split=split,
    )


@dataclass(frozen=True)
class _Job:
    seed: int
    index: int
    split: str
    recon: int
    size_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float] | None
    prevalence: tuple[tuple[str, float], ...] | None
    out_dir: str | None
    write_masks: bool
    normal_fraction: float = DEFAULT_NORMAL_FRACTION
    cached: tuple[tuple[str, ...], dict | None] | None = None  # (anatomies, model-space dict)


def _run_job(job: _Job) -> SynthSample | dict[str, Any]:
    sample = make_phantom(
        job.seed,
        job.index,
        job.split,
        job.size_zyx,
        job.spacing_zyx,
        None if job.prevalence is None else dict(job.prevalence),
        recon=job.recon,
        normal_fraction=job.normal_fraction,
    )
    if job.out_dir is None:
        if job.cached is not None:
            names, ms = job.cached
            config = None if ms is None else ModelSpaceConfig.from_dict(ms)
            return to_cached_sample(sample, get_catalog(list(names)), config)
        return sample
    write_sample_files(sample, Path(job.out_dir), write_masks=job.write_masks)
    return {
        "name": sample.name,
        "split": sample.split,
        "metadata": sample.metadata_row(),
        "report": {"VolumeName": f"{sample.name}.nii.gz", **sample.report},
        "labels": {"VolumeName": f"{sample.name}.nii.gz", **sample.label_row},
        "findings": sorted(sample.findings),
    }


def write_sample_files(sample: SynthSample, out_dir: Path, write_masks: bool = True) -> None:
    """Write the volume (stored int16 = HU + 1024, header geometry deliberately generic) and its mask.

    The NIfTI header carries unit spacing at the origin, as unreliable CT-RATE headers do: the true
    geometry and HU scaling are in the metadata CSV. Masks carry the true geometry.
    """
    rel = volume_relpath(sample.name)
    split_dir = SPLITS[sample.split][0]
    stored = (sample.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
    img = sitk.GetImageFromArray(stored)  # spacing 1, origin 0, identity: not the real geometry
    target = out_dir / "dataset" / split_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    if write_masks:
        m = sample.geometry.apply_to(sitk.GetImageFromArray(sample.labels))
        mtarget = out_dir / "anatomy_masks" / split_dir / rel
        mtarget.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(mtarget) as tmp:
            sitk.WriteImage(m, str(tmp), useCompression=True)


def _csv_text(rows: list[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r[c] for c in columns})
    return buf.getvalue()


def _jobs(
    n: int,
    seed: int,
    size_zyx,
    spacing_zyx,
    prevalence,
    valid_fraction: float,
    recon_fraction: float,
    normal_fraction: float,
    out_dir: Path | None = None,
    write_masks: bool = False,
) -> list[_Job]:
    """The cohort's jobs in their fixed order; with ``out_dir``, each writes its files there."""
    n_valid = round(n * valid_fraction)
    n_train = n - n_valid
    # Which scans get a second reconstruction: its own stream, independent of workers.
    rr = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    second = rr.random(n) < recon_fraction
    prev = None if prevalence is None else tuple(sorted(prevalence.items()))
    jobs = []
    for k in range(n):
        split, index = ("train", k) if k < n_train else ("valid", k - n_train)
        for recon in (1, 2) if second[k] else (1,):
            jobs.append(
                _Job(
                    int(seed),
                    index,
                    split,
                    recon,
                    tuple(int(s) for s in size_zyx),
                    None if spacing_zyx is None else tuple(float(s) for s in spacing_zyx),
                    prev,
                    None if out_dir is None else str(out_dir),
                    write_masks,
                    float(normal_fraction),
                )
            )
    return jobs


def pool_context() -> Any:
    """A multiprocessing context for worker pools, or ``None`` when processes cannot start.

    forkserver/spawn are safe when the parent already runs torch threads (fork could deadlock).
    They re-import the parent's main script: a script read from stdin cannot be, and the pool
    would respawn crashing workers forever, so then work runs in this process instead.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return None
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _map(jobs: list[_Job], workers: int) -> Iterator[Any]:
    ctx = pool_context() if workers > 1 and len(jobs) > 1 else None
    if ctx is None:
        yield from map(_run_job, jobs)
        return
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_run_job, jobs, chunksize=chunk)


def iter_cohort(
    n: int,
    seed: int,
    *,
    size_zyx: Sequence[int] = (64, 64, 64),
    spacing_zyx: Sequence[float] | None = None,
    workers: int = 1,
    prevalence: Mapping[str, float] | None = None,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    recon_fraction: float = 0.0,
    normal_fraction: float = DEFAULT_NORMAL_FRACTION,
    as_cached: bool = False,
    anatomies: Sequence[str] | None = None,
    model_space: Any = None,
) -> Iterator[Any]:
    """Yield the cohort's samples in memory, in a fixed order (no files written).

    Use this to train on phantoms without touching the disk: each :class:`SynthSample` holds HU,
    anatomy labels, geometry, findings and report. Same arguments -> identical samples.

    With ``as_cached=True`` the workers also run :func:`to_cached_sample` (report decomposition,
    relabelling to ``anatomies`` (default CT-RATE's 4), optional resampling to ``model_space``, a
    ``ModelSpaceConfig``) and yield :class:`~fvlm_core.data.cache.CachedSample` objects, what
    ``fvlm prepare`` writes, so they are used as samples read from a prepare cache are.
    """
    jobs = _jobs(n, seed, size_zyx, spacing_zyx, prevalence, valid_fraction, recon_fraction, normal_fraction)
    if as_cached:
        spec = (
            tuple(anatomies or CTRATE_CATALOG.names),
            None if model_space is None else model_space.to_dict(),
        )
        jobs = [replace(j, cached=spec) for j in jobs]
    yield from _map(jobs, workers)


@dataclass
class CohortSummary:
    out_dir: Path | None
    n_scans: int
    n_volumes: int
    seconds: float
    prevalence: dict[str, float]
    samples: list[SynthSample] | None = None

    @property
    def volumes_per_second(self) -> float:
        return self.n_volumes / self.seconds if self.seconds > 0 else float("inf")


def generate_cohort(
    out_dir: str | os.PathLike | None,
    n: int,
    seed: int,
    *,
    size_zyx: Sequence[int] = (64, 64, 64),
    spacing_zyx: Sequence[float] | None = None,
    workers: int = 1,
    prevalence: Mapping[str, float] | None = None,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    recon_fraction: float = 0.2,
    normal_fraction: float = DEFAULT_NORMAL_FRACTION,
    write_masks: bool = True,
    progress: bool = False,
) -> CohortSummary:
    """Generate ``n`` synthetic scans (train + valid) in the CT-RATE layout under ``out_dir``.

    With ``out_dir=None`` nothing is written and ``summary.samples`` holds the samples in memory.

    Layout written::

        dataset/{train,valid}/train_1/train_1_a/train_1_a_1.nii.gz      (int16, stored = HU + 1024)
        anatomy_masks/{train,valid}/...same names...                     (uint8, MASK_VALUES)
        metadata/{train,validation}_metadata.csv
        radiology_text_reports/{train,validation}_reports.csv
        multi_abnormality_labels/{train,valid}_predicted_labels.csv
    """
    t0 = time.perf_counter()
    prev = _check_cohort_arguments(n, size_zyx, prevalence, normal_fraction)
    out = None if out_dir is None else Path(out_dir)
    jobs = _jobs(
        n,
        seed,
        size_zyx,
        spacing_zyx,
        prev,
        valid_fraction,
        recon_fraction,
        normal_fraction,
        out,
        write_masks,
    )
    results = _map(jobs, workers)
    if progress:
        results = tqdm(results, total=len(jobs), desc="synth", unit="vol")
    if out is None:
        samples = list(results)
        return CohortSummary(None, n, len(samples), time.perf_counter() - t0, prev, samples)
    _write_tables(out, results)
    _write_readme(out, seed, n, len(jobs), size_zyx, write_masks)
    return CohortSummary(out, n, len(jobs), time.perf_counter() - t0, prev)


def _check_cohort_arguments(
    n: int, size_zyx: Sequence[int], prevalence: Mapping[str, float] | None, normal_fraction: float
) -> dict[str, float]:
    """The prevalence to draw with, after refusing arguments no cohort can be made from."""
    if n < 1:
        raise InputError(f"--n must be at least 1 (got {n}).")
    if len(size_zyx) != 3 or min(size_zyx) < 16:
        raise InputError(f"--size must give 3 sizes of at least 16 voxels (got {tuple(size_zyx)}).")
    prev = dict(DEFAULT_PREVALENCE if prevalence is None else prevalence)
    unknown = sorted(set(prev) - set(RENDERED_FINDINGS))
    if unknown:
        raise InputError(
            f"prevalence names findings the generator cannot draw: {unknown}. Known: {list(RENDERED_FINDINGS)}"
        )
    if not 0.0 <= normal_fraction <= 1.0:
        raise InputError(f"--normal-fraction must be within 0..1 (got {normal_fraction}).")
    return prev


def _write_tables(out: Path, results: Iterator[dict[str, Any]]) -> None:
    """The metadata, report and label CSVs of both splits, rows in job order."""
    rows: dict[str, dict[str, list]] = {s: {"metadata": [], "report": [], "labels": []} for s in SPLITS}
    for r in results:
        for k in ("metadata", "report", "labels"):
            rows[r["split"]][k].append(r[k])
    for split, (_, meta_name, lab_name) in SPLITS.items():
        atomic_write_text(
            out / "metadata" / f"{meta_name}_metadata.csv",
            _csv_text(rows[split]["metadata"], METADATA_COLUMNS),
        )
        atomic_write_text(
            out / "radiology_text_reports" / f"{meta_name}_reports.csv",
            _csv_text(rows[split]["report"], REPORT_COLUMNS),
        )
        atomic_write_text(
            out / "multi_abnormality_labels" / f"{lab_name}_predicted_labels.csv",
            _csv_text(rows[split]["labels"], ("VolumeName", *CTRATE_LABELS)),
        )


def _write_readme(
    out: Path, seed: int, n: int, n_volumes: int, size_zyx: Sequence[int], write_masks: bool
) -> None:
    """README.txt (how to read the cohort) and, with masks, anatomy_masks/class_map.json."""
    readme = (
        "Synthetic chest CT cohort (fvlm synth) in the CT-RATE layout.\n"
        f"seed={seed} n_scans={n} volumes={n_volumes} size_zyx={tuple(size_zyx)}\n"
        "Volumes: int16 stored values; HU = stored + RescaleIntercept (metadata CSV). NIfTI headers\n"
        "carry no geometry (unit spacing): use the metadata CSV, as for CT-RATE.\n"
        "anatomy_masks: lung 1, heart 2, esophagus 3, aorta 4, trachea 5 (extended catalog order),\n"
        "on the true geometry (anatomy_masks/class_map.json names the values). Pleural effusion\n"
        "lies in 'lung', pericardial fluid in 'heart', a hiatal hernia in 'esophagus'.\n"
    )
    atomic_write_text(out / "README.txt", readme)
    if write_masks:  # value -> anatomy name, so any catalog can read the masks (LabelMapBackend class_map)
        atomic_write_text(
            out / "anatomy_masks" / "class_map.json",
            json.dumps({str(v): k for k, v in MASK_VALUES.items()}, indent=1) + "\n",
        )
