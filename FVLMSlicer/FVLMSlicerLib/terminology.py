"""Slicer terminology strings and the mapping of segments to model anatomies (pure Python).

A 3D Slicer segment describes what it holds with a serialized terminology entry (the
``TerminologyEntry`` tag)::

    context~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^~regionContext~^^~^^

i.e. ``~``-separated: context name, category, type, type modifier, anatomic region context,
region, region modifier; each code is ``scheme^value^meaning``. This module writes those for
the anatomies of a :class:`~fvlm_core.anatomy.AnatomyCatalog` and maps segments made elsewhere
(the TotalSegmentator extension, manual segmentations, files) onto the model's anatomies by
SNOMED CT code first and by name second. It needs neither Slicer nor Qt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fvlm_core.anatomy import Anatomy, AnatomyCatalog

#: Slicer's built-in anatomy terminology; Lung, Heart, Aorta, ... are in it with these codes,
#: under the category each anatomy's ``Anatomy.category`` names (Bone under Tissue, the others
#: under Anatomical Structure: Slicer's ``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json``).
GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
#: The context of Slicer's DICOM master list (``...-DICOM-Master.json``), for the catalog's codes
#: the General Anatomy list lacks.
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
#: SNOMED CT codes of the catalog that Slicer's General Anatomy list does not hold (its DICOM
#: master list does): Pulmonary artery.
NOT_IN_GENERAL_ANATOMY = frozenset({"81040000"})
#: Context name for the anatomic region part (unused for anatomical structures).
ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"

# SNOMED CT codes the TotalSegmentator extension (and DICOM SEG files from TotalSegmentator)
# put on segments, mapped to a TotalSegmentator class name. Laterality lives in the type
# modifier, so one class per code is enough: the catalog merges left and right anyway.
SNOMED_TO_TS_CLASS: dict[str, str] = {
    "39607008": "lung",
    "45653009": "lung_upper_lobe_left",  # Upper lobe of lung (+ Left/Right modifier)
    "90572001": "lung_lower_lobe_left",  # Lower lobe of lung
    "72481006": "lung_middle_lobe_right",  # Middle lobe of right lung
    "44029006": "lung_left",  # Left lung
    "3341006": "lung_right",  # Right lung
    "80891009": "heart",
    "305223006": "atrial_appendage_left",  # Entire atrial appendage
    "33626005": "atrial_appendage_left",  # Left atrial appendage
    "32849002": "esophagus",
    "15825003": "aorta",
    "44567001": "trachea",
    "81040000": "pulmonary_artery",
    "10200004": "liver",
    "28231008": "gallbladder",
    "78961009": "spleen",
    "15776009": "pancreas",
    "69695003": "stomach",
    "64033007": "kidney_left",
    "23451007": "adrenal_gland_left",
    "30315005": "small_bowel",
    "38848004": "duodenum",
    "71854001": "colon",
    "89837001": "urinary_bladder",
    "69748006": "thyroid_gland",
    "41216001": "prostate",
    "56873002": "sternum",
    "54735007": "sacrum",
    "113197003": "rib_left_1",  # Rib
    "51282000": "vertebrae_T1",  # Vertebra
    "89546000": "skull",
    "29836001": "hip_left",
    "71341001": "femur_left",
    "85050009": "humerus_left",
    "79601000": "scapula_left",
    "51299004": "clavicula_left",
    "272673000": "bone",  # Bone structure
}

_LATERALITY_WORDS = {"left", "right", "l", "r", "of", "the", "entire", "structure"}


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme designator (``SCT``), code value, code meaning."""

    scheme: str = ""
    value: str = ""
    meaning: str = ""

    def serialize(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> Code:
        parts = (text or "").split("^")
        parts += [""] * (3 - len(parts))
        return cls(parts[0].strip(), parts[1].strip(), "^".join(parts[2:]).strip())


@dataclass(frozen=True)
class TerminologyEntry:
    """A parsed Slicer terminology entry (see the module docstring for the string form)."""

    context: str
    category: Code
    type: Code
    type_modifier: Code = Code()
    region_context: str = ""
    region: Code = Code()
    region_modifier: Code = Code()

    def serialize(self) -> str:
        return "~".join(
            [
                self.context,
                self.category.serialize(),
                self.type.serialize(),
                self.type_modifier.serialize(),
                self.region_context,
                self.region.serialize(),
                self.region_modifier.serialize(),
            ]
        )

    @classmethod
    def parse(cls, text: str) -> TerminologyEntry | None:
        """Parse a serialized entry; ``None`` for an empty or malformed string."""
        if not text or "~" not in text:
            return None
        parts = text.split("~")
        parts += [""] * (7 - len(parts))
        return cls(
            context=parts[0],
            category=Code.parse(parts[1]),
            type=Code.parse(parts[2]),
            type_modifier=Code.parse(parts[3]),
            region_context=parts[4],
            region=Code.parse(parts[5]),
            region_modifier=Code.parse(parts[6]),
        )


def anatomy_terminology(anatomy: Anatomy) -> str:
    """Serialized Slicer terminology entry for an anatomy ("" when it has no SNOMED code), in
    the category Slicer's terminology (and the DICOM SEG) puts it: ``Anatomy.category``."""
    if not anatomy.snomed:
        return ""
    code, code_meaning = anatomy.snomed
    context = DICOM_MASTER_CONTEXT if code in NOT_IN_GENERAL_ANATOMY else GENERAL_ANATOMY_CONTEXT
    return TerminologyEntry(
        context=context,
        category=Code(*anatomy.category),
        type=Code("SCT", code, code_meaning),
        region_context=ANATOMIC_REGION_CONTEXT,
    ).serialize()


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def _anatomy_for_class(catalog: AnatomyCatalog, class_name: str) -> str | None:
    for anatomy in catalog:
        if anatomy.name == class_name or anatomy.matches(class_name):
            return anatomy.name
    return None


def _anatomy_for_code(catalog: AnatomyCatalog, code: str) -> str | None:
    if not code:
        return None
    for anatomy in catalog:
        if anatomy.snomed and anatomy.snomed[0] == code:
            return anatomy.name
    ts_class = SNOMED_TO_TS_CLASS.get(code)
    return _anatomy_for_class(catalog, ts_class) if ts_class else None


def _meaning_index(catalog: AnatomyCatalog) -> dict[str, str]:
    """Lower-case SNOMED meanings / display names (laterality words removed) -> anatomy name."""
    index: dict[str, str] = {}
    for anatomy in catalog:
        for text in (anatomy.title, anatomy.snomed[1] if anatomy.snomed else ""):
            if text:
                index[_strip_laterality(text)] = anatomy.name
    return index


def _strip_laterality(text: str) -> str:
    words = [w for w in _normalize(text).split("_") if w and w not in _LATERALITY_WORDS]
    return "_".join(words)


def match_segment(
    catalog: AnatomyCatalog,
    name: str,
    terminology: str = "",
    overrides: Mapping[str, str] | None = None,
) -> str | None:
    """The catalog anatomy a segment holds, or ``None`` when it holds none of them.

    Order: an explicit ``overrides`` entry (segment name -> anatomy), the terminology's type
    code (then its anatomic region code, for e.g. "Cyst" in "Kidney"), the segment name as a
    TotalSegmentator class or anatomy name (``lung_upper_lobe_left``, ``Heart``), and finally
    the name with laterality words removed against SNOMED meanings ("Left upper lobe of lung").
    """
    if overrides and name in overrides:
        target = overrides[name]
        return target if target in catalog else None
    entry = TerminologyEntry.parse(terminology)
    if entry is not None:
        for code in (entry.type.value, entry.region.value):
            found = _anatomy_for_code(catalog, code)
            if found:
                return found
    norm = _normalize(name)
    found = _anatomy_for_class(catalog, norm)
    if found:
        return found
    stripped = _strip_laterality(name)
    meanings = _meaning_index(catalog)
    if stripped in meanings:
        return meanings[stripped]
    # "upper lobe of lung" -> TotalSegmentator class via the meaning of its code
    for anatomy in catalog:
        for ts_class in anatomy.ts_classes:
            if _strip_laterality(ts_class.replace("*", "")) == stripped and stripped:
                return anatomy.name
    lobe = re.fullmatch(r"(upper|lower|middle)_lobe(_lung)?|lung_(upper|lower|middle)_lobe|lungs?", stripped)
    if lobe:
        return _anatomy_for_class(catalog, "lung")
    return None


def map_segments(
    catalog: AnatomyCatalog,
    segments: Iterable[tuple[str, str, str]],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map ``(segment_id, name, terminology)`` triples to anatomies: ``{segment_id: anatomy}``.

    Segments that hold no catalog anatomy are left out (several segments may map to one
    anatomy: TotalSegmentator's five lung lobes all become ``lung``).
    """
    out: dict[str, str] = {}
    for segment_id, name, terminology in segments:
        anatomy = match_segment(catalog, name, terminology, overrides)
        if anatomy is not None:
            out[segment_id] = anatomy
    return out
