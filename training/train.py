"""Pretrain fVLM on a `fvlm prepare` cache (one CPU to many GPUs with torchrun).

Usage::

    fvlm train --config ctrate-base --set data.cache=/data/ctrate_cache --out runs/base
    torchrun --nproc_per_node=4 -m fvlm_training.cli train --config ctrate-base --out runs/base
    fvlm train --config tiny-cpu --set data.cache=cache/ --set optim.lr=3e-4 --out runs/tiny

``--config`` is a recipe YAML (bundled: ``ctrate-base``, ``ctrate-paper``, ``tiny-cpu``; see
training/configs and :mod:`fvlm_training.recipe`); ``--set KEY=VALUE`` overrides any entry
(dotted keys, YAML values). The run folder gets ``checkpoints/last.pt`` (every
``train.checkpoint_every`` optimizer steps and at the end, written atomically), ``tb/``
(TensorBoard scalars), ``summary.json`` and, at the end, the model in ``model/``
(``save_pretrained``; loadable by ``fvlm analyze``). Launching again with the same ``--out``
resumes from the last checkpoint (``--fresh`` starts over). SIGTERM (a scheduler preempting the
job) ends the run after the current step with a checkpoint. A run holds its folder's lock
(:mod:`fvlm_core.locks`): a second run into the same ``--out`` is refused at once, naming the
first (pid, host, start time); the lock of a run that was killed is taken over by the next one.

Exit status: 0 when training ended (all steps done, or stopped by --max-minutes / --max-steps;
the model is in OUT/model); 75 (EX_TEMPFAIL) when SIGTERM interrupted it: preempted, checkpoint
saved, no model written; run the same command again to resume; 2 for an error, with a message
saying what to do (a bad recipe option, missing data or an unusable checkpoint is refused before
training starts).

Python API: :func:`train` (a recipe name, YAML path, mapping or
:class:`~fvlm_training.recipe.Recipe`, a progress callback, a wall-clock budget). The loop is
:class:`fvlm_training.trainer.Trainer`; what is optimised, :mod:`fvlm_training.objectives`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fvlm_core.locks import lock_folder
from fvlm_core.outputs import OutputPlan
from fvlm_training.recipe import Recipe, available_recipes, load_recipe

#: Exit status of ``fvlm train`` after SIGTERM: preempted, checkpoint saved, resume by running it
#: again (``EX_TEMPFAIL`` of sysexits.h: a temporary failure, retry later; not 0, which a
#: scheduler would read as success, nor 2, an error that retrying does not fix).
PREEMPTED_EXIT = 75


def train(
    config: str | os.PathLike | Mapping[str, Any] | Recipe | None,
    out_dir: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    dataset: Sequence[Any] | None = None,
    resume: bool | str | os.PathLike | None = "auto",
    progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_minutes: float | None = None,
    max_steps: int | None = None,
    deadline: float | None = None,
    ready: Callable[[], None] | None = None,
    save_model: bool = True,
) -> dict[str, Any]:
    """Train a model; returns the run summary (also written to ``OUT/summary.json``).

    Args:
        config: recipe name, YAML path, mapping or :class:`Recipe` (:func:`load_recipe`).
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
        deadline: a ``time.time()`` value: stop (with a checkpoint) after the first optimizer
            step that ends past it. Unlike ``max_minutes``, which counts from the start of the
            loop, it includes the set-up (model, data, text encoding).
        ready: called once the set-up is done, right before the first step (e.g. to start the
            loops of several runs together).
        save_model: write ``OUT/model`` (``save_pretrained``) when the loop ends (not on SIGTERM).

    Returns:
        The summary dict: ``status`` (completed | stopped | terminated), ``steps``,
        ``steps_this_run``, ``samples_seen``, ``samples_per_s`` (of this call's steps; None when
        it took none), ``final_loss``, ``failed_samples``, ``model_dir``, ... and ``model``, the
        trained model (an :class:`~fvlm_core.model.FVLM`, or the
        :class:`~fvlm_training.baseline.GlobalCLIP` baseline; not written to JSON).

    Raises:
        ConfigError: a bad recipe key or value (before any work), or a checkpoint trained with
            other options.
        FolderInUse: another run is writing ``out_dir`` (its pid, host and start time are named).
    """
    from fvlm_training.mae_init import require_init_from
    from fvlm_training.trainer import Trainer

    recipe = load_recipe(config, overrides).with_limits(max_minutes, max_steps)  # checked: before any work
    require_init_from(recipe.init_from)
    check_run_folder(recipe, out_dir)
    with run_folder_lock(out_dir):  # a second run into this folder is refused, naming this one
        trainer = Trainer(
            recipe,
            out_dir,
            dataset=dataset,
            progress=progress,
            should_stop=should_stop,
            deadline=deadline,
            ready=ready,
            save_model=save_model,
        )
        return trainer.run(resume)


def run_folder_lock(out_dir: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The run folder's lock (:mod:`fvlm_core.locks`), held by the process that writes the folder:
    rank 0 of a torchrun launch (the other ranks write nothing there)."""
    import torch.distributed as dist

    started = dist.is_available() and dist.is_initialized()  # by the caller: its rank, else torchrun's
    rank = dist.get_rank() if started else int(os.environ.get("RANK", "0"))
    if rank != 0:
        return contextlib.nullcontext()
    return lock_folder(out_dir, "--out", command="fvlm train")


def check_run_folder(recipe: Recipe, out_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a run folder the run could not write (a file in its place or
    above it, a read-only folder, the data or the initial model itself, a folder where a file
    goes): :class:`~fvlm_core.errors.OutputError` naming each problem."""
    from fvlm_training import checkpointing as ckpt

    out = Path(out_dir)
    plan = OutputPlan()
    plan.input("data.cache", recipe.data.cache, contents=False)
    plan.input("init_from", recipe.init_from)
    plan.folder("--out", out)
    plan.check()  # the folder first: what is wrong with it would be wrong for everything in it
    plan.folder("--out (checkpoints)", ckpt.checkpoint_dir(out))
    plan.folder("--out (model)", out / "model")
    plan.file("--out (summary)", out / "summary.json")
    plan.file("--out (recipe)", out / "train_config.yaml")
    plan.check()


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
    parser.epilog = (
        "exit status: 0 training ended (completed, or stopped by its budget; the model is in "
        f"OUT/model); {PREEMPTED_EXIT} preempted by SIGTERM: a checkpoint was saved and no model "
        "written, run the same command again to resume; 2 an error (the message says what to do)."
    )


def _report(summary: dict[str, Any], out: Path) -> None:
    """The result lines of ``fvlm train`` (rank 0)."""
    if summary["steps_this_run"]:
        rate = f"{summary['samples_per_s']:.1f} samples/s, "
    else:
        rate = "no step to take: the run had already reached its end, "
    print(
        f"fvlm train: {summary['status']} after {summary['steps']} steps "
        f"({rate}final loss {summary['final_loss']}, {summary['failed_samples']} failed samples)"
    )
    print(f"  summary: {out / 'summary.json'}")
    print(f"  checkpoint: {summary['checkpoint']}")
    if summary["model_dir"]:
        print(f"  model: {summary['model_dir']}")
    if summary["status"] == "terminated":
        print(f"  preempted (SIGTERM): run the same command again to resume (exit status {PREEMPTED_EXIT})")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.print_config:
        recipe = load_recipe(args.config, args.overrides).with_limits(args.max_minutes, args.max_steps)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
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
        _report(summary, Path(args.out))
    return PREEMPTED_EXIT if summary["status"] == "terminated" else 0


if __name__ == "__main__":
    from fvlm_training.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
