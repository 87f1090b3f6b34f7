"""Report processing: anatomy-level decomposition of CT reports and CT-RATE finding labels.

- :func:`decompose_report` — per-anatomy training texts and normal/abnormal flags (reference
  rule and negation-aware); :func:`load_decomposition_files` reads fVLM's published
  ``desc_info.json`` / ``conc_info.json``.
- :func:`extract_labels` — the 18 CT-RATE labels from report text (rule-based, negation-aware);
  :func:`labels_by_anatomy` groups positive labels by the anatomy fVLM scores them on.
"""

from fvlm_core.errors import ReportWarning
from fvlm_core.reports.decompose import (
    Decomposer,
    ReportDecomposition,
    decompose_report,
    decomposition_from_texts,
    load_decomposition_files,
    normal_template,
    reference_caption,
    reference_decomposition,
    sentence_is_abnormal,
    training_text,
)
from fvlm_core.reports.labels import (
    LABEL_RULES,
    extract_labels,
    label_mentions,
    labels_by_anatomy,
    score_labels,
)
from fvlm_core.reports.sentences import looks_english, split_sections, split_sentences

__all__ = [
    "LABEL_RULES",
    "Decomposer",
    "ReportDecomposition",
    "ReportWarning",
    "decompose_report",
    "decomposition_from_texts",
    "extract_labels",
    "label_mentions",
    "labels_by_anatomy",
    "load_decomposition_files",
    "looks_english",
    "normal_template",
    "reference_caption",
    "reference_decomposition",
    "score_labels",
    "sentence_is_abnormal",
    "split_sections",
    "split_sentences",
    "training_text",
]
