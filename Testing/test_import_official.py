"""Import of the official fVLM checkpoint, tested with a synthetic checkpoint that has exactly the
official names and shapes (checkpoint_keys.json) and random values: every tensor must arrive
unchanged, and the imported model's anatomy and text embeddings must equal a direct computation
with the official tensors (plain torch ops below, following the reference model)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from official_checkpoint import bert_base_folder, random_official_state

from fvlm_core.errors import CheckpointError
from fvlm_core.model import from_pretrained
from fvlm_core.model.official import import_official_state, read_official_state
from fvlm_training.cli import main as cli_main

pytestmark = pytest.mark.slow  # allocates ViT-B + BERT-base (~0.8 GB) a few times

PATCH = (16, 16, 32)
NATIVE = (7, 16, 11)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local BERT-base folder like CXR-BERT's: config + WordPiece vocab of the checkpoint's size."""
    return bert_base_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def official(checkpoint_keys, tmp_path_factory):
    """``(path, state)`` of a synthetic official checkpoint."""
    state = random_official_state(json.loads(checkpoint_keys.read_text()))
    path = tmp_path_factory.mktemp("official") / "fvlm_official.pth"
    torch.save({"model": state, "epoch": 19}, path)
    return path, state


# ---------------------------------------------------------------- direct reference computation
def _ln(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _lin(x, state, prefix):
    return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def reference_anatomy_embeddings(state, image, labels):
    """The reference fVLM forward (MONAI ViT, levels after blocks 3/6/9 + final norm, per-anatomy
    nn.MultiheadAttention over the anatomy's tokens of all levels), written with plain torch ops."""
    p = "visual_encoder."
    x = F.conv3d(image, state[p + "patch_embedding.patch_embeddings.weight"],
                 state[p + "patch_embedding.patch_embeddings.bias"], stride=PATCH)  # fmt: skip
    grid = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    pos = state[p + "patch_embedding.position_embeddings"].reshape(1, *NATIVE, 768).permute(0, 4, 1, 2, 3)
    pos = F.interpolate(pos, size=tuple(grid), mode="trilinear", align_corners=False)
    x = x + pos.flatten(2).transpose(1, 2)
    b, n, c = x.shape
    levels = []
    for i in range(12):
        q = f"{p}blocks.{i}."
        h = _ln(x, state, q + "norm1", 1e-5)
        qkv = _lin(h, state, q + "attn.qkv").view(b, n, 3, 12, 64).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-1, -2) * 64**-0.5).softmax(-1)
        x = x + _lin((att @ qkv[2]).transpose(1, 2).reshape(b, n, c), state, q + "attn.out_proj")
        h = _ln(x, state, q + "norm2", 1e-5)
        x = x + _lin(F.gelu(_lin(h, state, q + "mlp.linear1")), state, q + "mlp.linear2")
        if i in (3, 6, 9):
            levels.append(x)
    levels.append(_ln(x, state, p + "norm", 1e-5))

    w_q, w_k, w_v = state["attention.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = state["attention.in_proj_bias"].chunk(3)
    out = torch.zeros(b, 4, 256)
    present = torch.zeros(b, 4, dtype=torch.bool)
    for s in range(b):
        for a in range(4):
            mask = (labels[s] == a + 1).float()[None, None]
            tokens = F.max_pool3d(mask, kernel_size=PATCH, stride=PATCH).flatten() > 0
            if not tokens.any():
                continue
            kv = torch.cat([lv[s][tokens] for lv in levels])  # (n_a, 768)
            qh = F.linear(state["query_tokens"][a], w_q, b_q).view(4, 1, 192)
            kh = F.linear(kv, w_k, b_k).view(-1, 4, 192).transpose(0, 1)
            vh = F.linear(kv, w_v, b_v).view(-1, 4, 192).transpose(0, 1)
            o = ((qh @ kh.transpose(-1, -2)) * 192**-0.5).softmax(-1) @ vh  # (4, 1, 192)
            o = _lin(o.reshape(768), state, "attention.out_proj")
            out[s, a] = F.normalize(_lin(o, state, f"vision_projs.{a}"), dim=-1)
            present[s, a] = True
    return out, present


def reference_text_embeddings(state, input_ids, attention_mask):
    """BLIP's BERT (no token-type embedding), [CLS] through text_proj, L2-normalised."""
    p = "text_encoder."
    t = input_ids.shape[1]
    x = state[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + state[p + "embeddings.position_embeddings.weight"][:t]
    x = _ln(x, state, p + "embeddings.LayerNorm", 1e-12)
    b = x.shape[0]
    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(12):
        q = f"{p}encoder.layer.{i}."

        def heads(y):
            return y.view(b, t, 12, 64).transpose(1, 2)

        qq = heads(_lin(x, state, q + "attention.self.query"))
        kk = heads(_lin(x, state, q + "attention.self.key"))
        vv = heads(_lin(x, state, q + "attention.self.value"))
        att = (qq @ kk.transpose(-1, -2) / 8.0 + ext).softmax(-1)
        ctx = (att @ vv).transpose(1, 2).reshape(b, t, 768)
        x = _ln(
            _lin(ctx, state, q + "attention.output.dense") + x, state, q + "attention.output.LayerNorm", 1e-12
        )
        inter = F.gelu(_lin(x, state, q + "intermediate.dense"))
        x = _ln(_lin(inter, state, q + "output.dense") + x, state, q + "output.LayerNorm", 1e-12)
    return F.normalize(_lin(x[:, 0], state, "text_proj"), dim=-1)


# ---------------------------------------------------------------- tests
def test_import_maps_every_tensor_and_reproduces_the_reference(official, bert_dir, tmp_path, capsys):
    torch.set_num_threads(2)
    path, state = official
    out_dir = tmp_path / "imported"
    assert (
        cli_main(["import-checkpoint", str(path), "--text-encoder", str(bert_dir), "--out", str(out_dir)])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "text_encoder.embeddings.position_ids" in printed
        and "text_encoder.cls.predictions.decoder" in printed
    )
    assert "UNUSED (not in this model): 0" in printed

    model = from_pretrained(out_dir)  # from the project's own folder: safetensors + config + text/
    ours = model.state_dict()
    for key, value in state.items():
        if key.endswith("position_ids") or key.startswith("text_encoder.cls."):
            continue
        assert torch.equal(ours[key], value), key
    assert torch.equal(
        ours["text_encoder.embeddings.token_type_embeddings.weight"],
        torch.zeros_like(ours["text_encoder.embeddings.token_type_embeddings.weight"]),
    )
    assert model.anatomies == ["lung", "heart", "esophagus", "aorta"]
    assert model.config.text.pooling == "cls" and model.config.text.max_length == 384

    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 32, 64, 64, generator=gen)
    labels = torch.zeros(2, 32, 64, 64, dtype=torch.uint8)
    labels[0, 2:20, 5:40, 3:30] = 1
    labels[0, 20:30, 40:60, 40:60] = 2
    labels[0, 16, 16, 32] = 3  # a single voxel: exactly one token
    labels[1, :, 32:, :] = 1
    labels[1, 10:12, 10:12, 10:12] = 4
    with torch.no_grad():
        got = model.encode_image(image, labels)
        ref, ref_present = reference_anatomy_embeddings(state, image, labels)
    assert (
        got.present.tolist()
        == ref_present.tolist()
        == [[True, True, True, False], [True, False, False, True]]
    )
    torch.testing.assert_close(got.embeddings, ref, atol=2e-5, rtol=1e-4)

    prompts = ["Pleural effusion.", "Not atelectatic at all."]
    enc = model.tokenizer(prompts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref_text = reference_text_embeddings(state, enc["input_ids"], enc["attention_mask"])
        got_text = model.encode_text(prompts)
    torch.testing.assert_close(got_text, ref_text, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.temperature.detach(), torch.tensor(0.05))


def test_missing_or_misshaped_weights_are_refused(official, bert_dir):
    _, state = official
    broken = dict(state)
    del broken["visual_encoder.blocks.7.mlp.linear2.weight"]
    with pytest.raises(
        CheckpointError, match=r"vision weights missing: visual_encoder\.blocks\.7\.mlp\.linear2"
    ):
        import_official_state(broken, bert_dir)
    broken = dict(state)
    broken["vision_projs.2.weight"] = torch.zeros(128, 768)
    with pytest.raises(CheckpointError, match=r"head weights mis-shaped: vision_projs\.2\.weight"):
        import_official_state(broken, bert_dir)
    broken = {k: v for k, v in state.items() if not k.startswith("text_encoder.encoder.layer.11.")}
    with pytest.raises(CheckpointError, match=r"text weights missing: text_encoder\.encoder\.layer\.11"):
        import_official_state(broken, bert_dir)


def test_unreadable_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_official_state(tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint fvlm can read safely"):
        read_official_state(junk)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match=r"\['model'\]"):
        read_official_state(other)


def test_anatomies_option_is_a_list_of_names(capsys):
    from fvlm_core.cli import build_parser

    base = ["import-checkpoint", "x.pth", "--text-encoder", "bert", "--out", "out"]
    parser = build_parser()
    assert parser.parse_args(base).anatomies is None  # the CT-RATE four, chosen by the import
    args = parser.parse_args([*base, "--anatomies", " lung, heart,esophagus ,aorta,"])
    assert args.anatomies == ["lung", "heart", "esophagus", "aorta"]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*base, "--anatomies", " , "])
    assert exc.value.code == 2 and "at least one anatomy name" in capsys.readouterr().err
