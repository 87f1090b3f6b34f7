"""Similarity maps as DICOM Parametric Maps, one instance per map, in one series.

Why a Parametric Map and not a second (fractional) SEG: a map is a continuous per-voxel score
(0..1), which is what the Parametric Map IOD holds (32-bit float pixels with a real-world value
mapping), and it is what viewers display as a heat map: OHIF (3.9 and later, its
``cornerstone-dicom-pmap`` extension) and 3D Slicer (QuantitativeReporting's DICOMParametricMap
plugin, dcmqi's ``paramap2itkimage``). A FRACTIONAL SEG is shown by neither: OHIF refuses it
("Fractional segmentations are not supported"), dcmqi does not read it.

Each map has one frame per source slice (full rows and columns: OHIF's loader copies frames
into the source series' slots and needs that), references its source image per frame, holds
the anatomy as Frame Anatomy (its SNOMED CT code, laterality U or B), and its frames are stored
in increasing position along the slices' normal (row x column): dcmqi (Slicer) stacks frames
in stored order from the lowest position, so a map written top-down would be flipped in Slicer.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fvlm_core.anatomy import Anatomy
from fvlm_core.dicom import codes
from fvlm_core.dicom.records import ExportContent, MapRecord
from fvlm_core.dicom.seg import SERIES_NUMBER, equipment
from fvlm_core.dicom.source import SourceSeries


def build_map(
    record: MapRecord, content: ExportContent, source: SourceSeries, series_uid: str, number: int
) -> hd.pm.ParametricMap:
    """Parametric Map ``number`` (instance number) of series ``series_uid`` for one map."""
    anatomy = content.catalog[record.anatomy]
    what = f"{record.finding} on {anatomy.title}"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="similarity",
        lut_explanation=f"fVLM similarity, {what}"[:64],
        unit=codes.NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.SCORE,
    )
    pm = hd.pm.ParametricMap(
        source_images=source.for_copying(),
        pixel_array=np.asarray(record.array, dtype=np.float32),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER + 2,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="SIMILARITY",
        derived_pixel_contrast="NONE",  # as dcmqi writes it; dciodvfy does not know "QUANTITY"
        content_description=what[:64],
        series_description="fVLM similarity maps",
        content_creator_name="",  # Type 2: no person made it (DCMTK warns when it is absent)
        **equipment(content),
    )
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(anatomy)]
    _store_frames_by_increasing_position(pm)
    return pm


def _frame_anatomy(anatomy: Anatomy) -> Dataset:
    item = Dataset()
    item.AnatomicRegionSequence = [codes.anatomy_code(anatomy)]
    item.FrameLaterality = "B" if anatomy.bilateral else "U"
    return item


def _store_frames_by_increasing_position(pm: Dataset) -> None:
    """Reorder the frames (pixels and per-frame groups together) by increasing position along
    the row x column normal; each frame keeps its position, source image and dimension index."""
    iop = np.asarray(
        [
            float(v)
            for v in pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        ]
    )
    normal = np.cross(iop[:3], iop[3:])
    frames = pm.PerFrameFunctionalGroupsSequence
    where = [
        float(np.dot(normal, [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]))
        for f in frames
    ]
    order = np.argsort(where, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    pixels = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(frames), -1)
    pm.FloatPixelData = np.ascontiguousarray(pixels[order]).tobytes()
    pm.PerFrameFunctionalGroupsSequence = [frames[int(i)] for i in order]
