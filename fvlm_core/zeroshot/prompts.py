"""Prompt embeddings for zero-shot findings, computed once per model and cached.

A finding has one or more positive and negative wordings ("Pleural effusion." / "Not pleural
effusion."). Each wording is encoded with the model's text encoder (L2-normalised); the
wordings of one side are averaged and re-normalised. The probability of the finding on an
anatomy embedding ``v`` is ``p = softmax([v.t_neg, v.t_pos] / tau)[1]``
(= ``sigmoid((v.t_pos - v.t_neg) / tau)``).

Text encoding is the slow part of zero-shot inference on CPU (the reference padded every
prompt to 384 tokens and re-encoded them for every volume): :class:`PromptCache` keeps one
embedding per distinct text per *text identity* (the text side's weights, tokenizer and settings,
:mod:`fvlm_core.model.prompt_store`), outside the model, so a second analysis, another finding
reusing a wording, or the same model loaded again does no text-encoder work. A model folder's own
findings come encoded with it (the folder's prompt store): :meth:`ModelPrompts.preload` takes
them, and the analyzer builds the text encoder only for a text the store lacks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fvlm_core.findings import Finding, FindingSet
from fvlm_core.model.text import TextFeatureCache


@dataclass
class FindingEmbeddings:
    """Prompt embeddings of an ordered list of findings.

    Attributes:
        findings: the findings, in order.
        positive: ``(F, D)`` float32, L2-normalised mean of the positive wordings.
        negative: ``(F, D)`` float32, L2-normalised mean of the negative wordings.
    """

    findings: list[Finding]
    positive: torch.Tensor
    negative: torch.Tensor

    def index(self, name: str, anatomy: str) -> int:
        for i, f in enumerate(self.findings):
            if f.name == name and f.anatomy == anatomy:
                return i
        raise KeyError(f"{name!r} on {anatomy!r}")


def mean_direction(vectors: torch.Tensor) -> torch.Tensor:
    """Average of L2-normalised rows, re-normalised: ``(N, D) -> (D,)``."""
    v = torch.nn.functional.normalize(vectors.float(), dim=-1).mean(dim=0)
    return torch.nn.functional.normalize(v, dim=-1)


def probability(
    image: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature
) -> torch.Tensor:
    """``softmax([v.t_neg, v.t_pos] / tau)[1]`` elementwise over matching rows.

    Args:
        image: ``(..., D)`` anatomy (or token) embeddings.
        positive, negative: ``(..., D)`` prompt embeddings broadcastable to ``image``.
        temperature: scalar ``tau`` (float or 0-d tensor).

    Returns:
        ``(...)`` probabilities in (0, 1).
    """
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=image.device)
    logits = torch.stack([(image * negative).sum(-1), (image * positive).sum(-1)], dim=-1).float() / tau
    return torch.softmax(logits, dim=-1)[..., 1]


class PromptCache:
    """Text embeddings of prompts, one table per text identity: what the text side of that identity
    (:func:`~fvlm_core.model.prompt_store.text_identity`: its weights, tokenizer and settings)
    encodes each text to. Analyzers of one model, and of one model folder loaded again (the Slicer
    worker reloads a folder whose config changed), share a table. Tables of the
    ``max_identities`` text sides used last are kept, ``max_texts`` texts each (least recently
    used dropped first)."""

    def __init__(self, max_identities: int = 8, max_texts: int = 8192) -> None:
        self.max_identities = int(max_identities)
        self.max_texts = int(max_texts)
        self._tables: OrderedDict[str, TextFeatureCache] = OrderedDict()
        self.lock = threading.RLock()  # held while a table is read or filled

    def table(self, identity: str) -> TextFeatureCache:
        """The embeddings of text side ``identity`` (created empty)."""
        with self.lock:
            found = self._tables.get(identity)
            if found is None:
                found = self._tables[identity] = TextFeatureCache(self.max_texts)
            self._tables.move_to_end(identity)
            while len(self._tables) > self.max_identities:
                self._tables.popitem(last=False)
            return found

    def clear(self) -> None:
        with self.lock:
            self._tables.clear()


#: the prompt embeddings of this process, by text identity
PROMPT_CACHE = PromptCache()


class ModelPrompts:
    """The prompt embeddings of one model: its table of a :class:`PromptCache`, filled by its encoder.

    Args:
        identity: the model's text identity, or a function that computes it (called once, when a
            prompt is first looked up).
        encode: ``list[str] -> (N, D)`` L2-normalised embeddings (the model's ``encode_text``),
            for the texts the table lacks.
        cache: where the embeddings are kept (default: the process's :data:`PROMPT_CACHE`).
        batch_size: texts per encoder call.

    Attributes:
        encoder_calls: number of calls made to ``encode`` (tests and benchmarks read it).
        texts_encoded: number of texts sent to ``encode``.
        texts_preloaded: number of texts taken from a store (:meth:`preload`).
    """

    def __init__(
        self,
        identity: str | Callable[[], str],
        encode: Callable[[list[str]], torch.Tensor],
        cache: PromptCache = PROMPT_CACHE,
        batch_size: int = 64,
    ) -> None:
        self._identity = identity
        self._encode = encode
        self.cache = cache
        self._batch_size = int(batch_size)
        self.encoder_calls = 0
        self.texts_encoded = 0
        self.texts_preloaded = 0

    @property
    def identity(self) -> str:
        if callable(self._identity):
            self._identity = str(self._identity())
        return self._identity

    def preload(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Take ``text -> (D,)`` embeddings of this model's text side (a model folder's stored
        prompt embeddings, read for its text identity)."""
        with self.cache.lock:
            table = self.cache.table(self.identity)
            texts = list(embeddings)
            table.put(texts, [embeddings[t].detach().float().cpu() for t in texts])
            self.texts_preloaded += len(texts)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 CPU embeddings of ``texts`` (those not kept yet encoded in batches)."""
        with self.cache.lock:
            table = self.cache.table(self.identity)
            todo = table.missing(texts)
            for i in range(0, len(todo), self._batch_size):
                chunk = todo[i : i + self._batch_size]
                out = self._encode(chunk).detach().float().cpu()
                self.encoder_calls += 1
                self.texts_encoded += len(chunk)
                table.put(chunk, [vec.clone() for vec in out])
            if not texts:
                return torch.zeros(0, 0)
            return table.get(list(texts))

    def findings(self, findings: FindingSet | Sequence[Finding]) -> FindingEmbeddings:
        """Per-finding positive / negative embeddings (wordings averaged, re-normalised)."""
        items = list(findings)
        texts = [t for f in items for t in (*f.positive, *f.negative)]
        emb = self.embed(texts)
        pos, neg, k = [], [], 0
        for f in items:
            n_pos, n_neg = len(f.positive), len(f.negative)
            pos.append(mean_direction(emb[k : k + n_pos]))
            neg.append(mean_direction(emb[k + n_pos : k + n_pos + n_neg]))
            k += n_pos + n_neg
        d = emb.shape[-1] if emb.numel() else 0
        return FindingEmbeddings(
            findings=items,
            positive=torch.stack(pos) if pos else torch.zeros(0, d),
            negative=torch.stack(neg) if neg else torch.zeros(0, d),
        )
