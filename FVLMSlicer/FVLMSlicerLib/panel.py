"""What the panel says, in words a radiologist reads: choices, numbers, status lines (no Qt).

The anatomy source and device are enums whose ``label`` Slicer's parameter node wrapper shows
in the combo boxes (``QComboBoxToEnumConnector`` uses ``label`` when the enum defines it) while
the value saved with the scene stays the member name.
"""

from __future__ import annotations

import enum
import math

from .summary import AnalysisSummary, FindingRow


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


def percent_text(probability: float) -> str:
    """``0.8312`` -> ``83.1 %``; NaN (not scored) -> ``n/a``."""
    return "n/a" if math.isnan(probability) else f"{100.0 * probability:.1f} %"


def flagged_text(row: FindingRow) -> str:
    """``Yes`` / ``No``, or ``n/a`` for a finding that could not be scored."""
    if not row.scored:
        return "n/a"
    return "Yes" if row.flagged else "No"


def result_order(rows: list[FindingRow]) -> list[FindingRow]:
    """Flagged findings first, then by value (highest first); unscored ones last."""

    def key(row: FindingRow):
        return (not (row.scored and row.flagged), not row.scored, -(row.value if row.scored else 0.0))

    return sorted(rows, key=key)


#: The results table's columns after Anatomy and Finding (the value and threshold headers depend
#: on whether the findings are calibrated: :func:`value_headers`).
RESULT_COLUMNS = ("Anatomy", "Finding", "value", "threshold", "Flagged", "Raw score", "Calibration")


def value_headers(rows: list[FindingRow]) -> tuple[str, str]:
    """Headers of the value and threshold columns: ``Probability (%)`` when every scored finding
    is calibrated, ``Uncalibrated score (x100)`` when none is (its numbers are not
    probabilities), and both names when the table mixes them."""
    kinds = {r.calibrated for r in rows if r.scored} or {r.calibrated for r in rows}
    if kinds == {True}:
        return "Probability (%)", "Threshold (%)"
    if kinds == {False}:
        return "Uncalibrated score (x100)", "Threshold (x100)"
    return "Probability (%) or uncalibrated score (x100)", "Threshold (same scale)"


def header_tips(rows: list[FindingRow]) -> dict[str, str]:
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


def calibration_text(row: FindingRow) -> str:
    """The Calibration column: ``probability (Platt)`` / ``probability (isotonic)`` /
    ``uncalibrated score``."""
    return row.scale_text


def absent_text(summary: AnalysisSummary, source: str) -> str:
    """Why anatomies have no result, e.g. "heart, aorta: not segmented by the built-in segmenter"."""
    absent = [a.name for a in summary.anatomies if a.status == "absent"]
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
    lines += [f"{a.name}: {a.note}" for a in summary.anatomies if a.status != "absent" and a.note]
    return "\n".join(lines)


def done_text(summary: AnalysisSummary, elapsed_s: float) -> str:
    """The status line after an analysis."""
    rows = [r for r in summary.rows() if r.scored]
    flagged = [r for r in rows if r.flagged]
    where = sorted({r.anatomy for r in flagged})
    text = (
        f"Done in {elapsed_s:.0f} s on {device_name(summary.device)}: {len(flagged)} of {len(rows)} scored "
        f"findings flagged" + (f" ({', '.join(where)})." if where else ".")
    )
    return text
