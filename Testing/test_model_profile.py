"""Anatomy intensity profiles (the project's extension to the reference pooling): the histogram
is each anatomy's own voxels, the MLP starts silent, and the model uses the profile to tell apart
windows whose tokens are identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fvlm_core.errors import ConfigError, InputError
from fvlm_core.model import FVLM, FVLMConfig, load_config
from fvlm_core.model.pooling import token_membership
from fvlm_core.model.profile import FRACTION_EPS, VOLUME_SCALE_ML, ProfileEmbedding, intensity_profiles

torch.set_num_threads(1)


def _compress(frac: float) -> float:
    return math.log1p(frac / FRACTION_EPS) / math.log1p(1 / FRACTION_EPS)


def test_profile_is_the_histogram_of_each_anatomys_own_voxels():
    image = torch.zeros(2, 1, 4, 4, 4)
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    labels[0, :2] = 1  # anatomy 0: 32 voxels, a quarter of them at 0.9, the rest at 0.1
    image[0, 0, :2] = 0.1
    image[0, 0, 0, :2] = 0.9  # 8 of the 32
    labels[0, 2:, :, :2] = 2  # anatomy 1: 16 voxels, all exactly 1.0 (the top edge: last bin)
    image[0, 0, 2:, :, :2] = 1.0
    image[0, 0, 2:, :, 2:] = 0.9  # background voxels (label 0): counted nowhere
    labels[0, 3, 3, 3] = 7  # a value beyond the anatomies: ignored
    image[1] = 0.5  # sample 1: no anatomy at all
    prof = intensity_profiles(image, labels, num_anatomies=3, bins=4, voxel_ml=0.5)
    assert prof.shape == (2, 3, 5)
    exp0 = [_compress(0.75), 0, 0, _compress(0.25)]
    torch.testing.assert_close(prof[0, 0, :4], torch.tensor(exp0))
    torch.testing.assert_close(prof[0, 1, :4], torch.tensor([0, 0, 0, 1.0]))
    vol = [math.log1p(n * 0.5) / math.log1p(VOLUME_SCALE_ML) for n in (32, 16)]
    torch.testing.assert_close(prof[0, :2, 4], torch.tensor(vol))
    assert torch.equal(prof[0, 2], torch.zeros(5))  # anatomy 2 absent
    assert torch.equal(prof[1], torch.zeros(3, 5))
    # intensities outside [0, 1] fall into the end bins: 0.1 -> -0.7 and 0.9, 1.0 -> 1.7, 2.0
    assert torch.equal(intensity_profiles(image * 3 - 1, labels, 3, 4, 0.5), prof)


def test_profile_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="same"):
        intensity_profiles(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 2), 2, 8, 1.0)


def test_profile_embedding_starts_silent_and_learns():
    emb = ProfileEmbedding(num_anatomies=3, features=9, hidden=16, out_features=8)
    x = torch.rand(5, 3, 9)
    assert torch.equal(emb(x), torch.zeros(5, 3, 8))
    (emb(x) * torch.randn(5, 3, 8)).sum().backward()
    assert emb.w2.grad.abs().sum() > 0  # the output layer learns at once ...
    assert torch.equal(emb.w1.grad, torch.zeros_like(emb.w1))  # ... the hidden one once it is non-zero


@pytest.fixture
def profile_model(small_model_config) -> FVLM:
    torch.manual_seed(0)
    model = FVLM(small_model_config(profile_bins=8, profile_hidden=16), load_text_weights=False).eval()
    with torch.no_grad():  # a trained-looking profile MLP (a fresh one outputs zeros)
        model.profile_embed.w2.normal_()
    return model


def test_model_sees_a_density_change_inside_an_anatomy_through_the_profile(profile_model):
    """Two windows whose tokens are identical but whose lung holds different intensities: without
    the profile the lung embedding is the same, with it they differ; other anatomies do not move."""
    model = profile_model
    assert model.config.profile_bins == 8
    image = torch.rand(1, 1, 16, 16, 16)
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    labels[0, :8] = 1  # lung: upper half
    labels[0, 8:, :8] = 2  # heart
    other = image.clone()
    other[0, 0, :8] = other[0, 0, :8].flip(-1) * 0.5  # lung voxels: new histogram
    with torch.no_grad():
        tokens = model.encode_tokens(image)  # same tokens for both: isolate the profile's effect
        p1, p2 = model.intensity_profiles(image, labels), model.intensity_profiles(other, labels)
        a = model.pool(tokens, labels, profiles=p1).embeddings
        b = model.pool(tokens, labels, profiles=p2).embeddings
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-3)
    torch.testing.assert_close(a[0, 1], b[0, 1])
    # zero profiles reproduce the profile-free pooling exactly when the MLP is silent
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh.profile_embed.w2.zero_()
        fresh.profile_embed.b2.zero_()
        silent = fresh.encode_image(image, labels).embeddings
        ref_cfg = FVLMConfig.from_dict({**model.config.to_dict(), "profile_bins": 0})
        ref = FVLM(ref_cfg, load_text_weights=False).eval()
        ref.load_state_dict(
            {k: v for k, v in model.state_dict().items() if "profile_embed" not in k}, strict=True
        )
        torch.testing.assert_close(silent, ref.encode_image(image, labels).embeddings)


def test_global_embedding_uses_the_whole_window_profile(profile_model):
    """The CLIP baseline (the whole-volume head around an fVLM model) adds the whole window's profile."""
    from fvlm_training.baseline import GlobalCLIP

    baseline = GlobalCLIP(profile_model).eval()
    assert not any(k.startswith("global") for k in profile_model.state_dict())  # the head is the baseline's
    image = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        baseline.global_profile_embed.w2.normal_()
        a = baseline.encode_volume(image)
        baseline.global_profile_embed.w2.zero_()
        b = baseline.encode_volume(image)
    assert a.shape == (2, 16)
    assert not torch.allclose(a, b, atol=1e-3)


def test_profile_model_needs_the_label_map(profile_model):
    model = profile_model
    image = torch.rand(1, 1, 16, 16, 16)
    labels = torch.ones(1, 16, 16, 16, dtype=torch.uint8)
    member = token_membership(labels, 4, (4, 4, 4))
    with pytest.raises(InputError, match="label map"):
        model.encode_image(image, None, membership=member)
    with pytest.raises(InputError, match="profiles"):
        model.pool(model.encode_tokens(image), labels)
    with pytest.raises(InputError, match="shape"):
        model.pool(model.encode_tokens(image), labels, profiles=torch.zeros(1, 4, 3))


def test_profile_weights_round_trip_through_a_checkpoint(profile_model, tmp_path):
    model = profile_model
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FVLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.profile_bins == 8
    torch.testing.assert_close(loaded.profile_embed.w2, model.profile_embed.w2)
    image = torch.rand(1, 1, 16, 16, 16)
    labels = torch.randint(0, 5, (1, 16, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(image, labels).embeddings, model.encode_image(image, labels).embeddings
        )


def test_reference_configs_have_no_profile_and_bad_values_are_config_errors():
    assert load_config("fvlm-base").profile_bins == 0
    assert load_config("fvlm-tiny").profile_bins > 0
    for bad in ({"profile_bins": 1}, {"profile_bins": -2}, {"profile_hidden": 0}):
        with pytest.raises(ConfigError, match="profile_bins"):
            FVLMConfig.from_dict({**load_config("fvlm-tiny").to_dict(), **bad})


def test_token_maps_carry_the_profile_term_like_the_pooled_embedding(profile_model):
    """For an anatomy of one token and one level, pooling is that token's value: its similarity-map
    embedding must equal the anatomy embedding, profile term included."""
    import torch.nn.functional as F

    from fvlm_core.model.pooling import attend_anatomies, project_anatomies, token_embeddings

    model = profile_model
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 32, generator=gen)  # (B, L, C), a single level
    member = torch.zeros(2, 4, 6, dtype=torch.bool)
    for a in range(4):
        member[:, a, a] = True  # anatomy a = token a
    offset = torch.randn(2, 4, 32, generator=gen)
    with torch.no_grad():
        pooled, _ = attend_anatomies([x], member, model.query_tokens, model.attention)
        pooled_emb = F.normalize(project_anatomies(pooled + offset, model.vision_projs), dim=-1)
        maps = token_embeddings([x], model.attention, model.vision_projs, offset=offset)
        plain = token_embeddings([x], model.attention, model.vision_projs)
    for a in range(4):
        torch.testing.assert_close(maps[:, a, a], pooled_emb[:, a], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[:, 0, 0], pooled_emb[:, 0], atol=1e-3)
