"""The model-space sample cache written by ``fvlm prepare`` and read by training.

One sample per volume, two files in the cache folder::

    {name}.safetensors   hu int16 (Z, Y, X) HU in model space, labels uint8 (Z, Y, X) anatomy values
    {name}.json          geometry, texts per anatomy, abnormal flags, finding labels, whole report, ...

Both are written atomically and the JSON last: a sample is complete iff its JSON exists and names
the size of its tensor file (:func:`is_complete`). A crash leaves at most a hidden temporary file
(``.{name}.*.tmp.*``), never a half sample, so a re-run redoes exactly the unfinished ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fvlm_core.atomic import atomic_path, atomic_write_text
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.findings import CTRATE_LABELS
from fvlm_core.io import Geometry

CACHE_FORMAT = 1
TENSOR_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"


@dataclass
class CachedSample:
    """One volume in model space with everything training needs.

    Attributes:
        name: volume name (``train_1_a_1``); ``scan_id`` groups reconstructions (``train_1_a``).
        hu: int16 HU ``(Z, Y, X)`` on the model-space grid (not windowed).
        labels: uint8 anatomy label map ``(Z, Y, X)`` (anatomy ``i`` of ``anatomies`` = ``i + 1``).
        geometry: the model-space grid (LPS).
        anatomies: anatomy names in label order.
        texts: training text per anatomy.
        abnormal: per anatomy, abnormal by the reference rule (the impression mentions it).
        finding_labels: the 18 CT-RATE labels as 0/1.
        report: the whole report (findings + impression), e.g. for a global CLIP baseline.
        meta: anything else (source file, split, scan id, abnormal_findings, segmentation backend,
            model-space config, anatomy voxel counts).
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    geometry: Geometry
    anatomies: list[str]
    texts: dict[str, str]
    abnormal: dict[str, bool]
    finding_labels: dict[str, int]
    report: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def scan_id(self) -> str:
        return str(self.meta.get("scan_id") or scan_id_of(self.name))

    def sidecar(self, tensor_bytes: int) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "name": self.name,
            "scan_id": self.scan_id,
            "shape_zyx": list(self.hu.shape),
            "tensor_bytes": int(tensor_bytes),
            "geometry": self.geometry.to_dict(),
            "anatomies": list(self.anatomies),
            "texts": dict(self.texts),
            "abnormal": {k: bool(v) for k, v in self.abnormal.items()},
            "finding_labels": {k: int(v) for k, v in self.finding_labels.items()},
            "report": self.report,
            "meta": self.meta,
        }


def scan_id_of(name: str) -> str:
    """``train_1_a_1`` -> ``train_1_a`` (the scan; the last part numbers its reconstructions)."""
    name = name.removesuffix(".nii.gz").removesuffix(".nii")
    parts = name.split("_")
    return "_".join(parts[:-1]) if len(parts) >= 4 else name


def sample_paths(cache_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"{name}{TENSOR_SUFFIX}", d / f"{name}{SIDECAR_SUFFIX}"


def save_sample(sample: CachedSample, cache_dir: str | os.PathLike) -> Path:
    """Write ``sample`` atomically (tensors first, then the JSON sidecar that marks it complete)."""
    from safetensors.numpy import save_file

    if sample.hu.shape != sample.labels.shape or sample.hu.ndim != 3:
        raise DataError(
            f"{sample.name}: hu {sample.hu.shape} and labels {sample.labels.shape} must be equal 3D shapes"
        )
    if tuple(sample.hu.shape) != sample.geometry.shape_zyx:
        raise DataError(f"{sample.name}: array shape {sample.hu.shape} does not match its geometry")
    tensors, sidecar = sample_paths(cache_dir, sample.name)
    arrays = {
        "hu": np.ascontiguousarray(sample.hu, dtype=np.int16),
        "labels": np.ascontiguousarray(sample.labels, dtype=np.uint8),
    }
    with atomic_path(tensors) as tmp:
        save_file(arrays, str(tmp), metadata={"name": sample.name, "format": str(CACHE_FORMAT)})
    atomic_write_text(sidecar, json.dumps(sample.sidecar(tensors.stat().st_size), indent=1) + "\n")
    return sidecar


def is_complete(cache_dir: str | os.PathLike, name: str) -> bool:
    """True when both files of ``name`` exist and the tensor file has the size the JSON recorded."""
    tensors, sidecar = sample_paths(cache_dir, name)
    if not (tensors.is_file() and sidecar.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text())
        return int(info.get("tensor_bytes", -1)) == tensors.stat().st_size
    except (OSError, ValueError):
        return False


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: unreadable cache sidecar ({exc}). Delete it and re-run `fvlm prepare`."
        ) from exc
    if info.get("format") != CACHE_FORMAT:
        raise DataError(
            f"{path}: cache format {info.get('format')!r}, this version reads {CACHE_FORMAT}. Re-run `fvlm prepare`."
        )
    return info


def load_sample(cache_dir: str | os.PathLike, name: str) -> CachedSample:
    """Read one cached sample (numpy arrays)."""
    from safetensors.numpy import load_file

    tensors, sidecar = sample_paths(cache_dir, name)
    info = read_sidecar(sidecar)
    try:
        arrays = load_file(str(tensors))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise DataError(
            f"{tensors}: unreadable ({exc}). Delete it and its .json and re-run `fvlm prepare`."
        ) from exc
    return CachedSample(
        name=info["name"],
        hu=arrays["hu"],
        labels=arrays["labels"],
        geometry=Geometry.from_dict(info["geometry"]),
        anatomies=list(info["anatomies"]),
        texts=dict(info["texts"]),
        abnormal={k: bool(v) for k, v in info["abnormal"].items()},
        finding_labels={k: int(v) for k, v in info["finding_labels"].items()},
        report=info.get("report", ""),
        meta=dict(info.get("meta", {})),
    )


def list_samples(cache_dir: str | os.PathLike) -> list[str]:
    """Names of the complete samples in a cache folder, sorted."""
    d = Path(cache_dir)
    if not d.is_dir():
        raise DataError(f"{d}: cache folder not found. Run `fvlm prepare --out {d}` first.")
    names = [
        p.name[: -len(SIDECAR_SUFFIX)] for p in d.glob(f"*{SIDECAR_SUFFIX}") if not p.name.startswith(".")
    ]
    names = [n for n in names if (d / f"{n}{TENSOR_SUFFIX}").is_file()]
    return sorted(names)


def center_crop_or_pad(
    hu: np.ndarray, labels: np.ndarray, size_zyx: Sequence[int], pad_hu: float = -1024.0
) -> tuple[np.ndarray, np.ndarray]:
    """Crop/pad ``(Z, Y, X)`` arrays to ``size_zyx`` around the centre of the labelled anatomies."""
    from fvlm_core.preprocess import bbox_zyx

    box = bbox_zyx(labels > 0)
    shape = np.asarray(hu.shape)
    size = np.asarray(size_zyx, dtype=int)
    center = (np.asarray(box[0]) + np.asarray(box[1])) / 2.0 if box else (shape - 1) / 2.0
    start = np.round(center - (size - 1) / 2.0).astype(int)
    out_hu = np.full(tuple(size), pad_hu, dtype=hu.dtype)
    out_lab = np.zeros(tuple(size), dtype=labels.dtype)
    src = tuple(slice(max(s, 0), min(s + n, m)) for s, n, m in zip(start, size, shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out_hu[dst] = hu[src]
    out_lab[dst] = labels[src]
    return out_hu, out_lab


class CachedDataset(Dataset):
    """A ``torch.utils.data.Dataset`` over a prepare cache.

    Args:
        cache_dir: folder written by ``fvlm prepare``.
        reconstruction: ``"all"`` (one item per volume), ``"first"`` or ``"random"`` (one item per
            scan: its first / a random reconstruction, as fVLM trains).
        size_zyx: crop/pad every item to this size around its anatomies (needed to batch
            volumes of different sizes); ``None`` keeps each volume's own size.
        hu_window: HU mapped to [0, 1]; default from the cache's model-space config.
        anatomies: anatomy order of the returned arrays (default: the cache's).
        names: restrict to these volume names.

    The random reconstruction is drawn with torch's generator, so ``torch.manual_seed`` and
    DataLoader worker seeding make it reproducible.

    Items are dicts: ``image`` float32 ``(1, Z, Y, X)`` in [0, 1], ``labels`` uint8 ``(Z, Y, X)``,
    ``present`` bool ``(A,)``, ``abnormal`` bool ``(A,)``, ``finding_labels`` float32 ``(18,)``,
    ``texts`` list of A str, ``report`` str, ``name`` str, ``scan_id`` str. Batch them with
    :func:`collate_samples`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        reconstruction: str = "random",
        size_zyx: Sequence[int] | None = None,
        hu_window: Sequence[float] | None = None,
        anatomies: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if reconstruction not in ("all", "first", "random"):
            raise DataError(f"reconstruction={reconstruction!r}: choose 'all', 'first' or 'random'.")
        self.cache_dir = Path(cache_dir)
        found = list_samples(self.cache_dir)
        if names is not None:
            missing = sorted(set(names) - set(found))
            if missing:
                raise DataError(
                    f"{self.cache_dir}: no cached sample for {missing[:5]} ({len(missing)} missing)."
                )
            found = [n for n in found if n in set(names)]
        if not found:
            raise DataError(
                f"{self.cache_dir}: holds no cached samples. Run `fvlm prepare --out {self.cache_dir}`."
            )
        self.reconstruction = reconstruction
        groups: dict[str, list[str]] = {}
        for n in found:
            groups.setdefault(scan_id_of(n), []).append(n)
        self.items: list[list[str]] = (
            [[n] for n in found] if reconstruction == "all" else list(groups.values())
        )
        first = read_sidecar(self.cache_dir / f"{found[0]}{SIDECAR_SUFFIX}")
        self.anatomies = list(anatomies or first["anatomies"])
        cfg = dict(first.get("meta", {}).get("model_space") or {})
        self.hu_window = tuple(hu_window or cfg.get("hu_window", (-1150.0, 350.0)))
        self.size_zyx = None if size_zyx is None else tuple(int(s) for s in size_zyx)

    def __len__(self) -> int:
        return len(self.items)

    def _choose(self, idx: int) -> str:
        names = self.items[idx]
        if self.reconstruction == "random" and len(names) > 1:
            import torch

            return names[int(torch.randint(len(names), (1,)).item())]
        return names[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = load_sample(self.cache_dir, self._choose(idx))
        return item_from_sample(sample, self.anatomies, self.hu_window, self.size_zyx)


def item_from_sample(
    sample: CachedSample,
    anatomies: Sequence[str] | None = None,
    hu_window: Sequence[float] | None = None,
    size_zyx: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A training item: tensors + texts (keys as in :class:`CachedDataset`).

    Labels are relabelled into ``anatomies`` order (anatomies the sample lacks are absent).
    """
    import torch

    from fvlm_core.preprocess import window_hu

    anatomies = list(anatomies or sample.anatomies)
    hu_window = tuple(hu_window or (sample.meta.get("model_space") or {}).get("hu_window", (-1150.0, 350.0)))
    hu, labels = sample.hu, sample.labels
    if list(sample.anatomies) != anatomies:
        lut = np.zeros(256, dtype=np.uint8)
        for i, a in enumerate(sample.anatomies):
            if a in anatomies:
                lut[i + 1] = anatomies.index(a) + 1
        labels = lut[labels]
    if size_zyx is not None:
        hu, labels = center_crop_or_pad(hu, labels, size_zyx)
    image = window_hu(hu.astype(np.float32), hu_window)
    counts = np.bincount(labels.reshape(-1), minlength=len(anatomies) + 1)
    return {
        "name": sample.name,
        "scan_id": sample.scan_id,
        "image": torch.from_numpy(np.ascontiguousarray(image))[None],
        "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        "present": torch.from_numpy(counts[1 : len(anatomies) + 1] > 0),
        "abnormal": torch.tensor([bool(sample.abnormal.get(a, False)) for a in anatomies]),
        "finding_labels": torch.tensor([float(sample.finding_labels.get(lbl, 0)) for lbl in CTRATE_LABELS]),
        "texts": [sample.texts.get(a, "") for a in anatomies],
        "report": sample.report,
    }


def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors of :class:`CachedDataset` items; texts stay ``list[list[str]]`` ``(B, A)``."""
    import torch

    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def check_cache_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix samples prepared with another model space / catalog / backend in one cache."""
    path = out / "_prepare" / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise ConfigError(
                f"{out}: this cache was prepared with other settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} }). Use another --out folder, or delete {out} to start over."
            )
        if old == settings:
            return
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
