"""The findings of an analysis as a DICOM Comprehensive 3D SR measurement report (TID 1500).

Content tree (highdicom's TID 1500 classes)::

    Imaging Measurement Report (TID 1500), procedure: CT unspecified body region
      observer: device, the model (name, UID derived from its weights' SHA-256)
      Imaging Measurements
        Measurement Group (TID 1411, one per SEG segment, i.e. per analysed anatomy)
          Tracking Identifier / Tracking Unique Identifier  = the segment's
          Referenced Segment  -> the SEG instance, segment number, source series
          Finding, Finding Site  = the anatomy's SNOMED CT code
          Algorithm Identification (TID 4019): the model's name; version = weights SHA-256
          Volume (NUM, ml)
          Qualitative Evaluation (CODE, one per finding): 99FVLM finding = Yes (flagged) | No
            HAS PROPERTIES  Probability (DCM 122157) | Score (SCT 246262008, uncalibrated)  NUM, unit 1
            HAS PROPERTIES  Threshold Value (DCM 122411), on the same scale                  NUM, unit 1

The evidence (Current Requested Procedure Evidence) lists the source series and the SEG. The
report is COMPLETE, PRELIMINARY and UNVERIFIED: a model's output nobody has signed.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.uid import generate_uid

from fvlm_core.dicom import codes
from fvlm_core.dicom.records import ExportContent, FindingRecord
from fvlm_core.dicom.seg import MANUFACTURER, SERIES_NUMBER
from fvlm_core.dicom.source import SourceSeries


def _evaluation(finding: FindingRecord) -> hd.sr.QualitativeEvaluation:
    """The finding as a qualitative evaluation Yes/No with its value and threshold as properties."""
    evaluation = hd.sr.QualitativeEvaluation(
        codes.finding_code(finding.name), codes.YES if finding.flagged else codes.NO
    )
    scale = codes.PROBABILITY if finding.calibrated else codes.SCORE
    properties = [
        hd.sr.NumContentItem(scale, finding.value, codes.NO_UNITS, relationship_type="HAS PROPERTIES"),
        hd.sr.NumContentItem(
            codes.THRESHOLD, finding.threshold, codes.NO_UNITS, relationship_type="HAS PROPERTIES"
        ),
    ]
    evaluation[0].ContentSequence = hd.sr.ContentSequence(properties, is_root=False)
    return evaluation


def _observer(content: ExportContent) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["fvlm model", content.model.version]),  # one UID per weights
        name=content.model.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=content.model.name[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE, observer_identifying_attributes=device
        )
    )


def build_report(
    content: ExportContent, source: SourceSeries, seg: hd.seg.Segmentation, names: list[str]
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``content`` whose groups reference the segments of ``seg``
    (segment ``s`` holds anatomy ``names[s - 1]``)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=content.model.name[:64],
        version=content.model.version,
        parameters=[f"fvlm {content.software_version}"],
    )
    records = {a.name: a for a in content.anatomies}
    groups = []
    for segment in seg.SegmentSequence:
        record = records[names[segment.SegmentNumber - 1]]
        anatomy = codes.anatomy_code(content.catalog[record.name])
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment.TrackingUID, identifier=segment.TrackingID
                ),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment.SegmentNumber),
                finding_type=anatomy,
                finding_sites=[hd.sr.FindingSite(anatomy)],
                algorithm_id=algorithm,
                measurements=[hd.sr.Measurement(codes.VOLUME, record.volume_ml, codes.MILLILITER)],
                qualitative_evaluations=[_evaluation(f) for f in record.findings] or None,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=_observer(content),
        procedure_reported=codes.CT_PROCEDURE,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source.for_copying(), seg],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER + 1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="fVLM findings",
    )
    sr.CodingSchemeIdentificationSequence = [codes.coding_scheme_identification()]
    return sr
