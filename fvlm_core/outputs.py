"""A command's outputs: checked before any work, then written all or none.

A command declares its inputs and outputs up front, checks them before the slow work, and
writes every output through a staging area that is moved into place only when all of them are
complete::

    plan = OutputPlan()
    plan.input("CT", args.ct)
    plan.input("--model", args.model)
    plan.file("--out", args.out, suffixes=(".json",), example="results.json")
    plan.folder("--maps-dir", args.maps_dir)          # None: not requested, ignored
    plan.check()                                      # OutputError naming every problem
    ...                                               # the work
    with plan.writing() as staged:
        write_json(staged.path("--out"))
        result.write_maps(staged.path("--maps-dir"))
    # here every output is in place; had anything failed, none would have changed

Refused by :meth:`OutputPlan.check`: an output that is an input (or an existing file inside an
input folder, or a folder that would replace one holding an input), two outputs at one path, an
existing folder where a file goes, an existing file where a folder goes, a file above the output
path, a folder that cannot be written (probed by creating a file there, so read-only mounts are
caught too), a file type the writer does not know, and an existing folder that would be replaced
without ``force``. New files follow the umask; a replaced file keeps its mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_core.atomic import (
    disk_full_error,
    final_mode,
    is_disk_full,
    make_parents,
    new_dir_mode,
    temporary_sibling,
)
from fvlm_core.errors import OutputError


@dataclass(frozen=True)
class _Input:
    option: str
    path: Path
    contents: bool = True  # a folder: every file in it is an input too


@dataclass(frozen=True)
class _Output:
    option: str
    path: Path
    is_folder: bool
    suffixes: tuple[str, ...] | None = None
    example: str = ""
    replace: bool = False  # folder: the whole folder is replaced (a model folder), not added to
    force: bool = False  # replace an existing folder (else refused)
    new: bool = False  # folder: refused when it exists at all (written only as a new folder)


def slug(name: str) -> str:
    """A portable file stem of ``name``: lower case, other characters than letters and digits as
    ``_``, none at the ends (``Pleural effusion`` -> ``pleural_effusion``)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "unnamed"


def distinct_stems(stems: Mapping[Any, str]) -> dict[Any, str]:
    """``stems`` (key -> file stem) made distinct: stems that are equal, ignoring case (a
    case-insensitive disk holds one file for them), each get the first 8 hex digits of the
    SHA-256 of their key appended, so no file is written twice and a key always gets the same one."""
    count: dict[str, int] = {}
    for stem in stems.values():
        count[stem.casefold()] = count.get(stem.casefold(), 0) + 1
    return {
        key: stem
        if count[stem.casefold()] == 1
        else f"{stem}_{hashlib.sha256(repr(key).encode()).hexdigest()[:8]}"
        for key, stem in stems.items()
    }


def file_stems(names: Sequence[str]) -> dict[str, str]:
    """A distinct portable file stem per name (:func:`slug`, :func:`distinct_stems`): ``Lung
    mass`` and ``lung mass!`` get two files."""
    return distinct_stems({n: slug(n) for n in dict.fromkeys(names)})


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    """Same place: equal real paths, or the same existing file (case-insensitive file systems)."""
    if _real(a) == _real(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _inside(path: Path, folder: Path) -> bool:
    return _real(folder) in _real(path).parents


def _lexically_inside(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(folder)) in Path(os.path.abspath(path)).parents


def link_below(root: Path, path: Path) -> Path | None:
    """The first symbolic link among the existing folders from below ``root`` down to ``path``
    (``path`` included); None when there is none."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    if root != path and root not in path.parents:
        return None
    for p in [*reversed(path.parents[: len(path.parents) - len(root.parents) - 1]), path]:
        if p == root:
            continue
        if p.is_symlink():
            return p
        if not p.exists():
            return None
    return None


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def _probe_writable(folder: Path) -> str | None:
    """``None`` when a file can be created in ``folder``, else the reason (root ignores modes:
    creating a file is the only test that also catches read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fvlm-write-test-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


class OutputPlan:
    """The inputs and outputs of one command run (see the module docstring)."""

    def __init__(self) -> None:
        self._inputs: list[_Input] = []
        self._outputs: list[_Output] = []

    # ------------------------------------------------------------------ declaring
    def input(self, option: str, path: str | os.PathLike | None, *, contents: bool = True) -> None:
        """Declare an input (``None``: not given, ignored). Outputs may never replace it.

        ``contents``: for a folder, every file already in it counts as an input too (a DICOM
        series, a model folder); ``False`` protects only the folder itself (a dataset root whose
        input sub-folders are declared on their own).
        """
        if path is not None:
            self._inputs.append(_Input(option, Path(path), contents))

    def inputs(
        self, option: str, paths: Iterable[str | os.PathLike | None], *, contents: bool = True
    ) -> None:
        for p in paths:
            self.input(option, p, contents=contents)

    def file(
        self,
        option: str,
        path: str | os.PathLike | None,
        *,
        suffixes: Sequence[str] | None = None,
        example: str = "",
    ) -> None:
        """Declare an output file (``None``: not requested). ``suffixes``: the file types its
        writer knows (lower case, e.g. ``(".nii.gz", ".nrrd")``); ``example``: a file name
        suggested when the user gave a folder."""
        if path is not None:
            self._outputs.append(
                _Output(option, Path(path), False, tuple(suffixes) if suffixes else None, example)
            )

    def folder(
        self,
        option: str,
        path: str | os.PathLike | None,
        *,
        replace: bool = False,
        force: bool = False,
        new: bool = False,
    ) -> None:
        """Declare an output folder (``None``: not requested).

        ``replace=False``: the command adds files to it (created if missing; files of the same
        name are replaced). ``replace=True``: the folder is the output as a whole (a model
        folder): an existing one that is not empty is refused unless ``force``, and then
        replaced entirely. ``new=True`` (with ``replace``): an existing folder is refused even
        when empty, and there is no ``force`` (outputs that must never mix with earlier ones,
        such as DICOM objects with their own UIDs).
        """
        if path is not None:
            self._outputs.append(_Output(option, Path(path), True, replace=replace, force=force, new=new))

    # ------------------------------------------------------------------ checking
    def problems(self) -> list[str]:
        """Every reason the outputs cannot be written as declared (empty: all fine)."""
        found: list[str] = []
        for i, out in enumerate(self._outputs):
            found += self._against_inputs(out)
            found += self._against_outputs(out, self._outputs[:i])
            found += self._kind(out)
            found += self._links(out)
        return list(dict.fromkeys(found))

    def _links(self, out: _Output) -> list[str]:
        """A symbolic link inside a declared output folder, on the way to ``out`` (or ``out``
        itself when a folder): writing there would write elsewhere. The output folder itself may
        be a link (the user named it)."""
        for other in self._outputs:
            if other is out or not other.is_folder or not _lexically_inside(out.path, other.path):
                continue
            link = link_below(other.path, out.path if out.is_folder else out.path.parent)
            if link is not None:
                return [
                    f"{out.option} {out.path}: {link} is a symbolic link (to {os.readlink(link)}); fvlm never "
                    f"writes through a link it did not create. Remove the link, or choose another {other.option}."
                ]
        return []

    def check(self) -> None:
        """Raise :class:`OutputError` listing every problem; call it before any work."""
        found = self.problems()
        if found:
            raise OutputError(" ".join(found) + " Nothing was done.")

    def _against_inputs(self, out: _Output) -> list[str]:
        found = []
        for inp in self._inputs:
            what = f"{out.option} {out.path}"
            if _same(out.path, inp.path):
                change = "writing into it would change" if out.is_folder else "writing it would replace"
                found.append(
                    f"{what} is the input {inp.option} {inp.path}: {change} the input. Choose another output path."
                )
            elif (
                inp.contents
                and inp.path.is_dir()
                and _inside(out.path, inp.path)
                and os.path.lexists(out.path)
            ):
                found.append(
                    f"{what} is part of the input folder {inp.option} {inp.path}: writing it would "
                    "change the input. Choose a path outside that folder."
                )
            elif out.is_folder and out.replace and _inside(inp.path, out.path):
                found.append(
                    f"{what} holds the input {inp.option} {inp.path}: replacing the folder would delete "
                    "it. Choose another output folder."
                )
        return found

    @staticmethod
    def _against_outputs(out: _Output, earlier: Sequence[_Output]) -> list[str]:
        found = []
        for other in earlier:
            if _same(out.path, other.path):
                found.append(
                    f"{other.option} and {out.option} are the same path ({out.path}): each output "
                    "needs its own path."
                )
            elif other.is_folder and other.replace and _inside(out.path, other.path):
                found.append(
                    f"{out.option} {out.path} lies inside {other.option} {other.path}, which is replaced."
                )
            elif out.is_folder and out.replace and _inside(other.path, out.path):
                found.append(
                    f"{other.option} {other.path} lies inside {out.option} {out.path}, which is replaced."
                )
        return found

    @staticmethod
    def _kind(out: _Output) -> list[str]:
        what = f"{out.option} {out.path}"
        above = _nearest_existing(out.path.parent)
        if os.path.lexists(above) and not above.is_dir():
            return [f"{what}: {above} is a file, not a folder, so nothing can be written below it."]
        if not out.is_folder:
            if out.path.is_dir():
                name = out.example or "results"
                return [f"{what} is an existing folder; give a file path, e.g. {out.path / name}."]
            name = out.path.name.lower()
            if out.suffixes and not name.endswith(out.suffixes):
                return [f"{what}: unknown file type; name it with one of {', '.join(out.suffixes)}."]
        elif os.path.lexists(out.path) and not out.path.is_dir():
            return [f"{what} is an existing file; give a folder path (it is created if missing)."]
        elif out.new and os.path.lexists(out.path):
            return [
                f"{what} already exists; give a folder that does not exist yet (it is created with all "
                "of its files at once, and an existing folder is never added to or replaced)."
            ]
        elif out.replace and out.path.is_dir() and not out.force and any(out.path.iterdir()):
            return [
                f"{what} already exists; pass --force to replace it (its current files are removed), "
                "or give a new folder."
            ]
        where = out.path if (out.is_folder and not out.replace and out.path.is_dir()) else above
        reason = _probe_writable(where)
        if reason is not None:
            return [f"{what}: cannot write in {where} ({reason}). Choose a folder you can write to."]
        return []

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writing(self) -> Iterator[Staging]:
        """Stage every output; on a clean exit move them all into place, else discard them.

        Checks again first (the file system may have changed during the work).
        """
        self.check()
        staging = Staging(self._outputs, self._inputs)
        try:
            staging.open()
            yield staging
            staging.commit()
        except BaseException as exc:
            where = self._outputs[0].path.parent if self._outputs else Path(".")
            full = (
                isinstance(exc, Exception) and not isinstance(exc, OutputError) and is_disk_full(exc, where)
            )
            staging.discard()
            if full:
                names = ", ".join(str(o.path) for o in self._outputs)
                raise disk_full_error(
                    where, names, "Nothing was written: the previous files are kept."
                ) from exc
            raise


class Staging:
    """Temporary places of a plan's outputs (see :meth:`OutputPlan.writing`)."""

    def __init__(self, outputs: Sequence[_Output], inputs: Sequence[_Input]) -> None:
        self._outputs = list(outputs)
        self._inputs = list(inputs)
        self._staged: dict[str, Path] = {}
        self._created: list[Path] = []  # folders made for the outputs (removed again on failure)
        self._merge: dict[str, bool] = {}  # folder outputs whose files are added to an existing folder

    def open(self) -> None:
        for out in self._outputs:
            self._created += make_parents(out.path)
            merge = out.is_folder and not out.replace and out.path.is_dir()
            self._merge[out.option] = merge
            if merge:  # stage inside it: the moves stay on its file system
                self._staged[out.option] = Path(tempfile.mkdtemp(prefix=".fvlm-staging-", dir=out.path))
            else:
                self._staged[out.option] = temporary_sibling(out.path, folder=out.is_folder)

    def path(self, option: str) -> Path:
        """Where to write output ``option`` now: a temporary file with the target's suffix, or an
        empty temporary folder."""
        return self._staged[option]

    def final(self, staged: str | os.PathLike) -> Path:
        """The final place of a staged output, or of a file inside a staged folder."""
        staged = Path(staged)
        for out in self._outputs:
            tmp = self._staged[out.option]
            if staged == tmp:
                return out.path
            if tmp in staged.parents:
                return out.path / staged.relative_to(tmp)
        raise KeyError(f"{staged} is not a staged output")

    def _moves(self) -> list[tuple[Path, Path]]:
        moves = []
        for out in self._outputs:
            tmp = self._staged[out.option]
            if self._merge[out.option]:
                moves += [
                    (f, out.path / f.relative_to(tmp)) for f in sorted(tmp.rglob("*")) if not f.is_dir()
                ]
            else:
                moves.append((tmp, out.path))
        return moves

    def _refuse_inputs(self, moves: Sequence[tuple[Path, Path]]) -> None:
        """A file added to an existing folder may only now be known to land on an input."""
        for _, dst in moves:
            for inp in self._inputs:
                inside = inp.contents and inp.path.is_dir() and _inside(dst, inp.path) and dst.exists()
                if inside or _same(dst, inp.path):
                    raise OutputError(
                        f"{dst} would replace the input {inp.option} {inp.path}; nothing was written. "
                        "Choose another output folder."
                    )

    def _refuse_links(self, moves: Sequence[tuple[Path, Path]]) -> None:
        """A file added to an existing folder would go through a symbolic link inside it (made by
        someone else, maybe while the command ran): refused, nothing is written."""
        for out in self._outputs:
            if not self._merge[out.option]:
                continue
            for _, dst in moves:
                link = link_below(out.path, dst.parent)
                if link is not None:
                    raise OutputError(
                        f"{dst} would be written through the symbolic link {link} (to {os.readlink(link)}); "
                        "fvlm never writes through a link it did not create. Remove the link; nothing was written."
                    )

    def commit(self) -> None:
        """Move every staged output into place, in the order they were declared; on any failure
        put everything back.

        Each file goes into place by one atomic rename over the one it replaces, so at every
        moment each output path holds its old or its new file, never none (a replaced folder is
        swapped atomically where the OS can: Linux ``renameat2``, macOS ``renamex_np``). A run
        killed during the commit therefore leaves the outputs declared before the one in flight
        new and the rest old: declare last the output that completes the set (a model folder's
        ``config.yaml``). Replaced files are kept as hard links (or copies) until the end, to be
        put back after a failure.
        """
        moves = self._moves()
        self._refuse_inputs(moves)
        self._refuse_links(moves)
        for src, dst in moves:
            if src.is_dir():
                old = dst.stat().st_mode if dst.is_dir() else None
                os.chmod(src, stat.S_IMODE(old) if old is not None else new_dir_mode())
            else:
                os.chmod(src, final_mode(dst))
        done: list[tuple[Path, Path, Path | None]] = []  # (staged, final, the old output kept)
        try:
            for src, dst in moves:
                dst.parent.mkdir(parents=True, exist_ok=True)
                done.append((src, dst, _move_over(src, dst)))
        except BaseException:
            for src, dst, backup in reversed(done):
                with contextlib.suppress(OSError):
                    _put_back(src, dst, backup)
            raise
        for _, _, backup in done:
            if backup is not None:
                _remove(backup)
        for out in self._outputs:
            if self._merge[out.option]:
                _remove(self._staged[out.option])

    def discard(self) -> None:
        """Remove every staged output and the folders made for them."""
        for tmp in self._staged.values():
            _remove(tmp)
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


def _move_over(src: Path, dst: Path) -> Path | None:
    """Put ``src`` in place of ``dst`` (see :meth:`Staging.commit`); returns where the output it
    replaced is kept (None: there was none)."""
    if not os.path.lexists(dst):
        os.replace(src, dst)
        return None
    if dst.is_dir() != src.is_dir():
        kind = "folder" if dst.is_dir() else "file"
        raise OutputError(f"{dst} became a {kind} while the command ran; nothing was written.")
    if src.is_dir():
        if _exchange(src, dst):  # the old folder is now at src
            return src
        backup = temporary_sibling(dst, folder=True)
        os.replace(dst, backup)  # no atomic swap here: a moment without the folder
        os.replace(src, dst)
        return backup
    backup = _keep(dst)
    os.replace(src, dst)  # one atomic rename over the old file
    return backup


def _keep(path: Path) -> Path:
    """A second name for the file at ``path`` (a hard link; a copy where links are not possible)."""
    backup = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def _put_back(src: Path, dst: Path, backup: Path | None) -> None:
    """Undo :func:`_move_over`: the new output goes back to ``src``, the old one (if any) to ``dst``."""
    if backup is None:
        if os.path.lexists(dst) and not os.path.lexists(src):
            os.replace(dst, src)
    elif backup == src:  # folders swapped: swap again
        if not _exchange(src, dst):
            _swap_by_renames(src, dst)
    elif backup.is_dir() and not backup.is_symlink():
        os.replace(dst, src)
        os.replace(backup, dst)
    else:
        os.replace(backup, dst)  # one atomic rename: the old file is back


def _swap_by_renames(a: Path, b: Path) -> None:
    tmp = temporary_sibling(b, folder=True)
    os.rmdir(tmp)
    os.replace(b, tmp)
    os.replace(a, b)
    os.replace(tmp, a)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``);
    False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    return rc == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
