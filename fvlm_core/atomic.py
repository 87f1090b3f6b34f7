"""Atomic file writes: write to a temporary file next to the target, then rename.

A crash (or a cancelled job) never leaves a half-written output in place of a good one.
Permissions are those of an ordinary write: a new file gets ``0o666`` minus the umask, a
replaced file keeps its mode (the private temporary file's ``0o600`` never reaches the target).
"""

from __future__ import annotations

import contextlib
import os
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
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``target``.

    The temporary name keeps the target's suffix, so writers that pick a format from the
    extension (SimpleITK, nibabel, safetensors) work unchanged. On error the temporary file is
    removed and the previous ``target`` (if any) is left untouched. The result follows the
    umask, or keeps the mode of the file it replaces.

    Raises:
        OutputError: ``target`` is an existing folder, or a path above it is a file (checked
            before the caller's work inside the ``with`` block).
    """
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is an existing folder; give a file name for this output.")
    make_parents(target)
    tmp_path = temporary_sibling(target)
    try:
        yield tmp_path
        os.chmod(tmp_path, final_mode(target))
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically and return the target path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(target)
