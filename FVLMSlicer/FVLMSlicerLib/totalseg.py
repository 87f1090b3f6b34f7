"""TotalSegmentator in the panel: its segmentations recognised and reused, its state explained.

* A segmentation made by 3D Slicer's TotalSegmentator extension names each segment's ID after
  its class (``lung_upper_lobe_left``), may rename it to a terminology label ("Left upper lobe
  of lung") and tags it with the SNOMED CT codes of the package's mapping (the extension's
  ``readSegmentation``/``setTerminology``). :func:`totalseg_mapping` reads those with
  ``fvlm_core.segmentation.totalseg_classes.totalseg_segment_classes`` and maps each class to
  the model's anatomies with the rule ``fvlm_core.segmentation.labelmap.merge_labels`` applies
  to TotalSegmentator label maps (``class_lookup``: the catalog's class patterns).
* :func:`status` is ``fvlm_core.segmentation.totalseg.totalsegmentator_status()`` (package,
  version, weights), computed by a small separate Python (importing fvlm_core.segmentation
  takes seconds; a thread of Slicer's process would barely run, see ``process.py``) whose
  output :func:`status` reads when polled, and put in words for the panel by :func:`status_text`.

No Qt, no MRML here (segments come as ``(segment ID, name, terminology)`` triples).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fvlm_core.anatomy import AnatomyCatalog

Segments = Iterable[tuple[str, str, str]]


@dataclass
class TotalSegSegmentation:
    """What a TotalSegmentator segmentation gives a model.

    Attributes:
        classes: ``{segment ID: TotalSegmentator class}`` of its recognised segments.
        mapping: ``{segment ID: anatomy}`` for the classes that form one of the model's anatomies.
        missing: the model's anatomies none of its segments provides.
    """

    classes: dict[str, str]
    mapping: dict[str, str]
    missing: list[str] = field(default_factory=list)

    @property
    def provides(self) -> dict[str, list[str]]:
        """``{anatomy: [classes]}`` in the order of the segments."""
        out: dict[str, list[str]] = {}
        for segment_id, anatomy in self.mapping.items():
            out.setdefault(anatomy, []).append(self.classes[segment_id])
        return out


def _class_anatomies(classes: Iterable[str], catalog: AnatomyCatalog) -> dict[str, str]:
    """``{class: anatomy}`` by ``merge_labels``'s rule (``class_lookup`` on a numbered class map)."""
    from fvlm_core.segmentation.labelmap import class_lookup

    names = sorted(set(classes))
    lut = class_lookup(catalog, {i + 1: name for i, name in enumerate(names)})
    return {name: catalog.names[int(lut[i + 1]) - 1] for i, name in enumerate(names) if int(lut[i + 1]) > 0}


def is_totalseg(segments: Segments) -> bool:
    """Whether a segmentation looks made by the TotalSegmentator extension: a segment tagged with
    its terminology context, or at least three segments whose IDs are TotalSegmentator classes."""
    from fvlm_core.segmentation.totalseg_classes import SLICER_TOTALSEG_CONTEXT, known_class_names

    segments = list(segments)
    if any(terminology.startswith(SLICER_TOTALSEG_CONTEXT) for _, _, terminology in segments):
        return True
    known = known_class_names()
    return sum(segment_id in known for segment_id, _, _ in segments) >= 3


def totalseg_mapping(segments: Segments, catalog: AnatomyCatalog) -> TotalSegSegmentation | None:
    """The segments' TotalSegmentator classes and the anatomies they form; ``None`` when the
    segmentation does not look made by TotalSegmentator (:func:`is_totalseg`)."""
    from fvlm_core.segmentation.totalseg_classes import totalseg_segment_classes

    segments = list(segments)
    if not is_totalseg(segments):
        return None
    classes = totalseg_segment_classes(segments)
    anatomy_of = _class_anatomies(classes.values(), catalog)
    mapping = {sid: anatomy_of[cls] for sid, cls in classes.items() if cls in anatomy_of}
    missing = [name for name in catalog.names if name not in mapping.values()]
    return TotalSegSegmentation(classes, mapping, missing)


def provides_text(name: str, found: TotalSegSegmentation) -> str:
    """ "'CT segmentation' (TotalSegmentator) provides lung (5 segments), heart; not: aorta."."""
    parts = []
    for anatomy, classes in found.provides.items():
        parts.append(anatomy if len(classes) == 1 else f"{anatomy} ({len(classes)} segments)")
    text = f"'{name}' (TotalSegmentator, {len(found.classes)} segments) provides "
    text += ", ".join(parts) if parts else "none of this model's anatomies"
    if found.missing:
        text += f"; not: {', '.join(found.missing)} (not analysed)"
    return text + "."


# --- the package and its weights --------------------------------------------------------------

#: What the status process runs (``totalsegmentator_status()`` as one JSON line).
STATUS_SCRIPT = (
    "import json; from fvlm_core.segmentation.totalseg import totalsegmentator_status as s; "
    "print(json.dumps(s(fast=False)))"  # the panel runs the 1.5 mm models
)
_STATUS: dict[str, Any] = {}
_PROBE: Any = None


def check_in_background(refresh: bool = False) -> None:
    """Start computing :func:`status` in a separate Python (once; again with ``refresh``)."""
    global _PROBE
    from .process import BackgroundProcess
    from .warm import python_env, python_executable

    if _PROBE is None or refresh:
        _STATUS.clear()
        _PROBE = BackgroundProcess([python_executable(), "-c", STATUS_SCRIPT], python_env()).start()


def status() -> dict[str, Any] | None:
    """``totalsegmentator_status()`` as last computed, or ``None`` while it is being computed
    (starts the computation when none has been)."""
    if _PROBE is None:
        check_in_background()
    if not _STATUS and _PROBE.returncode() is not None:
        _PROBE.read()
        lines = _PROBE.log()
        try:
            _STATUS.update(json.loads(lines[-1]))
        except (IndexError, ValueError):  # fvlm_core's own dependencies missing: say so
            _STATUS.update(installed=False, error=(lines or ["the status check failed"])[-1])
        _PROBE.stop()
    else:
        _PROBE.read()  # keep its pipe from filling
    return dict(_STATUS) if _STATUS else None


def wait_for_status(timeout_s: float = 120.0) -> dict[str, Any]:
    """:func:`status`, waiting for it (Analyze with TotalSegmentator, Install: a user's click)."""
    import time

    deadline = time.monotonic() + timeout_s
    while (found := status()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return found or {"installed": False, "error": "the TotalSegmentator status check did not finish"}


def status_text(found: Mapping[str, Any]) -> tuple[str, bool]:
    """What the panel says about running TotalSegmentator, and whether to offer installing it."""
    if not found.get("installed"):
        why = f" ({found['error']})" if found.get("error") else ""
        return (
            "TotalSegmentator is not installed in Slicer"
            + why
            + ". Install it with the TotalSegmentator extension (Extensions Manager), or click Install "
            "TotalSegmentator to install the Python package here; or choose the built-in segmenter or an "
            "existing segmentation.",
            not found.get("error"),
        )
    text = f"TotalSegmentator {found.get('version') or ''} is installed.".replace("  ", " ")
    missing = found.get("missing_weights") or []
    if missing:
        text += (
            f" Its weights for the anatomies needed (nnU-Net datasets {', '.join(str(d) for d in missing)}) are "
            f"not in {found.get('weights_dir')}: FVLM runs TotalSegmentator offline and will not download "
            "them. Run TotalSegmentator once from its own module (it downloads them), then analyse again."
        )
    else:
        text += " It runs in the analysis worker (progress and Cancel as for the analysis)."
    return text, False
