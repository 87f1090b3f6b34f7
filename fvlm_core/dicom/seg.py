"""The anatomies of an analysis as a DICOM Segmentation (highdicom), on the source series' grid.

One BINARY segment per analysed anatomy that has voxels, numbered from 1 in catalog order, coded
with its SNOMED CT structure (Segmented Property Type) and category (Anatomical Structure, bone:
Tissue), its catalog colour, a tracking ID (the anatomy's title) and a new tracking UID that the
SR's measurement group of the anatomy repeats. Every frame references the source image it lies
on (Derivation Image Sequence), so viewers put the segments on the source series.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from fvlm_core.dicom import codes
from fvlm_core.dicom.records import Algorithm, ExportContent
from fvlm_core.dicom.source import SourceSeries

SERIES_NUMBER = 9501  # the derived series' numbers: SEG, SR, maps (any free number; never the source's)
MANUFACTURER = "fVLM for 3D Slicer"

_FAMILIES = {"ai": codes.AI_FAMILY, "morphology": codes.MORPHOLOGY_FAMILY, "manual": codes.MANUAL_FAMILY}


def equipment(content: ExportContent) -> dict[str, str]:
    """The equipment attributes of every derived object: the "device" is the model, identified
    by its weights' SHA-256 (as its serial number)."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": content.model.name[:64],
        "software_versions": f"fvlm {content.software_version}"[:64],
        "device_serial_number": content.model.version[:64],
    }


def segment_labels(content: ExportContent, names: list[str]) -> np.ndarray:
    """``content.labels`` with anatomy ``names[s - 1]`` as segment number ``s`` (others 0)."""
    lut = np.zeros(max(int(content.labels.max(initial=0)), len(content.catalog)) + 1, dtype=np.uint16)
    for s, name in enumerate(names, 1):
        lut[content.catalog.label(name)] = s
    out = lut[np.asarray(content.labels)]
    return out.astype(np.uint8) if len(names) < 256 else out


def _algorithm(segmenter: Algorithm) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=segmenter.name[:64], family=_FAMILIES[segmenter.family], version=segmenter.version[:64]
    )


def build_segmentation(content: ExportContent, source: SourceSeries, names: list[str]) -> hd.seg.Segmentation:
    """The DICOM SEG of anatomies ``names`` (see the module docstring); ``source`` is on the
    label map's grid (:meth:`SourceSeries.on_grid`)."""
    algorithm = _algorithm(content.segmenter)
    descriptions = []
    for number, name in enumerate(names, 1):
        anatomy = content.catalog[name]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=anatomy.title[:64],
                segmented_property_category=codes.category_code(anatomy),
                segmented_property_type=codes.anatomy_code(anatomy),
                algorithm_type=content.segmenter.kind,
                algorithm_identification=algorithm,
                tracking_uid=generate_uid(),
                tracking_id=anatomy.title[:64],
                display_color=hd.color.CIELabColor.from_rgb(*anatomy.color),
            )
        )
    return hd.seg.Segmentation(
        source_images=source.for_copying(),
        pixel_array=segment_labels(content, names),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        series_description="fVLM anatomies",
        content_label="FVLM_ANATOMY",
        content_description=f"Anatomies analysed by fVLM ({content.segmenter.name})"[:64],
        content_creator_name="",  # Type 2: no person made it (DCMTK warns when it is absent)
        **equipment(content),
    )
