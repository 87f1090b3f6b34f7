"""The CT-RATE naming and folder layout: split names, where a volume lives, which scan it is.

A volume name ``train_1_a_1`` is patient 1, scan ``a``, reconstruction 1; it lives at
``dataset/train/train_1/train_1_a/train_1_a_1.nii.gz``. One scan may have several
reconstructions (the 3,039 validation volumes are 1,564 scans).
"""

from __future__ import annotations

from pathlib import Path

from fvlm_core.io import IMAGE_SUFFIXES

#: split -> (dataset folder, metadata/report CSV prefix, label CSV prefix), as named in CT-RATE.
SPLITS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "train", "train"),
    "valid": ("valid", "validation", "valid"),
}


def volume_stem(name: str) -> str:
    """A volume name or file name without folder and image suffix (any case):
    ``a/valid_1_a_2.nii.gz`` -> ``valid_1_a_2``. The one rule that tells which volume a name is."""
    stem = Path(str(name).strip()).name
    for suffix in IMAGE_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def scan_id_of(name: str) -> str:
    """``train_1_a_1`` (or ``train_1_a_1.nii.gz``) -> ``train_1_a``: the scan its reconstructions share.

    Names that are not in the CT-RATE pattern (fewer than four ``_`` parts) are their own scan.
    """
    stem = volume_stem(name)
    parts = stem.split("_")
    return "_".join(parts[:-1]) if len(parts) >= 4 else stem


def volume_relpath(name: str) -> Path:
    """``train_1_a_1`` -> ``train_1/train_1_a/train_1_a_1.nii.gz`` (CT-RATE folder nesting below a split).

    Names that are not in the CT-RATE pattern lie directly in the split folder.
    """
    stem = volume_stem(name)
    parts = stem.split("_")
    if len(parts) < 4:
        return Path(f"{stem}.nii.gz")
    return Path("_".join(parts[:2])) / "_".join(parts[:3]) / f"{stem}.nii.gz"
