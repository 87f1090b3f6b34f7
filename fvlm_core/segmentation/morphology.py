"""Binary morphology for the built-in segmenter: scipy.ndimage's results, faster for small elements.

``scipy.ndimage.binary_dilation`` visits every voxel for every element of the structuring
element; on the built-in segmenter's coarse grid (about 3 mm) nearly every element is the
7-voxel cross, which is about 9x cheaper as seven whole-array shifted ORs. :func:`dilate`,
:func:`erode`, :func:`opening` and :func:`closing` return exactly what scipy returns (same border
rules) and hand larger elements to scipy. :func:`slice_holes` finds the holes of every slice in
one labelling instead of ``binary_fill_holes``'s flood fill per slice.

Arrays are ``(Z, Y, X)``-like 3-D (or 2-D) bool arrays; element shapes are odd and symmetric.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

SHIFT_MAX = 32  # elements up to this many voxels are applied as shifted array operations

_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndi.generate_binary_structure(2, 1)  # in-plane 4-connectivity (axis 0 = slices)


def ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing`` (mm per axis)."""
    r = np.maximum(np.floor(radius_mm / np.asarray(spacing, dtype=float)), 0).astype(int)
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    dist = sum((g * s / max(radius_mm, 1e-6)) ** 2 for g, s in zip(grids, spacing))
    return dist <= 1.0


def disk(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane (one slice thick along axis 0) structuring element of ``radius_mm``."""
    return ball(radius_mm, (1e9, spacing[1], spacing[2]))


def _offsets(structure: np.ndarray) -> list[tuple[int, ...]]:
    centre = np.array(structure.shape) // 2
    return [tuple(int(v) for v in o - centre) for o in np.argwhere(structure)]


def _shifted(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``(dst, src)``: ``a[src]`` holds the neighbours at ``offset`` of the voxels ``a[dst]``."""
    length = [max(n - abs(k), 0) for k, n in zip(offset, shape)]
    dst = tuple(slice(min(max(-k, 0), n), min(max(-k, 0), n) + m) for k, n, m in zip(offset, shape, length))
    src = tuple(slice(min(max(k, 0), n), min(max(k, 0), n) + m) for k, n, m in zip(offset, shape, length))
    return dst, src


def dilate(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask, structure)`` for a symmetric ``structure``."""
    if structure.sum() > SHIFT_MAX:
        return ndi.binary_dilation(mask, structure=structure)
    out = np.zeros_like(mask)
    for offset in _offsets(structure):
        dst, src = _shifted(offset, mask.shape)
        out[dst] |= mask[src]
    return out


def erode(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``ndi.binary_erosion(mask, structure)``: voxels beyond the array's edge count as background."""
    if structure.sum() > SHIFT_MAX:
        return ndi.binary_erosion(mask, structure=structure)
    out = mask.copy()
    for offset in _offsets(structure):
        dst, src = _shifted(offset, mask.shape)
        out[dst] &= mask[src]
        for axis, k in enumerate(offset):  # voxels whose neighbour lies beyond the edge
            if k:
                edge = slice(max(mask.shape[axis] - k, 0), None) if k > 0 else slice(0, -k)
                out[(slice(None),) * axis + (edge,)] = False
    return out


def opening(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, structure)``."""
    return dilate(erode(mask, structure), structure)


def closing(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``ndi.binary_closing(mask, structure)`` (which, like scipy's, erodes from the array's edge)."""
    return erode(dilate(mask, structure), structure)


def box_mean(a: np.ndarray, size: list[int]) -> np.ndarray:
    """``ndi.uniform_filter(a, size)`` for odd sizes (mirrored edges) as shifted sums; float32 in, out."""
    for axis, k in enumerate(size):
        r = k // 2
        if r == 0:
            continue
        pad = [(r, r) if i == axis else (0, 0) for i in range(a.ndim)]
        padded = np.pad(a, pad, mode="symmetric")  # numpy's "symmetric" is scipy's "reflect"
        n = a.shape[axis]
        out = padded[(slice(None),) * axis + (slice(0, n),)].copy()
        for j in range(1, k):
            out += padded[(slice(None),) * axis + (slice(j, j + n),)]
        a = out / np.float32(k)
    return a


def box_or(bits: np.ndarray) -> np.ndarray:
    """Bitwise OR of every voxel's 3x3x3 neighbourhood (integer array; three 1-D passes)."""
    for axis in range(bits.ndim):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(bits.ndim))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(bits.ndim))
        out = bits.copy()
        out[hi] |= bits[lo]
        out[lo] |= bits[hi]
        bits = out
    return bits


def slice_holes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """In-plane holes of a 3-D ``mask`` (axis 0 = slices), labelled: ``(labels, n)``.

    A hole is a 4-connected in-plane piece of background that does not reach its slice's edge,
    which is what ``ndi.binary_fill_holes`` fills slice by slice. Labels run 1..n with gaps
    (pieces reaching the edge are 0 like the mask).
    """
    lab, n = ndi.label(~mask, structure=_PLANE)
    edge = np.zeros(n + 1, dtype=bool)
    for face in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        edge[face] = True
    edge[0] = True
    return np.where(edge[lab], 0, lab), n


def fill_slices(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of every slice along axis 0 filled."""
    holes, _ = slice_holes(mask)
    return mask | (holes > 0)
