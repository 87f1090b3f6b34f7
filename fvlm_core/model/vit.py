"""MONAI's ViT (``monai.networks.nets.ViT``, MONAI 1.6) in plain torch, so that analysis never imports MONAI.

This is the project's one re-implementation of a MONAI part, kept because the import is what a user
waits for: ``import monai`` imports every MONAI submodule (its ``__init__`` walks the package,
pulling transformers, scipy's and pandas' stacks and more), 5.0-5.2 s after torch on the 2-core
machine, more than a ViT-B forward (4.4 s) and most of ``fvlm analyze``'s 7 s. Training uses
MONAI itself (``fvlm_core.data.samples``). This module rebuilds exactly the layers the image
encoder uses: the same module tree and registration order (so the same state-dict names and
parameter order), the same initialisation draws in the same order (so a seed gives the same
weights), and the same operations in ``forward`` (so the same outputs, bit for bit).
``Testing/test_model_vit.py`` holds it to MONAI's own classes on all three. Only what the
project's encoder uses is built: 3D, ``proj_type="conv"``, ``pos_embed_type="learnable"``, no
classification head, no cross-attention, causal attention or saved attention maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(tensor: torch.Tensor, mean: float, std: float, a: float, b: float) -> torch.Tensor:
    """In-place truncated normal, drawn as ``monai.networks.layers.trunc_normal_`` draws it."""

    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


class PatchEmbeddingBlock(nn.Module):
    """``monai.networks.blocks.PatchEmbeddingBlock`` (conv projection, learnable positions)."""

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        dropout_rate: float,
    ) -> None:
        super().__init__()
        if any(m < p for m, p in zip(img_size, patch_size)):
            raise ValueError("patch_size should be smaller than img_size.")
        n_patches = math.prod(m // p for m, p in zip(img_size, patch_size))
        self.patch_embeddings = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, hidden_size))
        self.dropout = nn.Dropout(dropout_rate)
        if not self.position_embeddings.is_meta:  # a meta tensor (weights loaded later) has nothing
            # to draw, and erfinv_ on meta would import torch's compiler stack (~800 modules, seconds)
            trunc_normal_(self.position_embeddings, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Z, Y, X)`` -> ``(B, L, hidden)`` (native grid only, as MONAI)."""
        x = self.patch_embeddings(x).flatten(2).transpose(-1, -2)
        return self.dropout(x + self.position_embeddings)


class MLPBlock(nn.Module):
    """``monai.networks.blocks.MLPBlock`` (GELU, ``dropout_mode="vit"``)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float) -> None:
        super().__init__()
        mlp_dim = mlp_dim or hidden_size
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(dropout_rate)
        self.drop2 = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class SABlock(nn.Module):
    """``monai.networks.blocks.SABlock`` with one ``qkv`` linear and the output projection.

    ``use_flash_attention`` picks torch's fused ``scaled_dot_product_attention`` (which, as in
    MONAI, is given ``dropout_p=dropout_rate`` in any mode) over the explicit attention matrix.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float, qkv_bias: bool) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError("hidden size should be divisible by num_heads.")
        self.num_heads = num_heads
        self.dim_head = hidden_size // num_heads
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=qkv_bias)
        self.drop_output = nn.Dropout(dropout_rate)
        self.drop_weights = nn.Dropout(dropout_rate)
        self.dropout_rate = dropout_rate
        self.scale = self.dim_head**-0.5
        self.use_flash_attention = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, C)`` -> ``(B, L, C)``; ``attn_mask (B, L)`` (0 = masked key) as MONAI's."""
        b, n, _ = x.shape
        # einops "b h (qkv l d) -> qkv b l h d": the same reshape and permute, so the same strides
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_flash_attention:
            x = F.scaled_dot_product_attention(
                query=q, key=k, value=v, attn_mask=attn_mask, scale=self.scale, dropout_p=self.dropout_rate
            )
        else:
            att = torch.einsum("blxd,blyd->blxy", q, k) * self.scale
            if attn_mask is not None:
                mask = attn_mask.unsqueeze(1).unsqueeze(2).expand(-1, self.num_heads, -1, -1)
                att = att.masked_fill(mask == 0, float("-inf"))
            att = self.drop_weights(att.softmax(dim=-1))
            x = torch.einsum("bhxy,bhyd->bhxd", att, v)
        x = x.permute(0, 2, 1, 3).reshape(b, n, self.num_heads * self.dim_head)  # "b l h d -> b h (l d)"
        return self.drop_output(self.out_proj(x))


class TransformerBlock(nn.Module):
    """``monai.networks.blocks.TransformerBlock`` without cross-attention (its unused
    ``norm_cross_attn`` is kept: MONAI's state dict has it)."""

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float, qkv_bias: bool
    ) -> None:
        super().__init__()
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SABlock(hidden_size, num_heads, dropout_rate, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm_cross_attn = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """``monai.networks.nets.ViT`` for 3D inputs with a conv patch embedding and learnable
    position embeddings, no classification head (the arguments mean what they mean there)."""

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        pos_embed_type: str = "learnable",
        classification: bool = False,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if (proj_type, pos_embed_type, classification, spatial_dims) != ("conv", "learnable", False, 3):
            raise ValueError(
                "fvlm_core.model.vit.ViT builds only MONAI's 3D ViT with proj_type='conv', "
                "pos_embed_type='learnable' and no classification head; use monai.networks.nets.ViT"
            )
        if not 0 <= dropout_rate <= 1:
            raise ValueError("dropout_rate should be between 0 and 1.")
        if hidden_size % num_heads:
            raise ValueError("hidden_size should be divisible by num_heads.")
        img = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        self.classification = False
        self.patch_embedding = PatchEmbeddingBlock(in_channels, img, patch, hidden_size, dropout_rate)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C, Z, Y, X)`` at the native size -> ``(normed (B, L, C), [each block's output])``."""
        x = self.patch_embedding(x)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden
