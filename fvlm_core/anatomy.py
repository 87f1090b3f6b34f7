"""Anatomy catalogs: which anatomies a model knows, how they are built from TotalSegmentator
classes, and how they are shown (colour, SNOMED CT code for 3D Slicer terminology).

An anatomy label map stores anatomy ``i`` of a catalog as value ``i + 1`` (0 = background),
as the public fVLM CT-RATE release does.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fvlm_core.errors import ConfigError, InputError

#: Slicer terminology category for anatomical structures (SNOMED CT).
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
#: The category Slicer's terminology and DICOM's CID 7150 put bone in (not "Anatomical Structure").
TISSUE = ("SCT", "85756007", "Tissue")


@dataclass(frozen=True)
class Anatomy:
    """One anatomy of a catalog.

    Attributes:
        name: identifier used in configs, reports and outputs (``"lung"``).
        ts_classes: TotalSegmentator class names merged into it; ``fnmatch`` patterns allowed
            (``"vertebrae_*"``).
        color: display colour, RGB in 0..255.
        snomed: ``(code, meaning)`` of the SNOMED CT anatomic structure, or ``None``.
        display_name: human-readable name used in reports and prompts (``"Lung"``).
        category: ``(scheme, code, meaning)`` of the segmentation category the anatomy belongs
            to (Slicer's terminology, DICOM CID 7150): Anatomical Structure, Tissue for bone.
        bilateral: the anatomy merges a left and a right structure (both lungs, both kidneys),
            DICOM laterality ``B``; ``False``: an unpaired structure (``U``).
    """

    name: str
    ts_classes: tuple[str, ...]
    color: tuple[int, int, int]
    snomed: tuple[str, str] | None = None
    display_name: str = ""
    category: tuple[str, str, str] = ANATOMICAL_STRUCTURE
    bilateral: bool = False

    @property
    def title(self) -> str:
        return self.display_name or self.name.replace("_", " ").capitalize()

    def matches(self, class_name: str) -> bool:
        return any(fnmatch.fnmatchcase(class_name, pat) for pat in self.ts_classes)


_LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)

# The 4 anatomies of the public CT-RATE release, in its order (mask value = index + 1).
_CTRATE = (
    Anatomy(
        "lung",
        (*_LUNG_LOBES, "lung", "lung_left", "lung_right"),
        (197, 165, 145),
        ("39607008", "Lung"),
        bilateral=True,
    ),
    Anatomy("heart", ("heart", "atrial_appendage_left"), (206, 110, 84), ("80891009", "Heart")),
    Anatomy("esophagus", ("esophagus",), (211, 171, 143), ("32849002", "Esophagus")),
    Anatomy("aorta", ("aorta",), (224, 97, 76), ("15825003", "Aorta")),
)

_EXTENDED_MORE = (
    Anatomy("trachea", ("trachea",), (182, 228, 255), ("44567001", "Trachea")),
    Anatomy("pulmonary_artery", ("pulmonary_artery",), (0, 122, 171), ("81040000", "Pulmonary artery")),
    Anatomy("liver", ("liver",), (221, 130, 101), ("10200004", "Liver")),
    Anatomy("gallbladder", ("gallbladder",), (139, 150, 98), ("28231008", "Gallbladder")),
    Anatomy("spleen", ("spleen",), (157, 108, 162), ("78961009", "Spleen")),
    Anatomy("pancreas", ("pancreas",), (249, 180, 111), ("15776009", "Pancreas")),
    Anatomy("stomach", ("stomach",), (216, 132, 105), ("69695003", "Stomach")),
    Anatomy(
        "kidney",
        ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"),
        (185, 102, 83),
        ("64033007", "Kidney"),
        bilateral=True,
    ),
    Anatomy(
        "adrenal_gland",
        ("adrenal_gland_left", "adrenal_gland_right"),
        (244, 208, 140),
        ("23451007", "Adrenal gland"),
        bilateral=True,
    ),
    Anatomy(
        "small_bowel",
        ("small_bowel", "duodenum"),
        (205, 167, 142),
        ("30315005", "Small intestine"),
        "Small bowel",
    ),
    Anatomy("colon", ("colon",), (204, 168, 143), ("71854001", "Colon")),
    Anatomy("urinary_bladder", ("urinary_bladder",), (222, 154, 132), ("89837001", "Urinary bladder")),
    Anatomy("thyroid_gland", ("thyroid_gland",), (220, 245, 20), ("69748006", "Thyroid gland")),
    Anatomy("prostate", ("prostate",), (230, 158, 140), ("41216001", "Prostate")),
    Anatomy(
        "bone",
        (
            "vertebrae_*",
            "rib_*",
            "sternum",
            "costal_cartilages",
            "sacrum",
            "hip_*",
            "femur_*",
            "humerus_*",
            "scapula_*",
            "clavicula_*",
            "skull",
            "bone",
        ),
        (241, 214, 145),
        ("272673000", "Bone"),  # DICOM's and Slicer's meaning of SNOMED "Bone structure"
        "Bone",
        category=TISSUE,
        bilateral=True,
    ),
)


@dataclass(frozen=True)
class AnatomyCatalog:
    """An ordered list of anatomies; anatomy ``i`` has label value ``i + 1``."""

    name: str
    anatomies: tuple[Anatomy, ...]
    _index: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.anatomies]
        if len(set(names)) != len(names):
            raise ConfigError(f"anatomy catalog {self.name!r} lists an anatomy twice: {names}")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    def __len__(self) -> int:
        return len(self.anatomies)

    def __iter__(self):
        return iter(self.anatomies)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Anatomy:
        return self.anatomies[self.index(name)]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.anatomies]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigError(
                f"anatomy {name!r} is not in catalog {self.name!r} (known: {', '.join(self.names)})"
            ) from None

    def label(self, name: str) -> int:
        """Label value of ``name`` in an anatomy label map (index + 1)."""
        return self.index(name) + 1

    def subset(self, names: Sequence[str], name: str | None = None) -> AnatomyCatalog:
        """A catalog with only ``names``, in that order (label values renumbered)."""
        return AnatomyCatalog(name or f"{self.name}-subset", tuple(self[n] for n in names))

    def lookup_table(self, class_map: Mapping[int, str]) -> np.ndarray:
        """Array ``lut`` with ``lut[ts_value] = anatomy label`` for a TotalSegmentator class map."""
        lut = np.zeros(max(class_map, default=0) + 1, dtype=np.uint8)
        for value, cls in class_map.items():
            for i, anatomy in enumerate(self.anatomies):
                if anatomy.matches(cls):
                    lut[value] = i + 1
                    break
        return lut

    def relabel(self, labels: np.ndarray, source: Sequence[str] | Mapping[int, str]) -> np.ndarray:
        """An anatomy label map whose values follow ``source`` -> the same map in this catalog's values.

        Args:
            labels: integer array of any shape (0 = background).
            source: what the values of ``labels`` mean: anatomy names in label order (value
                ``i + 1`` is ``source[i]``, as a cache or a model lists them) or ``{value: name}``.

        Returns:
            uint8 array of the same shape, anatomy ``i`` of this catalog as ``i + 1``; anatomies
            this catalog lacks and values ``source`` does not name become 0. When ``source`` already
            is this catalog's order, ``labels`` itself is returned (no copy).
        """
        named = dict(source) if isinstance(source, Mapping) else {i + 1: n for i, n in enumerate(source)}
        if named == {i + 1: n for i, n in enumerate(self.names)} and labels.dtype == np.uint8:
            return labels
        labels = np.asarray(labels)
        if labels.size and labels.min() < 0:
            raise InputError("label map holds negative values; label values must be >= 0")
        top = max(int(labels.max()) if labels.size else 0, max(named, default=0))
        lut = np.zeros(top + 1, dtype=np.uint8)
        for value, anatomy in named.items():
            if anatomy in self._index:
                lut[value] = self._index[anatomy] + 1
        return lut[labels]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "anatomies": [
                {
                    "name": a.name,
                    "ts_classes": list(a.ts_classes),
                    "color": list(a.color),
                    "snomed": list(a.snomed) if a.snomed else None,
                    "display_name": a.display_name,
                    "category": list(a.category),
                    "bilateral": a.bilateral,
                }
                for a in self.anatomies
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AnatomyCatalog:
        try:
            return cls(
                str(d.get("name", "custom")),
                tuple(
                    Anatomy(
                        name=a["name"],
                        ts_classes=tuple(a.get("ts_classes", ())),
                        color=tuple(int(c) for c in a.get("color", (128, 128, 128))),
                        snomed=tuple(a["snomed"]) if a.get("snomed") else None,
                        display_name=a.get("display_name", ""),
                        category=tuple(a.get("category") or ANATOMICAL_STRUCTURE),
                        bilateral=bool(a.get("bilateral", False)),
                    )
                    for a in d["anatomies"]
                ),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"invalid anatomy catalog definition: missing or bad field {exc}") from exc


CTRATE_CATALOG = AnatomyCatalog("ctrate", _CTRATE)
EXTENDED_CATALOG = AnatomyCatalog("extended", _CTRATE + _EXTENDED_MORE)
CATALOGS: dict[str, AnatomyCatalog] = {c.name: c for c in (CTRATE_CATALOG, EXTENDED_CATALOG)}


def get_catalog(name_or_names: str | Iterable[str]) -> AnatomyCatalog:
    """A named catalog (``"ctrate"``, ``"extended"``) or a subset of the extended one by anatomy names."""
    if isinstance(name_or_names, str):
        if name_or_names not in CATALOGS:
            raise ConfigError(f"unknown anatomy catalog {name_or_names!r} (known: {', '.join(CATALOGS)})")
        return CATALOGS[name_or_names]
    names = list(name_or_names)
    if names == CTRATE_CATALOG.names:
        return CTRATE_CATALOG
    return EXTENDED_CATALOG.subset(names, name="custom")


def load_class_map(path: str | os.PathLike) -> dict[int, str]:
    """Read a class map JSON ``{"1": "spleen", ...}`` (TotalSegmentator style) as ``{1: "spleen"}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f'{path}: not a class map JSON of the form {{"1": "spleen", ...}} ({exc})') from exc
