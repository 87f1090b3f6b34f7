"""Anatomy pooling: from token grids and an anatomy label map to one embedding per anatomy.

As in the reference (the public fVLM code, whose weights this project loads): a token belongs to an anatomy iff its patch holds any
voxel of the anatomy's mask (max-pool with kernel = stride = patch); a learned query per anatomy
attends, with one shared multi-head attention, over that anatomy's tokens of all levels; then a
per-anatomy projection and L2 normalisation.

Unlike the reference's double loop over samples and anatomies, all anatomies of all samples go
through one attention call: keys/values are projected once per sample and each (sample, anatomy)
query sees only its own tokens through a ``(B, heads, A, levels * L)`` boolean mask. An anatomy
without any token is reported absent and gets a zero embedding (never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.errors import InputError


@dataclass
class AnatomyEmbeddings:
    """Anatomy embeddings of a batch.

    Attributes:
        embeddings: ``(B, A, D)`` L2-normalised; zeros where the anatomy is absent.
        present: ``(B, A)`` bool; False when the anatomy has no token in the window (or was
            masked out by the caller).
        anatomies: the ``A`` anatomy names, in order.
        membership: ``(B, A, L)`` bool token membership (before the caller's ``present`` mask).
        grid: token grid ``(gz, gy, gx)``; ``patch_size`` voxels per token.
        tokens: with ``return_tokens=True``: ``(B, A, L, D)`` L2-normalised per-token embeddings in
            the anatomy's embedding space (each token's value through the pooling output
            projection and the anatomy projection, averaged over levels): ``tokens @ text``
            gives a similarity map on the token grid. Else ``None``.
        attention: with ``return_tokens=True``: ``(B, A, L)`` attention of the anatomy query on each
            token (mean over heads, summed over levels; zero outside the anatomy). Else ``None``.
    """

    embeddings: torch.Tensor
    present: torch.Tensor
    anatomies: list[str] = field(default_factory=list)
    membership: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    patch_size: tuple[int, int, int] | None = None
    tokens: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def index(self, anatomy: str) -> int:
        return self.anatomies.index(anatomy)

    def to(self, device: torch.device | str) -> AnatomyEmbeddings:
        def mv(t):
            return None if t is None else t.to(device)

        return AnatomyEmbeddings(
            embeddings=self.embeddings.to(device),
            present=self.present.to(device),
            anatomies=list(self.anatomies),
            membership=mv(self.membership),
            grid=self.grid,
            patch_size=self.patch_size,
            tokens=mv(self.tokens),
            attention=mv(self.attention),
        )


#: Up to this many anatomies, :func:`token_membership` masks them one by one (~10 ms each on a
#: 112x256x352 CPU window) instead of the all-anatomy bit pass (~0.1-0.2 s).
FEW_ANATOMIES = 6


def _or_reduce(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Bitwise OR over one dimension (torch has no OR reduction): ``size - 1`` in-place ORs."""
    out = v.select(dim, 0).clone()
    for i in range(1, v.shape[dim]):
        out |= v.select(dim, i)
    return out


def _or_bits_numpy(labels: torch.Tensor, dtype: torch.dtype, width: int, patch: tuple[int, int, int]):
    """CPU path of :func:`token_membership` with numpy's vectorised OR reductions (~100x faster
    than torch's elementwise ORs on byte maps). Returns the per-token OR of ``1 << label``."""
    np_dtype = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}[
        dtype
    ]
    arr = labels.numpy()
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    if arr.dtype != np_dtype or arr.max(initial=0) >= width or arr.min(initial=0) < 0:
        arr = np.where((arr < 0) | (arr >= width), 0, arr).astype(np_dtype)  # out of range -> ignored
    return _or_over_patches(np.left_shift(np_dtype(1), arr), patch)


def _or_over_patches(values, patch: tuple[int, int, int]):
    """``(B*L,)`` OR of a ``(B, Z, Y, X)`` numpy array (integer bits or bool) over each patch:
    z first (contiguous slabs), then y, then x."""
    b, z, y, x = values.shape
    pz, py, px = patch
    r = np.bitwise_or.reduce(values.reshape(b * (z // pz), pz, y * x), axis=1)
    r = np.bitwise_or.reduce(r.reshape(b * (z // pz) * (y // py), py, x), axis=1)
    return np.bitwise_or.reduce(r.reshape(-1, px), axis=1)


def token_membership(
    labels: torch.Tensor, num_anatomies: int, patch_size: Sequence[int], only: Sequence[int] | None = None
) -> torch.Tensor:
    """Which tokens each anatomy touches: the max-pool of each anatomy mask with kernel = stride = patch.

    Computed in one pass for all anatomies: every voxel becomes the bit ``1 << label``, the bits
    are OR-reduced over each patch, and anatomy ``a`` is bit ``a + 1`` of its patch (a few
    passes over a byte-sized map instead of one float mask and max-pool per anatomy). With
    ``only``, one mask and OR-reduction per listed anatomy instead (a few times cheaper for one
    or two anatomies, as in the analyzer's windows).

    Args:
        labels: ``(B, Z, Y, X)`` (or ``(B, 1, Z, Y, X)``) integer anatomy label map, anatomy ``a``
            stored as ``a + 1``; other values (0, > A) are ignored.
        num_anatomies: ``A`` (at most 62).
        patch_size: ``(pz, py, px)``; ``Z, Y, X`` must be multiples of it.
        only: anatomy indices to compute; the rows of the others are all False (e.g. the
            anatomies a window is used for).

    Returns:
        ``(B, A, L)`` bool, ``L = (Z/pz) * (Y/py) * (X/px)`` in the token order of the encoders.
    """
    if labels.ndim == 5 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 4:
        raise InputError(f"labels must have shape (B, Z, Y, X), got {tuple(labels.shape)}")
    if not 0 < num_anatomies <= 62:
        raise InputError(f"token_membership supports 1 to 62 anatomies, got {num_anatomies}")
    b, z, y, x = labels.shape
    pz, py, px = (int(p) for p in patch_size)
    if z % pz or y % py or x % px:
        raise InputError(f"label map size {(z, y, x)} must be a multiple of the patch size {(pz, py, px)}")
    gz, gy, gx = z // pz, y // py, x // px
    if only is not None and len(set(only)) <= FEW_ANATOMIES:
        return _membership_of(labels, num_anatomies, (pz, py, px), only)
    for dtype, width in ((torch.uint8, 8), (torch.int16, 16), (torch.int32, 32), (torch.int64, 64)):
        if num_anatomies < width - 1 or dtype is torch.int64:
            break
    if labels.device.type == "cpu":
        t = torch.from_numpy(_or_bits_numpy(labels.detach(), dtype, width, (pz, py, px)))
        t = t.view(b, 1, gz * gy * gx).to(torch.int64)
    else:
        if labels.is_floating_point():
            labels = labels.round()
        if labels.dtype != dtype:
            labels = labels.clamp(0, width).to(dtype)  # values >= width shift out to 0 (ignored)
        bits = torch.bitwise_left_shift(torch.ones((), dtype=dtype, device=labels.device), labels)
        # OR over the patch, z first (contiguous slabs), then y, then x
        t = _or_reduce(bits.view(b, gz, pz, y * x), 2)  # (B, gz, Y*X)
        t = _or_reduce(t.view(b * gz * gy, py, x), 1)  # (B*gz*gy, X)
        t = _or_reduce(t.view(b * gz * gy * gx, px), 1)  # (B*L,)
        t = t.view(b, 1, gz * gy * gx).to(torch.int64)
    shifts = torch.arange(1, num_anatomies + 1, device=t.device).view(1, -1, 1)
    member = (torch.bitwise_right_shift(t, shifts) & 1).bool()
    if only is not None:
        keep = torch.zeros(num_anatomies, dtype=torch.bool, device=member.device)
        keep[list(only)] = True
        member &= keep.view(1, -1, 1)
    return member


def _membership_of(
    labels: torch.Tensor, num_anatomies: int, patch: tuple[int, int, int], only: Sequence[int]
) -> torch.Tensor:
    """:func:`token_membership` of the anatomies ``only`` (the others False): one mask each."""
    b, z, y, x = labels.shape
    pz, py, px = patch
    gz, gy, gx = z // pz, y // py, x // px
    wanted = sorted({int(i) for i in only})
    if any(not 0 <= a < num_anatomies for a in wanted):
        raise InputError(f"anatomy indices {wanted} must lie in 0..{num_anatomies - 1}")
    out = torch.zeros(b, num_anatomies, gz * gy * gx, dtype=torch.bool, device=labels.device)
    if labels.device.type == "cpu":  # numpy's OR over contiguous runs: ~5x faster than torch's any here
        values = labels.detach().numpy()
        values = np.rint(values) if values.dtype.kind == "f" else values
        for a in wanted:
            out[:, a] = torch.from_numpy(_or_over_patches(values == a + 1, patch).reshape(b, -1))
        return out
    values = labels.round() if labels.is_floating_point() else labels
    for a in wanted:
        r = (values == a + 1).reshape(b, gz, pz, gy, py, gx, px).any(dim=6).any(dim=4).any(dim=2)
        out[:, a] = r.reshape(b, -1)
    return out


def attend_anatomies(
    levels: Sequence[torch.Tensor],
    membership: torch.Tensor,
    queries: torch.Tensor,
    attention: nn.MultiheadAttention,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each anatomy query attends over its own tokens of all levels, for all samples at once.

    Equivalent to ``attention(query[a], keys, keys)`` with ``keys`` = the anatomy's tokens of every
    level concatenated (the reference), computed with one masked attention over a
    ``(B, heads * A, N * L)`` matrix for all samples, anatomies and heads. The queries are fixed
    learned tokens, so the key and value projections are folded into them instead of projecting
    every token:

    - score: ``q_ah . (W_k,h x + b_k,h) = (W_k,h^T q_ah) . x + const``; the constant is the same for
      every key of a query, so the softmax ignores it: attend with ``W_k,h^T q_ah`` over raw tokens;
    - value: ``sum_t w_t (W_v,h x_t + b_v,h) = W_v,h (sum_t w_t x_t) + (sum_t w_t) b_v,h``: mix the
      raw tokens, then apply ``W_v,h`` (``sum_t w_t`` is 1 unless dropout removed weight).

    This costs ``O(B * A * heads * N * L * C)`` instead of ``O(B * N * L * C^2)`` for projecting
    all keys and values (about 2% of a ViT-B forward on a full crop, now negligible).

    Args:
        levels: ``N`` tensors ``(B, L, C)``.
        membership: ``(B, A, L)`` bool; rows without any True are treated as absent.
        queries: ``(A, C)`` learned query tokens.
        attention: ``nn.MultiheadAttention(C, heads, batch_first=True)`` whose parameters are used.
        dropout_p: attention dropout (training only).
        need_weights: also return ``(B, A, N, L)`` attention weights (mean over heads).

    Returns:
        ``(B, A, C)`` attention outputs (after ``out_proj``; rows of absent anatomies are
        finite but meaningless) and the weights or ``None``.
    """
    n_levels = len(levels)
    b, n_tok, c = levels[0].shape
    a = queries.shape[0]
    h = attention.num_heads
    d = c // h
    if membership.shape != (b, a, n_tok):
        raise InputError(
            f"membership shape {tuple(membership.shape)} does not match (B, A, L) = {(b, a, n_tok)}"
        )
    n_keys = n_levels * n_tok
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q = attention.in_proj_bias.chunk(3)[0] if attention.in_proj_bias is not None else None
    b_v = attention.in_proj_bias.chunk(3)[2] if attention.in_proj_bias is not None else None
    q = F.linear(queries, w_q, b_q).view(a, h, d)
    q_x = torch.einsum("ahd,hdc->hac", q, w_k.reshape(h, d, c)).reshape(h * a, c)  # rows: (head, anatomy)
    x = torch.cat(list(levels), dim=1)  # (B, N*L, C) raw tokens, level-major like the reference's concat
    present = membership.any(-1)  # (B, A)
    # absent rows attend to everything (finite output, discarded by the caller): no NaN anywhere
    mask = membership.repeat(1, 1, n_levels) | ~present.unsqueeze(-1)  # (B, A, N*L)
    mask = mask.unsqueeze(1).expand(b, h, a, n_keys).reshape(b, h * a, n_keys)
    # the attention matrix is tiny (B, heads*A, N*L): explicit matmuls beat the fused kernel here
    scores = torch.matmul(q_x, x.transpose(1, 2)) * d**-0.5  # (B, h*A, N*L)
    attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    attn_d = F.dropout(attn, p=dropout_p, training=True) if dropout_p > 0 else attn
    mixed = torch.matmul(attn_d, x).view(b, h, a, c)  # attention-weighted raw tokens
    out = torch.einsum("bhac,hdc->bahd", mixed, w_v.reshape(h, d, c))
    if b_v is not None:  # sum_t w_t b_v: b_v itself unless dropout removed some weight
        out = out + attn_d.sum(-1).view(b, h, a).transpose(1, 2).unsqueeze(-1) * b_v.view(h, d)
    out = attention.out_proj(out.reshape(b, a, c))
    weights = None
    if need_weights:
        weights = attn.detach().view(b, h, a, n_keys).mean(1).view(b, a, n_levels, n_tok)
        weights = weights * present[..., None, None]
    return out, weights


def project_anatomies(pooled: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """Apply anatomy ``a``'s ``Linear(C -> D)`` to ``pooled[:, a]`` for all anatomies at once.

    ``pooled`` may be ``(B, A, C)`` or ``(B, A, L, C)``; returns ``(..., D)`` (not normalised).
    """
    weight = torch.stack([p.weight for p in projections])  # (A, D, C)
    bias = torch.stack([p.bias for p in projections])  # (A, D)
    if pooled.ndim == 3:
        return torch.einsum("bac,adc->bad", pooled, weight) + bias
    return torch.einsum("balc,adc->bald", pooled, weight) + bias[:, None]


def token_embeddings(
    levels: Sequence[torch.Tensor],
    attention: nn.MultiheadAttention,
    projections: nn.ModuleList,
    offset: torch.Tensor | None = None,
    only: Sequence[int] | None = None,
) -> torch.Tensor:
    """``(B, A, L, D)`` L2-normalised per-token embeddings for similarity maps.

    A pooled embedding is an attention-weighted mix of key values taken through ``out_proj`` and the
    anatomy projection; this applies the same chain to each token's value (averaged over levels),
    so ``tokens @ text_embedding`` tells which tokens push the anatomy towards a text.
    ``offset (B, A, C)`` is a per-anatomy term the pooled vector received before the projection
    (the intensity profile); it is added to every token, as the attention weights sum to one.
    ``only``: the anatomy indices to compute (each costs ``L * C * D``); the others' rows are 0.
    """
    c = levels[0].shape[-1]
    w_v = attention.in_proj_weight[2 * c :]
    b_v = attention.in_proj_bias[2 * c :] if attention.in_proj_bias is not None else None
    v = torch.stack([F.linear(t, w_v, b_v) for t in levels]).mean(0)  # (B, L, C)
    v = attention.out_proj(v)
    a = len(projections)
    if only is None:
        v = v.unsqueeze(1).expand(-1, a, -1, -1)
        if offset is not None:
            v = v + offset.unsqueeze(2)
        return F.normalize(project_anatomies(v, projections), dim=-1)
    out = v.new_zeros(v.shape[0], a, v.shape[1], projections[0].out_features)
    for i in sorted({int(k) for k in only}):
        vi = v if offset is None else v + offset[:, i].unsqueeze(1)
        out[:, i] = F.normalize(projections[i](vi), dim=-1)
    return out
