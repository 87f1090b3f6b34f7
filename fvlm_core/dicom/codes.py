"""The coded concepts of fVLM's DICOM objects, in one place.

Anatomies are coded as 3D Slicer's terminology and TotalSegmentator's DICOM SEG code them: SNOMED
CT (``SCT``) structure codes from the anatomy catalog, in the category "Anatomical Structure"
(bone: "Tissue"). Findings are the model's prompt classes (the CT-RATE labels and any free-text
``--prompts`` finding), not clinical diagnoses, so they are coded in a local scheme, ``99FVLM``
(DICOM reserves designators starting with ``99`` for local schemes), whose code value is the
finding's name in lower case with ``_`` for other characters and whose meaning is its name.
Everything else is a concept of the DICOM standard (PS3.16), taken from pydicom's code tables.
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from fvlm_core.anatomy import Anatomy

#: The local coding scheme of the findings (declared in each object's Coding Scheme Identification).
FINDINGS_SCHEME = "99FVLM"
FINDINGS_SCHEME_NAME = "fVLM zero-shot findings (CT-RATE labels and user prompts)"

YES = codes.SCT.Yes  # 373066001
NO = codes.SCT.No  # 373067005
PROBABILITY = codes.DCM.Probability  # 122157
SCORE = codes.SCT.Score  # 246262008
THRESHOLD = codes.DCM.ThresholdValue  # 122411
VOLUME = codes.SCT.Volume  # 118565006
NO_UNITS = codes.UCUM.NoUnits  # "1"
MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
CT_PROCEDURE = codes.cid100.CTUnspecifiedBodyRegion  # LN 25045-6
REPORT_TITLE = codes.cid7021.ImagingMeasurementReport  # DCM 126000
DEVICE = codes.DCM.Device  # 121007
AI_FAMILY = codes.cid7162.ArtificialIntelligence
MORPHOLOGY_FAMILY = codes.cid7162.MorphologicalOperations
MANUAL_FAMILY = codes.cid7162.ManualProcessing


def anatomy_code(anatomy: Anatomy) -> CodedConcept:
    """The anatomy's SNOMED CT structure code (Segmented Property Type, SR finding site)."""
    if not anatomy.snomed:
        raise ValueError(f"anatomy {anatomy.name!r} has no SNOMED CT code; DICOM objects need one")
    code, meaning = anatomy.snomed
    return CodedConcept(code, "SCT", meaning)


def category_code(anatomy: Anatomy) -> CodedConcept:
    """The anatomy's segmentation category (Segmented Property Category)."""
    scheme, value, meaning = anatomy.category
    return CodedConcept(value, scheme, meaning)


def finding_code(name: str) -> CodedConcept:
    """A finding in the local scheme: ``Pleural effusion`` -> ``99FVLM`` ``pleural_effusion``."""
    value = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "finding"
    return CodedConcept(value, FINDINGS_SCHEME, name.strip()[:64])


def coding_scheme_identification():
    """The Coding Scheme Identification Sequence item that declares the local findings scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = FINDINGS_SCHEME
    item.CodingSchemeName = FINDINGS_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "fVLM for 3D Slicer"
    return item
