"""Image encoders: MONAI ViT wrapper (levels, fused attention, position-embedding interpolation)
and the CNN token encoder."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from fvlm_core.errors import ConfigError, InputError
from fvlm_core.model.config import VisionConfig
from fvlm_core.model.vision import CNNTokenEncoder, ViTEncoder, interpolate_pos_embed

torch.set_num_threads(1)

SMALL = dict(
    type="vit",
    img_size=(16, 32, 32),
    patch_size=(4, 8, 8),
    hidden_size=48,
    mlp_dim=96,
    num_layers=5,
    num_heads=4,
    levels=(1, 2, 3),
    dropout=0.1,
)


def _pair(**over):
    torch.manual_seed(0)
    cfg = VisionConfig(**{**SMALL, **over})
    ours = ViTEncoder(cfg).eval()
    # the reference: MONAI's ViT with its defaults, the config's sizes and the reference's qkv bias
    sizes = ("img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads")
    ref = ViT(in_channels=1, dropout_rate=cfg.dropout, qkv_bias=True, **{k: getattr(cfg, k) for k in sizes})
    ref.eval()
    ref.load_state_dict(ours.state_dict())  # same names: a plain MONAI ViT loads our weights
    return cfg, ours, ref


def test_pos_embed_interpolation_is_identity_at_native_grid():
    pos = torch.randn(1, 4 * 5 * 6, 8)
    assert interpolate_pos_embed(pos, (4, 5, 6), (4, 5, 6)) is pos
    # and the trilinear resampling itself is the identity at equal size
    grid = pos.reshape(1, 4, 5, 6, 8).permute(0, 4, 1, 2, 3)
    same = torch.nn.functional.interpolate(grid, size=(4, 5, 6), mode="trilinear", align_corners=False)
    torch.testing.assert_close(same.flatten(2).transpose(1, 2), pos, rtol=0, atol=0)


def test_pos_embed_interpolation_is_trilinear_over_zyx():
    # a field that is constant along y, x and linear in z stays so; its token order is z-major
    z = torch.arange(4, dtype=torch.float32)
    field = z[:, None, None, None].expand(4, 3, 2, 1).reshape(1, 24, 1)
    up = interpolate_pos_embed(field, (4, 3, 2), (8, 6, 4)).reshape(8, 6, 4)
    assert torch.allclose(up, up[:, :1, :1].expand_as(up))
    assert torch.all(up[1:, 0, 0] >= up[:-1, 0, 0])
    torch.testing.assert_close(up[1:7, 0, 0], torch.tensor([0.25, 0.75, 1.25, 1.75, 2.25, 2.75]))


def test_vit_levels_equal_monai_hidden_states_at_native_grid():
    cfg, ours, ref = _pair()
    x = torch.rand(2, 1, *cfg.img_size)
    with torch.no_grad():
        grid = ours(x)
        final, hidden = ref(x)  # MONAI's explicit attention path
    assert grid.grid == (4, 4, 4) and len(grid.levels) == 4
    for lv, idx in zip(grid.levels, cfg.levels):
        torch.testing.assert_close(lv, hidden[idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid.final, final, atol=1e-5, rtol=1e-5)


def test_vit_uses_fused_attention_and_eval_is_deterministic():
    cfg, ours, _ = _pair()
    assert all(blk.attn.use_flash_attention for blk in ours.blocks)
    x = torch.rand(1, 1, *cfg.img_size)
    with torch.no_grad():  # MONAI's SDPA path would apply dropout_p in eval: must not happen here
        a, b = ours(x).final, ours(x).final
    assert torch.equal(a, b)
    ours.train()
    with torch.no_grad():
        c, d = ours(x).final, ours(x).final
    assert not torch.equal(c, d)  # dropout active in training


def test_vit_interpolates_position_embeddings_for_other_sizes():
    _cfg, ours, _ = _pair()
    x = torch.rand(1, 1, 24, 16, 48)  # grid (6, 2, 6) instead of (4, 4, 4)
    with torch.no_grad():
        grid = ours(x)
    assert grid.grid == (6, 2, 6) and grid.final.shape == (1, 72, 48)
    with pytest.raises(InputError, match="multiple of the patch"):
        ours(torch.rand(1, 1, 22, 16, 48))
    with pytest.raises(InputError, match=r"\(B, 1, Z, Y, X\)"):
        ours(torch.rand(1, 2, 16, 32, 32))


def test_flash_and_explicit_attention_agree():
    cfg, ours, _ = _pair()
    x = torch.rand(1, 1, *cfg.img_size)
    with torch.no_grad():
        fused = ours(x).levels
        ours.set_flash_attention(False)
        explicit = ours(x).levels
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cnn_encoder_has_the_token_grid_interface():
    cfg = VisionConfig(
        type="cnn",
        img_size=32,
        patch_size=8,
        hidden_size=24,
        cnn_channels=(8, 16),
        cnn_stem_patch=4,
        cnn_blocks=2,
    )
    enc = CNNTokenEncoder(cfg)
    grid = enc(torch.rand(2, 1, 16, 32, 40))
    assert grid.grid == (2, 4, 5) and grid.patch_size == (8, 8, 8)
    assert len(grid.levels) == cfg.num_levels == 3
    assert all(lv.shape == (2, 40, 24) for lv in grid.levels)
    # token t covers voxels of its own patch: changing another patch's voxels far away leaves
    # the stem output of token 0 unchanged (receptive field of the stem is local)
    x = torch.rand(1, 1, 32, 32, 32)
    y = x.clone()
    y[:, :, 24:, 24:, 24:] += 1
    s0 = enc.stem(x)[..., 0, 0, 0]
    s1 = enc.stem(y)[..., 0, 0, 0]
    torch.testing.assert_close(s0, s1)


def test_bad_vision_configs_raise_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        VisionConfig(img_size=(112, 256, 350))
    with pytest.raises(ConfigError, match="patch"):
        VisionConfig(type="cnn", img_size=64, patch_size=16, cnn_channels=(8, 16), cnn_stem_patch=4)
    with pytest.raises(ConfigError, match="vit"):
        VisionConfig(type="swin")
    with pytest.raises(ConfigError, match="levels"):
        VisionConfig(levels=(3, 12))


def test_gradient_checkpointing_gives_the_same_gradients():
    _cfg, enc, _ = _pair(dropout=0.0)
    enc.train()
    x = torch.rand(1, 1, 16, 32, 32)
    grads = []
    for flag in (False, True):
        enc.zero_grad()
        enc.grad_checkpointing = flag
        sum(lv.square().sum() for lv in enc(x).levels).backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
