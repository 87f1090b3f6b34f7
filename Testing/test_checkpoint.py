"""Checkpoints: bit-exact save/load round trip from a self-contained folder, and clear errors
for corrupt or truncated weights, a wrong config and wrong shapes."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
import yaml

from fvlm_core.errors import CheckpointError, ConfigError, FVLMWarning
from fvlm_core.model import FVLM, from_pretrained, load_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = FVLM.from_config("fvlm-tiny").eval()
    with torch.no_grad():  # non-initial values everywhere, so a skipped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(folder, thresholds={"Emphysema": 0.42})
    return model, folder


def _copy(saved_folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved_folder, dst)
    return dst


def test_round_trip_is_bit_exact(saved, monkeypatch):
    model, folder = saved
    assert {"model.safetensors", "config.yaml", "text"} <= {p.name for p in folder.iterdir()}
    assert (folder / "text" / "config.json").exists() and (folder / "text" / "tokenizer_config.json").exists()

    def no_pickles(*a, **k):
        raise AssertionError("from_pretrained must not call torch.load")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = FVLM.from_pretrained(folder)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = loaded.config
    assert cfg.thresholds == {"Emphysema": 0.42}
    assert {"fvlm", "torch", "monai", "transformers"} <= set(cfg.versions)
    assert cfg.anatomies == model.anatomies and cfg.findings == model.config.findings
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 64, 64, 64, generator=gen)
    labels = torch.randint(0, 5, (2, 64, 64, 64), generator=gen)
    with torch.no_grad():
        assert torch.equal(
            model.encode_image(image, labels).embeddings, loaded.encode_image(image, labels).embeddings
        )
        texts = ["Emphysema.", "Not emphysema."]
        assert torch.equal(model.encode_text(texts), loaded.encode_text(texts))
    assert not loaded.training


def test_checkpoint_text_folder_is_self_contained(saved, tmp_path):
    """The text encoder is rebuilt from the checkpoint's text/ folder, not from the original source."""
    _, folder = saved
    dst = _copy(folder, tmp_path)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["text"]["name_or_path"] = str(tmp_path / "nowhere")  # the original source is gone
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = from_pretrained(dst)
    assert loaded.encode_text(["Cardiomegaly."]).shape == (1, 128)


def test_device_follows_the_project_device_rule(saved, monkeypatch):
    """``auto`` is CUDA, else MPS, else CPU; an absent device is a clear error, not a torch crash."""
    monkeypatch.setattr("fvlm_core.devices._mps_available", lambda: False)
    assert FVLM.from_pretrained(saved[1], device="auto").device == torch.device("cpu")
    for absent in ("cuda", "gpu", "cuda:1", "mps"):  # this machine has neither CUDA nor MPS
        with pytest.raises(ConfigError, match=r"not available|no CUDA GPU"):
            from_pretrained(saved[1], device=absent)
    with pytest.raises(ConfigError, match="'tpu'"):
        from_pretrained(saved[1], device="tpu")


def test_truncated_weights_raise_checkpoint_error(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    w = dst / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_pretrained(dst)


def test_corrupt_weights_raise_checkpoint_error(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    w = dst / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:40] = b"\x00" * 32  # break the JSON header
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_pretrained(dst)
    w.write_bytes(b"PK\x03\x04 a pickle/zip, not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(dst)


def test_missing_files_raise_checkpoint_error(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(tmp_path / "absent")
    dst = _copy(saved[1], tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        from_pretrained(dst)
    (dst / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"config\.yaml"):
        from_pretrained(dst)


def test_wrong_config_raises_checkpoint_error(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["vision"]["type"] = "transformer"
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="invalid model config"):
        from_pretrained(dst)
    (dst / "config.yaml").write_text("embed_dim: [\n")
    with pytest.raises(CheckpointError, match="invalid model config"):
        from_pretrained(dst)


def _without_metadata(folder):
    """Rewrite the weights as a folder saved before the anatomy/architecture record existed."""
    from safetensors.torch import load_file, save_file

    w = folder / "model.safetensors"
    save_file(load_file(str(w)), str(w), metadata={"format": "pt"})


def test_wrong_shapes_raise_checkpoint_error(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["embed_dim"] = 64  # config from another model than the weights
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the recorded architecture names the field before any tensor is compared
    with pytest.raises(CheckpointError, match=r"embed_dim: saved 128, config\.yaml 64"):
        from_pretrained(dst)
    _without_metadata(dst)  # an older folder: the tensor shapes still catch it
    with (
        pytest.warns(FVLMWarning, match="older fvlm"),
        pytest.raises(CheckpointError, match=r"wrong shape.*text_proj\.weight"),
    ):
        from_pretrained(dst)
    cfg["embed_dim"] = 128
    cfg["anatomies"] = ["lung", "heart", "esophagus"]
    cfg["findings"] = None
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    with (
        pytest.warns(FVLMWarning),
        pytest.raises(CheckpointError, match=r"unexpected tensor.*vision_projs\.3"),
    ):
        from_pretrained(dst)


def test_weights_record_anatomies_and_architecture(saved, tmp_path):
    """A reordered anatomy list (same tensor shapes) would score each anatomy with another's
    weights: refused, naming both lists; so is an architecture field that changes no shape."""
    from safetensors import safe_open

    from fvlm_core.model.checkpoint import architecture_signature

    model, folder = saved
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["fvlm_anatomies"]) == ["lung", "heart", "esophagus", "aorta"]
    assert json.loads(meta["fvlm_architecture"]) == architecture_signature(model.config)
    assert {"embed_dim", "vision.hidden_size", "text.pooling"} <= set(json.loads(meta["fvlm_architecture"]))
    dst = _copy(folder, tmp_path)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    (dst / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "anatomies": ["heart", "lung", "esophagus", "aorta"]})
    )
    with pytest.raises(CheckpointError) as err:
        from_pretrained(dst)
    assert "[lung, heart, esophagus, aorta]" in str(err.value) and "[heart, lung, esophagus, aorta]" in str(
        err.value
    )
    assert "Restore" in str(err.value)
    text = {**cfg["text"], "pooling": "cls"}  # same shapes, another embedding
    (dst / "config.yaml").write_text(yaml.safe_dump({**cfg, "text": text}))
    with pytest.raises(CheckpointError, match=r"text\.pooling: saved 'mean', config\.yaml 'cls'"):
        from_pretrained(dst)
    # fields that do not change what the weights mean may be edited
    (dst / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "name": "renamed", "thresholds": {"Emphysema": 0.3}})
    )
    assert from_pretrained(dst).config.name == "renamed"


def test_old_folder_without_record_loads_with_a_warning(saved, tmp_path):
    model, folder = saved
    dst = _copy(folder, tmp_path)
    _without_metadata(dst)
    with pytest.warns(FVLMWarning, match=r"lung, heart, esophagus, aorta"):
        loaded = from_pretrained(dst)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_save_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    """Weights, config and text/ are written all or none."""
    import fvlm_core.model.checkpoint as ckpt

    model, folder = saved
    dst = _copy(folder, tmp_path)
    (dst / "notes.txt").write_text("mine")
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "unshared_state_dict", disk_full)  # fails after text/ was staged
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(dst, thresholds={"Emphysema": 0.1})
    after = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert after == before


def test_saved_files_follow_the_umask(saved, tmp_path):
    model, _ = saved
    old = os.umask(0o027)
    try:
        folder = model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes["model.safetensors"] == modes["config.yaml"] == 0o640
    assert modes["m"] == modes["text"] == 0o750


def test_save_overwrites_atomically(saved, tmp_path):
    model, folder = saved
    dst = _copy(folder, tmp_path)
    model.save_pretrained(dst)
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert load_config(dst).thresholds == {"Emphysema": 0.42}


class _Killed(BaseException):
    """The process dies here: nothing after it runs (no clean-up, no putting back)."""


def _content(path) -> bytes:
    """A file's bytes; a safetensors file's with its header's keys sorted (its metadata's order
    varies from one save to the next)."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    n = int.from_bytes(data[:8], "little")
    return json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode() + data[8 + n :]


def _files(folder, hidden: bool = True) -> dict:
    """Relative path -> content of every file (``hidden=False``: not those in or under a dot
    name: temporary files)."""
    return {
        p.relative_to(folder).as_posix(): _content(p)
        for p in folder.rglob("*")
        if p.is_file() and (hidden or not any(part.startswith(".") for part in p.relative_to(folder).parts))
    }


def test_a_save_killed_between_any_two_steps_of_its_commit_leaves_a_loadable_folder(
    saved, tmp_path, monkeypatch
):
    """The kill is simulated between every two renames of the commit (the steps a dying process
    can stop between); the folder then always has its config.yaml, every file is the old or the
    new one, and it loads. Before the fix, a kill between a file's "old -> backup" and "new ->
    in place" renames left the folder without its config.yaml. (The saves store no prompt
    embeddings, which take seconds to encode: that file is committed as the others are.)"""
    import fvlm_core.outputs as outputs

    _, folder = saved
    changed = FVLM.from_config("fvlm-tiny")  # other weights, other thresholds: every file differs
    (tmp_path / "new").mkdir()
    shutil.copytree(folder, tmp_path / "new" / "m")
    for _ in range(2):  # the first use of the tokenizer sets its truncation, which it then saves
        changed.save_pretrained(tmp_path / "new" / "m", thresholds={"Emphysema": 0.7}, store_prompts=False)
    old, new = _files(folder), _files(tmp_path / "new" / "m")
    assert old.keys() == new.keys() and old["model.safetensors"] != new["model.safetensors"]
    monkeypatch.setattr(outputs.Staging, "discard", lambda self: None)  # a dead process removes nothing
    real = {"replace": os.replace, "link": os.link, "exchange": getattr(outputs, "_exchange", None)}
    mixed = 0
    for k in range(1, 50):
        dst = tmp_path / f"k{k}"
        shutil.copytree(folder, dst)
        steps = [0]

        def step(fn, k=k, steps=steps):
            def dying(*args, **kwargs):
                steps[0] += 1
                if steps[0] >= k:  # dead from step k on: nothing is put back either
                    raise _Killed
                return fn(*args, **kwargs)

            return dying

        real_commit = outputs.Staging.commit

        def commit(self, step=step, real_commit=real_commit):
            monkeypatch.setattr(os, "replace", step(real["replace"]))
            monkeypatch.setattr(os, "link", step(real["link"]))
            monkeypatch.setattr(outputs, "_exchange", step(real["exchange"]), raising=False)
            try:
                real_commit(self)
            finally:
                monkeypatch.setattr(os, "replace", real["replace"])
                monkeypatch.setattr(os, "link", real["link"])
                monkeypatch.setattr(outputs, "_exchange", real["exchange"], raising=False)

        monkeypatch.setattr(outputs.Staging, "commit", commit)
        try:
            changed.save_pretrained(dst, thresholds={"Emphysema": 0.7}, store_prompts=False)
        except _Killed:
            pass
        else:
            assert k > 5, "the commit should have taken several steps"
            assert _files(dst, hidden=False) == new
            break
        finally:
            monkeypatch.setattr(outputs.Staging, "commit", real_commit)
        now = _files(dst, hidden=False)
        assert now.keys() == old.keys(), f"killed at step {k}: files missing: {old.keys() - now.keys()}"
        for name, content in now.items():
            assert content in (old[name], new[name]), f"killed at step {k}: {name} is neither old nor new"
        mixed += now != old and now != new
        loaded = from_pretrained(dst)  # the folder loads
        assert loaded.config.thresholds["Emphysema"] in (0.42, 0.7)
    assert mixed, "some kill should have fallen between two outputs"


def test_the_loaded_model_is_keyed_on_every_file_that_defines_it(saved, tmp_path):
    """The warm Slicer worker keeps the model it loaded while the folder's state is unchanged
    (``fvlm_core.zeroshot.pipeline.AnalyzerCache``, which the worker holds): an edit of
    text/config.json must load it again, even one that keeps the file's size and modification
    time. Before, only top-level files were looked at."""
    from fvlm_core.model.checkpoint import folder_state
    from fvlm_core.zeroshot.pipeline import AnalyzerCache

    _, folder = saved
    dst = _copy(folder, tmp_path)
    cache = AnalyzerCache()
    first = cache.get(str(dst), "cpu")
    assert not cache.reused and cache.get(str(dst), "cpu") is first and cache.reused
    before = folder_state(dst)
    text_config = dst / "text" / "config.json"
    st = text_config.stat()
    text = text_config.read_text()
    assert '"layer_norm_eps": 1e-12' in text
    text_config.write_text(text.replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-03'))  # same size
    os.utime(text_config, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    assert text_config.stat().st_size == st.st_size
    assert folder_state(dst) != before
    with pytest.warns(FVLMWarning, match="another text encoder"):  # its stored prompts no longer apply
        second = cache.get(str(dst), "cpu")
    assert not cache.reused and second is not first
    (dst / ".fvlm-lock").write_text("a lock, or a temporary file")  # not part of the model
    assert cache.get(str(dst), "cpu") is second and cache.reused
