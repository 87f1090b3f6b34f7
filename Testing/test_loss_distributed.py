"""Global negatives across processes: 2 ranks (gloo, CPU), each holding part of the batch and a
loss told its rank and the world size, give the loss and, after DistributedDataParallel's
gradient averaging, the gradients of one process holding the whole batch (fvlm_core.distributed
docstring explains why); a loss built for one process computes the local batch's loss even
inside a process group."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fvlm_core.loss import FineGrainedContrastiveLoss, PeerEmbeddings, finding_set_id, stable_text_id

pytestmark = pytest.mark.distributed

WORLD = 2
B, A, DIN, D = 8, 3, 6, 4
# rank 0 holds rows [0, split), rank 1 the rest; equal halves and an uneven split
SPLITS = {"halves": 4, "uneven": 3}


class _Tiny(nn.Module):
    """Two projections and a learned temperature: enough to check parameter gradients."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = nn.Linear(DIN, D)
        self.txt = nn.Linear(DIN, D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.log_tau = nn.Parameter(torch.tensor(0.07).log())

    def forward(self, xi, xt):
        return F.normalize(self.img(xi), dim=-1), F.normalize(self.txt(xt), dim=-1), self.log_tau.exp()


def _batch():
    g = torch.Generator().manual_seed(42)
    xi, xt = torch.randn(B, A, DIN, generator=g), torch.randn(B, A, DIN, generator=g)
    present = torch.rand(B, A, generator=g) < 0.85
    abnormal = torch.rand(B, A, generator=g) < 0.5
    abnormal[0] = True
    present[0] = True
    texts = [
        ["normal." if not abnormal[i, j] else f"finding {(i + j) % 3}." for j in range(A)] for i in range(B)
    ]
    text_ids = torch.tensor([[stable_text_id(t) for t in row] for row in texts])
    finding_ids = torch.tensor(
        [[finding_set_id({f"F{(i * j) % 2}"}) if abnormal[i, j] else -1 for j in range(A)] for i in range(B)]
    )
    peer = F.normalize(torch.randn(2, B, A, D, generator=g), dim=-1)
    return xi, xt, present, abnormal, text_ids, finding_ids, peer


def _step(model, rows, loss_fn):
    xi, xt, present, abnormal, text_ids, finding_ids, peer = _batch()
    img, txt, tau = model(xi[rows], xt[rows])
    img.retain_grad()
    txt.retain_grad()
    out = loss_fn(
        img,
        txt,
        present[rows],
        abnormal[rows],
        text_ids[rows],
        finding_ids[rows],
        tau,
        peer=PeerEmbeddings(peer[0][rows], peer[1][rows], 0.1),
    )
    out.loss.backward()
    return out, img.grad, txt.grad


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        results = {}
        for name, split in SPLITS.items():
            rows = slice(0, split) if rank == 0 else slice(split, B)
            model = DDP(_Tiny())
            loss_fn = FineGrainedContrastiveLoss(disease_pairs=0.5, rank=rank, world_size=WORLD)
            out, gi, gt = _step(model, rows, loss_fn)
            results[name] = {
                "loss": out.loss.detach(),
                "per_anatomy": out.per_anatomy,
                "grad_img": gi,
                "grad_txt": gt,
                **{f"param.{k}": p.grad.detach().clone() for k, p in model.module.named_parameters()},
            }
            # told nothing about the group, the loss is the local batch's (no collective is entered)
            local = FineGrainedContrastiveLoss(disease_pairs=0.5)
            results[name]["local_loss"] = _step(_Tiny(), rows, local)[0].loss.detach()
            # free DDP while the process group lives (a Reducer outliving it can deadlock gloo)
            del model, out, gi, gt
            gc.collect()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    # fork: the children need no re-import of torch and this module (keeps the test fast)
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    torch.set_num_threads(1)
    single_model = _Tiny()
    single, gi, gt = _step(single_model, slice(0, B), FineGrainedContrastiveLoss(disease_pairs=0.5))
    assert not single.skipped.all()
    for name, split in SPLITS.items():
        for r, res in enumerate(ranks):
            res = res[name]
            rows = slice(0, split) if r == 0 else slice(split, B)
            # every rank computes the full global loss
            assert res["loss"].item() == pytest.approx(single.loss.item(), abs=1e-5)
            torch.testing.assert_close(res["per_anatomy"], single.per_anatomy, atol=1e-5, rtol=0)
            # all_gather's backward hands each rank W x the gradient of its own rows ...
            torch.testing.assert_close(res["grad_img"], WORLD * gi[rows], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res["grad_txt"], WORLD * gt[rows], atol=1e-5, rtol=1e-5)
            # ... so after DDP's averaging the parameter gradients equal the single process's
            for k, p in single_model.named_parameters():
                torch.testing.assert_close(res[f"param.{k}"], p.grad, atol=1e-5, rtol=1e-5)
            local = _step(_Tiny(), rows, FineGrainedContrastiveLoss(disease_pairs=0.5))[0].loss
            assert res["local_loss"].item() == pytest.approx(local.item(), abs=1e-6)
