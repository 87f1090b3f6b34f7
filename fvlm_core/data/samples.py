"""Cached samples -> training items -> batches: the random crop to the model window, random flips,
the intact-anatomy rule, and the global-batch sampler that makes runs layout-independent.

The input is a :class:`~fvlm_core.data.cache.CachedSample` (what ``fvlm prepare`` writes, what
:class:`~fvlm_core.data.cache.CacheSamples` reads, what the demo and the tests build in memory).
An *item* (:func:`make_item`) is a dict, for ``A`` model anatomies and a crop ``(Z, Y, X)``::

    name: str                          texts: list of A str        report: str (whole report)
    image: float32 (1, Z, Y, X) in [0, 1] (HU windowed)
    labels: uint8 (Z, Y, X) anatomy label map in the model's order (anatomy a = a + 1)
    present: bool (A,)  the anatomy is intact in the crop and has a text
    abnormal: bool (A,)  text_ids: int64 (A,)  finding_ids: int64 (A,)   (targets of the loss)

:func:`collate` stacks items into a batch. Determinism: the augmentation of a sample is drawn from
``default_rng([seed, epoch, position])`` where ``position`` is the sample's place in the epoch's
global permutation (:class:`GlobalBatchSampler`), so it does not depend on the number of
processes, data-loader workers, or where a run was resumed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai import transforms
from monai.utils import MAX_SEED, TraceKeys, convert_to_tensor

from fvlm_core.anatomy import AnatomyCatalog, get_catalog
from fvlm_core.data.cache import CachedSample, CacheSamples
from fvlm_core.errors import DataError
from fvlm_core.loss import finding_set_id, stable_text_id

log = logging.getLogger("fvlm.data")

#: Tensors of an item that :func:`collate` stacks.
STACKED_KEYS = ("image", "labels", "present", "abnormal", "text_ids", "finding_ids")


@dataclass
class AugmentConfig:
    """``crop_size``: model window (z, y, x); ``random_crop``: False = centre crop;
    ``flip_prob``: per-axis flip probability (reference 0.2); ``intact_rule``: ``interior``
    (an anatomy is dropped when a mask voxel lies on a crop face that cuts through the volume)
    or ``strict`` (any of the 6 crop faces, even where it coincides with the volume border);
    ``pad_offset``: where a volume shorter than the crop along an axis lies in it, ``random``
    (a random offset: a shift augmentation) or ``centre`` (the reference: ``data/preprocess.py``
    pads symmetrically as MONAI's ``SpatialPadd`` does, so its random crop has no freedom there)."""

    crop_size: tuple[int, int, int]
    flip_prob: float = 0.2
    random_crop: bool = True
    intact_rule: str = "interior"
    hu_window: tuple[float, float] = (-1150.0, 350.0)
    pad_hu: float = -1024.0
    pad_offset: str = "random"

    def __post_init__(self) -> None:
        if self.intact_rule not in ("interior", "strict"):
            raise ValueError(f"intact_rule must be 'interior' or 'strict', got {self.intact_rule!r}")
        if self.pad_offset not in ("random", "centre"):
            raise ValueError(f"pad_offset must be 'random' or 'centre', got {self.pad_offset!r}")


def _pads(shape: Sequence[int], cfg: AugmentConfig) -> tuple[list[Any], list[int]]:
    """MONAI pads that bring each axis shorter than the crop to where the crop takes it from, and
    the padding before the volume on each axis: ``centre`` pads symmetrically to the crop size
    (the reference's ``SpatialPadd``: the crop has no freedom there); ``random`` pads ``crop - dim``
    on both sides, so the random crop puts the volume at a uniformly drawn offset in it."""
    size = [int(c) for c in cfg.crop_size]
    short = [max(0, c - d) for c, d in zip(size, shape)]
    if cfg.pad_offset == "centre" or not cfg.random_crop:
        spatial = size
        before = [n // 2 for n in short]
    else:
        spatial = [d + 2 * n for d, n in zip(shape, short)]
        before = short
    pads = [
        transforms.SpatialPadd("image", spatial, method="symmetric", constant_values=cfg.pad_hu),
        transforms.SpatialPadd("label", spatial, method="symmetric", constant_values=0),
    ]
    return pads, before


def _cropped_before(label: Any) -> list[int]:
    """Per spatial axis, the voxels the last crop of a MONAI-traced ``label`` removed before its start."""
    crop = next(
        op for op in reversed(label.applied_operations) if "cropped" in op.get(TraceKeys.EXTRA_INFO, {})
    )
    return [int(n) for n in crop[TraceKeys.EXTRA_INFO]["cropped"][0::2]]


def _intact(
    lab: np.ndarray, shape: Sequence[int], plans: list[tuple[int, int, int]], cfg, num_anatomies: int
):
    """``(A,)`` bool: the anatomy has voxels in the crop ``lab`` and none on a cutting crop face
    (``cfg.intact_rule``); ``plans`` holds per axis (volume start, volume end, offset in the crop)."""
    size = lab.shape
    cut = np.zeros(num_anatomies + 1, dtype=bool)
    for axis, (a, b, o) in enumerate(plans):
        faces = []
        if cfg.intact_rule == "strict":
            faces = [0, size[axis] - 1]
        else:  # a face cuts the anatomy only where the volume continues beyond it
            if a > 0:
                faces.append(o)
            if b < shape[axis]:
                faces.append(o + (b - a) - 1)
        for f in faces:
            vals = np.unique(np.take(lab, f, axis=axis))
            vals = vals[(vals > 0) & (vals <= num_anatomies)]
            cut[vals] = True
    counts = np.bincount(lab.ravel(), minlength=num_anatomies + 1)[: num_anatomies + 1]
    return (counts[1:] > 0) & ~cut[1:]


@dataclass
class _Pipelines:
    """The MONAI transforms of one crop geometry, built once, their random transforms drawing from
    two ``RandomState``s reseeded per sample: building them for every sample, with a new
    ``RandomState`` per random transform, doubled the cost of a demo-size crop (3.9 ms against 2.0
    ms per 32x48x48 crop of a 40x64x64 phantom). Not for concurrent use from threads (data-loader
    workers are processes)."""

    crop: transforms.Compose
    flips: transforms.Compose
    crop_state: np.random.RandomState
    flip_state: np.random.RandomState
    before: list[int]


def _pipelines(shape: tuple[int, ...], cfg: AugmentConfig) -> _Pipelines:
    """The pipelines for a ``(Z, Y, X)`` volume of ``shape`` under ``cfg`` (cached per geometry)."""
    crop_size = tuple(int(c) for c in cfg.crop_size)
    return _built_pipelines(shape, crop_size, cfg.flip_prob, cfg.random_crop, cfg.pad_hu, cfg.pad_offset)


@functools.lru_cache(maxsize=32)  # bounded: every CT of a dataset can have its own shape
def _built_pipelines(
    shape: tuple[int, ...],
    crop_size: tuple[int, ...],
    flip_prob: float,
    random_crop: bool,
    pad_hu: float,
    pad_offset: str,
) -> _Pipelines:
    cfg = AugmentConfig(crop_size, flip_prob, random_crop, pad_hu=pad_hu, pad_offset=pad_offset)
    pads, before = _pads(shape, cfg)
    keys = ["image", "label"]
    cut = transforms.RandSpatialCropd(keys, list(crop_size), random_size=False)
    crop = transforms.Compose(
        [*pads, cut if random_crop else transforms.CenterSpatialCropd(keys, list(crop_size))]
    )
    flips = transforms.Compose(
        [transforms.RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    )
    # after the Compose objects: building one gives each of its random transforms a state of its own
    crop_state, flip_state = np.random.RandomState(0), np.random.RandomState(0)
    cut.set_random_state(state=crop_state)
    for flip in flips.transforms:
        flip.set_random_state(state=flip_state)
    return _Pipelines(crop, flips, crop_state, flip_state, before)


def crop_flip(
    hu: np.ndarray,
    labels: np.ndarray,
    cfg: AugmentConfig,
    num_anatomies: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop (or pad) ``(Z, Y, X)`` arrays to ``cfg.crop_size``, flip, and tell which anatomies are intact.

    The reference's own MONAI transforms (``lavis/processors/blip_processors.py``:
    ``RandSpatialCropd``, then ``RandFlipd`` on each axis; ``data/preprocess.py``: ``SpatialPadd``),
    seeded from two draws of ``rng`` (crop, flips); ``random_crop: false`` crops the centre
    (``CenterSpatialCropd``).

    Returns:
        ``hu (Z, Y, X) float32``, ``labels (Z, Y, X) uint8`` and ``intact (A,) bool``: the
        anatomy has voxels in the crop and none on a cutting crop face (``cfg.intact_rule``).
    """
    shape = tuple(int(d) for d in hu.shape)
    size = [int(c) for c in cfg.crop_size]
    run = _pipelines(shape, cfg)
    run.crop_state.seed(int(rng.integers(MAX_SEED)))
    run.flip_state.seed(int(rng.integers(MAX_SEED)))
    data = {
        "image": np.asarray(hu, dtype=np.float32)[None],
        "label": np.asarray(labels, dtype=np.uint8)[None],
    }
    data = run.crop(data)
    plans = []  # per axis: (volume start, volume end, offset in the crop)
    for d, c, pad, start in zip(shape, size, run.before, _cropped_before(data["label"])):
        a = max(0, start - pad)
        plans.append((a, min(d, start + c - pad), max(0, pad - start)))
    intact = _intact(np.asarray(data["label"][0]), shape, plans, cfg, num_anatomies)
    data = run.flips(data)
    return np.ascontiguousarray(data["image"][0]), np.ascontiguousarray(data["label"][0]), intact


@functools.lru_cache(maxsize=8)
def hu_scaling(window: tuple[float, float]) -> transforms.ScaleIntensityRange:
    """The reference's intensity scaling (``data/preprocess.py``'s ``ScaleIntensityRanged``): HU in
    ``window`` to [0, 1], clipped; equal, bit for bit, to :func:`fvlm_core.preprocess.window_hu`."""
    return transforms.ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)


def check_sample(sample: CachedSample) -> None:
    """Raise :class:`~fvlm_core.errors.DataError` unless ``hu`` and ``labels`` are equal 3D shapes."""
    hu, labels = np.asarray(sample.hu), np.asarray(sample.labels)
    if hu.ndim != 3 or labels.ndim != 3 or hu.shape != labels.shape:
        raise DataError(
            f"sample {sample.name!r}: hu {hu.shape} and labels {labels.shape} must be equal (Z, Y, X) shapes"
        )


def make_item(
    sample: CachedSample,
    catalog: AnatomyCatalog,
    finding_anatomy: Mapping[str, str],
    augment: AugmentConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The training item of ``sample`` (keys in the module docstring).

    Args:
        catalog: the model's anatomies; the sample's label values (named by ``sample.anatomies``)
            are relabelled into its order.
        finding_anatomy: finding label -> anatomy, to give each anatomy the id of its positive
            findings (``finding_ids``; the disease-aware pairing of the loss).
        augment: crop, flips and HU window.
        rng: the sample's augmentation generator (:func:`crop_flip` draws from it).
    """
    check_sample(sample)
    anatomies = catalog.names
    labels = catalog.relabel(np.asarray(sample.labels), sample.anatomies)
    hu, lab, intact = crop_flip(np.asarray(sample.hu), labels, augment, len(anatomies), rng)
    texts = [sample.texts.get(a) or "" for a in anatomies]
    positives = {k for k, v in sample.finding_labels.items() if v and int(v) > 0}
    present = np.array([bool(ok) and bool(t.strip()) for ok, t in zip(intact, texts)], dtype=bool)
    abnormal = np.array([bool(sample.abnormal.get(a, False)) for a in anatomies], dtype=bool)
    text_ids = np.array([stable_text_id(t) for t in texts], dtype=np.int64)
    finding_ids = np.array(
        [finding_set_id({f for f in positives if finding_anatomy.get(f) == a}) for a in anatomies],
        dtype=np.int64,
    )
    return {
        "name": sample.name,
        "image": convert_to_tensor(hu_scaling(tuple(augment.hu_window))(hu[None]), dtype=torch.float32),
        "labels": torch.from_numpy(lab),
        "present": torch.from_numpy(present),
        "abnormal": torch.from_numpy(abnormal),
        "text_ids": torch.from_numpy(text_ids),
        "finding_ids": torch.from_numpy(finding_ids),
        "texts": texts,
        "report": str(sample.report or ""),
    }


class TrainingSamples(torch.utils.data.Dataset):
    """Augmented items of a dataset of :class:`~fvlm_core.data.cache.CachedSample` s.

    ``__getitem__((index, epoch, position))`` (the keys :class:`GlobalBatchSampler` yields)
    returns :func:`make_item` of sample ``index`` with the generator of ``(seed, epoch,
    position)``, or a ``{"failed": ...}`` record when the sample is unusable (logged; the batch
    goes on without it and the trainer counts it). From a :class:`~fvlm_core.data.cache.CacheSamples`
    with ``reconstruction="random"`` the scan's reconstruction is drawn from a second generator
    of the same key, so the crop and flip draws are those of a single-reconstruction scan.

    Args:
        base: a :class:`~fvlm_core.data.cache.CacheSamples` or any sequence of ``CachedSample``.
        anatomies: the model's anatomies (item order).
        finding_anatomy: finding label -> anatomy (see :func:`make_item`).
        augment: crop and flips.
        seed: the run's seed.
    """

    def __init__(
        self,
        base: Sequence[CachedSample] | CacheSamples,
        anatomies: Sequence[str],
        finding_anatomy: Mapping[str, str],
        augment: AugmentConfig,
        seed: int,
    ) -> None:
        self.base = base
        self.catalog = get_catalog(list(anatomies))
        self.finding_anatomy = dict(finding_anatomy)
        self.augment = augment
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _sample(self, index: int, epoch: int, position: int) -> CachedSample:
        if isinstance(self.base, CacheSamples):
            return self.base.load(index, np.random.default_rng([self.seed, epoch, position, 1]))
        return self.base[index]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        index, epoch, position = (int(k) for k in key)
        name = f"#{index}"
        try:
            sample = self._sample(index, epoch, position)
            name = str(sample.name or name)
            rng = np.random.default_rng([self.seed, epoch, position])
            return make_item(sample, self.catalog, self.finding_anatomy, self.augment, rng)
        except Exception as exc:  # a bad sample must not stop a long run: log, skip, count
            log.warning("skipping sample %s: %s: %s", name, type(exc).__name__, exc)
            return {"failed": True, "name": name, "error": f"{type(exc).__name__}: {exc}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable items: ``image (B, 1, Z, Y, X)``, ``labels (B, Z, Y, X)``, ``present``,
    ``abnormal``, ``text_ids``, ``finding_ids`` ``(B, A)``; ``texts`` (B lists of A), ``reports``
    and ``names`` (B); ``size`` B; ``failed`` / ``failed_names`` report the skipped ones."""
    ok = [it for it in items if not it.get("failed")]
    bad = [it["name"] for it in items if it.get("failed")]
    batch: dict[str, Any] = {"failed": len(bad), "failed_names": bad, "size": len(ok)}
    if not ok:
        return batch
    for k in STACKED_KEYS:
        batch[k] = torch.stack([it[k] for it in ok])
    batch["texts"] = [it["texts"] for it in ok]
    batch["reports"] = [it["report"] for it in ok]
    batch["names"] = [it["name"] for it in ok]
    return batch


def dataset_texts(base: Sequence[CachedSample] | Any, reports: bool = False) -> list[str]:
    """Every anatomy text (or whole report) a dataset can feed the text encoder.

    A dataset with a ``texts(reports=...)`` method (:class:`~fvlm_core.data.cache.CacheSamples`
    reads them from the JSON sidecars only) answers itself; otherwise every sample is read.
    """
    if callable(getattr(base, "texts", None)):
        return list(base.texts(reports=reports))
    out: list[str] = []
    for i in range(len(base)):
        sample = base[i]
        out.extend([str(sample.report or "")] if reports else [str(t) for t in sample.texts.values()])
    return out


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's part of each global batch of an epoch's permutation, as the
    ``(index, epoch, position)`` keys :class:`TrainingSamples` takes.

    Step ``s`` of epoch ``e`` covers positions ``[s*G, (s+1)*G)`` of ``randperm(n, seed + e)``
    (``G = per_rank * world``); rank ``r`` takes ``[s*G + r*per_rank, ...)``. The last
    incomplete global batch is dropped. ``start_step`` resumes mid-epoch.
    """

    def __init__(
        self, n: int, per_rank: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0
    ) -> None:
        self.n, self.per_rank, self.world, self.rank = int(n), int(per_rank), int(world), int(rank)
        self.seed, self.epoch, self.start_step = int(seed), int(epoch), int(start_step)

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start_step)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for s in range(self.start_step, self.steps_per_epoch()):
            first = s * self.global_batch + self.rank * self.per_rank
            yield [(perm[p], self.epoch, p) for p in range(first, first + self.per_rank)]
