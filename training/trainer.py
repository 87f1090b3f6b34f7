"""The training loop: a small trainer over one objective (setup, restore, step, log, checkpoint,
summarize).

Distributed semantics: each of the ``W`` ranks takes ``train.batch_size`` samples of every
global batch (see :class:`fvlm_core.data.samples.GlobalBatchSampler`); the objective's loss
gathers all ranks' embeddings (global negatives) and every rank computes the global loss; DDP's
gradient average then equals the single-process gradient of the global batch
(``fvlm_core.distributed``). Gradient accumulation sums ``train.grad_accum`` micro-batch
gradients (scaled by 1/accum) before an optimizer step; negatives come from one micro-batch, so
it is not equivalent to a larger batch for a contrastive loss.

Exactness: a run that is killed (or preempted) and resumed ends with the same weights as an
uninterrupted one: the checkpoint holds the data position and every RNG state, augmentation is
seeded per sample, and frozen text features are encoded once before training
(:meth:`fvlm_training.objectives.Objective.warm_text_caches`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fvlm_core import distributed as fdist
from fvlm_core.atomic import atomic_write_text
from fvlm_core.data.cache import CacheSamples
from fvlm_core.data.samples import AugmentConfig, GlobalBatchSampler, TrainingSamples, collate
from fvlm_core.devices import resolve_device
from fvlm_core.errors import CheckpointError, ConfigError, DataError
from fvlm_training import checkpointing as ckpt
from fvlm_training.objectives import StepLoss, build_objective
from fvlm_training.precision import resolve_precision
from fvlm_training.recipe import Recipe, check_resume_compatible
from fvlm_training.schedule import WarmupCosineLR

log = logging.getLogger("fvlm.train")


@dataclass
class Progress:
    """Where a run is (saved in every checkpoint as ``progress``)."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_step: int = 0  # micro-batches into the current epoch
    samples_seen: int = 0
    failed: int = 0


class _LogWindow:
    """Loss, per-anatomy loss and samples since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.samples, self.t = 0.0, 0, 0, time.perf_counter()
        self.per: torch.Tensor | None = None
        self.per_n: torch.Tensor | None = None
        self.scalars: dict[str, list[float]] = {}

    def add(self, step_loss: StepLoss) -> None:
        lo = step_loss.logged
        self.loss += float(lo.loss.detach())
        self.n += 1
        for k, v in step_loss.scalars.items():
            self.scalars.setdefault(k, []).append(float(v))
        per, used = lo.per_anatomy.double(), (~lo.skipped).double()
        self.per = per if self.per is None else self.per + per
        self.per_n = used if self.per_n is None else self.per_n + used

    def per_entry(self, names: Sequence[str]) -> dict[str, float]:
        if self.per is None:
            return {}
        return {n: float(self.per[j] / self.per_n[j]) for j, n in enumerate(names) if self.per_n[j] > 0}

    def scalar_means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.scalars.items() if v}


class _SigtermFlag:
    """Set by SIGTERM (a preempting scheduler): the loop saves a checkpoint after the current step."""

    def __init__(self) -> None:
        self.set = False
        self.previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            self.set = True
            log.warning("SIGTERM received: saving a checkpoint at the end of this step")

        signal.signal(signal.SIGTERM, handler)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def param_groups(
    module: torch.nn.Module, weight_decay: float, decay_all: bool = False
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay except on biases, norms, the temperature, queries and position
    embeddings (``decay_all``: on every parameter, as the public code's AdamW over
    ``model.parameters()``); frozen parameters left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if decay_all:
            decay.append(p)
        elif p.ndim < 2 or name.endswith(("temp", "query_tokens", "position_embeddings")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_dataset(recipe: Recipe):
    """The recipe's ``data.cache`` (a ``fvlm prepare`` folder) as samples."""
    cache = recipe.data.cache
    if not cache:
        raise ConfigError(
            "no training data: set data.cache to a folder written by `fvlm prepare` "
            "(e.g. --set data.cache=cache/), or pass dataset= to fvlm_training.train.train()"
        )
    if not Path(cache).is_dir():
        raise DataError(f"data.cache={cache!r} is not a folder; run `fvlm prepare ... --out {cache}` first")

    return CacheSamples(cache, reconstruction=recipe.data.reconstruction)


class Trainer:
    """One training run of ``recipe`` into ``out`` (see :func:`fvlm_training.train.train`).

    ``run(resume)`` sets everything up, restores a checkpoint if there is one, trains until the
    epochs, ``max_steps``, the wall-clock budget (``max_minutes`` from the loop's start, or the
    absolute ``deadline``, a ``time.time()`` value), a SIGTERM or ``should_stop`` end it, and
    returns the summary.
    """

    def __init__(
        self,
        recipe: Recipe,
        out: str | os.PathLike,
        *,
        dataset: Sequence[Any] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
        ready: Callable[[], None] | None = None,
        save_model: bool = True,
    ) -> None:
        self.recipe, self.opts = recipe, recipe.train
        self.out = Path(out)
        self.dataset = dataset
        self.progress_callback = progress
        self.should_stop = should_stop
        self.deadline = deadline
        self.ready = ready
        self.save_model = save_model
        self.progress = Progress()
        self.failed_names: list[str] = []
        self.history: list[list[float]] = []
        self.last_info: dict[str, Any] = {}
        self.status = "completed"
        self.elapsed_before = 0.0
        self.sigterm = _SigtermFlag()
        self.writer = self.bar = None
        self.ddp = None

    # ================================================================================= setup
    def setup_process(self) -> None:
        """Process group, device, threads, determinism and precision."""
        self.created_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        fdist.init_distributed()
        self.dist = fdist.dist_info() if fdist.is_distributed() else fdist.DistInfo()
        self.device = resolve_device(self.opts.device, local_rank=self.dist.local_rank)
        if self.device.type == "cpu" and self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        if self.opts.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.precision = resolve_precision(self.opts.precision, self.device)

    def find_checkpoint(self, resume: bool | str | os.PathLike | None) -> dict[str, Any] | None:
        """The checkpoint state to resume from (checked against the recipe), or None."""
        path: Path | None = None
        if resume in ("auto", None):
            path = ckpt.last_checkpoint(self.out)
        elif resume is True:
            path = ckpt.last_checkpoint(self.out)
            if path is None:
                raise CheckpointError(
                    f"--resume: {self.out} holds no checkpoint (checkpoints/last.pt) to resume from"
                )
        elif resume is not False:
            path = Path(resume)
        self.checkpoint_path = path
        if path is None:
            return None
        state = ckpt.load_checkpoint(path)
        old_world = int(state["progress"]["world_size"])
        check_resume_compatible(state["config"], self.recipe, old_world, self.dist.world_size)
        return state

    def setup_model(self) -> None:
        """Seeds, the objective (its models and loss), DDP."""
        seed = self.opts.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.model_cfg = self.recipe.model_config()
        self.objective = build_objective(
            self.recipe, self.model_cfg, self.device, self.dist.rank, self.dist.world_size
        )
        if self.opts.grad_checkpointing:
            for m in self.objective.models():
                m.set_grad_checkpointing(True)
        self.objective.train()
        if fdist.is_distributed():
            self.ddp = DDP(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.opts.find_unused_parameters,
            )
        self.wrapped = self.ddp if self.ddp is not None else self.objective

    def setup_data(self) -> None:
        """The dataset, the text caches warmed on it, augmentation and the step counts."""
        base = self.dataset if self.dataset is not None else load_dataset(self.recipe)
        self.objective.warm_text_caches(base)
        n, per_rank = len(base), self.opts.batch_size
        global_batch = per_rank * self.dist.world_size
        if n < global_batch:
            raise DataError(
                f"the dataset has {n} samples, fewer than one global batch ({self.dist.world_size} x "
                f"{per_rank}); lower train.batch_size or add data"
            )
        mc, data = self.model_cfg, self.recipe.data
        augment = AugmentConfig(
            crop_size=tuple(data.crop_size or mc.preprocessing["window_size_zyx"]),
            flip_prob=data.flip_prob,
            random_crop=data.random_crop,
            intact_rule=data.intact_rule,
            hu_window=tuple(mc.preprocessing["hu_window"]),
            pad_offset=data.pad_offset,
        )
        finding_anatomy = {f["name"]: f["anatomy"] for f in mc.findings or []}
        self.samples = TrainingSamples(base, mc.anatomies, finding_anatomy, augment, self.opts.seed)
        self.peer_samples = None  # a co-teaching peer's own stream: other order and augmentation
        if self.objective.peer_seed is not None:
            peer_seed = self.objective.peer_seed
            self.peer_samples = TrainingSamples(base, mc.anatomies, finding_anatomy, augment, peer_seed)
        self.n_samples = n
        self.steps_per_epoch = n // global_batch  # micro-steps
        self.opt_steps_per_epoch = math.ceil(self.steps_per_epoch / self.opts.grad_accum)
        self.total_steps = self.opt_steps_per_epoch * self.opts.epochs
        if self.opts.max_steps is not None:
            self.total_steps = min(self.total_steps, self.opts.max_steps)
        self.present_counts = torch.zeros(len(mc.anatomies), dtype=torch.long)  # this rank's

    def setup_optimizer(self) -> None:
        o = self.recipe.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.objective, o.weight_decay, o.decay_all_parameters),
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
        )
        schedule_total = self.opt_steps_per_epoch * self.opts.epochs  # the schedule ignores budgets
        self.scheduler = WarmupCosineLR(
            self.optimizer,
            o.warmup_steps,
            schedule_total,
            o.min_lr,
            schedule=o.schedule,
            warmup_start_lr=o.warmup_start_lr,
            steps_per_epoch=self.opt_steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from ``state`` (a checkpoint), or seed this rank's dropout stream."""
        if state is None:
            # per-rank streams for dropout; rank 0 keeps the single-process stream
            torch.manual_seed(self.opts.seed + 1_000_003 * self.dist.rank)
            return
        self.objective.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        fields = asdict(self.progress)
        self.progress = Progress(**{k: int(v) for k, v in state["progress"].items() if k in fields})
        self.failed_names = list(state.get("failed_names", []))
        self.history = [list(h) for h in state.get("history", [])]
        if "present_counts" in state and self.dist.is_main:  # rank 0 carries the run's total so far
            self.present_counts = state["present_counts"].long().clone()
        self.elapsed_before = float(state["progress"].get("elapsed_s", 0.0))
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", self.checkpoint_path, self.progress.global_step)

    def setup_logging(self) -> None:
        """The run folder, TensorBoard, the progress bar and ``train_config.yaml`` (rank 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.progress.global_step + 1)
        except Exception as exc:  # tensorboard missing or broken: keep training
            log.warning("TensorBoard logging disabled: %s", exc)
        if self.opts.progress_bar:
            self.bar = tqdm(
                total=self.total_steps, initial=self.progress.global_step, desc="train", unit="step"
            )
        config = yaml.safe_dump(self.recipe.to_dict(), sort_keys=False)
        atomic_write_text(self.out / "train_config.yaml", config)

    # ================================================================================= the loop
    def run(self, resume: bool | str | os.PathLike | None = "auto") -> dict[str, Any]:
        """Set up, restore, train, and return the summary (see :func:`fvlm_training.train.train`).

        A SIGTERM from the start on (set-up included) ends the run after the step in progress (or
        the first one) with a checkpoint, status ``terminated``."""
        self.sigterm.install()
        try:
            self.setup_process()
            state = self.find_checkpoint(resume)
            self.setup_model()
            self.setup_data()
            self.setup_optimizer()
            self.restore(state)
            self.setup_logging()
            if self.ready is not None:
                self.ready()
            self.t_start = time.perf_counter()
            self.steps_at_start = self.progress.global_step
            self.samples_at_start = self.progress.samples_seen
            self.window = _LogWindow()
            done = self.progress.global_step >= self.total_steps
            while not done and self.progress.epoch < self.opts.epochs:
                done = self.run_epoch()
        finally:
            self.sigterm.uninstall()
            if self.bar is not None:
                self.bar.close()
        return self.summarize()

    def batches(self):
        """This rank's ``(batch, peer batch or None)`` pairs of the current epoch, from the
        current position (the peer's stream steps with the model's)."""
        main = self.loader(self.samples, self.opts.seed)
        if self.peer_samples is None:
            return ((b, None) for b in main)
        return zip(main, self.loader(self.peer_samples, self.objective.peer_seed))

    def loader(self, samples: TrainingSamples, seed: int) -> torch.utils.data.DataLoader:
        """This rank's batches of ``samples`` in the current epoch's order for ``seed``, from the
        current position."""
        epoch = self.progress.epoch
        sampler = GlobalBatchSampler(
            self.n_samples,
            self.opts.batch_size,
            self.dist.world_size,
            self.dist.rank,
            seed,
            epoch,
            start_step=self.progress.micro_step,
        )
        return torch.utils.data.DataLoader(
            samples,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.recipe.data.num_workers,
            pin_memory=self.device.type == "cuda",
            # own generator: creating an iterator must not draw from the global torch RNG
            # (that would shift dropout after a resume); augmentation has its own seeds
            generator=torch.Generator().manual_seed(seed + epoch),
        )

    def run_epoch(self) -> bool:
        """Train to the end of the epoch or until the run ends; True when the run ends."""
        for batch, peer_batch in self.batches():
            micro = self.progress.micro_step
            last_micro = micro + 1 == self.steps_per_epoch
            boundary = (micro + 1) % self.opts.grad_accum == 0 or last_micro
            self.micro_step(batch, boundary, peer_batch)
            if not boundary:
                continue
            lr = self.optimizer_step(last_micro)
            if self.dist.is_main:
                self.report_step(lr)
            if self.after_step():
                return True
        return self.progress.global_step >= self.total_steps

    def micro_step(
        self, batch: dict[str, Any], boundary: bool, peer_batch: dict[str, Any] | None = None
    ) -> None:
        """Forward and backward of one micro-batch (skipped on every rank when one rank's batch,
        or peer batch, is empty: its samples all failed to load), and the counts of samples and
        failures (of the model's stream)."""
        local_n = int(batch["size"])
        min_n = fdist.min_over_ranks(min(local_n, int(peer_batch["size"])) if peer_batch else local_n)
        counts = fdist.all_reduce_sum(torch.tensor([local_n, int(batch["failed"])], dtype=torch.long))
        self.progress.failed += int(counts[1])
        self.failed_names.extend(batch["failed_names"])
        if local_n:
            self.present_counts += batch["present"].sum(0).long()
        if min_n > 0:
            self.window.add(self.forward_backward(batch, boundary, peer_batch))
        self.window.samples += int(counts[0])
        self.progress.samples_seen += int(counts[0])
        self.progress.micro_step += 1

    def forward_backward(
        self, batch: dict[str, Any], boundary: bool, peer_batch: dict[str, Any] | None = None
    ) -> StepLoss:
        """The objective's loss of ``batch`` (and the peer's batch), backpropagated (gradients
        synchronised across ranks only at an optimizer-step ``boundary``)."""
        device = self.device
        image = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        present = batch["present"].to(device)
        peer_in = None
        if peer_batch is not None:
            peer_in = {k: peer_batch[k].to(device, non_blocking=True) for k in ("image", "labels", "present")}
            peer_in["texts"] = peer_batch["texts"]
        self.objective.set_step(self.progress.global_step)
        sync = contextlib.nullcontext() if (self.ddp is None or boundary) else self.ddp.no_sync()
        with sync:
            with self.autocast():
                if peer_in is None:  # the call as before co-teaching had its own stream
                    out = self.wrapped(image, labels, present, batch["texts"], batch["reports"])
                else:
                    out = self.wrapped(image, labels, present, batch["texts"], batch["reports"], peer_in)
            step_loss = self.objective.loss(out, batch, device, peer_batch)
            self.scaler.scale(step_loss.total / self.opts.grad_accum).backward()
        return step_loss

    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def optimizer_step(self, last_micro: bool) -> float:
        """Clip, step, schedule, clamp the temperatures; returns the learning rate just used."""
        if self.opts.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.opts.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for m in self.objective.models():
            m.clamp_temperature_()
        self.progress.global_step += 1
        if last_micro:
            self.progress.epoch += 1
            self.progress.micro_step = 0
        return lr

    def report_step(self, lr: float) -> None:
        """Rank 0: the step's figures (``last_info``), to the progress bar and the callback."""
        now = time.perf_counter()
        w = self.window
        mean_loss = w.loss / max(1, w.n)
        sps = w.samples / max(1e-9, now - w.t)
        self.last_info = {
            "step": self.progress.global_step,
            "total_steps": self.total_steps,
            "epoch": self.progress.epoch,
            "loss": mean_loss,  # mean over the steps since the last log line
            "lr": lr,
            "temperature": float(self.objective.model.temperature.detach()),
            "samples_per_s": sps,
            "elapsed_s": self.elapsed_before + now - self.t_start,
            "per_anatomy": w.per_entry(self.objective.names),
            "failed_samples": self.progress.failed,
        }
        scalars = w.scalar_means()
        if scalars:  # e.g. co_teaching/agreement, co_teaching/peer_share
            self.last_info["scalars"] = scalars
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:.1f}")
        if self.progress_callback is not None:
            self.progress_callback(dict(self.last_info))

    def stop_reason(self) -> str | None:
        """``terminated`` (SIGTERM on any rank), ``stopped`` (budget, deadline or ``should_stop``
        on rank 0), or None; every rank gets the same answer."""
        if fdist.any_rank(self.sigterm.set):
            return "terminated"
        over_budget = self.opts.max_minutes is not None and (
            time.perf_counter() - self.t_start >= self.opts.max_minutes * 60
        )
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        asked = bool(self.should_stop()) if self.should_stop is not None else False
        if fdist.any_rank(self.dist.is_main and (over_budget or past_deadline or asked)):
            return "stopped"
        return None

    def after_step(self) -> bool:
        """Stop?, log?, checkpoint? after an optimizer step; True when the run ends here."""
        step = self.progress.global_step
        reason = self.stop_reason()
        done = step >= self.total_steps or reason is not None
        if reason is not None:
            self.status = reason
        if done or step % self.opts.log_every == 0:
            self.log(step)
        if done or step % self.opts.checkpoint_every == 0:
            self.checkpoint()
        return done

    def log(self, step: int) -> None:
        """Rank 0: the loss history and TensorBoard scalars; the log window restarts."""
        info = self.last_info
        if self.dist.is_main:
            self.history.append([step, info["loss"]])
            if self.writer is not None:
                self.writer.add_scalar("loss/total", info["loss"], step)
                for name, v in info["per_anatomy"].items():
                    self.writer.add_scalar(f"loss/{name}", v, step)
                for key in ("temperature", "lr", "samples_per_s"):
                    self.writer.add_scalar(key, info[key], step)
                for key, v in info.get("scalars", {}).items():
                    self.writer.add_scalar(key, v, step)
                self.writer.add_scalar("failed_samples", self.progress.failed, step)
        self.window.reset()

    # ================================================================================= checkpoint
    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective when distributed: every rank calls it)."""
        return {
            "model": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": fdist.gather_objects(ckpt.rng_state()),
            "progress": {
                **asdict(self.progress),
                "world_size": self.dist.world_size,
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start,
            },
            "config": self.recipe.to_dict(),
            "failed_names": self.failed_names[-1000:],
            "history": self.history,
            "present_counts": fdist.all_reduce_sum(self.present_counts),
        }

    def checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` (rank 0) once every rank has taken part in the snapshot."""
        snap = self.snapshot()
        if self.dist.is_main:
            ckpt.save_checkpoint(snap, self.out, self.progress.global_step, self.opts.keep_checkpoints)
        fdist.barrier()

    # ================================================================================= the end
    def summarize(self) -> dict[str, Any]:
        """The run summary (written to ``summary.json`` by rank 0); saves the model unless terminated."""
        seconds = time.perf_counter() - self.t_start
        p = self.progress
        present_fraction = self.present_fraction()
        model_dir = None
        if self.dist.is_main and self.save_model and self.status != "terminated":
            model_dir = str(self.objective.model.save_pretrained(self.out / "model"))
        fdist.barrier()
        steps_now, samples_now = p.global_step - self.steps_at_start, p.samples_seen - self.samples_at_start
        summary = {
            "status": self.status,
            "steps": p.global_step,
            "total_steps": self.total_steps,
            "steps_this_run": steps_now,
            "epochs_completed": p.epoch,
            "samples_seen": p.samples_seen,
            "seconds": seconds,
            # of this invocation's loop (None when it took no step, e.g. the run was already done)
            "samples_per_s": samples_now / seconds if steps_now and seconds > 0 else None,
            "final_loss": float(self.history[-1][1]) if self.history else None,  # last log window's mean
            "last": self.last_info,
            "failed_samples": p.failed,
            "failed_names": self.failed_names[:50],
            "present_fraction": present_fraction,
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "device": str(self.device),
            "objective": self.recipe.objective,
            "init_from": self.objective.init_report,  # what a MAE checkpoint initialised (else None)
            "model_dir": model_dir,
            "checkpoint": str(ckpt.checkpoint_dir(self.out) / ckpt.LAST),
            "loss_history": self.history,
        }
        if self.dist.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            if self.writer is not None:
                self.writer.close()
            if self.status == "terminated":
                log.warning("terminated by SIGTERM at step %d; checkpoint saved", p.global_step)
        summary["model"] = self.objective.model  # in-memory only (not in summary.json)
        self.close_group()
        return summary

    def present_fraction(self) -> dict[str, float]:
        """Per anatomy, the fraction of the run's samples in which it was intact (warns on rank 0
        when some are hardly ever intact, so hardly trained)."""
        seen = self.progress.samples_seen
        totals = fdist.all_reduce_sum(self.present_counts).tolist()
        fraction = {a: float(c) / max(1, seen) for a, c in zip(self.model_cfg.anatomies, totals)}
        rare = [a for a, f in fraction.items() if f < 0.05]
        if rare and self.dist.is_main and self.recipe.objective == "fvlm" and seen:
            log.warning(
                "anatomies intact in under 5%% of the training crops (so hardly trained): %s. A crop "
                "face cuts them: raise data.crop_size (the model window) or check the cache's segmentations",
                ", ".join(f"{a} {fraction[a]:.0%}" for a in rare),
            )
        return fraction

    def close_group(self) -> None:
        """Destroy the process group this run created (torchrun), DDP first."""
        if self.created_group and fdist.launched_by_torchrun():
            # free DDP before the process group: a Reducer that outlives the group destroys it from
            # the main thread, which can deadlock with gloo's worker thread (it needs the GIL)
            self.ddp = self.wrapped = None
            gc.collect()
            fdist.cleanup_distributed()
