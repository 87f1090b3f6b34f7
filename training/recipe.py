"""Training recipes: typed, validated options, read from YAML and ``--set KEY=VALUE``.

A recipe is a :class:`Recipe`: the model to train (``model``, ``model_overrides``,
``init_from``), the ``objective`` and four sections of options: :class:`DataOptions`
(``data.*``), :class:`TrainOptions` (``train.*``), :class:`OptimOptions` (``optim.*``) and
:class:`LossOptions` (``loss.*``). Every option has a default; a recipe file or a mapping sets
some of them and ``--set`` overrides any (dotted keys, YAML values)::

    recipe = load_recipe("tiny-cpu", ["optim.lr=3e-4", "data.cache=cache/"])
    recipe.train.batch_size          # 16 (an int: checked when the recipe is built)

An unknown key or a value of the wrong type or range is refused when the recipe is built, with
a :class:`~fvlm_core.errors.ConfigError` naming the key, so a bad option never costs a run. The
bundled recipes are ``training/configs/*.yaml`` (:func:`available_recipes`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fvlm_core.errors import ConfigError
from fvlm_core.model import FVLMConfig, load_config
from fvlm_core.model.config import plain_data
from fvlm_training.precision import PRECISIONS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

OBJECTIVES = ("fvlm", "global_clip")
RECONSTRUCTIONS = ("random", "first", "all")
INTACT_RULES = ("interior", "strict")
PAD_OFFSETS = ("random", "centre")
#: learning-rate schedules (fvlm_training.schedule builds them; defined here so that reading a
#: recipe, and with it every `fvlm` start, needs no torch)
SCHEDULES = ("step_cosine", "epoch_cosine")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|gpu|mps)$")

#: Options that may change when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.max_minutes",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.progress_bar",
        "train.threads",
        "data.num_workers",
        "data.cache",
        "train.device",
    }
)


# =============================================================================================
# Value checks (each names the option it refuses)
# =============================================================================================


def _refuse(key: str, want: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {want}, got {value!r} (check the recipe or --set)")


def _int(value: Any, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    want = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML reads 1e3 as a float
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(key, want, value)
    if minimum is not None and value < minimum:
        raise _refuse(key, want, value)
    return value


def _float(
    value: Any,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
) -> float | None:
    if value is None and optional:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    want = "a number" + (f" {' and '.join(bounds)}" if bounds else "") + (" or null" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(key, want, value)
    value = float(value)
    if value != value or (low is not None and (value <= low if low_open else value < low)):
        raise _refuse(key, want, value)
    if high is not None and value > high:
        raise _refuse(key, want, value)
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(key, "true or false", value)
    return value


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _refuse(key, "one of " + ", ".join(choices), value)
    return value


def _text(value: Any, key: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _refuse(key, "a non-empty string" + (" or null" if optional else ""), value)
    return value


# =============================================================================================
# The schema
# =============================================================================================


@dataclass
class DataOptions:
    """``data.*``: what the trainer reads and how each sample is cropped and flipped."""

    cache: str | None = None  # folder written by `fvlm prepare`
    reconstruction: str = "random"  # per scan: a random reconstruction each epoch | first | all
    crop_size: tuple[int, int, int] | None = None  # (z, y, x); None: the model's window
    random_crop: bool = True
    flip_prob: float = 0.2  # per axis
    intact_rule: str = "interior"  # fvlm_core.data.samples.AugmentConfig
    #: a volume shorter than the crop: at a random offset in it (a shift augmentation) or centred
    #: (the reference's symmetric padding)
    pad_offset: str = "random"
    #: feed the text encoder a normal anatomy's text without its leading template
    #: "{anatomy} shows no significant abnormalities." when findings follow (the reference);
    #: the full text still decides normality and same-text pairs
    strip_normal_template: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.cache = _text(self.cache, "data.cache")
        self.reconstruction = _choice(self.reconstruction, "data.reconstruction", RECONSTRUCTIONS)
        if self.crop_size is not None:
            size = self.crop_size
            if isinstance(size, str) or not isinstance(size, Sequence) or len(size) != 3:
                raise _refuse("data.crop_size", "a list of 3 integers (z, y, x) or null", size)
            self.crop_size = tuple(_int(c, "data.crop_size", minimum=1) for c in size)  # type: ignore[assignment]
        self.random_crop = _bool(self.random_crop, "data.random_crop")
        self.flip_prob = _float(self.flip_prob, "data.flip_prob", 0.0, 1.0)
        self.intact_rule = _choice(self.intact_rule, "data.intact_rule", INTACT_RULES)
        self.pad_offset = _choice(self.pad_offset, "data.pad_offset", PAD_OFFSETS)
        self.strip_normal_template = _bool(self.strip_normal_template, "data.strip_normal_template")
        self.num_workers = _int(self.num_workers, "data.num_workers", minimum=0)


@dataclass
class TrainOptions:
    """``train.*``: batches, length, precision, device, logging and checkpoints."""

    epochs: int = 1
    batch_size: int = 2  # per process
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; None: the epochs
    max_minutes: float | None = None  # wall-clock budget of the training loop
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (GPU or CPU) | fp16 (GPU)
    grad_checkpointing: bool = False  # ViT activation checkpointing (GPU memory)
    clip_grad_norm: float | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch.set_num_threads on CPU
    find_unused_parameters: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for key in (
            "epochs",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            setattr(self, key, _int(getattr(self, key), f"train.{key}", minimum=1))
        self.max_steps = _int(self.max_steps, "train.max_steps", minimum=0, optional=True)
        self.max_minutes = _float(self.max_minutes, "train.max_minutes", 0.0, low_open=True, optional=True)
        self.seed = _int(self.seed, "train.seed", minimum=0)
        self.threads = _int(self.threads, "train.threads", minimum=1, optional=True)
        self.clip_grad_norm = _float(
            self.clip_grad_norm, "train.clip_grad_norm", 0.0, low_open=True, optional=True
        )
        self.precision = _choice(self.precision, "train.precision", PRECISIONS)
        if not isinstance(self.device, str) or not _DEVICE.match(self.device.strip().lower()):
            raise _refuse("train.device", "auto, cpu, cuda, cuda:N, gpu or mps", self.device)
        for key in ("deterministic", "grad_checkpointing", "find_unused_parameters", "progress_bar"):
            setattr(self, key, _bool(getattr(self, key), f"train.{key}"))


@dataclass
class OptimOptions:
    """``optim.*``: AdamW and the warm-up + cosine learning-rate schedule."""

    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 377
    #: null: warm up as lr * (s + 1) / warmup_steps; a number: linearly from it (the reference: 1e-6)
    warmup_start_lr: float | None = None
    #: step_cosine: cosine per optimizer step; epoch_cosine: the reference's (warm-up in the first
    #: epoch, then one cosine value per epoch); see fvlm_training.schedule
    schedule: str = "step_cosine"
    weight_decay: float = 0.05
    #: false: no weight decay on biases, norms, the temperature, queries, position embeddings;
    #: true: on every parameter (the reference's AdamW over model.parameters())
    decay_all_parameters: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.lr = _float(self.lr, "optim.lr", 0.0, low_open=True)
        self.min_lr = _float(self.min_lr, "optim.min_lr", 0.0)
        self.warmup_steps = _int(self.warmup_steps, "optim.warmup_steps", minimum=0)
        self.warmup_start_lr = _float(self.warmup_start_lr, "optim.warmup_start_lr", 0.0, optional=True)
        self.schedule = _choice(self.schedule, "optim.schedule", SCHEDULES)
        self.weight_decay = _float(self.weight_decay, "optim.weight_decay", 0.0)
        self.decay_all_parameters = _bool(self.decay_all_parameters, "optim.decay_all_parameters")
        betas = self.betas
        if isinstance(betas, str) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise _refuse("optim.betas", "a list of 2 numbers in [0, 1)", betas)
        self.betas = tuple(_float(b, "optim.betas", 0.0, 1.0) for b in betas)  # type: ignore[assignment]
        if max(self.betas) >= 1.0:
            raise _refuse("optim.betas", "a list of 2 numbers in [0, 1)", list(betas))
        self.eps = _float(self.eps, "optim.eps", 0.0, low_open=True)


@dataclass
class LossOptions:
    """``loss.*``: the switches of :class:`fvlm_core.loss.FineGrainedContrastiveLoss` and whether
    to train a co-teaching peer (the ``fvlm`` objective; the ``global_clip`` baseline ignores them)."""

    normal_pairs: bool = True
    same_text: bool = True
    disease_pairs: float = 1.0
    co_teaching: bool = False  # train a peer model side by side (its own data stream; ~2.7x the compute)
    co_teaching_alpha: float = 0.5  # weight of the own targets once ramped up; the peer's share is 1 - alpha
    co_teaching_rampup_steps: int = 0  # the peer's share grows linearly from 0 over these optimizer steps
    skip_without_abnormal: bool = True

    def __post_init__(self) -> None:
        for key in ("normal_pairs", "same_text", "co_teaching", "skip_without_abnormal"):
            setattr(self, key, _bool(getattr(self, key), f"loss.{key}"))
        self.disease_pairs = _float(self.disease_pairs, "loss.disease_pairs", 0.0)
        self.co_teaching_alpha = _float(self.co_teaching_alpha, "loss.co_teaching_alpha", 0.0, 1.0)
        self.co_teaching_rampup_steps = _int(
            self.co_teaching_rampup_steps, "loss.co_teaching_rampup_steps", minimum=0
        )

    def co_teaching_weight(self, step: int) -> float:
        """The own targets' weight at optimizer step ``step`` (0-based): 1 at step 0, falling
        linearly to ``co_teaching_alpha`` at ``co_teaching_rampup_steps`` (the peer's share
        ``1 - weight`` ramps up from 0, as ALBEF's distillation weight)."""
        ramp = 1.0 if self.co_teaching_rampup_steps == 0 else min(1.0, step / self.co_teaching_rampup_steps)
        return 1.0 - ramp * (1.0 - self.co_teaching_alpha)


_SECTIONS: dict[str, type] = {
    "data": DataOptions,
    "train": TrainOptions,
    "optim": OptimOptions,
    "loss": LossOptions,
}


@dataclass
class Recipe:
    """A complete training recipe (module docstring); built from a mapping by :meth:`from_dict`."""

    #: model config: a bundled name (fvlm-tiny, fvlm-base), a YAML path, or a full mapping
    model: str | dict[str, Any] = "fvlm-tiny"
    #: deep-merged into the model config (e.g. {text: {freeze: true}})
    model_overrides: dict[str, Any] = field(default_factory=dict)
    #: start from a save_pretrained folder (e.g. imported official weights) instead of random
    #: init, or from an ImageNet MAE ViT checkpoint file (mae_pretrain_vit_base.pth: the ViT's
    #: blocks and position embedding, the rest random; fvlm_training.mae_init)
    init_from: str | None = None
    #: "fvlm": per-anatomy fine-grained loss; "global_clip": whole-volume vs whole-report CLIP baseline
    objective: str = "fvlm"
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    loss: LossOptions = field(default_factory=LossOptions)

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = copy.deepcopy(dict(self.model))
        else:
            self.model = _text(self.model, "model", optional=False)
        if not isinstance(self.model_overrides or {}, Mapping):
            raise _refuse("model_overrides", "a mapping of model config options", self.model_overrides)
        self.model_overrides = copy.deepcopy(dict(self.model_overrides or {}))
        self.init_from = _text(self.init_from, "init_from")
        self.objective = _choice(self.objective, "objective", OBJECTIVES)
        for name, section in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                _check_keys(value, section, f"{name}.")
                setattr(self, name, section(**value))
            elif not isinstance(value, section):
                raise _refuse(name, "a mapping of options", value)
        if self.objective == "global_clip" and self.loss.co_teaching:
            raise ConfigError(
                "loss.co_teaching trains a peer fVLM model: it applies to objective fvlm only, "
                "not to the global_clip baseline; set loss.co_teaching: false (check the recipe or --set)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A recipe from a (possibly partial) mapping; unknown keys and bad values are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a training recipe must be a mapping of options, got {type(data).__name__}")
        _check_keys(data, cls, "")
        kwargs = dict(data)
        for name in _SECTIONS:
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = {}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values (lists, not tuples), in the schema's order."""
        return plain_data(dataclasses.asdict(self))

    def with_limits(self, max_minutes: float | None = None, max_steps: int | None = None) -> Recipe:
        """The recipe with ``train.max_minutes`` / ``train.max_steps`` set where given (checked)."""
        changes: dict[str, Any] = {}
        if max_minutes is not None:
            changes["max_minutes"] = max_minutes
        if max_steps is not None:
            changes["max_steps"] = max_steps
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def model_config(self):
        """The :class:`~fvlm_core.model.FVLMConfig` to train: ``model`` (a mapping wins over
        ``init_from``'s config, which wins over a model name; a MAE checkpoint has no model
        config), with ``model_overrides`` merged in."""
        from fvlm_training.mae_init import is_mae_checkpoint

        try:
            if isinstance(self.model, Mapping):
                base = FVLMConfig.from_dict(self.model).to_dict()
            elif self.init_from and not is_mae_checkpoint(self.init_from):
                base = load_config(self.init_from).to_dict()
            else:
                base = load_config(self.model).to_dict()
            return FVLMConfig.from_dict(_merge(base, self.model_overrides, strict=False))
        except ConfigError as exc:
            raise ConfigError(f"the recipe's model (model, model_overrides, init_from): {exc}") from exc


def _check_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown training option {where}{unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
            + f"; valid options here: {', '.join(sorted(names))}"
        )


# =============================================================================================
# Loading: defaults <- recipe file or mapping <- --set overrides
# =============================================================================================


def _merge(base: dict, update: Mapping, where: str = "", strict: bool = True) -> dict:
    """``base`` updated by ``update`` (nested mappings merged); with ``strict`` an unknown key is refused."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        key = f"{where}{k}"
        if strict and k not in base:
            valid = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"unknown training option {key!r}; valid options here: {valid}")
        if k == "model_overrides" and isinstance(v, Mapping):
            out[k] = _merge(base.get(k) or {}, v, f"{key}.", strict=False)
        elif isinstance(base.get(k), dict) and isinstance(v, Mapping):
            out[k] = _merge(base[k], v, f"{key}.", strict and k != "model")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); values are YAML (numbers, lists, null, ...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; accept it as a number
        with contextlib.suppress(ValueError):
            value = float(value)
    return [k for k in key.strip().split(".") if k], value


def available_recipes() -> list[str]:
    """Names of the bundled recipes (``training/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_recipe(config: str | os.PathLike | Mapping[str, Any] | None) -> tuple[Mapping[str, Any], str]:
    """The mapping a recipe argument holds, and where it came from (for messages)."""
    if config is None:
        return {}, "defaults"
    if isinstance(config, Recipe):
        return config.to_dict(), "the given recipe"
    if isinstance(config, Mapping):
        return config, "the given mapping"
    path = Path(config)
    if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"training config {str(config)!r} not found: give a YAML file or a bundled recipe "
            f"({', '.join(available_recipes())})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML training config ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a training config must be a mapping of options")
    return data, str(path)


def load_recipe(
    config: str | os.PathLike | Mapping[str, Any] | Recipe | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """The recipe: defaults <- ``config`` (a bundled name, YAML path, mapping or :class:`Recipe`)
    <- ``overrides`` (``"key.sub=value"`` strings), its model config resolved once to check it.
    Raises :class:`ConfigError` naming a bad key or value."""
    data, source = _read_recipe(config)
    try:
        merged = _merge(Recipe().to_dict(), data)
        recipe = Recipe.from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    for item in overrides:
        keys, value = parse_override(item)
        if not keys:
            raise ConfigError(f"--set {item!r}: the key is empty; e.g. --set optim.lr=1e-4")
        update: Any = value
        for k in reversed(keys):
            update = {k: update}
        try:
            recipe = Recipe.from_dict(_merge(recipe.to_dict(), update))
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from exc
    recipe.model_config()  # the model part can only be checked whole: model, overrides, init_from
    return recipe


# =============================================================================================
# Resuming
# =============================================================================================


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "model_overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(old: Mapping[str, Any], new: Recipe, old_world: int, new_world: int) -> None:
    """Refuse to resume a checkpoint trained with ``old`` options (its stored mapping) under ``new``
    ones, unless only :data:`RESUMABLE_CHANGES` differ and the global batch is the same."""
    with contextlib.suppress(ConfigError):  # else compared as stored
        old = Recipe.from_dict(old).to_dict()  # the same normal form as the new recipe
    a, b = _flat(old), _flat(new.to_dict())
    diffs = [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    old_batch = int(old["train"]["batch_size"])
    if old_world * old_batch != new_world * new.train.batch_size:
        diffs.append(f"global batch ({old_world} x {old_batch} before)")
    if diffs:
        raise ConfigError(
            "the run folder's checkpoint was trained with different options: "
            + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" if k in a or k in b else k for k in diffs)
            + ". Resume with the original options, or pass --fresh (or another --out) to start a new run"
        )
