"""The fVLM model: anatomy-level image embeddings and text embeddings in one space.

Parameter names equal the official checkpoint's (LAVIS layout): ``visual_encoder.*`` (MONAI
ViT), ``text_encoder.*`` (BERT), ``text_proj``, ``vision_projs.{a}``, ``attention.*`` (the shared
pooling attention), ``query_tokens`` and ``temp``. Project-only parameters: with
``profile_bins > 0`` the anatomy intensity-profile MLP ``profile_embed``
(:mod:`fvlm_core.model.profile`), and with ``text.adapter_width > 0`` the ``text_adapter``.

The model holds parameters only. Text-encoder outputs that stay fixed while the encoder is frozen
are kept by whoever needs them, in a :class:`~fvlm_core.model.text.TextCache` passed to
:meth:`FVLM.encode_text` (the trainer); prompt embeddings by text identity in the analyzer's
:class:`~fvlm_core.zeroshot.prompts.PromptCache`. A model folder loaded for scoring with its stored
prompt embeddings is built without its text encoder (``build_text=False``), which
:func:`~fvlm_core.model.checkpoint.load_text_encoder` attaches when a new prompt must be encoded.
The whole-volume head of the CLIP baseline is not part of this model
(``fvlm_training.baseline.GlobalCLIP`` wraps one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fvlm_core.errors import ConfigError, InputError
from fvlm_core.model.checkpoint import Pretrained
from fvlm_core.model.config import FVLMConfig, load_config
from fvlm_core.model.pooling import (
    AnatomyEmbeddings,
    attend_anatomies,
    project_anatomies,
    token_embeddings,
    token_membership,
)
from fvlm_core.model.profile import ProfileEmbedding, intensity_profiles
from fvlm_core.model.text import (
    TextAdapter,
    TextCache,
    build_text_encoder,
    encode_features,
    encode_from_layer,
    encode_layer_states,
    folder_hidden_size,
    transformer_layers,
)
from fvlm_core.model.vision import TokenGrid, build_vision_encoder


class FVLM(Pretrained, nn.Module):
    """Fine-grained vision-language model (Shui et al., ICLR 2025).

    Args:
        config: the model configuration (``load_config("fvlm-tiny")``).
        text_source: folder to build the text encoder from instead of ``config.text.name_or_path``
            (a checkpoint's ``text/`` folder).
        load_text_weights: load the text encoder's pretrained weights (False when a checkpoint
            provides them).
        build_text: False leaves the text encoder (and ``transformers``) out: ``text_encoder`` and
            ``tokenizer`` are None, the model's ``state_dict()`` and parameters lack the encoder,
            and encoding text raises until :meth:`attach_text_encoder`. Needs ``text_source`` to
            be a folder whose ``config.json`` gives ``hidden_size`` (else the encoder is built).
    """

    def __init__(
        self,
        config: FVLMConfig,
        text_source: str | os.PathLike | None = None,
        load_text_weights: bool = True,
        build_text: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.anatomies: list[str] = list(config.anatomies)
        c = config.vision.hidden_size
        d = config.embed_dim
        self.visual_encoder = build_vision_encoder(config.vision)
        # the text encoder's place in the module order (state_dict and parameter order), filled now
        # or by attach_text_encoder
        self.register_module("text_encoder", None)
        #: the text encoder's tokenizer (a ``transformers`` tokenizer), with the encoder
        self.tokenizer = None
        text_hidden = None if build_text else folder_hidden_size(text_source)
        if text_hidden is None:
            encoder, self.tokenizer = build_text_encoder(
                config.text, source=text_source, weights=load_text_weights
            )
            self.text_encoder = encoder
            text_hidden = encoder.config.hidden_size
        self.text_proj = nn.Linear(text_hidden, d)
        self.attention = nn.MultiheadAttention(
            c, config.pool_heads, dropout=config.pool_dropout, batch_first=True
        )
        self.vision_projs = nn.ModuleList(nn.Linear(c, d) for _ in self.anatomies)
        self.query_tokens = nn.Parameter(torch.zeros(len(self.anatomies), c))
        self.temp = nn.Parameter(torch.tensor(float(config.temperature_init)))
        self.profile_embed: ProfileEmbedding | None = None
        if config.profile_bins:
            n_feat, hid = config.profile_bins + 1, config.profile_hidden
            self.profile_embed = ProfileEmbedding(len(self.anatomies), n_feat, hid, c)
        self.text_adapter: TextAdapter | None = None
        if config.text.adapter_width:
            self.text_adapter = TextAdapter(text_hidden, config.text.adapter_width, config.text.adapter_heads)
        if config.text.freeze and self.text_loaded:
            self.freeze_text(config.text.train_top_layers)

    # ------------------------------------------------------------------ text encoder
    @property
    def text_loaded(self) -> bool:
        """False for a model built without its text encoder (``build_text=False``; a folder loaded
        with ``lazy_text=True``) until :meth:`attach_text_encoder`."""
        return self.text_encoder is not None

    def attach_text_encoder(self, encoder: nn.Module, tokenizer) -> None:
        """Give a model built without its text encoder (``build_text=False``) the encoder and its
        tokenizer, on the model's device and dtype, frozen and in the mode the config and the
        model say (:func:`fvlm_core.model.checkpoint.load_text_encoder` builds them from a folder)."""
        encoder.to(self.text_proj.weight.device, self.text_proj.weight.dtype)
        self.text_encoder = encoder  # takes the place registered in __init__: the order stays
        self.tokenizer = tokenizer
        if self.config.text.freeze:
            self.freeze_text(self.config.text.train_top_layers)
        self.train(self.training)

    def _text_encoder(self) -> nn.Module:
        if self.text_encoder is None:
            raise InputError(
                "this model was built without its text encoder (loaded with lazy_text=True): add it "
                "with fvlm_core.model.checkpoint.load_text_encoder(model, folder) before encoding text"
            )
        return self.text_encoder

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def from_config(cls, config: FVLMConfig | str | os.PathLike, **kwargs) -> FVLM:
        """A freshly initialised model for a config object, bundled name or YAML path."""
        return cls(load_config(config), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.temp.device

    @property
    def temperature(self) -> torch.Tensor:
        """The learned temperature clamped to ``config.temperature_range`` (scalar tensor)."""
        lo, hi = self.config.temperature_range
        return self.temp.clamp(lo, hi)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the stored temperature in place (the reference does this every step)."""
        lo, hi = self.config.temperature_range
        self.temp.clamp_(lo, hi)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ViT blocks in backward to save memory (ViT encoders only)."""
        if hasattr(self.visual_encoder, "grad_checkpointing"):
            self.visual_encoder.grad_checkpointing = bool(enabled)

    def train(self, mode: bool = True) -> FVLM:
        super().train(mode)
        if not self.text_loaded:  # attach_text_encoder applies the mode
            return self
        split = self.text_split
        if self.text_frozen or split is not None:
            # a frozen encoder (or its cached frozen part) is a fixed function: no dropout
            self.text_encoder.eval()
            if split is not None:
                transformer_layers(self.text_encoder)[split:].train(mode)
        return self

    # ------------------------------------------------------------------ image
    def encode_tokens(self, image: torch.Tensor) -> TokenGrid:
        """One encoder forward: ``image (B, 1, Z, Y, X)`` in [0, 1] -> multi-level :class:`TokenGrid`."""
        return self.visual_encoder(image)

    def pool(
        self,
        tokens: TokenGrid,
        labels: torch.Tensor | None,
        present: torch.Tensor | None = None,
        return_tokens: bool = False,
        membership: torch.Tensor | None = None,
        profiles: torch.Tensor | None = None,
    ) -> AnatomyEmbeddings:
        """Anatomy embeddings from already computed tokens (see :meth:`encode_image`).

        ``profiles (B, A, profile_bins + 1)`` (:meth:`intensity_profiles`) is required when the
        model has the profile extension and ignored otherwise. With ``present``, only the
        anatomies present in some sample get a computed membership and token embeddings (the
        other rows are False / 0: those anatomies are masked out of the embeddings anyway).
        """
        b = tokens.final.shape[0]
        a = len(self.anatomies)
        n_tok = tokens.final.shape[1]
        if membership is None:
            if labels is None:
                raise InputError("give an anatomy label map (labels) or a precomputed token membership")
            spatial = tuple(labels.shape[-3:])
            expected = tuple(g * p for g, p in zip(tokens.grid, tokens.patch_size))
            if labels.shape[0] != b or spatial != expected:
                raise InputError(
                    f"labels shape {tuple(labels.shape)} does not match the image: expected (B={b}, *{expected})"
                )
            # with present, only the anatomies present in some sample are needed (the rest are masked out)
            only = None if present is None else present.any(0).nonzero().flatten().tolist()
            membership = token_membership(labels.to(tokens.final.device), a, tokens.patch_size, only=only)
        elif tuple(membership.shape) != (b, a, n_tok):
            raise InputError(
                f"membership must have shape (B, A, L) = {(b, a, n_tok)}, got {tuple(membership.shape)}"
            )
        membership = membership.to(tokens.final.device, torch.bool)
        if present is not None:
            if tuple(present.shape) != (b, a):
                raise InputError(f"present must have shape (B, A) = {(b, a)}, got {tuple(present.shape)}")
            pooled_membership = membership & present.to(membership.device, torch.bool).unsqueeze(-1)
        else:
            pooled_membership = membership
        is_present = pooled_membership.any(-1)
        dropout_p = self.attention.dropout if self.training else 0.0
        pooled, weights = attend_anatomies(
            tokens.levels,
            pooled_membership,
            self.query_tokens,
            self.attention,
            dropout_p=dropout_p,
            need_weights=return_tokens,
        )
        profile_term = None
        if self.profile_embed is not None:
            if profiles is None:
                raise InputError(
                    "this model adds anatomy intensity profiles (profile_bins > 0): pass profiles "
                    "(model.intensity_profiles(image, labels)) or call encode_image with the label map"
                )
            expected_p = (b, a, self.config.profile_bins + 1)
            if tuple(profiles.shape) != expected_p:
                raise InputError(f"profiles must have shape {expected_p}, got {tuple(profiles.shape)}")
            profile_term = self.profile_embed(profiles.to(pooled.device, pooled.dtype))
            pooled = pooled + profile_term
        emb = F.normalize(project_anatomies(pooled, self.vision_projs), dim=-1)
        emb = emb * is_present.unsqueeze(-1).to(emb.dtype)
        out = AnatomyEmbeddings(
            embeddings=emb,
            present=is_present,
            anatomies=list(self.anatomies),
            membership=membership,
            grid=tokens.grid,
            patch_size=tokens.patch_size,
        )
        if return_tokens:
            out.tokens = token_embeddings(
                tokens.levels,
                self.attention,
                self.vision_projs,
                offset=profile_term,
                only=is_present.any(0).nonzero().flatten().tolist(),
            )
            out.attention = weights.sum(2) if weights is not None else None
        return out

    def encode_image(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None,
        present: torch.Tensor | None = None,
        return_tokens: bool = False,
        membership: torch.Tensor | None = None,
    ) -> AnatomyEmbeddings:
        """Anatomy embeddings of a batch of windows, one encoder forward for all anatomies.

        Args:
            image: ``(B, 1, Z, Y, X)`` float in [0, 1] (HU window applied); sizes multiples of the patch.
            labels: ``(B, Z, Y, X)`` anatomy label map (anatomy ``a`` = ``a + 1``).
            present: optional ``(B, A)`` bool; False masks an anatomy out (e.g. cut by the crop).
            return_tokens: also return per-token embeddings and attention (similarity maps).
            membership: optional precomputed ``(B, A, L)`` token membership
                (:func:`~fvlm_core.model.pooling.token_membership`, e.g. in data-loader workers);
                ``labels`` may then be ``None``.

        Returns:
            :class:`AnatomyEmbeddings` with ``embeddings (B, A, D)`` (zeros where absent) and
            ``present (B, A)``.
        """
        profiles = None
        if self.profile_embed is not None:
            if labels is None:
                raise InputError(
                    "this model adds anatomy intensity profiles (profile_bins > 0), which need the "
                    "label map: pass labels, not only a token membership"
                )
            profiles = self.intensity_profiles(image, labels)
        return self.pool(
            self.encode_tokens(image),
            labels,
            present=present,
            return_tokens=return_tokens,
            membership=membership,
            profiles=profiles,
        )

    def intensity_profiles(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, A, profile_bins + 1)`` anatomy intensity profiles (:func:`~fvlm_core.model.profile.intensity_profiles`)
        of a windowed ``image (B, 1, Z, Y, X)`` and its label map ``(B, Z, Y, X)``."""
        if not self.config.profile_bins:
            raise InputError("this model has no intensity profiles (profile_bins is 0)")
        return intensity_profiles(
            image, labels.to(image.device), len(self.anatomies), self.config.profile_bins, self.voxel_ml
        )

    @property
    def voxel_ml(self) -> float:
        """Volume of one model-space voxel in mL."""
        return math.prod(self.config.model_space().spacing_zyx) / 1000.0

    # ------------------------------------------------------------------ text
    @property
    def text_frozen(self) -> bool:
        """True when text features are a fixed function: no trainable encoder weight or adapter."""
        params = list(self._text_encoder().parameters())
        if self.text_adapter is not None:
            params += list(self.text_adapter.parameters())
        return not any(p.requires_grad for p in params)

    def freeze_text(self, train_top_layers: int = 0) -> None:
        """Freeze the text encoder except its top ``train_top_layers`` transformer layers, and
        record that in ``config.text`` (so a saved checkpoint says how it was trained)."""
        top = int(train_top_layers)
        encoder = self._text_encoder()
        layers = transformer_layers(encoder) if top else None
        if layers is not None and top > len(layers):
            raise ConfigError(f"text.train_top_layers is {top} but the text encoder has {len(layers)} layers")
        encoder.requires_grad_(False)
        if layers is not None:
            layers[len(layers) - top :].requires_grad_(True)
        self.config.text.freeze = True
        self.config.text.train_top_layers = top
        self.train(self.training)  # put the frozen part in eval mode

    @property
    def text_split(self) -> int | None:
        """The transformer layer whose input states are cached (the layers below are frozen and
        something above trains: top layers or the adapter); ``None`` when nothing is split."""
        cfg = self.config.text
        if not cfg.freeze or not (cfg.train_top_layers or self.text_adapter is not None):
            return None
        return len(transformer_layers(self._text_encoder())) - cfg.train_top_layers

    def _fill_text_states(self, texts: list[str], split: int, cache: TextCache) -> None:
        """Encode into ``cache.states`` the ``(T_i, H)`` token states entering layer ``split`` of
        the texts it lacks (in the order given, in batches of 64)."""
        missing = cache.states.missing(texts)
        if missing:
            with torch.no_grad():
                cache.states.put(
                    missing,
                    encode_layer_states(
                        self._text_encoder(), self.tokenizer, missing, self.config.text, split
                    ),
                )

    def _text_states(self, texts: list[str], split: int, cache: TextCache | None) -> list[torch.Tensor]:
        """Per text, the ``(T_i, H)`` token states entering layer ``split`` (frozen below it):
        from ``cache`` (encoded into it if missing), or encoded now without one."""
        if cache is None:
            with torch.no_grad():
                return encode_layer_states(
                    self._text_encoder(), self.tokenizer, texts, self.config.text, split
                )
        self._fill_text_states(texts, split, cache)
        return [s.to(self.device) for s in cache.states.rows(texts)]

    def _compute_text_features(self, texts: list[str], cache: TextCache | None) -> torch.Tensor:
        cfg = self.config.text
        split = self.text_split
        if split is None:
            return encode_features(
                self._text_encoder(), self.tokenizer, texts, cfg, adapter=self.text_adapter
            )
        states = self._text_states(texts, split, cache)
        return encode_from_layer(self._text_encoder(), states, split, cfg.pooling, adapter=self.text_adapter)

    def cache_text(self, texts: Sequence[str], cache: TextCache) -> None:
        """Encode ``texts`` now, in this order, into ``cache`` as training reads it: the frozen
        encoder's token states when top layers or an adapter train above them (:attr:`text_split`),
        else the pooled features (for a frozen encoder; see :meth:`encode_text_features`)."""
        texts = [str(t) for t in texts]
        split = self.text_split
        if split is not None:
            self._fill_text_states(texts, split, cache)
            return
        with torch.no_grad():
            self.encode_text_features(texts, cache)

    def encode_text_features(self, texts: Sequence[str], cache: TextCache | None = None) -> torch.Tensor:
        """``(N, H)`` pooled text features (before ``text_proj``), adapter included.

        With a ``cache``: the features are read from (and added to) ``cache.features`` when they
        are a fixed function (frozen encoder and no adapter, or eval mode) and the texts fit;
        when only the top layers or the adapter train, the token states entering them come from
        ``cache.states`` and the trainable part runs, with gradients, on every call in training
        mode. Without one, everything is computed now."""
        texts = [str(t) for t in texts]
        use_cache = (
            cache is not None
            and (self.text_frozen or not self.training)
            and len(set(texts)) <= cache.max_entries
        )
        if not use_cache:
            return self._compute_text_features(texts, cache)
        missing = cache.features.missing(texts)
        if missing:
            with torch.no_grad():
                cache.features.put(missing, self._compute_text_features(missing, cache))
        return cache.features.get(texts).to(self.device)

    def encode_text(self, texts: Sequence[str], cache: TextCache | None = None) -> torch.Tensor:
        """``(N, D)`` L2-normalised text embeddings ([CLS] or mean pooling, ``text_proj``);
        ``cache`` as in :meth:`encode_text_features`."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return torch.zeros(0, self.config.embed_dim, device=self.device)
        return F.normalize(self.text_proj(self.encode_text_features(texts, cache)), dim=-1)

    def forward(
        self,
        image: torch.Tensor,
        labels: torch.Tensor | None,
        present: torch.Tensor | None = None,
        membership: torch.Tensor | None = None,
    ) -> AnatomyEmbeddings:
        """Alias of :meth:`encode_image` (so DDP wraps the image path)."""
        return self.encode_image(image, labels, present=present, membership=membership)


#: ``fvlm_core.model.from_pretrained(directory, device, lazy_text)``: :meth:`FVLM.from_pretrained`
from_pretrained = FVLM.from_pretrained
