"""fvlm_core.model.vit.ViT against MONAI's own ViT (the real one, imported here): the same
state-dict names and parameter order, the same weights from the same seed, and the same outputs
bit for bit (fused and explicit attention, eval and training with dropout)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT as MonaiViT

from fvlm_core.model.vit import ViT

torch.set_num_threads(1)

SIZES = dict(in_channels=1, img_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=48, mlp_dim=96)
SIZES.update(num_layers=3, num_heads=4, dropout_rate=0.1)


def _pair(qkv_bias: bool):
    torch.manual_seed(0)
    ref = MonaiViT(**SIZES, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    ours = ViT(**SIZES, qkv_bias=qkv_bias)
    return ref, ours


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_same_names_order_and_initial_weights_as_monai(qkv_bias):
    ref, ours = _pair(qkv_bias)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flash", [True, False])
def test_same_outputs_as_monai_bit_for_bit(flash):
    ref, ours = _pair(qkv_bias=True)
    for m in (ref, ours):
        for blk in m.blocks:
            blk.attn.use_flash_attention = flash
    x = torch.rand(2, 1, 16, 32, 32)
    mask = torch.ones(2, 64)
    mask[1, 40:] = 0
    for train in (False, True):
        ref.train(train), ours.train(train)
        for blk_mask in (None,) if flash else (None, mask):  # MONAI's key mask: explicit path only
            torch.manual_seed(1)
            r = ref.blocks[0](ref.patch_embedding(x), attn_mask=blk_mask)
            torch.manual_seed(1)
            o = ours.blocks[0](ours.patch_embedding(x), attn_mask=blk_mask)
            assert torch.equal(r, o), (flash, train, blk_mask is not None)
        torch.manual_seed(2)
        (rf, rh) = ref(x)
        torch.manual_seed(2)
        (of, oh) = ours(x)
        assert torch.equal(rf, of) and all(torch.equal(p, q) for p, q in zip(rh, oh))


def test_refuses_what_it_does_not_build():
    with pytest.raises(ValueError, match=r"monai\.networks\.nets\.ViT"):
        ViT(**{**SIZES, "pos_embed_type": "sincos"})
