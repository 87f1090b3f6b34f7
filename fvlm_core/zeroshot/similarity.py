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

from fvlm_core.io import Geometry, write_image


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


def map_to_ct(window, voxel_values: np.ndarray, ct_geometry: Geometry) -> np.ndarray:
    """Resample a window-grid array onto the CT grid (linear; 0 outside the window).

    Args:
        window: the :class:`fvlm_core.preprocess.ModelSpaceWindow` the tokens came from.
        voxel_values: ``(Z, Y, X)`` on the window's grid.
        ct_geometry: the CT's own grid.

    Returns:
        float32 ``ct_geometry.shape_zyx``.
    """
    return np.asarray(window.to_original(voxel_values, ct_geometry, is_label=False), dtype=np.float32)


def write_map(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write a similarity map as a float32 volume (NIfTI when ``path`` ends in .nii/.nii.gz)."""
    return write_image(np.asarray(array, dtype=np.float32), geometry, path)


def map_filename(anatomy: str, finding: str, suffix: str = ".nii.gz") -> str:
    """``lung__pleural_effusion.nii.gz``: a portable file name for one map."""
    slug = "".join(c if c.isalnum() else "_" for c in finding.lower()).strip("_")
    return f"{anatomy}__{slug}{suffix}"
