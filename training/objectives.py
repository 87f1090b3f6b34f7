"""Training objectives: the model(s) a run trains, how a batch is embedded, and the loss.

An :class:`Objective` is the module DistributedDataParallel wraps: its ``forward`` embeds a batch
(every trained model's image and text embeddings, one call per step), and :meth:`Objective.loss`
turns those embeddings into the step's loss with the objective's own loss function, which is told
at construction whether it gathers the global batch over ranks (``rank``, ``world_size``).

- :class:`FVLMObjective` (``objective: fvlm``): per-anatomy embeddings against the anatomies'
  descriptions with :class:`~fvlm_core.loss.FineGrainedContrastiveLoss` (``loss.*`` switches),
  optionally with a co-teaching peer model trained side by side.
- :class:`GlobalCLIPObjective` (``objective: global_clip``): the whole-volume CLIP baseline
  (:class:`~fvlm_training.baseline.GlobalCLIP`) against whole reports, with the same loss with
  every calibration switch off over one "anatomy" (plain CLIP).

Each trained model has its own :class:`~fvlm_core.model.text.TextCache`:
:meth:`Objective.warm_text_caches` encodes every text of the dataset once before training when
the text encoder is frozen (module docstring of :mod:`fvlm_training.trainer` says why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fvlm_core.data.samples import dataset_texts
from fvlm_core.loss import FineGrainedContrastiveLoss, LossOutput, PeerEmbeddings
from fvlm_core.model import FVLM
from fvlm_core.model.text import TextCache
from fvlm_training.baseline import GlobalCLIP
from fvlm_training.recipe import LossOptions, Recipe

log = logging.getLogger("fvlm.train")

#: Keys of a batch the loss reads (targets), besides the embeddings.
TARGET_KEYS = ("abnormal", "text_ids", "finding_ids")


@dataclass
class StepLoss:
    """``total``: what the step backpropagates (the model's loss plus the peer's, if any);
    ``logged``: the trained model's :class:`~fvlm_core.loss.LossOutput` (what is logged)."""

    total: torch.Tensor
    logged: LossOutput


class Objective(nn.Module):
    """Base class: ``model`` is the trained model (saved at the end); ``names`` names the entries
    of ``LossOutput.per_anatomy``; ``uses_reports`` says whether whole reports are the texts."""

    names: list[str]
    uses_reports: bool = False

    def models(self) -> list[nn.Module]:
        """Every model trained (each with a text cache)."""
        return [self.model]

    def loss(self, out: dict[str, Any], batch: dict[str, Any], device: torch.device) -> StepLoss:
        """The step's loss from ``forward``'s output and the batch's targets."""
        raise NotImplementedError

    def warm_text_caches(self, dataset: Sequence[Any]) -> None:
        """Encode every text of ``dataset`` once, in a fixed order, into each frozen model's cache
        (its pooled features, or, when an adapter or top layers train above it, its token states).

        Why: the encoder's output for a text depends (in the last float bits) on the padding of
        the batch it is encoded in. Encoding all texts up front, sorted and in fixed chunks, makes
        the cached features independent of which texts met in a training batch, so a resumed or a
        multi-process run sees exactly the same features as an uninterrupted single-process one.
        Also what makes CPU training fast: the frozen part costs nothing per step afterwards.
        """
        texts: list[str] | None = None
        for model, cache in zip(self.models(), self.text_caches):
            if not model.text_frozen and model.text_split is None:
                continue
            if texts is None:
                texts = sorted({t for t in dataset_texts(dataset, reports=self.uses_reports) if t.strip()})
            if len(texts) > cache.max_entries:
                log.info(
                    "%d unique texts exceed the text-feature cache (%d): encoding them as batches need them",
                    len(texts),
                    cache.max_entries,
                )
                continue
            model.cache_text(texts, cache)  # sorted; the encoder batches them in fixed chunks of 64


class FVLMObjective(Objective):
    """fVLM: anatomy embeddings against anatomy descriptions (module docstring).

    Args:
        make_model: ``seed -> FVLM`` (the same seed gives the same initial weights).
        seed: the model's seed; a co-teaching peer gets ``seed + 1``.
        options: the recipe's ``loss`` section.
        rank, world_size: the process's place in the process group (for the loss).
    """

    def __init__(
        self, make_model: Callable[[int], FVLM], seed: int, options: LossOptions, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.model = make_model(seed)
        self.peer = make_model(seed + 1) if options.co_teaching else None
        self.names = list(self.model.anatomies)
        self.text_caches = [TextCache() for _ in self.models()]
        self.loss_fn = FineGrainedContrastiveLoss(
            normal_pairs=options.normal_pairs,
            same_text=options.same_text,
            disease_pairs=options.disease_pairs,
            co_teaching_alpha=options.co_teaching_alpha,
            skip_without_abnormal=options.skip_without_abnormal,
            rank=rank,
            world_size=world_size,
        )

    def models(self) -> list[nn.Module]:
        return [self.model] if self.peer is None else [self.model, self.peer]

    @staticmethod
    def _embed(m: FVLM, cache: TextCache, image, labels, present, texts):
        """``(B, A, D)`` image and text embeddings and ``(B, A)`` presence; each distinct text of a
        present anatomy is encoded once (rows of absent anatomies stay zero)."""
        out = m.encode_image(image, labels, present=present)
        b, a = present.shape
        flat = [texts[i][j] for i in range(b) for j in range(a)]
        want = present.reshape(-1).tolist()
        uniq = sorted({t for t, w in zip(flat, want) if w})
        txt = out.embeddings.new_zeros(b * a, out.embeddings.shape[-1])
        if uniq:
            emb = m.encode_text(uniq, cache).to(txt.dtype)
            pos = {t: i for i, t in enumerate(uniq)}
            rows = [k for k, w in enumerate(want) if w]
            idx = torch.tensor([pos[flat[k]] for k in rows], device=txt.device)
            txt = txt.index_copy(0, torch.tensor(rows, device=txt.device), emb[idx])
        return out.embeddings, txt.reshape(b, a, -1), out.present

    def forward(self, image, labels, present, texts, reports) -> dict[str, Any]:
        """Embeddings of the model (and the peer) for a batch: ``image (B, 1, Z, Y, X)``,
        ``labels (B, Z, Y, X)``, ``present (B, A)``, ``texts`` B lists of A descriptions."""
        img, txt, pres = self._embed(self.model, self.text_caches[0], image, labels, present, texts)
        res = {"image": img, "text": txt, "present": pres, "tau": self.model.temperature}
        if self.peer is not None:
            pimg, ptxt, _ = self._embed(self.peer, self.text_caches[1], image, labels, present, texts)
            res.update(peer_image=pimg, peer_text=ptxt, peer_tau=self.peer.temperature)
        return res

    def loss(self, out: dict[str, Any], batch: dict[str, Any], device: torch.device) -> StepLoss:
        """The model's loss (calibrated by the peer), plus the peer's (calibrated by the model)."""
        targets = tuple(batch[k].to(device) for k in TARGET_KEYS)
        if self.peer is None:
            lo = self.loss_fn(out["image"], out["text"], out["present"], *targets, out["tau"])
            return StepLoss(lo.loss, lo)
        peer = PeerEmbeddings(out["peer_image"], out["peer_text"], out["peer_tau"])
        lo = self.loss_fn(out["image"], out["text"], out["present"], *targets, out["tau"], peer=peer)
        own = PeerEmbeddings(out["image"], out["text"], out["tau"])
        lo_peer = self.loss_fn(
            out["peer_image"], out["peer_text"], out["present"], *targets, out["peer_tau"], peer=own
        )
        return StepLoss(lo.loss + lo_peer.loss, lo)


class GlobalCLIPObjective(Objective):
    """The global CLIP baseline: whole-volume embeddings against whole-report embeddings.

    Args:
        make_model: ``seed -> GlobalCLIP``.
        seed: the model's seed.
        rank, world_size: the process's place in the process group (for the loss).
    """

    uses_reports = True

    def __init__(
        self, make_model: Callable[[int], GlobalCLIP], seed: int, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.model = make_model(seed)
        self.names = ["global"]
        self.text_caches = [TextCache()]
        # plain CLIP: identity targets only, nothing skipped (one "anatomy": the whole volume)
        self.loss_fn = FineGrainedContrastiveLoss(
            normal_pairs=False,
            same_text=False,
            disease_pairs=0.0,
            skip_without_abnormal=False,
            rank=rank,
            world_size=world_size,
        )

    def forward(self, image, labels, present, texts, reports) -> dict[str, Any]:
        """``(B, 1, D)`` volume and report embeddings (``labels``, ``present``, ``texts`` unused)."""
        img = self.model.encode_volume(image)[:, None]
        txt = self.model.encode_text(list(reports), self.text_caches[0])[:, None].to(img.dtype)
        every = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
        return {"image": img, "text": txt, "present": every, "tau": self.model.temperature}

    def loss(self, out: dict[str, Any], batch: dict[str, Any], device: torch.device) -> StepLoss:
        ids = torch.arange(out["image"].shape[0], device=device)[:, None]  # each report is its own text
        every = out["present"]
        lo = self.loss_fn(out["image"], out["text"], every, every, ids, ids, out["tau"])
        return StepLoss(lo.loss, lo)


def build_objective(recipe: Recipe, model_cfg, device: torch.device, rank: int, world_size: int) -> Objective:
    """The recipe's objective on ``device``, its models built from ``model_cfg`` (or loaded from
    ``init_from``) with ``torch.manual_seed(seed)`` before each."""
    baseline = recipe.objective == "global_clip"

    def make(seed: int):
        torch.manual_seed(seed)
        if recipe.init_from:
            if baseline:
                m = GlobalCLIP.from_pretrained(recipe.init_from, require_head=False)
            else:
                m = FVLM.from_pretrained(recipe.init_from, device="cpu")
            fvlm = m.fvlm if baseline else m
            if model_cfg.text.freeze:
                fvlm.freeze_text(model_cfg.text.train_top_layers)
            return m
        return GlobalCLIP(FVLM(model_cfg)) if baseline else FVLM(model_cfg)

    seed = recipe.train.seed
    if baseline:
        objective: Objective = GlobalCLIPObjective(make, seed, rank, world_size)
    else:
        objective = FVLMObjective(make, seed, recipe.loss, rank, world_size)
    return objective.to(device)
