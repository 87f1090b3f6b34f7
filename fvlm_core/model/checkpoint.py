"""Checkpoints: a folder with ``model.safetensors``, ``config.yaml`` and ``text/``.

``text/`` holds the text encoder's ``config.json`` and tokenizer files, so loading needs nothing
but the folder (no hub, no pickles). Weights are read with safetensors only.
``prompt_embeddings.safetensors`` holds the embeddings of the config's finding prompts
(:mod:`fvlm_core.model.prompt_store`), so scoring a model's own findings needs no text encoder:
``from_pretrained(..., lazy_text=True)`` then reads no text-encoder tensor and imports no
``transformers`` until a new prompt must be encoded.

The weights file's metadata records the anatomy names in order and the architecture signature
(:func:`architecture_signature`) of the config they were saved with. Loading refuses a
``config.yaml`` that disagrees (a reordered anatomy list would score each anatomy with another's
weights, and tensors of equal shape would not catch it); a folder saved before the metadata
existed loads with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fvlm_core import __version__
from fvlm_core.devices import resolve_device
from fvlm_core.errors import CheckpointError, ConfigError, warn
from fvlm_core.model import prompt_store
from fvlm_core.model.calibrated_with import bind_new_entries
from fvlm_core.model.config import FVLMConfig, load_config
from fvlm_core.model.text import build_text_encoder, folder_hidden_size
from fvlm_core.model.weights import (
    WEIGHTS_NAME,
    check_state_dict,
    read_metadata,
    read_safetensors,
    unshared_state_dict,
)
from fvlm_core.outputs import OutputPlan

CONFIG_NAME = "config.yaml"
TEXT_DIR = "text"
TEXT_ENCODER = "text_encoder."

#: tensors of the CLIP baseline's head (``fvlm_training.baseline.GlobalCLIP``): a baseline folder,
#: and model folders saved while the head was part of the fVLM model, hold them; an fVLM model
#: loads without them.
BASELINE_HEAD = ("global_proj.", "global_profile_embed.")

#: safetensors metadata keys (values are JSON text).
ANATOMIES_KEY = "fvlm_anatomies"
ARCHITECTURE_KEY = "fvlm_architecture"

#: config fields that do not change what the weights mean (training options, labels, runtime
#: switches); every other field, including any added later, is part of the signature.
NOT_ARCHITECTURE = frozenset(
    {
        "name",
        "anatomies",  # recorded on its own, in order
        "findings",
        "thresholds",
        "calibration",
        "calibrated_with",
        "versions",
        "temperature_init",
        "temperature_range",
        "pool_dropout",
        "vision.dropout",
        "vision.flash_attention",
        "text.name_or_path",  # the tokenizer and config come from the folder's text/
        "text.freeze",
        "text.train_top_layers",
        "text.max_length",
        "preprocessing.window_size_zyx",
        "preprocessing.multiple_zyx",
    }
)


def architecture_signature(config) -> dict[str, Any]:
    """The config fields that define what the weights mean, flattened (``"vision.hidden_size"``).

    Derived from the config itself (every field not in :data:`NOT_ARCHITECTURE`), not from a
    list of tensors, so a change to the model's modules does not change how it is computed.
    """

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            name = f"{prefix}{key}"
            if name in NOT_ARCHITECTURE:
                continue
            if isinstance(value, dict):
                out.update(flat(value, f"{name}."))
            else:
                out[name] = value
        return out

    return flat(config.to_dict())


def library_versions() -> dict[str, str]:
    """Versions of the code behind the weights, recorded with them: fvlm, torch, transformers (the
    text encoder) and MONAI (training's transforms; the image encoder is fvlm's rebuild of its
    ViT). Read from the installed distributions without importing them; one not installed is left
    out."""
    versions = {"fvlm": __version__, "torch": torch.__version__}
    for name in ("monai", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def save_text_files(model, directory: Path) -> None:
    """Write the text encoder's config and tokenizer into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.text_encoder.config.to_json_file(str(directory / "config.json"))
    model.tokenizer.save_pretrained(str(directory))


def save_pretrained(
    model,
    directory: str | os.PathLike,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    store_prompts: bool = True,
    **config_updates,
) -> Path:
    """Save ``model`` (an :class:`~fvlm_core.model.FVLM`) to ``directory``.

    The weights, ``config.yaml``, ``text/`` and the embeddings of the config's finding prompts
    (:mod:`~fvlm_core.model.prompt_store`; encoded now, in eval mode) are written all or none
    (:class:`fvlm_core.outputs.OutputPlan`): a failure leaves a previous checkpoint in the
    folder as it was. Each file is put in place by one atomic rename, ``config.yaml`` last, so
    even a process killed while they are moved leaves a folder that loads (each file the old or
    the new one; a first save killed there leaves no ``config.yaml``: not yet a model). Other
    files in the folder are left alone.

    Args:
        model: the model.
        directory: output folder (created).
        extra_tensors: more tensors for the weights file (the CLIP baseline's head).
        store_prompts: encode and store the finding prompts' embeddings (False: skip the
            encoding, e.g. for a folder saved again with thresholds moments later; a store
            already in the folder stays, and its text identity says whether it still applies).
        **config_updates: config fields to set before saving (e.g. ``thresholds={...}``).

    Returns:
        The folder.

    Raises:
        OutputError: the folder cannot be written (a file in its place, read-only, ...).
    """
    if not getattr(model, "text_loaded", True):
        raise CheckpointError(
            "this model was loaded without its text encoder (lazy_text=True), so its weights are not "
            "complete: load it with load_text_encoder(model, folder) before saving it"
        )
    directory = Path(directory)
    cfg_dict = model.config.to_dict()
    cfg_dict.update(config_updates)
    cfg_dict["versions"] = library_versions()
    config = FVLMConfig.from_dict(cfg_dict)
    metadata = {
        "format": "pt",
        "fvlm": config.versions["fvlm"],
        ANATOMIES_KEY: json.dumps(list(config.anatomies)),
        ARCHITECTURE_KEY: json.dumps(architecture_signature(config), sort_keys=True),
    }
    tensors = {
        **unshared_state_dict(model),
        **{k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()},
    }
    metadata[prompt_store.TEXT_DIGEST_KEY] = prompt_store.text_weights_digest(tensors)
    texts = prompt_store.prompt_texts(config)
    plan = OutputPlan()  # committed in this order: config.yaml, which makes the folder a model, last
    plan.folder(TEXT_DIR, directory / TEXT_DIR, replace=True, force=True)
    plan.file(WEIGHTS_NAME, directory / WEIGHTS_NAME)
    if store_prompts:
        plan.file(prompt_store.STORE_NAME, directory / prompt_store.STORE_NAME)
    plan.file(CONFIG_NAME, directory / CONFIG_NAME)
    with plan.writing() as staged:
        save_text_files(model, staged.path(TEXT_DIR))
        save_file(tensors, str(staged.path(WEIGHTS_NAME)), metadata=metadata)
        identity = prompt_store.text_identity(
            metadata[prompt_store.TEXT_DIGEST_KEY], staged.path(TEXT_DIR), config
        )
        bind_new_entries(config, config_updates, identity, before=model.config)
        staged.path(CONFIG_NAME).write_text(config.to_yaml(), encoding="utf-8")
        if store_prompts:
            embeddings = prompt_store.encode_prompts(model, texts)
            prompt_store.write_store(staged.path(prompt_store.STORE_NAME), texts, embeddings, identity)
    model.config = config
    return directory


#: files up to this size are hashed by :func:`folder_state` (configs, tokenizer files); larger ones
#: (the weights) are known by their size, times and inode: hashing them would cost seconds
HASHED_UP_TO = 8 << 20


def folder_state(directory: str | os.PathLike) -> str:
    """A digest of everything that defines the model a folder loads as: every file at any depth
    (``text/`` included): its path, size, modification and status-change times and inode, and
    the SHA-256 of the small ones (``config.yaml``, ``text/*.json``, the tokenizer), so an edit
    that keeps a file's size and time still counts. Hidden files (locks, temporary files) are
    left out. Equal digests: the same model; a process that keeps a loaded model (the Slicer
    worker) keys it on this."""
    root = Path(directory)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    for path in files:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        st = path.stat()
        h.update(json.dumps([rel.as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]).encode())
        if st.st_size <= HASHED_UP_TO:
            with contextlib.suppress(OSError):
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def check_saved_with(config, metadata: dict[str, str], source: str) -> None:
    """Refuse a config whose anatomies or architecture differ from those the weights were saved
    with (recorded in ``metadata``); warn when the weights record neither (an older folder).

    Raises:
        CheckpointError: naming both anatomy lists, or each differing field with both values.
    """
    if ANATOMIES_KEY not in metadata and ARCHITECTURE_KEY not in metadata:
        warn(
            f"{source} records no anatomy list or architecture (saved by an older fvlm), so config.yaml "
            f"cannot be checked against it: make sure its anatomies ({', '.join(config.anatomies)}) are "
            "in the order the model was trained with. Load and save the model once to add the record: "
            "python -c \"from fvlm_core.model import FVLM; FVLM.from_pretrained('DIR').save_pretrained('DIR')\""
        )
        return
    try:
        saved_anatomies = json.loads(metadata.get(ANATOMIES_KEY, "null"))
        saved_arch = json.loads(metadata.get(ARCHITECTURE_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(
            f"{source}: its metadata is damaged ({exc}); copy the checkpoint again"
        ) from exc
    if saved_anatomies is not None and list(saved_anatomies) != list(config.anatomies):
        raise CheckpointError(
            f"{source} was saved for the anatomies [{', '.join(saved_anatomies)}] (in this order), but "
            f"config.yaml lists [{', '.join(config.anatomies)}]: each anatomy would be scored with "
            f"another's weights. Restore `anatomies: [{', '.join(saved_anatomies)}]` in config.yaml."
        )
    now = architecture_signature(config)
    differ = [
        k for k in sorted(set(saved_arch) & set(now)) if saved_arch[k] != json.loads(json.dumps(now[k]))
    ]
    if differ:
        details = "; ".join(f"{k}: saved {saved_arch[k]!r}, config.yaml {now[k]!r}" for k in differ)
        raise CheckpointError(
            f"{source} was saved with another architecture than config.yaml describes ({details}). "
            "The weights would be used in a model they were not trained for: restore the saved values "
            "in config.yaml."
        )


def _text_encoder_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The ``text_encoder.*`` tensors of a weights file, names without the prefix."""
    tensors = read_safetensors(weights, keep=lambda k: k.startswith(TEXT_ENCODER))
    return {k[len(TEXT_ENCODER) :]: v for k, v in tensors.items()}


def load_text_encoder(model, directory: str | os.PathLike) -> None:
    """Build the text encoder of ``model``, loaded from ``directory`` with ``lazy_text=True``, from
    the folder's ``text/`` and weights, and attach it (no-op when it has one).

    Raises:
        CheckpointError: its weights do not match the encoder ``text/`` describes.
    """
    if model.text_loaded:
        return
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    # parameters made inside inference mode (e.g. the first prompt encoded under it) could never
    # be trained or version-tracked: build them as ordinary tensors
    with torch.inference_mode(False), torch.no_grad():
        encoder, tokenizer = build_text_encoder(
            model.config.text, source=directory / TEXT_DIR, weights=False, initialise=False
        )  # every parameter is loaded just below (strict, names and shapes checked)
        state = _text_encoder_tensors(weights)
        check_state_dict(encoder, state, f"{weights} (text encoder weights)")
        encoder.load_state_dict(state, strict=True)
        model.attach_text_encoder(encoder, tokenizer)


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for :class:`~fvlm_core.model.fvlm.FVLM` (a base class,
    as ``transformers``' ``PreTrainedModel``): a model folder in, a model folder out."""

    def save_pretrained(self, directory: str | os.PathLike, *, store_prompts: bool = True, **config_updates):
        """Write ``model.safetensors``, ``config.yaml``, ``text/`` (tokenizer + encoder config) and
        the finding prompts' embeddings (:func:`save_pretrained`)."""
        return save_pretrained(self, directory, store_prompts=store_prompts, **config_updates)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", lazy_text: bool = False
    ):
        """Load a checkpoint folder written by :func:`save_pretrained` (never unpickles).

        Args:
            directory: folder with ``config.yaml``, ``model.safetensors`` and ``text/``.
            device: a ``torch.device`` or a name :func:`fvlm_core.devices.resolve_device` takes
                (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``gpu``, ``mps``).
            lazy_text: leave the text encoder out (no ``transformers``, none of its tensors read):
                for scoring with the folder's stored prompt embeddings; :func:`load_text_encoder`
                adds it when a new prompt must be encoded. Folders without ``text/`` load it now.

        Returns:
            The model in eval mode on ``device``.

        Raises:
            CheckpointError: the folder is missing or incomplete, its weights do not fit its
                config, or the config's anatomies or architecture differ from those the weights
                were saved with.
            ConfigError: the device is unknown or not available here.
        """
        device = resolve_device(device)  # before reading anything: an absent GPU is reported first
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: checkpoint folder not found")
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{directory}: no {CONFIG_NAME}; not a checkpoint written by save_pretrained"
            )
        try:
            config = load_config(cfg_path)
        except ConfigError as exc:
            raise CheckpointError(f"{directory}: invalid model config: {exc}") from exc
        weights = directory / WEIGHTS_NAME
        if weights.is_file():
            check_saved_with(config, read_metadata(weights), str(weights))
        text_dir = directory / TEXT_DIR
        text_source = text_dir if text_dir.is_dir() else None
        lazy = lazy_text and folder_hidden_size(text_source) is not None
        # Without the text encoder no transformers module is built, so the rest is built on the meta
        # device (no storage, no random initialisation: ~1.4 s for fvlm-base on 2 cores) and takes
        # the file's tensors as its parameters (assign) instead of copying them into initialised ones.
        with torch.device("meta") if lazy else contextlib.nullcontext():
            model = cls(config, text_source=text_source, load_text_weights=False, build_text=not lazy)
        # the baseline's head, if the folder holds one, is not part of the fVLM model
        skip = (*BASELINE_HEAD, TEXT_ENCODER) if lazy else BASELINE_HEAD
        tensors = read_safetensors(weights, keep=lambda k: not k.startswith(skip))
        check_state_dict(model, tensors, str(directory / WEIGHTS_NAME))
        model.load_state_dict(tensors, strict=True, assign=lazy)
        if lazy and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise CheckpointError(f"{directory}: the model has state its weights file does not hold")
        return model.to(device).eval()
