"""Distributed training: 2 processes (gloo, CPU, DistributedDataParallel) each taking half of
every global batch end with the weights of 1 process trained on the whole global batch, and
the ranks agree exactly."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_train import assert_same_weights, phantom_samples, train_config, weights

from training.train import train

pytestmark = pytest.mark.distributed

WORLD = 2


def _config(batch_size: int) -> dict:
    cfg = train_config(epochs=1, batch_size=batch_size, max_steps=3, checkpoint_every=2)
    cfg["model"]["pool_dropout"] = 0.0  # dropout streams differ per rank by design
    return cfg


def _worker(rank: int, init_file: str, out_dir: str, samples: list) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = train(_config(batch_size=2), f"{out_dir}/ddp", dataset=samples)
        assert res["world_size"] == WORLD and res["steps"] == 3
        torch.save(weights(res["model"]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_like_one(tmp_path):
    torch.set_num_threads(1)
    samples = phantom_samples(12, size=40)
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
