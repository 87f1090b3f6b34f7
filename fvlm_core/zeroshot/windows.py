"""Window planning: which model-space crops to encode so every anatomy is seen.

Three strategies over the same primitives (all on plain arrays in model space, ``(z, y, x)``):

* ``"shared"`` (default for ``analyze``): as few windows as possible. Anatomies whose joint
  bounding box fits in the model window share one crop, hence one ViT forward; an anatomy
  larger than the window gets a window grown to its extent (rounded up to the patch multiple;
  the model interpolates its position embeddings), which other anatomies may join if they fit.
* ``"centred"``: one window per anatomy, centred on its bounding box (the crop may run past the
  volume: padded with air), size ``max(minimum, extent)`` rounded up to the patch multiple, so
  the whole anatomy is always inside.
* ``"reference"``: the public fVLM ``eval.py`` exactly (``center_crop``), on a volume prepared as
  its ``data/preprocess.py`` prepares it (:func:`fvlm_core.preprocess.reference_volume`): per
  anatomy, size ``max((112, 288, 352), max - min)`` per axis (inclusive box maxima, so the
  extent is one less than the voxel span), centre ``(min + max) // 2``, start
  ``max(0, centre - size // 2)``, end ``min(dim, start + size)``, and ``start = max(0, end -
  size)`` when the window came out short: the window stays inside the volume. It is then padded
  at its end to the patch multiple with 0 in [0, 1] intensity (-1150 HU), and its label map holds
  only the target anatomy. The reference's 90% rule exempts the target, so it never drops it.

A size cap (``max_size_zyx``, low-memory use) applies to ``shared`` / ``centred`` windows; an
anatomy keeping under 90% of its voxels inside its capped window is then not scored (a rule of
this project, see :func:`drop_incomplete`).

Bounding boxes come from one pass of :func:`scipy.ndimage.find_objects` over the label map
(the reference spent ~2.5 s per volume in ``torch.unique`` and full-volume meshgrids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from fvlm_core.preprocess import reference_volume, reference_window

#: Minimum window of the reference evaluation (z, y, x), in model-space voxels (eval.py's roi_size).
REFERENCE_MIN_SIZE_ZYX = (112, 288, 352)
#: Fraction of an anatomy's voxels a capped window must hold, else it is not scored.
MIN_FRACTION = 0.9
STRATEGIES = ("shared", "centred", "reference")

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start inclusive, stop exclusive), zyx


@dataclass(frozen=True)
class WindowPlan:
    """One crop of the model-space volume.

    Attributes:
        start_zyx: index of the window's first voxel in the model-space volume (may be negative
            or run past the end: the crop is padded there).
        size_zyx: window size in voxels (a multiple of the patch size).
        anatomies: names of the anatomies scored from this window.
        data_size_zyx: reference windows only: the voxels taken from the (prepared) volume from
            ``start_zyx``; the rest of ``size_zyx`` is padding at the end of each axis.
    """

    start_zyx: tuple[int, int, int]
    size_zyx: tuple[int, int, int]
    anatomies: tuple[str, ...]
    data_size_zyx: tuple[int, int, int] | None = None

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

    def shifted(self, offset_zyx: Sequence[int]) -> WindowPlan:
        """The same window with its start moved by ``offset_zyx`` (another volume's frame)."""
        start = tuple(int(s) + int(o) for s, o in zip(self.start_zyx, offset_zyx))
        return WindowPlan(start, self.size_zyx, self.anatomies, self.data_size_zyx)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "start_zyx": list(self.start_zyx),
            "size_zyx": list(self.size_zyx),
            "anatomies": list(self.anatomies),
        }
        if self.data_size_zyx is not None:
            out["data_size_zyx"] = list(self.data_size_zyx)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> WindowPlan:
        """The inverse of :meth:`to_dict`."""
        data = d.get("data_size_zyx")
        return cls(
            tuple(int(v) for v in d["start_zyx"]),
            tuple(int(v) for v in d["size_zyx"]),
            tuple(d["anatomies"]),
            None if data is None else tuple(int(v) for v in data),
        )


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


def plan_centred(
    boxes: Mapping[str, Box],
    multiple_zyx: Sequence[int],
    min_size_zyx: Sequence[int] = REFERENCE_MIN_SIZE_ZYX,
    order: Sequence[str] | None = None,
    max_size_zyx: Sequence[int] | None = None,
) -> list[WindowPlan]:
    """One window per anatomy, centred on its box, size ``max(min_size, extent)`` rounded up
    (the whole anatomy inside; the window may run past the volume)."""
    names = [n for n in (order or boxes) if n in boxes]
    plans = []
    for name in names:
        size = _fit_size(_extent(boxes[name]), min_size_zyx, multiple_zyx, max_size_zyx)
        plans.append(WindowPlan(_centred(boxes[name], size), size, (name,)))
    return plans


def reference_window_box(
    box: Box, shape_zyx: Sequence[int], roi_zyx: Sequence[int] = REFERENCE_MIN_SIZE_ZYX
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(start, data_size)`` of eval.py's ``center_crop`` for one anatomy box in a volume of
    ``shape_zyx`` (before the padding to the patch multiple)."""
    start, data = [], []
    for lo, stop, dim, roi in zip(box[0], box[1], shape_zyx, roi_zyx):
        hi = stop - 1  # inclusive maximum, as masks_to_boxes_3d returns it
        size = max(int(roi), hi - lo)  # eval.py: max(crop_size, max - min)
        centre = (lo + hi) // 2
        s = max(0, centre - size // 2)
        e = min(int(dim), s + size)
        if e - s < size:
            s = max(0, e - size)
        start.append(s)
        data.append(e - s)
    return tuple(start), tuple(data)


def plan_reference(
    boxes: Mapping[str, Box],
    shape_zyx: Sequence[int],
    multiple_zyx: Sequence[int],
    roi_zyx: Sequence[int] = REFERENCE_MIN_SIZE_ZYX,
    order: Sequence[str] | None = None,
) -> list[WindowPlan]:
    """eval.py's windows: one per anatomy (see the module docstring), in the frame of the
    volume the boxes come from (a reference-prepared volume)."""
    names = [n for n in (order or boxes) if n in boxes]
    plans = []
    for name in names:
        start, data = reference_window_box(boxes[name], shape_zyx, roi_zyx)
        size = tuple(round_up(d, k) for d, k in zip(data, multiple_zyx))  # DivisiblePad(k), method end
        plans.append(WindowPlan(start, size, (name,), data_size_zyx=data))
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
    min_fraction: float = MIN_FRACTION,
) -> tuple[list[WindowPlan], dict[str, float]]:
    """Remove anatomies holding under ``min_fraction`` of their voxels inside their window.

    Only capped windows can cut an anatomy (uncapped ``shared`` / ``centred`` windows hold it
    whole). Returns the plans without those anatomies (windows left empty are removed) and the
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

    For ``"reference"``, ``labels`` must be those of a reference-prepared volume
    (:func:`fvlm_core.preprocess.reference_volume`; :func:`reference_crops` does both).

    Returns ``(plans, dropped)`` where ``dropped`` maps an anatomy left out to the fraction of
    its voxels its window would have held (only with a size cap). Anatomies absent from
    ``labels`` are in no plan.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown window strategy {strategy!r} (use one of {', '.join(STRATEGIES)})")
    boxes = anatomy_boxes(labels, names)
    if strategy == "reference":
        if max_size_zyx is not None:
            raise ValueError(
                "the reference windows have no size cap (eval.py has none): use the 'centred' or "
                "'shared' strategy with a maximum window size"
            )
        roi = reference_min_size(window_zyx)
        return plan_reference(boxes, np.shape(labels), multiple_zyx, roi, order=names), {}
    if strategy == "shared":
        plans = plan_shared(boxes, window_zyx, multiple_zyx, order=names, max_size_zyx=max_size_zyx)
    else:
        min_size = reference_min_size(window_zyx)
        plans = plan_centred(boxes, multiple_zyx, min_size, order=names, max_size_zyx=max_size_zyx)
    if max_size_zyx is not None:
        return drop_incomplete(labels, names, plans)
    return plans, {}


def reference_crops(ct_ms, labels_ms, names: Sequence[str], model_space) -> list[tuple[WindowPlan, Any]]:
    """eval.py's windows of a model-space volume, cut: ``[(plan, window), ...]``, one per anatomy
    present, in ``names`` order.

    The volume is first prepared as the reference prepares it
    (:func:`fvlm_core.preprocess.reference_volume`: crop to all anatomies plus a margin, pad to at
    least the model window with -1150 HU). Each ``plan`` is given in the frame of ``ct_ms``
    (``start_zyx`` may be negative where the preparation padded); each window
    (:class:`fvlm_core.preprocess.ModelSpaceWindow`) holds only its anatomy's label and gives the
    reference's [0, 1] intensities from ``image()``.

    Args:
        ct_ms: :class:`~fvlm_core.io.CTVolume` float HU on the model-space grid.
        labels_ms: :class:`~fvlm_core.io.LabelVolume`, anatomy ``i`` of ``names`` = ``i + 1``.
        names: the model's anatomies.
        model_space: :class:`~fvlm_core.preprocess.ModelSpaceConfig`.
    """
    if not np.any(labels_ms.array):
        return []  # eval.py scores no anatomy of such a volume
    prepared = reference_volume(ct_ms, labels_ms, model_space.window_size_zyx)
    plans, _ = plan_windows(
        prepared.labels.array, names, model_space.window_size_zyx, model_space.multiple_zyx, "reference"
    )
    out = []
    for plan in plans:
        label = list(names).index(plan.anatomies[0]) + 1
        window = reference_window(prepared, plan.start_zyx, plan.data_size_zyx, plan.size_zyx, label)
        out.append((plan.shifted(prepared.offset_zyx), window))
    return out
