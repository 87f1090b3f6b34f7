"""The embedding store on disk: one folder of Parquet files, one row per scan and anatomy.

::

    STORE/
      store.json                  format, the model's identity (weights SHA-256, config), the windows
      parts/part-0of1-00000.parquet   finished scans (immutable; one file per flush of a run)
      _journal/shard-0of1.jsonl   scans of a run in progress (fvlm_core.journal), folded into a part

Each Parquet part holds the columns of :func:`schema`; read the whole store with pandas
(``pd.read_parquet("STORE/parts")``), DuckDB (``SELECT * FROM 'STORE/parts/*.parquet'``) or
:class:`EmbeddingStore`. A part's schema metadata repeats ``store.json``'s identity, so a part
copied elsewhere still says which model made it.

A store holds the embeddings of one model with one window strategy: :class:`EmbeddingStore`
refuses to add to, score or search a store with another model (:class:`StoreModelMismatch`).
Scores are a function of the weights (image and text side), so the identity is the SHA-256 of
the weights file plus the model config minus what ``fvlm evaluate --store-thresholds`` changes
(thresholds, calibrations, provenance, findings): calibrating a model keeps its store usable.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fvlm_core import __version__
from fvlm_core.atomic import atomic_path, atomic_write_text, make_parents
from fvlm_core.errors import ConfigError, DataError
from fvlm_core.model.config import load_config
from fvlm_core.model.weights import weights_sha256

FORMAT = "fvlm-embedding-store/1"
INFO_NAME = "store.json"
PARTS_DIR = "parts"
JOURNAL_DIR = "_journal"
#: key of the store identity in each Parquet part's schema metadata
METADATA_KEY = b"fvlm_store"


class StoreModelMismatch(ConfigError):
    """The store holds embeddings of another model (or window strategy)."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made (or may read) a store.

    Attributes:
        name: the config's name (for messages).
        weights_sha256: :func:`~fvlm_core.model.weights.weights_sha256` of the folder.
        config: the model config without thresholds, calibrations, provenance and findings.
        embed_dim: embedding width ``D``.
        anatomies: the model's anatomies, in order.
        folder: where the model was when the store was made (informative only).
    """

    name: str
    weights_sha256: str
    config: dict[str, Any]
    embed_dim: int
    anatomies: tuple[str, ...]
    folder: str = ""

    @classmethod
    def of_folder(cls, model_dir: str | os.PathLike, config: Any = None) -> ModelIdentity:
        """The identity of a model folder (``config``: its loaded config, read if not given)."""
        if config is None:
            config = load_config(model_dir)
        cfg = config.encoder_dict()
        return cls(
            name=str(getattr(config, "name", "fvlm")),
            weights_sha256=weights_sha256(model_dir),
            config=json.loads(json.dumps(cfg)),
            embed_dim=int(config.embed_dim),
            anatomies=tuple(config.anatomies),
            folder=str(Path(model_dir).resolve()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "anatomies": list(self.anatomies),
            "folder": self.folder,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelIdentity:
        return cls(
            name=str(d["name"]),
            weights_sha256=str(d["weights_sha256"]),
            config=dict(d["config"]),
            embed_dim=int(d["embed_dim"]),
            anatomies=tuple(d["anatomies"]),
            folder=str(d.get("folder", "")),
        )


@dataclass(frozen=True)
class StoreInfo:
    """``store.json``: the model, the window strategy and when/with what the store was made."""

    model: ModelIdentity
    windows: str = "shared"
    max_window_zyx: tuple[int, int, int] | None = None
    created: str = ""
    fvlm_version: str = ""

    def identity(self) -> dict[str, Any]:
        """What every scan of the store shares: compared before anything is added or scored."""
        return {
            "model weights (sha256)": self.model.weights_sha256,
            "model config": self.model.config,
            "windows": self.windows,
            "max_window_zyx": None if self.max_window_zyx is None else list(self.max_window_zyx),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model.to_dict(),
            "windows": self.windows,
            "max_window_zyx": None if self.max_window_zyx is None else list(self.max_window_zyx),
            "created": self.created,
            "fvlm_version": self.fvlm_version,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreInfo:
        cap = d.get("max_window_zyx")
        return cls(
            model=ModelIdentity.from_dict(d["model"]),
            windows=str(d.get("windows", "shared")),
            max_window_zyx=None if cap is None else tuple(int(v) for v in cap),
            created=str(d.get("created", "")),
            fvlm_version=str(d.get("fvlm_version", "")),
        )

    @classmethod
    def new(
        cls, model: ModelIdentity, windows: str, max_window_zyx: Sequence[int] | None = None
    ) -> StoreInfo:
        return cls(
            model=model,
            windows=windows,
            max_window_zyx=None if max_window_zyx is None else tuple(int(v) for v in max_window_zyx),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            fvlm_version=__version__,
        )


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def schema(embed_dim: int):
    """The columns of a part (one row per scan and model anatomy):

    ``scan`` the scan's id in the dataset; ``source`` its volume file (or folder); ``dataset``
    the layout it came from; ``anatomy``; ``status`` present / partial (cut by the field of view)
    / absent; ``scored`` (an embedding was computed); ``voxels`` and ``volume_ml`` on the CT's
    own grid; ``window`` its index among the scan's encoder windows, ``window_start_zyx`` and
    ``window_size_zyx`` that window in model-space voxels; ``embedding`` the ``D``
    float32 of the L2-normalised embedding as ``4 * D`` little-endian bytes (null when not
    scored; :func:`embedding_matrix` or ``numpy.frombuffer(value, "<f4")`` reads it); ``text`` the anatomy's description from the report
    (null without a report); ``labels`` the scan's ground truth, finding -> 0/1 (null: missing).
    """
    triple = pa.list_(pa.int32(), 3)
    return pa.schema(
        [
            ("scan", pa.string()),
            ("source", pa.string()),
            ("dataset", pa.string()),
            ("anatomy", pa.string()),
            ("status", pa.string()),
            ("scored", pa.bool_()),
            ("voxels", pa.int64()),
            ("volume_ml", pa.float64()),
            ("window", pa.int16()),
            ("window_start_zyx", triple),
            ("window_size_zyx", triple),
            # raw float32 bytes: Parquet has no fixed-length float vector, and its nested LIST
            # encoding (levels per float) decoded 100,000 vectors of 256 in 0.6-2 s here, the
            # bytes in 0.03 s (README: the store's format)
            ("embedding", pa.binary(4 * int(embed_dim))),
            ("text", pa.string()),
            ("labels", pa.map_(pa.string(), pa.int8())),
        ]
    )


def encode_vector(v: Any) -> str:
    """A float32 vector as base64 text (a journal record holds it exactly)."""
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def records_table(records: Iterable[tuple[str, Mapping[str, Any]]], embed_dim: int):
    """The Parquet rows of scan records ``(scan, record)`` (:func:`fvlm_core.store.encode.scan_record`)."""
    cols: dict[str, list] = {name: [] for name in schema(embed_dim).names}
    vectors: list[np.ndarray] = []
    missing = np.zeros(0, dtype=bool)
    valid: list[bool] = []
    for scan, rec in records:
        labels = list((rec.get("labels") or {}).items())
        for a in rec["anatomies"]:
            cols["scan"].append(scan)
            cols["source"].append(rec.get("source"))
            cols["dataset"].append(rec.get("dataset"))
            cols["labels"].append(labels)
            for key in ("anatomy", "status", "scored", "voxels", "volume_ml", "window", "text"):
                cols[key].append(a.get(key))
            cols["window_start_zyx"].append(a.get("window_start_zyx"))
            cols["window_size_zyx"].append(a.get("window_size_zyx"))
            emb = a.get("embedding")
            valid.append(emb is not None)
            vectors.append(decode_vector(emb) if emb is not None else np.zeros(embed_dim, dtype=np.float32))
    n = len(valid)
    flat = np.concatenate(vectors) if vectors else np.zeros(0, dtype=np.float32)
    if flat.size != n * embed_dim:
        raise DataError(f"a scan record holds embeddings of another width than the store's {embed_dim}")
    missing = ~np.asarray(valid, dtype=bool)
    sch = schema(embed_dim)
    arrays = []
    for f in sch:
        if f.name == "embedding":
            arrays.append(
                pa.Array.from_buffers(
                    pa.binary(4 * int(embed_dim)),
                    n,
                    [_validity(missing), pa.py_buffer(np.ascontiguousarray(flat, dtype="<f4").tobytes())],
                )
            )
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=sch)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

_PART = re.compile(r"^part-(\d+)of(\d+)-(\d+)\.parquet$")


@dataclass
class EmbeddingStore:
    """An embedding store folder (see the module docstring).

    Use :meth:`open` for an existing store and :meth:`create` to start (or continue) one.
    """

    path: Path
    info: StoreInfo
    _tables: dict[tuple, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingStore:
        """Open an existing store; :class:`DataError` when ``path`` is not one."""
        path = Path(path)
        info_path = path / INFO_NAME
        if not path.exists():
            raise DataError(
                f"{path}: no such embedding store. Make one with `fvlm embed DATA --model M --out {path}`."
            )
        if not info_path.is_file():
            raise DataError(
                f"{path}: not an embedding store (no {INFO_NAME}). Give a folder written by `fvlm embed`."
            )
        try:
            raw = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{info_path}: unreadable ({exc}).") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise DataError(
                f"{info_path}: format {raw.get('format') if isinstance(raw, dict) else None!r}; this version "
                f"reads {FORMAT}. Re-run `fvlm embed` into a new folder."
            )
        try:
            info = StoreInfo.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{info_path}: damaged ({type(exc).__name__}: {exc}).") from exc
        return cls(path, info)

    @classmethod
    def create(cls, path: str | os.PathLike, info: StoreInfo) -> EmbeddingStore:
        """Open the store at ``path`` for adding ``info``'s model's embeddings, creating it when
        absent; a store of another model or window strategy is refused."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file; an embedding store is a folder.")
        if not (path / INFO_NAME).exists():
            own = {JOURNAL_DIR, PARTS_DIR, "_embed", "index"}
            # a rank starting at the same time may have a hidden temporary store.json there already
            if path.is_dir() and any(
                p.name not in own and not p.name.startswith(".") for p in path.iterdir()
            ):
                raise ConfigError(
                    f"--out {path}: the folder holds other files and no {INFO_NAME}; give a new folder "
                    "(or an existing embedding store) for the store."
                )
            # ranks that start together write the same content; the last rename wins
            atomic_write_text(path / INFO_NAME, json.dumps(info.to_dict(), indent=1) + "\n")
        store = cls.open(path)
        store.check_identity(info, what="add to it")
        return store

    def check_identity(self, other: StoreInfo, what: str = "use it") -> None:
        """Refuse (:class:`StoreModelMismatch`) when ``other`` names another model or windows."""
        mine, theirs = self.info.identity(), other.identity()
        if mine == theirs:
            return
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        m, o = self.info.model, other.model
        detail = []
        if "model weights (sha256)" in differ:
            detail.append(
                f"its embeddings are of model {m.name} (weights sha256 {m.weights_sha256[:12]}…, made from "
                f"{m.folder or 'an unknown folder'}), not of {o.name} (weights sha256 {o.weights_sha256[:12]}…"
                f"{', ' + o.folder if o.folder else ''})"
            )
        elif "model config" in differ:
            detail.append(f"the model config differs from the one its embeddings were made with ({m.folder})")
        if "windows" in differ or "max_window_zyx" in differ:
            detail.append(
                f"it was made with {self.info.windows} windows"
                f"{f' capped at {list(self.info.max_window_zyx)}' if self.info.max_window_zyx else ''}, "
                f"not {other.windows}{f' capped at {list(other.max_window_zyx)}' if other.max_window_zyx else ''}"
            )
        raise StoreModelMismatch(
            f"{self.path}: cannot {what}: "
            + "; ".join(detail)
            + ". A store never mixes models or windows: scores and similarities across them mean nothing. "
            "Use the model the store was made with, or embed into another folder."
        )

    def check_model(self, model_dir: str | os.PathLike, config: Any = None, what: str = "use it") -> None:
        """Refuse a model folder whose weights or config are not the store's."""
        other = ModelIdentity.of_folder(model_dir, config)
        self.check_identity(
            StoreInfo(other, self.info.windows, self.info.max_window_zyx),
            what=f"{what} with --model {model_dir}",
        )

    # ------------------------------------------------------------------ parts
    @property
    def parts(self) -> list[Path]:
        d = self.path / PARTS_DIR
        return sorted(p for p in d.glob("part-*.parquet") if _PART.match(p.name)) if d.is_dir() else []

    def journals(self) -> list[Path]:
        d = self.path / JOURNAL_DIR
        return sorted(d.glob("*.jsonl")) if d.is_dir() else []

    def journal_path(self, shard: tuple[int, int]) -> Path:
        return self.path / JOURNAL_DIR / f"shard-{shard[0]}of{shard[1]}.jsonl"

    def write_part(
        self, records: Sequence[tuple[str, Mapping[str, Any]]], shard: tuple[int, int]
    ) -> Path | None:
        """Write scan records as a new part (atomically: the whole file or none); None when empty."""
        if not records:
            return None
        return self.write_table(records_table(records, self.info.model.embed_dim), shard)

    def write_table(self, table, shard: tuple[int, int]) -> Path:
        """Write a table of :func:`schema` as the next part of ``shard``, fsynced, atomically."""
        # anatomy-major rows: one anatomy's embeddings are one contiguous block of the part, which
        # query and search read in place
        rank = pc.index_in(table.column("anatomy"), value_set=pa.array(list(self.info.model.anatomies)))
        table = table.take(pa.array(np.argsort(rank.to_numpy(zero_copy_only=False), kind="stable")))
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(self.info.to_dict()).encode()})
        taken = [
            int(m.group(3))
            for p in self.parts
            if (m := _PART.match(p.name)) and m.group(1, 2) == tuple(map(str, shard))
        ]
        target = (
            self.path / PARTS_DIR / f"part-{shard[0]}of{shard[1]}-{max(taken, default=-1) + 1:05d}.parquet"
        )
        make_parents(target)
        with atomic_path(target) as tmp:
            pq.write_table(
                table,
                tmp,
                compression={n: ("none" if n == "embedding" else "zstd") for n in table.column_names},
                use_dictionary=["scan", "source", "dataset", "anatomy", "status", "text"],
                write_statistics=[c for c in table.column_names if c != "embedding"],
            )
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        self._tables.clear()
        return target

    # ------------------------------------------------------------------ reading
    def table(self, columns: Sequence[str] | None = None):
        """Every finished row (a :class:`pyarrow.Table`; a scan stored twice counts once)."""
        fresh = tuple((p.name, p.stat().st_size) for p in self.parts)
        want = None if columns is None else list(dict.fromkeys(["scan", "anatomy", *columns]))
        for (cols, parts), cached in self._tables.items():  # a table read before with these columns
            if parts == fresh and (cols is None or (want is not None and set(want) <= set(cols))):
                return cached if want is None else cached.select(want)
        key = (None if want is None else tuple(want), fresh)
        tables = []
        for p in self.parts:
            try:
                tables.append(pq.read_table(p, columns=want, memory_map=True))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(
                    f"{p}: unreadable part of the store ({exc}). Move it away and re-run `fvlm embed`."
                ) from exc
        if not tables:
            sch = schema(self.info.model.embed_dim)
            table = sch.empty_table() if want is None else sch.empty_table().select(want)
        else:
            table = pa.concat_tables(_first_copies([t.replace_schema_metadata(None) for t in tables]))
        self._tables[key] = table
        return table

    def require_scans(self) -> list[str]:
        """The finished scans; :class:`DataError` when there is none yet."""
        scans = self.scans()
        if not scans:
            pending = self.journals()
            raise DataError(
                f"{self.path}: the store holds no finished scan yet"
                + (
                    f" ({len(pending)} journal(s) of an interrupted `fvlm embed` run in {JOURNAL_DIR}/: "
                    "re-run that command to finish them)."
                    if pending
                    else ". Fill it with `fvlm embed DATA --model M --out STORE`."
                )
            )
        return scans

    def scans(self) -> list[str]:
        """The finished scans' ids, sorted."""
        return sorted(pc.unique(self.table([]).column("scan")).to_pylist())

    def vectors(self, anatomy: str) -> tuple[np.ndarray, np.ndarray]:
        """``(scans (n,) str, embeddings (n, D) float32)`` of the scans where ``anatomy`` was scored."""
        blocks = list(self.vector_blocks(anatomy))
        if not blocks:
            return np.zeros(0, dtype=object), np.zeros((0, self.info.model.embed_dim), dtype=np.float32)
        ids = np.concatenate([np.asarray(b[0].to_numpy(zero_copy_only=False), dtype=object) for b in blocks])
        return ids, (blocks[0][1] if len(blocks) == 1 else np.concatenate([b[1] for b in blocks]))

    def vector_blocks(self, anatomy: str) -> Iterator[tuple[Any, np.ndarray]]:
        """Per part, ``(scans, embeddings)`` of the scans where ``anatomy`` was scored: the ids
        as an Arrow string array, the embeddings a view of the part's bytes where the
        anatomy's rows are all scored."""
        self.check_anatomy(anatomy)
        t = self.table(["scored", "embedding"])
        d = self.info.model.embed_dim
        start = 0
        for n in [len(c) for c in t.column("scan").chunks]:
            part = t.slice(start, n)
            start += n
            keep = pc.and_(
                pc.equal(part.column("anatomy"), anatomy), pc.fill_null(part.column("scored"), False)
            )
            rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
            if not len(rows):
                continue
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            block = part.slice(lo, hi - lo)
            inner = None if hi - lo == len(rows) else rows - lo  # contiguous: a view
            ids = block.column("scan").combine_chunks()
            emb = embedding_matrix(block.column("embedding"), d)
            if inner is not None:
                ids, emb = ids.take(pa.array(inner)), emb[inner]
            yield ids, emb

    def check_anatomy(self, anatomy: str) -> None:
        if anatomy not in self.info.model.anatomies:
            raise ConfigError(
                f"--anatomy {anatomy!r}: the store's model has the anatomies "
                f"{', '.join(self.info.model.anatomies)}."
            )

    def describe(self) -> str:
        m = self.info.model
        return (
            f"{self.path}: {len(self.scans()):,} scans of model {m.name} (weights sha256 {m.weights_sha256[:12]}…), "
            f"{self.info.windows} windows, {len(m.anatomies)} anatomies x {m.embed_dim} floats"
        )


def _validity(missing: np.ndarray):
    """An Arrow validity bitmap (None when nothing is missing)."""
    if not missing.any():
        return None
    return pa.py_buffer(np.packbits(~missing, bitorder="little").tobytes())


def embedding_matrix(column, embed_dim: int, keep: np.ndarray | None = None) -> np.ndarray:
    """``(n, D)`` float32 of an ``embedding`` column (a chunked or plain Arrow array; rows of
    null embeddings hold zeros), only the rows where ``keep`` is True when given. The bytes are
    viewed in place (a memory-mapped part is not copied) except for the rows kept."""
    chunks = getattr(column, "chunks", [column])
    out, start = [], 0
    for chunk in chunks:
        n = len(chunk)
        buf = chunk.buffers()[1]
        if buf is None:
            m = np.zeros((n, embed_dim), dtype=np.float32)
        else:
            m = np.frombuffer(buf, dtype="<f4", count=(chunk.offset + n) * embed_dim).reshape(-1, embed_dim)
            m = m[chunk.offset :]
        if chunk.null_count and buf is not None:
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)[:, None]
            m = np.where(valid, m, np.float32(0)).astype(np.float32)
        out.append(m if keep is None else m[keep[start : start + n]])
        start += n
    if not out:
        return np.zeros((0, embed_dim), dtype=np.float32)
    return np.concatenate(out) if len(out) != 1 else out[0]


def _first_copies(tables: list) -> list:
    """The parts' tables without the scans an earlier part holds already (two runs may have
    stored one scan twice: its first copy counts)."""
    out, seen = [], None
    for t in tables:
        if seen is not None:
            dup = pc.is_in(t.column("scan"), value_set=seen)
            if pc.any(dup).as_py():
                t = t.filter(pc.invert(dup))
        ids = pc.unique(t.column("scan"))
        seen = ids if seen is None else pc.unique(pa.concat_arrays([seen, ids]))
        out.append(t)
    return out
