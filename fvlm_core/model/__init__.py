"""The fVLM model: vision/text encoders, anatomy pooling, configs and checkpoints.

>>> from fvlm_core.model import FVLM, load_config
>>> model = FVLM.from_config("fvlm-tiny")
>>> out = model.encode_image(image, labels)          # image (B,1,Z,Y,X) in [0,1], labels (B,Z,Y,X)
>>> out.embeddings.shape, out.present.shape          # (B, A, D), (B, A)
>>> text = model.encode_text(["Pleural effusion.", "Not pleural effusion."])  # (2, D)

Names are imported on first use (:mod:`fvlm_core.lazy` says why): importing a submodule such as
``fvlm_core.model.config`` does not import torch, and nothing here imports ``transformers``
until a text encoder is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fvlm_core.lazy import lazy_exports

_EXPORTS = {  # submodule -> the public names it defines
    "fvlm": ("FVLM", "from_pretrained"),
    "pooling": ("AnatomyEmbeddings", "attend_anatomies", "token_membership"),
    "config": ("FVLMConfig", "TextConfig", "VisionConfig", "available_configs", "load_config"),
    "official": ("ImportReport", "import_official"),
    "vision": ("TokenGrid", "interpolate_pos_embed"),
    "checkpoint": ("save_pretrained",),
}

__all__ = [  # the names of _EXPORTS, spelled out for static tools
    "FVLM",
    "AnatomyEmbeddings",
    "FVLMConfig",
    "ImportReport",
    "TextConfig",
    "TokenGrid",
    "VisionConfig",
    "attend_anatomies",
    "available_configs",
    "from_pretrained",
    "import_official",
    "interpolate_pos_embed",
    "load_config",
    "save_pretrained",
    "token_membership",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from fvlm_core.model.checkpoint import save_pretrained
    from fvlm_core.model.config import FVLMConfig, TextConfig, VisionConfig, available_configs, load_config
    from fvlm_core.model.fvlm import FVLM, from_pretrained
    from fvlm_core.model.official import ImportReport, import_official
    from fvlm_core.model.pooling import AnatomyEmbeddings, attend_anatomies, token_membership
    from fvlm_core.model.vision import TokenGrid, interpolate_pos_embed


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
