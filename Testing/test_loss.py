"""The fine-grained contrastive loss: hand-computed values for every target term, equality
with plain per-anatomy CLIP and with the reference (LAVIS) algorithm, gradients, skip rules."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm_core.loss import (
    UNKNOWN_FINDING_SET,
    FineGrainedContrastiveLoss,
    PeerEmbeddings,
    finding_set_id,
    stable_text_id,
)

torch.set_num_threads(1)

# Three unit vectors in D=2 with tau=1: S = v t^T has rows [1,0,-1], [0,1,0], [-1,0,1].
V3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
S3 = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]

ALL_OFF = dict(normal_pairs=False, same_text=False, disease_pairs=0.0, skip_without_abnormal=False)


def _hand_loss(s: list[list[float]], targets: list[list[float]], targets_t=None) -> float:
    """(CE(S, T) + CE(S^T, T^t)) / 2 computed with plain math (no torch)."""
    targets_t = targets_t if targets_t is not None else [list(r) for r in zip(*targets)]

    def ce(mat, tgt):
        total = 0.0
        for row, trow in zip(mat, tgt):
            lse = math.log(sum(math.exp(x) for x in row))
            total += -sum(t * (x - lse) for t, x in zip(trow, row))
        return total / len(mat)

    s_t = [list(r) for r in zip(*s)]
    return (ce(s, targets) + ce(s_t, targets_t)) / 2


def _one_anatomy(abnormal, texts=None, findings=None, present=None, v=V3, t=V3):
    """Inputs for A=1 with the given per-sample flags."""
    n = v.shape[0]
    texts = texts if texts is not None else [f"text {i}" for i in range(n)]
    findings = findings if findings is not None else [UNKNOWN_FINDING_SET] * n
    present = present if present is not None else [True] * n
    return dict(
        image=v[:, None, :].clone(),
        text=t[:, None, :].clone(),
        present=torch.tensor(present)[:, None],
        abnormal=torch.tensor(abnormal)[:, None],
        text_ids=torch.tensor([stable_text_id(x) for x in texts])[:, None],
        finding_ids=torch.tensor(findings, dtype=torch.long)[:, None],
        temperature=1.0,
    )


def test_identity_targets_hand_computed():
    loss = FineGrainedContrastiveLoss(**ALL_OFF)
    out = loss(**_one_anatomy([False, False, True]))
    eye = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    assert out.loss.item() == pytest.approx(_hand_loss(S3, eye), abs=1e-6)
    # and the 2-sample case in closed form: each row is -log(e / (e + 1)) = log(1 + 1/e)
    out2 = loss(**_one_anatomy([True, False], v=V3[:2], t=V3[:2]))
    assert out2.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_normal_pairs_hand_computed():
    loss = FineGrainedContrastiveLoss(normal_pairs=True, same_text=False, disease_pairs=0.0)
    out = loss(**_one_anatomy([False, False, True]))  # samples 0, 1 normal; 2 abnormal
    tgt = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]]
    assert out.loss.item() == pytest.approx(_hand_loss(S3, tgt), abs=1e-6)
    off = FineGrainedContrastiveLoss(normal_pairs=False, same_text=False, disease_pairs=0.0)
    assert off(**_one_anatomy([False, False, True])).loss.item() != pytest.approx(out.loss.item())


def test_same_text_hand_computed():
    loss = FineGrainedContrastiveLoss(normal_pairs=False, same_text=True, disease_pairs=0.0)
    out = loss(**_one_anatomy([True, True, True], texts=["effusion.", "nodule.", "effusion."]))
    tgt = [[0.5, 0, 0.5], [0, 1.0, 0], [0.5, 0, 0.5]]
    assert out.loss.item() == pytest.approx(_hand_loss(S3, tgt), abs=1e-6)


def test_normal_and_same_text_is_a_union_as_in_the_reference():
    # two normal samples with the same text: the pair counts once (reference: bool(sum)), not twice
    loss = FineGrainedContrastiveLoss(normal_pairs=True, same_text=True, disease_pairs=0.0)
    out = loss(**_one_anatomy([False, False, True], texts=["normal.", "normal.", "x"]))
    tgt = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]]
    assert out.loss.item() == pytest.approx(_hand_loss(S3, tgt), abs=1e-6)


def test_disease_pairs_hand_computed():
    a, b = finding_set_id({"Emphysema", "Lung nodule"}), finding_set_id(["Lung nodule", "Emphysema"])
    assert a == b
    loss = FineGrainedContrastiveLoss(normal_pairs=False, same_text=False, disease_pairs=0.5)
    out = loss(**_one_anatomy([True, True, True], findings=[a, b, finding_set_id({"Emphysema"})]))
    tgt = [[2 / 3, 1 / 3, 0], [1 / 3, 2 / 3, 0], [0, 0, 1.0]]
    assert out.loss.item() == pytest.approx(_hand_loss(S3, tgt), abs=1e-6)
    # unknown finding sets never pair; normal samples never pair through this term
    unknown = loss(**_one_anatomy([True, True, True], findings=[-1, -1, a]))
    normal = loss(**_one_anatomy([False, False, True], findings=[a, a, b]))
    eye = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    assert unknown.loss.item() == pytest.approx(_hand_loss(S3, eye), abs=1e-6)
    assert normal.loss.item() == pytest.approx(_hand_loss(S3, eye), abs=1e-6)


def test_co_teaching_hand_computed():
    # the peer maps everything to one vector: its similarity rows are uniform (1/3 each), so the
    # abnormal rows' targets become 0.5 * T + 0.5 / 3; the normal rows keep T.
    loss = FineGrainedContrastiveLoss(
        normal_pairs=True, same_text=False, disease_pairs=0.0, co_teaching_alpha=0.5
    )
    same = torch.tensor([[0.6, 0.8]]).repeat(3, 1)[:, None, :]
    peer = PeerEmbeddings(image=same, text=same, temperature=0.1)
    out = loss(**_one_anatomy([False, False, True]), peer=peer)
    u = 1 / 3
    tgt = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5 * u, 0.5 * u, 0.5 + 0.5 * u]]
    # both directions mix the abnormal (row 2) rows: text->image rows are the same numbers
    assert out.loss.item() == pytest.approx(_hand_loss(S3, tgt, targets_t=tgt), abs=1e-6)
    # alpha = 1 switches it off
    off = FineGrainedContrastiveLoss(
        normal_pairs=True, same_text=False, disease_pairs=0.0, co_teaching_alpha=1.0
    )
    plain = FineGrainedContrastiveLoss(normal_pairs=True, same_text=False, disease_pairs=0.0)
    inputs = _one_anatomy([False, False, True])
    assert off(**inputs, peer=peer).loss.item() == pytest.approx(plain(**inputs).loss.item(), abs=1e-7)
    # a per-call weight (the trainer's ramp) overrides the constructor's: 0.75 own, 0.25 peer
    tgt = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0.25 * u, 0.25 * u, 0.75 + 0.25 * u]]
    ramped = loss(**inputs, peer=peer, alpha=0.75)
    assert ramped.loss.item() == pytest.approx(_hand_loss(S3, tgt, targets_t=tgt), abs=1e-6)
    assert loss(**inputs, peer=peer, alpha=1.0).loss.item() == pytest.approx(
        plain(**inputs).loss.item(), abs=1e-7
    )
    with pytest.raises(ValueError, match="alpha"):
        loss(**inputs, peer=peer, alpha=1.5)


def test_co_teaching_peer_gets_no_gradient():
    loss = FineGrainedContrastiveLoss()
    inp = _random_batch(6, 2, 4, seed=3)
    inp.pop("texts")
    inp["present"][:] = True
    inp["abnormal"][0] = True
    pi = torch.nn.functional.normalize(torch.randn(6, 2, 4), dim=-1).requires_grad_(True)
    pt = torch.nn.functional.normalize(torch.randn(6, 2, 4), dim=-1).requires_grad_(True)
    out = loss(**inp, peer=PeerEmbeddings(pi, pt, torch.tensor(0.07)))
    out.loss.backward()
    assert pi.grad is None and pt.grad is None
    assert torch.isfinite(inp["image"].grad).all()


def _random_batch(b, a, d, seed, p_present=0.8, p_abnormal=0.4, grad=True):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, a, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, a, d, generator=g), dim=-1)
    if grad:
        image.requires_grad_(True)
        text.requires_grad_(True)
    present = torch.rand(b, a, generator=g) < p_present
    abnormal = torch.rand(b, a, generator=g) < p_abnormal
    pool = ["no abnormality.", "effusion.", "nodule.", "emphysema."]
    texts = [[pool[0] if not abnormal[i, j] else pool[1 + (i + j) % 3] for j in range(a)] for i in range(b)]
    fsets = [{"Effusion"}, {"Nodule"}, {"Nodule", "Effusion"}, set()]
    return dict(
        image=image,
        text=text,
        present=present,
        abnormal=abnormal,
        text_ids=torch.tensor([[stable_text_id(t) for t in row] for row in texts]),
        finding_ids=torch.tensor(
            [
                [finding_set_id(fsets[(i * 3 + j) % 4]) if abnormal[i, j] else -1 for j in range(a)]
                for i in range(b)
            ]
        ),
        temperature=torch.tensor(0.07),
        texts=texts,
    )


def test_all_switches_off_equals_per_anatomy_clip():
    inp = _random_batch(8, 3, 5, seed=0, grad=False)
    texts = inp.pop("texts")
    del texts
    out = FineGrainedContrastiveLoss(**ALL_OFF)(**inp)
    expected = 0.0
    for j in range(3):
        rows = inp["present"][:, j].nonzero(as_tuple=True)[0]
        if rows.numel() < 2:
            continue
        logits = inp["image"][rows, j] @ inp["text"][rows, j].T / inp["temperature"]
        labels = torch.arange(rows.numel())
        expected += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert not out.skipped.any()


def _reference_lavis_loss(inp, texts, template="no abnormality."):
    """The public fVLM (LAVIS blip_pretrain) algorithm, on strings, re-implemented for the test."""
    total = 0.0
    status = (inp["abnormal"] & inp["present"]).sum(0)
    for j in torch.where(status)[0].tolist():
        rows = torch.where(inp["present"][:, j])[0]
        if not len(rows):
            continue
        image_feat, text_feat = inp["image"][rows, j], inp["text"][rows, j]
        txt = np.array([texts[i][j] for i in rows.tolist()])
        sim_i2t = image_feat @ text_feat.t() / inp["temperature"]
        sim_t2i = text_feat @ image_feat.t() / inp["temperature"]
        sim_targets = torch.zeros(sim_i2t.size())
        sim_targets.fill_diagonal_(1)
        normal_flag = np.array([x.startswith(template) for x in txt])
        m = normal_flag[:, None] * normal_flag[None, :]
        m = (m.astype(float) + (txt[:, None] == txt[None, :]).astype(float)).astype(bool)
        m = torch.from_numpy(m)
        m.fill_diagonal_(0)
        sim_targets += m
        sim_targets /= sim_targets.sum(1, keepdim=True)
        if len(torch.unique(sim_targets)) == 1:
            continue
        li2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
        lt2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
        total = total + (li2t + lt2i) / 2
    return float(total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_switches_equal_the_public_fvlm_algorithm(seed):
    inp = _random_batch(10, 4, 6, seed=seed, grad=False)
    texts = inp.pop("texts")
    out = FineGrainedContrastiveLoss(disease_pairs=0.0)(**inp)
    assert out.loss.item() == pytest.approx(_reference_lavis_loss(inp, texts), rel=1e-6)


def test_gradients_finite_and_reach_every_input():
    inp = _random_batch(8, 3, 6, seed=5)
    inp.pop("texts")
    tau = torch.nn.Parameter(torch.tensor(0.07))
    inp["temperature"] = tau
    inp["present"][:, :] = True
    inp["abnormal"][0, :] = True
    out = FineGrainedContrastiveLoss()(**inp)
    out.loss.backward()
    for g in (inp["image"].grad, inp["text"].grad, tau.grad):
        assert g is not None and torch.isfinite(g).all()
    assert inp["image"].grad.abs().sum() > 0 and tau.grad.abs() > 0
    assert torch.isfinite(out.per_anatomy).all()
    assert out.mean.item() == pytest.approx(out.per_anatomy[~out.skipped].mean().item())


def test_skip_anatomy_without_abnormal_sample():
    inp = _random_batch(6, 3, 4, seed=7)
    inp.pop("texts")
    inp["present"][:] = True
    inp["abnormal"][:] = False
    inp["abnormal"][1, 0] = True
    inp["abnormal"][2, 2] = True
    inp["abnormal"][3, 1] = True
    inp["present"][3, 1] = False  # abnormal but absent: does not count
    loss = FineGrainedContrastiveLoss()
    out = loss(**inp)
    assert out.skipped.tolist() == [False, True, False]
    assert out.per_anatomy[1] == 0
    assert out.loss.item() == pytest.approx(float(out.per_anatomy[0] + out.per_anatomy[2]), rel=1e-6)
    # without the rule anatomy 1 still has degenerate targets (all rows normal: every entry
    # equal), which the reference skips too; without the normal-pair and same-text terms it is trained
    degenerate = FineGrainedContrastiveLoss(skip_without_abnormal=False)(**inp)
    assert degenerate.skipped.tolist() == [False, True, False]
    rule_on = FineGrainedContrastiveLoss(normal_pairs=False, same_text=False)(**inp)
    keep = FineGrainedContrastiveLoss(normal_pairs=False, same_text=False, skip_without_abnormal=False)(**inp)
    assert rule_on.skipped.tolist() == [False, True, False]
    assert keep.skipped.tolist() == [False, False, False]
    assert keep.loss.item() == pytest.approx(rule_on.loss.item() + keep.per_anatomy[1].item(), rel=1e-6)


def test_all_skipped_gives_zero_loss_that_still_backpropagates():
    inp = _random_batch(4, 2, 4, seed=8)
    inp.pop("texts")
    inp["abnormal"][:] = False
    out = FineGrainedContrastiveLoss()(**inp)
    assert out.skipped.all() and out.loss.item() == 0.0
    out.loss.backward()
    assert inp["image"].grad is not None and (inp["image"].grad == 0).all()


def test_absent_samples_are_excluded():
    inp = _random_batch(7, 2, 4, seed=9, grad=False)
    inp.pop("texts")
    inp["abnormal"][0, :] = True
    inp["present"][:] = True
    inp["present"][4, 0] = False
    inp["present"][5, 1] = False
    loss = FineGrainedContrastiveLoss()
    base = loss(**inp)
    moved = dict(inp)
    moved["image"], moved["text"] = inp["image"].clone(), inp["text"].clone()
    moved["image"][4, 0] = F.normalize(torch.randn(4), dim=0)
    moved["text"][5, 1] = -moved["text"][5, 1]
    moved["text_ids"] = inp["text_ids"].clone()
    moved["text_ids"][4, 0] = inp["text_ids"][1, 0]
    after = loss(**moved)
    assert after.loss.item() == pytest.approx(base.loss.item(), rel=1e-7)
    assert base.n_rows.tolist() == [6, 6]
    # and equals the loss of the present rows alone
    keep = torch.tensor([i != 4 for i in range(7)])
    sub = {k: (v[keep][:, :1] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in inp.items()}
    alone = loss(**sub)
    assert alone.loss.item() == pytest.approx(base.per_anatomy[0].item(), rel=1e-6)


def test_stable_text_id_is_stable_across_processes():
    texts = ["lung shows no significant abnormalities.", "Émphysème.", ""]
    here = [stable_text_id(t) for t in texts]
    assert len(set(here)) == 3 and all(0 <= x < 2**63 for x in here)
    code = f"from fvlm_core.loss import stable_text_id as s; print([s(t) for t in {texts!r}])"
    env = dict(os.environ, PYTHONHASHSEED="123")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == str(here)


def test_finding_set_id_rules():
    assert finding_set_id(None) == UNKNOWN_FINDING_SET
    assert finding_set_id({}) == UNKNOWN_FINDING_SET
    assert finding_set_id({"Emphysema": 0}) == UNKNOWN_FINDING_SET
    assert finding_set_id({"Emphysema": 1, "Atelectasis": 0}) == finding_set_id(["Emphysema"])
    assert finding_set_id(["Emphysema"]) != finding_set_id(["Emphysema", "Atelectasis"])
