"""The per-item results journal (fvlm_core.journal) that lets long batch work continue after a kill."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fvlm_core.errors import ConfigError, DataError
from fvlm_core.journal import ItemJournal, JournalMismatch

IDENTITY = {"model weights (sha256)": "ab" * 32, "prompts": [["lung", "Emphysema", ["no"], ["yes"]]]}


def test_results_survive_a_reopen_and_a_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / "out" / "scores" / "data.jsonl"
    with ItemJournal(path, IDENTITY) as j:
        assert len(j) == 0 and not path.exists()  # nothing is made before the first result
        j.add("v1", {"scores": {"Emphysema": 0.25, "Cardiomegaly": None}})
        j.add("v2", {"scores": {"Emphysema": 0.75, "Cardiomegaly": 0.5}})
        assert "v1" in j and path.exists()
    with open(path, "ab") as fh:  # a kill while the third line was written
        fh.write(b'{"item":"v3","record":{"scores":{"Emphys')
    with ItemJournal(path, IDENTITY) as j:
        assert dict(j.items()) == {
            "v1": {"scores": {"Emphysema": 0.25, "Cardiomegaly": None}},
            "v2": {"scores": {"Emphysema": 0.75, "Cardiomegaly": 0.5}},
        }
        assert "v3" not in j
        j.add("v3", {"scores": {"Emphysema": 0.125, "Cardiomegaly": 1.0}})
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the partial line is gone
    with ItemJournal(path, IDENTITY) as j:
        assert j["v3"]["scores"]["Emphysema"] == 0.125 and len(j) == 3


def test_another_identity_is_refused_and_says_what_differs(tmp_path):
    path = tmp_path / "data.jsonl"
    with ItemJournal(path, IDENTITY, what="volume scores") as j:
        j.add("v1", {"x": 1})
    before = path.read_bytes()
    other = {**IDENTITY, "prompts": [["lung", "Emphysema", ["no"], ["emphysema"]]]}
    with pytest.raises(JournalMismatch) as err:
        ItemJournal(path, other, what="volume scores")
    msg = str(err.value)
    assert "volume scores of 1 item(s) from another run" in msg and "prompts" in msg
    assert "model weights" not in msg and "another output folder" in msg
    assert isinstance(err.value, ConfigError) and path.read_bytes() == before
    # the identity compares as JSON data: a tuple equals the list it reads back as
    with ItemJournal(path, {**IDENTITY, "prompts": [("lung", "Emphysema", ("no",), ("yes",))]}) as j:
        assert "v1" in j


def test_a_damaged_journal_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "data.jsonl"
    with ItemJournal(path, IDENTITY) as j:
        j.add("v1", {"x": 1})
        j.add("v2", {"x": 2})
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"garbage\n" + lines[2])
    with pytest.raises(DataError, match="line 2: damaged"):
        ItemJournal(path, IDENTITY)
    (tmp_path / "notes.jsonl").write_text('{"something": "else"}\n')
    with pytest.raises(DataError, match="not a results journal"):
        ItemJournal(tmp_path / "notes.jsonl", IDENTITY)


def test_one_writer_at_a_time(tmp_path):
    pytest.importorskip("fcntl")
    path = tmp_path / "data.jsonl"
    with ItemJournal(path, IDENTITY) as j:
        j.add("v1", {"x": 1})
        with pytest.raises(ConfigError, match="another run is writing"):
            ItemJournal(path, IDENTITY)
    with ItemJournal(path, IDENTITY) as j:  # released on close
        assert len(j) == 1


def test_new_journal_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with ItemJournal(tmp_path / "new" / "data.jsonl", IDENTITY) as j:
            j.add("v1", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "data.jsonl").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750


def test_nan_is_refused_so_the_file_stays_json(tmp_path):
    with ItemJournal(tmp_path / "data.jsonl", IDENTITY) as j, pytest.raises(ValueError):
        j.add("v1", {"score": float("nan")})
