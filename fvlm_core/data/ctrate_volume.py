"""A CT-RATE volume read with its metadata row: the geometry and HU rescale the release's CSV gives.

CT-RATE's NIfTI headers are unreliable (unit spacing, no orientation, scaling that does not give
HU); ``metadata/{train,validation}_metadata.csv`` holds, per volume, the DICOM geometry
(``XYSpacing``, ``ZSpacing``, ``ImagePositionPatient``, ``ImageOrientationPatient``) and the
``RescaleSlope`` / ``RescaleIntercept`` that map the stored values to HU. Cells may be numbers or
strings such as ``"[0.75, 0.75]"`` (as in the CSVs).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fvlm_core import dicom_series, nifti
from fvlm_core.data.layout import volume_stem
from fvlm_core.errors import InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, ct_from_array, read_image_3d

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)", re.IGNORECASE)


def _parse_list(value: Any) -> list[float]:
    """Numbers of a metadata cell: 0.75, "0.75", "[0.75, 0.8]", "['0.75', '0.8']", "0.75\\\\0.8"."""
    if isinstance(value, str):
        found = _NUMBER.findall(value)
        if not found:
            raise ValueError(f"no number in {value!r}")
        return [float(v) for v in found]
    if isinstance(value, (int, float, np.number)):
        return [float(value)]
    return [float(v) for v in value]


def geometry_from_metadata(
    row: Mapping[str, Any], size_xyz: tuple[int, int, int], source: str = "CT-RATE metadata row"
) -> Geometry:
    """Geometry from a CT-RATE metadata row (XYSpacing, ZSpacing, ImagePositionPatient,
    ImageOrientationPatient), following DICOM semantics: x along a row, y along a column, z
    along the slice normal (row x column), origin at the first voxel.
    """
    try:
        xy = _parse_list(row["XYSpacing"])
        z = _parse_list(row["ZSpacing"])[0]
        ipp = _parse_list(row["ImagePositionPatient"])
        iop = _parse_list(row["ImageOrientationPatient"])
    except KeyError as exc:
        raise InputError(
            f"{source}: CT-RATE metadata row lacks column {exc.args[0]!r}; use a row of "
            "metadata/{train,validation}_metadata.csv."
        ) from exc
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: CT-RATE metadata row has an unparsable geometry value: {exc}") from exc
    if len(iop) != 6 or len(ipp) != 3:
        raise InputError(
            f"{source}: CT-RATE metadata ImageOrientationPatient needs 6 values and ImagePositionPatient 3, "
            f"got {iop}, {ipp}; fix the metadata row."
        )
    r = np.asarray(iop[:3])
    c = np.asarray(iop[3:])
    if not (np.all(np.isfinite(iop)) and np.linalg.norm(r) > 0.5 and np.linalg.norm(c) > 0.5):
        raise InputError(f"{source}: CT-RATE metadata ImageOrientationPatient {iop} is not two directions.")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    n = np.cross(r, c)
    direction = np.stack([r, c, n], axis=1)
    # DICOM PixelSpacing is [row spacing (y), column spacing (x)].
    sx, sy = (xy[1], xy[0]) if len(xy) >= 2 else (xy[0], xy[0])
    return Geometry(
        size=size_xyz,
        spacing=(float(sx), float(sy), float(z)),
        origin=tuple(float(v) for v in ipp),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def read_ctrate_volume(
    path: str | os.PathLike, metadata: Mapping[str, Any], *, allow_non_hu: bool = False
) -> CTVolume:
    """Read a CT-RATE volume in HU with the geometry and rescale of its ``metadata`` row.

    The row's geometry replaces the header's; its RescaleSlope / RescaleIntercept are applied to
    the stored values (the reader's own scaling undone first, :func:`stored_values`). Missing
    rescale columns leave the header's scaling.

    Raises:
        InputError: as :func:`fvlm_core.io.read_ct`; a row whose ``VolumeName`` is another
            volume's; geometry or rescale cells that cannot be parsed or are invalid.
    """
    source = str(path)
    image = read_image_3d(path)
    volume_name = metadata.get("VolumeName") if hasattr(metadata, "get") else None
    if isinstance(volume_name, str) and volume_stem(volume_name) != volume_stem(Path(path).name):
        raise InputError(
            f"{source}: the metadata row is for {volume_name!r}, not this file; pass the row whose "
            "VolumeName matches the file (a wrong row gives a wrong geometry and HU)."
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    geometry = geometry_from_metadata(metadata, tuple(int(s) for s in image.GetSize()), source)
    if "RescaleSlope" in metadata or "RescaleIntercept" in metadata:
        try:
            slope = _parse_list(metadata.get("RescaleSlope", 1.0))[0]
            intercept = _parse_list(metadata.get("RescaleIntercept", 0.0))[0]
        except (ValueError, SyntaxError, IndexError) as exc:
            raise InputError(f"{source}: metadata RescaleSlope/RescaleIntercept unparsable ({exc}).") from exc
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
            raise InputError(
                f"{source}: metadata RescaleSlope={slope}, RescaleIntercept={intercept} are invalid; "
                "fix the metadata row (slope must be a non-zero number)."
            )
        array = stored_values(Path(path), image, array) * slope + intercept
    ct = ct_from_array(array, geometry, source, allow_non_hu=allow_non_hu)
    uid = dicom_series.series_uid(image)
    return replace(ct, dicom_series=uid) if uid else ct


def stored_values(path: Path, image: sitk.Image, array: np.ndarray) -> np.ndarray:
    """Undo the rescale the reader applied (NIfTI ``scl_*``, DICOM 0028,1052/3), giving the stored
    values, so that a metadata rescale is applied to what is really in the file."""
    rescale = dicom_series.applied_rescale(image)
    if rescale is not None:
        (slope, inter), integer = rescale, True  # DICOM stores integer pixel values
    elif nifti.is_nifti(path):
        slope, inter, integer = nifti.applied_scaling(path)
    else:
        slope, inter, integer = 1.0, 0.0, False
    if slope == 1.0 and inter == 0.0:
        return array.astype(np.float64)
    stored = (array.astype(np.float64) - inter) / slope
    # The stored values were integers: remove float32 round-off from the reader's scaling.
    return np.round(stored) if integer else stored
