"""Per-item results of a long batch job, kept as they are computed, so that a re-run continues.

A journal is one JSON-lines file: a header line with the job's *identity* (everything that must
be the same for a result to be reused: the model's digest, the prompts, the windows, the
dataset...), then one line per finished item::

    {"format": "fvlm-journal/1", "what": "volume scores", "identity": {...}}
    {"item": "valid_1_a_1.nii.gz", "record": {...}}

Each line is written whole, flushed and fsynced before the next item starts, so a crash or a
kill loses at most the item in flight. A kill during a write leaves a partial last line (no
newline): reading drops it, and the file is cut back to its last complete line before anything
is appended. A re-run opens the journal with its own identity: the same one, and the finished
items are reused; another one, and :class:`JournalMismatch` says what differs and what to do
(mixing two models' results would be wrong silently). A journal is held by one process at a
time (an advisory lock where the OS has ``fcntl``).

Usage (any dataset, any per-item result that is plain JSON)::

    with ItemJournal(out / "volume_scores" / "data.jsonl", identity, what="volume scores") as journal:
        for name in names:
            if name not in journal:
                journal.add(name, compute(name))
            use(journal[name])
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fvlm_core.atomic import make_parents
from fvlm_core.errors import ConfigError, DataError, OutputError

FORMAT = "fvlm-journal/1"


class JournalMismatch(ConfigError):
    """The journal on disk was written by a job with another identity."""


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing identities."""
    return json.loads(json.dumps(value, allow_nan=False))


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ItemJournal:
    """An append-only journal of per-item results (see the module docstring).

    Args:
        path: the ``.jsonl`` file, read now if it exists; else created (with its folders,
            following the umask) when the first result is added, so a job that fails before
            its first result leaves nothing behind.
        identity: plain JSON data (str keys) naming what the results depend on; compared with
            the header of an existing journal.
        what: what the items' results are, in words (for messages).

    Raises:
        JournalMismatch: the file holds results of a job with another identity.
        DataError: the file is not a journal, or a complete line of it is not valid JSON.
        ConfigError: another process holds the journal.
    """

    def __init__(self, path: str | os.PathLike, identity: Mapping[str, Any], what: str = "results") -> None:
        self.path = Path(path)
        self.what = what
        self.identity = _plain(dict(identity))
        self._done: dict[str, Any] = {}
        self._fh = None
        if os.path.lexists(self.path):
            self._open(os.O_RDWR)
            try:
                self._load()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ reading
    def _open(self, flags: int) -> None:
        """Open the file (``flags``: ``os.O_RDWR``, or with ``O_CREAT | O_EXCL`` for a new one,
        which follows the umask) and lock it against a second writer."""
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError as exc:
            raise ConfigError(
                f"{self.path}: another run has just started writing these {self.what}. Wait for it "
                "to finish, or give this run another output folder."
            ) from exc
        except IsADirectoryError as exc:
            raise DataError(f"{self.path} is a folder, not a results journal. Move it away.") from exc
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise OutputError(
                f"{self.path} is a symbolic link; fvlm never writes through a link it did not create. "
                "Remove it, or give another output folder."
            ) from exc
        self._fh = os.fdopen(fd, "r+b", buffering=0)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"{self.path}: another run is writing these {self.what} now. Wait for it to finish, "
                "or give this run another output folder."
            ) from exc

    def _load(self) -> None:
        data = self._fh.read()
        complete = data[: data.rfind(b"\n") + 1]  # a partial last line (a kill mid-write) is dropped
        lines = complete.splitlines()
        if not lines:  # killed while the header was written
            self._truncate(0)
            self._write_header()
            return
        header = self._parse(lines[0], 1)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DataError(
                f"{self.path}: not a results journal of this version (expected a first line with "
                f'"format": "{FORMAT}"). Move it away, or give another output folder.'
            )
        self._check_identity(header.get("identity"), len(lines) - 1)
        for number, line in enumerate(lines[1:], start=2):
            entry = self._parse(line, number)
            if not isinstance(entry, dict) or "item" not in entry or "record" not in entry:
                raise DataError(
                    f"{self.path}, line {number}: not an item entry. Move the file away to start over."
                )
            self._done[str(entry["item"])] = entry["record"]
        self._truncate(len(complete))

    def _parse(self, line: bytes, number: int) -> Any:
        try:
            return json.loads(line)
        except ValueError as exc:
            raise DataError(
                f"{self.path}, line {number}: damaged ({exc}); only the last line can be partial after "
                "a kill. Move the file away to start over."
            ) from exc

    def _check_identity(self, stored: Any, n_items: int) -> None:
        if stored == self.identity:
            return
        stored = stored if isinstance(stored, dict) else {}
        differ = []
        for key in [*self.identity, *(k for k in stored if k not in self.identity)]:
            old, new = stored.get(key), self.identity.get(key)
            if old != new:
                differ.append(f"{key} ({_short(new)} now, {_short(old)} there)")
        raise JournalMismatch(
            f"{self.path} holds {self.what} of {n_items} item(s) from another run: "
            + "; ".join(differ)
            + ". Reusing them would mix results of different runs. Give another output folder, or move "
            "that file away to start over."
        )

    # ------------------------------------------------------------------ writing
    def _truncate(self, size: int) -> None:
        self._fh.truncate(size)
        self._fh.seek(size)

    def _write_header(self) -> None:
        self._write({"format": FORMAT, "what": self.what, "identity": self.identity})

    def _write(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, allow_nan=False, separators=(",", ":")) + "\n"
        self._fh.write(line.encode("utf-8"))
        os.fsync(self._fh.fileno())

    def add(self, item: str, record: Any) -> None:
        """Keep ``record`` (plain JSON, no NaN: write ``None``) as ``item``'s result, on disk
        before this returns. An item added again replaces its earlier record."""
        record = _plain(record)
        if self._fh is None:  # the file is made with the first result, not before
            make_parents(self.path)
            self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            self._write_header()
        self._write({"item": str(item), "record": record})
        self._done[str(item)] = record

    # ------------------------------------------------------------------ access
    def __contains__(self, item: object) -> bool:
        return str(item) in self._done

    def __getitem__(self, item: str) -> Any:
        return self._done[str(item)]

    def __len__(self) -> int:
        return len(self._done)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._done.items())

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()  # releases the lock
            self._fh = None

    def __enter__(self) -> ItemJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
