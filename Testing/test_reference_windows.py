"""The reference evaluation's volume preparation and windows against their specification.

The specification (``../shared/DESIGN.md`` section 3, read against the public fVLM code:
``data/preprocess.py``, ``eval.py``'s ``masks_to_boxes_3d`` / ``center_crop`` and its
``DivisiblePadd``):

* preparation: crop to ``[min - (5, 20, 20), max + (5, 20, 20))`` (inclusive ``min`` / ``max`` of
  all anatomy labels, clamped to the volume), intensities ``ScaleIntensityRange(-1150, 350, 0, 1,
  clip=True)``, then MONAI ``SpatialPad`` to at least ``(112, 256, 352)`` with 0 (symmetric);
* per anatomy: inclusive box; ``size = max(roi, max - min)`` with roi ``(112, 288, 352)``;
  ``centre = (min + max) // 2``; ``start = max(0, centre - size // 2)``; ``end = min(dim, start +
  size)``; ``start = max(0, end - size)`` if ``end - start < size``; the window's mask holds only
  the target; both padded at the end to a multiple of ``(16, 16, 32)`` with 0 (MONAI
  ``DivisiblePad``, method ``end``).

``spec_prepare`` and ``spec_window`` below implement that text with torch and MONAI's transforms
(never the project's functions, which are only the subject) and the project's
:func:`~fvlm_core.preprocess.reference_volume`, :func:`~fvlm_core.zeroshot.windows.plan_reference`
and :func:`~fvlm_core.zeroshot.windows.reference_crops` must equal them: boxes, padding and every
voxel, on random label maps (small sizes) and on the real CTs of ``../shared/data``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import DivisiblePad, ScaleIntensityRange, SpatialPad

from fvlm_core.anatomy import CTRATE_CATALOG
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, LabelVolume
from fvlm_core.preprocess import ModelSpaceConfig, reference_intensity, reference_volume, reference_window
from fvlm_core.zeroshot import windows as W

NAMES = CTRATE_CATALOG.names  # lung, heart, esophagus, aorta = labels 1..4
ROI = (112, 288, 352)
PREPARED_MIN = (112, 256, 352)
MARGIN = (5, 20, 20)
PATCH = (16, 16, 32)


# ---------------------------------------------------------------- the specification, written here
def spec_scale(hu: np.ndarray) -> torch.Tensor:
    """``(1, Z, Y, X)`` intensities as data/preprocess.py's loader makes them."""
    scale = ScaleIntensityRange(a_min=-1150, a_max=350, b_min=0.0, b_max=1.0, clip=True)
    return torch.as_tensor(scale(torch.from_numpy(np.asarray(hu, np.float32))[None]))


def spec_prepare(hu, labels, min_size=PREPARED_MIN, margin=MARGIN):
    """data/preprocess.py: ``(image (1,Z,Y,X), labels (1,Z,Y,X), crop start, pad before)``."""
    image = spec_scale(hu)
    coords = np.nonzero(labels)
    lo = np.maximum(np.min(coords, axis=1) - np.asarray(margin), 0)
    hi = np.minimum(np.max(coords, axis=1) + np.asarray(margin), np.asarray(labels.shape))
    sl = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    image, lab = image[sl], torch.from_numpy(np.asarray(labels))[None][sl]
    pad = SpatialPad(spatial_size=tuple(min_size), mode="constant")
    before = np.asarray([w[0] for w in pad.compute_pad_width(tuple(image.shape[1:]))[1:]])
    return torch.as_tensor(pad(image)), torch.as_tensor(pad(lab)), lo, before


def spec_window(image, labels, value, roi=ROI, patch=PATCH):
    """eval.py's window of the anatomy ``value``: ``(start, end, image, mask)``, padded."""
    mask = labels == value
    idx = torch.nonzero(mask[0])  # (N, 3) z, y, x
    mn, mx = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    start, end = [], []
    for lo, hi, dim, r in zip(mn, mx, image.shape[1:], roi):
        size = max(r, hi - lo)
        centre = (lo + hi) // 2
        s = max(0, centre - size // 2)
        e = min(dim, s + size)
        if e - s < size:
            s = max(0, e - size)
        start.append(s)
        end.append(e)
    sl = (slice(None), *(slice(s, e) for s, e in zip(start, end)))
    win, win_mask = image[sl], mask[sl].float()
    win_mask[win_mask == 1] = value
    pad = DivisiblePad(k=tuple(patch), mode="constant", method="end")
    return tuple(start), tuple(end), torch.as_tensor(pad(win)), torch.as_tensor(pad(win_mask))


def _identity_geometry(shape_zyx) -> Geometry:
    return Geometry(tuple(shape_zyx[::-1]), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def check_against_spec(hu, labels, names, roi, prepared_min, margin, patch):
    """Assert the project's preparation, window boxes, padding and voxels equal the specification's."""
    g = _identity_geometry(labels.shape)
    ct, lab = CTVolume(np.asarray(hu, np.float32), g), LabelVolume(labels, g)
    exp_image, exp_labels, lo, before = spec_prepare(hu, labels, prepared_min, margin)
    prepared = reference_volume(ct, lab, prepared_min, margin)
    assert prepared.offset_zyx == tuple(int(v) for v in lo - before)
    assert np.array_equal(reference_intensity(prepared.ct.array), exp_image[0].numpy())
    assert np.array_equal(prepared.labels.array, exp_labels[0].numpy())
    shape = prepared.labels.array.shape
    plans = W.plan_reference(W.anatomy_boxes(prepared.labels.array, names), shape, patch, roi, order=names)
    present = [n for i, n in enumerate(names) if (exp_labels == i + 1).any()]
    assert [p.anatomies for p in plans] == [(n,) for n in present]  # every anatomy, never dropped
    for plan in plans:
        value = names.index(plan.anatomies[0]) + 1
        start, end, exp_win, exp_mask = spec_window(exp_image, exp_labels, value, roi, patch)
        assert plan.start_zyx == start
        assert plan.data_size_zyx == tuple(e - s for s, e in zip(start, end))
        assert plan.size_zyx == tuple(exp_win.shape[1:])
        win = reference_window(prepared, plan.start_zyx, plan.data_size_zyx, plan.size_zyx, value)
        assert np.array_equal(win.image(), exp_win[0].numpy())
        assert np.array_equal(win.labels, exp_mask[0].numpy().astype(win.labels.dtype))
    return prepared, plans


# ---------------------------------------------------------------- the reference model, written here
def small_reference_model():
    """A random model in the official layout (MONAI ViT and pooling names, ``fvlm-base``'s model
    space) at reduced width and depth (64 wide, 4 blocks, levels after blocks 0, 1, 2 + the final
    norm like the reference's 3, 6, 9), with the offline MiniLM text encoder. Its stored
    temperature (0.6) lies outside the clamp range: eval.py divides by the stored value."""
    from fvlm_core.model import FVLM, FVLMConfig, load_config
    from fvlm_core.model.config import MINILM

    cfg = load_config("fvlm-base").to_dict()
    cfg["vision"].update(hidden_size=64, mlp_dim=128, num_layers=4, num_heads=4, levels=[0, 1, 2])
    cfg["text"] = {"name_or_path": MINILM, "pooling": "mean", "max_length": 64, "freeze": True}
    cfg["embed_dim"] = 32
    torch.manual_seed(0)
    model = FVLM(FVLMConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        model.query_tokens.normal_()  # zero-initialised: attention would be uniform
        model.temp.fill_(0.6)
    return model


def _ln(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], 1e-5)


def _lin(x, state, prefix):
    return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def spec_levels(state, vision, image):
    """The reference ViT (lavis vit.py / MONAI blocks) on ``image (1, 1, Z, Y, X)``: the token
    levels after blocks ``vision.levels`` and the final normed output."""
    p = "visual_encoder."
    x = F.conv3d(image, state[p + "patch_embedding.patch_embeddings.weight"],
                 state[p + "patch_embedding.patch_embeddings.bias"], stride=vision.patch_size)  # fmt: skip
    grid, c = tuple(x.shape[2:]), x.shape[1]
    native = tuple(s // q for s, q in zip(vision.img_size, vision.patch_size))
    x = x.flatten(2).transpose(1, 2)
    pos = state[p + "patch_embedding.position_embeddings"]
    if grid != native:  # patchembedding.py: trilinear, align_corners=False
        pos = F.interpolate(
            pos.permute(0, 2, 1).view(1, c, *native), size=grid, mode="trilinear", align_corners=False
        )
        pos = pos.flatten(2).transpose(1, 2)
    x = x + pos
    heads, n = vision.num_heads, x.shape[1]
    levels = []
    for i in range(vision.num_layers):
        q = f"{p}blocks.{i}."
        qkv = _lin(_ln(x, state, q + "norm1"), state, q + "attn.qkv").view(1, n, 3, heads, c // heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-1, -2) * (c // heads) ** -0.5).softmax(-1)
        x = x + _lin((att @ qkv[2]).transpose(1, 2).reshape(1, n, c), state, q + "attn.out_proj")
        h = _ln(x, state, q + "norm2")
        x = x + _lin(F.gelu(_lin(h, state, q + "mlp.linear1")), state, q + "mlp.linear2")
        if i in vision.levels:
            levels.append(x)
    levels.append(_ln(x, state, p + "norm"))
    return levels


def spec_probabilities(model, image, mask, value, prompts):
    """eval.py's ``forward_test_win`` for the anatomy ``value`` of a window: its tokens (any mask
    voxel in the patch) of every level as keys/values of ``nn.MultiheadAttention`` with the
    anatomy's query, ``vision_projs``, L2 norm; then ``softmax(v @ [t_neg, t_pos]^T / temp)[1]``
    per ``(negative, positive)`` prompt pair, with the stored ``temp``."""
    cfg, state = model.config, model.state_dict()
    a = value - 1
    levels = spec_levels(state, cfg.vision, image)
    tokens = F.max_pool3d((mask == value).float()[None, None], cfg.vision.patch_size, cfg.vision.patch_size)
    tokens = tokens.flatten() > 0
    kv = torch.cat([lv[0][tokens] for lv in levels])[None]
    attention = torch.nn.MultiheadAttention(cfg.vision.hidden_size, cfg.pool_heads, batch_first=True).eval()
    attention.load_state_dict(
        {k[len("attention.") :]: v for k, v in state.items() if k.startswith("attention.")}
    )
    pooled = attention(state["query_tokens"][a][None, None], kv, kv)[0][0]
    v = F.normalize(_lin(pooled, state, f"vision_projs.{a}"), dim=-1)
    t = model.encode_text([text for pair in prompts for text in pair]).view(len(prompts), 2, -1)
    return [float((v @ pair.t() / state["temp"]).softmax(-1)[0, 1]) for pair in t]


# ---------------------------------------------------------------- random label maps, small sizes
def test_random_label_maps_match_the_specification():
    """Small volumes and windows (so that every branch occurs): boxes larger and smaller than the
    window, volumes smaller than the prepared minimum, boxes at the volume's faces."""
    rng = np.random.default_rng(0)
    roi, prepared_min, margin, patch = (8, 12, 10), (7, 10, 12), (1, 3, 2), (2, 4, 4)
    branches = {"grown": 0, "clamped": 0, "padded": 0}
    for _ in range(60):
        shape = tuple(int(v) for v in rng.integers(4, 30, size=3))
        labels = np.zeros(shape, np.uint8)
        for value in rng.permutation(4)[: rng.integers(1, 5)] + 1:
            lo = [int(rng.integers(0, n)) for n in shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape)]
            labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
        hu = rng.uniform(-1300, 500, size=shape).astype(np.float32)
        prepared, plans = check_against_spec(hu, labels, NAMES, roi, prepared_min, margin, patch)
        pshape = prepared.labels.array.shape
        branches["padded"] += any(p.size_zyx != p.data_size_zyx for p in plans)
        branches["clamped"] += any(
            d < r and d == n for p in plans for d, r, n in zip(p.data_size_zyx, roi, pshape)
        )
        branches["grown"] += any(d > r for p in plans for d, r in zip(p.data_size_zyx, roi))
    assert all(v > 5 for v in branches.values()), branches


def test_eval_window_rules_on_hand_made_boxes():
    """The rules one by one: extent = max - min (one less than the voxel span), clamping, and a
    volume smaller than the window (the window shrinks to it)."""
    # a 40-voxel span along z in a 60-slice volume, roi 16: size 39 (not 40), centred, inside
    assert W.reference_window_box(((10, 0, 0), (50, 4, 4)), (60, 30, 30), (16, 8, 8)) == (
        (10, 0, 0),
        (39, 8, 8),
    )
    # a box at the volume's end: the window is shifted back inside (start = end - size)
    assert W.reference_window_box(((55, 26, 0), (60, 30, 2)), (60, 30, 30), (16, 8, 8)) == (
        (44, 22, 0),
        (16, 8, 8),
    )
    # a volume smaller than the window: the window is the whole axis
    assert W.reference_window_box(((1, 1, 1), (3, 3, 3)), (5, 6, 7), (16, 8, 8)) == ((0, 0, 0), (5, 6, 7))


# ---------------------------------------------------------------- real CTs
def _relabel(seg: np.ndarray, class_map: dict, groups: dict) -> np.ndarray:
    """TotalSegmentator classes -> the 4 anatomies (as the reference's fix_data.py merges them)."""
    out = np.zeros(seg.shape, np.uint8)
    for value, name in class_map.items():
        if name in groups:
            out[seg == int(value)] = groups[name]
    return out


GROUPS = {
    **dict.fromkeys(
        [f"lung_{p}" for p in ("upper_lobe_left", "lower_lobe_left", "upper_lobe_right", "middle_lobe_right", "lower_lobe_right")],
        1,
    ),
    "heart": 2,
    "atrial_appendage_left": 2,
    "esophagus": 3,
    "aorta": 4,
}  # fmt: skip


@pytest.fixture(scope="module")
def real_cts(ts_dir):
    """``{name: (ct_ms, labels_ms)}``: chest_ct (lungs from the built-in segmenter, TotalSegmentator
    heart, aorta on its own cropped grid resampled by position) and the two abdomen CTs with their
    TotalSegmentator label maps (lung lobes, aorta), in model space."""
    import json

    from fvlm_core.io import read_ct, read_label_map
    from fvlm_core.preprocess import resample_to_model_space
    from fvlm_core.segmentation.builtin import BuiltinBackend

    class_map = json.loads((ts_dir / "total_class_map.json").read_text())
    out = {}
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    lab = BuiltinBackend().segment(ct, CTRATE_CATALOG).labelmap.copy()
    lab[lab > 1] = 0  # lungs only from the built-in segmenter
    heart = read_label_map(ts_dir / "chest_heart.nii.gz", reference=ct.geometry).array > 0
    aorta = read_label_map(ts_dir / "chest_aorta_cropped.nii.gz", reference=ct.geometry).array > 0
    lab[heart & (lab == 0)] = 2
    lab[aorta & (lab == 0)] = 4
    out["chest_ct"] = (ct, lab)
    for image, seg in (("example_ct", "example_seg_fast_force_split"), ("example_ct_sm", "example_seg")):
        ct = read_ct(ts_dir / f"{image}.nii.gz")
        seg_map = read_label_map(ts_dir / f"{seg}.nii.gz", reference=ct.geometry).array
        out[image] = (ct, _relabel(seg_map, class_map, GROUPS))
    ms = ModelSpaceConfig()
    return {
        name: resample_to_model_space(ct, LabelVolume(lab, ct.geometry), ms)
        for name, (ct, lab) in out.items()
    }


@pytest.mark.slow
def test_real_cts_match_the_specification(real_cts):
    """The full-size reference windows of three real CTs, through ``reference_crops`` (what
    ``analyze --windows reference`` and ``evaluate --windows reference`` encode)."""
    seen, crops = {}, {}
    for name, (ct_ms, lab_ms) in real_cts.items():
        hu, labels = ct_ms.array, lab_ms.array
        exp_image, exp_labels, lo, before = spec_prepare(hu, labels)
        offset = lo - before
        cut = W.reference_crops(ct_ms, lab_ms, NAMES, ModelSpaceConfig())
        present = [n for i, n in enumerate(NAMES) if (labels == i + 1).any()]
        assert [p.anatomies for p, _ in cut] == [(n,) for n in present], name
        for plan, win in cut:
            value = NAMES.index(plan.anatomies[0]) + 1
            start, end, exp_win, exp_mask = spec_window(exp_image, exp_labels, value)
            assert plan.start_zyx == tuple(int(s + o) for s, o in zip(start, offset)), (name, plan)
            assert plan.data_size_zyx == tuple(e - s for s, e in zip(start, end))
            assert plan.size_zyx == win.hu.shape == tuple(exp_win.shape[1:])
            assert np.array_equal(win.image(), exp_win[0].numpy()), (name, plan)
            assert np.array_equal(win.labels, exp_mask[0].numpy().astype(win.labels.dtype)), (name, plan)
            # the window grid sits where its first voxel is in the model-space volume
            first = ct_ms.geometry.affine_lps[:3, :3] @ np.asarray(plan.start_zyx[::-1], float)
            np.testing.assert_allclose(win.geometry.origin, first + ct_ms.geometry.affine_lps[:3, 3])
        seen[name] = {p.anatomies[0]: (p.start_zyx, p.size_zyx) for p, _ in cut}
        crops[name] = lo
    # what these CTs exercise: every prepared volume padded to the model window (so windows of
    # 256, not 288, voxels high, starting where the padding starts), the chest padded along z
    # (96 slices), the abdomen cropped on every axis, the small abdomen padded from 30 slices
    assert set(seen["chest_ct"]) == {"lung", "heart", "aorta"}
    assert set(seen["example_ct"]) == set(seen["example_ct_sm"]) == {"lung", "aorta"}
    assert all(size == (112, 256, 352) for windows in seen.values() for _, size in windows.values())
    assert seen["chest_ct"]["heart"][0][0] < 0 and seen["example_ct_sm"]["lung"][0][0] == -((112 - 30) // 2)
    assert all(v > 0 for v in crops["example_ct"])


@pytest.mark.slow
def test_reference_probabilities_equal_the_reference_model(real_cts):
    """On the same model-space volumes and weights, the analyzer's reference mode (what
    ``fvlm evaluate --windows reference`` runs after eval.py's resizing) gives the probabilities
    of the specification's windows through the reference model written above (< 1e-4)."""
    from fvlm_core.zeroshot.analyzer import Analyzer

    torch.set_num_threads(2)
    model = small_reference_model()
    analyzer = Analyzer(model, device="cpu")
    findings = analyzer.default_findings()
    emb = analyzer.finding_embeddings(findings)
    worst = 0.0
    with torch.no_grad():
        for name in ("chest_ct", "example_ct"):  # example_ct_sm: through evaluate, test_reference_pipeline
            ct_ms, lab_ms = real_cts[name]
            enc = analyzer.encode_model_space(ct_ms, lab_ms, strategy="reference")
            got = analyzer.score(enc, emb)
            image, labels, _, _ = spec_prepare(ct_ms.array, lab_ms.array)
            expected = {}
            for i, name in enumerate(NAMES):
                if not (labels == i + 1).any():
                    continue
                _, _, win, mask = spec_window(image, labels, i + 1)
                mine = [f for f in findings if f.anatomy == name]
                probs = spec_probabilities(
                    model, win[None], mask[0], i + 1, [(f.negative[0], f.positive[0]) for f in mine]
                )
                expected.update({(name, f.name): p for f, p in zip(mine, probs)})
            assert set(got) == set(expected) and enc.dropped == {}
            worst = max(worst, max(abs(got[k] - expected[k]) for k in expected))
            # the clamped temperature (0.5) would give other numbers: the stored one is used
            assert any(abs(p - 0.5) > 0.01 for p in expected.values())
    assert worst < 1e-4, worst
