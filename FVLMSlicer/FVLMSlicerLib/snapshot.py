"""What the GUI thread hands to a background job: views of the input, converted off the GUI thread.

Taking an :class:`InputSnapshot` costs the main thread almost nothing: the CT is a numpy *view*
of the volume node's scalars in their stored type (for a 512x512x400 CT, no 400 MB float copy),
and a segmentation is its shared labelmap layers (views too) with the mapping of each layer's
label values to model anatomy labels. A background thread then checks the intensities, converts
to float32 HU and paints the anatomy label map (:meth:`InputSnapshot.ct`,
:meth:`InputSnapshot.labelmap`). No MRML, no Qt, no Slicer here (``mrml_io`` takes snapshots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fvlm_core.errors import GeometryError
from fvlm_core.io import CTVolume, Geometry, array_to_sitk, check_finite, check_hu, ct_from_array, resample_to


@dataclass
class LayerSnapshot:
    """One labelmap layer of a segmentation.

    Attributes:
        array: ``(Z, Y, X)`` view of the layer's label values.
        geometry: the layer's own grid (its extent may be smaller than the CT's).
        labels: ``{layer label value: (anatomy label, segment order)}`` for the segments of
            model anatomies; the segment order decides overlaps between layers.
    """

    array: np.ndarray
    geometry: Geometry
    labels: dict[int, tuple[int, int]] = field(default_factory=dict)

    def _lookup(self, column: int, dtype) -> np.ndarray:
        top = max([int(self.array.max(initial=0)), *self.labels]) + 1
        lut = np.zeros(top, dtype=dtype)
        for value, entry in self.labels.items():
            if value >= 0:
                lut[value] = entry[column]
        return lut[np.clip(self.array, 0, top - 1).astype(np.intp, copy=False)]

    def anatomy_labels(self) -> np.ndarray:
        """``(Z, Y, X)`` uint8 anatomy labels on the layer grid (0 where no model anatomy)."""
        return self._lookup(0, np.uint8)

    def segment_order(self) -> np.ndarray:
        """``(Z, Y, X)`` int32: 1 + the segment's position in the segmentation (0: none)."""
        return self._lookup(1, np.int32)


@dataclass
class InputSnapshot:
    """The analysed CT (and optional segmentation layers) as taken on the GUI thread.

    Attributes:
        volume: ``(Z, Y, X)`` view of the volume's scalars, stored type (int16, float32, ...).
        geometry: the volume's world geometry (parent transform applied).
        name: the volume node's name (used in messages).
        layers: segmentation layers, in segment order (later layers win where anatomies
            overlap); ``None`` when the anatomies are segmented in the job.
        check_intensities: refuse a volume that does not look like CT in HU.
    """

    volume: np.ndarray
    geometry: Geometry
    name: str
    layers: list[LayerSnapshot] | None = None
    check_intensities: bool = True

    def check(self) -> None:
        """Raise :class:`~fvlm_core.errors.InputError` when a voxel is NaN or infinite (always)
        or, unless ``check_intensities`` is off, when the volume is not CT in HU."""
        if self.check_intensities:
            check_hu(self.volume, self.name)  # finiteness first
        else:
            check_finite(self.volume, self.name)

    def ct(self) -> CTVolume:
        """The CT as float32 HU (a copy: the volume node may change while the job runs), built
        by :func:`fvlm_core.io.ct_from_array` with the library's checks."""
        array = np.array(self.volume, dtype=np.float32)
        return ct_from_array(array, self.geometry, self.name, allow_non_hu=not self.check_intensities)

    def labelmap(self) -> np.ndarray | None:
        """The anatomy label map ``(Z, Y, X)`` uint8 on the CT grid, or ``None`` without layers.

        Segments may lie on several layers and overlap; the segment later in the segmentation's
        order wins, as when the segments are painted one after the other.
        """
        if self.layers is None:
            return None
        out = np.zeros(self.geometry.shape_zyx, dtype=np.uint8)
        order = np.zeros(self.geometry.shape_zyx, dtype=np.int32)
        for layer in self.layers:
            labels, rank = layer.anatomy_labels(), layer.segment_order()
            if not layer.geometry.same_grid(self.geometry):
                resampled = self._on_ct_grid(labels, rank, layer.geometry)
                if resampled is None:
                    continue  # this layer lies entirely outside the CT
                labels, rank = resampled
            wins = rank > order
            out[wins] = labels[wins]
            order[wins] = rank[wins]
        return out

    def _on_ct_grid(
        self, labels: np.ndarray, rank: np.ndarray, geometry: Geometry
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Nearest-neighbour resampling of a layer's labels and ranks onto the CT grid."""
        import SimpleITK as sitk

        try:
            out = [
                sitk.GetArrayFromImage(resample_to(array_to_sitk(a, geometry), self.geometry, is_label=True))
                for a in (labels, rank)
            ]
        except GeometryError:
            return None
        return out[0].astype(np.uint8), out[1].astype(np.int32)
