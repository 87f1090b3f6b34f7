"""Import of the official fVLM checkpoint (LAVIS layout) into this project's format.

The official file is a torch pickle whose ``["model"]`` dict uses exactly this project's parameter
names (MONAI ViT names under ``visual_encoder.``, BERT names under ``text_encoder.``, then
``text_proj``, ``vision_projs.{0..3}``, ``attention``, ``query_tokens`` and ``temp``), so the
mapping is 1:1. It is read with ``weights_only=True``. Tensors the project does not need
(``text_encoder.embeddings.position_ids``, the tied MLM head ``text_encoder.cls.predictions.*``)
are reported as expected-unused; any other unused tensor is reported too. Missing or mis-shaped vision, text or head tensors are refused.

The reference text encoder is BLIP's BERT without token-type embeddings: the Hugging Face
``BertModel`` built from the user's CXR-BERT folder gets its token-type embedding zeroed, which
reproduces the reference exactly. Its tokenizer and config come from that folder.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fvlm_core.errors import CheckpointError, ConfigError
from fvlm_core.model.config import FVLMConfig, load_config
from fvlm_core.model.fvlm import FVLM

#: Official tensors that are not needed for inference (reported, never an error).
EXPECTED_UNUSED = (
    re.compile(r"^text_encoder\.embeddings\.position_ids$"),
    re.compile(r"^text_encoder\.cls\.predictions\."),
)
#: Project tensors the official checkpoint does not have (kept at their initial values).
PROJECT_ONLY = (
    re.compile(
        r"^visual_encoder\.blocks\.\d+\.norm_cross_attn\."
    ),  # MONAI >= 1.4, unused without cross-attention
    re.compile(r"^text_encoder\.embeddings\.token_type_embeddings\."),  # zeroed: BLIP's BERT has none
    re.compile(r"^global_proj\."),  # whole-volume head for the CLIP baseline
)
CTRATE_ANATOMIES = ["lung", "heart", "esophagus", "aorta"]


@dataclass
class ImportReport:
    """What an import did with every tensor."""

    used: list[str] = field(default_factory=list)
    expected_unused: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"imported {len(self.used)} tensors",
            f"not needed (expected): {len(self.expected_unused)}: {', '.join(self.expected_unused) or '-'}",
            f"UNUSED (not in this model): {len(self.unused)}: {', '.join(self.unused) or '-'}",
            f"kept at project initial values (not in the official layout): {len(self.initialised)}"
            + (f", e.g. {', '.join(self.initialised[:3])}" if self.initialised else ""),
        ]
        return "\n".join(lines)


def _component(key: str) -> str:
    if key.startswith("visual_encoder."):
        return "vision"
    if key.startswith("text_encoder."):
        return "text"
    return "head"


def read_model_tensors(path: str | os.PathLike, what: str, advice: str) -> dict[str, torch.Tensor]:
    """The ``["model"]`` tensors of a torch checkpoint file (the official fVLM checkpoint, MAE's ViT),
    loaded with ``weights_only=True``: never unpickled.

    Args:
        what: the file's role in messages (``"checkpoint"``, ``"init_from"``).
        advice: what to give instead, ending each message.

    Raises:
        CheckpointError: no such file, not a weights-only torch file, or no ``["model"]`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist: {advice}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says enough
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"{what} {path} is not a checkpoint fvlm can read safely ({_unpickling_reason(exc)}). It is "
            "not a torch file, or it holds Python objects besides tensors, and loading those could run "
            f"code from the file: fvlm never does. {advice[0].upper()}{advice[1:]}"
        ) from exc
    state = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} has no ['model'] dict of tensors: {advice}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``["model"]`` tensors of an official fVLM (LAVIS) checkpoint."""
    return read_model_tensors(
        path,
        "checkpoint",
        "give the official fVLM checkpoint (a .pth whose ['model'] holds only tensors), or ask whoever "
        "made this file for a plain-tensor or safetensors copy",
    )


def _unpickling_reason(exc: Exception) -> str:
    """The cause of a failed ``torch.load``, without PyTorch's advice to load it unsafely
    (``weights_only=False``, allow-listing globals), which a command-line user must not follow."""
    text = str(exc)
    found = re.search(
        r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n\s*\n|\s*Check the documentation|$)", text, re.S
    )
    if found:
        reason = " ".join(found.group(1).split())
        reason = re.sub(r"\s*was not an allowed global by default\.?", "", reason)
        return reason.rstrip(".")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def config_from_official(
    state: dict[str, torch.Tensor],
    text_encoder: str | os.PathLike,
    anatomies: list[str] | None = None,
    img_size: tuple[int, int, int] | None = None,
) -> FVLMConfig:
    """The ``fvlm-base`` config adapted to the dimensions found in ``state``."""
    d = load_config("fvlm-base").to_dict()

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(
                f"official checkpoint lacks {key!r} ({_component(key)} weights); it is incomplete or not fVLM"
            )
        return state[key]

    queries = need("query_tokens")
    patch_w = need("visual_encoder.patch_embedding.patch_embeddings.weight")
    pos = need("visual_encoder.patch_embedding.position_embeddings")
    text_proj = need("text_proj.weight")
    n_anat, hidden = queries.shape
    if anatomies is None:
        if n_anat != len(CTRATE_ANATOMIES):
            raise CheckpointError(
                f"the checkpoint has {n_anat} anatomies: name them in label order (--anatomies a,b,c,...)"
            )
        anatomies = list(CTRATE_ANATOMIES)
    if len(anatomies) != n_anat:
        raise CheckpointError(
            f"{len(anatomies)} anatomy names given but the checkpoint has {n_anat} anatomies"
        )
    patch = tuple(int(s) for s in patch_w.shape[2:])
    n_tokens = int(pos.shape[1])
    img = tuple(img_size) if img_size else tuple(d["vision"]["img_size"])
    if math.prod(s // p for s, p in zip(img, patch)) != n_tokens:
        raise CheckpointError(
            f"position embeddings hold {n_tokens} tokens, but image size {img} with patch {patch} gives "
            f"{math.prod(s // p for s, p in zip(img, patch))}; give the training image size (--img-size Z Y X)"
        )
    layers = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))}
    )
    d["vision"].update(
        img_size=list(img),
        patch_size=list(patch),
        hidden_size=int(hidden),
        num_layers=len(layers) or d["vision"]["num_layers"],
        mlp_dim=int(need("visual_encoder.blocks.0.mlp.linear1.weight").shape[0]),
    )
    d["embed_dim"] = int(text_proj.shape[0])
    d["anatomies"] = list(anatomies)
    d["findings"] = None
    d["text"].update(
        name_or_path=str(text_encoder), pooling="cls", max_length=384, zero_token_type=True, freeze=False
    )
    try:
        return FVLMConfig.from_dict(d)
    except ConfigError as exc:
        raise CheckpointError(f"the checkpoint's dimensions do not make a valid model: {exc}") from exc


def import_official_state(
    state: dict[str, torch.Tensor],
    text_encoder: str | os.PathLike,
    anatomies: list[str] | None = None,
    img_size: tuple[int, int, int] | None = None,
):
    """Build an :class:`~fvlm_core.model.FVLM` holding the official tensors.

    Args:
        state: the official ``["model"]`` dict.
        text_encoder: CXR-BERT hub name or local folder (tokenizer and config; weights come from ``state``).
        anatomies: anatomy names in label order (default: the 4 CT-RATE anatomies).
        img_size: training image size if not the reference 112 x 256 x 352.

    Returns:
        ``(model, report)``: the model in eval mode and an :class:`ImportReport`.
    """
    config = config_from_official(state, text_encoder, anatomies, img_size)
    with torch.device("meta"):  # names and shapes without allocating the model
        skeleton = FVLM(config, load_text_weights=False)
    vocab = state.get("text_encoder.embeddings.word_embeddings.weight")
    if vocab is not None and vocab.shape[0] != skeleton.text_encoder.config.vocab_size:
        if len(skeleton.tokenizer) > vocab.shape[0]:
            raise CheckpointError(
                f"the tokenizer of {text_encoder} has {len(skeleton.tokenizer)} tokens but the checkpoint's "
                f"vocabulary has {vocab.shape[0]} rows: use the text encoder the checkpoint was trained with"
            )
        skeleton.text_encoder.resize_token_embeddings(int(vocab.shape[0]))
    target = skeleton.state_dict()

    report = ImportReport()
    wrong: list[str] = []
    for key, value in state.items():
        if any(p.search(key) for p in EXPECTED_UNUSED):
            report.expected_unused.append(key)
        elif key not in target:
            report.unused.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            wrong.append(f"{key} {tuple(value.shape)} (model expects {tuple(target[key].shape)})")
        else:
            report.used.append(key)
    missing = [k for k in target if k not in state and not any(p.search(k) for p in PROJECT_ONLY)]
    report.initialised = [k for k in target if k not in state and any(p.search(k) for p in PROJECT_ONLY)]
    if wrong or missing:
        parts = []
        for comp in ("vision", "text", "head"):
            m = [k for k in missing if _component(k) == comp]
            w = [s for s in wrong if _component(s) == comp]
            if m:
                parts.append(f"{comp} weights missing: {', '.join(m[:5])}{' ...' if len(m) > 5 else ''}")
            if w:
                parts.append(f"{comp} weights mis-shaped: {'; '.join(w[:5])}{' ...' if len(w) > 5 else ''}")
        raise CheckpointError(
            "the official checkpoint does not fit the fVLM model: "
            + " | ".join(parts)
            + f". Check the file and the text encoder ({text_encoder}): it must be the one the checkpoint used"
        )

    model = FVLM(config, load_text_weights=False)
    if vocab is not None and vocab.shape[0] != model.text_encoder.config.vocab_size:
        model.text_encoder.resize_token_embeddings(int(vocab.shape[0]))
    full = model.state_dict()
    full.update({k: state[k] for k in report.used})
    tt = "text_encoder.embeddings.token_type_embeddings.weight"
    if tt in full and tt not in state:
        full[tt] = torch.zeros_like(full[tt])
    model.load_state_dict(full, strict=True)
    return model.eval(), report


def import_official(
    path: str | os.PathLike,
    text_encoder: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    anatomies: list[str] | None = None,
    img_size: tuple[int, int, int] | None = None,
):
    """Read an official checkpoint file, convert it, and optionally save it to ``out_dir``.

    Returns:
        ``(model, report)`` (see :func:`import_official_state`).
    """
    model, report = import_official_state(read_official_state(path), text_encoder, anatomies, img_size)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model, report
