"""Prompt embeddings: wordings averaged, probability rule, and the per-model cache."""

from __future__ import annotations

import torch

from fvlm_core.findings import Finding, FindingSet
from fvlm_core.zeroshot.prompts import PromptCache, mean_direction, probability, prompt_cache_for


class _CountingEncoder:
    """Deterministic text -> unit vector (hash-seeded), counting calls and texts."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(t)))
            rows.append(torch.randn(self.dim, generator=g))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_second_call_does_no_text_encoder_work():
    enc = _CountingEncoder()
    cache = PromptCache(enc)
    fs = FindingSet()  # the 16 CT-RATE findings, 32 distinct wordings
    first = cache.findings(fs)
    assert cache.encoder_calls == 1 and cache.texts_encoded == 32
    second = cache.findings(fs)
    assert cache.encoder_calls == 1 and len(enc.calls) == 1  # nothing new encoded
    assert torch.equal(first.positive, second.positive) and torch.equal(first.negative, second.negative)
    # a new finding reusing one wording encodes only its new text
    extra = Finding.from_name("Effusion", "lung", positive=["Pleural effusion.", "Fluid in the pleura."])
    cache.findings([extra])
    assert enc.calls[-1] == ["Fluid in the pleura.", "Not Effusion."]


def test_wordings_are_averaged_and_renormalised():
    enc = _CountingEncoder()
    cache = PromptCache(enc)
    f = Finding.from_name("Nodule", "lung", positive=["Nodule.", "A lung nodule."], negative="No nodule.")
    emb = cache.findings([f])
    a, b = enc(["Nodule.", "A lung nodule."])
    expected = torch.nn.functional.normalize(a + b, dim=0)
    assert torch.allclose(emb.positive[0], expected, atol=1e-6)
    assert torch.allclose(emb.negative[0], enc(["No nodule."])[0], atol=1e-6)
    assert torch.allclose(mean_direction(torch.stack([a, a])), a, atol=1e-6)


def test_probability_is_softmax_of_negative_and_positive():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([1.0, 0.0])
    neg = torch.tensor([0.0, 1.0])
    p = probability(v, pos, neg, 0.5)
    # row 0: logits [0, 2] -> softmax[1] = e^2 / (1 + e^2); row 1 symmetric
    e2 = torch.exp(torch.tensor(2.0))
    assert torch.allclose(p, torch.stack([e2 / (1 + e2), 1 / (1 + e2)]), atol=1e-6)


def test_cache_is_per_model():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _CountingEncoder()

        def encode_text(self, texts):
            return self.enc(texts)

    m1, m2 = M(), M()
    c1 = prompt_cache_for(m1)
    assert prompt_cache_for(m1) is c1 and prompt_cache_for(m2) is not c1
    c1.embed(["Emphysema."])
    prompt_cache_for(m1).embed(["Emphysema."])
    assert len(m1.enc.calls) == 1 and m2.enc.calls == []
    assert m1.training  # restored after encoding in eval mode


def test_cache_emptied_when_text_weights_change():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_proj = torch.nn.Linear(8, 8)
            self.enc = _CountingEncoder()

        def encode_text(self, texts):
            return torch.nn.functional.normalize(self.text_proj(self.enc(texts)), dim=-1)

    m = M()
    cache = prompt_cache_for(m)
    before = cache.embed(["Emphysema."])
    cache.embed(["Emphysema."])
    assert len(m.enc.calls) == 1
    with torch.no_grad():
        m.text_proj.weight.mul_(-1.0)  # what an optimizer step does: in-place
    after = cache.embed(["Emphysema."])
    assert len(m.enc.calls) == 2 and not torch.allclose(before, after)
