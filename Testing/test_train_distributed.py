"""Distributed training: 2 processes (gloo, CPU, DistributedDataParallel) each taking half of
every global batch end with the weights of 1 process trained on the whole global batch, and
the ranks agree exactly."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from test_train import assert_same_weights, phantom_samples, train_config, weights

from fvlm_training.train import train

pytestmark = pytest.mark.distributed

WORLD = 2


def _config(batch_size: int) -> dict:
    cfg = train_config(epochs=1, batch_size=batch_size, max_steps=3, checkpoint_every=2)
    cfg["model"]["pool_dropout"] = 0.0  # dropout streams differ per rank by design
    return cfg


def _worker(rank: int, init_file: str, out_dir: str, samples: list) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        res = train(_config(batch_size=2), f"{out_dir}/ddp", dataset=samples)
        assert res["world_size"] == WORLD and res["steps"] == 3
        torch.save(weights(res["model"]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_like_one(tmp_path):
    torch.set_num_threads(1)
    samples = phantom_samples(12, size=28)
    initial = weights(
        train(_config(batch_size=4), tmp_path / "init_only", dataset=samples, max_steps=0)["model"]
    )
    single = train(_config(batch_size=4), tmp_path / "single", dataset=samples)
    assert single["steps"] == 3
    # fork: the children reuse this process's imports (torch, transformers, the model code) and samples
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path), samples), nprocs=WORLD, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert_same_weights(ranks[0], ranks[1], atol=0.0)  # DDP keeps the replicas identical
    # same global batches, same crops and flips, gathered negatives: the same training run
    # up to float summation order
    assert_same_weights(ranks[0], weights(single["model"]), atol=2e-5)
    moved = max(
        float((initial[k] - ranks[0][k]).abs().max()) for k in initial if initial[k].is_floating_point()
    )
    assert moved > 1e-3  # and training did change the weights


@pytest.mark.slow
def test_torchrun_launch_of_the_cli(tmp_path):
    """`torchrun --nproc_per_node=2 -m fvlm_training.cli train ...` (env:// rendezvous, gloo on CPU)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from test_train import PROJECT

    from fvlm_core.data.prepare import prepare_dataset
    from fvlm_core.data.synth import generate_cohort
    from fvlm_core.preprocess import ModelSpaceConfig

    generate_cohort(
        tmp_path / "synth", n=8, seed=1, size_zyx=(32, 32, 32), valid_fraction=0, recon_fraction=0
    )
    space = ModelSpaceConfig(
        spacing_zyx=(12.0, 12.0, 12.0), window_size_zyx=(32, 32, 32), multiple_zyx=(8, 8, 8)
    )
    prepare_dataset(tmp_path / "synth", tmp_path / "cache", config=space, progress=False)
    cfg = _config(batch_size=2)
    cfg["data"]["cache"] = str(tmp_path / "cache")
    cfg["train"]["max_steps"] = 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "fvlm_training.cli", "train"]
    cmd += ["--config", str(recipe), "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT))
    proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["status"] == "completed"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "fvlm train: completed" in proc.stdout and proc.stdout.count("fvlm train: completed") == 1
