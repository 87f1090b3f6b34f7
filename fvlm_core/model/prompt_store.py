"""Stored prompt embeddings: a model folder's own findings, encoded once when the folder is saved.

Encoding the prompts is most of what loading a model costs when only its own findings are scored
(the text encoder is a BERT-base beside a ViT-B). ``save_pretrained`` therefore writes
``prompt_embeddings.safetensors`` next to the weights: one ``(N, D)`` float32 tensor of the
L2-normalised embeddings (what :meth:`FVLM.encode_text` returns in eval mode) of every wording of
the config's findings, the texts in the metadata, and the **text identity** they were computed
with. The analyzer uses a stored row only when the identity equals the folder's own, so a changed
text encoder, tokenizer, text setting or projection is never served stale embeddings; texts not in
the store (a user's prompts, edited findings) are encoded by the text encoder, loaded then.

The identity is a SHA-256 over the text-side weights' digest (``text_encoder.*``, ``text_proj.*``,
``text_adapter.*``: names, dtypes, shapes, bytes; recorded in ``model.safetensors``'s metadata
when it is written, since hashing the ~440 MB of a BERT-base on every load would cost a third of a
ViT forward), the files of ``text/`` (tokenizer and encoder config) and the config's text settings
and embedding size. A store that cannot be read is ignored with a warning (it is a cache of what
the weights compute: the analysis stays correct, only slower).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fvlm_core.errors import warn
from fvlm_core.findings import Finding
from fvlm_core.model.weights import WEIGHTS_NAME, read_metadata

STORE_NAME = "prompt_embeddings.safetensors"
#: model.safetensors metadata key: SHA-256 of the text-side tensors (:func:`text_weights_digest`).
TEXT_DIGEST_KEY = "fvlm_text_sha256"
#: the parameters an embedding of a text depends on
TEXT_PREFIXES = ("text_encoder.", "text_proj.", "text_adapter.")
_FORMAT = "fvlm-prompt-embeddings/1"


def text_weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the text-side tensors of a state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith(TEXT_PREFIXES)):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def text_identity(weights_digest: str, text_dir: str | os.PathLike | None, config) -> str:
    """The identity of a model's text side: what its prompt embeddings are a function of.

    Args:
        weights_digest: :func:`text_weights_digest` of the model's weights.
        text_dir: the folder's ``text/`` (every file's name and bytes), or None.
        config: the :class:`~fvlm_core.model.config.FVLMConfig` (text settings, ``embed_dim``).
    """
    text = {k: v for k, v in config.to_dict()["text"].items() if k != "name_or_path"}
    h = hashlib.sha256(
        json.dumps(
            {"weights": weights_digest, "text": text, "embed_dim": config.embed_dim}, sort_keys=True
        ).encode()
    )
    if text_dir is not None and Path(text_dir).is_dir():
        for f in sorted(p for p in Path(text_dir).iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def prompt_texts(config) -> list[str]:
    """Every wording of the config's findings, once each, in order (not checked against the
    anatomies: a save must not fail on what only the analyzer refuses)."""
    texts: dict[str, None] = {}
    for f in (Finding.from_dict(d) for d in config.findings or []):
        for t in (*f.positive, *f.negative):
            texts.setdefault(t, None)
    return list(texts)


@torch.no_grad()
def encode_prompts(model: torch.nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """``(N, D)`` float32 CPU embeddings of ``texts`` by ``model.encode_text`` in eval mode
    without grad (the mode the analyzer scores in); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model.encode_text(list(texts)).detach().float().cpu()
    finally:
        model.train(was_training)


def write_store(
    path: str | os.PathLike, texts: Sequence[str], embeddings: torch.Tensor, identity: str
) -> None:
    """Write ``embeddings (N, D)`` of ``texts`` with their text ``identity`` as safetensors."""
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
    metadata = {"format": _FORMAT, "texts": json.dumps(list(texts)), "text_identity": identity}
    save_file({"embeddings": embeddings.float().contiguous()}, str(path), metadata=metadata)


def read_store(path: str | os.PathLike, identity: str | None) -> dict[str, torch.Tensor]:
    """``text -> (D,)`` embeddings stored at ``path`` for the text side ``identity``.

    Empty when there is no store or no identity to check it against; empty, with a warning that
    says why, when the store is unreadable or was computed for another text side (its prompts
    are then encoded by the text encoder: slower, same result).
    """
    path = Path(path)
    if identity is None or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
            if meta.get("text_identity") != identity:
                warn(
                    f"{path}: the stored prompt embeddings were computed with another text encoder, "
                    "tokenizer or text settings than this model's; they are not used and the prompts "
                    "are encoded now (slower). Save the model again to store its own."
                )
                return {}
            texts = json.loads(meta["texts"])
            emb = f.get_tensor("embeddings")
        if emb.ndim != 2 or emb.shape[0] != len(texts) or not torch.isfinite(emb).all():
            raise ValueError(
                f"{emb.shape[0] if emb.ndim else 0} rows for {len(texts)} texts or non-finite values"
            )
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        warn(
            f"{path}: unreadable stored prompt embeddings ({exc}); they are not used and the prompts "
            "are encoded now (slower, same result). Save the model again to rewrite the file."
        )
        return {}
    return {t: row.clone() for t, row in zip(texts, emb.float())}


def folder_text_identity(model_dir: str | os.PathLike, config) -> str | None:
    """The text identity of a model folder (None when its weights record no text digest: a folder
    saved before stored prompt embeddings existed, or one without weights)."""
    weights = Path(model_dir) / WEIGHTS_NAME
    digest = read_metadata(weights).get(TEXT_DIGEST_KEY) if weights.is_file() else None
    return text_identity(digest, Path(model_dir) / "text", config) if digest else None


def model_text_identity(model: torch.nn.Module) -> str:
    """The text identity of a model in memory, from its text-side tensors as they are now (all its
    tensors when none has a text-side name) and its config's text settings; no ``text/`` folder.
    Hashes the tensors (about 0.3 s for a BERT-base): a model folder's identity comes from its
    weights' metadata instead (:func:`folder_text_identity`)."""
    tensors = model.state_dict()
    if not any(k.startswith(TEXT_PREFIXES) for k in tensors):
        tensors = {TEXT_PREFIXES[0] + k: v for k, v in tensors.items()}
    config = getattr(model, "config", None)
    text = {k: v for k, v in config.to_dict()["text"].items() if k != "name_or_path"} if config else {}
    payload = {"weights": text_weights_digest(tensors), "text": text}
    if config is not None:
        payload["embed_dim"] = config.embed_dim
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
