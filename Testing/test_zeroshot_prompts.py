"""Prompt embeddings: wordings averaged, probability rule, and the cache keyed by text identity."""

from __future__ import annotations

import torch

from fvlm_core.findings import Finding, FindingSet
from fvlm_core.model.prompt_store import model_text_identity
from fvlm_core.zeroshot.prompts import ModelPrompts, PromptCache, mean_direction, probability


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
    cache = ModelPrompts("text-side-a", enc, cache=PromptCache())
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
    cache = ModelPrompts("text-side-a", enc, cache=PromptCache())
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


def test_cache_is_shared_by_text_identity():
    """Two users of one text side (analyzers of one model, a folder loaded again) share its
    embeddings; another text side encodes its own; the tables of the last text sides are kept."""
    store = PromptCache(max_identities=2)
    enc_a, enc_b = _CountingEncoder(), _CountingEncoder()
    ModelPrompts("side-a", enc_a, cache=store).embed(["Emphysema."])
    again = ModelPrompts("side-a", enc_a, cache=store)
    again.embed(["Emphysema."])
    assert len(enc_a.calls) == 1 and again.encoder_calls == 0
    other = ModelPrompts("side-b", enc_b, cache=store)
    other.embed(["Emphysema."])
    assert other.encoder_calls == 1 and enc_b.calls == [["Emphysema."]]
    ModelPrompts("side-c", enc_b, cache=store).embed(["Emphysema."])  # side-a, used least recently, goes
    ModelPrompts("side-a", enc_a, cache=store).embed(["Emphysema."])
    assert len(enc_a.calls) == 2


def test_a_model_whose_text_weights_changed_has_another_identity():
    """In memory, the identity is hashed from the text-side tensors as they are: an in-place change
    (what an optimizer step does) makes another identity, so no embedding of the old weights is
    served; the same weights give the same identity."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_proj = torch.nn.Linear(8, 8)
            self.enc = _CountingEncoder()

        def encode_text(self, texts):
            return torch.nn.functional.normalize(self.text_proj(self.enc(texts)), dim=-1)

    store = PromptCache()
    m = M()
    first = ModelPrompts(lambda: model_text_identity(m), m.encode_text, cache=store)
    before = first.embed(["Emphysema."])
    assert (
        ModelPrompts(model_text_identity(m), m.encode_text, cache=store).embed(["Emphysema."]).equal(before)
    )
    assert len(m.enc.calls) == 1
    with torch.no_grad():
        m.text_proj.weight.mul_(-1.0)
    after = ModelPrompts(lambda: model_text_identity(m), m.encode_text, cache=store).embed(["Emphysema."])
    assert len(m.enc.calls) == 2 and not torch.allclose(before, after)
    twin = M()
    twin.load_state_dict(m.state_dict())
    assert model_text_identity(twin) == model_text_identity(m)
