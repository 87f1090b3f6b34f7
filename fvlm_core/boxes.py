"""Bounding boxes of masks, as the slices that cut them out (``array[box]``)."""

from __future__ import annotations

import numpy as np


def nonzero_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero element of ``mask``, grown by ``margin`` (clipped).

    Args:
        mask: an n-dimensional array (non-zero: inside).
        margin: elements added on every side, kept inside the array.

    Returns:
        One slice per axis, or None when ``mask`` has no non-zero element.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    box = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return tuple(box)
