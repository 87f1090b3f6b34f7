"""Anatomy segmentation of CTs: one interface, three backends (label map, TotalSegmentator, built-in)."""

from fvlm_core.segmentation.base import (
    BACKENDS,
    AnatomyFacts,
    AnatomySegmentation,
    Progress,
    SegmentationBackend,
    compute_facts,
    get_backend,
)
from fvlm_core.segmentation.builtin import BuiltinBackend, BuiltinParams, segment_masks
from fvlm_core.segmentation.labelmap import LabelMapBackend, merge_labels
from fvlm_core.segmentation.totalseg import TotalSegmentatorBackend
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP

SegmentationBackend.register(BuiltinBackend)
SegmentationBackend.register(LabelMapBackend)
SegmentationBackend.register(TotalSegmentatorBackend)

__all__ = [
    "BACKENDS",
    "TOTAL_CLASS_MAP",
    "AnatomyFacts",
    "AnatomySegmentation",
    "BuiltinBackend",
    "BuiltinParams",
    "LabelMapBackend",
    "Progress",
    "SegmentationBackend",
    "TotalSegmentatorBackend",
    "compute_facts",
    "get_backend",
    "merge_labels",
    "segment_masks",
]
