"""Stored prompt embeddings (fvlm_core.model.prompt_store): written by save_pretrained, equal to
freshly encoded ones, used by the analyzer without building the text encoder, refused for another
text side, a corrupt store ignored with a warning, and no ``transformers`` import in ``fvlm analyze``
when every prompt is stored."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fvlm_core.errors import FVLMWarning
from fvlm_core.findings import Finding, FindingSet
from fvlm_core.io import CTVolume
from fvlm_core.model import FVLM
from fvlm_core.model.checkpoint import load_text_encoder
from fvlm_core.model.prompt_store import STORE_NAME, prompt_texts
from fvlm_core.zeroshot.analyzer import Analyzer
from fvlm_core.zeroshot.prompts import PROMPT_CACHE

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_prompt_cache():
    """Each test counts its own encoder calls: the process's prompt embeddings (kept by text
    identity, shared by every analyzer of one text side) start empty."""
    PROMPT_CACHE.clear()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, small_model_config):
    torch.manual_seed(0)
    model = FVLM(small_model_config()).eval()
    out = tmp_path_factory.mktemp("store") / "model"
    model.save_pretrained(out)
    return out


def _copy(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def _phantom():
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.segmentation import AnatomySegmentation

    s = make_phantom(7, 0, "valid", (32, 32, 32))
    ct = CTVolume(s.hu.astype(np.float32), s.geometry, source=s.name)
    labels = np.where(s.labels <= 4, s.labels, 0).astype(np.uint8)
    from fvlm_core.anatomy import CTRATE_CATALOG

    return ct, AnatomySegmentation.from_labelmap(labels, s.geometry, CTRATE_CATALOG, "test")


def test_stored_embeddings_equal_freshly_encoded_ones(folder):
    analyzer = Analyzer.from_pretrained(folder, device="cpu")
    texts = prompt_texts(analyzer.config)
    assert analyzer.prompts.texts_preloaded == len(texts) > 0
    stored = analyzer.prompts.embed(texts)
    assert analyzer.prompts.encoder_calls == 0 and not analyzer.model.text_loaded
    fresh = FVLM.from_pretrained(folder).eval()  # the text encoder built whole
    with torch.no_grad():
        torch.testing.assert_close(stored, fresh.encode_text(texts), atol=1e-6, rtol=0)
    assert analyzer.model.tokenizer is None and analyzer.model.text_encoder is None
    load_text_encoder(analyzer.model, folder)  # what the analyzer does for a prompt the store lacks
    assert analyzer.model.tokenizer is not None and analyzer.model.text_loaded
    a, b = analyzer.model.state_dict(), fresh.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # built without initialising its weights: every one loaded, and the buffers built as usual
    a, b = dict(analyzer.model.named_buffers()), dict(fresh.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stored_prompts_only_never_build_the_text_encoder_and_a_new_prompt_does(folder):
    analyzer = Analyzer.from_pretrained(folder, device="cpu")
    ct, seg = _phantom()
    first = analyzer.analyze(ct, seg, similarity_maps=False)
    assert not analyzer.model.text_loaded and analyzer.prompts.encoder_calls == 0
    assert analyzer.model.text_encoder is None and not any(
        k.startswith("text_encoder.") for k in analyzer.model.state_dict()
    )

    user = Finding.from_name("Big heart", "heart", positive=["Enlarged heart."], negative=["Normal heart."])
    both = analyzer.analyze(ct, seg, FindingSet([*analyzer.default_findings(), user]), similarity_maps=False)
    assert analyzer.model.text_loaded and not analyzer.model.text_encoder.training
    assert analyzer.prompts.encoder_calls == 1 and analyzer.prompts.texts_encoded == 2  # the user's only
    # the stored findings keep their scores (nothing re-encoded, nothing forgotten when the encoder came)
    for a in first.anatomies:
        for f in a.findings:
            assert both.finding(a.name, f.name).raw_score == f.raw_score
    analyzer.analyze(ct, seg, FindingSet([user]), similarity_maps=False)
    assert analyzer.prompts.encoder_calls == 1


def _identity_warning(record) -> bool:
    return any("another text encoder" in str(w.message) for w in record)


def test_another_text_side_is_recomputed_never_reused(folder, tmp_path, small_model_config):
    other = tmp_path / "other"
    torch.manual_seed(1)  # another text projection
    FVLM(small_model_config()).save_pretrained(other)
    shutil.copy(folder / STORE_NAME, other / STORE_NAME)  # the first model's embeddings
    with pytest.warns(FVLMWarning) as record:
        analyzer = Analyzer.from_pretrained(other, device="cpu")
    assert _identity_warning(record) and analyzer.prompts.texts_preloaded == 0
    texts = prompt_texts(analyzer.config)
    fresh = FVLM.from_pretrained(other).eval()
    with torch.no_grad():
        torch.testing.assert_close(analyzer.prompts.embed(texts), fresh.encode_text(texts), atol=1e-6, rtol=0)

    # a text setting changed in config.yaml changes what the encoder computes: not reused either
    edited = _copy(folder, tmp_path, "edited")
    cfg = yaml.safe_load((edited / "config.yaml").read_text())
    cfg["text"]["max_length"] = 4
    (edited / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(FVLMWarning) as record:
        assert Analyzer.from_pretrained(edited, device="cpu").prompts.texts_preloaded == 0
    assert _identity_warning(record)


def test_corrupt_store_is_ignored_with_a_warning(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / STORE_NAME).write_bytes((folder / STORE_NAME).read_bytes()[:100])
    with pytest.warns(FVLMWarning, match="unreadable stored prompt embeddings"):
        analyzer = Analyzer.from_pretrained(bad, device="cpu")
    texts = prompt_texts(analyzer.config)
    assert analyzer.prompts.texts_preloaded == 0
    encoded = analyzer.prompts.embed(texts)
    assert analyzer.prompts.encoder_calls == 1
    good = Analyzer.from_pretrained(folder, device="cpu")
    torch.testing.assert_close(encoded, good.prompts.embed(texts), atol=1e-6, rtol=0)


def test_a_failed_save_leaves_the_previous_store(folder, tmp_path, monkeypatch):
    """All or none: the store is one of save_pretrained's outputs."""
    from fvlm_core.model import prompt_store

    copy = _copy(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    model = FVLM.from_pretrained(copy)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(prompt_store, "write_store", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(copy, thresholds={"Emphysema": 0.3})
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_fvlm_analyze_with_stored_prompts_imports_no_transformers(folder, tmp_path):
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.io import write_image

    s = make_phantom(7, 0, "valid", (32, 32, 32))
    write_image(s.hu.astype(np.int16), s.geometry, tmp_path / "ct.nii.gz")
    write_image(np.where(s.labels <= 4, s.labels, 0).astype(np.uint8), s.geometry, tmp_path / "seg.nii.gz")
    script = (
        "import sys; from fvlm_training.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('MODULES', sorted(m for m in ('transformers', 'monai') if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    out = tmp_path / "results.json"
    args = ["analyze", str(tmp_path / "ct.nii.gz"), "--segmentation", str(tmp_path / "seg.nii.gz")]
    args += ["--model", str(folder), "--device", "cpu", "--out", str(out), "--quiet"]
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "MODULES []" in res.stdout, res.stdout
    assert json.loads(out.read_text())["anatomies"]


def test_save_without_prompts_writes_no_store_and_the_analyzer_encodes(tmp_path, small_model_config):
    """store_prompts=False (the demo's training workers, past their deadline) skips the encoding:
    no store is written, and the analyzer then encodes the prompts itself."""
    torch.manual_seed(0)
    out = FVLM(small_model_config()).eval().save_pretrained(tmp_path / "model", store_prompts=False)
    assert (out / "model.safetensors").is_file() and not (out / STORE_NAME).exists()
    analyzer = Analyzer.from_pretrained(out, device="cpu")
    assert analyzer.prompts.texts_preloaded == 0
    analyzer.prompts.embed(prompt_texts(analyzer.config)[:2])
    assert analyzer.prompts.encoder_calls == 1 and analyzer.model.text_loaded


_HELP_RUNS = (
    # the library CLI (python -m fvlm_core.cli), after importing fvlm_core.model and reading a config
    "import runpy\n"
    "import fvlm_core.model\n"
    "from fvlm_core.model import load_config\n"
    "assert load_config('fvlm-tiny').anatomies\n"
    "assert 'torch' not in sys.modules, 'fvlm_core.model imported torch'\n"
    "main = lambda: runpy.run_module('fvlm_core.cli', run_name='__main__')\n"
    "runs = [['--help']]\n",
    # the installed fvlm (fvlm_training.cli, which also reads the training recipes' option tables)
    "from fvlm_training.cli import main\n"
    "runs = [['--help'], ['train', '--help'], ['evaluate', '--help'], ['demo', '--help']]\n",
)


@pytest.mark.parametrize("setup", _HELP_RUNS, ids=["library", "installed"])
def test_help_and_model_package_import_no_torch(setup):
    """`fvlm --help` (library and installed entry points, and the training commands' help) and
    `import fvlm_core.model` stay light: torch, transformers, monai and scipy (seconds to import)
    load only when something that needs them runs, not for every refused or --help invocation."""
    script = (
        "import sys\n" + setup + "for args in runs:\n"
        "    sys.argv = ['fvlm', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(x for x in ('torch', 'transformers', 'monai', 'scipy') if x in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout and "usage: fvlm" in res.stdout, res.stdout
