"""Anatomy pooling: token membership, masking of absent anatomies, equivalence with the
reference's per-sample, per-anatomy loop, and invariance to anatomy and batch order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fvlm_core.errors import InputError
from fvlm_core.model import FVLM
from fvlm_core.model.pooling import attend_anatomies, token_membership

torch.set_num_threads(1)

PATCH = (4, 8, 8)
SHAPE = (8, 16, 24)  # grid (2, 2, 3) = 12 tokens


@pytest.fixture(scope="module")
def model(small_model_config) -> FVLM:
    # the reference pooling; the profile extension is tested in test_model_profile.py
    cfg = small_model_config(profile_bins=0)
    torch.manual_seed(0)
    m = FVLM.from_config(cfg).eval()
    with torch.no_grad():  # the reference zero-initialises queries; random ones make the test sharper
        m.query_tokens.normal_()
    return m


def load_config_from_dict(d):
    from fvlm_core.model import FVLMConfig

    return FVLMConfig.from_dict(d)


def test_token_is_member_iff_its_patch_touches_the_mask():
    gen = torch.Generator().manual_seed(1)
    grid = tuple(s // p for s, p in zip(SHAPE, PATCH))
    # single voxels at random positions and at patch borders (first / last voxel of a patch)
    points = [tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in SHAPE) for _ in range(20)]
    points += [(3, 7, 8), (4, 8, 7), (0, 0, 0), (7, 15, 23)]
    for z, y, x in points:
        for anatomy in range(3):
            labels = torch.zeros(1, *SHAPE, dtype=torch.uint8)
            labels[0, z, y, x] = anatomy + 1
            member = token_membership(labels, 3, PATCH)
            assert member.shape == (1, 3, grid[0] * grid[1] * grid[2])
            expected = torch.zeros_like(member)
            tok = ((z // PATCH[0]) * grid[1] + y // PATCH[1]) * grid[2] + x // PATCH[2]
            expected[0, anatomy, tok] = True
            assert torch.equal(member, expected), (z, y, x, anatomy)


def test_membership_ignores_unknown_label_values_and_accepts_channel_dim():
    labels = torch.full((2, 1, *SHAPE), 9, dtype=torch.int64)  # 9 > A: not an anatomy
    labels[1, 0, 5, 5, 5] = 2
    member = token_membership(labels, 3, PATCH)
    assert member.sum() == 1 and member[1, 1].sum() == 1


def _reference_pool(model: FVLM, levels, labels):
    """The reference loop: per sample and anatomy, select the anatomy's tokens of every level and
    run nn.MultiheadAttention with the anatomy query, then the anatomy projection."""
    b = labels.shape[0]
    a = len(model.anatomies)
    out = torch.zeros(b, a, model.config.embed_dim)
    present = torch.zeros(b, a, dtype=torch.bool)
    for i in range(b):
        for j in range(a):
            mask = (labels[i] == j + 1).float()[None, None]
            tokens = F.max_pool3d(mask, kernel_size=PATCH4, stride=PATCH4).flatten() > 0
            if not tokens.any():
                continue
            kv = torch.cat([lv[i][tokens] for lv in levels]).unsqueeze(0)
            q = model.query_tokens[j][None, None]
            upd, _ = model.attention(q, kv, kv)
            out[i, j] = F.normalize(model.vision_projs[j](upd[0, 0]), dim=-1)
            present[i, j] = True
    return out, present


PATCH4 = (4, 4, 4)


def _labels(b: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.zeros(b, 16, 16, 16, dtype=torch.uint8)
    for i in range(b):
        for j in range(4):
            if (i + j) % 3 == 2:
                continue  # some anatomies absent
            z0, y0, x0 = (int(v) for v in torch.randint(0, 12, (3,), generator=gen))
            labels[i, z0 : z0 + 5, y0 : y0 + 3, x0 : x0 + 4] = j + 1
    return labels


def test_one_pass_pooling_equals_reference_loop(model):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(3, 1, 16, 16, 16, generator=gen)
    labels = _labels(3, gen)
    with torch.no_grad():
        tokens = model.encode_tokens(image)
        out = model.pool(tokens, labels)
        ref, ref_present = _reference_pool(model, tokens.levels, labels)
    assert torch.equal(out.present, ref_present)
    assert not ref_present.all() and ref_present.any()
    torch.testing.assert_close(out.embeddings, ref, atol=2e-6, rtol=1e-5)


def test_absent_anatomy_is_masked_out_zero_and_finite(model):
    image = torch.rand(2, 1, 16, 16, 16)
    labels = torch.zeros(2, 16, 16, 16, dtype=torch.uint8)
    labels[0, 2:6, 2:6, 2:6] = 1  # sample 0: lung only; sample 1: nothing at all
    m = copy.deepcopy(model).train()
    out = m.encode_image(image, labels)
    assert out.present.tolist() == [[True, False, False, False], [False] * 4]
    assert torch.isfinite(out.embeddings).all()
    assert torch.equal(out.embeddings[~out.present], torch.zeros_like(out.embeddings[~out.present]))
    torch.testing.assert_close(out.embeddings[0, 0].norm(), torch.tensor(1.0))
    out.embeddings.sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # query of an absent anatomy gets no gradient from it
    assert torch.equal(m.query_tokens.grad[1:], torch.zeros_like(m.query_tokens.grad[1:]))


def test_present_argument_masks_an_anatomy_out(model):
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 1, 16, 16, 16, generator=gen)
    labels = torch.zeros(2, 16, 16, 16, dtype=torch.uint8)
    labels[:, :8] = 1
    labels[:, 8:] = 2
    keep = torch.tensor([[True, False, True, True], [True, True, True, True]])
    with torch.no_grad():
        full = model.encode_image(image, labels)
        masked = model.encode_image(image, labels, present=keep)
    assert masked.present.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert torch.equal(masked.embeddings[0, 1], torch.zeros(16))
    torch.testing.assert_close(masked.embeddings[masked.present], full.embeddings[masked.present])


def test_tokens_outside_an_anatomy_do_not_change_its_embedding(model):
    gen = torch.Generator().manual_seed(4)
    tokens = model.encode_tokens(torch.rand(1, 1, 16, 16, 16, generator=gen))
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    labels[0, :4, :4, :4] = 1  # token 0 only
    with torch.no_grad():
        before = model.pool(tokens, labels).embeddings[0, 0]
        for lv in tokens.levels:
            lv[0, 1:] += torch.randn_like(lv[0, 1:]) * 5
        after = model.pool(tokens, labels).embeddings[0, 0]
        for lv in tokens.levels:
            lv[0, 0] += 1.0
        changed = model.pool(tokens, labels).embeddings[0, 0]
    torch.testing.assert_close(before, after)
    assert not torch.allclose(before, changed)


def test_invariant_to_batch_order(model):
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(4, 1, 16, 16, 16, generator=gen)
    labels = _labels(4, gen)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model.encode_image(image, labels)
        b = model.encode_image(image[perm], labels[perm])
    assert torch.equal(a.present[perm], b.present)
    torch.testing.assert_close(a.embeddings[perm], b.embeddings, atol=1e-6, rtol=1e-5)


def test_invariant_to_anatomy_order(model):
    """Reordering the anatomies (queries, projections and label values together) reorders the output."""
    gen = torch.Generator().manual_seed(6)
    image = torch.rand(3, 1, 16, 16, 16, generator=gen)
    labels = _labels(3, gen)
    perm = [2, 0, 3, 1]  # new anatomy k = old anatomy perm[k]
    cfg = model.config.to_dict()
    cfg["anatomies"] = [model.anatomies[p] for p in perm]
    cfg["findings"] = None
    other = FVLM(load_config_from_dict(cfg), load_text_weights=False).eval()
    state = model.state_dict()
    state["query_tokens"] = model.query_tokens.detach()[perm]
    for k, p in enumerate(perm):
        state[f"vision_projs.{k}.weight"] = model.vision_projs[p].weight.detach()
        state[f"vision_projs.{k}.bias"] = model.vision_projs[p].bias.detach()
    other.load_state_dict(state)
    lut = torch.zeros(5, dtype=torch.uint8)
    for k, p in enumerate(perm):
        lut[p + 1] = k + 1
    with torch.no_grad():
        a = model.encode_image(image, labels)
        b = other.encode_image(image, lut[labels.long()])
    assert b.anatomies == cfg["anatomies"]
    assert torch.equal(a.present[:, perm], b.present)
    torch.testing.assert_close(a.embeddings[:, perm], b.embeddings, atol=1e-6, rtol=1e-5)


def test_return_tokens_gives_maps_on_the_token_grid(model):
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 1, 16, 16, 16, generator=gen)
    labels = _labels(2, gen)
    with torch.no_grad():
        out = model.encode_image(image, labels, return_tokens=True)
    n_tok = 4 * 4 * 4
    assert out.grid == (4, 4, 4) and out.patch_size == (4, 4, 4)
    assert out.tokens.shape == (2, 4, n_tok, 16) and out.attention.shape == (2, 4, n_tok)
    torch.testing.assert_close(out.tokens.norm(dim=-1), torch.ones(2, 4, n_tok))
    # attention: a distribution over the anatomy's own tokens, zero elsewhere and for absent ones
    sums = out.attention.sum(-1)
    torch.testing.assert_close(sums[out.present], torch.ones(int(out.present.sum())))
    assert torch.equal(sums[~out.present], torch.zeros(int((~out.present).sum())))
    assert (out.attention[~out.membership] == 0).all()


def test_precomputed_membership_equals_labels(model):
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(2, 1, 16, 16, 16, generator=gen)
    labels = _labels(2, gen)
    member = token_membership(labels, 4, (4, 4, 4))
    with torch.no_grad():
        a = model.encode_image(image, labels)
        b = model.encode_image(image, None, membership=member)
    assert torch.equal(a.embeddings, b.embeddings)


def test_shape_errors_are_input_errors(model):
    image = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(InputError, match="labels shape"):
        model.encode_image(image, torch.zeros(1, 16, 16, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="multiple of the patch"):
        model.encode_image(torch.rand(1, 1, 16, 16, 15), torch.zeros(1, 16, 16, 15, dtype=torch.uint8))
    with pytest.raises(InputError, match="present"):
        model.encode_image(image, torch.zeros(1, 16, 16, 16), present=torch.ones(1, 3, dtype=torch.bool))


def test_attend_anatomies_has_no_nan_for_empty_rows():
    attn = torch.nn.MultiheadAttention(8, 4, batch_first=True)
    levels = [torch.randn(2, 5, 8) for _ in range(2)]
    member = torch.zeros(2, 3, 5, dtype=torch.bool)
    out, w = attend_anatomies(levels, member, torch.randn(3, 8), attn, need_weights=True)
    assert torch.isfinite(out).all() and torch.equal(w, torch.zeros_like(w))


@pytest.mark.parametrize("num_anatomies", [1, 7, 8, 15, 16, 31, 40])
def test_membership_equals_max_pool_for_any_number_of_anatomies(num_anatomies):
    gen = torch.Generator().manual_seed(num_anatomies)
    labels = torch.randint(0, num_anatomies + 4, (2, 8, 16, 24), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.9] = 0  # sparse: many patches miss anatomies
    expected = torch.stack(
        [
            F.max_pool3d((labels == a + 1).unsqueeze(1).float(), PATCH, PATCH).flatten(1) > 0
            for a in range(num_anatomies)
        ],
        dim=1,
    )
    for lab in (labels, labels.to(torch.uint8), labels.float()):
        assert torch.equal(token_membership(lab, num_anatomies, PATCH), expected)


@pytest.mark.parametrize("only", [[3], [0, 5, 9], list(range(0, 20, 2))], ids=["one", "few", "many"])
def test_membership_of_only_some_anatomies_equals_their_rows(only):
    # few anatomies: one mask each; many: the all-anatomy bit pass with the other rows cleared
    gen = torch.Generator().manual_seed(len(only))
    labels = torch.randint(0, 24, (2, 8, 16, 24), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.9] = 0
    full = token_membership(labels, 20, PATCH)
    expected = torch.zeros_like(full)
    expected[:, only] = full[:, only]
    assert expected.any()
    for lab in (labels, labels.to(torch.uint8), labels.float()):
        assert torch.equal(token_membership(lab, 20, PATCH, only=only), expected)
    with pytest.raises(InputError, match="must lie in"):
        token_membership(labels, 20, PATCH, only=[20])


def test_pool_with_present_computes_only_present_anatomies(model):
    # the analyzer passes present = the window's anatomies: their embeddings, membership and
    # token embeddings are those of the full computation; the other rows are empty
    gen = torch.Generator().manual_seed(3)
    a = len(model.anatomies)
    image = torch.rand(1, 1, *SHAPE, generator=gen)
    labels = torch.randint(0, a + 1, (1, *SHAPE), generator=gen)
    present = torch.zeros(1, a, dtype=torch.bool)
    present[0, [0, 2]] = True
    with torch.no_grad():
        full = model.encode_image(image, labels, return_tokens=True)
        some = model.encode_image(image, labels, present=present, return_tokens=True)
    for i in range(a):
        if i in (0, 2):
            assert torch.equal(some.membership[0, i], full.membership[0, i])
            torch.testing.assert_close(some.embeddings[0, i], full.embeddings[0, i], atol=1e-6, rtol=0)
            torch.testing.assert_close(some.tokens[0, i], full.tokens[0, i], atol=1e-6, rtol=0)
        else:
            assert not some.membership[0, i].any() and not some.tokens[0, i].any()
