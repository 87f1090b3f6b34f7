"""The demo's training stage: fVLM and the CLIP baseline trained side by side within a time budget.

Each model trains in its own process (spawned; one core and one torch thread each) with the
project's trainer (:func:`fvlm_training.train.train`) until an absolute deadline that includes its
start-up and text encoding, so ``--minutes`` holds however busy the machine is. Here too: the
training precision (:func:`demo_precision`) and how much time to keep for the evaluation after
training (:func:`evaluation_plan`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_training.demo_data import DemoData


@dataclass
class _TrainJob:
    kind: str  # "fvlm" or "clip"
    recipe: dict[str, Any]  # a training recipe mapping (fvlm_training.recipe.Recipe.from_dict)
    data_dir: str  # DemoData.save folder written by the parent
    run_dir: str  # training run folder (checkpoint, TensorBoard, summary)
    out_dir: str  # where the final model is saved
    deadline: float  # time.time() at which training stops (start-up and text encoding included)


def _recipe(kind: str, model_cfg: Any, cfg: Any, seed: int) -> dict[str, Any]:
    """The training recipe of one demo model: the project's trainer, one CPU thread, frozen text."""
    return {
        "model": model_cfg.to_dict(),
        "objective": "fvlm" if kind == "fvlm" else "global_clip",
        "data": {"crop_size": None, "random_crop": True, "flip_prob": 0.2},
        "train": {
            "epochs": 10_000,  # the time budget ends training; the cosine is then ~flat
            "batch_size": cfg.batch_size,
            "seed": seed,
            "threads": 1,
            "precision": cfg.precision,
            "checkpoint_every": 10**9,  # one checkpoint, at the end
            "progress_bar": False,
            "log_every": 10,
        },
        "optim": {
            "lr": cfg.lr,
            "min_lr": cfg.lr * 0.01,
            "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay,
        },
        "loss": {"normal_pairs": True, "same_text": True, "disease_pairs": cfg.disease_pairs},
    }


def _train_worker(job: _TrainJob, progress: Any, start: Any) -> None:
    """Train one model with :func:`fvlm_training.train.train` until ``job.deadline`` and
    ``save_pretrained`` it. Every worker's loop starts when all have set up (``start``, a barrier:
    the baseline encodes more texts), so each model trains for the same time."""
    import threading

    import torch

    from fvlm_training.train import train

    torch.set_num_threads(1)

    def ready() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: go on alone
            start.wait(timeout=max(1.0, job.deadline - time.time()))

    def on_step(info: dict[str, Any]) -> None:
        progress[0] = info.get("step", 0)
        progress[1] = info.get("samples_per_s", 0.0)
        progress[2] = float(info.get("loss", float("nan")))

    parent = os.getppid()
    summary = train(
        job.recipe,
        job.run_dir,
        dataset=DemoData.load(job.data_dir),
        resume=False,
        progress=on_step,
        should_stop=lambda: os.getppid() != parent,  # the demo was killed: stop, do not linger
        deadline=job.deadline,
        ready=ready,
        save_model=False,
    )
    model = summary.pop("model")
    # after the deadline: no prompt encoding here (the parent saves fVLM again, with its thresholds
    # and the stored prompt embeddings, in the time kept for evaluation)
    model.save_pretrained(job.out_dir, store_prompts=False)
    summary["kind"] = job.kind
    summary["temperature"] = float(model.temperature.detach())
    Path(job.out_dir, "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))


def demo_precision(requested: str, model_cfg: Any, batch: int = 2) -> str:
    """``fp32`` or ``bf16`` for the demo's CPU training: ``auto`` times one training step of the
    demo's image encoder (one thread, as the trainers run) in both and picks bf16 only where it
    is clearly faster (CPUs with native bf16); it costs about a second."""
    if requested != "auto":
        return requested
    import torch

    from fvlm_core.model.vision import build_vision_encoder
    from fvlm_training.precision import bf16_is_faster

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        encoder = build_vision_encoder(model_cfg.vision)
        image = torch.rand(batch, 1, *model_cfg.vision.img_size)

        def step() -> None:
            encoder.zero_grad(set_to_none=True)
            encoder(image).final.float().square().mean().backward()

        return "bf16" if bf16_is_faster(step) else "fp32"
    finally:
        torch.set_num_threads(threads)


def cpu_share(seconds: float = 0.5) -> float:
    """The fraction of one CPU core this process gets now (CPU time over wall time of a busy loop),
    in [0.05, 1]: about 1 on an idle machine, 0.5 when another busy process shares its core."""
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        sum(range(1000))
    return min(1.0, max(0.05, (time.process_time() - cpu) / (time.perf_counter() - wall)))


#: Seconds the training processes need after their deadline on an idle machine (the step in
#: progress, the checkpoint, the model folder, exiting): they stop that much before the training
#: stage must end.
FINISH_SECONDS = 8.0

#: Below this share of a core the machine counts as busy (:func:`evaluation_plan`).
BUSY_SHARE = 0.9


def evaluation_plan(cfg: Any, log: Callable[[str], None]) -> tuple[float, int]:
    """Seconds to keep after training for evaluation and outputs, and the torch threads to
    evaluate with: ``cfg.reserve_seconds`` (what they take on an idle machine) stretched by how
    busy the machine is now (:func:`cpu_share`), so ``--minutes`` holds; one thread when busy,
    because OpenMP threads that must wait for a core wait for each other at every operation
    (measured: a text encoding 10-20x slower with 2 threads than with 1 on 2 loaded cores)."""
    import torch

    share = cpu_share()
    if share >= BUSY_SHARE:
        return cfg.reserve_seconds, torch.get_num_threads()
    reserve = cfg.reserve_seconds / share
    log(f"this machine is busy (the demo gets {share:.0%} of a core): keeping {reserve:.0f} s for evaluation")
    return reserve, 1


def _watch_training(procs: dict[str, Any], progress: dict[str, Any], stop_at: float) -> None:
    """Show the training processes' steps and losses until all have ended (``stop_at``: their
    ``time.time()`` deadline)."""
    from tqdm import tqdm

    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}"
    t_train = time.time()
    with tqdm(total=max(1, int(stop_at - t_train)), desc="training", unit="s", bar_format=fmt) as bar:
        while any(p.is_alive() for p in procs.values()):
            time.sleep(1.0)
            bar.n = min(bar.total, int(time.time() - t_train))
            bar.set_postfix_str(
                "  ".join(f"{k}: step {int(v[0])} loss {v[2]:.3f}" for k, v in progress.items()),
                refresh=False,
            )
            bar.refresh()


def train_models(
    cfg: Any,
    model_cfg: Any,
    train: DemoData,
    out: Path,
    deadline: float,
    log: Callable[[str], None],
    finish_s: float = 0.0,
) -> tuple[Path, Path | None]:
    """Stage 2: train fVLM and the CLIP baseline side by side with the project's trainer, one core
    each, until ``deadline`` (a ``time.perf_counter()`` value; their loops stop ``finish_s``
    earlier, for what they do after it); returns the model folders (fVLM, baseline or None).

    The workers get that end as an absolute time, so their start-up and the text encoding (once,
    with the frozen MiniLM; the baseline has more: one report per phantom) count against it however
    long they take on a busy machine. Their loops start together, once both have set up.
    """
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    from fvlm_core.errors import FVLMError

    kinds = ["fvlm"] + (["clip"] if cfg.baseline else [])
    stop_at = time.time() + (deadline - time.perf_counter()) - finish_s
    if stop_at - time.time() < 30:
        log(
            f"only {max(0.0, stop_at - time.time()):.0f} s of the {cfg.minutes:g}-minute budget are left for "
            "training: little training will happen; give more --minutes (or fewer phantoms)"
        )
    data_dir = Path(tempfile.mkdtemp(prefix=".demo-data-", dir=out))
    procs: dict[str, Any] = {}
    model_dir, baseline_dir = out / "model", (out / "baseline" if cfg.baseline else None)
    try:
        train.save(data_dir)
        ctx = mp.get_context("spawn")
        start = ctx.Barrier(len(kinds))
        progress = {}
        for i, kind in enumerate(kinds):
            progress[kind] = ctx.Array("d", 3)
            job = _TrainJob(
                kind=kind,
                recipe=_recipe(kind, model_cfg, cfg, seed=cfg.seed + 10 + i),
                data_dir=str(data_dir),
                run_dir=str(out / "runs" / kind),
                out_dir=str(model_dir if kind == "fvlm" else baseline_dir),
                deadline=stop_at,
            )
            procs[kind] = ctx.Process(target=_train_worker, args=(job, progress[kind], start), daemon=True)
            procs[kind].start()
        log(
            f"training {' and '.join(kinds)} for {stop_at - time.time():.0f} s (one core each), "
            "text encoding included"
        )
        _watch_training(procs, progress, stop_at)
        failed = [k for k, p in procs.items() if p.exitcode != 0]
        if failed:
            raise FVLMError(f"demo training of {', '.join(failed)} failed (see the messages above).")
    finally:
        for p in procs.values():  # interrupted (Ctrl-C, an error): no training process outlives the demo
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)
    return model_dir, baseline_dir
