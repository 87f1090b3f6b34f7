"""The model-space sample cache written by ``fvlm prepare``, and its reader :class:`CacheSamples`
(used by training and evaluation).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fvlm_core.atomic import atomic_path, atomic_write_text
from fvlm_core.data.layout import scan_id_of
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.geometry import Geometry

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
        abnormal: per anatomy, abnormal by the impression rule (it states an abnormality of it).
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


def sample_paths(cache_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"{name}{TENSOR_SUFFIX}", d / f"{name}{SIDECAR_SUFFIX}"


def save_sample(sample: CachedSample, cache_dir: str | os.PathLike) -> Path:
    """Write ``sample`` atomically (tensors first, then the JSON sidecar that marks it complete)."""
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


class CacheSamples:
    """The reader of a prepare cache: its complete samples, one item per scan or per volume.

    Args:
        cache_dir: folder written by ``fvlm prepare``.
        reconstruction: ``"random"`` (one item per scan; :meth:`load` draws one of its
            reconstructions, as fVLM trains), ``"first"`` (one item per scan: its first
            reconstruction by name) or ``"all"`` (one item per volume).

    Items are :class:`CachedSample` s (numpy arrays); :mod:`fvlm_core.data.samples` turns them into
    training items. ``items[i]`` lists the volume names of item ``i``.
    """

    def __init__(self, cache_dir: str | os.PathLike, reconstruction: str = "random") -> None:
        if reconstruction not in ("random", "first", "all"):
            raise DataError(f"data.reconstruction={reconstruction!r}: choose random, first or all")
        self.cache_dir = Path(cache_dir)
        names = list_samples(self.cache_dir)
        if not names:
            raise DataError(
                f"{self.cache_dir}: holds no cached samples. Run `fvlm prepare --out {self.cache_dir}` first."
            )
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(scan_id_of(n), []).append(n)
        self.items: list[list[str]] = (
            [[n] for n in names] if reconstruction == "all" else list(groups.values())
        )
        self.reconstruction = reconstruction

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng: np.random.Generator | None = None) -> CachedSample:
        """Item ``index``: with ``reconstruction="random"`` and a generator, a reconstruction drawn
        from ``rng`` (one draw, only for scans with several); otherwise the first."""
        names = self.items[index]
        pick = 0
        if self.reconstruction == "random" and len(names) > 1 and rng is not None:
            pick = int(rng.integers(len(names)))
        return load_sample(self.cache_dir, names[pick])

    def __getitem__(self, index: int) -> CachedSample:
        return self.load(index)

    def texts(self, reports: bool = False) -> list[str]:
        """Every anatomy text (or whole report) of the cache, read from the JSON sidecars only."""
        out: list[str] = []
        for names in self.items:
            for n in names:
                info = read_sidecar(self.cache_dir / f"{n}{SIDECAR_SUFFIX}")
                out.extend(
                    [str(info.get("report", ""))] if reports else [str(t) for t in info["texts"].values()]
                )
        return out


def is_cache_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds at least one sample of a prepare cache (a tensor file and its JSON)."""
    return any(p.with_suffix(SIDECAR_SUFFIX).exists() for p in Path(path).glob(f"*{TENSOR_SUFFIX}"))


def check_cache_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix samples prepared with another model space / catalog / backend in one cache."""
    path = out / "_prepare" / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != settings:
            diff = sorted(k for k in {*settings, *old} if old.get(k) != settings.get(k))
            raise ConfigError(
                f"{out}: this cache was prepared with other settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} }). Use another --out folder, or delete {out} to start over."
            )
        if old == settings:
            return
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
