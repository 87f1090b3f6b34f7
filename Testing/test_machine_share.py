"""The lock by which the suite's two xdist workers share the machine (Testing/conftest.py): a
test marked ``alone`` waits until the other worker ends its current file, and while it waits or
runs, no other file starts. Each ``MachineShare`` opens the lock files itself, so two of them in
one process exclude each other as two worker processes do (``flock`` locks belong to an open
file, not to a process)."""

from __future__ import annotations

import threading

from conftest import MachineShare


def _hold_in_thread(share: MachineShare, how: str) -> threading.Event:
    got = threading.Event()

    def hold():
        share.hold(how)
        got.set()

    threading.Thread(target=hold, daemon=True).start()
    return got


def test_an_alone_test_waits_for_the_other_file_and_holds_back_new_ones(tmp_path):
    reader, other, writer, late = (MachineShare(tmp_path) for _ in range(4))
    reader.hold("shared")
    other.hold("shared")  # two workers share the machine
    alone = _hold_in_thread(writer, "alone")
    assert not alone.wait(0.3), "an alone test started beside a running file"
    other.release()
    assert not alone.wait(0.3), "an alone test started beside a running file"
    started = _hold_in_thread(late, "shared")
    reader.release()
    assert alone.wait(5), "the alone test never got the machine"
    assert not started.wait(0.3), "a new file started beside an alone test (or jumped the queue)"
    writer.release()
    assert started.wait(5)
    late.release()
    for how in ("alone", "shared", "alone"):  # a worker moves between the two without deadlock
        writer.hold(how)
    writer.release()
    # nothing left holding: a fresh holder gets it at once
    assert _hold_in_thread(reader, "alone").wait(5)
