"""Model-space preprocessing: the grid the fVLM vision encoder sees, and the way back.

The reference model sees CT at ``(z, y, x)`` spacing ``(3, 1, 1)`` mm in a fixed patient
orientation, HU windowed to ``[-1150, 350]`` -> ``[0, 1]``, cropped to a window of
``112 x 256 x 352`` voxels (or larger, a multiple of the ``16 x 16 x 32`` patch) around an anatomy.

Workflow (one resampling per volume, then windows are cheap numpy slices; the windows are planned
by :func:`fvlm_core.zeroshot.windows.plan_windows`)::

    ct_ms, labels_ms = resample_to_model_space(ct, labels, config)       # SimpleITK, HU kept
    plans, _ = plan_windows(labels_ms.array, names, config.window_size_zyx, config.multiple_zyx)
    win = crop_window(ct_ms, labels_ms, plans[0].center_zyx, plans[0].size_zyx)  # slices + pad
    x = win.image(config.hu_window)                                      # float32 in [0, 1]
    on_ct = win.to_original(similarity_map, ct.geometry, is_label=False) # back on the user's grid

Every model-space volume and window carries a :class:`~fvlm_core.io.Geometry`, so mapping a
result back to the user's volume is a resampling by physical position (``fvlm_core.io.resample_to``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from fvlm_core.boxes import nonzero_box
from fvlm_core.errors import ConfigError, GeometryError, InputError
from fvlm_core.geometry import Geometry, check_overlap
from fvlm_core.io import CTVolume, LabelVolume, array_to_sitk, resample_to

#: HU used outside the scanned field of view (air).
PAD_HU = -1024.0

_AXIS_CODES = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass
class ModelSpaceConfig:
    """Where and how the model sees a CT.

    Attributes:
        spacing_zyx: voxel size in mm along ``(z, y, x)``.
        hu_window: HU mapped to 0 and 1 (values outside are clipped).
        window_size_zyx: default (minimum) crop size in voxels.
        multiple_zyx: crop sizes are rounded up to a multiple of this (the ViT patch).
        orientation: ITK/DICOM orientation code of the array axes ``(x, y, z)`` (``"LPS"``: x runs
            to the patient's left, y to posterior, z to superior, i.e. an axial stack).
    """

    spacing_zyx: tuple[float, float, float] = (3.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-1150.0, 350.0)
    window_size_zyx: tuple[int, int, int] = (112, 256, 352)
    multiple_zyx: tuple[int, int, int] = (16, 16, 32)
    orientation: str = "LPS"

    def __post_init__(self) -> None:
        self.spacing_zyx = tuple(float(v) for v in self.spacing_zyx)
        self.hu_window = tuple(float(v) for v in self.hu_window)
        self.window_size_zyx = tuple(int(v) for v in self.window_size_zyx)
        self.multiple_zyx = tuple(int(v) for v in self.multiple_zyx)
        self.orientation = str(self.orientation).upper()
        if len(self.spacing_zyx) != 3 or not all(math.isfinite(v) and v > 0 for v in self.spacing_zyx):
            raise ConfigError(f"preprocessing.spacing_zyx={self.spacing_zyx}: need 3 positive numbers (mm).")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ConfigError(f"preprocessing.hu_window={self.hu_window}: need (low, high) with low < high.")
        for name in ("window_size_zyx", "multiple_zyx"):
            v = getattr(self, name)
            if len(v) != 3 or min(v) < 1:
                raise ConfigError(f"preprocessing.{name}={v}: need 3 positive integers.")
        _direction_for(self.orientation)  # validates the code

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelSpaceConfig:
        d = dict(d or {})
        known = {"spacing_zyx", "hu_window", "window_size_zyx", "multiple_zyx", "orientation"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"preprocessing: unknown option(s) {unknown}; known: {sorted(known)}.")
        return cls(**d)


def _direction_for(orientation: str) -> np.ndarray:
    """3x3 LPS direction matrix (columns = x, y, z axes) of an ITK orientation code like 'LPS'."""
    code = orientation.upper()
    if (
        len(code) != 3
        or any(c not in _AXIS_CODES for c in code)
        or len({_AXIS_CODES[c][0] for c in code}) != 3
    ):
        raise ConfigError(
            f"orientation {orientation!r} is not a valid 3-letter code (one of L/R, P/A, S/I each, e.g. 'LPS' or 'RAS')."
        )
    d = np.zeros((3, 3))
    for col, c in enumerate(code):
        axis, sign = _AXIS_CODES[c]
        d[axis, col] = sign
    return d


# --------------------------------------------------------------------------------------------
# Intensity
# --------------------------------------------------------------------------------------------


def window_hu(hu: Any, hu_window: Sequence[float] = (-1150.0, 350.0)) -> Any:
    """Map HU linearly so that ``hu_window[0] -> 0`` and ``hu_window[1] -> 1``, clipped to [0, 1].

    Args:
        hu: numpy array or torch tensor of any shape (a torch tensor stays on its device).
        hu_window: ``(low, high)`` in HU.

    Returns:
        Same type and shape, float32, values in ``[0, 1]``.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if hi <= lo:
        raise ConfigError(f"hu_window={tuple(hu_window)}: need low < high.")
    # subtract, divide, clip: MONAI's ScaleIntensityRange (the reference's scaling, and training's,
    # fvlm_core.data.samples.hu_scaling) to the bit, without importing MONAI here
    if not isinstance(hu, np.ndarray) and hasattr(hu, "clamp_"):  # torch (or MONAI Meta) tensor
        return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


# --------------------------------------------------------------------------------------------
# Resampling to model space
# --------------------------------------------------------------------------------------------


def model_space_geometry(geometry: Geometry, config: ModelSpaceConfig) -> Geometry:
    """The model-space grid that covers ``geometry``'s voxel centres.

    Axes follow ``config.orientation`` exactly (an oblique scan gets the axis-aligned box that
    holds it); voxel ``(0, 0, 0)`` sits at the box corner, so for a non-oblique scan it is the
    position of the original's first voxel after reorientation.
    """
    target = _direction_for(config.orientation)
    spacing_xyz = np.asarray(config.spacing_zyx[::-1], dtype=float)
    # Project the original's voxel-centre corners onto the target axes.
    src = geometry
    idx = np.array(
        [[i, j, k] for i in (0, src.size[0] - 1) for j in (0, src.size[1] - 1) for k in (0, src.size[2] - 1)],
        dtype=float,
    )
    corners = idx @ src.affine_lps[:3, :3].T + src.affine_lps[:3, 3]
    proj = corners @ target  # coordinates along the target axes
    pmin, pmax = proj.min(axis=0), proj.max(axis=0)
    # 1e-3 voxel slack: an extent that is an exact multiple of the spacing keeps its last voxel.
    size = np.floor((pmax - pmin) / spacing_xyz + 1e-3).astype(int) + 1
    origin = target @ pmin
    return Geometry(
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing_xyz),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in target.reshape(-1)),
    )


#: a CT voxel more than this many times the expected size along an axis gets a warning.
COARSE_FACTOR = 3.0


def patient_spacing_zyx(geometry: Geometry) -> tuple[float, float, float]:
    """Voxel size in mm along the patient's superior, posterior and left axes ``(z, y, x)``
    (the model space's axes), whatever the order of the array's axes."""
    cosines = np.abs(geometry.direction_matrix)  # rows: L, P, S; columns: the array's x, y, z axes
    lps = [float(geometry.spacing[int(np.argmax(cosines[row]))]) for row in range(3)]
    return (lps[2], lps[1], lps[0])


def spacing_warning(
    geometry: Geometry, expected_zyx: Sequence[float], what: str, source: str, factor: float = COARSE_FACTOR
) -> str | None:
    """A message when the voxels of ``geometry`` are more than ``factor`` times coarser than
    ``expected_zyx`` (mm, the spacing ``what`` works at) along some axis, else ``None``.

    Resampling such a volume (e.g. 5 slices 60 mm apart) invents the detail between its slices,
    so segmentation and scores may be unreliable; the caller warns and records the message.
    """
    have = patient_spacing_zyx(geometry)
    coarse = [
        name for name, h, e in zip(("z (slice)", "y", "x"), have, expected_zyx) if h > factor * float(e)
    ]
    if not coarse:
        return None
    fmt = " x ".join(f"{v:g}" for v in have)
    exp = " x ".join(f"{float(v):g}" for v in expected_zyx)
    return (
        f"{source}: its voxels are {fmt} mm (z, y, x), more than {factor:g}x coarser along "
        f"{', '.join(coarse)} than the {exp} mm {what} works at: the detail between its voxels is "
        "missing, so the results may be unreliable. Use a thinner-slice reconstruction of the scan "
        "if there is one."
    )


def _resample(image: sitk.Image, grid: Geometry, interpolator: int, default: float, pixel: int) -> sitk.Image:
    ref = grid.apply_to(sitk.Image(list(grid.size), pixel))
    return sitk.Resample(image, ref, sitk.Transform(), interpolator, default, pixel)


def reorient(ct: CTVolume, orientation: str = "LPS") -> CTVolume:
    """``ct`` with its array axes permuted and flipped to ``orientation`` (``sitk.DICOMOrient``:
    no interpolation, the same voxels at the same physical positions); ``ct`` itself when it is
    already so. The public fVLM pipeline resizes the array as stored, so a volume goes to its
    reference windows in the axis order of the CT-RATE volumes it was trained on (``LPS``)."""
    image = ct.to_sitk()
    out = sitk.DICOMOrient(image, orientation)
    if out.GetDirection() == image.GetDirection():
        return ct
    return replace(ct, array=sitk.GetArrayFromImage(out), geometry=Geometry.from_sitk(out))


def resample_to_model_space(
    ct: CTVolume, labels: LabelVolume | None = None, config: ModelSpaceConfig | None = None
) -> tuple[CTVolume, LabelVolume | None]:
    """Reorient to ``config.orientation`` and resample to ``config.spacing_zyx`` (HU kept, not windowed).

    The CT is reoriented with ``sitk.DICOMOrient`` (an exact axis permutation/flip) and resampled
    with linear interpolation (outside the scan: -1024 HU); labels are resampled from their own
    grid by physical position with nearest neighbour (outside: 0), so a label map on another
    grid than the CT still lands in the right place.

    Args:
        ct: the CT, ``array`` ``(Z, Y, X)`` HU.
        labels: optional label map (any grid overlapping the CT).
        config: model space; default :class:`ModelSpaceConfig`.

    Returns:
        ``(ct_ms, labels_ms)``: float32 HU ``(Z', Y', X')`` and uint8/uint16 labels on the same
        model-space grid, each with its :class:`Geometry`.
    """
    config = config or ModelSpaceConfig()
    image = ct.to_sitk()
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    # Axis permutation/flip only (no interpolation); the resampler then only changes spacing.
    image = sitk.DICOMOrient(image, config.orientation)
    grid = model_space_geometry(Geometry.from_sitk(image), config)
    out = _resample(image, grid, sitk.sitkLinear, PAD_HU, sitk.sitkFloat32)
    ct_ms = CTVolume(array=sitk.GetArrayFromImage(out), geometry=grid, source=ct.source)
    labels_ms = None
    if labels is not None:
        lab = np.asarray(labels.array)
        if lab.max(initial=0) > np.iinfo(np.uint16).max or lab.min(initial=0) < 0:
            raise GeometryError(f"{labels.source}: label values must be in 0..65535.")
        dtype = np.uint8 if lab.max(initial=0) <= 255 else np.uint16
        limage = array_to_sitk(lab.astype(dtype, copy=False), labels.geometry)
        pixel = sitk.sitkUInt8 if dtype == np.uint8 else sitk.sitkUInt16
        check_overlap(labels.geometry, ct.geometry, f"{labels.source} (label map of {ct.source})")
        lout = _resample(limage, grid, sitk.sitkNearestNeighbor, 0, pixel)
        labels_ms = LabelVolume(array=sitk.GetArrayFromImage(lout), geometry=grid, source=labels.source)
    return ct_ms, labels_ms


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def bbox_zyx(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Inclusive bounding box ``(min_zyx, max_zyx)`` of the non-zero voxels of a 3D mask, or None."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"bbox_zyx needs a 3D (Z, Y, X) mask, got shape {mask.shape}")
    box = nonzero_box(mask)
    if box is None:
        return None
    return tuple(b.start for b in box), tuple(b.stop - 1 for b in box)


@dataclass
class ModelSpaceWindow:
    """A crop of a model-space volume: what one forward pass of the encoder sees.

    Attributes:
        hu: float32 ``(Z, Y, X)`` HU (padding: ``pad_hu``).
        labels: uint8/uint16 ``(Z, Y, X)`` label map or None (padding: 0).
        geometry: the window's own physical grid.
        start_zyx: index of the window's first voxel in the model-space volume (may be negative).
        valid_zyx: ``(start, stop)`` per axis of the part of the window inside the scan.
        reference_scaling: :meth:`image` computes the intensities with the reference's arithmetic
            (:func:`reference_intensity`) instead of :func:`window_hu`.
    """

    hu: np.ndarray
    labels: np.ndarray | None
    geometry: Geometry
    start_zyx: tuple[int, int, int] = (0, 0, 0)
    valid_zyx: tuple[tuple[int, int], ...] = ()
    reference_scaling: bool = False

    def image(self, hu_window: Sequence[float] = (-1150.0, 350.0)) -> np.ndarray:
        """Windowed intensities ``(Z, Y, X)`` float32 in [0, 1] (the encoder's input)."""
        if self.reference_scaling:
            return reference_intensity(self.hu, hu_window)
        return window_hu(self.hu, hu_window)

    def to_original(self, array: np.ndarray, original: Geometry, is_label: bool) -> np.ndarray:
        """Put an array on this window's grid (e.g. a similarity map or a mask) onto ``original``.

        Resampled by physical position (``fvlm_core.io.resample_to``): labels with nearest
        neighbour, other values linearly.
        Voxels of ``original`` outside the window get 0.

        Args:
            array: ``(Z, Y, X)`` with this window's shape.
            original: the grid to return on (usually the user's CT geometry).
            is_label: integer labels (True) or continuous values (False).

        Returns:
            ``original.shape_zyx`` array: labels keep an integer dtype, values become float32.
        """
        array = np.asarray(array)
        if tuple(array.shape) != self.geometry.shape_zyx:
            raise GeometryError(
                f"to_original: array shape {array.shape} differs from the window shape {self.geometry.shape_zyx}"
            )
        if is_label:
            if array.dtype == bool:
                array = array.astype(np.uint8)
            if not np.issubdtype(array.dtype, np.integer):
                raise GeometryError("to_original(is_label=True) needs an integer or boolean array.")
            # Nearest neighbour: on the shared CTs it round-trips masks at least as well as
            # sitkLabelLinear, whose ties at half-way points erode masks on aligned grids.
            image = array_to_sitk(array, self.geometry)
            return sitk.GetArrayFromImage(
                resample_to(image, original, is_label=True, source="model-space window")
            )
        image = array_to_sitk(array.astype(np.float32, copy=False), self.geometry)
        return sitk.GetArrayFromImage(
            resample_to(image, original, is_label=False, source="model-space window")
        )


def crop_window(
    ct_ms: CTVolume,
    labels_ms: LabelVolume | None,
    center_zyx: Sequence[float],
    size_zyx: Sequence[int],
    pad_hu: float = PAD_HU,
) -> ModelSpaceWindow:
    """Cut a ``size_zyx`` window centred at ``center_zyx`` (model-space voxel coordinates).

    Parts outside the volume are padded (HU with ``pad_hu``, labels with 0). The window's
    geometry is the model-space geometry with its origin moved to the window's first voxel.

    Returns:
        :class:`ModelSpaceWindow` with ``hu`` ``size_zyx`` float32 and ``labels`` ``size_zyx`` or None.
    """
    size = np.asarray(size_zyx, dtype=int)
    if size.shape != (3,) or np.any(size < 1):
        raise ValueError(f"window size {tuple(size_zyx)} must be 3 positive integers")
    shape = np.asarray(ct_ms.array.shape)
    if labels_ms is not None and tuple(labels_ms.array.shape) != tuple(shape):
        raise GeometryError(
            f"crop_window: labels shape {labels_ms.array.shape} differs from the CT's {tuple(shape)}; "
            "resample both with resample_to_model_space first."
        )
    # First voxel so that the window is centred (ties go to the lower index).
    start = np.floor(np.asarray(center_zyx, dtype=float) - (size - 1) / 2.0 + 1e-6).astype(int)
    stop = start + size
    src_lo = np.clip(start, 0, shape)
    src_hi = np.clip(stop, 0, shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + np.maximum(src_hi - src_lo, 0)
    src = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))
    dst = tuple(slice(int(a), int(b)) for a, b in zip(dst_lo, dst_hi))

    hu = np.full(tuple(size), pad_hu, dtype=np.float32)
    hu[dst] = ct_ms.array[src]
    labels = None
    if labels_ms is not None:
        labels = np.zeros(tuple(size), dtype=labels_ms.array.dtype)
        labels[dst] = labels_ms.array[src]

    geometry = ct_ms.geometry.sub_grid(start, size)
    valid = tuple((int(a), int(b)) for a, b in zip(dst_lo, dst_hi))
    return ModelSpaceWindow(
        hu=hu, labels=labels, geometry=geometry, start_zyx=tuple(int(s) for s in start), valid_zyx=valid
    )


# --------------------------------------------------------------------------------------------
# The reference's volume preparation (public fVLM data/resize.py and data/preprocess.py)
# --------------------------------------------------------------------------------------------

#: HU of the reference's padding: 0 in its [0, 1] intensity space (the low end of its HU window).
#: No floor at -1024 HU applies on this path.
REFERENCE_PAD_HU = -1150.0
#: Voxels (z, y, x) that data/preprocess.py keeps around the bounding box of all anatomy labels.
REFERENCE_MARGIN_ZYX = (5, 20, 20)


def reference_intensity(hu: Any, hu_window: Sequence[float] = (-1150.0, 350.0)) -> np.ndarray:
    """The reference's intensities: MONAI ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)``
    on float32, i.e. ``(hu - a_min) / (a_max - a_min)`` then clipped to [0, 1].

    :func:`window_hu` multiplies by the reciprocal instead, which can differ in the last bit.

    Args:
        hu: ``(Z, Y, X)`` HU.

    Returns:
        float32 array of the same shape in [0, 1].
    """
    lo, hi = np.float32(hu_window[0]), np.float32(hu_window[1])
    out = (np.asarray(hu, dtype=np.float32) - lo) / np.float32(hi - lo)
    return np.clip(out, np.float32(0.0), np.float32(1.0))


def _spacing_as_stored(geometry: Geometry) -> tuple[float, float, float]:
    """``|affine[i, i]|`` per array axis ``(x, y, z)`` as a NIfTI written in float32 holds it: the
    spacing data/resize.py reads from the header."""
    diag = np.abs(np.diag(geometry.affine_lps[:3, :3]))
    return tuple(float(np.float32(v)) for v in diag)


def reference_resize(
    ct: CTVolume, labels: LabelVolume | None = None, config: ModelSpaceConfig | None = None
) -> tuple[CTVolume, LabelVolume | None]:
    """Resize a CT (and its label map, on the same grid) to the model spacing as the public
    ``data/resize.py`` does: the array is resized, not reoriented or resampled by position.

    Steps (as the reference): HU stored as int16 (``fix_data.py`` casts them); the spacing read
    from the header diagonal; target size per array axis ``int(n * spacing / model_spacing)``,
    where the x size is scaled by the *y* spacing and the y size by the *x* spacing (resize.py
    swaps them; CT-RATE pixels are square); trilinear interpolation of the image and nearest of
    the labels (``torch.nn.functional.interpolate``, ``align_corners=False``, no anti-aliasing:
    MONAI ``Resized``). Oblique volumes (a direction that is not a permutation) are outside what
    the reference handles.

    Args:
        ct: ``(Z, Y, X)`` HU on its own grid.
        labels: optional label map on ``ct``'s grid.
        config: model space (its ``spacing_zyx``); default :class:`ModelSpaceConfig`.

    Returns:
        ``(ct_r, labels_r)``: float32 HU and uint8/uint16 labels, each with the geometry of the
        resized grid (same direction; origin and spacing moved as the interpolation implies).
    """
    import torch
    import torch.nn.functional as F

    config = config or ModelSpaceConfig()
    if labels is not None and tuple(labels.array.shape) != tuple(ct.array.shape):
        raise GeometryError(
            f"reference_resize: labels shape {labels.array.shape} differs from the CT's {ct.array.shape}; "
            "put the label map on the CT grid first."
        )
    g = ct.geometry
    sx, sy, sz = _spacing_as_stored(g)
    model_xyz = config.spacing_zyx[::-1]
    scale = (sx / model_xyz[0], sy / model_xyz[1], sz / model_xyz[2])
    nz, ny, nx = ct.array.shape
    size_xyz = (int(nx * scale[1]), int(ny * scale[0]), int(nz * scale[2]))  # resize.py's order
    if min(size_xyz) < 1:
        raise GeometryError(f"{ct.source}: resizing {ct.array.shape} to the model spacing leaves no voxel.")
    hu = np.clip(np.trunc(np.asarray(ct.array, dtype=np.float64)), -32768, 32767).astype(np.float32)
    xyz = torch.from_numpy(np.ascontiguousarray(hu.transpose(2, 1, 0)))[None, None]
    image = F.interpolate(xyz, size=size_xyz, mode="trilinear", align_corners=False)[0, 0]
    grid = _resized_geometry(g, size_xyz)
    ct_r = CTVolume(np.ascontiguousarray(image.numpy().transpose(2, 1, 0)), grid, source=ct.source)
    if labels is None:
        return ct_r, None
    lab = np.asarray(labels.array)
    lab_xyz = torch.from_numpy(np.ascontiguousarray(lab.transpose(2, 1, 0).astype(np.float32)))[None, None]
    out = F.interpolate(lab_xyz, size=size_xyz, mode="nearest")[0, 0].numpy().transpose(2, 1, 0)
    dtype = np.uint8 if lab.max(initial=0) <= 255 else np.uint16
    return ct_r, LabelVolume(np.ascontiguousarray(out.astype(dtype)), grid, source=labels.source)


def _resized_geometry(g: Geometry, size_xyz: Sequence[int]) -> Geometry:
    """The grid of an array resized to ``size_xyz`` with ``align_corners=False``: voxel ``i`` of
    the new grid sits at input index ``(i + 0.5) * n / m - 0.5``."""
    n = np.asarray(g.size, dtype=float)
    m = np.asarray(size_xyz, dtype=float)
    factor = n / m
    first = 0.5 * factor - 0.5  # input index (x, y, z) of the new first voxel
    origin = g.affine_lps[:3, :3] @ first + g.affine_lps[:3, 3]
    return Geometry(
        size=tuple(int(v) for v in size_xyz),
        spacing=tuple(float(s) * f for s, f in zip(g.spacing, factor)),
        origin=tuple(float(o) for o in origin),
        direction=g.direction,
    )


@dataclass
class ReferenceVolume:
    """A model-space volume prepared as the reference's data/preprocess.py prepares it.

    Attributes:
        ct: float32 HU ``(Z, Y, X)`` (padding :data:`REFERENCE_PAD_HU`) on its own grid.
        labels: the anatomy label map on the same grid (padding 0).
        offset_zyx: index of its first voxel in the input volume (negative where padded).
        crop_zyx: ``(start, stop)`` of the crop in the input volume, per axis.
        pad_zyx: ``(before, after)`` voxels of padding, per axis.
    """

    ct: CTVolume
    labels: LabelVolume
    offset_zyx: tuple[int, int, int]
    crop_zyx: tuple[tuple[int, int], ...]
    pad_zyx: tuple[tuple[int, int], ...]


def _crop_pad(array: np.ndarray, lo, hi, before, after, value) -> np.ndarray:
    """``array[lo:hi]`` (inside the array) with ``before`` / ``after`` voxels of ``value`` per axis."""
    shape = tuple(int(h - lo_ + b + a) for lo_, h, b, a in zip(lo, hi, before, after))
    out = np.full(shape, value, dtype=array.dtype)
    dst = tuple(slice(int(b), int(b + h - lo_)) for lo_, h, b in zip(lo, hi, before))
    out[dst] = array[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    return out


def reference_volume(
    ct_ms: CTVolume,
    labels_ms: LabelVolume,
    min_size_zyx: Sequence[int] = (112, 256, 352),
    margin_zyx: Sequence[int] = REFERENCE_MARGIN_ZYX,
) -> ReferenceVolume:
    """Crop to all anatomies plus a margin and pad to at least ``min_size_zyx``, as the public
    ``data/preprocess.py`` does before evaluation and training.

    The crop is ``[max(min - margin, 0), min(max + margin, dim))`` per axis, with ``min`` / ``max``
    the inclusive bounds of all non-zero labels (the reference slices to ``max + margin``, so
    the high side keeps one voxel less of margin); the padding is MONAI ``SpatialPad``'s
    symmetric one (``(n // 2, n - n // 2)`` for ``n`` missing voxels) with
    :data:`REFERENCE_PAD_HU` (0 after :func:`reference_intensity`) and label 0. HU are kept as
    given: no floor at -1024.

    Args:
        ct_ms: float HU ``(Z, Y, X)`` on the model-space grid.
        labels_ms: anatomy label map on the same grid.
        min_size_zyx: the model window (the reference's ``(112, 256, 352)``).
        margin_zyx: voxels kept around the anatomies.

    Raises:
        InputError: no anatomy label in ``labels_ms``.
    """
    lab = np.asarray(labels_ms.array)
    if tuple(lab.shape) != tuple(ct_ms.array.shape):
        raise GeometryError(
            f"reference_volume: labels shape {lab.shape} differs from the CT's {ct_ms.array.shape}."
        )
    box = bbox_zyx(lab > 0)
    if box is None:
        raise InputError(f"{labels_ms.source}: no anatomy label; the reference crop needs at least one.")
    shape = np.asarray(lab.shape)
    margin = np.asarray(margin_zyx, dtype=int)
    lo = np.maximum(np.asarray(box[0]) - margin, 0)
    hi = np.minimum(np.asarray(box[1]) + margin, shape)
    need = np.maximum(np.asarray(min_size_zyx, dtype=int) - (hi - lo), 0)
    before, after = need // 2, need - need // 2
    hu = _crop_pad(
        np.asarray(ct_ms.array, dtype=np.float32), lo, hi, before, after, np.float32(REFERENCE_PAD_HU)
    )
    labels = _crop_pad(lab, lo, hi, before, after, 0)
    offset = lo - before
    grid = ct_ms.geometry.sub_grid(offset, hu.shape)
    return ReferenceVolume(
        ct=CTVolume(hu, grid, source=ct_ms.source),
        labels=LabelVolume(labels, grid, source=labels_ms.source),
        offset_zyx=tuple(int(v) for v in offset),
        crop_zyx=tuple((int(a), int(b)) for a, b in zip(lo, hi)),
        pad_zyx=tuple((int(a), int(b)) for a, b in zip(before, after)),
    )


def reference_window(
    volume: ReferenceVolume,
    start_zyx: Sequence[int],
    data_size_zyx: Sequence[int],
    size_zyx: Sequence[int],
    label: int,
) -> ModelSpaceWindow:
    """eval.py's window of one anatomy: ``data_size_zyx`` voxels of ``volume`` from
    ``start_zyx``, padded at the end of each axis to ``size_zyx`` (the patch multiple) with
    :data:`REFERENCE_PAD_HU`; the label map holds only ``label`` (other anatomies become 0).

    Returns:
        :class:`ModelSpaceWindow` (``image()`` gives the reference's intensities) whose
        ``start_zyx`` is in the frame of the volume ``volume`` was prepared from.
    """
    start = np.asarray(start_zyx, dtype=int)
    data = np.asarray(data_size_zyx, dtype=int)
    size = np.asarray(size_zyx, dtype=int)
    shape = np.asarray(volume.ct.array.shape)
    if np.any(start < 0) or np.any(start + data > shape) or np.any(size < data):
        raise ValueError(
            f"reference window start {tuple(start)} / data {tuple(data)} / size {tuple(size)} does not fit "
            f"the prepared volume {tuple(shape)}"
        )
    zeros = np.zeros(3, dtype=int)
    hu = _crop_pad(volume.ct.array, start, start + data, zeros, size - data, np.float32(REFERENCE_PAD_HU))
    labels = _crop_pad(volume.labels.array, start, start + data, zeros, size - data, 0)
    labels[labels != label] = 0  # eval.py's window mask: torch.eq(mask, organ_id + 1) only
    geometry = volume.ct.geometry.sub_grid(start, size)
    return ModelSpaceWindow(
        hu=hu,
        labels=labels,
        geometry=geometry,
        start_zyx=tuple(int(v) for v in start + np.asarray(volume.offset_zyx)),
        valid_zyx=tuple((0, int(d)) for d in data),
        reference_scaling=True,
    )
