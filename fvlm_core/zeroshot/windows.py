"""Window planning: which model-space crops to encode so every anatomy is seen whole.

Two strategies over the same primitives (all on plain arrays in model space, ``(z, y, x)``):

* ``"shared"`` (default for ``analyze``): as few windows as possible. Anatomies whose joint
  bounding box fits in the model window share one crop, hence one ViT forward; an anatomy
  larger than the window gets a window grown to its extent (rounded up to the patch multiple;
  the model interpolates its position embeddings), which other anatomies may join if they fit.
* ``"reference"`` (the published CT-RATE evaluation): one window per anatomy centred on its
  bounding box, size ``max((112, 288, 352), extent)`` rounded up to the patch multiple; an
  anatomy keeping under 90% of its whole-volume voxels inside its window is dropped.

Bounding boxes come from one pass of :func:`scipy.ndimage.find_objects` over the label map
(the reference spent ~2.5 s per volume in ``torch.unique`` and full-volume meshgrids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Minimum window of the reference evaluation (z, y, x), in model-space voxels.
REFERENCE_MIN_SIZE_ZYX = (112, 288, 352)
#: Fraction of an anatomy's voxels its reference window must hold, else it is dropped.
REFERENCE_MIN_FRACTION = 0.9

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start inclusive, stop exclusive), zyx


@dataclass(frozen=True)
class WindowPlan:
    """One crop of the model-space volume.

    Attributes:
        start_zyx: index of the window's first voxel in the model-space volume (may be negative
            or run past the end: the crop is padded with air there).
        size_zyx: window size in voxels (a multiple of the patch size).
        anatomies: names of the anatomies scored from this window.
    """

    start_zyx: tuple[int, int, int]
    size_zyx: tuple[int, int, int]
    anatomies: tuple[str, ...]

    @property
    def center_zyx(self) -> tuple[float, float, float]:
        """Centre ``start + (size - 1) / 2``: ``preprocess.crop_window`` maps it back to ``start_zyx``."""
        return tuple(s + (n - 1) / 2.0 for s, n in zip(self.start_zyx, self.size_zyx))

    @property
    def stop_zyx(self) -> tuple[int, int, int]:
        return tuple(s + n for s, n in zip(self.start_zyx, self.size_zyx))

    def contains(self, box: Box) -> bool:
        lo, hi = box
        return all(s <= a and b <= e for s, e, a, b in zip(self.start_zyx, self.stop_zyx, lo, hi))

    def to_dict(self) -> dict:
        return {
            "start_zyx": list(self.start_zyx),
            "size_zyx": list(self.size_zyx),
            "anatomies": list(self.anatomies),
        }


def round_up(value: int, multiple: int) -> int:
    return int(-(-int(value) // int(multiple)) * int(multiple))


def anatomy_boxes(labels: np.ndarray, names: Sequence[str]) -> dict[str, Box]:
    """Bounding box of each anatomy (anatomy ``i`` = label ``i + 1``) present in ``labels``.

    One pass over the array (``scipy.ndimage.find_objects``). Absent anatomies are left out.
    """
    slices = ndimage.find_objects(np.asarray(labels).astype(np.int32, copy=False), max_label=len(names))
    out: dict[str, Box] = {}
    for name, sl in zip(names, slices):
        if sl is not None:
            out[name] = (tuple(int(s.start) for s in sl), tuple(int(s.stop) for s in sl))
    return out


def voxel_counts(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxels per label ``1..n_labels`` (index 0 = label 1), one ``bincount`` pass."""
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=n_labels + 1)
    return counts[1 : n_labels + 1]


def _extent(box: Box) -> np.ndarray:
    return np.asarray(box[1]) - np.asarray(box[0])


def _union(a: Box, b: Box) -> Box:
    return (
        tuple(int(v) for v in np.minimum(a[0], b[0])),
        tuple(int(v) for v in np.maximum(a[1], b[1])),
    )


def _centred(box: Box, size: Sequence[int]) -> tuple[int, int, int]:
    """Start index of a window of ``size`` centred on ``box``."""
    lo, hi = np.asarray(box[0]), np.asarray(box[1])
    centre = (lo + hi) // 2
    return tuple(int(c - s // 2) for c, s in zip(centre, size))


def _fit_size(extent: Sequence[int], min_size: Sequence[int], multiple: Sequence[int], max_size=None):
    size = [round_up(max(int(e), int(m)), k) for e, m, k in zip(extent, min_size, multiple)]
    if max_size is not None:
        size = [min(s, round_up(m, k)) for s, m, k in zip(size, max_size, multiple)]
    return tuple(size)


def plan_shared(
    boxes: Mapping[str, Box],
    window_zyx: Sequence[int],
    multiple_zyx: Sequence[int],
    order: Sequence[str] | None = None,
    max_size_zyx: Sequence[int] | None = None,
) -> list[WindowPlan]:
    """Fewest windows: greedily group anatomies whose joint box fits in a window.

    Largest anatomies are placed first; each later one joins the first group whose union box
    still fits in that group's window size, else opens a new group. A group's size is the model
    window, or the first anatomy's extent rounded up to ``multiple_zyx`` where that is larger.
    ``max_size_zyx`` caps window sizes (low-memory use); an anatomy cut by the cap is then only
    partly seen.
    """
    names = [n for n in (order or boxes) if n in boxes]
    names.sort(key=lambda n: -int(np.prod(_extent(boxes[n]))))
    groups: list[tuple[tuple[int, int, int], Box, list[str]]] = []  # (size, union box, names)
    for name in names:
        box = boxes[name]
        for i, (size, ubox, members) in enumerate(groups):
            joint = _union(ubox, box)
            if np.all(_extent(joint) <= np.asarray(size)):
                groups[i] = (size, joint, [*members, name])
                break
        else:
            groups.append((_fit_size(_extent(box), window_zyx, multiple_zyx, max_size_zyx), box, [name]))
    out_order = list(order or boxes)
    return [
        WindowPlan(_centred(ubox, size), size, tuple(sorted(members, key=out_order.index)))
        for size, ubox, members in groups
    ]


def plan_reference(
    boxes: Mapping[str, Box],
    multiple_zyx: Sequence[int],
    min_size_zyx: Sequence[int] = REFERENCE_MIN_SIZE_ZYX,
    order: Sequence[str] | None = None,
    max_size_zyx: Sequence[int] | None = None,
) -> list[WindowPlan]:
    """One window per anatomy, centred on its box, size ``max(min_size, extent)`` rounded up."""
    names = [n for n in (order or boxes) if n in boxes]
    plans = []
    for name in names:
        size = _fit_size(_extent(boxes[name]), min_size_zyx, multiple_zyx, max_size_zyx)
        plans.append(WindowPlan(_centred(boxes[name], size), size, (name,)))
    return plans


def fraction_inside(labels: np.ndarray, label: int, plan: WindowPlan, total: int) -> float:
    """Fraction of the ``total`` voxels of ``label`` that lie inside the window ``plan``."""
    if total <= 0:
        return 0.0
    sl = tuple(slice(max(s, 0), max(e, 0)) for s, e in zip(plan.start_zyx, plan.stop_zyx))
    inside = int(np.count_nonzero(labels[sl] == label))
    return inside / total


def drop_incomplete(
    labels: np.ndarray,
    names: Sequence[str],
    plans: Sequence[WindowPlan],
    min_fraction: float = REFERENCE_MIN_FRACTION,
) -> tuple[list[WindowPlan], dict[str, float]]:
    """Remove anatomies holding under ``min_fraction`` of their voxels inside their window.

    Returns the plans without those anatomies (windows left empty are removed) and the
    fraction kept per dropped anatomy.
    """
    counts = voxel_counts(labels, len(names))
    dropped: dict[str, float] = {}
    kept: list[WindowPlan] = []
    for plan in plans:
        keep = []
        for name in plan.anatomies:
            i = list(names).index(name)
            frac = fraction_inside(labels, i + 1, plan, int(counts[i]))
            if frac < min_fraction:
                dropped[name] = frac
            else:
                keep.append(name)
        if keep:
            kept.append(WindowPlan(plan.start_zyx, plan.size_zyx, tuple(keep)))
    return kept, dropped


def reference_min_size(window_zyx: Sequence[int]) -> tuple[int, int, int]:
    """Minimum reference window for a model window: ``(112, 288, 352)`` for the reference model's
    ``(112, 256, 352)``; other model spaces (e.g. a tiny CPU model) use their own window."""
    window = tuple(int(v) for v in window_zyx)
    return REFERENCE_MIN_SIZE_ZYX if window == (112, 256, 352) else window


def plan_windows(
    labels: np.ndarray,
    names: Sequence[str],
    window_zyx: Sequence[int],
    multiple_zyx: Sequence[int],
    strategy: str = "shared",
    max_size_zyx: Sequence[int] | None = None,
) -> tuple[list[WindowPlan], dict[str, float]]:
    """Plan windows over a model-space anatomy label map (anatomy ``i`` = label ``i + 1``).

    Returns ``(plans, dropped)`` where ``dropped`` maps an anatomy left out to the fraction of
    its voxels its window would have held (only the reference strategy, or a size cap, drops).
    Anatomies absent from ``labels`` are in no plan.
    """
    boxes = anatomy_boxes(labels, names)
    if strategy == "shared":
        plans = plan_shared(boxes, window_zyx, multiple_zyx, order=names, max_size_zyx=max_size_zyx)
    elif strategy == "reference":
        min_size = reference_min_size(window_zyx)
        plans = plan_reference(boxes, multiple_zyx, min_size, order=names, max_size_zyx=max_size_zyx)
    else:
        raise ValueError(f"unknown window strategy {strategy!r} (use 'shared' or 'reference')")
    if strategy == "reference" or max_size_zyx is not None:
        return drop_incomplete(labels, names, plans)
    return plans, {}
