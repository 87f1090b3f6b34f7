"""Initialise the ViT from an ImageNet MAE checkpoint, as the public fVLM code does.

The public code (``blip_pretrain.py``, ``from_config``) starts its 3D MONAI ViT from the 2D
ImageNet MAE ViT-B weights (``mae_pretrain_vit_base.pth``, whose ``["model"]`` dict holds timm
ViT names). Its rule, reproduced here:

- skipped: ``decoder*``, ``mask_token``, ``cls_token``, ``patch_embed*`` (the 2D patch
  projection does not fit a 3D single-channel one; it stays at its random init);
- renamed: ``fc`` -> ``linear`` and ``proj`` -> ``out_proj`` in every other name
  (``blocks.N.mlp.fc1`` -> ``blocks.N.mlp.linear1``, ``blocks.N.attn.proj`` ->
  ``blocks.N.attn.out_proj``; ``blocks.N.attn.qkv``, ``blocks.N.norm1/2`` and ``norm`` keep
  their names, which are MONAI's too);
- ``pos_embed`` ``(1, 1 + S*S, C)``: the cls row dropped, the rest as an ``S x S`` image
  (row = y, column = x) resized bilinearly (``align_corners=False``) to the model's in-plane
  token grid ``(gy, gx)`` and repeated over its ``gz`` slices (z-major token order), giving
  ``patch_embedding.position_embeddings`` ``(1, gz*gy*gx, C)``; for fvlm-base 14 x 14 ->
  16 x 11, repeated 7 times.

The reference loads the result with ``strict=False``, so a renamed tensor the model lacks is
ignored (reported here as ``unused``), and a tensor of the wrong shape is an error (here a
:class:`~fvlm_core.errors.CheckpointError` that says which tensors and what is expected).
The file is read with ``torch.load(weights_only=True)``: tensors only, never a pickle.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.errors import CheckpointError, ConfigError
from fvlm_core.model.official import read_model_tensors
from fvlm_core.model.vit import ViT

log = logging.getLogger("fvlm.train")

#: The file the public recipe starts from (MAE's ViT-B "pretrain" checkpoint).
MAE_FILE = "mae_pretrain_vit_base.pth"
_SKIPPED_KEYS = ("mask_token", "cls_token")
_SKIPPED_PREFIXES = ("decoder", "patch_embed")
#: Where the MAE authors publish it (facebookresearch/mae's README; the public fVLM README links it).
MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
_HOW_TO_GET = (
    f"download {MAE_FILE} from the MAE authors (facebookresearch/mae, 'pre-trained checkpoints', "
    f"ViT-Base: {MAE_URL}) and pass its path as init_from (--set init_from=PATH)"
)


def is_mae_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``init_from`` names a checkpoint file (MAE) rather than a model folder: an
    existing file, or a missing path ending in ``.pth`` / ``.pt``."""
    p = Path(path)
    return p.is_file() or (not p.exists() and p.suffix.lower() in (".pth", ".pt"))


@dataclass
class MAEInitReport:
    """What :func:`load_mae_vit` did (names of the model's vision encoder unless said otherwise)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checkpoint names skipped by the rule
    unused: list[str] = field(default_factory=list)  # renamed checkpoint names the model lacks
    random_init: list[str] = field(default_factory=list)  # model tensors left at their init

    def summary(self) -> dict[str, Any]:
        """Counts and names (for ``summary.json``)."""
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "skipped": self.skipped,
            "unused": self.unused,
            "random_init": self.random_init,
        }


def mae_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The reference's 3D position embedding from MAE's 2D one.

    Args:
        pos_embed: ``(1, 1 + S*S, C)``, MAE's ``pos_embed`` (cls row first).
        grid: the model's token grid ``(gz, gy, gx)``.

    Returns:
        ``(1, gz*gy*gx, C)``: rows 1.. as an ``(S, S)`` image resized bilinearly to
        ``(gy, gx)``, the same plane for every ``z`` (z-major order).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"pos_embed must be (1, 1 + S*S, C), got {tuple(pos_embed.shape)}")
    n, c = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.isqrt(max(n, 0))
    if n < 1 or side * side != n:
        raise CheckpointError(
            f"pos_embed {tuple(pos_embed.shape)}: after its cls row, {n} rows do not form a square "
            "patch grid (MAE ViT-B/16 at 224 px has 1 + 14 x 14 = 197)"
        )
    gz, gy, gx = (int(g) for g in grid)
    plane = pos_embed[0, 1:].float().reshape(1, side, side, c).permute(0, 3, 1, 2)
    plane = F.interpolate(plane, size=(gy, gx), mode="bilinear", align_corners=False)
    return plane.unsqueeze(2).repeat(1, 1, gz, 1, 1).flatten(2).permute(0, 2, 1).contiguous()


def map_mae_state(
    state: dict[str, torch.Tensor], grid: tuple[int, int, int]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MAE ``state`` (timm names) -> (tensors under MONAI ViT names, skipped MAE names)."""
    mapped: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if key in _SKIPPED_KEYS or key.startswith(_SKIPPED_PREFIXES):
            skipped.append(key)
        elif key == "pos_embed":
            mapped["patch_embedding.position_embeddings"] = mae_position_embedding(value, grid)
        else:
            mapped[key.replace("fc", "linear").replace("proj", "out_proj")] = value
    return mapped, skipped


def require_init_from(init_from: str | None) -> None:
    """Refuse, before any work, an ``init_from`` that is not there: a MAE checkpoint file (what
    ``ctrate-base`` and ``ctrate-paper`` start from, as the paper and the public code do) or a
    model folder. ``None`` (random weights) is the user's explicit choice and passes."""
    if not init_from:
        return
    p = Path(init_from)
    if is_mae_checkpoint(p) and not p.is_file():
        raise CheckpointError(
            f"init_from: {p} does not exist (looked for {p.absolute()}): the recipe starts the ViT from "
            f"ImageNet MAE, as the paper and the public fVLM code do; {_HOW_TO_GET}. To train from "
            "random weights instead (not the paper's start), pass --set init_from=null."
        )
    if not is_mae_checkpoint(p) and not (p / "config.yaml").is_file():
        raise CheckpointError(
            f"init_from: {p} is not a model folder (no config.yaml): give a folder written by "
            f"`fvlm import-checkpoint` or a training run's model/, or a MAE checkpoint file ({MAE_FILE})."
        )


def read_mae_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``["model"]`` tensors of a MAE checkpoint file (weights only, never unpickled)."""
    state = read_model_tensors(path, "init_from:", _HOW_TO_GET)
    if not state:
        raise CheckpointError(
            f"init_from: {path} has no ['model'] dict of tensors (MAE's layout): {_HOW_TO_GET}"
        )
    return state


def load_mae_vit(
    vision: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None
) -> MAEInitReport:
    """Load a MAE checkpoint into ``vision`` (a MONAI ViT: :class:`fvlm_core.model.vision.ViTEncoder`)
    by the reference's rule (module docstring); returns what was loaded, skipped and left.
    ``state``: the file's tensors when already read (:func:`read_mae_checkpoint`).

    Raises:
        ConfigError: the model's vision encoder is not a ViT.
        CheckpointError: the file is missing or not MAE's layout, no ViT tensor fits, or some
            tensor has another shape than the model's (e.g. a ViT-L checkpoint for a ViT-B).
    """
    if not isinstance(vision, ViT):
        raise ConfigError(
            f"init_from {path}: a MAE checkpoint initialises a ViT, but the model's vision encoder is "
            f"{type(vision).__name__} (vision.type: vit, e.g. model: fvlm-base)"
        )
    if state is None:
        state = read_mae_checkpoint(path)
    mapped, skipped = map_mae_state(state, tuple(vision.native_grid))
    own = vision.state_dict()
    bad = [k for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if bad:
        shapes = "; ".join(f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:3])
        raise CheckpointError(
            f"init_from: {len(bad)} tensors of {path} do not fit the model's ViT (hidden "
            f"{vision.patch_embedding.position_embeddings.shape[-1]}, {len(vision.blocks)} blocks): "
            f"{shapes}. The recipe's model needs a checkpoint of the same width and depth "
            f"(fvlm-base: ImageNet MAE ViT-B, {MAE_FILE})"
        )
    loaded = [k for k in mapped if k in own]
    if not any(k.startswith("blocks.") for k in loaded):
        raise CheckpointError(
            f"init_from: {path} holds no MAE ViT block tensors (blocks.N.attn.qkv.weight, ...); {_HOW_TO_GET}"
        )
    vision.load_state_dict({k: mapped[k] for k in loaded}, strict=False)
    report = MAEInitReport(
        source=str(path),
        loaded=loaded,
        skipped=skipped,
        unused=[k for k in mapped if k not in own],
        random_init=[k for k in own if k not in mapped],
    )
    log.info(
        "init_from %s: %d ViT tensors loaded; skipped (the reference's rule): %s; unused: %s; "
        "left at random init: %s",
        path,
        len(loaded),
        ", ".join(skipped) or "none",
        ", ".join(report.unused) or "none",
        ", ".join(report.random_init) or "none",
    )
    return report
