"""What the panel says, in words a radiologist reads: choices, numbers, status lines (no Qt).

The anatomy source and device are enums whose ``label`` Slicer's parameter node wrapper shows
in the combo boxes (``QComboBoxToEnumConnector`` uses ``label`` when the enum defines it) while
the value saved with the scene stays the member name.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the panel's words load before fvlm_core's dependencies are installed
    from fvlm_core.zeroshot.results import AnalysisResult, AnatomyResult, FindingResult

Row = tuple["AnatomyResult", "FindingResult"]


class _Labelled(enum.Enum):
    """An enum whose members are written ``NAME = value, label``: ``value`` is the member's value,
    ``label`` the words :meth:`label` gives the combo box."""

    def __new__(cls, value: str, label: str) -> _Labelled:
        member = object.__new__(cls)
        member._value_ = value
        member._label = label
        return member

    def label(self) -> str:
        return self._label


class AnatomySource(_Labelled):
    """Where the anatomies come from."""

    BUILTIN = "builtin", "Built-in segmenter (lungs; offline)"
    TOTALSEGMENTATOR = "totalsegmentator", "TotalSegmentator (all anatomies)"
    SEGMENTATION = "segmentation", "Existing segmentation"


class Device(_Labelled):
    """Where the model runs (values are ``fvlm_core.devices.resolve_device`` names)."""

    AUTO = "auto", "Automatic (GPU if available)"
    GPU = "cuda", "GPU (NVIDIA CUDA)"
    CPU = "cpu", "CPU"


#: Colours of the "Flagged" column (flagged, not flagged, not scored).
FLAGGED_COLORS = {"Yes": "#c62828", "No": "#2e7d32", "n/a": "#757575"}


def device_name(device: str) -> str:
    """A resolved torch device as words: ``cuda:0`` -> ``GPU (cuda:0)``, ``cpu`` -> ``CPU``."""
    if device.startswith("cuda"):
        return f"GPU ({device})"
    return {"cpu": "CPU", "mps": "Apple GPU (MPS)"}.get(device, device)


def flagged_text(f: FindingResult) -> str:
    """``Yes`` / ``No``, or ``n/a`` for a finding that could not be scored."""
    if not f.scored:
        return "n/a"
    return "Yes" if f.flagged else "No"


def result_order(rows: list[Row]) -> list[Row]:
    """Flagged findings first, then by value (highest first); unscored ones last."""
    return sorted(rows, key=lambda r: (not r[1].flagged, not r[1].scored, -(r[1].value or 0.0)))


#: The results table's columns; the value and threshold headers depend on whether the findings
#: are calibrated (:func:`value_headers`). Flagged comes third so that it is in view at the
#: panel's default width.
RESULT_COLUMNS = ("Anatomy", "Finding", "Flagged", "value", "threshold", "Raw score", "Calibration")


def value_headers(findings: list[FindingResult]) -> tuple[str, str]:
    """Headers of the value and threshold columns: ``Probability (%)`` when every scored finding
    is calibrated, ``Uncalibrated score (x100)`` when none is (its numbers are not
    probabilities), and both when the table mixes them (short: the Calibration column and the
    tooltip say which row is which)."""
    kinds = {f.calibrated for f in findings if f.scored} or {f.calibrated for f in findings}
    if kinds == {True}:
        return "Probability (%)", "Threshold (%)"
    if kinds == {False}:
        return "Uncalibrated score (x100)", "Threshold (x100)"
    return "Probability (%) or score (x100)", "Threshold (same scale)"


def header_tips() -> dict[str, str]:
    """Tooltips of the results table's headers."""
    return {
        "value": "The calibrated probability that the finding is present in this anatomy, in percent, "
        "where the model holds a calibration of the finding (see the Calibration column); otherwise "
        "the model's raw score x100: an uncalibrated score, not a probability. Empty: not scored.",
        "threshold": "Decision threshold on the same scale as the value: the model's own (calibrated on a "
        "labelled set) for its findings, the raw score 0.5 otherwise.",
        "Flagged": "Yes: the value is above the threshold. n/a: the anatomy could not be scored.",
        "Raw score": "The model's raw score x100 (softmax of the two prompt similarities), before calibration.",
        "Calibration": "How the raw score became a probability (Platt scaling or isotonic regression, fitted "
        "on a labelled calibration set), or 'uncalibrated score' and why.",
    }


def absent_text(result: AnalysisResult, source: str) -> str:
    """Why anatomies have no result, e.g. "heart, aorta: not segmented by the built-in segmenter"."""
    absent = [a.name for a in result.anatomies if a.status == "absent"]
    lines = []
    if absent:
        names = ", ".join(absent)
        if source == AnatomySource.BUILTIN.value:
            lines.append(
                f"{names}: not segmented by the built-in segmenter (it finds the lungs) - choose "
                "TotalSegmentator or a segmentation to score them."
            )
        elif source == AnatomySource.TOTALSEGMENTATOR.value:
            lines.append(f"{names}: not found by TotalSegmentator in this CT (outside the field of view?).")
        else:
            lines.append(
                f"{names}: no segment of the chosen segmentation maps to them - add or rename segments "
                "(e.g. 'heart') or choose another anatomy source."
            )
    lines += [f"{a.name}: {a.note}" for a in result.anatomies if a.status != "absent" and a.note]
    return "\n".join(lines)


def done_text(result: AnalysisResult, elapsed_s: float) -> str:
    """The status line after an analysis."""
    scored = [(a, f) for a in result.anatomies for f in a.findings if f.scored]
    flagged = [(a, f) for a, f in scored if f.flagged]
    where = sorted({a.name for a, _ in flagged})
    return (
        f"Done in {elapsed_s:.0f} s on {device_name(result.device)}: {len(flagged)} of {len(scored)} scored "
        f"findings flagged" + (f" ({', '.join(where)})." if where else ".")
    )


def _no_finding_wording(model_findings: Sequence[dict[str, Any]]) -> bool:
    """Whether the model's findings are worded "{Finding}." vs "No {finding}." (fvlm demo's protocol)."""
    negatives = [n for f in model_findings for n in f.get("negative", [])]
    return bool(negatives) and all(n.startswith("No ") for n in negatives)


def findings_from_rows(
    rows: Sequence[tuple[str, str]], model_findings: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """``(finding name, anatomy)`` rows (the panel's findings table) as ``Finding`` dicts.

    A row that is one of the model's findings keeps the model's prompts (its calibrated
    threshold was fitted on them). Other known CT-RATE findings keep the reference wordings;
    anything else is a free-text finding worded like the model's findings: "{X}." / "No {x}."
    when the model uses that form, else "{X}." / "Not {X}.".
    """
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY, Finding, no_finding

    known = {(f["name"], f["anatomy"]): dict(f) for f in model_findings}
    no_form = _no_finding_wording(model_findings)
    out = []
    for name, anatomy in rows:
        name, anatomy = name.strip(), anatomy.strip()
        if not name:
            continue
        if (name, anatomy) in known:
            out.append(known[(name, anatomy)])
            continue
        source = "ctrate" if CTRATE_LABEL_ANATOMY.get(name) == anatomy else "user"
        if no_form and source == "user":
            out.append(no_finding(name, anatomy).to_dict())
        else:
            out.append(Finding.from_name(name, anatomy, source=source).to_dict())
    return out


# --- similar cases, DICOM export ---------------------------------------------------------------
#: The similar-cases table's columns.
SIMILAR_COLUMNS = ("Anatomy", "Rank", "Scan", "Similarity", "Volume")
#: What the Volume column says of a match's volume file (a reachable one gets a Load button).
REACHABLE, UNREACHABLE = "on this computer", "not reachable"


def similar_rows(output: dict[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
    """The similar-cases table: ``(cells, match)`` per match of ``tasks.similar_cases``' output,
    anatomy by anatomy, best first; the similarity is the cosine of the two embeddings."""
    rows = []
    for anatomy, matches in output.get("matches", {}).items():
        for m in matches:
            volume = REACHABLE if m.get("reachable") else UNREACHABLE
            rows.append(((anatomy, int(m["rank"]), m["scan"], f"{m['score']:.3f}", volume), m))
    return rows


def match_tip(match: dict[str, Any]) -> str:
    """A match row's tooltip: where its volume is, and whether Load can open it."""
    source = match.get("source") or "(the store records no path)"
    where = "Click Load to load it." if match.get("reachable") else "It is not on this computer."
    return f"{match['scan']}: {source}. Its {match['anatomy']} is {match.get('status') or 'scored'}. {where}"


def similar_blocker(result: AnalysisResult | None, store: str, running: bool) -> str:
    """Why "Find similar cases" cannot run now ("" when it can): what its tooltip says."""
    if result is None:
        return "Analyse a CT first: its anatomies are compared with the store's."
    if result.embeddings is None or not result.embeddings.vectors:
        return (
            "This analysis kept no anatomy embeddings (an older version made it, or nothing was "
            "scored): analyse the CT again."
        )
    if not store:
        return "Choose an embedding store: a folder made by 'fvlm embed' with this model."
    if running:
        return "Wait for the running job to finish."
    return ""


def export_done_text(objects: list[dict[str, Any]], written: dict[str, Any]) -> str:
    """The status line after "Export to DICOM"."""
    segments = len(written.get("seg", {}).get("segments", {}))
    return (
        f"Exported to Slicer's DICOM database, in the CT's study: a segmentation ({segments} anatomies) "
        f"and a structured report of the findings (TID 1500); {len(objects)} objects, new series "
        f"{written['seg']['series_instance_uid']} and {written['sr']['series_instance_uid']}."
    )
