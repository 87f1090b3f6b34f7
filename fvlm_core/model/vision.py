"""Image encoders that turn a CT window into token grids at several levels.

Both encoders return a :class:`TokenGrid`: ``levels`` is a list of ``(B, L, C)`` token tensors
(``L = gz * gy * gx`` in z-major order, as a flattened ``Conv3d`` output) and ``grid`` the
``(gz, gy, gx)`` shape; voxel ``(z, y, x)`` lies in token ``(z // pz, y // py, x // px)``.

- :class:`ViTEncoder` is MONAI's :class:`~monai.networks.nets.ViT` (parameter names equal the
  official fVLM ``visual_encoder.*``). Levels: ``hidden_states[i]`` for ``i`` in
  ``config.levels`` (reference 3, 6, 9) plus the final normed output. Position embeddings are
  interpolated trilinearly for any input divisible by the patch size, and attention is fused
  (torch ``scaled_dot_product_attention``) instead of an explicit attention matrix.
- :class:`CNNTokenEncoder` is a small strided 3D CNN for CPU demos with the same interface.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fvlm_core.errors import InputError
from fvlm_core.model.config import VisionConfig
from fvlm_core.model.vit import ViT  # MONAI's ViT without importing all of MONAI


@dataclass
class TokenGrid:
    """Multi-level tokens of one batch of windows.

    Attributes:
        levels: list of ``(B, L, C)`` tensors; the last one is the final (normed) output.
        grid: token grid ``(gz, gy, gx)`` with ``gz * gy * gx == L``.
        patch_size: voxels per token ``(pz, py, px)``.
    """

    levels: list[torch.Tensor]
    grid: tuple[int, int, int]
    patch_size: tuple[int, int, int]

    @property
    def final(self) -> torch.Tensor:
        """``(B, L, C)`` final-level tokens."""
        return self.levels[-1]


def check_image(image: torch.Tensor, patch_size: Sequence[int]) -> None:
    """Raise :class:`InputError` unless ``image`` is ``(B, 1, Z, Y, X)`` with sizes divisible by the patch."""
    if image.ndim != 5 or image.shape[1] != 1:
        raise InputError(f"image must have shape (B, 1, Z, Y, X), got {tuple(image.shape)}")
    if any(s % p or s == 0 for s, p in zip(image.shape[2:], patch_size)):
        raise InputError(
            f"image size {tuple(image.shape[2:])} (z, y, x) must be a non-zero multiple of the patch size "
            f"{tuple(patch_size)}; crop or pad the window (fvlm_core.preprocess.window_for_bbox does this)"
        )


def interpolate_pos_embed(
    pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]
) -> torch.Tensor:
    """Resample learned position embeddings to another token grid (trilinear).

    Args:
        pos_embed: ``(1, gz*gy*gx, C)`` embeddings on ``src_grid`` (z-major order).
        src_grid: ``(gz, gy, gx)`` the embeddings were trained on.
        dst_grid: ``(gz', gy', gx')`` of the current input.

    Returns:
        ``(1, gz'*gy'*gx', C)``; ``pos_embed`` itself when the grids are equal.
    """
    src, dst = tuple(int(s) for s in src_grid), tuple(int(s) for s in dst_grid)
    if src == dst:
        return pos_embed
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, *src, c).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=dst, mode="trilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class ViTEncoder(ViT):
    """MONAI ViT returning multi-level token grids (parameter names of ``monai.networks.nets.ViT``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            in_channels=1,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=config.dropout,
            spatial_dims=3,
            qkv_bias=config.qkv_bias,
        )
        self.patch_size = tuple(config.patch_size)
        self.native_grid = tuple(config.grid_size)
        self.level_indices = tuple(config.levels)
        # Attention-weight dropout in training. On a CPU, torch's fused SDPA kernel takes none:
        # with p > 0 it falls back to its math path (an explicit attention matrix per block;
        # fvlm-base at batch 2 peaks at about 10 GB instead of 4.7 GB and runs 1.2-1.3x slower,
        # benchmarks/bench_train_step.py). 0 keeps the fused kernel; CUDA's kernels take dropout.
        self.attn_dropout = float(config.dropout)
        self.grad_checkpointing = False  # FVLM.set_grad_checkpointing: recompute blocks in backward
        self.set_flash_attention(config.flash_attention)

    def set_flash_attention(self, enabled: bool) -> None:
        """Use torch SDPA (True) or MONAI's explicit attention matrix (False) in every block.

        MONAI 1.6.1 has no ViT constructor argument for it, so the blocks are switched here.
        """
        for blk in self.blocks:
            blk.attn.use_flash_attention = bool(enabled)

    def forward(self, x: torch.Tensor) -> TokenGrid:  # type: ignore[override]
        """``x (B, 1, Z, Y, X)`` -> :class:`TokenGrid` with ``len(levels) + 1`` levels of ``(B, L, C)``."""
        check_image(x, self.patch_size)
        pe = self.patch_embedding
        t = pe.patch_embeddings(x)
        grid = tuple(int(s) for s in t.shape[2:])
        t = t.flatten(2).transpose(1, 2)
        t = t + interpolate_pos_embed(pe.position_embeddings, self.native_grid, grid)
        t = pe.dropout(t)
        # MONAI's SDPA path passes dropout_p=dropout_rate even in eval mode: set it per mode.
        p = self.attn_dropout if self.training else 0.0
        levels: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            blk.attn.dropout_rate = p
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = checkpoint(blk, t, use_reentrant=False)
            else:
                t = blk(t)
            if i in self.level_indices:
                levels.append(t)
        levels.append(self.norm(t))
        return TokenGrid(levels=levels, grid=grid, patch_size=self.patch_size)  # type: ignore[arg-type]


class _TokenBlock(nn.Module):
    """ConvNeXt-style block at the token grid: depthwise 3x3x3 conv, then a channel MLP."""

    def __init__(self, dim: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, gz, gy, gx)
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = self.mlp(self.norm(y)).permute(0, 4, 1, 2, 3)
        return x + y


class CNNTokenEncoder(nn.Module):
    """Small strided 3D CNN for CPU training with the :class:`TokenGrid` interface of the ViT.

    A patchify conv (kernel = stride = ``cnn_stem_patch``) and ``len(cnn_channels) - 1`` stride-2
    3x3x3 convs (GELU after each) give one token per ``patch_size`` voxels; a 1x1x1 conv maps to
    ``hidden_size``; ``cnn_blocks`` residual blocks at the token grid give one level each, plus the
    final normed output. Runs channels-last (about 2x faster 3D convs on CPU).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        chans = config.cnn_channels
        stem: list[nn.Module] = [
            nn.Conv3d(1, chans[0], kernel_size=config.cnn_stem_patch, stride=config.cnn_stem_patch),
            nn.GELU(),
        ]
        for cin, cout in itertools.pairwise(chans):
            stem += [nn.Conv3d(cin, cout, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.stem = nn.Sequential(*stem)
        self.proj = nn.Conv3d(chans[-1], config.hidden_size, kernel_size=1)
        self.blocks = nn.ModuleList(_TokenBlock(config.hidden_size) for _ in range(config.cnn_blocks))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.patch_size = tuple(config.patch_size)

    def forward(self, x: torch.Tensor) -> TokenGrid:
        """``x (B, 1, Z, Y, X)`` -> :class:`TokenGrid` with ``cnn_blocks + 1`` levels of ``(B, L, C)``."""
        check_image(x, self.patch_size)
        t = self.proj(self.stem(x.contiguous(memory_format=torch.channels_last_3d)))
        grid = tuple(int(s) for s in t.shape[2:])
        levels = []
        for blk in self.blocks:
            t = blk(t)
            levels.append(t.flatten(2).transpose(1, 2))
        levels.append(self.norm(levels[-1] if levels else t.flatten(2).transpose(1, 2)))
        return TokenGrid(levels=levels, grid=grid, patch_size=self.patch_size)  # type: ignore[arg-type]


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """The encoder named by ``config.type`` (``vit`` or ``cnn``)."""
    return ViTEncoder(config) if config.type == "vit" else CNNTokenEncoder(config)
