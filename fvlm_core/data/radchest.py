"""RAD-ChestCT (Draelos et al., Medical Image Analysis 2021) as distributed (Zenodo record 6406114).

Layout (``root``; the NPZ files may lie in sub-folders, as the release's archives unpack)::

    trn00001.npz, val25752.npz, tst34780.npz ...          one per scan, named <NoteAcc_DEID>.npz
    img{train,valid,test}_Abnormality_and_Location_Labels.csv
        NoteAcc_DEID, then one 0/1 column per "abnormality*location" (84 x 52 in the release)

**Geometry.** An NPZ holds one array, ``ct``, and no geometry. What it is comes from the
release's preprocessing code (github:rachellea/ct-volume-preprocessing, ``preprocess_volumes.py``
with its modified ``dicom_numpy/combine_slices.py``), which this reader assumes:

- slices are stacked from the DICOM series after asserting ImageOrientationPatient
  ``[1, 0, 0, 0, 1, 0]`` on every slice (axial, no oblique scans), into ``[column, row, slice]``
  with the slices sorted by position *descending* (``reverse=True``): slice 0 is the most superior;
- the volume is resampled (SimpleITK B-spline) to 0.8 x 0.8 x 0.8 mm, clipped to
  [-1000, +1000] HU, transposed ``[2, 1, 0]`` and stored as int16;
- so ``ct[k, r, c]`` is slice ``k`` from superior to inferior, row ``r`` from anterior to
  posterior, column ``c`` from the patient's right to left (IPL; independent check: the release's
  ``Extrema`` lung-box columns are named sup/inf on axis 0, ant/pos on axis 1, rig/lef on axis 2).

The reader puts the array on an LPS grid without interpolation: the slice axis is reversed so
that the array is in the same (x left, y posterior, z superior) order as the CT-RATE volumes the
public fVLM pipeline resizes without reorienting, direction identity, spacing 0.8 mm, and the
origin at the volume's centre (the scanner's table position is not stored). A wrong assumption
mirrors the anatomy; ``Testing/test_radchest.py`` writes a phantom through the same steps and
checks that its marked left lung comes out on the patient's left, in LPS and in the built-in
segmenter's ``lung_left``. HU below -1000 are lost in the release (air reads -1000, not ~-1024):
the model's window starts at -1150 HU, so air looks slightly brighter than in CT-RATE.

**Labels**: :mod:`fvlm_core.data.radchest_labels`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm_core.data.ctrate import VolumeRecord
from fvlm_core.data.radchest_labels import (
    LABEL_CSV_SUFFIX,
    NO_COUNTERPART,
    RADCHEST_MAPPINGS,
    read_radchest_labels,
)
from fvlm_core.data.readers import LabelledReader, find_mask
from fvlm_core.errors import DataError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, ct_from_array

#: The release's voxel size (mm, isotropic) and HU clipping (``preprocess_volumes.py``).
SPACING_MM = 0.8
HU_CLIP = (-1000, 1000)

# ------------------------------------------------------------------------------------------------
# Volumes
# ------------------------------------------------------------------------------------------------


def radchest_geometry(shape_zyx: Sequence[int], spacing_mm: float = SPACING_MM) -> Geometry:
    """The LPS grid of a RAD-ChestCT array once its slice axis is reversed: 0.8 mm, identity
    direction, centred on the origin."""
    size = tuple(int(s) for s in reversed(tuple(shape_zyx)))
    origin = tuple(-(n - 1) / 2 * spacing_mm for n in size)
    return Geometry(size, (spacing_mm,) * 3, origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _unreadable(path: Path, why: Any) -> DataError:
    return DataError(
        f"{path}: not a readable RAD-ChestCT NPZ ({why}). Download the file again (its archive may be "
        "truncated), or remove its row from the label CSV to leave the scan out."
    )


def check_npz(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a usable RAD-ChestCT NPZ container (no ``ct`` array, not a zip
    archive, truncated), or None: reads the archive's directory only, not the volume."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"not a zip archive ({exc})"
    if "ct.npy" not in names:
        return f"no array 'ct' (it holds: {', '.join(n.removesuffix('.npy') for n in names) or 'nothing'})"
    return None


def read_radchest_npz(path: str | os.PathLike, spacing_mm: float = SPACING_MM) -> CTVolume:
    """A RAD-ChestCT volume on its LPS grid (see the module docstring), float32 HU.

    ``spacing_mm``: the release's 0.8 mm; another value only for arrays made by the same steps
    with another voxel size (the tests' small phantoms).

    Raises:
        DataError: not an NPZ archive, truncated, no ``ct`` array, not 3D, not numbers, or
            values that are not CT in HU. Never unpickles (``allow_pickle=False``).
    """
    path = Path(path)
    why = check_npz(path)
    if why:
        raise _unreadable(path, why)
    try:
        with np.load(path, allow_pickle=False) as npz:
            array = npz["ct"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unreadable(path, exc) from exc
    if array.ndim != 3 or array.dtype.kind not in "iuf":
        raise _unreadable(path, f"'ct' is a {array.ndim}-D {array.dtype} array, not a 3-D CT volume")
    hu = np.ascontiguousarray(array[::-1], dtype=np.float32)  # slices superior -> inferior: reversed
    try:
        return ct_from_array(hu, radchest_geometry(hu.shape, spacing_mm), str(path))
    except InputError as exc:  # not finite, not HU: said as a problem of this dataset file
        raise _unreadable(path, exc) from exc


# ------------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------------


def _subset(csv_path: Path) -> str:
    """``imgtest_Abnormality_and_Location_Labels.csv`` -> ``test``."""
    stem = csv_path.name.removesuffix(LABEL_CSV_SUFFIX)
    return stem.removeprefix("img") or "rad-chestct"


@dataclass
class RadChestReader(LabelledReader):
    """The scans and labels of a RAD-ChestCT folder (see the module docstring).

    Args:
        root: folder holding the NPZ files (at any depth) and the label CSV(s).
        labels: one label CSV to use (default: every ``*_Abnormality_and_Location_Labels.csv``
            in ``root``, e.g. all 3,630 scans of the public release).
        masks_dir: optional anatomy label maps named ``<NoteAcc_DEID>.nii.gz`` (or per-class
            mask folders ``<NoteAcc_DEID>/``) on the grid this reader gives the CT.
        mapping: ``"hlip"`` or ``"location"`` (:data:`~fvlm_core.data.radchest_labels.RADCHEST_MAPPINGS`).
        check_files: open every NPZ archive's directory (not its data) and list unusable ones
            in ``skipped`` (a few seconds for the whole release).

    Attributes:
        records: labelled scans found on disk (``labels``: CT-RATE finding -> 0/1), sorted.
        skipped: ``(name, reason)`` of labelled scans that cannot be used (no file, unreadable).
        notes: what was assumed and what was left out, for the report.
    """

    root: Path
    labels: Path | None = None
    masks_dir: Path | None = None
    mapping: str = "hlip"
    check_files: bool = True
    layout: str = field(default="radchest", init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        csvs = [Path(self.labels)] if self.labels else sorted(self.root.glob(f"*{LABEL_CSV_SUFFIX}"))
        if not csvs:
            raise DataError(f"{self.root}: no *{LABEL_CSV_SUFFIX} file; give the label CSV with --labels.")
        truth: dict[str, dict[str, int]] = {}
        subset: dict[str, str] = {}
        for path in csvs:
            rows, other = read_radchest_labels(path, self.mapping)
            twice = sorted(set(rows) & set(truth))
            if twice:
                raise DataError(f"{path}: scan(s) {', '.join(twice[:5])} are also in another label CSV.")
            truth.update(rows)
            subset.update(dict.fromkeys(rows, _subset(path)))
        if not truth:
            raise DataError(f"{', '.join(map(str, csvs))}: no labelled scan (empty label CSV).")
        files = self._npz_files()
        for acc in sorted(truth):
            path = files.get(acc)
            if path is None:
                self.skipped.append((acc, f"labelled in the CSV but no {acc}.npz under {self.root}"))
                continue
            why = check_npz(path) if self.check_files else None
            if why:
                self.skipped.append((acc, f"{path}: {why}"))
                continue
            mask = find_mask(self.masks_dir, acc)
            self.records.append(VolumeRecord(acc, subset[acc], path, {}, None, truth[acc], mask, scan=acc))
        self.notes = self._describe(csvs, other, len(set(files) - set(truth)))

    def _npz_files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for p in sorted(self.root.rglob("*.npz")):
            if p.stem in files:
                raise DataError(f"{p} and {files[p.stem]}: two NPZ files of scan {p.stem}; keep one.")
            files[p.stem] = p
        return files

    def _describe(self, csvs: Sequence[Path], other: Sequence[str], unlabelled: int) -> list[str]:
        table = RADCHEST_MAPPINGS[self.mapping]
        lines = [
            f"RAD-ChestCT: labels from {', '.join(p.name for p in csvs)}; abnormality x location "
            f"labels reduced to CT-RATE findings by the {self.mapping!r} mapping ("
            + "; ".join(
                f"{k} <- {'/'.join(cp.abnormalities)}"
                + (f" at {'/'.join(cp.locations)}" if cp.locations else "")
                for k, cp in table.items()
            )
            + ").",
            f"RAD-ChestCT geometry assumed from preprocess_volumes.py: {SPACING_MM} mm isotropic, slices "
            "stored superior to inferior, rows anterior to posterior, columns right to left (reversed "
            f"slice axis, LPS); HU clipped to [{HU_CLIP[0]}, {HU_CLIP[1]}] in the release.",
            f"CT-RATE findings without a RAD-ChestCT counterpart: {', '.join(NO_COUNTERPART)}. "
            f"RAD-ChestCT abnormalities not mapped to a CT-RATE finding: {len(other)} "
            f"({', '.join(other[:8])}{' ...' if len(other) > 8 else ''}).",
        ]
        if unlabelled:
            lines.append(
                f"{unlabelled} NPZ file(s) under {self.root} have no row in the label CSV(s): not used."
            )
        return lines

    def read_ct(self, record: VolumeRecord) -> CTVolume:
        return read_radchest_npz(record.path)
