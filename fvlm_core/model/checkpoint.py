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
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fvlm_core.errors import CheckpointError, ConfigError, warn

WEIGHTS_NAME = "model.safetensors"
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
    """Versions of the libraries that define the weights' meaning."""
    import monai
    import transformers

    from fvlm_core import __version__

    return {
        "fvlm": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "transformers": transformers.__version__,
    }


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with contiguous CPU tensors that share no memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


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
    from safetensors.torch import save_file

    from fvlm_core.model import prompt_store
    from fvlm_core.model.config import FVLMConfig
    from fvlm_core.outputs import OutputPlan

    if hasattr(model, "load_text_encoder"):
        model.load_text_encoder()  # a deferred encoder's weights belong in the file too
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
        **_unshared_state_dict(model),
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


def bind_new_entries(config, updates: dict, identity: str, before=None) -> None:
    """Record in ``config.calibrated_with`` what the stored thresholds and calibrations were
    fitted with (:mod:`fvlm_core.model.calibrated_with`): those given to :func:`save_pretrained`
    on the config's findings of their names, with the text side ``identity``; those carried over
    from ``before`` (the config the model had) without a record, on ``before``'s wording (the
    only one they can have been fitted on), text side unknown. Recorded entries are kept (and
    checked against the text side when used)."""
    from fvlm_core.model.calibrated_with import fitted_with

    given = set(updates.get("thresholds") or {}) | set(updates.get("calibration") or {})
    own = {f.name: f for f in config.finding_set()}
    old = {f.name: f for f in before.finding_set()} if before is not None else {}
    for name in set(config.thresholds) | set(config.calibration):
        if name in given:
            found, text = own.get(name), identity
        elif name not in config.calibrated_with:
            found, text = old.get(name), None
        else:
            continue
        if found is not None:
            config.calibrated_with[name] = fitted_with(found, text)
        else:  # fitted on a wording this folder does not know: never applied
            config.calibrated_with.pop(name, None)


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
    import hashlib

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


def read_safetensors(
    path: Path, device: str = "cpu", keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those whose name ``keep`` accepts, default all);
    :class:`CheckpointError` if it is missing, truncated or corrupt."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found; the checkpoint folder is incomplete")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated: {exc}); "
            "copy or download the checkpoint again"
        ) from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (``{}`` when it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated: {exc}); "
            "copy or download the checkpoint again"
        ) from exc


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
            "python -c \"from fvlm_core.model import from_pretrained as f; f('DIR').save_pretrained('DIR')\""
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


def check_state_dict(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Raise :class:`CheckpointError` when names or shapes of ``tensors`` do not match ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not any(s in k for s in allow_missing)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (model expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape, e.g. {'; '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match the model its config describes: {'; '.join(problems)}. "
            "The config and weights come from different models; re-save or re-import the checkpoint"
        )


def _text_encoder_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The ``text_encoder.*`` tensors of a weights file, names without the prefix."""
    tensors = read_safetensors(weights, keep=lambda k: k.startswith(TEXT_ENCODER))
    return {k[len(TEXT_ENCODER) :]: v for k, v in tensors.items()}


def from_pretrained(
    directory: str | os.PathLike, device: str | torch.device = "cpu", lazy_text: bool = False
):
    """Load a checkpoint folder written by :func:`save_pretrained`.

    Args:
        directory: folder with ``config.yaml``, ``model.safetensors`` and ``text/``.
        device: a ``torch.device`` or a name :func:`fvlm_core.devices.resolve_device` takes
            (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``gpu``, ``mps``).
        lazy_text: defer the text encoder (its tensors are read, and checked, when it is first
            used; see :class:`~fvlm_core.model.fvlm.FVLM`'s ``text_weights``): for scoring with
            stored prompt embeddings. Folders without ``text/`` load it now.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: the folder is missing or incomplete, its weights do not fit its config,
            or the config's anatomies or architecture differ from those the weights were saved with.
        ConfigError: the device is unknown or not available here.
    """
    from fvlm_core.devices import resolve_device
    from fvlm_core.model.config import load_config
    from fvlm_core.model.fvlm import FVLM
    from fvlm_core.model.text import folder_hidden_size

    device = resolve_device(device)  # before reading anything: an absent GPU is reported first
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a checkpoint written by save_pretrained")
    try:
        config = load_config(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: invalid model config: {exc}") from exc
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        check_saved_with(config, read_metadata(weights), str(weights))
    text_dir = directory / TEXT_DIR
    text_source = text_dir if text_dir.is_dir() else None
    deferred = lazy_text and folder_hidden_size(text_source) is not None
    text_weights = (lambda: _text_encoder_tensors(weights)) if deferred else None
    # Deferred: no transformers module is built now, so the rest is built on the meta device (no
    # storage, no random initialisation: ~1.4 s for fvlm-base on 2 cores) and takes the file's
    # tensors as its parameters (assign) instead of copying them into initialised ones.
    with torch.device("meta") if deferred else contextlib.nullcontext():
        model = FVLM(config, text_source=text_source, load_text_weights=False, text_weights=text_weights)
    # the baseline's head, if the folder holds one, is not part of the fVLM model
    skip = (*BASELINE_HEAD, TEXT_ENCODER) if deferred else BASELINE_HEAD
    tensors = read_safetensors(weights, keep=lambda k: not k.startswith(skip))
    check_state_dict(model, tensors, str(directory / WEIGHTS_NAME))
    model.load_state_dict(tensors, strict=True, assign=deferred)
    if deferred and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"{directory}: the model has state its weights file does not hold")
    return model.to(device).eval()
