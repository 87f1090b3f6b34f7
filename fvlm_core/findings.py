"""Findings: the 18 CT-RATE abnormality labels, the anatomy each is scored on, and the
zero-shot prompt wordings of the reference evaluation (fVLM's public ``eval.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fvlm_core.errors import ConfigError

#: The 18 CT-RATE labels, in CT-RATE's column order.
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: The anatomy fVLM scores each label on (16 labels; Medical material and Lymphadenopathy have none).
CTRATE_LABEL_ANATOMY: dict[str, str] = {
    "Arterial wall calcification": "aorta",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
    "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus",
    "Emphysema": "lung",
    "Atelectasis": "lung",
    "Lung nodule": "lung",
    "Lung opacity": "lung",
    "Pulmonary fibrotic sequela": "lung",
    "Pleural effusion": "lung",
    "Mosaic attenuation pattern": "lung",
    "Peribronchial thickening": "lung",
    "Consolidation": "lung",
    "Bronchiectasis": "lung",
    "Interlobular septal thickening": "lung",
}

#: Labels fVLM scores, in CT-RATE order.
FVLM_LABELS: tuple[str, ...] = tuple(lbl for lbl in CTRATE_LABELS if lbl in CTRATE_LABEL_ANATOMY)

# Reference prompt wordings where the positive prompt is not simply "{X}."
_REFERENCE_WORDING = {
    "Atelectasis": "Atelectatic",
    "Lung nodule": "Nodule",
    "Lung opacity": "Opacity",
    "Pulmonary fibrotic sequela": "Pulmonary fibrotic",
}


@dataclass(frozen=True)
class Finding:
    """A finding scored zero-shot on one anatomy.

    ``p = softmax([v.t_neg, v.t_pos] / tau)[1]``; when several wordings are given, their
    normalised text embeddings are averaged (and re-normalised) per side.
    """

    name: str
    anatomy: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    source: str = "ctrate"  # "ctrate" for the reference set, "user" for free-text findings

    @classmethod
    def from_name(
        cls,
        name: str,
        anatomy: str,
        positive: Sequence[str] | str | None = None,
        negative: Sequence[str] | str | None = None,
        source: str = "user",
    ) -> Finding:
        """A finding with the reference wording ("{X}." / "Not {X}.") unless wordings are given."""
        word = _REFERENCE_WORDING.get(name, name).rstrip(".")
        pos = (positive,) if isinstance(positive, str) else tuple(positive or (f"{word}.",))
        neg = (negative,) if isinstance(negative, str) else tuple(negative or (f"Not {word}.",))
        if not name.strip() or not anatomy.strip():
            raise ConfigError("a finding needs a name and an anatomy")
        if not pos or not neg or any(not p.strip() for p in pos + neg):
            raise ConfigError(f"finding {name!r}: positive and negative prompts must be non-empty text")
        return cls(name=name, anatomy=anatomy, positive=pos, negative=neg, source=source)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "anatomy": self.anatomy,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Finding:
        try:
            return cls.from_name(
                d["name"], d["anatomy"], d.get("positive"), d.get("negative"), d.get("source", "user")
            )
        except KeyError as exc:
            raise ConfigError(f"finding definition {dict(d)} lacks {exc.args[0]!r}") from exc


def no_finding(name: str, anatomy: str, source: str = "user") -> Finding:
    """``name`` worded "{Finding}." / "No {finding}.": a denial as CT-RATE reports write one
    (``fvlm demo``'s headline prompts, and the Slicer panel's for a model worded so)."""
    word = name.strip().rstrip(".")
    return Finding.from_name(name, anatomy, f"{word}.", f"No {word[:1].lower()}{word[1:]}.", source)


def ctrate_findings() -> list[Finding]:
    """The 16 CT-RATE findings fVLM scores, with the reference prompt wordings."""
    return [Finding.from_name(lbl, CTRATE_LABEL_ANATOMY[lbl], source="ctrate") for lbl in FVLM_LABELS]


def name_key(name: str) -> str:
    """What tells finding names apart: their letters and digits, case-folded. Names equal under
    it ("Lung mass" and "lung mass!", "Emphysema" and "emphysema") would share result entries,
    calibrations and similarity-map files."""
    return "".join(c for c in name.casefold() if c.isalnum())


def same_name_groups(names: Sequence[str]) -> list[list[str]]:
    """Groups of two or more ``names`` equal by :func:`name_key` (an exact repeat too)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(name_key(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


@dataclass
class FindingSet:
    """An ordered set of findings (default: the 16 CT-RATE ones), each named distinctly: names
    that differ only in case, spaces or punctuation are refused (:func:`name_key`)."""

    findings: list[Finding] = field(default_factory=ctrate_findings)

    def __post_init__(self) -> None:
        clash = same_name_groups([f.name for f in self.findings])
        if clash:
            shown = "; ".join(" and ".join(repr(n) for n in g) for g in clash)
            raise ConfigError(
                f"findings named alike: {shown}. Names that differ only in case, spaces or punctuation "
                "would share their results, calibrations and similarity-map files: give each finding a "
                "name that differs in its letters or digits (or keep one of them)."
            )

    def __iter__(self):
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def by_anatomy(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.anatomy, []).append(f)
        return out

    def check_anatomies(self, known: Sequence[str]) -> None:
        """Raise :class:`ConfigError` if a finding names an anatomy the model does not have."""
        bad = [f"{f.name!r} on {f.anatomy!r}" for f in self.findings if f.anatomy not in known]
        if bad:
            raise ConfigError(
                f"findings on anatomies this model does not have: {', '.join(bad)}. "
                f"The model knows: {', '.join(known)}."
            )
