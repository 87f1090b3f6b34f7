"""Built-in classical CT segmenter: body, left/right lung, airways and bone, with no weights.

Everything here is thresholds and morphology (numpy / scipy.ndimage / scikit-image), so it runs
offline in a few seconds on a CPU. It is meant as a dependable fallback and a test fixture, not a
replacement for TotalSegmentator: it knows only the lungs and bone (plus body and airways).

How it works (all distances in mm, so any voxel size works):

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
   junction) is split by eroding it until it falls apart, then growing the two cores back.
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

from fvlm_core.io import Geometry

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class BuiltinParams:
    """Thresholds (HU) and sizes (mm, ml) of the built-in segmenter."""

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


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing`` (canonical order)."""
    r = np.maximum(np.floor(radius_mm / np.asarray(spacing, dtype=float)), 0).astype(int)
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    dist = sum((g * s / max(radius_mm, 1e-6)) ** 2 for g, s in zip(grids, spacing))
    return dist <= 1.0


def _disk(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane (one slice thick) structuring element of ``radius_mm``."""
    b = _ball(radius_mm, (1e9, spacing[1], spacing[2]))
    return b


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every slice along axis 0."""
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k]) if mask[k].any() else mask[k]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def _bbox(mask: np.ndarray, pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n)) for i, n in zip(idx, shape)
    )


def _remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


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


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def body_mask(hu: np.ndarray, p: BuiltinParams, sp: tuple[float, float, float] | None = None) -> np.ndarray:
    """Body (canonical array): tissue above ``body_hu`` in big pieces, holes filled slice-wise.

    An in-plane opening of ``table_open_mm`` first cuts thin things (table, cables, blanket
    folds); then every piece holding at least ``body_min_fraction`` of the largest one is kept, so
    arms lying beside the trunk stay in the body.
    """
    fg = hu > p.body_hu
    if sp is None or not fg.any():
        return _fill_slices(_largest_component(fg))
    opened = ndi.binary_opening(fg, structure=_disk(p.table_open_mm, sp))
    lab, n = ndi.label(opened)
    if n == 0:
        return _fill_slices(_largest_component(fg))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= p.body_min_fraction * sizes.max()
    keep[0] = False
    big = keep[lab]
    # give back the surface that the opening shaved off the kept pieces
    body = fg & ndi.binary_dilation(big, structure=_disk(p.table_open_mm, sp))
    return _fill_slices(body)


def _lung_air(hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    rim = body & ~ndi.binary_erosion(body, structure=_disk(p.rim_mm, sp))
    air = (hu < p.air_hu) & body
    lab, n = ndi.label(air)
    if n == 0:
        return air
    sizes = np.bincount(lab.ravel())
    on_rim = np.bincount(lab[rim], minlength=n + 1)
    min_vox = p.min_lung_ml / vox_ml
    keep = np.zeros(n + 1, dtype=bool)
    objects = ndi.find_objects(lab)
    for i in np.nonzero(sizes >= min_vox)[0]:
        if i == 0 or on_rim[i] > 0.02 * sizes[i]:
            continue
        sl = objects[i - 1]
        med = float(np.median(hu[sl][lab[sl] == i]))
        keep[i] = p.lung_median_hu[0] <= med <= p.lung_median_hu[1]
    return keep[lab]


def _airways(
    hu: np.ndarray, lung_air: np.ndarray, body: np.ndarray, sp, vox_ml, p, lateral: Callable
) -> np.ndarray:
    """Trachea + main bronchi inside ``lung_air`` (empty when not in the field of view).

    The trachea is the small air blob nearest the body's centre in the top slice of the lung air;
    it is followed down slice by slice through overlapping blobs that stay tube-sized (at most
    ``airway_max_cm2``), which follows both main bronchi after the carina and stops where a
    bronchus enters the lung (its blob merges with lung parenchyma in the slice).
    """
    out = np.zeros_like(lung_air)
    if not lung_air.any():
        return out
    zs = np.nonzero(lung_air.any(axis=(1, 2)))[0]
    top = int(zs.max())
    max_vox = p.airway_max_cm2 * 100.0 / (sp[1] * sp[2])
    lab2, n2 = ndi.label(lung_air[top])
    if n2 == 0:
        return out
    areas = np.bincount(lab2.ravel())
    body_c = np.array(ndi.center_of_mass(body[top])) if body[top].any() else np.array(lung_air.shape[1:]) / 2
    best, best_d = 0, p.airway_max_offset_mm
    for i, c in enumerate(ndi.center_of_mass(lung_air[top], lab2, range(1, n2 + 1)), start=1):
        d = abs(lateral(np.array([top, *c])) - lateral(np.array([top, *body_c])))  # left-right mm
        if areas[i] <= max_vox and d < best_d:
            best, best_d = i, d
    if best == 0:
        return out
    current = lab2 == best
    out[top] = current
    max_len = int(p.airway_max_length_mm / sp[0])
    # A tube may touch the lung in a slice or two (partial volume); carry its footprint through
    # such contacts for at most ``airway_bridge_mm`` before giving that branch up.
    bridge_left = max_bridge = max(int(np.ceil(p.airway_bridge_mm / sp[0])), 0)
    for k in range(top - 1, max(top - max_len, -1), -1):
        lab2, n2 = ndi.label(lung_air[k])
        if n2 == 0:
            break
        hit = np.unique(lab2[current & (lab2 > 0)])
        if hit.size == 0:
            break
        areas = np.bincount(lab2.ravel(), minlength=n2 + 1)
        ok = hit[areas[hit] <= max_vox]
        nxt = np.isin(lab2, ok)
        big = hit[areas[hit] > max_vox]
        if big.size and bridge_left > 0:
            nxt |= np.isin(lab2, big) & ndi.binary_dilation(current)
            bridge_left -= 1
        elif not big.size:
            bridge_left = max_bridge
        if not nxt.any():
            break
        current = nxt
        out[k] = current
    if out.sum() * vox_ml < p.airway_min_ml:
        return np.zeros_like(out)
    return ndi.binary_dilation(out, structure=_ball(p.airway_wall_mm, sp)) & lung_air


def contrast_pools(hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    """Contrast-filled blood pools (heart chambers, aorta): thick, homogeneous, 250-700 HU blobs."""
    dense = (hu > p.pool_hu) & body
    if not dense.any():
        return dense
    sl = _bbox(dense, 1, dense.shape)
    thick = ndi.binary_opening(dense[sl], structure=_ball(p.pool_open_mm, sp))
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
    holes = _fill_slices(mask) & ~mask
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(holes, structure=plane)
    if n == 0:
        return mask
    area_cm2 = np.bincount(lab.ravel()) * sp[1] * sp[2] / 100.0
    mean_hu = ndi.mean(hu, lab, index=np.arange(n + 1)) if min_hu > -1000 else np.zeros(n + 1)
    keep = (area_cm2 <= max_cm2) & (np.asarray(mean_hu) >= min_hu if min_hu > -1000 else True)
    keep[0] = False
    return mask | keep[lab]


def smooth_enhanced(hu: np.ndarray, dense: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    """Contrast-enhanced vessels and organs in ``dense``: thick regions whose HU is locally smooth.

    Bone is heterogeneous (cortex, trabeculae, marrow: local SD of ~40-250 HU over ``smooth_box_mm``),
    while an enhanced vessel lumen at 150-300 HU is smooth (local SD near the image noise,
    ~10-25 HU). Smooth pieces that survive an opening of ``smooth_open_mm`` and hold at least
    ``smooth_min_ml`` are returned, grown by ``smooth_margin_mm`` within ``dense``.
    """
    if not dense.any():
        return dense
    sl = _bbox(dense, 2, dense.shape)
    h = hu[sl].astype(np.float32)
    size = [max(1, round(p.smooth_box_mm / s)) | 1 for s in sp]  # odd box sizes
    mean = ndi.uniform_filter(h, size)
    sd = np.sqrt(np.maximum(ndi.uniform_filter(h * h, size) - mean * mean, 0.0))
    smooth = dense[sl] & (sd < p.smooth_sd_hu)
    smooth = ndi.binary_opening(smooth, structure=_ball(p.smooth_open_mm, sp))
    smooth = _remove_small(smooth, int(np.ceil(p.smooth_min_ml / vox_ml)))
    out = np.zeros_like(dense)
    if smooth.any():
        out[sl] = ndi.binary_dilation(smooth, structure=_ball(p.smooth_margin_mm, sp)) & dense[sl]
    return out


def bone_mask(hu: np.ndarray, body: np.ndarray, sp, vox_ml: float, p: BuiltinParams) -> np.ndarray:
    """Bone (canonical array): dense voxels outside contrast pools, marrow holes filled."""
    pools = contrast_pools(hu, body, sp, vox_ml, p)
    if pools.any():
        pools = ndi.binary_dilation(pools, structure=_ball(p.pool_margin_mm, sp))
    # Contrast-enhanced scans: enhanced myocardium and vessel walls exceed the plain threshold.
    threshold = p.bone_hu_contrast if pools.sum() * vox_ml >= p.pool_min_ml else p.bone_hu
    bone = (hu > threshold) & body & ~pools
    if p.smooth_sd_hu > 0:
        bone &= ~smooth_enhanced(hu, bone, sp, vox_ml, p)
    bone = _remove_small(bone, int(np.ceil(p.min_bone_ml / vox_ml)))
    if p.seed_hu is not None:  # hysteresis: keep pieces holding some dense (cortical) voxels
        lab, n = ndi.label(bone)
        seeded = np.zeros(n + 1, dtype=bool)
        seeded[np.unique(lab[(hu > p.seed_hu) & bone])] = True
        seeded[0] = False
        bone = seeded[lab]
    if p.bone_close_mm > 0:  # close cortical rings that partial volume left open, then fill marrow
        sl = _bbox(bone, int(np.ceil(p.bone_close_mm / min(sp))) + 1, bone.shape) if bone.any() else None
        if sl is not None:
            closed = (
                ndi.binary_closing(bone[sl], structure=_ball(p.bone_close_mm, sp)) & body[sl] & ~pools[sl]
            )
            bone[sl] |= closed
    return _fill_small_holes(bone, hu, sp, p.max_marrow_cm2, p.min_marrow_hu)


def _split_two(comp: np.ndarray, sp) -> list[np.ndarray]:
    """Split one mask holding both lungs into two by erosion + regrowth (or return it whole)."""
    sl = _bbox(comp, 1, comp.shape)
    m = comp[sl]
    total = m.sum()
    core = m
    st = _ball(1.5 * min(sp), sp) if min(sp) < 1.5 else ndi.generate_binary_structure(3, 1)
    for _ in range(12):
        core = ndi.binary_erosion(core, structure=st)
        lab, n = ndi.label(core)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[-2:][::-1]
        if sizes[b] >= 0.1 * sizes[a]:
            markers = np.where(lab == a, 1, np.where(lab == b, 2, 0)).astype(np.int8)
            _, inds = ndi.distance_transform_edt(markers == 0, sampling=sp, return_indices=True)
            assigned = markers[tuple(inds)] * m
            out = []
            for v in (1, 2):
                full = np.zeros_like(comp)
                full[sl] = assigned == v
                out.append(full)
            return out
    del total
    return [comp]


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
        input grid.
    """
    p = params or BuiltinParams()
    say = progress or (lambda step, frac: None)
    can = _Canonical.from_geometry(geometry)
    h = can.to(np.asarray(hu, dtype=np.float32))
    sp = can.spacing
    vox_ml = geometry.voxel_volume_ml

    say("body", 0.0)
    body = body_mask(h, p, sp)
    say("lung air", 0.2)
    lung_air = _lung_air(h, body, sp, vox_ml, p)
    say("airways", 0.35)
    airways = _airways(h, lung_air, body, sp, vox_ml, p, lambda idx: float(can.ras_x(geometry, idx)))
    lungs = lung_air & ~airways

    say("left / right lungs", 0.5)
    lab, n = ndi.label(lungs)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    comps = [lab == i for i in np.argsort(sizes[1:])[::-1] + 1 if sizes[i] * vox_ml >= p.min_lung_ml]
    body_x = float(can.ras_x(geometry, np.array(ndi.center_of_mass(body))))
    if comps:
        pts = np.argwhere(comps[0])
        side = can.ras_x(geometry, pts[:: max(len(pts) // 20000, 1)]) > body_x
        if 0.2 < side.mean() < 0.8:  # the largest piece holds both lungs
            comps = _split_two(comps[0], sp) + comps[1:]
    left = np.zeros_like(lungs)
    right = np.zeros_like(lungs)
    for c in comps:
        x = float(can.ras_x(geometry, np.array(ndi.center_of_mass(c))))
        # RAS x grows towards the patient's right.
        (right if x > body_x else left)[...] |= c

    say("lung vessels", 0.65)
    filled = []
    for m in (left, right):
        if not m.any():
            filled.append(m)
            continue
        pad = int(np.ceil(p.lung_close_mm / min(sp))) + 2
        sl = _bbox(m, pad, m.shape)
        closed = ndi.binary_closing(m[sl], structure=_ball(p.lung_close_mm, sp))
        closed = _fill_slices(closed | m[sl]) & body[sl] & ~airways[sl]
        out = np.zeros_like(m)
        out[sl] = closed
        filled.append(out)
    left, right = filled
    overlap = left & right  # closing can make them meet at the junction line
    left &= ~overlap
    right &= ~overlap

    say("bone", 0.8)
    bone = bone_mask(h, body, sp, vox_ml, p) & ~(left | right)
    say("done", 1.0)
    return {
        "body": can.back(body),
        "lung_left": can.back(left),
        "lung_right": can.back(right),
        "airways": can.back(airways),
        "bone": can.back(bone),
    }


class BuiltinBackend:
    """Offline classical segmenter (no weights): ``lung`` and ``bone`` of a catalog.

    Extra masks ``body``, ``lung_left``, ``lung_right``, ``airways`` and ``bone`` are returned in
    ``AnatomySegmentation.classes``. Other catalog anatomies are reported absent.
    """

    name = "builtin"

    def __init__(self, params: BuiltinParams | None = None) -> None:
        self.params = params or BuiltinParams()

    def segment(self, ct, catalog=None, progress: Progress | None = None):
        from fvlm_core.anatomy import CTRATE_CATALOG
        from fvlm_core.segmentation.base import AnatomySegmentation

        catalog = catalog or CTRATE_CATALOG
        masks = segment_masks(ct.array, ct.geometry, self.params, progress)
        labelmap = np.zeros(ct.geometry.shape_zyx, dtype=np.uint8)
        # catalog anatomy -> builtin mask (lung = both lungs)
        provided = {"lung": masks["lung_left"] | masks["lung_right"], "bone": masks["bone"]}
        for name, m in provided.items():
            if name in catalog:
                labelmap[m & (labelmap == 0)] = catalog.label(name)
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, self.name, classes=masks)
