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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fvlm_core.data.samples import dataset_texts
from fvlm_core.loss import FineGrainedContrastiveLoss, LossOutput, PeerEmbeddings
from fvlm_core.model import FVLM
from fvlm_core.model.text import TextCache
from fvlm_core.reports.decompose import normal_template
from fvlm_training.baseline import GlobalCLIP
from fvlm_training.mae_init import MAEInitReport, is_mae_checkpoint, load_mae_vit, read_mae_checkpoint
from fvlm_training.recipe import LossOptions, Recipe

log = logging.getLogger("fvlm.train")

#: Keys of a batch the loss reads (targets), besides the embeddings.
TARGET_KEYS = ("abnormal", "text_ids", "finding_ids")


#: The co-teaching peer's data stream (data order, augmentation) uses the run's seed plus this.
PEER_SEED_OFFSET = 104_729


@dataclass
class StepLoss:
    """``total``: what the step backpropagates (the model's loss plus the peer's, if any);
    ``logged``: the trained model's :class:`~fvlm_core.loss.LossOutput` (what is logged);
    ``scalars``: further figures of the step for TensorBoard (name -> value)."""

    total: torch.Tensor
    logged: LossOutput
    scalars: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: ``model`` is the trained model (saved at the end); ``names`` names the entries
    of ``LossOutput.per_anatomy``; ``uses_reports`` says whether whole reports are the texts;
    ``peer_seed``: the seed of a second data stream the objective trains on (None: one stream);
    ``init_report``: what an ``init_from`` MAE checkpoint initialised (None otherwise)."""

    names: list[str]
    uses_reports: bool = False
    peer_seed: int | None = None
    init_report: dict[str, Any] | None = None

    def set_step(self, step: int) -> None:
        """Told the optimizer step (0-based) the next loss belongs to (for step-dependent weights)."""

    def encoder_text(self, text: str) -> str:
        """The string the text encoder is given for a training ``text`` (the text itself here)."""
        return text

    def models(self) -> list[nn.Module]:
        """Every model trained (each with a text cache)."""
        return [self.model]

    def loss(
        self, out: dict[str, Any], batch: dict[str, Any], device: torch.device, peer_batch=None
    ) -> StepLoss:
        """The step's loss from ``forward``'s output and the batch's (and the peer batch's) targets."""
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
                every = dataset_texts(dataset, reports=self.uses_reports)
                texts = sorted({self.encoder_text(t) for t in every if t.strip()})
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

    Co-teaching (``options.co_teaching``): a peer model, initialised with ``seed + 1``, trains
    on its own data stream (another data order and augmentation: seed ``seed +``
    :data:`PEER_SEED_OFFSET`; its dropout masks are other draws of the run's random stream), so
    the two differ even when ``init_from`` gives them the same start. Each model's targets for
    its abnormal rows are calibrated by the other model's view of the same batch (a forward
    without gradient), with the own targets' weight ramped from 1 down to ``co_teaching_alpha``
    over ``co_teaching_rampup_steps`` (:meth:`set_step`). Per step: two forwards with gradient,
    two without (about 2.7 times one model's compute).

    Args:
        make_model: ``seed -> FVLM`` (the same seed gives the same initial weights).
        seed: the model's seed; a co-teaching peer gets ``seed + 1``.
        options: the recipe's ``loss`` section.
        rank, world_size: the process's place in the process group (for the loss).
        strip_normal_template: feed the text encoder a normal text without its leading
            template (:meth:`encoder_text`), as the public code does.
    """

    def __init__(
        self,
        make_model: Callable[[int], FVLM],
        seed: int,
        options: LossOptions,
        rank: int,
        world_size: int,
        strip_normal_template: bool = False,
    ) -> None:
        super().__init__()
        self.model = make_model(seed)
        self.peer = make_model(seed + 1) if options.co_teaching else None
        self.peer_seed = seed + PEER_SEED_OFFSET if options.co_teaching else None
        self.options = options
        self.own_weight = options.co_teaching_alpha
        self.names = list(self.model.anatomies)
        self.templates = [normal_template(a) for a in self.names] if strip_normal_template else []
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

    def set_step(self, step: int) -> None:
        self.own_weight = self.options.co_teaching_weight(step)

    def encoder_text(self, text: str) -> str:
        """``text`` without a leading normal template ``"{anatomy} shows no significant
        abnormalities."`` when more text follows it (the public code's ``blip_pretrain.py``:
        ``text.replace(template, '')`` for a text that starts with, and is not only, the
        template; surrounding spaces dropped, which the tokenizer ignores anyway); unchanged
        without ``strip_normal_template``."""
        for template in self.templates:
            if text.startswith(template) and text != template:
                return text.replace(template, "").strip() or text
        return text

    def _embed(self, m: FVLM, cache: TextCache, image, labels, present, texts):
        """``(B, A, D)`` image and text embeddings and ``(B, A)`` presence; each distinct text of a
        present anatomy is encoded once (rows of absent anatomies stay zero)."""
        out = m.encode_image(image, labels, present=present)
        b, a = present.shape
        flat = [self.encoder_text(texts[i][j]) for i in range(b) for j in range(a)]
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

    def forward(self, image, labels, present, texts, reports, peer_batch=None) -> dict[str, Any]:
        """Embeddings of the model (and the peer) for a batch: ``image (B, 1, Z, Y, X)``,
        ``labels (B, Z, Y, X)``, ``present (B, A)``, ``texts`` B lists of A descriptions;
        ``peer_batch``: the peer's own batch (``image``, ``labels``, ``present``, ``texts``, on
        the device), required with co-teaching."""
        img, txt, pres = self._embed(self.model, self.text_caches[0], image, labels, present, texts)
        res = {"image": img, "text": txt, "present": pres, "tau": self.model.temperature}
        if self.peer is None:
            return res
        if peer_batch is None:
            raise ValueError("co-teaching: the peer trains on its own batch; pass peer_batch")
        pb = (peer_batch["image"], peer_batch["labels"], peer_batch["present"], peer_batch["texts"])
        pimg, ptxt, ppres = self._embed(self.peer, self.text_caches[1], *pb)
        res.update(peer_image=pimg, peer_text=ptxt, peer_present=ppres, peer_tau=self.peer.temperature)
        with torch.no_grad():  # each model's view of the other's batch: calibration only
            vimg, vtxt, _ = self._embed(self.peer, self.text_caches[1], image, labels, present, texts)
            wimg, wtxt, _ = self._embed(self.model, self.text_caches[0], *pb)
        res.update(peer_view=(vimg, vtxt), model_view=(wimg, wtxt))
        return res

    def loss(
        self, out: dict[str, Any], batch: dict[str, Any], device: torch.device, peer_batch=None
    ) -> StepLoss:
        """The model's loss (calibrated by the peer's view of its batch), plus the peer's
        (calibrated by the model's view of the peer's batch)."""
        targets = tuple(batch[k].to(device) for k in TARGET_KEYS)
        if self.peer is None:
            lo = self.loss_fn(out["image"], out["text"], out["present"], *targets, out["tau"])
            return StepLoss(lo.loss, lo)
        a = self.own_weight
        view = PeerEmbeddings(*out["peer_view"], out["peer_tau"])
        lo = self.loss_fn(out["image"], out["text"], out["present"], *targets, out["tau"], peer=view, alpha=a)
        ptargets = tuple(peer_batch[k].to(device) for k in TARGET_KEYS)
        pview = PeerEmbeddings(*out["model_view"], out["tau"])
        lo_peer = self.loss_fn(
            out["peer_image"],
            out["peer_text"],
            out["peer_present"],
            *ptargets,
            out["peer_tau"],
            peer=pview,
            alpha=a,
        )
        scalars = {"co_teaching/peer_share": 1.0 - a, "co_teaching/peer_loss": float(lo_peer.mean)}
        agree = peer_agreement(out["image"], out["text"], *out["peer_view"], out["present"])
        if agree is not None:
            scalars["co_teaching/agreement"] = agree
        return StepLoss(lo.loss + lo_peer.loss, lo, scalars)


@torch.no_grad()
def peer_agreement(
    image: torch.Tensor,
    text: torch.Tensor,
    peer_image: torch.Tensor,
    peer_text: torch.Tensor,
    present: torch.Tensor,
) -> float | None:
    """How often two models pick the same description for an image: over every anatomy with at
    least two present rows, the fraction of rows whose most similar text (image -> text, among
    the rows of that anatomy) is the same for both. ``image``, ``text``, ``peer_*`` ``(B, A, D)``
    of the same batch, ``present`` ``(B, A)``; None when no anatomy has two rows. 1.0 means
    the peers rank alike (self-distillation would stay there); chance is about 1 / rows."""
    same = total = 0
    for j in range(present.shape[1]):
        rows = present[:, j].bool().nonzero(as_tuple=True)[0]
        if rows.numel() < 2:
            continue
        own = (image[rows, j].float() @ text[rows, j].float().T).argmax(1)
        other = (peer_image[rows, j].float() @ peer_text[rows, j].float().T).argmax(1)
        same += int((own == other).sum())
        total += rows.numel()
    return same / total if total else None


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

    def forward(self, image, labels, present, texts, reports, peer_batch=None) -> dict[str, Any]:
        """``(B, 1, D)`` volume and report embeddings (``labels``, ``present``, ``texts``,
        ``peer_batch`` unused)."""
        img = self.model.encode_volume(image)[:, None]
        txt = self.model.encode_text(list(reports), self.text_caches[0])[:, None].to(img.dtype)
        every = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
        return {"image": img, "text": txt, "present": every, "tau": self.model.temperature}

    def loss(
        self, out: dict[str, Any], batch: dict[str, Any], device: torch.device, peer_batch=None
    ) -> StepLoss:
        ids = torch.arange(out["image"].shape[0], device=device)[:, None]  # each report is its own text
        every = out["present"]
        lo = self.loss_fn(out["image"], out["text"], every, every, ids, ids, out["tau"])
        return StepLoss(lo.loss, lo)


def build_objective(recipe: Recipe, model_cfg, device: torch.device, rank: int, world_size: int) -> Objective:
    """The recipe's objective on ``device``, its models built from ``model_cfg`` (or loaded from
    an ``init_from`` folder) with ``torch.manual_seed(seed)`` before each; an ``init_from`` MAE
    checkpoint then initialises each model's ViT (``objective.init_report`` says what loaded)."""
    baseline = recipe.objective == "global_clip"
    mae = bool(recipe.init_from) and is_mae_checkpoint(recipe.init_from)
    # read (and checked) once, before any model is built (a text encoder may take long to load)
    mae_state = read_mae_checkpoint(recipe.init_from) if mae else None
    reports: list[MAEInitReport] = []

    def make(seed: int):
        torch.manual_seed(seed)
        if mae:
            m = GlobalCLIP(FVLM(model_cfg)) if baseline else FVLM(model_cfg)
            fvlm = m.fvlm if baseline else m
            reports.append(load_mae_vit(fvlm.visual_encoder, recipe.init_from, mae_state))
            return m
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
        strip = recipe.data.strip_normal_template
        objective = FVLMObjective(make, seed, recipe.loss, rank, world_size, strip_normal_template=strip)
    objective.init_report = reports[0].summary() if reports else None
    return objective.to(device)
