"""Localisation: per-token similarity maps of a finding, put back on the CT's own grid.

For a finding on an anatomy, every encoder token of that anatomy is compared with the finding's
positive and negative prompts through the same rule as the anatomy-level probability:
``m = softmax([tok.t_neg, tok.t_pos] / tau)[1]`` (= ``sigmoid(tok.(t_pos - t_neg) / tau)``), with
``tok`` the token's embedding in the anatomy's space (``AnatomyEmbeddings.tokens``). Tokens that
do not touch the anatomy are 0. The token grid is expanded to the window's voxels (each token
covers one patch), then resampled by physical position onto the CT grid
(``ModelSpaceWindow.to_original``), so a viewer can overlay it on the original volume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fvlm_core.boxes import nonzero_box
from fvlm_core.geometry import Geometry
from fvlm_core.io import write_image
from fvlm_core.outputs import distinct_stems, slug


def token_scores(
    tokens: torch.Tensor,
    membership: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    temperature,
) -> torch.Tensor:
    """Per-token finding score.

    Args:
        tokens: ``(L, D)`` token embeddings of one anatomy (L2-normalised).
        membership: ``(L,)`` bool, tokens that touch the anatomy.
        positive, negative: ``(D,)`` prompt embeddings.
        temperature: scalar ``tau``.

    Returns:
        ``(L,)`` float32: ``sigmoid(tok.(t_pos - t_neg) / tau)`` on member tokens, 0 elsewhere.
    """
    tau = float(temperature)
    diff = (tokens.float() @ (positive.float() - negative.float()).to(tokens.device)) / tau
    return torch.where(membership.to(tokens.device), torch.sigmoid(diff), torch.zeros_like(diff)).cpu()


def tokens_to_voxels(
    values: np.ndarray | torch.Tensor, grid: Sequence[int], patch: Sequence[int]
) -> np.ndarray:
    """Expand ``(gz*gy*gx,)`` token values (z-major) to a ``(gz*pz, gy*py, gx*px)`` voxel array.

    Each token's value fills its patch (nearest-token upsampling: no value leaks across patches).
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    g = tuple(int(s) for s in grid)
    arr = v.astype(np.float32, copy=False).reshape(g)
    for axis, p in enumerate(patch):
        arr = np.repeat(arr, int(p), axis=axis)
    return arr


def maps_to_ct(
    window,
    token_values: np.ndarray | torch.Tensor,
    grid: Sequence[int],
    patch: Sequence[int],
    ct_geometry: Geometry,
) -> list[np.ndarray]:
    """Put N token maps of one window onto the CT grid, all in one pass.

    The rule is that of expanding each map to the window's voxels (:func:`tokens_to_voxels`: each
    token fills its patch) and interpolating that voxel array linearly at each CT voxel's physical
    position, 0 outside the window (voxel edges) and clamped at its faces, which is what
    ``ModelSpaceWindow.to_original(..., is_label=False)`` (ITK's linear resampling) gives for
    patches of two or more voxels. It is computed without the voxel array: along each axis, linear
    interpolation of a patch-wise constant array is linear interpolation of the token grid at a
    warped coordinate (constant inside a patch, a one-voxel ramp between patches). Where each
    window axis runs along a CT axis (the model space is the CT reoriented) that is one small
    interpolation matrix per axis; on an oblique CT, one ``grid_sample`` of the small
    ``(N, gz, gy, gx)`` token grid. Only the CT voxels near the non-zero tokens are computed.

    Args:
        window: the :class:`fvlm_core.preprocess.ModelSpaceWindow` the tokens came from.
        token_values: ``(N, gz*gy*gx)`` token values (z-major), 0 off the anatomy.
        grid: the token grid ``(gz, gy, gx)``.
        patch: voxels per token ``(pz, py, px)``.
        ct_geometry: the CT's own grid.

    Returns:
        N float32 arrays of ``ct_geometry.shape_zyx``.
    """
    g = tuple(int(s) for s in grid)
    p = np.asarray(patch, dtype=int)
    v = torch.as_tensor(token_values).detach().to("cpu", torch.float32).reshape((-1, *g))
    out = [np.zeros(ct_geometry.shape_zyx, dtype=np.float32) for _ in range(v.shape[0])]
    token_box = nonzero_box((v != 0).any(dim=0).numpy(), margin=1)
    if token_box is None:
        return out
    # Outside the non-zero tokens and their one-token rim every map is 0: only CT voxels near them are computed.
    start = np.array([b.start for b in token_box]) * p
    block = window.geometry.sub_grid(start, [(b.stop - b.start) * n for b, n in zip(token_box, p)])
    ct_box = _covered_box(block, ct_geometry)
    if ct_box is None:
        return out
    to_window = np.linalg.inv(window.geometry.affine_lps) @ ct_geometry.affine_lps
    axes = _axis_pairs(to_window[:3, :3])
    if axes is not None:
        _separable_maps(v, to_window, axes, window.geometry.size, p, ct_box, out)
    else:
        values = _sampled_maps(v, to_window, window.geometry.size, p, ct_box)
        for arr, value in zip(out, values.numpy()):
            arr[ct_box] = value
    return out


def _token_coordinate(c: torch.Tensor, size: int, n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-grid coordinate of continuous voxel index ``c`` along one axis, and whether it is inside.

    Linear interpolation of an array constant over patches of ``n`` voxels equals linear
    interpolation of the token grid at ``t + max(0, r - (n - 1))`` (``t`` the token, ``r`` the
    offset in it): constant inside a patch, a one-voxel ramp to the next. Outside the window's
    voxel edges the map is 0; between the last voxel centre and the edge it is clamped.
    """
    # ITK's rule, [-0.5, size - 0.5), made robust to rounding at faces that lie on CT voxels exactly
    inside = (c >= -0.5 - 1e-6) & (c < size - 0.5 - 1e-6)
    c = c.clamp(0.0, size - 1.0)
    t = torch.floor(c / n)
    return (t + (c - t * n - (n - 1)).clamp(min=0.0)).clamp(max=tokens - 1), inside


def _axis_pairs(rotation: np.ndarray) -> list[int] | None:
    """For each window axis (x, y, z) the CT axis it runs along, or None when the grids are oblique."""
    nonzero = np.abs(rotation) > 1e-6 * np.abs(rotation).max()
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    return [int(np.flatnonzero(row)[0]) for row in nonzero]


def _separable_maps(
    v: torch.Tensor,
    to_window: np.ndarray,
    axes: list[int],
    size_xyz: Sequence[int],
    patch: np.ndarray,
    ct_box: tuple[slice, ...],
    out: list[np.ndarray],
) -> None:
    """Fill ``out[n][ct_box]`` when each window axis runs along one CT axis: one interpolation matrix per axis.

    ``out[n][k, j, i] = sum Wk[k, a] Wj[j, b] Wi[i, c] v[n, a, b, c]`` with the token grid's axes
    put in the CT's order; the last (largest) product is written straight into each map.
    """
    # window axis (x=0, y=1, z=2) along each CT axis z, y, x; v's dims are (n, z, y, x) of the window
    window_axis = [axes.index(q) for q in (2, 1, 0)]
    v = v.permute(0, *(3 - a for a in window_axis))
    weights = []
    for box, axis in zip(ct_box, window_axis):
        tokens = v.shape[1 + len(weights)]
        c = float(to_window[axis, axes[axis]]) * torch.arange(box.start, box.stop, dtype=torch.float64)
        u, inside = _token_coordinate(
            c + float(to_window[axis, 3]), size_xyz[axis], int(patch[2 - axis]), tokens
        )
        lo = torch.floor(u).long()
        frac = (u - lo) * inside
        rows = torch.arange(len(u))
        w = torch.zeros(len(u), tokens, dtype=torch.float64)
        w[rows, lo] = (1.0 - frac) * inside
        w[rows, (lo + 1).clamp(max=tokens - 1)] += frac
        weights.append(w.float())
    wk, wj, wi = weights
    small = torch.einsum("nabc,Jb,Ic->naJI", v, wj, wi).flatten(2)  # (N, ga, J*I)
    plane = torch.empty(len(wk), small.shape[2])
    box_shape = tuple(b.stop - b.start for b in ct_box)
    for arr, tokens_n in zip(out, small):
        torch.matmul(wk, tokens_n, out=plane)
        arr[ct_box] = plane.numpy().reshape(box_shape)


def _sampled_maps(
    v: torch.Tensor, to_window: np.ndarray, size_xyz, patch: np.ndarray, ct_box
) -> torch.Tensor:
    """``(N, *box)`` maps on an oblique CT grid: the warped coordinates of every voxel, one ``grid_sample``."""
    k, j, i = (torch.arange(b.start, b.stop, dtype=torch.float64) for b in ct_box)
    k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
    sample_at = torch.empty((*(b.stop - b.start for b in ct_box), 3), dtype=torch.float32)
    inside = torch.ones(sample_at.shape[:3], dtype=torch.bool)
    for axis in range(3):  # x, y, z: grid_sample's order
        m = [float(x) for x in to_window[axis]]
        tokens = v.shape[3 - axis]
        u, inside_axis = _token_coordinate(
            m[0] * i + m[1] * j + m[2] * k + m[3], size_xyz[axis], int(patch[2 - axis]), tokens
        )
        inside &= inside_axis
        sample_at[..., axis] = (2.0 * u / (tokens - 1) - 1.0) if tokens > 1 else 0.0
    values = torch.nn.functional.grid_sample(
        v[None], sample_at[None], mode="bilinear", padding_mode="border", align_corners=True
    )[0]
    return values * inside


def _covered_box(source: Geometry, target: Geometry) -> tuple[slice, ...] | None:
    """Slices of ``target``'s voxels that may lie within ``source``'s extent (voxel edges, + 1 voxel)."""
    edges = np.array(
        [
            [x, y, z]
            for x in (-0.5, source.size[0] - 0.5)
            for y in (-0.5, source.size[1] - 0.5)
            for z in (-0.5, source.size[2] - 0.5)
        ]
    )
    lps = edges @ source.affine_lps[:3, :3].T + source.affine_lps[:3, 3]
    inverse = np.linalg.inv(target.affine_lps)
    ijk = lps @ inverse[:3, :3].T + inverse[:3, 3]
    lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)[::-1]
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int)[::-1] + 2, target.shape_zyx)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def write_map(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write a similarity map as a float32 volume (NIfTI when ``path`` ends in .nii/.nii.gz)."""
    return write_image(np.asarray(array, dtype=np.float32), geometry, path)


def map_filenames(keys: Sequence[tuple[str, str]], suffix: str = ".nii.gz") -> dict[tuple[str, str], str]:
    """Distinct portable file names of the maps ``(anatomy, finding)``: ``lung__lung_mass.nii.gz``;
    findings whose names would give one file (``Lung mass`` and ``lung mass!``) each get a short
    hash of their name (:func:`fvlm_core.outputs.distinct_stems`)."""
    stems = distinct_stems({(a, f): f"{a}__{slug(f)}" for a, f in keys})
    return {key: stem + suffix for key, stem in stems.items()}
