"""TotalSegmentator's class vocabulary: the "total" task's values and names, which classes a
catalog's anatomies need, and how a segment made by 3D Slicer's TotalSegmentator extension names
its class (segment ID, name or terminology codes).

Values as TotalSegmentator writes them with ``--ml`` (``totalsegmentator.map_to_binary.class_map["total"]``).
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from fvlm_core.anatomy import AnatomyCatalog

TOTAL_CLASS_MAP: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    15: "esophagus",
    16: "trachea",
    17: "thyroid_gland",
    18: "small_bowel",
    19: "duodenum",
    20: "colon",
    21: "urinary_bladder",
    22: "prostate",
    23: "kidney_cyst_left",
    24: "kidney_cyst_right",
    25: "sacrum",
    26: "vertebrae_S1",
    27: "vertebrae_L5",
    28: "vertebrae_L4",
    29: "vertebrae_L3",
    30: "vertebrae_L2",
    31: "vertebrae_L1",
    32: "vertebrae_T12",
    33: "vertebrae_T11",
    34: "vertebrae_T10",
    35: "vertebrae_T9",
    36: "vertebrae_T8",
    37: "vertebrae_T7",
    38: "vertebrae_T6",
    39: "vertebrae_T5",
    40: "vertebrae_T4",
    41: "vertebrae_T3",
    42: "vertebrae_T2",
    43: "vertebrae_T1",
    44: "vertebrae_C7",
    45: "vertebrae_C6",
    46: "vertebrae_C5",
    47: "vertebrae_C4",
    48: "vertebrae_C3",
    49: "vertebrae_C2",
    50: "vertebrae_C1",
    51: "heart",
    52: "aorta",
    53: "pulmonary_vein",
    54: "brachiocephalic_trunk",
    55: "subclavian_artery_right",
    56: "subclavian_artery_left",
    57: "common_carotid_artery_right",
    58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left",
    60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left",
    62: "superior_vena_cava",
    63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
    65: "iliac_artery_left",
    66: "iliac_artery_right",
    67: "iliac_vena_left",
    68: "iliac_vena_right",
    69: "humerus_left",
    70: "humerus_right",
    71: "scapula_left",
    72: "scapula_right",
    73: "clavicula_left",
    74: "clavicula_right",
    75: "femur_left",
    76: "femur_right",
    77: "hip_left",
    78: "hip_right",
    79: "spinal_cord",
    80: "gluteus_maximus_left",
    81: "gluteus_maximus_right",
    82: "gluteus_medius_left",
    83: "gluteus_medius_right",
    84: "gluteus_minimus_left",
    85: "gluteus_minimus_right",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    90: "brain",
    91: "skull",
    92: "rib_left_1",
    93: "rib_left_2",
    94: "rib_left_3",
    95: "rib_left_4",
    96: "rib_left_5",
    97: "rib_left_6",
    98: "rib_left_7",
    99: "rib_left_8",
    100: "rib_left_9",
    101: "rib_left_10",
    102: "rib_left_11",
    103: "rib_left_12",
    104: "rib_right_1",
    105: "rib_right_2",
    106: "rib_right_3",
    107: "rib_right_4",
    108: "rib_right_5",
    109: "rib_right_6",
    110: "rib_right_7",
    111: "rib_right_8",
    112: "rib_right_9",
    113: "rib_right_10",
    114: "rib_right_11",
    115: "rib_right_12",
    116: "sternum",
    117: "costal_cartilages",
}


#: Terminology context the Slicer TotalSegmentator extension puts on the segments it makes.
SLICER_TOTALSEG_CONTEXT = "Segmentation category and type - Total Segmentator"


def total_class_anatomies(catalog: AnatomyCatalog) -> dict[str, str]:
    """``{class: anatomy}`` for every "total" class one of ``catalog``'s anatomies takes
    (the first anatomy whose ``ts_classes`` pattern matches, as :meth:`AnatomyCatalog.lookup_table`)."""
    out = {}
    for name in TOTAL_CLASS_MAP.values():
        anatomy = next((a.name for a in catalog.anatomies if a.matches(name)), None)
        if anatomy is not None:
            out[name] = anatomy
    return out


def anatomies_without_total_class(catalog: AnatomyCatalog) -> list[str]:
    """Anatomies of ``catalog`` the "total" task cannot produce (e.g. ``pulmonary_artery``)."""
    covered = set(total_class_anatomies(catalog).values())
    return [a.name for a in catalog.anatomies if a.name not in covered]


def _package_file(relative: str) -> Path | None:
    """A file shipped in the installed ``totalsegmentator`` package, or ``None``."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def known_class_names() -> frozenset[str]:
    """Class names of every TotalSegmentator task (the installed package's list; else "total")."""
    names = set(TOTAL_CLASS_MAP.values())
    if importlib.util.find_spec("totalsegmentator") is not None:
        from totalsegmentator.map_to_binary import class_map

        names.update(n for task in class_map.values() for n in task.values())
    return frozenset(names)


@lru_cache(maxsize=1)
def snomed_classes() -> dict[tuple[str, str, str], str]:
    """``{(type code, type modifier code, region code): class}`` from the SNOMED CT mapping the
    installed package ships (the codes the Slicer extension and its DICOM SEG files use); empty
    when TotalSegmentator is not installed."""
    path = _package_file("resources/totalsegmentator_snomed_mapping.csv")
    if path is None:
        return {}
    out: dict[tuple[str, str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = (
                row.get("SegmentedPropertyTypeCodeSequence.CodeValue", ""),
                row.get("SegmentedPropertyTypeModifierCodeSequence.CodeValue", ""),
                row.get("AnatomicRegionSequence.CodeValue", ""),
            )
            out.setdefault(key, row["Structure"])  # first wins, as the file lists left before right
    return out


def _code_value(field: str) -> str:
    parts = field.split("^")
    return parts[1] if len(parts) > 1 else ""


def class_of_segment(segment_id: str, name: str, terminology: str = "") -> str | None:
    """The TotalSegmentator class a 3D Slicer segment holds, or ``None``.

    The Slicer extension names each segment's ID after its class (``lung_upper_lobe_left``); its
    display name may be the class or a terminology label ("Left upper lobe of lung"), and its
    ``TerminologyEntry`` tag carries SNOMED CT codes
    (``context~category~type~type modifier~region context~region~region modifier``). Checked in
    that order: ID, name, codes.
    """
    known = known_class_names()
    for text in (segment_id, name):
        key = text.strip().lower().replace(" ", "_")
        if key in known:
            return key
    fields = terminology.rstrip("|").split("~")
    if len(fields) >= 4:
        region = _code_value(fields[5]) if len(fields) > 5 else ""
        key = (_code_value(fields[2]), _code_value(fields[3]), region)
        return snomed_classes().get(key) or snomed_classes().get((key[0], key[1], ""))
    return None


def totalseg_segment_classes(segments: Iterable[tuple[str, str, str]]) -> dict[str, str]:
    """``{segment ID: class}`` for the segments of a segmentation that hold TotalSegmentator classes.

    Args:
        segments: ``(segment ID, name, TerminologyEntry tag)`` per segment.

    Use with :func:`fvlm_core.segmentation.labelmap.merge_labels`: export the segments to one label
    map, name each value by its segment's class, and merge into a catalog.
    """
    out = {}
    for segment_id, name, terminology in segments:
        cls = class_of_segment(segment_id, name, terminology or "")
        if cls is not None:
            out[segment_id] = cls
    return out
