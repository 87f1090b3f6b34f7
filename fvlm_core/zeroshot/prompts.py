"""Prompt embeddings for zero-shot findings, computed once per model and cached.

A finding has one or more positive and negative wordings ("Pleural effusion." / "Not pleural
effusion."). Each wording is encoded with the model's text encoder (L2-normalised); the
wordings of one side are averaged and re-normalised. The probability of the finding on an
anatomy embedding ``v`` is ``p = softmax([v.t_neg, v.t_pos] / tau)[1]``
(= ``sigmoid((v.t_pos - v.t_neg) / tau)``).

Text encoding is the slow part of zero-shot inference on CPU (the reference padded every
prompt to 384 tokens and re-encoded them for every volume): :class:`PromptCache` keeps one
embedding per distinct text per model, so a second analysis, or another finding reusing a
wording, does no text-encoder work. A model folder's own findings come encoded with it
(:mod:`fvlm_core.model.prompt_store`): :meth:`PromptCache.preload` takes them, and the text
encoder is built only for a text the store lacks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fvlm_core.findings import Finding, FindingSet
from fvlm_core.model.prompt_store import encode_prompts


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
    """Text embeddings of prompts for one model, computed once per distinct text.

    Args:
        encode: ``list[str] -> (N, D)`` L2-normalised embeddings (the model's ``encode_text``).
        batch_size: texts per encoder call for uncached texts.
        fingerprint: optional ``() -> hashable`` that changes when the text weights change
            (e.g. after a training step); a change empties the cache.

    Attributes:
        encoder_calls: number of calls made to ``encode`` (tests and benchmarks read it).
        texts_encoded: number of texts sent to ``encode``.
        texts_preloaded: number of texts taken from a store (:meth:`preload`).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor],
        batch_size: int = 64,
        fingerprint: Callable[[], object] | None = None,
    ) -> None:
        self._encode = encode
        self._batch_size = int(batch_size)
        self._fingerprint = fingerprint
        self._seen = fingerprint() if fingerprint is not None else None
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.RLock()  # reentrant: encode may call rebase
        self.encoder_calls = 0
        self.texts_encoded = 0
        self.texts_preloaded = 0

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Forget all embeddings (call after the text encoder's weights change)."""
        with self._lock:
            self._cache.clear()

    def preload(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Take ``text -> (D,)`` embeddings computed with the current text weights (a model
        folder's stored prompt embeddings, checked against its text identity by the caller)."""
        with self._lock:
            if self._fingerprint is not None:
                self._seen = self._fingerprint()
            for text, vec in embeddings.items():
                self._cache[text] = vec.detach().float().cpu()
            self.texts_preloaded += len(embeddings)

    def rebase(self) -> None:
        """Accept the current weights fingerprint without forgetting anything: for a change that
        is not a change of the text weights (a deferred text encoder built from the checkpoint
        the cached embeddings were computed from)."""
        with self._lock:
            if self._fingerprint is not None:
                self._seen = self._fingerprint()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 CPU embeddings of ``texts`` (uncached ones encoded in batches)."""
        with self._lock:
            if self._fingerprint is not None:
                now = self._fingerprint()
                if now != self._seen:  # weights changed since the embeddings were computed
                    self._cache.clear()
                    self._seen = now
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            for i in range(0, len(todo), self._batch_size):
                chunk = todo[i : i + self._batch_size]
                out = self._encode(chunk)
                self.encoder_calls += 1
                self.texts_encoded += len(chunk)
                out = out.detach().float().cpu()
                for text, vec in zip(chunk, out):
                    self._cache[text] = vec.clone()
            if not texts:
                return torch.zeros(0, 0)
            return torch.stack([self._cache[t] for t in texts])

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


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def prompt_cache_for(model: torch.nn.Module) -> PromptCache:
    """The :class:`PromptCache` of ``model`` (created on first use, lives as long as the model).

    The model must have ``encode_text(texts) -> (N, D)``; it is run in eval mode without grad.
    """
    with _CACHES_LOCK:
        cache = _CACHES.get(model)
        if cache is None:
            ref = weakref.ref(model)  # the cache must not keep the model alive

            def encode(texts: list[str]) -> torch.Tensor:
                m = ref()
                deferred = not getattr(m, "text_loaded", True)
                out = encode_prompts(m, texts)
                if deferred:  # built now from the same checkpoint: what is cached stays valid
                    cache.rebase()
                return out

            def fingerprint() -> tuple[int, int]:
                # In-place updates (optimizer steps, load_state_dict) bump a tensor's _version.
                m = ref()
                params = [p for n, p in m.named_parameters() if n.startswith(("text_encoder.", "text_proj."))]
                params = params or list(m.parameters())
                return (sum(p._version for p in params), sum(p.data_ptr() % 1_000_003 for p in params))

            cache = PromptCache(encode, fingerprint=fingerprint)
            _CACHES[model] = cache
        return cache
