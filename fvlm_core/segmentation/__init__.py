"""Anatomy segmentation of CTs: one interface, four backends (built-in, TotalSegmentator, a label
map, given segments), chosen by name in :mod:`~fvlm_core.segmentation.choice`.

The backends live in their own modules (:mod:`~fvlm_core.segmentation.builtin`,
:mod:`~fvlm_core.segmentation.totalseg`, :mod:`~fvlm_core.segmentation.labelmap`) and are imported
only when chosen.
"""

from fvlm_core.segmentation.base import (
    AnatomyFacts,
    AnatomySegmentation,
    Progress,
    SegmentationBackend,
    compute_facts,
)
from fvlm_core.segmentation.choice import BACKENDS, choose_backend, get_backend

__all__ = [
    "BACKENDS",
    "AnatomyFacts",
    "AnatomySegmentation",
    "Progress",
    "SegmentationBackend",
    "choose_backend",
    "compute_facts",
    "get_backend",
]
