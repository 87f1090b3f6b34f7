"""The fVLM model: vision/text encoders, anatomy pooling, configs and checkpoints.

>>> from fvlm_core.model import FVLM, load_config
>>> model = FVLM.from_config("fvlm-tiny")
>>> out = model.encode_image(image, labels)          # image (B,1,Z,Y,X) in [0,1], labels (B,Z,Y,X)
>>> out.embeddings.shape, out.present.shape          # (B, A, D), (B, A)
>>> text = model.encode_text(["Pleural effusion.", "Not pleural effusion."])  # (2, D)
"""

from fvlm_core.model.checkpoint import from_pretrained, save_pretrained
from fvlm_core.model.config import FVLMConfig, TextConfig, VisionConfig, available_configs, load_config
from fvlm_core.model.fvlm import FVLM
from fvlm_core.model.official import ImportReport, import_official
from fvlm_core.model.pooling import AnatomyEmbeddings, attend_anatomies, token_membership
from fvlm_core.model.vision import TokenGrid, interpolate_pos_embed

__all__ = [
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
