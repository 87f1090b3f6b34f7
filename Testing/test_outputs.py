"""Output files: permissions follow the umask (a replaced file keeps its mode), every output is
checked before the work (fvlm_core.outputs.OutputPlan), and a command's outputs are written all
or none."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from fvlm_core.atomic import atomic_path, atomic_write_text, current_umask
from fvlm_core.errors import FVLMError, OutputError
from fvlm_core.outputs import OutputPlan


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden temporaries included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- permissions


def test_umask_is_read_without_changing_it():
    with umask(0o027):
        assert current_umask() == 0o027
        assert current_umask() == 0o027


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_files_follow_the_umask(tmp_path, mask, expected):
    # the temporary file is private (0600) while it is written; the result is an ordinary file
    with umask(mask):
        path = atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "sub" / "b.nii.gz") as tmp:
            assert mode(tmp) == 0o600
            tmp.write_bytes(b"x")
    assert mode(path) == mode(tmp_path / "sub" / "b.nii.gz") == expected
    assert mode(tmp_path / "sub") == 0o777 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    for kept in (0o644, 0o600, 0o664):
        os.chmod(path, kept)
        with umask(0o077 if kept != 0o600 else 0o002):
            atomic_write_text(path, "new")
        assert mode(path) == kept and path.read_text() == "new"


def test_atomic_path_refuses_a_folder_before_the_work(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match="existing folder"), atomic_path(tmp_path / "out.json"):
        pytest.fail("the body must not run")
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(OutputError, match="is a file, not a folder"),
        atomic_path(tmp_path / "file" / "a.json"),
    ):
        pytest.fail("the body must not run")
    assert isinstance(OutputError("x"), OSError) and issubclass(OutputError, FVLMError)


# ---------------------------------------------------------------- checks before the work


@pytest.fixture
def place(tmp_path):
    """A CT file, a DICOM-like input folder, an existing folder and an existing file."""
    (tmp_path / "ct.nii.gz").write_bytes(b"ct")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "IM1").write_bytes(b"slice")
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("f")
    os.symlink(tmp_path / "ct.nii.gz", tmp_path / "link.nii.gz")
    return tmp_path


def problems(place: Path, *outputs: tuple[str, str, str], **folder_options) -> list[str]:
    plan = OutputPlan()
    plan.input("CT", place / "ct.nii.gz")
    plan.input("--dicom", place / "dicom")
    for kind, option, rel in outputs:
        if kind == "file":
            plan.file(
                option, place / rel, suffixes=(".json",) if option == "--typed" else None, example="r.json"
            )
        else:
            plan.folder(option, place / rel, **folder_options)
    return plan.problems()


@pytest.mark.parametrize(
    "outputs, words",
    [
        ([("file", "--out", "ct.nii.gz")], ["--out", "is the input CT", "Choose another output path"]),
        ([("file", "--out", "link.nii.gz")], ["is the input CT"]),  # a symlink to the input
        ([("file", "--out", "dicom/IM1")], ["part of the input folder --dicom", "outside that folder"]),
        ([("folder", "--maps-dir", "dicom")], ["is the input --dicom", "writing into it would change"]),
        ([("file", "--out", "r.json"), ("file", "--json", "r.json")], ["--out and --json are the same path"]),
        ([("file", "--out", "folder")], ["existing folder", "give a file path", "folder/r.json"]),
        ([("folder", "--maps-dir", "afile")], ["existing file", "give a folder path"]),
        ([("file", "--out", "afile/x/r.json")], ["afile is a file, not a folder"]),
        ([("file", "--typed", "r.txt")], ["unknown file type", ".json"]),
    ],
)
def test_each_bad_output_is_named_with_what_to_do(place, outputs, words):
    found = problems(place, *outputs)
    assert len(found) == 1, found
    for w in words:
        assert w in found[0], found[0]


def test_replacing_a_folder_needs_force_and_never_an_input(place):
    (place / "model").mkdir()
    assert problems(place, ("folder", "--out", "model"), replace=True) == []  # empty: fine
    (place / "model" / "old.txt").write_text("old")
    (found,) = problems(place, ("folder", "--out", "model"), replace=True)
    assert "already exists; pass --force" in found
    assert problems(place, ("folder", "--out", "model"), replace=True, force=True) == []
    found = problems(place, ("folder", "--out", "."), replace=True, force=True)
    assert len(found) == 2 and "holds the input CT" in found[0] and "holds the input --dicom" in found[1]
    assert all("would delete it" in f for f in found)


def test_unwritable_folder_is_found_by_writing(tmp_path):
    # /sys refuses new files even to root (who ignores permission bits)
    plan = OutputPlan()
    plan.file("--out", "/sys/kernel/results.json")
    plan.folder("--maps-dir", "/sys/kernel/fvlm-maps")
    found = plan.problems()
    assert len(found) == 2 and all(
        "cannot write in /sys/kernel" in f and "Choose a folder" in f for f in found
    )
    with pytest.raises(OutputError, match=r"Nothing was done\.$"):
        plan.check()


def test_problems_are_all_listed_at_once(place):
    plan = OutputPlan()
    plan.input("CT", place / "ct.nii.gz")
    plan.file("--out", place / "ct.nii.gz")
    plan.folder("--maps-dir", place / "afile")
    with pytest.raises(OutputError) as err:
        plan.check()
    assert "--out" in str(err.value) and "--maps-dir" in str(err.value)


# ---------------------------------------------------------------- all or none


def test_outputs_are_written_together(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "mine.txt").write_text("keep")
    (tmp_path / "maps" / "lung.nii.gz").write_text("old map")
    os.chmod(tmp_path / "maps" / "lung.nii.gz", 0o640)
    plan = OutputPlan()
    plan.file("--out", tmp_path / "new" / "results.json")
    plan.folder("--maps-dir", tmp_path / "maps")
    plan.check()
    with umask(0o022), plan.writing() as staged:
        staged.path("--out").write_text("{}")
        (staged.path("--maps-dir") / "lung.nii.gz").write_text("new map")
        (staged.path("--maps-dir") / "heart.nii.gz").write_text("map")
        assert staged.final(staged.path("--maps-dir") / "heart.nii.gz") == tmp_path / "maps" / "heart.nii.gz"
        assert not (tmp_path / "new" / "results.json").exists()  # nothing in place before the end
    assert files(tmp_path) == {
        "maps/heart.nii.gz": b"map",
        "maps/lung.nii.gz": b"new map",
        "maps/mine.txt": b"keep",
        "new/results.json": b"{}",
    }
    assert (
        mode(tmp_path / "maps" / "lung.nii.gz") == 0o640 and mode(tmp_path / "maps" / "heart.nii.gz") == 0o644
    )


def test_a_failure_during_the_work_writes_nothing(tmp_path):
    (tmp_path / "results.json").write_text("earlier result")
    before = files(tmp_path)
    plan = OutputPlan()
    plan.file("--out", tmp_path / "results.json")
    plan.folder("--maps-dir", tmp_path / "deep" / "maps")
    with pytest.raises(RuntimeError, match="disk"), plan.writing() as staged:
        staged.path("--out").write_text("half")
        (staged.path("--maps-dir") / "m.nii.gz").write_text("m")
        raise RuntimeError("disk full")
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["results.json"]  # no deep/ left


def test_a_failed_move_puts_the_earlier_ones_back(tmp_path):
    """The second output's place turns into a folder while the command runs: the first output,
    already moved, is taken back and the file it replaced restored."""
    (tmp_path / "a.json").write_text("earlier a")
    plan = OutputPlan()
    plan.file("--a", tmp_path / "a.json")
    plan.file("--b", tmp_path / "b.json")
    with pytest.raises(OutputError, match="became a folder"), plan.writing() as staged:
        staged.path("--a").write_text("new a")
        staged.path("--b").write_text("new b")
        (tmp_path / "b.json").mkdir()  # another process
    assert (tmp_path / "a.json").read_text() == "earlier a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_a_file_landing_on_an_input_is_refused_at_the_end(tmp_path):
    """Names of files added to a folder are known only at the end: one that is an input stops
    everything."""
    (tmp_path / "lung__emphysema.nii.gz").write_text("the CT")
    plan = OutputPlan()
    plan.input("CT", tmp_path / "lung__emphysema.nii.gz")
    plan.file("--out", tmp_path / "results.json")
    plan.folder("--maps-dir", tmp_path)
    with pytest.raises(OutputError, match="would replace the input CT"), plan.writing() as staged:
        staged.path("--out").write_text("{}")
        (staged.path("--maps-dir") / "lung__emphysema.nii.gz").write_text("a map")
    assert files(tmp_path) == {"lung__emphysema.nii.gz": b"the CT"}


def test_a_replaced_folder_is_replaced_whole_or_not_at_all(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "unrelated.txt").write_text("old")
    plan = OutputPlan()
    plan.folder("--out", model, replace=True, force=True)
    with pytest.raises(RuntimeError), plan.writing() as staged:
        (staged.path("--out") / "config.yaml").write_text("new")
        raise RuntimeError("interrupted")
    assert files(tmp_path) == {"model/unrelated.txt": b"old"}
    with umask(0o022), plan.writing() as staged:
        (staged.path("--out") / "config.yaml").write_text("new")
    assert files(tmp_path) == {"model/config.yaml": b"new"} and mode(model) == 0o755
