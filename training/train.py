"""Pretrain fVLM on a `fvlm prepare` cache (one CPU to many GPUs with torchrun).

Usage::

    fvlm train --config ctrate-base --set data.cache=/data/ctrate_cache --out runs/base
    torchrun --nproc_per_node=4 -m fvlm_training.cli train --config ctrate-base --out runs/base
    fvlm train --config tiny-cpu --set data.cache=cache/ --set optim.lr=3e-4 --out runs/tiny

``--config`` is a recipe YAML (bundled: ``ctrate-base``, ``tiny-cpu``; see training/configs);
``--set KEY=VALUE`` overrides any entry (dotted keys, YAML values). The run folder gets
``checkpoints/last.pt`` (every ``train.checkpoint_every`` optimizer steps and at the end,
written atomically), ``tb/`` (TensorBoard scalars), ``summary.json`` and, at the end, the
model in ``model/`` (``save_pretrained``; loadable by ``fvlm analyze``). Launching again with the
same ``--out`` resumes from the last checkpoint (``--fresh`` starts over); SIGTERM saves a
checkpoint and exits cleanly.

Python API: :func:`train` (a config dict / YAML path, a progress callback, a wall-clock budget).

Distributed semantics: each of the ``W`` ranks takes ``train.batch_size`` samples of every
global batch (see :class:`fvlm_core.data.samples.GlobalBatchSampler`); the loss gathers all ranks'
embeddings (global negatives) and every rank computes the global loss; DDP's gradient average
then equals the single-process gradient of the global batch (``fvlm_core.distributed``).
Gradient accumulation sums ``train.grad_accum`` micro-batch gradients (scaled by 1/accum) before
an optimizer step; note that negatives come from one micro-batch, so it is not equivalent to a
larger batch for a contrastive loss.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fvlm_core.errors import CheckpointError, ConfigError, DataError
from fvlm_training.precision import PRECISIONS, resolve_precision

log = logging.getLogger("fvlm.train")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Every option of a training recipe, with its default (``--set`` accepts exactly these keys).
DEFAULTS: dict[str, Any] = {
    # model config: a bundled name (fvlm-tiny, fvlm-base), a YAML path, or a full mapping
    "model": "fvlm-tiny",
    # deep-merged into the model config (e.g. {text: {freeze: true}})
    "model_overrides": {},
    # start from a save_pretrained folder (e.g. imported official weights) instead of random init
    "init_from": None,
    # "fvlm": per-anatomy fine-grained loss; "global_clip": whole-volume vs whole-report CLIP baseline
    "objective": "fvlm",
    "data": {
        "cache": None,  # folder written by `fvlm prepare`
        "reconstruction": "random",  # per scan: a random reconstruction each epoch | first | all
        "crop_size": None,  # (z, y, x); default: the model's preprocessing.window_size_zyx
        "random_crop": True,
        "flip_prob": 0.2,
        "intact_rule": "interior",  # "interior" or "strict" (fvlm_core.data.samples.AugmentConfig)
        "num_workers": 0,
    },
    "train": {
        "epochs": 1,
        "batch_size": 2,  # per process
        "grad_accum": 1,
        "max_steps": None,  # optimizer steps; None = epochs
        "max_minutes": None,  # wall-clock budget of the training loop
        "seed": 0,
        "deterministic": False,
        "precision": "auto",  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (GPU or CPU) | fp16 (GPU)
        "grad_checkpointing": False,  # ViT activation checkpointing (GPU memory)
        "clip_grad_norm": None,
        "log_every": 10,
        "checkpoint_every": 500,
        "keep_checkpoints": 1,
        "device": "auto",  # auto | cpu | cuda
        "threads": None,  # torch.set_num_threads on CPU
        "find_unused_parameters": False,
        "progress_bar": True,
    },
    "optim": {
        "lr": 1e-4,
        "min_lr": 1e-6,
        "warmup_steps": 377,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
    },
    "loss": {
        "normal_pairs": True,
        "same_text": True,
        "disease_pairs": 1.0,
        "co_teaching": False,  # train a peer model side by side (twice the compute)
        "co_teaching_alpha": 0.5,
        "skip_without_abnormal": True,
    },
}

#: Options that may change when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.max_minutes",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress_bar",
    "train.threads",
    "data.num_workers",
    "data.cache",
    "train.device",
}


# =============================================================================================
# Configuration
# =============================================================================================


def _deep_merge(base: dict, update: Mapping, where: str = "", strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        key = f"{where}{k}"
        if strict and k not in base:
            raise ConfigError(
                f"unknown training option {key!r}; valid options here: {', '.join(sorted(base)) or '(none)'}"
            )
        if isinstance(base.get(k), dict) and k not in ("model_overrides",) and isinstance(v, Mapping):
            out[k] = _deep_merge(base[k], v, f"{key}.", strict)
        elif k == "model_overrides" and isinstance(v, Mapping):
            out[k] = _deep_merge(base.get(k) or {}, v, f"{key}.", strict=False)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); values are YAML (numbers, lists, null, ...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; accept it as a number
        with contextlib.suppress(ValueError):
            value = float(value)
    return [k for k in key.strip().split(".") if k], value


def available_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_train_config(
    config: str | os.PathLike | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """A complete training config: defaults <- recipe (name, YAML path or mapping) <- overrides."""
    if config is None:
        data: Mapping[str, Any] = {}
        source = "defaults"
    elif isinstance(config, Mapping):
        data, source = config, "the given mapping"
    else:
        path = Path(config)
        if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
            path = CONFIG_DIR / f"{config}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"training config {str(config)!r} not found: give a YAML file or a bundled recipe "
                f"({', '.join(available_recipes())})"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: not a readable YAML training config ({exc})") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: a training config must be a mapping of options")
        source = str(path)
    try:
        cfg = _deep_merge(DEFAULTS, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    for item in overrides:
        keys, value = parse_override(item)
        update: Any = value
        for k in reversed(keys):
            update = {k: update}
        cfg = _deep_merge(cfg, update)
    _validate(cfg)
    return cfg


def _validate(cfg: dict[str, Any]) -> None:
    t, o, d = cfg["train"], cfg["optim"], cfg["data"]
    checks = [
        (int(t["epochs"]) >= 1, "train.epochs must be >= 1"),
        (int(t["batch_size"]) >= 1, "train.batch_size must be >= 1"),
        (int(t["grad_accum"]) >= 1, "train.grad_accum must be >= 1"),
        (float(o["lr"]) > 0, "optim.lr must be > 0"),
        (int(o["warmup_steps"]) >= 0, "optim.warmup_steps must be >= 0"),
        (0 <= float(d["flip_prob"]) <= 1, "data.flip_prob must be in [0, 1]"),
        (cfg["objective"] in ("fvlm", "global_clip"), "objective must be 'fvlm' or 'global_clip'"),
        (t["precision"] in PRECISIONS, f"train.precision must be one of {'|'.join(PRECISIONS)}"),
        (d["intact_rule"] in ("interior", "strict"), "data.intact_rule must be 'interior' or 'strict'"),
        (int(t["checkpoint_every"]) >= 1, "train.checkpoint_every must be >= 1"),
        (0 <= float(cfg["loss"]["co_teaching_alpha"]) <= 1, "loss.co_teaching_alpha must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{msg} (check the recipe or --set)")


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "model_overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_compatible(old: Mapping, new: Mapping, old_world: int, new_world: int) -> None:
    a, b = _flat(old), _flat(new)
    diffs = [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    if old_world * int(old["train"]["batch_size"]) != new_world * int(new["train"]["batch_size"]):
        diffs.append(f"global batch ({old_world} x {old['train']['batch_size']} before)")
    if diffs:
        raise ConfigError(
            "the run folder's checkpoint was trained with different options: "
            + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" if k in a or k in b else k for k in diffs)
            + ". Resume with the original options, or pass --fresh (or another --out) to start a new run"
        )


# =============================================================================================
# Model wrapper (what DistributedDataParallel wraps)
# =============================================================================================


def _build_objective(cfg: dict[str, Any], model_cfg, device, seed: int):
    import torch
    from torch import nn

    from fvlm_core.model import FVLM

    def make(s: int):
        torch.manual_seed(s)
        if cfg["init_from"]:
            m = FVLM.from_pretrained(cfg["init_from"], device="cpu")
            if model_cfg.text.freeze:
                m.freeze_text(model_cfg.text.train_top_layers)
        else:
            m = FVLM(model_cfg)
        return m

    class Objective(nn.Module):
        """One forward for the whole step: image and text embeddings of the model (and peer)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = make(seed)
            self.peer = make(seed + 1) if cfg["loss"]["co_teaching"] else None
            for m in self.models():
                if cfg["objective"] == "fvlm":
                    m.global_proj.requires_grad_(False)  # unused by this objective (DDP needs all used)
                else:
                    for mod in (m.attention, m.vision_projs):
                        mod.requires_grad_(False)
                    m.query_tokens.requires_grad_(False)

        def models(self):
            return [self.model] if self.peer is None else [self.model, self.peer]

        def _embed(self, m, image, labels, present, texts, reports):
            if cfg["objective"] == "global_clip":
                img = m.encode_image_global(image)[:, None]
                txt = m.encode_text(list(reports))[:, None].to(img.dtype)
                return img, txt, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
            out = m.encode_image(image, labels, present=present)
            b, a = present.shape
            flat = [texts[i][j] for i in range(b) for j in range(a)]
            want = present.reshape(-1).tolist()
            uniq = sorted({t for t, w in zip(flat, want) if w})
            txt = out.embeddings.new_zeros(b * a, out.embeddings.shape[-1])
            if uniq:
                emb = m.encode_text(uniq).to(txt.dtype)
                pos = {t: i for i, t in enumerate(uniq)}
                rows = [k for k, w in enumerate(want) if w]
                idx = torch.tensor([pos[flat[k]] for k in rows], device=txt.device)
                txt = txt.index_copy(0, torch.tensor(rows, device=txt.device), emb[idx])
            return out.embeddings, txt.reshape(b, a, -1), out.present

        def forward(self, image, labels, present, texts, reports):
            img, txt, pres = self._embed(self.model, image, labels, present, texts, reports)
            res = {"image": img, "text": txt, "present": pres, "tau": self.model.temperature}
            if self.peer is not None:
                pimg, ptxt, _ = self._embed(self.peer, image, labels, present, texts, reports)
                res.update(peer_image=pimg, peer_text=ptxt, peer_tau=self.peer.temperature)
            return res

    obj = Objective().to(device)
    return obj


def _warm_text_cache(objective, base_ds, reports: bool) -> None:
    """Encode every text of the dataset once, in a fixed order, when the text encoder is frozen
    (its pooled features, or, when an adapter or top layers train above it, its token states).

    Why: the encoder's output for a text depends (in the last float bits) on the padding of
    the batch it is encoded in. Encoding all texts up front, sorted and in fixed chunks, makes
    the cached features independent of which texts met in a training batch, so a resumed or a
    multi-process run sees exactly the same features as an uninterrupted single-process one.
    Also what makes CPU training fast: the frozen part costs nothing per step afterwards.
    """
    from fvlm_core.data.samples import dataset_texts

    for m in objective.models():
        if not m.text_frozen and m.text_split is None:
            continue
        texts = sorted({t for t in dataset_texts(base_ds, reports=reports) if t.strip()})
        limit = m._text_cache.max_entries
        if len(texts) > limit:
            log.info(
                "%d unique texts exceed the text-feature cache (%d): encoding them as batches need them",
                len(texts),
                limit,
            )
            continue
        m.cache_text(texts)  # sorted; the encoder batches them in fixed chunks of 64


def _param_groups(module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # no decay for biases, norms, the temperature, queries and position embeddings
        if p.ndim < 2 or name.endswith(("temp", "query_tokens", "position_embeddings")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# =============================================================================================
# The training loop
# =============================================================================================


class _Stop:
    """Why the loop should stop (SIGTERM, wall-clock budget, max steps, callback)."""

    def __init__(self) -> None:
        self.sigterm = False

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            self.sigterm = True
            log.warning("SIGTERM received: saving a checkpoint at the end of this step")

        signal.signal(signal.SIGTERM, handler)
        return previous


def _resolve_device(name: str, local_rank: int):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use --set train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _load_dataset(cfg: dict[str, Any]):
    cache = cfg["data"]["cache"]
    if not cache:
        raise ConfigError(
            "no training data: set data.cache to a folder written by `fvlm prepare` "
            "(e.g. --set data.cache=cache/), or pass dataset= to fvlm_training.train.train()"
        )
    if not Path(cache).is_dir():
        raise DataError(f"data.cache={cache!r} is not a folder; run `fvlm prepare ... --out {cache}` first")
    from fvlm_core.data.cache import CacheSamples

    return CacheSamples(cache, reconstruction=cfg["data"]["reconstruction"])


def train(
    config: str | os.PathLike | Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    dataset: Sequence[Any] | None = None,
    resume: bool | str | os.PathLike | None = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    save_model: bool = True,
) -> dict[str, Any]:
    """Train a model; returns the run summary (also written to ``OUT/summary.json``).

    Args:
        config: recipe name, YAML path or mapping (:func:`load_train_config`).
        out_dir: run folder (checkpoints, TensorBoard, summary, final model).
        overrides: ``"key.sub=value"`` strings applied on top of ``config``.
        dataset: samples to train on (a sequence of ``CachedSample`` s; see
            ``fvlm_core.data.samples``) instead of ``data.cache``.
        resume: ``"auto"`` (resume when OUT has a checkpoint), ``True`` (must resume),
            ``False`` (start over), or a checkpoint path.
        progress: called on rank 0 after every optimizer step with a dict (``step``,
            ``total_steps``, ``epoch``, ``loss``, ``lr``, ``temperature``, ``samples_per_s``,
            ``elapsed_s``, ``per_anatomy``).
        should_stop: polled after every optimizer step; True saves a checkpoint and stops.
        max_minutes / max_steps: override ``train.max_minutes`` / ``train.max_steps``.
        save_model: write ``OUT/model`` (``save_pretrained``) when the loop ends (not on SIGTERM).

    Returns:
        The summary dict: ``status`` (completed | stopped | terminated), ``steps``,
        ``samples_seen``, ``samples_per_s``, ``final_loss``, ``failed_samples``, ``model_dir``,
        ... and ``model``, the trained :class:`~fvlm_core.model.FVLM` (not written to JSON).
    """
    import numpy as np
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fvlm_core import distributed as fdist
    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.data.samples import AugmentConfig, GlobalBatchSampler, TrainingSamples, collate
    from fvlm_core.loss import FineGrainedContrastiveLoss, PeerEmbeddings
    from fvlm_core.model import FVLMConfig, load_config
    from fvlm_training import checkpointing as ckpt
    from fvlm_training.schedule import WarmupCosineLR

    cfg = load_train_config(config, overrides)
    if max_minutes is not None:
        cfg["train"]["max_minutes"] = float(max_minutes)
    if max_steps is not None:
        cfg["train"]["max_steps"] = int(max_steps)
    t_cfg, o_cfg = cfg["train"], cfg["optim"]
    out = Path(out_dir)

    created_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = fdist.init_distributed()
    if not fdist.is_distributed():
        info = fdist.DistInfo()
    else:
        info = fdist.dist_info()
    device = _resolve_device(t_cfg["device"], info.local_rank)
    if device.type == "cpu" and t_cfg["threads"]:
        torch.set_num_threads(int(t_cfg["threads"]))
    if t_cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    precision = resolve_precision(t_cfg["precision"], device)

    # ---------------------------------------------------------------- resume?
    ckpt_path: Path | None = None
    if resume in ("auto", None):
        ckpt_path = ckpt.last_checkpoint(out)
    elif resume is True:
        ckpt_path = ckpt.last_checkpoint(out)
        if ckpt_path is None:
            raise CheckpointError(f"--resume: {out} holds no checkpoint (checkpoints/last.pt) to resume from")
    elif resume is not False:
        ckpt_path = Path(resume)
    state = ckpt.load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if state is not None:
        _check_resume_compatible(state["config"], cfg, int(state["progress"]["world_size"]), info.world_size)

    # ---------------------------------------------------------------- model
    seed = int(t_cfg["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if isinstance(cfg["model"], Mapping):
        base = FVLMConfig.from_dict(cfg["model"]).to_dict()
    elif cfg["init_from"]:
        base = load_config(cfg["init_from"]).to_dict()
    else:
        base = load_config(cfg["model"]).to_dict()
    model_cfg = FVLMConfig.from_dict(_deep_merge(base, cfg["model_overrides"] or {}, strict=False))
    objective = _build_objective(cfg, model_cfg, device, seed)
    if t_cfg["grad_checkpointing"]:
        for m in objective.models():
            m.set_grad_checkpointing(True)
    objective.train()
    ddp = (
        DDP(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(t_cfg["find_unused_parameters"]),
        )
        if fdist.is_distributed()
        else None
    )
    wrapped = ddp if ddp is not None else objective
    loss_fn = FineGrainedContrastiveLoss.from_config(cfg["loss"])
    if cfg["objective"] == "global_clip":
        loss_fn = FineGrainedContrastiveLoss(
            normal_pairs=False, same_text=False, disease_pairs=0.0, skip_without_abnormal=False
        )
    anatomies = ["global"] if cfg["objective"] == "global_clip" else list(model_cfg.anatomies)

    # ---------------------------------------------------------------- data
    base_ds = dataset if dataset is not None else _load_dataset(cfg)
    _warm_text_cache(objective, base_ds, reports=cfg["objective"] == "global_clip")
    n = len(base_ds)
    per_rank = int(t_cfg["batch_size"])
    global_batch = per_rank * info.world_size
    if n < global_batch:
        raise DataError(
            f"the dataset has {n} samples, fewer than one global batch ({info.world_size} x {per_rank}); "
            "lower train.batch_size or add data"
        )
    crop = cfg["data"]["crop_size"] or model_cfg.preprocessing["window_size_zyx"]
    augment = AugmentConfig(
        crop_size=tuple(int(c) for c in crop),
        flip_prob=float(cfg["data"]["flip_prob"]),
        random_crop=bool(cfg["data"]["random_crop"]),
        intact_rule=cfg["data"]["intact_rule"],
        hu_window=tuple(model_cfg.preprocessing["hu_window"]),
    )
    finding_anatomy = {f["name"]: f["anatomy"] for f in model_cfg.findings or []}
    samples = TrainingSamples(base_ds, model_cfg.anatomies, finding_anatomy, augment, seed)
    steps_per_epoch = n // global_batch  # micro-steps
    accum = int(t_cfg["grad_accum"])
    opt_steps_per_epoch = math.ceil(steps_per_epoch / accum)
    total_steps = opt_steps_per_epoch * int(t_cfg["epochs"])
    if t_cfg["max_steps"] is not None:
        total_steps = min(total_steps, int(t_cfg["max_steps"]))

    # ---------------------------------------------------------------- optimizer, schedule
    optimizer = torch.optim.AdamW(
        _param_groups(objective, o_cfg["weight_decay"]),
        lr=float(o_cfg["lr"]),
        betas=tuple(float(b) for b in o_cfg["betas"]),
        eps=float(o_cfg["eps"]),
    )
    schedule_total = opt_steps_per_epoch * int(t_cfg["epochs"])  # the schedule ignores budgets
    scheduler = WarmupCosineLR(optimizer, int(o_cfg["warmup_steps"]), schedule_total, float(o_cfg["min_lr"]))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    progress_state = {"global_step": 0, "epoch": 0, "micro_step": 0, "samples_seen": 0, "failed": 0}
    failed_names: list[str] = []
    history: list[list[float]] = []
    n_anat = len(model_cfg.anatomies)
    present_counts = torch.zeros(n_anat, dtype=torch.long)  # this rank's intact-anatomy counts
    elapsed_before = 0.0
    if state is not None:
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress_state.update({k: int(v) for k, v in state["progress"].items() if k in progress_state})
        failed_names = list(state.get("failed_names", []))
        history = [list(h) for h in state.get("history", [])]
        if "present_counts" in state and info.is_main:  # rank 0 carries the run's total so far
            present_counts = state["present_counts"].long().clone()
        elapsed_before = float(state["progress"].get("elapsed_s", 0.0))
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if info.is_main:
            log.info("resumed from %s at step %d", ckpt_path, progress_state["global_step"])
    else:
        # per-rank streams for dropout; rank 0 keeps the single-process stream
        torch.manual_seed(seed + 1_000_003 * info.rank)

    # ---------------------------------------------------------------- logging
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    bar = None
    if info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=progress_state["global_step"] + 1)
        except Exception as exc:  # tensorboard missing or broken: keep training
            log.warning("TensorBoard logging disabled: %s", exc)
        if t_cfg["progress_bar"]:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=progress_state["global_step"], desc="train", unit="step")
        atomic_write_text(out / "train_config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    stop = _Stop()
    previous_handler = stop.install()
    t_start = time.perf_counter()
    budget_s = float(t_cfg["max_minutes"]) * 60 if t_cfg["max_minutes"] else None
    status = "completed"
    window = {"loss": 0.0, "n": 0, "samples": 0, "t": time.perf_counter(), "per": None, "per_n": None}
    last_info: dict[str, Any] = {}

    def total_present() -> torch.Tensor:
        return fdist.all_reduce_sum(present_counts)

    def snapshot() -> dict[str, Any]:
        rng = ckpt.rng_state()
        rngs = [rng]
        if fdist.is_distributed():
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {
            "model": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "progress": {
                **progress_state,
                "world_size": info.world_size,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            },
            "config": cfg,
            "failed_names": failed_names[-1000:],
            "history": history,
            "present_counts": total_present(),
        }

    def save() -> Path | None:
        snap = snapshot()  # collective when distributed: every rank takes part
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(
                snap, out, progress_state["global_step"], int(t_cfg["keep_checkpoints"])
            )
        fdist.barrier()
        return path

    def agree(flag: bool) -> bool:
        if not fdist.is_distributed():
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else contextlib.nullcontext()
    )

    try:
        done = progress_state["global_step"] >= total_steps
        while not done and progress_state["epoch"] < int(t_cfg["epochs"]):
            epoch = progress_state["epoch"]
            sampler = GlobalBatchSampler(
                n, per_rank, info.world_size, info.rank, seed, epoch, start_step=progress_state["micro_step"]
            )
            loader = torch.utils.data.DataLoader(
                samples,
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=int(cfg["data"]["num_workers"]),
                pin_memory=device.type == "cuda",
                # own generator: creating an iterator must not draw from the global torch RNG
                # (that would shift dropout after a resume); augmentation has its own seeds
                generator=torch.Generator().manual_seed(seed + epoch),
            )
            for batch in loader:
                micro = progress_state["micro_step"]
                last_micro = micro + 1 == steps_per_epoch
                boundary = (micro + 1) % accum == 0 or last_micro
                local_n = int(batch["size"])
                counts = torch.tensor([local_n, int(batch["failed"])], dtype=torch.long)
                min_n = local_n
                if fdist.is_distributed():
                    mins = torch.tensor([local_n], dtype=torch.long)
                    torch.distributed.all_reduce(mins, op=torch.distributed.ReduceOp.MIN)
                    min_n = int(mins.item())
                    torch.distributed.all_reduce(counts)
                progress_state["failed"] += int(counts[1])
                failed_names.extend(batch["failed_names"])
                if local_n:
                    present_counts += batch["present"].sum(0).long()
                if min_n > 0:
                    image = batch["image"].to(device, non_blocking=True)
                    labels = batch["labels"].to(device, non_blocking=True)
                    present = batch["present"].to(device)
                    sync = contextlib.nullcontext() if (ddp is None or boundary) else ddp.no_sync()
                    with sync:
                        with autocast:
                            res = wrapped(image, labels, present, batch["texts"], batch["reports"])
                        peer = None
                        if "peer_image" in res:
                            peer = PeerEmbeddings(res["peer_image"], res["peer_text"], res["peer_tau"])
                        # the batch's targets, moved once for the model's and the peer's loss
                        targets = tuple(batch[k].to(device) for k in ("abnormal", "text_ids", "finding_ids"))
                        if cfg["objective"] == "global_clip":
                            b = res["image"].shape[0]
                            ids = torch.arange(b, device=device)[:, None]
                            lo = loss_fn(
                                res["image"],
                                res["text"],
                                res["present"],
                                res["present"],
                                ids,
                                ids,
                                res["tau"],
                            )
                        else:
                            lo = loss_fn(
                                res["image"], res["text"], res["present"], *targets, res["tau"], peer=peer
                            )
                        total = lo.loss
                        if peer is not None:  # the peer learns from the model in turn
                            lo_peer = loss_fn(
                                res["peer_image"],
                                res["peer_text"],
                                res["present"],
                                *targets,
                                res["peer_tau"],
                                peer=PeerEmbeddings(res["image"], res["text"], res["tau"]),
                            )
                            total = total + lo_peer.loss
                        scaler.scale(total / accum).backward()
                    window["loss"] += float(lo.loss.detach())
                    window["n"] += 1
                    per = lo.per_anatomy.double()
                    used = (~lo.skipped).double()
                    window["per"] = per if window["per"] is None else window["per"] + per
                    window["per_n"] = used if window["per_n"] is None else window["per_n"] + used
                window["samples"] += int(counts[0])
                progress_state["samples_seen"] += int(counts[0])
                progress_state["micro_step"] = micro + 1
                if not boundary:
                    continue

                # ------------------------------------------------ optimizer step
                if t_cfg["clip_grad_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), float(t_cfg["clip_grad_norm"]))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                for m in objective.models():
                    m.clamp_temperature_()
                progress_state["global_step"] += 1
                step = progress_state["global_step"]
                if last_micro:
                    progress_state["epoch"] += 1
                    progress_state["micro_step"] = 0

                if info.is_main:
                    now = time.perf_counter()
                    mean_loss = window["loss"] / max(1, window["n"])
                    sps = window["samples"] / max(1e-9, now - window["t"])
                    per_anat = {}
                    if window["per"] is not None:
                        for j, name in enumerate(anatomies):
                            if window["per_n"][j] > 0:
                                per_anat[name] = float(window["per"][j] / window["per_n"][j])
                    last_info = {
                        "step": step,
                        "total_steps": total_steps,
                        "epoch": progress_state["epoch"],
                        "loss": mean_loss,  # mean over the steps since the last log line
                        "lr": lr,
                        "temperature": float(objective.model.temperature.detach()),
                        "samples_per_s": sps,
                        "elapsed_s": elapsed_before + now - t_start,
                        "per_anatomy": per_anat,
                        "failed_samples": progress_state["failed"],
                    }
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:.1f}")
                    if progress is not None:
                        progress(dict(last_info))

                # ------------------------------------------------ stop? checkpoint? log?
                over_budget = budget_s is not None and time.perf_counter() - t_start >= budget_s
                asked = bool(should_stop()) if should_stop is not None else False
                reason = agree(stop.sigterm) and "terminated"
                if not reason and agree(info.is_main and (over_budget or asked)):
                    reason = "stopped"
                if step >= total_steps:
                    done = True
                if reason:
                    status = reason
                    done = True
                if done or step % int(t_cfg["log_every"]) == 0:
                    if info.is_main:
                        history.append([step, last_info["loss"]])
                        if writer is not None:
                            writer.add_scalar("loss/total", last_info["loss"], step)
                            for name, v in last_info["per_anatomy"].items():
                                writer.add_scalar(f"loss/{name}", v, step)
                            writer.add_scalar("temperature", last_info["temperature"], step)
                            writer.add_scalar("lr", lr, step)
                            writer.add_scalar("samples_per_s", last_info["samples_per_s"], step)
                            writer.add_scalar("failed_samples", progress_state["failed"], step)
                    window.update(loss=0.0, n=0, samples=0, t=time.perf_counter(), per=None, per_n=None)
                if done or step % int(t_cfg["checkpoint_every"]) == 0:
                    save()
                if done:
                    break
            if progress_state["global_step"] >= total_steps:
                done = True
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - t_start
    seen = max(1, progress_state["samples_seen"])
    present_fraction = {a: float(c) / seen for a, c in zip(model_cfg.anatomies, total_present().tolist())}
    rare = [a for a, f in present_fraction.items() if f < 0.05]
    if rare and info.is_main and cfg["objective"] == "fvlm" and progress_state["samples_seen"]:
        log.warning(
            "anatomies intact in under 5%% of the training crops (so hardly trained): %s. A crop face "
            "cuts them: raise data.crop_size (the model window) or check the cache's segmentations",
            ", ".join(f"{a} {present_fraction[a]:.0%}" for a in rare),
        )
    model_dir = None
    if info.is_main and save_model and status != "terminated":
        model_dir = str(objective.model.save_pretrained(out / "model"))
    fdist.barrier()
    summary = {
        "status": status,
        "steps": progress_state["global_step"],
        "total_steps": total_steps,
        "epochs_completed": progress_state["epoch"],
        "samples_seen": progress_state["samples_seen"],
        "seconds": seconds,
        "samples_per_s": progress_state["samples_seen"] / seconds if seconds > 0 else 0.0,
        "final_loss": float(history[-1][1]) if history else None,  # mean of the last log window
        "last": last_info,
        "failed_samples": progress_state["failed"],
        "failed_names": failed_names[:50],
        "present_fraction": present_fraction,
        "world_size": info.world_size,
        "precision": precision,
        "device": str(device),
        "objective": cfg["objective"],
        "model_dir": model_dir,
        "checkpoint": str(ckpt.checkpoint_dir(out) / ckpt.LAST),
        "loss_history": history,
    }
    if info.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    summary["model"] = objective.model  # in-memory only (not in summary.json)
    if info.is_main:
        if writer is not None:
            writer.close()
        if status == "terminated":
            log.warning("terminated by SIGTERM at step %d; checkpoint saved", progress_state["global_step"])
    if created_group and fdist.launched_by_torchrun():
        # free DDP before the process group: a Reducer that outlives the group destroys it from
        # the main thread, which can deadlock with gloo's worker thread (it needs the GIL)
        ddp = wrapped = None
        import gc

        gc.collect()
        fdist.cleanup_distributed()
    return summary


# =============================================================================================
# Command line
# =============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help=f"training recipe: a YAML file or a bundled name ({', '.join(available_recipes())})",
    )
    parser.add_argument("--out", required=True, help="run folder (checkpoints, tb/, summary.json, model/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe entry, e.g. --set optim.lr=1e-4 --set data.cache=cache/ (repeatable)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default="auto",
        metavar="CHECKPOINT",
        help="resume from OUT's last checkpoint (default when one exists) or from CHECKPOINT",
    )
    group.add_argument("--fresh", action="store_true", help="ignore any checkpoint in OUT and start over")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="wall-clock budget of the training loop"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.print_config:
        print(yaml.safe_dump(load_train_config(args.config, args.overrides), sort_keys=False))
        return 0
    resume: Any = False if args.fresh else args.resume
    summary = train(
        args.config,
        args.out,
        overrides=args.overrides,
        resume=resume,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"fvlm train: {summary['status']} after {summary['steps']} steps "
            f"({summary['samples_per_s']:.1f} samples/s, final loss {summary['final_loss']}, "
            f"{summary['failed_samples']} failed samples)"
        )
        print(f"  summary: {Path(args.out) / 'summary.json'}")
        print(f"  checkpoint: {summary['checkpoint']}")
        if summary["model_dir"]:
            print(f"  model: {summary['model_dir']}")
    return 0


if __name__ == "__main__":
    from fvlm_training.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
