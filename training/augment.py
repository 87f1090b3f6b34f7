"""Training samples -> batches: random crop to the model window, random flips, the
intact-anatomy rule, and the global-batch sampler that makes runs layout-independent.

Sample dicts (what ``fvlm_core.data.cache.CachedDataset`` yields as ``CachedSample``; any
object with these attributes or a mapping with these keys works)::

    name: str
    hu: (Z, Y, X) int16/float HU in model space
    labels: (Z, Y, X) uint8 anatomy label map (anatomy i of the model = value i + 1)
    texts: {anatomy: description}          abnormal: {anatomy: bool}
    finding_labels: {label: 0/1}           report: str (whole report; global CLIP baseline)
    anatomies: optional list naming the label values (value i + 1); relabelled to the model's

Determinism: the augmentation of a sample is drawn from ``default_rng([seed, epoch, position])``
where ``position`` is the sample's place in the epoch's global permutation, so it does not
depend on the number of processes, data-loader workers, or where a run was resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fvlm_core.loss import UNKNOWN_FINDING_SET, finding_set_id, stable_text_id

log = logging.getLogger("fvlm.train")

SAMPLE_KEYS = ("name", "hu", "labels", "texts", "abnormal", "finding_labels", "report", "anatomies")


@dataclass
class AugmentConfig:
    """``crop_size``: model window (z, y, x); ``random_crop``: False = centre crop;
    ``flip_prob``: per-axis flip probability (reference 0.2); ``intact_rule``: ``interior``
    (an anatomy is dropped when a mask voxel lies on a crop face that cuts through the volume)
    or ``strict`` (any of the 6 crop faces, even where it coincides with the volume border)."""

    crop_size: tuple[int, int, int]
    flip_prob: float = 0.2
    random_crop: bool = True
    intact_rule: str = "interior"
    hu_window: tuple[float, float] = (-1150.0, 350.0)
    pad_hu: float = -1024.0

    def __post_init__(self) -> None:
        if self.intact_rule not in ("interior", "strict"):
            raise ValueError(f"intact_rule must be 'interior' or 'strict', got {self.intact_rule!r}")


def as_sample_dict(sample: Any) -> dict[str, Any]:
    """A sample (mapping or ``CachedSample``-like object) as a plain dict with numpy arrays."""
    if isinstance(sample, Mapping):
        d = {k: sample.get(k) for k in SAMPLE_KEYS}
    else:
        d = {k: getattr(sample, k, None) for k in SAMPLE_KEYS}
    for k in ("hu", "labels"):
        v = d[k]
        if isinstance(v, torch.Tensor):
            d[k] = v.detach().cpu().numpy()
        if d[k] is None:
            raise ValueError(f"sample {d.get('name')!r} has no {k!r} array")
        d[k] = np.asarray(d[k])
        if d[k].ndim != 3:
            raise ValueError(f"sample {d.get('name')!r}: {k} must be (Z, Y, X), got shape {d[k].shape}")
    if d["hu"].shape != d["labels"].shape:
        raise ValueError(
            f"sample {d.get('name')!r}: hu {d['hu'].shape} and labels {d['labels'].shape} differ"
        )
    d["texts"] = dict(d["texts"] or {})
    d["abnormal"] = {k: bool(v) for k, v in (d["abnormal"] or {}).items()}
    d["finding_labels"] = dict(d["finding_labels"] or {})
    d["report"] = str(d["report"] or "")
    d["name"] = str(d["name"] or "")
    return d


def relabel(labels: np.ndarray, source: Sequence[str] | None, target: Sequence[str]) -> np.ndarray:
    """Label map whose values follow ``source`` (value i + 1) -> values in ``target`` order."""
    if not source or list(source) == list(target):
        return labels
    lut = np.zeros(256, dtype=np.uint8)
    for i, a in enumerate(source):
        if a in target:
            lut[i + 1] = list(target).index(a) + 1
    return lut[labels]


class CacheSamples:
    """The ``fvlm prepare`` cache as raw :class:`~fvlm_core.data.cache.CachedSample` s, one item
    per scan (``reconstruction``: ``random``, as fVLM trains; ``first``) or per volume (``all``).

    ``load(index, rng)`` draws the reconstruction with the sample's augmentation generator, so
    the choice is reproducible and layout-independent like the crops.
    """

    def __init__(self, cache_dir, reconstruction: str = "random") -> None:
        from fvlm_core.data.cache import list_samples, scan_id_of
        from fvlm_core.errors import DataError

        if reconstruction not in ("random", "first", "all"):
            raise DataError(f"data.reconstruction={reconstruction!r}: choose random, first or all")
        self.cache_dir = cache_dir
        names = list_samples(cache_dir)
        if not names:
            raise DataError(
                f"{cache_dir}: holds no cached samples. Run `fvlm prepare --out {cache_dir}` first."
            )
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(scan_id_of(n), []).append(n)
        self.items = [[n] for n in names] if reconstruction == "all" else list(groups.values())
        self.reconstruction = reconstruction

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng: np.random.Generator | None = None):
        from fvlm_core.data.cache import load_sample

        names = self.items[index]
        pick = 0
        if self.reconstruction == "random" and len(names) > 1 and rng is not None:
            pick = int(rng.integers(len(names)))
        return load_sample(self.cache_dir, names[pick])

    def __getitem__(self, index: int):
        return self.load(index, None)

    def texts(self, reports: bool = False) -> list[str]:
        """Every anatomy text (or whole report) of the cache, read from the JSON sidecars only."""
        from pathlib import Path

        from fvlm_core.data.cache import SIDECAR_SUFFIX, read_sidecar

        out: list[str] = []
        for names in self.items:
            for n in names:
                info = read_sidecar(Path(self.cache_dir) / f"{n}{SIDECAR_SUFFIX}")
                out.extend(
                    [str(info.get("report", ""))] if reports else [str(t) for t in info["texts"].values()]
                )
        return out


def dataset_texts(base: Sequence[Any], reports: bool = False) -> list[str]:
    """All texts a dataset can feed the text encoder (anatomy texts, or whole reports)."""
    if hasattr(base, "texts") and callable(base.texts):
        return list(base.texts(reports=reports))
    out: list[str] = []
    for i in range(len(base)):
        s = base[i]
        get = s.get if isinstance(s, Mapping) else (lambda k, s=s: getattr(s, k, None))
        if reports:
            out.append(str(get("report") or ""))
        else:
            out.extend(str(t) for t in (get("texts") or {}).values())
    return out


def _axis_plan(dim: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """(source start, source end, destination start) of a crop/pad of ``dim`` to ``size``."""
    if dim >= size:
        start = int(rng.integers(0, dim - size + 1)) if rng is not None else (dim - size) // 2
        return start, start + size, 0
    before = int(rng.integers(0, size - dim + 1)) if rng is not None else (size - dim) // 2
    return 0, dim, before


def crop_flip(
    hu: np.ndarray,
    labels: np.ndarray,
    cfg: AugmentConfig,
    num_anatomies: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop (or pad) to ``cfg.crop_size``, flip, and tell which anatomies are intact.

    Returns:
        ``hu (Z, Y, X) float32``, ``labels (Z, Y, X) uint8`` and ``intact (A,) bool``: the
        anatomy has voxels in the crop and none on a cutting crop face (``cfg.intact_rule``).
    """
    size = tuple(int(s) for s in cfg.crop_size)
    plans = [_axis_plan(d, s, rng if cfg.random_crop else None) for d, s in zip(hu.shape, size)]
    src = tuple(slice(a, b) for a, b, _ in plans)
    dst = tuple(slice(o, o + (b - a)) for a, b, o in plans)
    out_hu = np.full(size, cfg.pad_hu, dtype=np.float32)
    out_lab = np.zeros(size, dtype=np.uint8)
    out_hu[dst] = hu[src]
    out_lab[dst] = labels[src]

    cut = np.zeros(num_anatomies + 1, dtype=bool)
    for axis, (a, b, o) in enumerate(plans):
        faces = []
        if cfg.intact_rule == "strict":
            faces = [0, size[axis] - 1]
        else:  # a face cuts the anatomy only where the volume continues beyond it
            if a > 0:
                faces.append(o)
            if b < hu.shape[axis]:
                faces.append(o + (b - a) - 1)
        for f in faces:
            vals = np.unique(np.take(out_lab, f, axis=axis))
            vals = vals[(vals > 0) & (vals <= num_anatomies)]
            cut[vals] = True
    counts = np.bincount(out_lab.ravel(), minlength=num_anatomies + 1)[: num_anatomies + 1]
    intact = (counts[1:] > 0) & ~cut[1:]

    for axis in range(3):
        if rng.random() < cfg.flip_prob:
            out_hu = np.flip(out_hu, axis=axis)
            out_lab = np.flip(out_lab, axis=axis)
    return np.ascontiguousarray(out_hu), np.ascontiguousarray(out_lab), intact


class TrainingSamples(torch.utils.data.Dataset):
    """Wraps a dataset of samples; ``__getitem__((index, epoch, position))`` returns the
    augmented, tensorised sample, or a ``{"failed": ...}`` record when the sample is unusable
    (logged; the batch goes on without it and the trainer counts it)."""

    def __init__(
        self,
        base: Sequence[Any],
        anatomies: Sequence[str],
        finding_anatomy: Mapping[str, str],
        augment: AugmentConfig,
        seed: int,
    ) -> None:
        self.base = base
        self.anatomies = list(anatomies)
        self.finding_anatomy = dict(finding_anatomy)
        self.augment = augment
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        index, epoch, position = key
        name = f"#{index}"
        try:
            raw = self.base[index]
            raw_name = raw.get("name") if isinstance(raw, Mapping) else getattr(raw, "name", None)
            name = str(raw_name or name)
            s = as_sample_dict(raw)
            rng = np.random.default_rng([self.seed, int(epoch), int(position)])
            hu, lab, intact = crop_flip(s["hu"], s["labels"], self.augment, len(self.anatomies), rng)
            from fvlm_core.preprocess import window_hu

            image = window_hu(hu, self.augment.hu_window)
            a_n = len(self.anatomies)
            present = np.zeros(a_n, dtype=bool)
            abnormal = np.zeros(a_n, dtype=bool)
            text_ids = np.zeros(a_n, dtype=np.int64)
            finding_ids = np.full(a_n, UNKNOWN_FINDING_SET, dtype=np.int64)
            texts = []
            positives = {k for k, v in s["finding_labels"].items() if v and int(v) > 0}
            for j, anat in enumerate(self.anatomies):
                text = s["texts"].get(anat) or ""
                texts.append(text)
                present[j] = bool(intact[j]) and bool(text.strip())
                abnormal[j] = bool(s["abnormal"].get(anat, False))
                text_ids[j] = stable_text_id(text)
                finding_ids[j] = finding_set_id(
                    {lbl for lbl in positives if self.finding_anatomy.get(lbl) == anat}
                )
            return {
                "name": name,
                "image": torch.from_numpy(image)[None],
                "labels": torch.from_numpy(lab),
                "present": torch.from_numpy(present),
                "abnormal": torch.from_numpy(abnormal),
                "text_ids": torch.from_numpy(text_ids),
                "finding_ids": torch.from_numpy(finding_ids),
                "texts": texts,
                "report": s["report"],
            }
        except Exception as exc:  # a bad sample must not stop a long run: log, skip, count
            log.warning("skipping sample %s: %s: %s", name, type(exc).__name__, exc)
            return {"failed": True, "name": name, "error": f"{type(exc).__name__}: {exc}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable samples; ``failed`` / ``failed_names`` report the skipped ones."""
    ok = [it for it in items if not it.get("failed")]
    bad = [it["name"] for it in items if it.get("failed")]
    batch: dict[str, Any] = {"failed": len(bad), "failed_names": bad, "size": len(ok)}
    if not ok:
        return batch
    for k in ("image", "labels", "present", "abnormal", "text_ids", "finding_ids"):
        batch[k] = torch.stack([it[k] for it in ok])
    batch["texts"] = [it["texts"] for it in ok]
    batch["reports"] = [it["report"] for it in ok]
    batch["names"] = [it["name"] for it in ok]
    return batch


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's part of each global batch of an epoch's permutation.

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
