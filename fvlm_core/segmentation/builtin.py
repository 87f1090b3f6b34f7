"""Built-in classical CT segmenter: body, left/right lung, airways and bone, with no weights.

Everything here is thresholds and morphology (numpy / scipy.ndimage), so it runs offline in well
under a second on a CPU. It is meant as a dependable fallback and a test fixture, not a
replacement for TotalSegmentator: it knows only the lungs and bone (plus body and airways).

How it works (all distances in mm, so any voxel size works):

0. **Coarse grid, then refine.** A scan finer than ``coarse_mm`` is cut into blocks of at most
   ``coarse_mm`` a side and steps 1-7 run once on them: on the blocks' mean HU, except where
   blending would mislead (:class:`_BlockStats`: the body is the blocks that are tissue
   throughout, the lung test takes medians of unblended voxels, bone candidates are blocks with
   at least two voxels above the threshold and a peak halfway to ``seed_hu``, so a thin cortex is
   not averaged away and enhanced soft tissue is not taken for it). Then only
   the blocks next to another structure are decided again, voxel by voxel, from each voxel's own
   HU and the structures around its block (:func:`_refine`). A scan at ``coarse_mm`` or coarser
   runs steps 1-7 on its own grid, unchanged.
1. **Orientation.** The array axis closest to the patient's superior-inferior direction is found
   from the geometry; slice-wise steps run on axial slices of that axis, and left/right is decided
   in RAS coordinates (``Geometry.index_zyx_to_ras``), never from the array order.
2. **Body**: tissue above ``body_hu`` after an in-plane opening that cuts the table off, in
   pieces of at least ``body_min_fraction`` of the largest (trunk and arms), holes filled slice
   by slice.
3. **Lung air**: connected components below ``air_hu`` inside the body that do not touch the
   body's outer rim (air between the patient and the table, skin folds). A component is lung when
   its median HU lies in ``lung_median_hu`` -- lung parenchyma is air mixed with tissue (median
   about -850..-750 HU), while bowel gas, the stomach and the airway lumen are pure air (median
   about -1000..-910 HU) -- and it holds at least ``min_lung_ml``.
4. **Airways** (trachea and main bronchi): the tube-sized air blob near the midline in the top
   slice of the lung air, followed down slice by slice while its blobs stay tube-sized
   (``airway_max_cm2``), i.e. until the bronchi enter the lungs; dilated by ``airway_wall_mm``
   and removed.
5. **Left / right**: the remaining components are assigned to a side by the RAS x of their centre
   relative to the body's centre; one component that holds both lungs (joined at the anterior
   junction) is split at the first depth where its core falls apart into two, each voxel going
   to the nearer core.
6. **Vessels** inside each lung are added back by a closing (``lung_close_mm``) and slice-wise
   hole filling, as TotalSegmentator's lung masks include them.
7. **Bone**: voxels above ``bone_hu`` in pieces holding some dense bone (above ``seed_hu``),
   closed by ``bone_close_mm`` and with marrow holes (up to ``max_marrow_cm2`` per slice) filled.
   Contrast-filled blood pools -- thick, homogeneous blobs of median above ``pool_median_hu``
   (heart chambers and aorta in an arterial-phase scan, 300-600 HU) -- are removed with a
   ``pool_margin_mm`` margin, and when they are large (``pool_min_ml``) the threshold rises to
   ``bone_hu_contrast`` to keep the enhanced myocardium out. Thick regions whose HU is locally
   smooth (SD below ``smooth_sd_hu``: enhanced vessels at 150-300 HU) are removed too, as bone
   is heterogeneous.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from fvlm_core.anatomy import CTRATE_CATALOG
from fvlm_core.boxes import nonzero_box
from fvlm_core.geometry import Geometry
from fvlm_core.segmentation.base import AnatomySegmentation
from fvlm_core.segmentation.morphology import (
    ball,
    box_mean,
    box_or,
    closing,
    dilate,
    disk,
    erode,
    fill_slices,
    opening,
    slice_holes,
)

Progress = Callable[[str, float], None]

# Values of the label map the steps build: one structure per voxel, the body is every non-zero.
OUTSIDE, BODY, LUNG_LEFT, LUNG_RIGHT, AIRWAYS, BONE = range(6)


@dataclass(frozen=True)
class BuiltinParams:
    """Thresholds (HU) and sizes (mm, ml) of the built-in segmenter.

    ``coarse_mm``: the largest block side the steps run on (0: always the scan's own grid);
    ``marrow_reach_mm``: how far (in-plane) a bone block's voxel below the bone threshold looks
    for cortex on both sides to count as marrow when the grid is refined.
    """

    coarse_mm: float = 3.0
    marrow_reach_mm: float = 4.5
    body_hu: float = -500.0
    table_open_mm: float = 3.0
    body_min_fraction: float = 0.02
    rim_mm: float = 4.0
    air_hu: float = -400.0
    lung_median_hu: tuple[float, float] = (-930.0, -600.0)
    min_lung_ml: float = 5.0
    airway_max_cm2: float = 6.0
    airway_max_offset_mm: float = 30.0
    airway_max_length_mm: float = 250.0
    airway_min_ml: float = 1.0
    airway_bridge_mm: float = 4.5
    airway_wall_mm: float = 2.0
    lung_close_mm: float = 4.0
    bone_hu: float = 105.0
    bone_hu_contrast: float = 200.0
    pool_min_ml: float = 50.0
    pool_hu: float = 250.0
    pool_open_mm: float = 4.0
    pool_median_hu: float = 300.0
    pool_p90_max_hu: float = 700.0
    pool_margin_mm: float = 5.0
    pool_min_component_ml: float = 20.0
    max_marrow_cm2: float = 20.0
    bone_close_mm: float = 3.5
    min_marrow_hu: float = -1000.0
    min_bone_ml: float = 0.1
    seed_hu: float | None = 300.0
    smooth_sd_hu: float = 25.0
    smooth_box_mm: float = 5.0
    smooth_open_mm: float = 3.0
    smooth_min_ml: float = 1.0
    smooth_margin_mm: float = 2.0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def _remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _centroid(mask: np.ndarray) -> np.ndarray:
    """``(ndim,)`` mean index of a non-empty ``mask`` (from its projections: no index arrays)."""
    total = float(np.count_nonzero(mask))
    out = np.empty(mask.ndim)
    for axis in range(mask.ndim):
        counts = np.count_nonzero(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
        out[axis] = float(counts @ np.arange(mask.shape[axis])) / total
    return out


@dataclass(frozen=True)
class _Canonical:
    """View of a volume with axis 0 = inferior -> superior (axial slices along axis 0)."""

    axis: int  # array axis that runs superior-inferior
    flip: bool  # whether that axis runs superior -> inferior in the file
    spacing: tuple[float, float, float]  # mm per canonical axis

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> _Canonical:
        d = geometry.direction_matrix  # columns: directions (LPS) of index axes i, j, k
        k = int(np.argmax(np.abs(d[2, :])))  # index axis most aligned with S
        axis = 2 - k  # array axes are (k, j, i)
        flip = bool(d[2, k] < 0)
        sp = geometry.spacing_zyx
        order = [axis] + [a for a in range(3) if a != axis]
        return cls(axis, flip, tuple(float(sp[a]) for a in order))

    def to(self, a: np.ndarray) -> np.ndarray:
        a = np.moveaxis(a, self.axis, 0)
        return a[::-1] if self.flip else a

    def back(self, a: np.ndarray) -> np.ndarray:
        if self.flip:
            a = a[::-1]
        return np.ascontiguousarray(np.moveaxis(a, 0, self.axis))

    def ras_x(self, geometry: Geometry, canon_index: np.ndarray) -> np.ndarray:
        """RAS x (mm) of canonical ``(..., 3)`` indices."""
        idx = np.asarray(canon_index, dtype=float).copy()
        if self.flip:
            n_si = geometry.shape_zyx[self.axis]
            idx[..., 0] = n_si - 1 - idx[..., 0]
        order = [self.axis] + [a for a in range(3) if a != self.axis]
        zyx = np.empty_like(idx)
        for c, a in enumerate(order):
            zyx[..., a] = idx[..., c]
        return geometry.index_zyx_to_ras(zyx)[..., 0]


@dataclass(frozen=True)
class _CoarseGrid:
    """Blocks of ``factor`` voxels (array order) of a fine grid, at most ``coarse_mm`` a side.

    The last block along an axis may be partial (the fine size need not be a multiple).
    """

    factor: tuple[int, int, int]
    fine_shape: tuple[int, int, int]
    geometry: Geometry  # the coarse grid: block centres, block spacing

    @classmethod
    def for_geometry(cls, geometry: Geometry, coarse_mm: float) -> _CoarseGrid:
        shape = geometry.shape_zyx
        f = tuple(
            max(1, min(int(coarse_mm / s + 1e-6), n)) if coarse_mm > 0 else 1
            for s, n in zip(geometry.spacing_zyx, shape)
        )
        f_xyz = np.asarray(f[::-1], dtype=float)
        spacing = np.asarray(geometry.spacing, dtype=float)
        origin = np.asarray(geometry.origin) + geometry.direction_matrix @ (spacing * (f_xyz - 1) / 2)
        size = tuple(-(-n // k) for n, k in zip(geometry.size, f[::-1]))
        coarse = Geometry(size, tuple(spacing * f_xyz), tuple(origin), geometry.direction)
        return cls(f, shape, coarse)  # type: ignore[arg-type]

    @property
    def trivial(self) -> bool:
        return self.factor == (1, 1, 1)

    def reduce(self, a: np.ndarray, op: np.ufunc, mean: bool = False, dtype=np.float32) -> np.ndarray:
        """Blockwise ``op`` (``np.add``, ``np.maximum``, ``np.minimum``) of a fine ``(Z, Y, X)``
        array, as ``dtype``; ``mean=True`` divides sums by the voxels per block."""
        for axis, k in enumerate(self.factor):
            if k == 1:
                continue
            at = (slice(None),) * axis
            out = np.array(a[(*at, slice(0, None, k))], dtype=dtype)
            for j in range(1, k):
                part = a[(*at, slice(j, None, k))]
                head = out[(*at, slice(0, part.shape[axis]))]
                op(head, part, out=head)
            if mean:
                n = a.shape[axis]
                count = np.minimum(k, n - np.arange(0, n, k)).astype(dtype)
                out /= count.reshape([-1 if i == axis else 1 for i in range(3)])
            a = out
        return np.asarray(a, dtype=dtype)

    def expand(self, a: np.ndarray) -> np.ndarray:
        """Coarse ``a`` repeated onto the fine grid (each voxel takes its block's value), C-contiguous."""
        for axis, k in enumerate(self.factor):
            if k > 1:
                a = np.repeat(a, k, axis=axis)[(slice(None),) * axis + (slice(0, self.fine_shape[axis]),)]
        return np.ascontiguousarray(a)


@dataclass(frozen=True)
class _BlockStats:
    """What the steps on a coarse grid need of each block's fine voxels (canonical arrays).

    A blended block misleads in three places: a block of skin and air, or of table shell and
    air, has a tissue mean (the body takes ``floor``: blocks that are tissue throughout); bowel
    gas blended with its wall has a lung-like mean (the lung test takes medians of ``sample``,
    one unblended voxel per block); a thin cortex blended with soft tissue has a soft-tissue mean
    (bone candidates are blocks with at least ``min_dense`` voxels above the threshold, counted
    by ``count_above``, one voxel could be noise, and with a ``peak`` well above it, as enhanced
    soft tissue just crossing the threshold has many such voxels). ``peak`` also seeds bone and
    finds bronchial walls.
    """

    floor: np.ndarray
    peak: np.ndarray
    sample: np.ndarray
    count_above: Callable[[float], np.ndarray]
    min_dense: int

    @classmethod
    def of(cls, hu: np.ndarray, grid: _CoarseGrid, can: _Canonical) -> _BlockStats:
        """Statistics of the fine ``(Z, Y, X)`` ``hu`` over ``grid``'s blocks, in ``can``'s order."""

        def count_above(threshold: float) -> np.ndarray:
            return can.to(grid.reduce(hu > threshold, np.add, dtype=np.uint8))

        fz, fy, fx = grid.factor
        return cls(
            floor=can.to(grid.reduce(hu, np.minimum)),
            peak=can.to(grid.reduce(hu, np.maximum)),
            sample=can.to(hu[::fz, ::fy, ::fx]),
            count_above=count_above,
            min_dense=2 if fz * fy * fx >= 4 else 1,
        )


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def body_mask(
    hu: np.ndarray,
    p: BuiltinParams,
    sp: tuple[float, float, float] | None = None,
    floor_hu: np.ndarray | None = None,
) -> np.ndarray:
    """Body (canonical array): tissue above ``body_hu`` in big pieces, holes filled slice-wise.

    An in-plane opening of ``table_open_mm`` first cuts thin things (table, cables, blanket
    folds); then every piece holding at least ``body_min_fraction`` of the largest one is kept, so
    arms lying beside the trunk stay in the body. ``floor_hu`` (block minima on a coarse grid)
    replaces ``hu`` in the threshold.
    """
    fg = (hu if floor_hu is None else floor_hu) > p.body_hu
    if sp is None or not fg.any():
        return fill_slices(_largest_component(fg))
    opened = opening(fg, disk(p.table_open_mm, sp))
    lab, n = ndi.label(opened)
    if n == 0:
        return fill_slices(_largest_component(fg))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= p.body_min_fraction * sizes.max()
    keep[0] = False
    big = keep[lab]
    # give back the surface that the opening shaved off the kept pieces
    return fill_slices(fg & dilate(big, disk(p.table_open_mm, sp)))


def _lung_air(
    hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams, sample_hu: np.ndarray | None = None
) -> np.ndarray:
    """Lung air: air components inside the body, off its rim, of lung-like median HU (of
    ``sample_hu``, unblended voxels, on a coarse grid)."""
    sample = hu if sample_hu is None else sample_hu
    rim = body & ~erode(body, disk(p.rim_mm, sp))
    air = (hu < p.air_hu) & body
    lab, n = ndi.label(air)
    if n == 0:
        return air
    sizes = np.bincount(lab.ravel())
    on_rim = np.bincount(lab[rim], minlength=n + 1)
    big = (sizes >= p.min_lung_ml / vox_ml) & (on_rim <= 0.02 * sizes)
    big[0] = False
    keep = np.zeros(n + 1, dtype=bool)
    if big.any():
        objects = ndi.find_objects(np.where(big[lab], lab, 0))
        for i in np.flatnonzero(big):
            sl = objects[i - 1]
            v = sample[sl][lab[sl] == i]
            v = v[v < p.air_hu]  # a coarse grid's edge blocks may sample tissue: air voxels only
            med = float(np.median(v)) if v.size else p.air_hu
            keep[i] = p.lung_median_hu[0] <= med <= p.lung_median_hu[1]
    return keep[lab]


def _trachea_start(
    lung_air: np.ndarray, body: np.ndarray, max_vox: float, p: BuiltinParams, lateral: Callable
) -> tuple[int, np.ndarray | None]:
    """``(top, blob)``: the tube-sized air blob nearest the body's centre (left-right) in the top
    slice of the lung air, or ``(top, None)``."""
    top = int(np.flatnonzero(lung_air.any(axis=(1, 2)))[-1])
    lab2, n2 = ndi.label(lung_air[top])
    areas = np.bincount(lab2.ravel())
    body_c = _centroid(body[top]) if body[top].any() else np.array(lung_air.shape[1:]) / 2
    best, best_d = 0, p.airway_max_offset_mm
    for i, c in enumerate(ndi.center_of_mass(lung_air[top], lab2, range(1, n2 + 1)), start=1):
        d = abs(lateral(np.array([top, *c])) - lateral(np.array([top, *body_c])))  # left-right mm
        if areas[i] <= max_vox and d < best_d:
            best, best_d = i, d
    return top, (lab2 == best if best else None)


def _tube_blobs(air: np.ndarray, current: np.ndarray, max_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """In-plane blobs of ``air`` that overlap ``current``: ``(tube-sized ones, the bigger ones)``."""
    lab2, n2 = ndi.label(air)
    hit = np.unique(lab2[current & (lab2 > 0)])
    areas = np.bincount(lab2.ravel(), minlength=n2 + 1)
    return np.isin(lab2, hit[areas[hit] <= max_vox]), np.isin(lab2, hit[areas[hit] > max_vox])


def _airways(
    lung_air: np.ndarray,
    body: np.ndarray,
    sp,
    vox_ml: float,
    p: BuiltinParams,
    lateral: Callable,
    pure_air: np.ndarray | None = None,
) -> np.ndarray:
    """Trachea + main bronchi inside ``lung_air`` (empty when not in the field of view).

    The trachea is the small air blob nearest the body's centre in the top slice of the lung air;
    it is followed down slice by slice through overlapping blobs that stay tube-sized (at most
    ``airway_max_cm2``), which follows both main bronchi after the carina and stops where a
    bronchus enters the lung (its blob merges with lung parenchyma in the slice). On a coarse
    grid a thin bronchial wall can vanish in the block means: ``pure_air`` (blocks that are air
    throughout) then tells the tube from the lung it touches before the bronchus is given up.
    """
    out = np.zeros_like(lung_air)
    if not lung_air.any():
        return out
    max_vox = p.airway_max_cm2 * 100.0 / (sp[1] * sp[2])
    top, current = _trachea_start(lung_air, body, max_vox, p, lateral)
    if current is None:
        return out
    out[top] = current
    max_len = int(p.airway_max_length_mm / sp[0])
    # A tube may touch the lung in a slice or two (partial volume); carry its footprint through
    # such contacts for at most ``airway_bridge_mm`` before giving that branch up.
    bridge_left = max_bridge = max(int(np.ceil(p.airway_bridge_mm / sp[0])), 0)
    for k in range(top - 1, max(top - max_len, -1), -1):
        nxt, big = _tube_blobs(lung_air[k], current, max_vox)
        if big.any() and pure_air is not None:
            tube, _ = _tube_blobs(pure_air[k] & big, current, max_vox)
            if tube.any():  # the wall shows in the blocks' peaks: the tube goes on
                nxt |= tube
                big = np.zeros_like(big)
        if big.any() and bridge_left > 0:
            nxt |= big & dilate(current, ndi.generate_binary_structure(2, 1))
            bridge_left -= 1
        elif not big.any():
            bridge_left = max_bridge
        if not nxt.any():
            break
        current = nxt
        out[k] = current
    if out.sum() * vox_ml < p.airway_min_ml:
        return np.zeros_like(out)
    return out


def contrast_pools(hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    """Contrast-filled blood pools (heart chambers, aorta): thick, homogeneous, 250-700 HU blobs."""
    dense = (hu > p.pool_hu) & body
    if not dense.any():
        return dense
    sl = nonzero_box(dense, 1)
    thick = opening(dense[sl], ball(p.pool_open_mm, sp))
    lab, n = ndi.label(thick)
    out = np.zeros_like(dense)
    if n == 0:
        return out
    keep = np.zeros(n + 1, dtype=bool)
    sub = hu[sl]
    for i, o in enumerate(ndi.find_objects(lab), start=1):
        v = sub[o][lab[o] == i]
        if v.size * vox_ml < p.pool_min_component_ml:
            continue
        med, p90 = np.percentile(v, [50, 90])
        keep[i] = med > p.pool_median_hu and p90 < p.pool_p90_max_hu
    out[sl] = keep[lab]
    return out


def _fill_small_holes(mask: np.ndarray, hu: np.ndarray, sp, max_cm2: float, min_hu: float) -> np.ndarray:
    """Fill in-plane holes up to ``max_cm2`` (marrow) whose mean HU is at least ``min_hu``."""
    holes, n = slice_holes(mask)
    if n == 0:
        return mask
    area_cm2 = np.bincount(holes.ravel(), minlength=n + 1) * sp[1] * sp[2] / 100.0
    keep = area_cm2 <= max_cm2
    if min_hu > -1000:
        keep &= np.asarray(ndi.mean(hu, holes, index=np.arange(n + 1))) >= min_hu
    keep[0] = False
    return mask | keep[holes]


def smooth_enhanced(hu: np.ndarray, dense: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    """Contrast-enhanced vessels and organs in ``dense``: thick regions whose HU is locally smooth.

    Bone is heterogeneous (cortex, trabeculae, marrow: local SD of ~40-250 HU over ``smooth_box_mm``),
    while an enhanced vessel lumen at 150-300 HU is smooth (local SD near the image noise,
    ~10-25 HU). Smooth pieces that survive an opening of ``smooth_open_mm`` and hold at least
    ``smooth_min_ml`` are returned, grown by ``smooth_margin_mm`` within ``dense``.
    """
    if not dense.any():
        return dense
    sl = nonzero_box(dense, 2)
    h = hu[sl].astype(np.float32)
    size = [max(1, round(p.smooth_box_mm / s)) | 1 for s in sp]  # odd box sizes
    mean = box_mean(h, size)
    sd = np.sqrt(np.maximum(box_mean(h * h, size) - mean * mean, 0.0))
    smooth = opening(dense[sl] & (sd < p.smooth_sd_hu), ball(p.smooth_open_mm, sp))
    smooth = _remove_small(smooth, int(np.ceil(p.smooth_min_ml / vox_ml)))
    out = np.zeros_like(dense)
    if smooth.any():
        out[sl] = dilate(smooth, ball(p.smooth_margin_mm, sp)) & dense[sl]
    return out


def bone_mask(
    hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams, stats: _BlockStats | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Bone (canonical array): dense voxels outside contrast pools, marrow holes filled.

    On a coarse grid (``stats``) a block is dense when enough of its voxels are, and seeds by its
    peak. Returns ``(bone, excluded, threshold)``: ``excluded`` marks the contrast pools and
    smooth enhanced regions (never bone), ``threshold`` is the bone HU threshold used.
    """
    peak = hu if stats is None else stats.peak
    pools = contrast_pools(hu, body, sp, vox_ml, p)
    if pools.any():
        pools = dilate(pools, ball(p.pool_margin_mm, sp))
    # Contrast-enhanced scans: enhanced myocardium and vessel walls exceed the plain threshold.
    threshold = p.bone_hu_contrast if pools.sum() * vox_ml >= p.pool_min_ml else p.bone_hu
    if stats is None:
        dense = hu > threshold
    else:  # enough dense voxels, and a peak well above the threshold: cortex, not enhanced tissue
        dense = stats.count_above(threshold) >= stats.min_dense
        dense &= stats.peak > (threshold + (p.seed_hu or threshold)) / 2
    bone = dense & body & ~pools
    excluded = pools
    if p.smooth_sd_hu > 0:
        smooth = smooth_enhanced(hu, bone, sp, vox_ml, p)
        bone &= ~smooth
        excluded = pools | smooth
    # pieces of at least min_bone_ml that (hysteresis) hold some dense, cortical voxels
    lab, n = ndi.label(bone)
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= np.ceil(p.min_bone_ml / vox_ml)
    if p.seed_hu is not None:
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[lab[(peak > p.seed_hu) & bone]] = True
        keep &= seeded
    keep[0] = False
    bone = keep[lab]
    if p.bone_close_mm > 0 and bone.any():  # close cortical rings that partial volume left open
        sl = nonzero_box(bone, int(np.ceil(p.bone_close_mm / min(sp))) + 1)
        bone[sl] |= closing(bone[sl], ball(p.bone_close_mm, sp)) & body[sl] & ~pools[sl]
    return _fill_small_holes(bone, hu, sp, p.max_marrow_cm2, p.min_marrow_hu), excluded, float(threshold)


def _split_two(comp: np.ndarray) -> list[np.ndarray]:
    """Split one mask holding both lungs into two (or return it whole).

    The cores are the voxels more than ``t`` 6-connected steps inside the mask, for the first
    ``t`` (up to 12) at which two cores of comparable size appear; every voxel then goes to the
    nearer core (ties to the larger one, so the result does not depend on the array order).
    """
    sl = nonzero_box(comp, 1)
    m = comp[sl]
    depth = ndi.distance_transform_cdt(m, metric="taxicab")
    for t in range(1, 13):
        lab, n = ndi.label(depth > t)
        if n == 0:
            break
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes, kind="stable")[-2:][::-1]
        if sizes[b] >= 0.1 * sizes[a]:
            dist_a = ndi.distance_transform_cdt(lab != a, metric="taxicab")
            dist_b = ndi.distance_transform_cdt(lab != b, metric="taxicab")
            nearer_a = m & (dist_a <= dist_b)
            out = []
            for part in (nearer_a, m & ~nearer_a):
                full = np.zeros_like(comp)
                full[sl] = part
                out.append(full)
            return out
    return [comp]


def _left_right(
    lungs: np.ndarray, body: np.ndarray, vox_ml: float, p: BuiltinParams, ras_x: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """``(left, right)`` lungs: pieces sided by the RAS x of their centre against the body's.

    ``ras_x(index (..., 3)) -> (...)`` maps canonical indices to RAS x (mm).
    """
    lab, n = ndi.label(lungs)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    comps = [lab == i for i in np.argsort(sizes[1:])[::-1] + 1 if sizes[i] * vox_ml >= p.min_lung_ml]
    body_x = float(ras_x(_centroid(body)))
    if comps:
        pts = np.argwhere(comps[0][:, ::2, ::2]) * [1, 2, 2]  # a sample is enough for a fraction
        side = ras_x(pts[:: max(len(pts) // 20000, 1)]) > body_x
        if 0.2 < side.mean() < 0.8:  # the largest piece holds both lungs
            comps = _split_two(comps[0]) + comps[1:]
    left = np.zeros_like(lungs)
    right = np.zeros_like(lungs)
    for c in comps:
        # RAS x grows towards the patient's right.
        (right if float(ras_x(_centroid(c))) > body_x else left)[...] |= c
    return left, right


def _fill_vessels(
    lung: np.ndarray, body: np.ndarray, airways: np.ndarray, sp, p: BuiltinParams
) -> np.ndarray:
    """One lung with its vessels: closed by ``lung_close_mm``, holes filled slice by slice."""
    if not lung.any():
        return lung
    pad = int(np.ceil(p.lung_close_mm / min(sp))) + 2
    sl = nonzero_box(lung, pad)
    closed = closing(lung[sl], ball(p.lung_close_mm, sp))
    out = np.zeros_like(lung)
    out[sl] = fill_slices(closed | lung[sl]) & body[sl] & ~airways[sl]
    return out


def _segment_grid(
    hu: np.ndarray,
    geometry: Geometry,
    p: BuiltinParams,
    say: Progress,
    fine: np.ndarray | None = None,
    grid: _CoarseGrid | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Steps 1-7 on one grid: ``(labels, excluded, bone_threshold)``, ``(Z, Y, X)`` arrays on it.

    ``labels`` is uint8 (``OUTSIDE``, ``BODY``, ``LUNG_LEFT``, ``LUNG_RIGHT``, ``AIRWAYS``,
    ``BONE``); ``excluded`` marks contrast pools and smooth enhanced regions (see
    :func:`bone_mask`). On a coarse grid ``hu`` holds the block means and ``fine`` the scan's own
    HU (``grid`` its blocks), for the statistics of :class:`_BlockStats`.
    """
    can = _Canonical.from_geometry(geometry)
    h = can.to(hu)
    stats = None if fine is None or grid is None else _BlockStats.of(fine, grid, can)
    sp, vox_ml = can.spacing, geometry.voxel_volume_ml

    def ras_x(idx: np.ndarray) -> np.ndarray:
        return can.ras_x(geometry, idx)

    say("body", 0.0)
    body = body_mask(h, p, sp, None if stats is None else stats.floor)
    say("lung air", 0.2)
    lung_air = _lung_air(h, body, sp, vox_ml, p, None if stats is None else stats.sample)
    say("airways", 0.35)
    pure_air = None if stats is None else lung_air & (stats.peak < p.air_hu)
    airways = _airways(lung_air, body, sp, vox_ml, p, lambda idx: float(ras_x(idx)), pure_air)
    airways = dilate(airways, ball(p.airway_wall_mm, sp)) & lung_air
    say("left / right lungs", 0.5)
    left, right = _left_right(lung_air & ~airways, body, vox_ml, p, ras_x)
    say("lung vessels", 0.65)
    left = _fill_vessels(left, body, airways, sp, p)
    right = _fill_vessels(right, body, airways, sp, p)
    overlap = left & right  # closing can make them meet at the junction line
    left &= ~overlap
    right &= ~overlap
    say("bone", 0.8)
    bone, excluded, threshold = bone_mask(h, body, sp, vox_ml, p, stats)
    labels = body.astype(np.uint8)  # BODY where body
    for value, m in ((BONE, bone), (AIRWAYS, airways), (LUNG_LEFT, left), (LUNG_RIGHT, right)):
        labels[m] = value  # later ones win: bone never overlaps a lung or an airway
    return can.back(labels), can.back(excluded), threshold


# --------------------------------------------------------------------------------------------
# refinement to the scan's grid
# --------------------------------------------------------------------------------------------


def _bit(label: int) -> int:
    return 1 << label


def _block_voxels(
    block: np.ndarray, coarse_shape: tuple[int, ...], factor: tuple[int, ...], fine_shape: tuple[int, ...]
) -> np.ndarray:
    """``(len(block), prod(factor))`` flat fine indices of the voxels of the coarse flat ``block``s.

    A partial last block repeats its last voxel (the same voxel, decided alike, twice).
    """
    coords = np.unravel_index(block, coarse_shape)
    strides = (fine_shape[1] * fine_shape[2], fine_shape[2], 1)
    base = sum(c.astype(np.int64) * (k * s) for c, k, s in zip(coords, factor, strides))
    grids = [g.ravel() for g in np.meshgrid(*(np.arange(k) for k in factor), indexing="ij")]
    flat = base[:, None] + sum(g * s for g, s in zip(grids, strides))[None, :]
    partial = np.zeros(len(block), dtype=bool)
    for c, k, n in zip(coords, factor, fine_shape):
        partial |= (c + 1) * k > n
    if partial.any():  # clip the voxels of partial blocks to the grid, axis by axis
        fine = [
            np.minimum(c[partial, None] * k + g[None, :], n - 1)
            for c, k, n, g in zip(coords, factor, fine_shape, grids)
        ]
        flat[partial] = sum(f * s for f, s in zip(fine, strides))
    return flat


def _enclosed(idx: np.ndarray, hu: np.ndarray, threshold: float, reach: dict[int, int]) -> np.ndarray:
    """Whether the fine flat ``idx`` voxels have a voxel above ``threshold`` on both sides, within
    ``reach[axis]`` voxels, along one of the in-plane array axes (the keys of ``reach``)."""
    flat_hu = hu.reshape(-1)
    strides = (hu.shape[1] * hu.shape[2], hu.shape[2], 1)
    out = np.zeros(idx.shape, dtype=bool)
    for axis, r in reach.items():
        coord = (idx // strides[axis]) % hu.shape[axis]
        sides = []
        for sign in (-1, 1):
            hit = np.zeros(idx.shape, dtype=bool)
            for d in range(1, r + 1):
                c = coord + sign * d
                ok = (c >= 0) & (c < hu.shape[axis])
                hit |= ok & (flat_hu[np.where(ok, idx + sign * d * strides[axis], idx)] > threshold)
            sides.append(hit)
        out |= sides[0] & sides[1]
    return out


def _refine(
    labels: np.ndarray,
    excluded: np.ndarray,
    hu: np.ndarray,
    grid: _CoarseGrid,
    p: BuiltinParams,
    bone_hu: float,
    reach: dict[int, int],
) -> np.ndarray:
    """Fine ``(Z, Y, X)`` uint8 label map from the coarse ``labels``.

    Blocks whose 3x3x3 neighbourhood is one structure keep it. In the others every voxel is
    decided by its own HU and the structures around its block:

    * air (below ``air_hu``) inside the body joins an adjacent lung (else an adjacent airway);
      tissue in a lung or airway block leaves it;
    * at the body's edge, voxels at or below ``body_hu`` next to outside blocks are outside, and
      voxels above it in outside blocks are body;
    * voxels above the bone threshold next to bone join it (never in a contrast pool or smooth
      enhanced block); voxels of a bone block at or below it leave it unless they are marrow,
      i.e. have cortex on both sides in-plane within ``reach`` (:func:`_enclosed`).
    """
    bits = np.left_shift(1, labels, dtype=np.uint8)
    near = box_or(bits)
    block = np.flatnonzero(near != bits)  # blocks next to another structure
    out = grid.expand(labels)
    if block.size == 0:
        return out
    own, near, excl = labels.ravel()[block], near.ravel()[block], excluded.ravel()[block]
    flat = _block_voxels(block, labels.shape, grid.factor, hu.shape)  # (blocks, voxels per block)
    v = hu.reshape(-1)[flat]
    new = np.repeat(own[:, None], flat.shape[1], axis=1)
    air = v < p.air_hu
    tube = np.isin(own, (LUNG_LEFT, LUNG_RIGHT, AIRWAYS))[:, None]
    new[tube & ~air] = BODY
    lung_side = np.where(near & _bit(LUNG_RIGHT), LUNG_RIGHT, LUNG_LEFT)
    air_to = np.where(
        near & (_bit(LUNG_LEFT) | _bit(LUNG_RIGHT)), lung_side, np.where(near & _bit(AIRWAYS), AIRWAYS, BODY)
    )
    joins = air & ((own != OUTSIDE)[:, None] & ~tube)
    new = np.where(joins, air_to.astype(np.uint8)[:, None], new)
    new[(v <= p.body_hu) & (new == BODY) & ((near & _bit(OUTSIDE)) > 0)[:, None]] = OUTSIDE
    new[(v > p.body_hu) & (own == OUTSIDE)[:, None]] = BODY
    dense = v > bone_hu
    leaves = (own == BONE)[:, None] & ~dense & (new == BONE)
    if leaves.any():
        leaves[leaves] = ~_enclosed(flat[leaves], hu, bone_hu, reach)
    new[leaves] = BODY
    new[dense & (new == BODY) & (((near & _bit(BONE)) > 0) & ~excl)[:, None]] = BONE
    out.reshape(-1)[flat] = new
    return out


def segment_labels(
    hu: np.ndarray, geometry: Geometry, params: BuiltinParams | None = None, progress: Progress | None = None
) -> np.ndarray:
    """``(Z, Y, X)`` uint8 label map of a CT in HU: ``OUTSIDE`` (0), ``BODY``, ``LUNG_LEFT``,
    ``LUNG_RIGHT``, ``AIRWAYS``, ``BONE`` (1-5); see :func:`segment_masks`."""
    p = params or BuiltinParams()
    say = progress or (lambda step, frac: None)
    hu = np.ascontiguousarray(hu)
    grid = _CoarseGrid.for_geometry(geometry, p.coarse_mm)
    if grid.trivial:
        labels, _, _ = _segment_grid(np.asarray(hu, dtype=np.float32), geometry, p, say)
    else:
        coarse, excluded, threshold = _segment_grid(
            grid.reduce(hu, np.add, mean=True), grid.geometry, p, say, hu, grid
        )
        say("refine", 0.9)
        slice_axis = _Canonical.from_geometry(geometry).axis
        sp = geometry.spacing_zyx
        reach = {a: max(1, round(p.marrow_reach_mm / sp[a])) for a in range(3) if a != slice_axis}
        labels = _refine(coarse, excluded, hu, grid, p, threshold, reach)
    say("done", 1.0)
    return labels


def _masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "body": labels != OUTSIDE,
        "lung_left": labels == LUNG_LEFT,
        "lung_right": labels == LUNG_RIGHT,
        "airways": labels == AIRWAYS,
        "bone": labels == BONE,
    }


def segment_masks(
    hu: np.ndarray,
    geometry: Geometry,
    params: BuiltinParams | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Segment body, lungs, airways and bone of a CT in HU.

    Args:
        hu: ``(Z, Y, X)`` HU array.
        geometry: its grid (used for mm-sized steps, superior direction and patient left/right).
        params: thresholds and sizes (defaults: :class:`BuiltinParams`).
        progress: optional ``callback(step, fraction)``.

    Returns:
        ``{"body", "lung_left", "lung_right", "airways", "bone"}``: bool ``(Z, Y, X)`` masks on the
        input grid (lungs, airways and bone never overlap; all lie in the body).
    """
    return _masks(segment_labels(hu, geometry, params, progress))


class BuiltinBackend:
    """Offline classical segmenter (no weights): ``lung`` and ``bone`` of a catalog.

    Extra masks ``body``, ``lung_left``, ``lung_right``, ``airways`` and ``bone`` are returned in
    ``AnatomySegmentation.classes``. Other catalog anatomies are reported absent.
    """

    name = "builtin"

    def __init__(self, params: BuiltinParams | None = None) -> None:
        self.params = params or BuiltinParams()

    def segment(self, ct, catalog=None, progress: Progress | None = None):
        catalog = catalog or CTRATE_CATALOG
        labels = segment_labels(ct.array, ct.geometry, self.params, progress)
        # builtin label -> catalog label (lung = both lungs); one lookup instead of a pass per mask
        lut = np.zeros(BONE + 1, dtype=np.uint8)
        for name, values in (("lung", (LUNG_LEFT, LUNG_RIGHT)), ("bone", (BONE,))):
            if name in catalog:
                lut[list(values)] = catalog.label(name)
        labelmap = lut[labels]
        return AnatomySegmentation.from_labelmap(
            labelmap, ct.geometry, catalog, self.name, classes=_masks(labels)
        )
