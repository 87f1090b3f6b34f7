"""Embed every scan of a dataset once into an embedding store: per anatomy its embedding, status and volume.

DATA is any dataset ``fvlm evaluate`` reads: a CT-RATE layout (``--split``), RAD-ChestCT, a folder
of CTs with one labels CSV (your cohort; every label column is kept), or a ``fvlm prepare``
cache. Each scan is read, segmented (``--backend``: the label maps of ``--masks`` / CT-RATE's
``anatomy_masks`` by default), resampled and cut into model-space windows exactly as ``fvlm
analyze`` does (``--windows``), and its anatomies encoded; the store (Parquet, see
``fvlm_core.store.format``) then keeps per scan and anatomy: the embedding, present / partial /
absent, the volume, the window used, the anatomy's report text, and the scan's labels. The model's
identity (SHA-256 of its weights, its config) and the windows are the store's: adding another
model's embeddings to it is refused.

Reading and cutting run in ``--workers`` data-loader processes while the encoder runs. The work
is kept as it goes: each scan is journalled as soon as it is encoded (a kill loses at most the
scan in flight) and every ``--part-size`` scans become a Parquet part; a re-run skips the scans
already stored. ``--shard i/n`` embeds one share of the scans (a stable hash of each name, as
``fvlm prepare``); under ``torchrun`` each rank takes its share on its own GPU and writes its own
parts, so many GPUs or nodes need nothing more. Scans that cannot be read are counted, listed
and left out (a re-run tries them again).

Examples::

    fvlm embed /data/CT-RATE --split valid --model models/fvlm-base --out ctrate-valid.store
    torchrun --nproc-per-node 4 -m fvlm_training.cli embed /data/CT-RATE --split train --model M --out S
    fvlm embed my-cohort/ --model M --out cohort.store --masks my-cohort-masks/
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fvlm_core.atomic import atomic_write_text
from fvlm_core.commands.segment import add_totalsegmentator_arguments
from fvlm_core.data.cache import read_sidecar, sample_paths
from fvlm_core.data.ctrate import decompose
from fvlm_core.data.prepare import ShardSummary, parse_shard, select_shard
from fvlm_core.data.radchest_labels import RADCHEST_MAPPINGS
from fvlm_core.devices import resolve_device
from fvlm_core.errors import ConfigError, FVLMError
from fvlm_core.io import check_finite
from fvlm_core.journal import ItemJournal
from fvlm_core.model.config import load_config
from fvlm_core.outputs import OutputPlan
from fvlm_core.store.format import EmbeddingStore, ModelIdentity, StoreInfo
from fvlm_training.dataset_scoring import to_model_space
from fvlm_training.volume_source import VolumeSource

WINDOWS = ("shared", "centred", "reference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a CT-RATE layout folder, a RAD-ChestCT folder, a folder of CTs with one labels CSV, or a "
        "`fvlm prepare` cache",
    )
    parser.add_argument("--model", required=True, help="model folder (config.yaml + model.safetensors)")
    parser.add_argument("--out", required=True, help="the store folder (created, or continued)")
    parser.add_argument("--split", default="valid", help="CT-RATE split (default: valid)")
    parser.add_argument(
        "--labels", help="the label CSV of a RAD-ChestCT or cohort folder (default: the one in it)"
    )
    parser.add_argument("--masks", help="anatomy label maps named like the scans (CT-RATE: anatomy_masks/)")
    parser.add_argument(
        "--backend",
        choices=("labelmap", "totalsegmentator", "builtin"),
        default=None,
        help="anatomy segmentation: labelmap (the masks; default), totalsegmentator, builtin (lungs only)",
    )
    add_totalsegmentator_arguments(parser)
    parser.add_argument(
        "--radchest-mapping",
        choices=tuple(RADCHEST_MAPPINGS),
        default="hlip",
        help="RAD-ChestCT labels -> CT-RATE findings (as `fvlm evaluate`)",
    )
    parser.add_argument(
        "--windows",
        choices=WINDOWS,
        default="shared",
        help="model-space windows, as `fvlm analyze --windows` (default shared); the store keeps one strategy",
    )
    parser.add_argument("--one-per-scan", action="store_true", help="one reconstruction per CT-RATE scan")
    parser.add_argument(
        "--limit", type=int, default=None, help="embed only the first N scans (of this shard)"
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="i/n (0 <= i < n) or 'auto' (SLURM array / torchrun); default: all, "
        "or the torchrun rank's share",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="data-loader processes reading and cutting scans (default 2)"
    )
    parser.add_argument("--part-size", type=int, default=1000, help="scans per Parquet part (default 1000)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (torchrun: the rank's GPU)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any scan failed")


# --------------------------------------------------------------------------------------------
# The scans, read and cut in data-loader workers
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedScan:
    """What a worker hands the encoder: the windows and everything the record needs but the embeddings."""

    name: str
    prepared: Any = None  # fvlm_core.store.encode.PreparedScan
    facts: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    error: str | None = None
    seconds: float = 0.0


class ScanDataset:
    """``torch.utils.data.Dataset`` of :class:`LoadedScan` over ``names`` of a
    :class:`~fvlm_training.volume_source.VolumeSource` (read, to model space, windows cut). A scan
    that cannot be read comes back with its ``error`` (the run goes on)."""

    def __init__(self, source, names: Sequence[str], analyzer_config, windows: str) -> None:
        self.source = source
        self.names = list(names)
        self.anatomies = list(analyzer_config.anatomies)
        self.model_space = analyzer_config.model_space()
        self.windows = windows

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> LoadedScan:
        name = self.names[i]
        t0 = time.perf_counter()
        try:
            out = self._load(name)
        except FVLMError as exc:
            out = LoadedScan(name, error=str(exc))
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # corrupt data, disk trouble
            out = LoadedScan(name, error=f"{type(exc).__name__}: {exc}")
        out.seconds = time.perf_counter() - t0
        return out

    def _load(self, name: str) -> LoadedScan:
        from fvlm_core.store.encode import anatomy_facts, prepare_windows

        ct, labels, truth = self.source.load(name)
        check_finite(ct.array, ct.source)
        facts = anatomy_facts(labels, self.anatomies)
        ct_ms, labels_ms = to_model_space(ct, labels, self.model_space, self.windows)
        prepared = prepare_windows(ct_ms, labels_ms, self.anatomies, self.model_space, self.windows)
        path, texts = scan_source(self.source, name, self.anatomies)
        return LoadedScan(name, prepared, facts, dict(truth), texts, path)


def scan_source(source, name: str, anatomies: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """``(volume path, anatomy texts)`` of a scan: its file (a cache sample: the file it was
    prepared from) and its report's per-anatomy descriptions (none without a report)."""
    if source.is_cache:
        tensors, sidecar = sample_paths(source.data_dir, name)
        info = read_sidecar(sidecar)
        path = (info.get("meta") or {}).get("source") or str(tensors)
        return str(Path(path).resolve()), {k: v for k, v in (info.get("texts") or {}).items() if v}

    record = source.records[name]
    texts: dict[str, str] = {}
    if record.report is not None:
        try:
            texts = decompose(record, anatomies)[0]
        except FVLMError:  # an empty or unreadable report: the scan is embedded without texts
            texts = {}
    return str(Path(record.path).resolve()), texts


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EmbedSummary(ShardSummary):
    store: str
    already_stored: int = 0
    embedded: int = 0
    parts: list[str] = field(default_factory=list)
    encode_seconds: float = 0.0
    read_seconds: float = 0.0  # in the data-loader workers: read, resample, cut (overlapped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "listed": self.listed,
            "in_shard": self.in_shard,
            "already_stored": self.already_stored,
            "embedded": self.embedded,
            "failed_count": len(self.failed),
            "failed": self.failed,
            "parts_written": self.parts,
            "seconds": round(self.seconds, 2),
            "encode_seconds": round(self.encode_seconds, 2),
            "read_seconds": round(self.read_seconds, 2),
            "notes": self.notes,
        }


class _PartWriter:
    """The journal of this shard and its folding into Parquet parts: every scan is on disk (the
    journal) before the next is encoded; every ``part_size`` scans, and at the end, the journal's
    scans become one part and the journal starts again."""

    def __init__(self, store, shard: tuple[int, int], part_size: int) -> None:
        self.store, self.shard, self.part_size = store, shard, max(1, int(part_size))
        self.path = store.journal_path(shard)
        self.identity = {**store.info.identity(), "shard": f"{shard[0]}/{shard[1]}"}
        self.written: list[str] = []
        self.journal = self._open()

    def _open(self):
        return ItemJournal(self.path, self.identity, what="scan embeddings of a `fvlm embed` run")

    def recover(self, stored: set[str]) -> int:
        """Fold what a killed run left in the journal (scans not yet in a part); how many."""
        pending = [k for k, _ in self.journal.items() if k not in stored]
        self.flush(stored)
        return len(pending)

    def add(self, name: str, record: dict[str, Any]) -> None:
        self.journal.add(name, record)
        if len(self.journal) >= self.part_size:
            self.flush()

    def flush(self, stored: set[str] = frozenset()) -> None:
        records = [(k, r) for k, r in self.journal.items() if k not in stored]
        part = self.store.write_part(records, self.shard)
        if part is not None:
            self.written.append(str(part))
        if len(self.journal) or self.path.exists():
            self.journal.close()
            self.path.unlink(missing_ok=True)  # its scans are in a part now
            self.journal = self._open()

    def close(self) -> None:
        self.journal.close()


def _loader(dataset: ScanDataset, workers: int) -> Iterator[LoadedScan]:
    """The scans in order, read ``workers`` ahead by data-loader processes (0: in this one)."""
    from torch.utils.data import DataLoader

    if len(dataset) == 0:
        return iter(())
    kw: dict[str, Any] = {"batch_size": None, "num_workers": max(0, int(workers)), "shuffle": False}
    if kw["num_workers"]:
        kw.update(prefetch_factor=2, persistent_workers=False)
    return iter(DataLoader(dataset, collate_fn=lambda x: x, **kw))


def embed_scans(
    source,
    names: Sequence[str],
    analyzer,
    store,
    shard: tuple[int, int] = (0, 1),
    workers: int = 2,
    part_size: int = 1000,
    progress: bool = True,
) -> EmbedSummary:
    """Embed ``names`` of ``source`` into ``store`` (this shard's journal and parts), skipping
    the scans already stored; returns what was done."""
    from fvlm_core.store.encode import encode_windows, scan_record

    t0 = time.perf_counter()
    summary = EmbedSummary(store=str(store.path), shard=shard, listed=len(source.names), in_shard=len(names))
    writer = _PartWriter(store, shard, part_size)
    try:
        stored = set(store.scans())
        recovered = writer.recover(stored)
        if recovered:
            summary.notes.append(f"{recovered} scan(s) journalled by an interrupted run were kept.")
            stored = set(store.scans())
        todo = [n for n in names if n not in stored]
        summary.already_stored = len(names) - len(todo)
        dataset = ScanDataset(source, todo, analyzer.config, store.info.windows)
        scans = _loader(dataset, workers)
        if progress:
            scans = tqdm(
                scans, total=len(todo), desc=f"embed {shard[0]}/{shard[1]}", unit="scan", smoothing=0.1
            )
        for item in scans:
            summary.read_seconds += item.seconds
            if item.error is not None:
                summary.failed.append({"name": item.name, "error": item.error})
                continue
            t = time.perf_counter()
            enc = encode_windows(analyzer, item.prepared)
            summary.encode_seconds += time.perf_counter() - t
            record = scan_record(
                enc, item.facts, analyzer.anatomies, source=item.source, dataset=source.layout,
                labels=item.labels, texts=item.texts,
            )  # fmt: skip
            writer.add(item.name, record)
            summary.embedded += 1
        writer.flush()
    finally:
        writer.close()
    summary.parts = writer.written
    summary.seconds = time.perf_counter() - t0
    return summary


def _shard(text: str | None) -> tuple[int, int]:
    """``--shard``, or the torchrun rank's share when torchrun started this process."""
    from fvlm_core.distributed import dist_info, launched_by_torchrun

    if text is None and launched_by_torchrun():
        info = dist_info()
        return info.rank, info.world_size
    return parse_shard(text)


def _check_args(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 (read in this process) or more.")
    if args.part_size < 1:
        raise ConfigError(f"--part-size {args.part_size}: give at least 1.")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give at least 1 (or leave it out for every scan).")


def output_plan(args: argparse.Namespace):
    """The inputs and the store folder (checked only: the store is written scan by scan)."""
    plan = OutputPlan()
    plan.input("DATA", args.data, contents=False)
    for option in ("model", "labels", "masks"):
        plan.input(f"--{option}", getattr(args, option))
    plan.folder("--out", args.out)
    return plan


def run(args: argparse.Namespace) -> int:
    from fvlm_core.distributed import dist_info, launched_by_torchrun

    _check_args(args)
    output_plan(args).check()
    shard = _shard(args.shard)
    config = load_config(args.model)
    source = VolumeSource(
        args.data, config.anatomies, args.split, args.masks, args.one_per_scan, None,
        labels=args.labels, backend=args.backend,
        backend_options={"fast": args.fast, "device": args.device, "allow_download": args.allow_download},
        radchest_mapping=args.radchest_mapping, findings=[f.name for f in config.finding_set()],
        ignore_columns=None,
    )  # fmt: skip
    names = select_shard(source.names, *shard)[: args.limit]
    info = StoreInfo.new(ModelIdentity.of_folder(args.model, config), args.windows)
    store = EmbeddingStore.create(args.out, info)  # another model's store is refused here

    from fvlm_core.zeroshot.analyzer import Analyzer

    local_rank = dist_info().local_rank if launched_by_torchrun() else None
    analyzer = Analyzer.from_pretrained(args.model, device=resolve_device(args.device, local_rank))
    summary = embed_scans(source, names, analyzer, store, shard, args.workers, args.part_size)
    summary.notes[:0] = list(source.notes)
    _write_summary(store, summary)
    d = summary.to_dict()
    n = max(summary.embedded, 1)
    print(
        f"embed shard {d['shard']}: {d['embedded']} embedded, {d['already_stored']} already stored, "
        f"{d['failed_count']} failed ({d['seconds']:.1f} s; per scan: encoder {summary.encode_seconds / n:.3f} s "
        f"on {analyzer.device}, reading and cutting {summary.read_seconds / n:.3f} s in {args.workers} worker(s))"
    )
    for line in summary.problem_lines():
        print(line)
    print(store.describe())
    if summary.failed and (args.strict or summary.embedded + summary.already_stored == 0):
        return 1
    return 0


def _write_summary(store, summary: EmbedSummary) -> Path:
    i, n = summary.shard
    return atomic_write_text(
        store.path / "_embed" / f"summary-{i}of{n}.json", json.dumps(summary.to_dict(), indent=1) + "\n"
    )
