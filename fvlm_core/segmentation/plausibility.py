"""Does a segmentation belong to this CT? Each anatomy's intensities, checked against its tissue.

A label map made from another scan (or misaligned with this one) still lands on the CT grid
when the two overlap, and the model then embeds whatever lies under it: a "lung" over the
abdomen is reported present and scored. The voxels under each anatomy tell: lungs and the
trachea are mostly air, bone is mostly dense, the solid organs and vessels are hardly ever air.
Measured on the TotalSegmentator examples in ``../shared``: ``example_seg`` on its own CT has
96 % of its lung voxels below -400 HU (mean -744 HU); put on the 112-slice ``example_ct`` it has
7 % (mean -78 HU). The thresholds below leave a wide margin for disease (a consolidated lobe, an
effusion inside the mask) and for partial-volume voxels at the edges of small masks.

Anatomies whose content varies (stomach, bowel, colon: gas or fluid; the esophagus, which may
hold air) are not checked. Masks of fewer than :data:`MIN_VOXELS` voxels are not judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: below this, a voxel is air-like (lung parenchyma is about -850 HU, soft tissue above -200)
AIR_HU = -400.0
#: above this, a voxel is dense like bone (cortical bone > 700 HU, cancellous 100 - 300)
DENSE_HU = 100.0
#: masks smaller than this are not judged (a few edge voxels decide nothing)
MIN_VOXELS = 50


@dataclass(frozen=True)
class TissueRule:
    """What an anatomy's voxels should be: at least ``at_least`` (or at most ``at_most``) of them
    below ``AIR_HU`` (``air``) or above ``DENSE_HU`` (``dense``)."""

    kind: str  # "air" | "dense"
    at_least: float | None = None
    at_most: float | None = None
    expected: str = ""

    def holds(self, fraction: float) -> bool:
        return (self.at_least is None or fraction >= self.at_least) and (
            self.at_most is None or fraction <= self.at_most
        )


_AIR_FILLED = {
    "lung": TissueRule("air", at_least=0.5, expected="a lung is mostly air"),
    "trachea": TissueRule("air", at_least=0.3, expected="the trachea is mostly air"),
}
_SOLID = (
    "heart",
    "aorta",
    "pulmonary_artery",
    "liver",
    "spleen",
    "pancreas",
    "kidney",
    "adrenal_gland",
    "gallbladder",
    "urinary_bladder",
    "thyroid_gland",
    "prostate",
)
#: anatomy name -> its rule (anatomies not listed are not checked)
RULES: dict[str, TissueRule] = {
    **_AIR_FILLED,
    **{
        a: TissueRule("air", at_most=0.25, expected=f"the {a.replace('_', ' ')} is hardly ever air")
        for a in _SOLID
    },
    "bone": TissueRule("dense", at_least=0.15, expected="bone is largely dense"),
}


@dataclass(frozen=True)
class Implausible:
    """One anatomy whose voxels do not look like its tissue."""

    anatomy: str
    fraction: float
    mean_hu: float
    rule: TissueRule

    def describe(self) -> str:
        what = (
            f"below {AIR_HU:.0f} HU (air)" if self.rule.kind == "air" else f"above {DENSE_HU:.0f} HU (dense)"
        )
        bound = (
            f"at least {self.rule.at_least:.0%}"
            if self.rule.at_least is not None
            else f"at most {self.rule.at_most:.0%}"
        )
        return (
            f"{self.anatomy}: {self.fraction:.0%} of its voxels are {what}, mean {self.mean_hu:.0f} HU; "
            f"{self.rule.expected} ({bound})"
        )


def check_intensities(hu: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> list[Implausible]:
    """The anatomies of ``labels`` (``(Z, Y, X)`` integers, anatomy ``names[i]`` as value
    ``i + 1``) whose voxels in ``hu`` (same shape, HU) break their tissue's rule (:data:`RULES`).
    A few passes over the volume (counts per label), no per-anatomy masks."""
    lab = np.asarray(labels).ravel()
    n = len(names) + 1
    where = np.flatnonzero((lab > 0) & (lab < n))  # the labelled voxels only (a fraction of a CT)
    lab, values = lab[where].astype(np.intp), np.asarray(hu).ravel()[where]
    total = np.bincount(lab, minlength=n)
    sums = np.bincount(lab, weights=values, minlength=n)
    counts = {
        "air": np.bincount(lab[values < AIR_HU], minlength=n),
        "dense": np.bincount(lab[values > DENSE_HU], minlength=n),
    }
    out = []
    for i, name in enumerate(names, start=1):
        rule = RULES.get(name)
        if rule is None or total[i] < MIN_VOXELS:
            continue
        fraction = float(counts[rule.kind][i] / total[i])
        if not rule.holds(fraction):
            out.append(Implausible(name, fraction, float(sums[i] / total[i]), rule))
    return out


def implausible_message(found: Sequence[Implausible], source: str) -> str:
    """What to tell the user about ``found`` (non-empty)."""
    return (
        f"{source}: the segmentation does not look like it belongs to this CT: "
        + "; ".join(f.describe() for f in found)
        + ". It may come from another scan or be misaligned with this one: its anatomies would be "
        "scored on the wrong tissue. Check that it was made from this CT (or segment it again)."
    )
