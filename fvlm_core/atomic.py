"""Atomic file writes: write to a temporary file next to the target, then rename.

A crash (or a cancelled job) never leaves a half-written output in place of a good one.
Permissions are those of an ordinary write: a new file gets ``0o666`` minus the umask, a
replaced file keeps its mode (the private temporary file's ``0o600`` never reaches the target).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from fvlm_core.errors import OutputError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # os.umask can only be read by setting it: restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Mode of a new file written by ``open(path, "w")``: ``0o666`` minus the umask."""
    return 0o666 & ~current_umask()


def new_dir_mode() -> int:
    """Mode of a new folder made by ``mkdir``: ``0o777`` minus the umask."""
    return 0o777 & ~current_umask()


def final_mode(target: Path) -> int:
    """Mode ``target`` should have after it is written: its current mode if it is a file that
    exists (a replaced file keeps its permissions), else the umask's default for a new file."""
    try:
        st = target.stat()
    except OSError:
        return new_file_mode()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else new_file_mode()


#: errno values of a full disk or an exhausted quota
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
#: how libraries that do not raise an OSError say it (torch's zip writer, safetensors' Rust I/O)
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def is_disk_full(exc: BaseException, where: str | os.PathLike) -> bool:
    """Whether writing under ``where`` failed for want of space: an ``ENOSPC`` / ``EDQUOT`` in the
    exception or the ones it came from (torch raises a RuntimeError from the OSError), their
    words in the message, or (a library that says neither) under 1 MiB free there now."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError | RuntimeError):
        free = _free_bytes(Path(where))
        return free is not None and free < (1 << 20)
    return False


def disk_full_error(where: str | os.PathLike, what: str, kept: str) -> OutputError:
    """The error to raise when :func:`is_disk_full`: where, what was being written, the space
    left, what was kept and what to do."""
    free = _free_bytes(Path(where))
    left = f"{free / 2**20:.1f} MiB free there now" if free is not None else "free space unknown"
    return OutputError(
        f"No space left on the disk of {where} while writing {what} ({left}). {kept} Free some space "
        "on that disk (or choose a folder on another disk) and run the same command again."
    )


def _split_suffix(name: str) -> tuple[str, str]:
    """Split 'a.nii.gz' into ('a', '.nii.gz') so temporary files keep a readable suffix."""
    for double in (".nii.gz", ".seg.nrrd", ".tar.gz"):
        if name.endswith(double):
            return name[: -len(double)], double
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target``; returns those created (outermost first).

    Raises:
        OutputError: a path above ``target`` is a file, or a folder cannot be created.
    """
    missing = [p for p in reversed(target.parents) if not p.is_dir()]
    for p in missing:
        if p.exists():
            raise OutputError(
                f"{target}: {p} is a file, not a folder, so nothing can be written below it. "
                "Choose another output location."
            )
    created = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another process
        except OSError as exc:
            raise OutputError(
                f"{target}: cannot create folder {p} ({exc.strerror}). Choose a location you can write to."
            ) from exc
        created.append(p)
    return created


def temporary_sibling(target: Path, folder: bool = False) -> Path:
    """A new, empty hidden temporary file (or folder) next to ``target``, keeping its suffix."""
    stem, suffix = _split_suffix(target.name)
    if folder:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``target``.
    ``parents``: create the missing folders above ``target``; with False the folder must exist
    (a write into a folder that another process deleted fails with FileNotFoundError instead of
    making it again).

    The temporary name keeps the target's suffix, so writers that pick a format from the
    extension (SimpleITK, nibabel, safetensors) work unchanged. On error the temporary file is
    removed and the previous ``target`` (if any) is left untouched. The result follows the
    umask, or keeps the mode of the file it replaces.

    Raises:
        OutputError: ``target`` is an existing folder, or a path above it is a file (checked
            before the caller's work inside the ``with`` block); the disk is full (the previous
            ``target`` is kept).
    """
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is an existing folder; give a file name for this output.")
    if parents:
        make_parents(target)
    tmp_path = temporary_sibling(target)
    try:
        yield tmp_path
        os.chmod(tmp_path, final_mode(target))
        os.replace(tmp_path, target)
    except BaseException as exc:
        full = (
            isinstance(exc, Exception)
            and not isinstance(exc, OutputError)
            and is_disk_full(exc, target.parent)
        )
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full:
            kept = "The previous file is kept." if target.exists() else "Nothing was written."
            raise disk_full_error(target.parent, target.name, kept) from exc
        raise


def atomic_write_text(
    target: str | os.PathLike, text: str, encoding: str = "utf-8", parents: bool = True
) -> Path:
    """Write ``text`` to ``target`` atomically and return the target path (``parents``: as
    :func:`atomic_path`)."""
    with atomic_path(target, parents) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(target)
