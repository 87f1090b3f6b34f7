"""One run per output folder: a lock that every command writing a folder takes before its work.

Two runs writing one folder overwrite each other's files (two ``fvlm train`` into one ``--out``
write one checkpoint, one model and one ``tb/``, and one deletes the other's temporary files).
A command therefore holds the folder's lock while it runs, and a second run is refused at once
with the holder's name::

    with lock_folder(args.out, "--out", command="fvlm train"):
        ...  # the work

The lock is a file ``.fvlm-lock`` in the folder (``.fvlm-lock.<scope>`` for a lock on part of
it, e.g. one ``fvlm prepare`` shard), locked with ``flock`` (``msvcrt.locking`` on Windows) and
holding the holder's pid, host, start time and command line. The operating system releases the
lock when its process ends, however it ends, so a lock file left by a killed or crashed run is
*stale*: the next run takes it over (it can tell, because it gets the lock) and says whose it
was. Where the file system has no locks (``ENOLCK``: some network file systems), the holder is
checked by its pid on the same host; a holder on another host is then trusted to be running,
and the message says to delete the file if it is not.

The file is removed when the run ends; a run that finds the path pointing at another file after
it got the lock (the previous holder removed it meanwhile) tries again, so two runs never both
hold one folder. The folder itself is created for the lock when missing and removed again,
when still empty, on release (a refused or failed run leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fvlm_core.atomic import make_parents
from fvlm_core.errors import OutputError, warn

LOCK_NAME = ".fvlm-lock"
#: errno values of "another process holds the lock"
_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}
#: errno values of "this file system has no locks"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderInUse(OutputError):
    """Another run holds the folder's lock; the message names it and says what to do."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on host {self.host}, started {self.started})"

    def to_json(self) -> str:
        return json.dumps(
            {"pid": self.pid, "host": self.host, "started": self.started, "command": self.command}
        )

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder written in a lock file (None: empty or not ours)."""
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["command"]))
        except (ValueError, TypeError, KeyError):
            return None

    @classmethod
    def me(cls, command: str) -> LockHolder:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        argv = " ".join(sys.argv[1:])
        return cls(os.getpid(), socket.gethostname(), started, f"{command} ({argv})" if argv else command)


def lock_path(folder: str | os.PathLike, scope: str = "") -> Path:
    """The lock file of ``folder`` (``scope``: a lock on part of it)."""
    return Path(folder) / (f"{LOCK_NAME}.{scope}" if scope else LOCK_NAME)


def _try_lock(fd: int) -> bool | None:
    """Lock ``fd`` without waiting: True when locked, False when another process holds it, None
    when the file system has no locks."""
    try:
        import fcntl
    except ImportError:  # Windows: a byte far past the holder's text, so it stays readable
        import msvcrt

        try:
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        if exc.errno in _NO_LOCKS:
            return None
        raise


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _alive_here(holder: LockHolder) -> bool:
    """Whether ``holder`` (on this host) is a running process."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


class FolderLock:
    """The lock of one folder (see the module docstring).

    Args:
        folder: the folder a command writes.
        option: how the user named it (``--out``), for messages.
        scope: a lock on part of the folder (``""``: all of it).
        command: what holds it (``fvlm train``), for the message a second run gets.

    Attributes:
        stale: the holder of a lock left by a run that no longer runs, taken over (None: none).
    """

    def __init__(
        self, folder: str | os.PathLike, option: str = "--out", scope: str = "", command: str = "fvlm"
    ) -> None:
        self.folder = Path(folder)
        self.option = option
        self.path = lock_path(folder, scope)
        self.command = command
        self.stale: LockHolder | None = None
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock; :class:`FolderInUse` when a running process holds it.

        Raises:
            FolderInUse: naming the holder and what to do.
            OutputError: the folder cannot be created or written.
        """
        if self._fd is not None:
            return self
        self._created = make_parents(self.path)
        try:
            for _ in range(20):  # each retry: the previous holder removed the file meanwhile
                if self._attempt():
                    return self
            raise FolderInUse(f"{self.option} {self.folder}: its lock keeps changing hands; try again.")
        except BaseException:
            self._remove_created()
            raise

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(
                    f"{self.path} is a symbolic link; fvlm never writes through a link it did not create. "
                    "Remove it."
                ) from exc
            raise OutputError(
                f"{self.option} {self.folder}: cannot create its lock file {self.path.name} "
                f"({exc.strerror}). Choose a folder you can write to."
            ) from exc

    def _attempt(self) -> bool:
        fd = self._open()
        try:
            locked = _try_lock(fd)
            if locked is False:
                raise self._in_use(LockHolder.parse(_read(fd)))
            previous = LockHolder.parse(_read(fd))
            if locked is None and previous is not None and not self._stale_without_locks(previous):
                raise self._in_use(previous, no_locks=True)
            if not self._still_the_file(fd):
                os.close(fd)
                return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self.stale = previous
        me = LockHolder.me(self.command).to_json().encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, me)
        os.fsync(fd)
        self._fd = fd
        if previous is not None:
            warn(
                f"{self.option} {self.folder}: the previous run, {previous.describe()}, is no longer "
                "running (it was stopped, killed or crashed); this run takes over the folder."
            )
        return True

    @staticmethod
    def _stale_without_locks(holder: LockHolder) -> bool:
        """No file locks here: whether the holder is known to have ended (same host, no such pid)."""
        return holder.host == socket.gethostname() and not _alive_here(holder)

    def _still_the_file(self, fd: int) -> bool:
        """Whether the lock file's path still names the file locked (not removed and made again)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _in_use(self, holder: LockHolder | None, no_locks: bool = False) -> FolderInUse:
        who = holder.describe() if holder is not None else "another run (it is starting: no details yet)"
        text = (
            f"{self.option} {self.folder} is in use by {who}. Two runs writing one folder would "
            f"overwrite each other's files. Wait for that run to end (or stop it), or choose another "
            f"{self.option}. Nothing was done."
        )
        if no_locks:
            text += (
                f" (This file system has no file locks, so a run on another host cannot be checked: if "
                f"it has ended, delete {self.path}.)"
            )
        return FolderInUse(text)

    def release(self) -> None:
        """Give the lock up and remove its file (and the folder, if made for it and still empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if self._still_the_file(fd):
                os.unlink(self.path)  # before closing: a waiting run then finds no file or a new one
        with contextlib.suppress(OSError):
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        self._created = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def lock_folder(
    folder: str | os.PathLike, option: str = "--out", *, scope: str = "", command: str = "fvlm"
) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock for the ``with`` block (see :class:`FolderLock`)."""
    lock = FolderLock(folder, option, scope, command)
    with lock:
        yield lock


@contextlib.contextmanager
def lock_folders(folders: list[tuple[str | os.PathLike, str]], command: str) -> Iterator[list[FolderLock]]:
    """Hold the locks of several ``(folder, option)`` (a folder named twice: once), all or none."""
    with contextlib.ExitStack() as stack:
        locks, seen = [], set()
        for folder, option in folders:
            key = os.path.realpath(folder)
            if key not in seen:
                seen.add(key)
                locks.append(stack.enter_context(FolderLock(folder, option, command=command)))
        yield locks


def held_scopes(folder: str | os.PathLike, prefix: str) -> list[tuple[str, LockHolder | None]]:
    """The scopes starting with ``prefix`` whose lock in ``folder`` a running process holds now,
    with their holders (a probe: each is locked and released at once where it is free)."""
    out = []
    base = Path(folder)
    if not base.is_dir():
        return out
    for path in sorted(base.glob(f"{LOCK_NAME}.{prefix}*")):
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            locked = _try_lock(fd)
            holder = LockHolder.parse(_read(fd))
            busy = locked is False or (
                locked is None and holder is not None and not FolderLock._stale_without_locks(holder)
            )
            if busy:
                out.append((path.name[len(LOCK_NAME) + 1 :], holder))
        finally:
            os.close(fd)  # closing releases a lock this probe took
    return out
