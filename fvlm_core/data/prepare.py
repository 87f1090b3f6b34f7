"""Preparation at scale: a labelled dataset -> model-space sample cache (``fvlm prepare``).

Datasets: any layout of :mod:`fvlm_core.data.labelled` (CT-RATE, RAD-ChestCT, a folder of CTs
with a labels CSV). Per-anatomy texts come from the rule-based decomposition of each report, or
(``decomposition``) from fVLM's published decomposition files (``desc_info.json`` /
``conc_info.json``), as the reference trains on them; a scan without a report (RAD-ChestCT, a
cohort CSV without a report column) gets its labels only, for evaluation and calibration.

Re-runnable: a sample whose JSON sidecar and tensor file are complete is skipped; hidden
temporary files left by a crash are removed (only those of this shard's volumes, so shards that
share a cache folder never touch each other's work). Shards split the sorted volume list by a
stable hash of each name, so ``--shard i/n`` on n machines covers every volume exactly once and a
volume keeps its shard when others are added.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog
from fvlm_core.atomic import atomic_write_text
from fvlm_core.data.cache import check_cache_settings, is_complete, save_sample
from fvlm_core.data.ctrate import VolumeRecord, build_sample, make_segmenter
from fvlm_core.data.labelled import DatasetOptions, open_dataset
from fvlm_core.data.layout import scan_id_of
from fvlm_core.data.synth import pool_context
from fvlm_core.errors import ConfigError, FVLMError
from fvlm_core.locks import FolderInUse, held_scopes, lock_folder
from fvlm_core.preprocess import ModelSpaceConfig
from fvlm_core.reports import load_decomposition_files, reference_decomposition


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; ``"auto"`` reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE."""
    if text is None or text == "":
        return 0, 1
    if text == "auto":
        env = os.environ
        for idx, cnt in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
            if idx in env and cnt in env:
                return parse_shard(f"{env[idx]}/{env[cnt]}")
        return 0, 1
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n (e.g. 0/4), or 'auto'.") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0).")
    return i, n


def shard_of(name: str, n: int) -> int:
    """Stable shard of a volume name (crc32; independent of the rest of the list)."""
    return zlib.crc32(name.encode("utf-8")) % n


def select_shard(names: Sequence[str], i: int, n: int) -> list[str]:
    return sorted(nm for nm in names if shard_of(nm, n) == i)


def remove_stale_temps(out_dir: Path, names: Sequence[str]) -> int:
    """Delete hidden temporary files (``.{name}.*.tmp*``) of ``names`` left by an interrupted run."""
    removed = 0
    if not out_dir.is_dir():
        return 0
    wanted = set(names)
    for p in out_dir.iterdir():
        # atomic_path names temporary files ".{stem}.XXXX.tmp{suffix}"
        if p.name.startswith(".") and ".tmp" in p.name and p.name[1:].split(".", 1)[0] in wanted:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass(kw_only=True)
class ShardSummary:
    """What one shard's run of a resumable batch command (``fvlm prepare``, ``fvlm embed``) did:
    of the ``listed`` items, ``in_shard`` are this shard's; ``failed`` holds ``{"name", "error"}``
    per item that failed, ``notes`` what the user should know."""

    shard: tuple[int, int]
    listed: int = 0
    in_shard: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def problem_lines(self, shown: int = 10) -> list[str]:
        """The notes and the first ``shown`` failures, a line each, as the commands print them."""
        notes = [f"  note: {n}" for n in self.notes]
        return notes + [f"  failed {f['name']}: {f['error']}" for f in self.failed[:shown]]


@dataclass(kw_only=True)
class PrepareSummary(ShardSummary):
    dataset: str
    out: str
    split: str
    already_done: int = 0
    processed: int = 0
    stale_temps_removed: int = 0
    skipped_listing: list[dict[str, str]] = field(default_factory=list)
    decomposition: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out": self.out,
            "split": self.split,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "listed": self.listed,
            "in_shard": self.in_shard,
            "already_done": self.already_done,
            "processed": self.processed,
            "failed_count": len(self.failed),
            "skipped_listing_count": len(self.skipped_listing),
            "stale_temps_removed": self.stale_temps_removed,
            "seconds": round(self.seconds, 2),
            "failed": self.failed,
            "skipped_listing": self.skipped_listing,
            "decomposition": self.decomposition,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------------
# Worker side (one reader + segmenter per process)
# ------------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}
_LOADED: dict[str, dict] = {}  # decomposition files already read in this process, by folder

DECOMPOSITION_FILES = ("desc_info.json", "conc_info.json")


def load_decomposition(folder: str | os.PathLike, anatomies: Sequence[str]) -> dict:
    """``{scan_id: ReportDecomposition}`` of fVLM's decomposition files in ``folder`` (both
    ``desc_info.json`` and ``conc_info.json`` required, as the reference reads both)."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key not in _LOADED:
        missing = [n for n in DECOMPOSITION_FILES if not (folder / n).is_file()]
        if missing:
            raise ConfigError(
                f"--decomposition {folder}: no {' or '.join(missing)} there. Give the folder holding fVLM's "
                "per-anatomy decomposition files desc_info.json and conc_info.json (the authors' "
                "supplementary material), or leave --decomposition out to decompose the reports by rules."
            )
        _LOADED[key] = load_decomposition_files(
            folder / DECOMPOSITION_FILES[0], folder / DECOMPOSITION_FILES[1], list(anatomies)
        )
    return _LOADED[key]


def _init_worker(options: dict[str, Any]) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one process per core: no thread oversubscription
    except ImportError:  # pragma: no cover
        pass

    catalog = AnatomyCatalog.from_dict(options["catalog"])
    dataset = DatasetOptions.from_dict({**options["dataset_options"], "check_files": False})
    reader = open_dataset(Path(options["dataset"]), dataset)
    _STATE.update(
        reader=reader,
        records={r.name: r for r in reader.records},
        catalog=catalog,
        config=ModelSpaceConfig.from_dict(options["model_space"]),
        segmenter=make_segmenter(options["backend"], catalog, options["class_map"], reader.masks_dir),
        out=Path(options["out"]),
        decomposition=load_decomposition(options["decomposition"], catalog.names)
        if options.get("decomposition")
        else None,
    )


def _decomposition_of(record: VolumeRecord) -> tuple[Any, str | None]:
    """``(decomposition, note)`` of a record's scan when decomposition files are in use: a scan
    the files lack gets the normal templates, as the reference gives it."""
    files = _STATE.get("decomposition")
    if files is None:
        return None, None
    found = files.get(record.scan_id)
    if found is not None:
        return found, None

    return reference_decomposition({}, {}, _STATE["catalog"].names), "files: scan absent, normal templates"


def _process(name: str) -> tuple[str, str | None, float]:
    t0 = time.perf_counter()
    try:
        record: VolumeRecord = _STATE["records"][name]
        decomposition, note = _decomposition_of(record)
        sample = build_sample(
            _STATE["reader"], record, _STATE["segmenter"], _STATE["catalog"], _STATE["config"], decomposition
        )
        if note:
            sample.meta["decomposition"] = note
        save_sample(sample, _STATE["out"])
        return name, None, time.perf_counter() - t0
    except FVLMError as exc:
        return name, str(exc), time.perf_counter() - t0
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # corrupt data, disk trouble
        return name, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def _run(names: list[str], options: dict[str, Any], workers: int) -> Iterator[tuple[str, str | None, float]]:
    ctx = pool_context() if workers > 1 and len(names) > 1 else None
    if ctx is None:
        _init_worker(options)
        yield from map(_process, names)
        return
    with ctx.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        yield from pool.imap_unordered(_process, names)


def _open_reader(dataset: str | os.PathLike, options: DatasetOptions, backend: str) -> Any:
    """The dataset's reader; refused when the labelmap backend has no masks to read."""
    reader = open_dataset(Path(dataset), options)
    if backend == "labelmap" and reader.masks_dir is None:
        where = "anatomy_masks/ folder" if reader.layout == "ctrate" else "--masks"
        raise ConfigError(
            f"{dataset}: no anatomy masks ({where}); pass --masks DIR or choose --backend builtin|totalsegmentator."
        )
    return reader


def prepare_dataset(
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "train",
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    backend: str = "labelmap",
    masks_dir: str | os.PathLike | None = None,
    class_map: Any = None,
    catalog: AnatomyCatalog = CTRATE_CATALOG,
    config: Any = None,
    limit: int | None = None,
    progress: bool = True,
    decomposition: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    radchest_mapping: str = "hlip",
) -> PrepareSummary:
    """Write one cached sample per volume of ``dataset`` (CT-RATE: of ``split``; this shard)
    into ``out``; see module docstring.

    ``decomposition``: folder of fVLM's ``desc_info.json`` and ``conc_info.json``; their texts and
    abnormal flags replace the rule-based decomposition (a scan they lack gets the normal
    templates, as in the reference; the summary counts them). ``labels``, ``radchest_mapping``:
    the label CSV of a RAD-ChestCT or cohort folder and how RAD-ChestCT labels become CT-RATE
    findings (:mod:`fvlm_core.data.labelled`); a cohort's columns that match no CT-RATE finding
    are kept as labels of their own name (and listed in the summary's notes).

    Returns a :class:`PrepareSummary` (also written to
    ``out/_prepare/summary-{split}-{i}of{n}.json``; ``split`` is the layout for non-CT-RATE data).
    """
    t0 = time.perf_counter()
    config = config or ModelSpaceConfig()
    out = Path(out)
    options_in = DatasetOptions(
        split=split,
        labels=str(labels) if labels else None,
        masks=str(masks_dir) if masks_dir else None,
        radchest_mapping=radchest_mapping,
        require_reports=True,
    )
    reader = _open_reader(dataset, options_in, backend)
    split = split if reader.layout == "ctrate" else reader.layout
    with shard_lock(out, split, shard):  # before anything in --out is touched
        settings = {
            "model_space": config.to_dict(),
            "catalog": catalog.names,
            "backend": backend,
            "masks": str(Path(reader.masks_dir).resolve()) if backend == "labelmap" else None,
        }
        if reader.layout != "ctrate":  # only then: CT-RATE caches keep their settings
            settings["dataset"] = {"layout": reader.layout, "radchest_mapping": radchest_mapping}
        files = load_decomposition(decomposition, catalog.names) if decomposition else None
        if decomposition:  # only then: caches prepared by rules keep their settings
            settings["decomposition"] = str(Path(decomposition).resolve())
        check_cache_settings(out, settings)

        names = [r.name for r in reader.records]
        mine = select_shard(names, *shard)
        if limit is not None:
            mine = mine[:limit]
        summary = _shard_summary(dataset, out, split, shard, reader, mine, files, decomposition)
        summary.stale_temps_removed = remove_stale_temps(out, mine)
        todo = [n for n in mine if not is_complete(out, n)]
        summary.already_done = len(mine) - len(todo)
        options = {
            "dataset": str(dataset),
            "dataset_options": options_in.to_dict(),
            "catalog": catalog.to_dict(),
            "model_space": config.to_dict(),
            "backend": backend,
            "class_map": str(class_map) if isinstance(class_map, os.PathLike) else class_map,
            "out": str(out),
            "decomposition": str(decomposition) if decomposition else None,
        }
        results = _run(todo, options, max(1, workers))
        if progress:
            results = tqdm(
                results, total=len(todo), desc=f"prepare {split} {shard[0]}/{shard[1]}", unit="vol"
            )
        for name, error, _secs in results:
            if error is None:
                summary.processed += 1
            else:
                summary.failed.append({"name": name, "error": error})
        summary.seconds = time.perf_counter() - t0
        target = out / "_prepare" / f"summary-{split}-{shard[0]}of{shard[1]}.json"
        atomic_write_text(target, json.dumps(summary.to_dict(), indent=1) + "\n")
    return summary


def _shard_summary(
    dataset, out: Path, split: str, shard, reader, mine, files, decomposition
) -> PrepareSummary:
    """The summary of one shard's run before its work: what is listed, skipped and decomposed."""
    names = [r.name for r in reader.records]
    summary = PrepareSummary(
        dataset=str(dataset), out=str(out), split=split, shard=shard, listed=len(names) + len(reader.skipped)
    )
    summary.notes = list(reader.notes)
    summary.in_shard = len(mine)
    summary.skipped_listing = [
        {"name": n, "reason": r} for n, r in reader.skipped if shard_of(n, shard[1]) == shard[0]
    ]
    if files is not None:
        absent = [n for n in mine if scan_id_of(n) not in files]
        summary.decomposition = {
            "folder": str(decomposition),
            "scans_in_files": len(files),
            "volumes_without_entry": len(absent),
            "examples_without_entry": absent[:10],
        }
    return summary


def shard_lock(out: Path, split: str, shard: tuple[int, int]) -> contextlib.ExitStack:
    """The lock of this shard of ``out`` (:mod:`fvlm_core.locks`), held when this returns (leave
    the returned stack to give it up): the same shard prepared twice at once is refused, and so is
    a run that splits the volumes into another number of shards while one runs (their shards
    would overlap)."""
    i, n = shard
    stack = contextlib.ExitStack()
    stack.enter_context(lock_folder(out, "--out", scope=f"prepare.{split}.{i}of{n}", command="fvlm prepare"))
    other = [(s, who) for s, who in held_scopes(out, f"prepare.{split}.") if not s.endswith(f"of{n}")]
    if other:
        stack.close()
        scope, who = other[0]
        raise FolderInUse(
            f"--out {out}: shard {scope.rsplit('.', 1)[1].replace('of', '/')} of {split} is being prepared "
            f"by {who.describe() if who else 'another run'}; --shard {i}/{n} splits the volumes another way "
            "and would overlap it. Give every run into one cache the same number of shards. Nothing was done."
        )
    return stack
