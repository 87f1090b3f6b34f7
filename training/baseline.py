"""The global CLIP baseline: one embedding per volume against one per report.

What the fine-grained objective is compared with (the paper's "CLIP" row): the same image and
text encoders as an fVLM model, but the volume is one embedding (the mean of the encoder's final
tokens, plus the whole window's intensity profile when the model has profiles, through
``global_proj``) contrasted with the whole report. :class:`GlobalCLIP` wraps an
:class:`~fvlm_core.model.FVLM` and owns the only parameters the baseline adds, so the fVLM model
itself carries none of them.

A baseline folder is an fVLM model folder whose ``model.safetensors`` also holds the head's
tensors (``global_proj.*``, ``global_profile_embed.*``; the names
:data:`fvlm_core.model.checkpoint.BASELINE_HEAD` that an fVLM model ignores when it loads), so
``fvlm analyze`` still reads its encoders and :meth:`GlobalCLIP.from_pretrained` reads it whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.errors import CheckpointError
from fvlm_core.model import FVLM
from fvlm_core.model.checkpoint import BASELINE_HEAD, save_pretrained
from fvlm_core.model.profile import ProfileEmbedding, intensity_profiles
from fvlm_core.model.text import TextCache
from fvlm_core.model.weights import WEIGHTS_NAME, read_safetensors


class GlobalCLIP(nn.Module):
    """Whole-volume CLIP on an fVLM model's encoders.

    Args:
        fvlm: the model whose image and text encoders, text projection and temperature the
            baseline uses. Its anatomy pooling (``attention``, ``vision_projs``, ``query_tokens``,
            ``profile_embed``) is not part of the baseline and is frozen.
    """

    def __init__(self, fvlm: FVLM) -> None:
        super().__init__()
        self.fvlm = fvlm
        cfg = fvlm.config
        hidden = cfg.vision.hidden_size
        # attribute names = the tensor names of a baseline folder (checkpoint.BASELINE_HEAD)
        self.global_proj = nn.Linear(hidden, cfg.embed_dim)
        self.global_profile_embed: ProfileEmbedding | None = None
        if cfg.profile_bins:
            self.global_profile_embed = ProfileEmbedding(1, cfg.profile_bins + 1, cfg.profile_hidden, hidden)
        for unused in (fvlm.attention, fvlm.vision_projs, fvlm.profile_embed):
            if unused is not None:  # no gradient ever reaches them (DDP needs every trained one used)
                unused.requires_grad_(False)
        fvlm.query_tokens.requires_grad_(False)

    # ------------------------------------------------------------------ what the trainer uses
    @property
    def config(self):
        return self.fvlm.config

    @property
    def temperature(self) -> torch.Tensor:
        return self.fvlm.temperature

    def clamp_temperature_(self) -> None:
        self.fvlm.clamp_temperature_()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.fvlm.set_grad_checkpointing(enabled)

    @property
    def text_frozen(self) -> bool:
        return self.fvlm.text_frozen

    @property
    def text_split(self) -> int | None:
        return self.fvlm.text_split

    def cache_text(self, texts: Sequence[str], cache: TextCache) -> None:
        self.fvlm.cache_text(texts, cache)

    # ------------------------------------------------------------------ embeddings
    def encode_volume(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, 1, Z, Y, X)`` in [0, 1] -> ``(B, D)`` L2-normalised whole-window embeddings."""
        pooled = self.fvlm.encode_tokens(image).final.mean(1)
        if self.global_profile_embed is not None:
            whole = torch.ones(image.shape[0], *image.shape[2:], dtype=torch.uint8, device=image.device)
            prof = intensity_profiles(image, whole, 1, self.config.profile_bins, self.fvlm.voxel_ml)
            pooled = pooled + self.global_profile_embed(prof.to(pooled.dtype))[:, 0]
        return F.normalize(self.global_proj(pooled), dim=-1)

    def encode_text(self, texts: Sequence[str], cache: TextCache | None = None) -> torch.Tensor:
        """``(N, D)`` L2-normalised report embeddings (:meth:`FVLM.encode_text`)."""
        return self.fvlm.encode_text(texts, cache)

    # ------------------------------------------------------------------ folders
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The baseline's own tensors, named as in a baseline folder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("fvlm.")}

    def save_pretrained(self, directory: str | os.PathLike, *, store_prompts: bool = True) -> Path:
        """Write a baseline folder (the fVLM folder plus the head's tensors in its weights file)."""
        return save_pretrained(
            self.fvlm, directory, extra_tensors=self.head_state_dict(), store_prompts=store_prompts
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", require_head: bool = True
    ) -> GlobalCLIP:
        """Load a baseline folder (also one written before the head left the fVLM model).

        With ``require_head=False`` an fVLM folder without the head loads too, with a freshly
        initialised head (to start a baseline from fVLM weights).

        Raises:
            CheckpointError: the folder is not a model folder, or (``require_head``) holds no head.
        """
        fvlm = FVLM.from_pretrained(directory, device="cpu")
        model = cls(fvlm)
        weights = Path(directory) / WEIGHTS_NAME
        head = {k: v for k, v in read_safetensors(weights).items() if k.startswith(BASELINE_HEAD)}
        if head or require_head:
            expected = model.head_state_dict()
            if set(head) != set(expected) or any(head[k].shape != v.shape for k, v in expected.items()):
                raise CheckpointError(
                    f"{weights}: not a CLIP-baseline folder of this model: it holds the head tensors "
                    f"[{', '.join(sorted(head)) or 'none'}], the baseline needs "
                    f"[{', '.join(f'{k} {tuple(v.shape)}' for k, v in expected.items())}]. "
                    "Give the baseline/ folder that `fvlm demo` or a global_clip training run wrote"
                )
            model.load_state_dict(head, strict=False)
        return model.to(device).eval()
