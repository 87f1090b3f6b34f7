"""Results as DICOM objects an archive or viewer can hold (``fvlm analyze --dicom-out``).

* :mod:`~fvlm_core.dicom.source`: the source series' headers, checked before any work.
* :mod:`~fvlm_core.dicom.records`: what an export needs (:class:`ExportContent`) and the one
  adapter from the analysis results (:func:`content_from_results`).
* :mod:`~fvlm_core.dicom.seg`, :mod:`~fvlm_core.dicom.sr`, :mod:`~fvlm_core.dicom.pmap`: the
  DICOM Segmentation of the anatomies, the TID 1500 Comprehensive 3D SR of the findings, the
  similarity maps as Parametric Maps (highdicom).
* :func:`write_dicom`: all of them into one (staged) folder; :func:`export_analysis`: the whole
  export in one call from the source files, label map and results (what 3D Slicer's "Export to
  DICOM" calls), written as a new folder all at once.

Importing this package imports highdicom; ``fvlm_core`` imports it only when DICOM is written.
"""

from fvlm_core.dicom.export import export_analysis, write_dicom
from fvlm_core.dicom.records import (
    Algorithm,
    AnatomyRecord,
    ExportContent,
    FindingRecord,
    MapRecord,
    content_from_results,
)
from fvlm_core.dicom.source import SourceSeries, read_source_files, read_source_series

__all__ = [
    "Algorithm",
    "AnatomyRecord",
    "ExportContent",
    "FindingRecord",
    "MapRecord",
    "SourceSeries",
    "content_from_results",
    "export_analysis",
    "read_source_files",
    "read_source_series",
    "write_dicom",
]
