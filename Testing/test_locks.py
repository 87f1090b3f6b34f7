"""Folder locks (`fvlm_core.locks`): a second run into a folder in use is refused naming the
holder; the lock of a killed run is taken over; `fvlm prepare` shards, `fvlm evaluate` and the
demo take it too (`fvlm train`'s are in test_train.py)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fvlm_core.errors import FVLMWarning, OutputError
from fvlm_core.locks import LOCK_NAME, FolderInUse, FolderLock, LockHolder, held_scopes, lock_folder

PROJECT = Path(__file__).resolve().parents[1]


class Holder:
    """Another process holding a folder's lock (as a running command does) until stopped."""

    def __init__(self, folder: Path, scope: str = "", command: str = "fvlm train") -> None:
        code = textwrap.dedent(
            f"""
            import sys
            from fvlm_core.locks import FolderLock
            lock = FolderLock({str(folder)!r}, scope={scope!r}, command={command!r}).acquire()
            print("held", flush=True)
            sys.stdin.read()
            lock.release()
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=PROJECT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the process ends without releasing anything (its lock file stays)."""
        self.proc.send_signal(signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        self.proc.stdin.close()  # it gives the lock up and ends (if still running)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = Holder(out)
    try:
        with pytest.raises(FolderInUse) as err:
            FolderLock(out, command="fvlm train").acquire()
        msg = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "fvlm train" in msg
        assert "started" in msg and "choose another --out" in msg
        holder.kill()  # the holder dies: its lock file stays, with its details
        left = (out / LOCK_NAME).read_text()
        assert LockHolder.parse(left).pid == holder.pid
        with pytest.warns(FVLMWarning, match=f"pid {holder.pid}.*no longer running"):
            lock = FolderLock(out, command="fvlm train").acquire()
        assert lock.stale.pid == holder.pid
        assert LockHolder.parse((out / LOCK_NAME).read_text()).pid == os.getpid()
        lock.release()
        assert not (out / LOCK_NAME).exists() and out.is_dir()  # made by the other run: kept
    finally:
        holder.stop()


def test_one_process_cannot_take_its_own_folder_twice_and_release_removes_only_its_file(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    with lock_folder(tmp_path / "new", command="fvlm evaluate"):
        pass
    assert not (tmp_path / "new").exists()  # made for the lock and left empty: removed
    with lock_folder(tmp_path, command="fvlm evaluate") as lock:
        assert lock.held
        with pytest.raises(FolderInUse, match="fvlm evaluate"):  # e.g. two threads of one program
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists() and (tmp_path / "kept.txt").exists()
    # the lock file's path replaced meanwhile (a previous holder removed it, another made it):
    # release leaves the other one's file alone
    lock = FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).unlink()
    (tmp_path / LOCK_NAME).write_text("someone else's")
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == "someone else's"


def test_the_lock_file_follows_the_umask_and_is_never_a_link(tmp_path):
    old = os.umask(0o027)
    try:
        with lock_folder(tmp_path / "a"):
            assert (tmp_path / "a" / LOCK_NAME).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        FolderLock(tmp_path / "b").acquire()
    assert target.read_text() == "not yours"


def test_without_file_locks_the_holder_is_checked_by_its_pid(tmp_path, monkeypatch):
    """Stands in for a network file system without locks (flock: ENOLCK)."""
    import fvlm_core.locks as locks

    monkeypatch.setattr(locks, "_try_lock", lambda fd: None)
    with Holder(tmp_path / "x") as holder:  # the child has real locks; its file names it
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}.*no file locks"):
            FolderLock(tmp_path / "x").acquire()
        holder.kill()
        with pytest.warns(FVLMWarning, match="no longer running"):
            FolderLock(tmp_path / "x").acquire().release()
    far = LockHolder(1, "another-host", "2025-01-01 00:00:00 UTC", "fvlm train")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / LOCK_NAME).write_text(far.to_json())
    with pytest.raises(FolderInUse, match=f"delete {tmp_path / 'y' / LOCK_NAME}"):
        FolderLock(tmp_path / "y").acquire()


def test_prepare_shards_share_a_cache_but_a_shard_runs_once(tmp_path):
    from fvlm_core.data.prepare import shard_lock

    with Holder(tmp_path, scope="prepare.train.0of2", command="fvlm prepare"):
        assert [s for s, _ in held_scopes(tmp_path, "prepare.train.")] == ["prepare.train.0of2"]
        with shard_lock(tmp_path, "train", (1, 2)):  # another shard: fine
            pass
        with shard_lock(tmp_path, "valid", (0, 1)):  # another split: fine
            pass
        with pytest.raises(FolderInUse, match="fvlm prepare"):
            shard_lock(tmp_path, "train", (0, 2))
        with pytest.raises(FolderInUse, match=r"shard 0/2 of train .* --shard 1/4 .* overlap"):
            shard_lock(tmp_path, "train", (1, 4))
        assert not (tmp_path / f"{LOCK_NAME}.prepare.train.1of4").exists()  # refused: given back


def test_prepare_evaluate_and_the_demo_refuse_a_folder_in_use_before_any_work(tmp_path, monkeypatch):
    from fvlm_core.data import synth
    from fvlm_core.data.prepare import prepare_dataset
    from fvlm_training import demo, evaluate

    data = tmp_path / "data"
    synth.generate_cohort(data, 2, seed=5, size_zyx=(32, 32, 32), valid_fraction=0.0)
    cache = tmp_path / "cache"
    with Holder(cache, scope="prepare.train.0of1", command="fvlm prepare"):
        with pytest.raises(FolderInUse, match="fvlm prepare"):
            prepare_dataset(data, cache, split="train", progress=False)
        assert not list(cache.glob("*.safetensors"))

    out = tmp_path / "report"
    args = argparse.Namespace(
        **{k: None for k in ("data", "model", "labels", "calibration", "masks", "prompts")},
        scores=str(tmp_path / "scores.csv"), store_thresholds=False, out=str(out),
    )  # fmt: skip
    monkeypatch.setattr(evaluate, "_run", lambda a: pytest.fail("evaluate worked on a folder in use"))
    with Holder(out, command="fvlm evaluate"), pytest.raises(FolderInUse, match="fvlm evaluate"):
        evaluate.run(args)

    monkeypatch.setattr(demo, "_run_demo", lambda *a: pytest.fail("the demo worked on a folder in use"))
    with Holder(tmp_path / "demo", command="fvlm demo"), pytest.raises(FolderInUse, match="fvlm demo"):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "demo")))
