"""The false-negative-aware fine-grained contrastive loss of fVLM (Shui et al., ICLR 2025).

One contrastive problem per anatomy ``j``. Its rows are the samples of the GLOBAL batch (gathered
over ranks when the loss is built with ``world_size > 1``, as open_clip's ``ClipLoss``; see
:mod:`fvlm_core.distributed`) in which anatomy ``j`` is present (intact in the crop). With ``v``/``t`` the L2-normalised image/text embeddings of those rows::

    S = v t^T / tau                                   (n, n), tau passed in (the model owns it)
    Y_ii = 1
    Y_ik = max( [normal_i & normal_k]       if normal_pairs,          (i != k)
                [text_i == text_k]          if same_text,
                w * [abnormal_i & abnormal_k & F_i == F_k != -1]  if disease_pairs = w > 0 )
    T = Y / Y.sum(1)                                  rows normalised (Y is symmetric)
    L_j = ( CE(S, T) + CE(S^T, T) ) / 2               soft cross-entropy, mean over rows
    loss = sum_j L_j over the anatomies not skipped   (``LossOutput.mean`` is the mean)

Reference fidelity (the public fVLM code, LAVIS ``blip_pretrain``): the identity plus the
*union* of the normal-pair and identical-text indicators off the diagonal (``bool`` of their
sum, diagonal zeroed), rows normalised, symmetric soft CE, total = sum over anatomies; an
anatomy is skipped when no sample of the global batch has it present AND abnormal, and also
when its targets are degenerate (fewer than two rows, or every entry of ``T`` equal, e.g. all
descriptions identical), exactly as the reference's ``len(unique(targets)) == 1`` test.
With ``disease_pairs=0`` and no peer, this module reproduces that loss; with every switch off
(``normal_pairs=False, same_text=False, disease_pairs=0, skip_without_abnormal=False``, no
peer) it is plain CLIP per anatomy (``Testing/test_loss.py`` checks both).

Disease-aware calibration (the paper's part the public code left out), two mechanisms:

1. *Disease-aware pairing* (``disease_pairs = w``): two ABNORMAL samples whose extracted
   finding-label sets for that anatomy are identical are positives with weight ``w``. Sets are
   compared through ``finding_set_id(labels)``; an unknown or empty set (an anatomy the
   impression calls abnormal without any extracted label) has id ``-1`` and never pairs,
   because "abnormal for an unknown reason" is no evidence of the same disease.
2. *Co-teaching calibration* (``peer`` given, ``co_teaching_alpha = alpha``, default 0.5):
   two peer models are trained side by side; for each ABNORMAL row the target distribution is
   mixed with the peer model's (detached) similarity distribution over the same rows::

       T'_i = alpha * T_i + (1 - alpha) * softmax(S_peer_i)      (image -> text rows)
       T'^t_k = alpha * T_k + (1 - alpha) * softmax(S_peer^T_k)  (text -> image rows)

   with ``S_peer = v_peer t_peer^T / tau_peer``. Normal rows keep ``T`` (their false negatives
   are already handled exactly by the normal-pair term). The peer's view of which abnormal
   samples look alike softens the patient-level one-hot pairing where reports are ambiguous,
   and using the *other* model (not the model itself, as ALBEF's momentum distillation does)
   avoids confirming a model's own mistakes. This is our reading of the paper's description
   (the paper's method text was not available offline beyond its abstract); the mixing rule
   is the ALBEF/BLIP soft-target form the reference code base (LAVIS) already uses.
   ``alpha`` may also be given per call (``forward(..., alpha=a)``): the trainer ramps the
   peer's share ``1 - alpha`` up from 0 as ALBEF ramps its distillation weight, and gives each
   peer its own data stream, passing here the other model's embeddings of this batch
   (``fvlm_training.objectives.FVLMObjective``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.distributed import gather_no_grad, gather_with_grad

#: id of an unknown (or empty) finding set: never paired.
UNKNOWN_FINDING_SET = -1


def stable_text_id(text: str) -> int:
    """A stable non-negative int64 id of ``text`` (same on every process and run).

    Exact-text comparison as in the reference (``text_i == text_k``); ids are what is gathered
    across ranks instead of strings. 63-bit BLAKE2b, so collisions are negligible.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def finding_set_id(labels: Mapping[str, int | bool] | Iterable[str] | None) -> int:
    """Stable id of a set of finding labels (e.g. ``{"Emphysema", "Lung nodule"}``).

    ``labels`` is either an iterable of label names or a mapping ``{label: 0/1}`` (the positive
    ones count). ``None`` or an empty set gives :data:`UNKNOWN_FINDING_SET` (-1), which never
    pairs in the disease-aware term.
    """
    if labels is None:
        return UNKNOWN_FINDING_SET
    if isinstance(labels, Mapping):
        names = {str(k) for k, v in labels.items() if v and int(v) > 0}
    else:
        names = {str(x) for x in labels}
    if not names:
        return UNKNOWN_FINDING_SET
    return stable_text_id("\x1f".join(sorted(names)))


@dataclass
class PeerEmbeddings:
    """The co-teaching peer's embeddings of the same batch (detached inside the loss).

    ``image``/``text``: (B, A, D) L2-normalised; ``temperature``: the peer's (None = use the
    trained model's temperature).
    """

    image: torch.Tensor
    text: torch.Tensor
    temperature: torch.Tensor | float | None = None


@dataclass
class LossOutput:
    """``loss``: scalar to backpropagate (sum over non-skipped anatomies);
    ``per_anatomy`` (A,): L_j (0 where skipped, detached); ``skipped`` (A,) bool;
    ``n_rows`` (A,) int: rows (present samples in the global batch) per anatomy;
    ``mean``: detached mean of L_j over non-skipped anatomies (0 if none)."""

    loss: torch.Tensor
    per_anatomy: torch.Tensor
    skipped: torch.Tensor
    n_rows: torch.Tensor
    mean: torch.Tensor


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k targets_ik log softmax(logits_i)_k``; (n, n) -> scalar."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class FineGrainedContrastiveLoss(nn.Module):
    """Per-anatomy soft-target contrastive loss with false-negative calibration.

    Args:
        normal_pairs: two normal samples of the anatomy are positives (reference: on).
        same_text: two samples with identical description text are positives (reference: on).
        disease_pairs: weight ``w`` of abnormal pairs with the same finding-label set (0 = off).
        co_teaching_alpha: weight of the own targets when a ``peer`` is passed (paper: 0.5;
            1.0 or ``peer=None`` = off).
        skip_without_abnormal: skip an anatomy without any present abnormal sample in the
            global batch (reference: on).
        rank, world_size: this process's place in the default process group. With
            ``world_size > 1`` every call gathers all ranks' rows into the global batch (each
            rank must call the loss at the same point); 1 computes the loss of the local batch.
    """

    def __init__(
        self,
        normal_pairs: bool = True,
        same_text: bool = True,
        disease_pairs: float = 1.0,
        co_teaching_alpha: float = 0.5,
        skip_without_abnormal: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if disease_pairs < 0:
            raise ValueError(f"disease_pairs weight must be >= 0, got {disease_pairs}")
        if not 0.0 <= co_teaching_alpha <= 1.0:
            raise ValueError(f"co_teaching_alpha must be in [0, 1], got {co_teaching_alpha}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        self.normal_pairs = bool(normal_pairs)
        self.same_text = bool(same_text)
        self.disease_pairs = float(disease_pairs)
        self.co_teaching_alpha = float(co_teaching_alpha)
        self.skip_without_abnormal = bool(skip_without_abnormal)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def extra_repr(self) -> str:
        return (
            f"normal_pairs={self.normal_pairs}, same_text={self.same_text}, "
            f"disease_pairs={self.disease_pairs}, co_teaching_alpha={self.co_teaching_alpha}, "
            f"skip_without_abnormal={self.skip_without_abnormal}, rank={self.rank}, "
            f"world_size={self.world_size}"
        )

    @torch.no_grad()
    def targets(
        self,
        normal: torch.Tensor,
        abnormal: torch.Tensor,
        text_ids: torch.Tensor,
        finding_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Unnormalised soft targets ``Y`` (n, n) for one anatomy's rows (all inputs (n,))."""
        n = normal.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=normal.device)
        off = torch.zeros(n, n, dtype=torch.float32, device=normal.device)
        if self.normal_pairs:
            off = torch.maximum(off, (normal[:, None] & normal[None, :]).float())
        if self.same_text:
            off = torch.maximum(off, (text_ids[:, None] == text_ids[None, :]).float())
        if self.disease_pairs > 0:
            known = finding_ids != UNKNOWN_FINDING_SET
            same = (finding_ids[:, None] == finding_ids[None, :]) & (known[:, None] & known[None, :])
            pair = same & abnormal[:, None] & abnormal[None, :]
            off = torch.maximum(off, pair.float() * self.disease_pairs)
        return torch.where(eye, torch.ones_like(off), off)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        present: torch.Tensor,
        abnormal: torch.Tensor,
        text_ids: torch.Tensor,
        finding_ids: torch.Tensor,
        temperature: torch.Tensor | float,
        peer: PeerEmbeddings | None = None,
        alpha: float | None = None,
    ) -> LossOutput:
        """Compute the loss of the global batch from this rank's part of it (the whole batch when
        ``world_size`` is 1).

        Args:
            image, text: (B, A, D) L2-normalised anatomy image / description embeddings.
            present: (B, A) bool, anatomy intact in the sample's crop.
            abnormal: (B, A) bool, anatomy abnormal in the report (normal = present & ~abnormal).
            text_ids: (B, A) int64 ``stable_text_id`` of each description.
            finding_ids: (B, A) int64 ``finding_set_id`` of the anatomy's finding labels.
            temperature: scalar tensor (learned, already clamped) or float.
            peer: co-teaching peer embeddings of the same batch, or None.
            alpha: the own targets' weight for this call instead of ``co_teaching_alpha``
                (a ramp: 1.0 = no calibration yet).
        """
        alpha = self.co_teaching_alpha if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if image.shape != text.shape or image.dim() != 3:
            raise ValueError(
                f"image and text must both be (B, A, D); got {tuple(image.shape)}, {tuple(text.shape)}"
            )
        present = present.bool()
        abnormal = abnormal.bool() & present
        text_ids = text_ids.long()
        finding_ids = finding_ids.long()
        if self.world_size > 1:
            image, text, present, abnormal, text_ids, finding_ids, peer = self._gather(
                image, text, present, abnormal, text_ids, finding_ids, peer
            )
        image, text = image.float(), text.float()
        n_anat = image.shape[1]
        per_anatomy: list[torch.Tensor] = []
        skipped = torch.zeros(n_anat, dtype=torch.bool)
        n_rows = present.sum(0).cpu()
        tau = temperature
        total = None
        for j in range(n_anat):
            rows = present[:, j].nonzero(as_tuple=True)[0]
            n = rows.numel()
            if n < 2 or (self.skip_without_abnormal and not bool(abnormal[rows, j].any())):
                skipped[j] = True
                per_anatomy.append(image.new_zeros(()))
                continue
            ab = abnormal[rows, j]
            y = self.targets(~ab, ab, text_ids[rows, j], finding_ids[rows, j])
            t = y / y.sum(dim=1, keepdim=True)
            if bool((t == t[0, 0]).all()):  # degenerate (reference: len(unique(targets)) == 1)
                skipped[j] = True
                per_anatomy.append(image.new_zeros(()))
                continue
            # text -> image rows use Y^T normalised (equal to t: every term of Y is symmetric)
            t_i2t, t_t2i = t, y.T / y.T.sum(dim=1, keepdim=True)
            if peer is not None and alpha < 1.0 and bool(ab.any()):
                t_i2t, t_t2i = self._co_teach(t_i2t, t_t2i, ab, peer, rows, j, tau, alpha)
            v, w = image[rows, j], text[rows, j]
            sim = v @ w.T / tau
            loss_j = (soft_cross_entropy(sim, t_i2t) + soft_cross_entropy(sim.T, t_t2i)) / 2
            per_anatomy.append(loss_j)
            total = loss_j if total is None else total + loss_j
        if total is None:
            # every anatomy skipped: a zero that still reaches all inputs (keeps DDP's graph whole)
            total = 0.0 * (image.sum() + text.sum())
            if isinstance(tau, torch.Tensor) and tau.requires_grad:
                total = total + 0.0 * tau
        per = torch.stack([p.detach() for p in per_anatomy]).cpu() if per_anatomy else torch.zeros(0)
        used = ~skipped
        mean = per[used].mean() if bool(used.any()) else torch.zeros(())
        return LossOutput(loss=total, per_anatomy=per, skipped=skipped, n_rows=n_rows, mean=mean)

    def _gather(self, image, text, present, abnormal, text_ids, finding_ids, peer):
        """Every rank's rows, in rank order: embeddings with gradients, the rest without."""
        rank, world = self.rank, self.world_size
        image, text = gather_with_grad(image, rank, world), gather_with_grad(text, rank, world)
        present, abnormal = gather_no_grad(present, world), gather_no_grad(abnormal, world)
        text_ids, finding_ids = gather_no_grad(text_ids, world), gather_no_grad(finding_ids, world)
        if peer is not None:
            peer = PeerEmbeddings(
                gather_no_grad(peer.image.detach().float(), world),
                gather_no_grad(peer.text.detach().float(), world),
                peer.temperature,
            )
        return image, text, present, abnormal, text_ids, finding_ids, peer

    @torch.no_grad()
    def _co_teach(self, t_i2t, t_t2i, ab, peer: PeerEmbeddings, rows, j, tau, a: float):
        """Mix abnormal rows' targets with the peer's similarity distribution (module docstring),
        ``a`` the own targets' weight."""
        ptau = peer.temperature if peer.temperature is not None else tau
        ptau = ptau.detach() if isinstance(ptau, torch.Tensor) else ptau
        pv = peer.image[rows, j].detach().float()
        pw = peer.text[rows, j].detach().float()
        ps = pv @ pw.T / ptau
        mix_i2t = a * t_i2t + (1 - a) * F.softmax(ps, dim=1)
        mix_t2i = a * t_t2i + (1 - a) * F.softmax(ps.T, dim=1)
        m = ab[:, None]
        return torch.where(m, mix_i2t, t_i2t), torch.where(m, mix_t2i, t_t2i)
