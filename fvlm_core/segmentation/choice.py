"""The one place a segmentation backend is chosen: by name and options, warning about coarse voxels.

``fvlm segment``, ``fvlm analyze`` and the 3D Slicer worker (through
:func:`fvlm_core.zeroshot.pipeline.run`), and ``fvlm prepare`` / ``fvlm evaluate`` (through
:func:`fvlm_core.data.ctrate.make_segmenter`) all choose their backend here, so they read the
same options the same way and warn alike when a CT is much coarser than its segmenter works at.

:data:`BACKENDS` names each backend's module and class; :func:`get_backend` imports only the
module of the backend asked for (the built-in segmenter's scipy stack, TotalSegmentator's
process handling), so a user of one backend loads none of the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.errors import ConfigError, warn
from fvlm_core.io import CTVolume
from fvlm_core.preprocess import spacing_warning
from fvlm_core.segmentation.base import AnatomySegmentation, Progress, SegmentationBackend

#: backend name -> ``module:class`` of its :class:`~fvlm_core.segmentation.base.SegmentationBackend`
BACKENDS: dict[str, str] = {
    "builtin": "fvlm_core.segmentation.builtin:BuiltinBackend",
    "totalsegmentator": "fvlm_core.segmentation.totalseg:TotalSegmentatorBackend",
    "labelmap": "fvlm_core.segmentation.labelmap:LabelMapBackend",
    "segments": "fvlm_core.segmentation.labelmap:SegmentsBackend",
}

#: The sources :func:`choose_backend` takes.
SOURCES = tuple(BACKENDS)


def get_backend(name: str, **options: Any) -> SegmentationBackend:
    """Backend by name, built with its constructor's options: ``"builtin"``,
    ``"totalsegmentator"``, ``"labelmap"`` (needs ``path=``) or ``"segments"`` (``segments=``).

    Applications choose theirs from user options with :func:`choose_backend`, which builds it here.
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown segmentation backend {name!r} (choose from: {', '.join(BACKENDS)})")
    if name == "labelmap" and options.get("path") is None:
        raise ConfigError("the labelmap backend needs a label map: pass --labelmap FILE (or path=...)")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


#: voxel size (z, y, x mm) each segmenter works at, for the warning about much coarser CTs; the
#: builtin segmenter is tuned on diagnostic chest CT, i.e. the reference model space. A given
#: segmentation (labelmap, segments) is used as it is.
BACKEND_SPACING_ZYX = {
    "builtin": (3.0, 1.0, 1.0),
    "totalsegmentator": (1.5, 1.5, 1.5),
    "totalsegmentator --fast": (3.0, 3.0, 3.0),
}


def choose_backend(
    source: str,
    *,
    labelmap: str | None = None,
    class_map: Any = None,
    segments: list[Mapping[str, Any]] | None = None,
    fast: bool = False,
    device: str = "auto",
    allow_download: bool = False,
    roi_subset: bool = True,
    should_cancel: Callable[[], bool] | None = None,
) -> SegmentationBackend:
    """The backend for ``source`` (one of :data:`SOURCES`) with its options.

    Args:
        labelmap, class_map: ``labelmap``: the label map file or mask folder and its class map.
        segments: ``segments``: the layers' segments (:class:`~fvlm_core.segmentation.labelmap.SegmentsBackend`).
        fast, device, allow_download, roi_subset, should_cancel: ``totalsegmentator``'s options
            (``roi_subset``: only the classes the catalog's anatomies need).

    Raises:
        ConfigError: an unknown source, or a source without the input it needs.
    """
    options: dict[str, Any] = {}
    if source == "totalsegmentator":
        options = {"fast": fast, "device": device, "allow_download": allow_download}
        options.update(roi_subset=roi_subset, should_cancel=should_cancel)
    elif source == "labelmap":
        options = {"path": labelmap, "class_map": class_map}
    elif source == "segments":
        options = {"segments": list(segments or [])}
    elif source != "builtin":
        raise ConfigError(f"unknown segmentation backend {source!r} (choose from: {', '.join(SOURCES)})")
    return get_backend(source, **options)


def spacing_kind(backend: SegmentationBackend) -> str:
    """The key of :data:`BACKEND_SPACING_ZYX` for ``backend`` (its name, ``--fast`` marked)."""
    return backend.name + (" --fast" if getattr(backend, "fast", False) else "")


def segment(
    ct: CTVolume, catalog: AnatomyCatalog, backend: SegmentationBackend, progress: Progress | None = None
) -> AnatomySegmentation:
    """Segment ``ct`` with ``backend``; first warn when ``ct`` is much coarser than it works at."""
    kind = spacing_kind(backend)
    if kind in BACKEND_SPACING_ZYX:
        coarse = spacing_warning(ct.geometry, BACKEND_SPACING_ZYX[kind], f"the {kind} segmenter", ct.source)
        if coarse:
            warn(coarse)
    return backend.segment(ct, catalog, progress=progress)
