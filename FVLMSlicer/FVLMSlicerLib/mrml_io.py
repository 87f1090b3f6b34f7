"""MRML nodes <-> fvlm_core arrays, with geometry that stays right (no Qt).

Slicer stores a volume as VTK image data (x fastest, so a numpy view is ``(z, y, x)``, the
project's order) and places it with ``IJKToRAS``. fvlm_core's :class:`~fvlm_core.io.Geometry`
is ITK/LPS, and ``Geometry.affine_ras`` is exactly Slicer's IJKToRAS, so the conversion is one
matrix in each direction; no axis is flipped. Parent transforms are applied when they are
linear (a non-linear one must be hardened first).

Works inside 3D Slicer and headless with the ``slicer-core`` package (see ``headless.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from fvlm_core.anatomy import AnatomyCatalog
from fvlm_core.errors import GeometryError, InputError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume

from .terminology import anatomy_terminology, map_segments
from .totalseg import totalseg_mapping

#: Segment tag prefix for everything this module writes on segments.
TAG_PREFIX = "FVLM."
BINARY_LABELMAP = "Binary labelmap"


# ------------------------------------------------------------------------------------------
# matrices
# ------------------------------------------------------------------------------------------


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=float)


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(array[i, j]))
    return m


def _parent_to_world(node: Any) -> np.ndarray:
    """4x4 from the node's local frame to world RAS (identity without a parent transform)."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise GeometryError(
            f"{node.GetName()}: is under the non-linear transform {transform.GetName()!r}. "
            "Harden the transform (Data module: right-click > Harden transform) and try again."
        )
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return matrix_to_numpy(m)


# ------------------------------------------------------------------------------------------
# volumes
# ------------------------------------------------------------------------------------------


def volume_node_to_ct(volume_node: Any) -> CTVolume:
    """A scalar volume node as a :class:`CTVolume` (float32 ``(Z, Y, X)`` HU, LPS geometry).

    Raises:
        InputError: no image data, or a colour / vector volume.
        GeometryError: a non-linear parent transform.
    """
    view, geometry = volume_view(volume_node)
    return CTVolume(array=np.array(view, dtype=np.float32), geometry=geometry, source=volume_node.GetName())


def volume_view(volume_node: Any) -> tuple[np.ndarray, Geometry]:
    """``(Z, Y, X)`` numpy *view* of a scalar volume (stored type, no copy) and its world
    geometry (ITK/LPS, parent transform applied). Cheap enough for the GUI thread.

    Raises:
        InputError / GeometryError: as :func:`volume_node_to_ct`.
    """
    name, image = volume_node.GetName(), volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{name}: volume node holds no image data. Load a CT first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{name}: has {image.GetNumberOfScalarComponents()} components per voxel; "
            "pick a CT (one intensity per voxel), not a colour or vector volume."
        )
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    x, y, z = image.GetDimensions()
    geometry = Geometry.from_affine_ras(
        _parent_to_world(volume_node) @ matrix_to_numpy(ijk_to_ras), (z, y, x)
    )
    geometry.validate(name)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z, y, x), geometry


def image_steps(
    shape_zyx: tuple[int, int, int], dtype: Any, fill: Callable[[int, int], np.ndarray], image: Any = None
) -> Generator[float, None, Any]:
    """A new VTK image filled a slab of about ``CHUNK_BYTES`` per step (GUI thread, short steps).

    ``fill(z0, z1)`` gives slices ``z0:z1`` (e.g. from a memory-mapped file); ``image``: the
    (empty) image object to fill (default a ``vtkImageData``). Yields 0 between steps, returns
    the image. No scalar range is computed (VTK would scan every voxel in one call).
    """
    from .job import CHUNK_BYTES

    z, y, x = (int(v) for v in shape_zyx)
    image = vtk.vtkImageData() if image is None else image
    image.SetDimensions(x, y, z)
    data = vtk.vtkDataArray.CreateDataArray(numpy_support.get_vtk_array_type(np.dtype(dtype)))
    data.SetNumberOfComponents(1)
    data.SetNumberOfTuples(x * y * z)  # allocates, does not fill
    view = numpy_support.vtk_to_numpy(data).reshape(z, y, x)
    slab = max(1, CHUNK_BYTES // max(view[:1].nbytes, 1))
    for z0 in range(0, z, slab):
        view[z0 : z0 + slab] = fill(z0, min(z, z0 + slab))
        yield 0.0
    image.GetPointData().SetScalars(data)
    return image


def array_to_image(array: np.ndarray, image: Any = None) -> Any:
    """A ``(Z, Y, X)`` array copied into VTK image data in one go (:func:`image_steps` run through)."""
    steps = image_steps(array.shape, array.dtype, lambda z0, z1: array[z0:z1], image)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def add_volume_node(scene: Any, array: np.ndarray, geometry: Geometry, name: str) -> Any:
    """A new scalar volume node holding ``array`` (``(Z, Y, X)``) on ``geometry``, displayed."""
    if tuple(array.shape) != geometry.shape_zyx:
        raise GeometryError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(numpy_to_matrix(geometry.affine_ras))
    node.SetAndObserveImageData(array_to_image(np.ascontiguousarray(array)))
    node.CreateDefaultDisplayNodes()
    return node


def ct_to_volume_node(ct: CTVolume, scene: Any, name: str = "CT") -> Any:
    """A scalar volume node for a :class:`CTVolume`."""
    return add_volume_node(scene, ct.array, ct.geometry, name)


# ------------------------------------------------------------------------------------------
# segmentations
# ------------------------------------------------------------------------------------------


def _oriented_image_to_array(image: Any) -> tuple[np.ndarray, Geometry]:
    """A vtkOrientedImageData as ``(array (Z,Y,X), Geometry)``; the extent start moves the origin."""
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros((0, 0, 0), dtype=np.uint8), None  # empty segment
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    affine = matrix_to_numpy(m)
    start = np.array([extent[0], extent[2], extent[4], 1.0])
    affine[:, 3] = affine @ start
    x, y, z = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z, y, x)
    return array, Geometry.from_affine_ras(affine, array.shape)


def segments(segmentation_node: Any) -> list[tuple[str, str, str]]:
    """``(segment_id, name, terminology)`` of every segment, in display order."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        terminology = vtk.reference("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
        out.append((segment_id, segment.GetName(), str(terminology)))
    return out


def _require_labelmaps(segmentation_node: Any) -> None:
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP) and not segmentation.CreateRepresentation(
        BINARY_LABELMAP
    ):
        raise InputError(
            f"{segmentation_node.GetName()}: could not make a binary labelmap from its segments. "
            "Open the Segmentations module and create the 'Binary labelmap' representation."
        )


def segmentation_layers(
    segmentation_node: Any, mapping: Mapping[str, str]
) -> tuple[list[tuple[np.ndarray, Geometry]], list[tuple[int, int, str]]]:
    """Views of the labelmap layers holding the mapped segments (GUI thread, no voxel copies).

    Args:
        mapping: ``{segment_id: anatomy}`` (:func:`map_segmentation`).

    Returns:
        ``(layers, segments)`` as :class:`~FVLMSlicerLib.job.JobInputs` takes them: each layer as
        ``(view (Z, Y, X), world geometry)``, and ``(layer index, label value, anatomy)`` of every
        mapped segment in the segmentation's order.
    """
    _require_labelmaps(segmentation_node)
    to_world = _parent_to_world(segmentation_node)  # raises for a non-linear transform
    segmentation = segmentation_node.GetSegmentation()
    layers: list[tuple[np.ndarray, Geometry]] = []
    index_of: dict[int, int | None] = {}
    segments = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        if segment_id not in mapping:
            continue
        layer = segmentation.GetLayerIndex(segment_id)
        if layer not in index_of:
            array, geometry = _oriented_image_to_array(segmentation.GetLayerDataObject(layer))
            index_of[layer] = None
            if geometry is not None:  # not an empty layer
                if not np.allclose(to_world, np.eye(4)):
                    geometry = Geometry.from_affine_ras(to_world @ geometry.affine_ras, array.shape)
                index_of[layer] = len(layers)
                layers.append((array, geometry))
        if index_of[layer] is not None:
            value = int(segmentation.GetSegment(segment_id).GetLabelValue())
            segments.append((index_of[layer], value, mapping[segment_id]))
    return layers, segments


def map_segmentation(
    segmentation_node: Any, catalog: AnatomyCatalog, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{segment_id: anatomy}`` for the segments holding model anatomies.

    In a segmentation made by the TotalSegmentator extension, the segments holding its classes
    are mapped by class (:func:`~FVLMSlicerLib.totalseg.totalseg_mapping`: fvlm_core's class
    recognition and ``merge_labels``' class rule; a class no anatomy takes is left out); other
    segment names and terminology are mapped to the catalog's anatomies
    (:func:`~FVLMSlicerLib.terminology.match_segment`). ``overrides`` (segment name ->
    anatomy) win. Several segments may form one anatomy (the five lung lobes of TotalSegmentator).

    Raises:
        InputError: no segment maps to any anatomy of the catalog.
    """
    triples = segments(segmentation_node)
    found = totalseg_mapping(triples, catalog)
    if found is None:
        mapping = map_segments(catalog, triples, overrides)
    else:  # its classes by the library's rule; segments it does not name (user-made) by theirs
        other = [t for t in triples if t[0] not in found.classes or (overrides and t[1] in overrides)]
        mapping = {**found.mapping, **map_segments(catalog, other, overrides)}
        mapping = {sid: mapping[sid] for sid, _, _ in triples if sid in mapping}  # segment order
    if not mapping:
        names = ", ".join(name for _, name, _ in segments(segmentation_node)) or "(none)"
        raise InputError(
            f"{segmentation_node.GetName()}: none of its segments ({names}) is an anatomy this model knows "
            f"({', '.join(catalog.names)}). Rename the segments (e.g. 'lung', 'heart') or choose another "
            "anatomy source (built-in or TotalSegmentator)."
        )
    return mapping


def _mask_to_oriented_image(mask: np.ndarray, geometry: Geometry) -> Any:
    image = array_to_image(np.asarray(mask, dtype=np.uint8), slicer.vtkOrientedImageData())
    image.SetImageToWorldMatrix(numpy_to_matrix(geometry.affine_ras))
    return image


@dataclass
class AnatomyLayer:
    """An anatomy label map ready to become segments: built off the GUI thread.

    Attributes:
        image: the label map as one vtkOrientedImageData (label value = anatomy label).
        present: the catalog anatomies that have voxels in it, in catalog order.
    """

    image: Any
    present: list[str]


def set_anatomy_segments(node: Any, layer: AnatomyLayer, catalog: AnatomyCatalog) -> Any:
    """One segment per present anatomy, all sharing ``layer.image`` (GUI thread, no voxel work).

    Segment IDs are the anatomy names (so results find them again); names are the anatomy
    titles, colours the catalog's, and the terminology is the anatomy's SNOMED CT code. The
    node's earlier segments of the catalog's anatomies are replaced.
    """
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    for anatomy in catalog:
        if segmentation.GetSegment(anatomy.name) is not None:
            segmentation.RemoveSegment(anatomy.name)
    for name in layer.present:
        anatomy = catalog[name]
        segment = slicer.vtkSegment()
        segment.SetName(anatomy.title)
        segment.SetColor(*(c / 255.0 for c in anatomy.color))
        segment.SetLabelValue(catalog.label(name))
        terminology = anatomy_terminology(anatomy)
        if terminology:
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        segment.SetTag(TAG_PREFIX + "anatomy", name)
        segment.AddRepresentation(BINARY_LABELMAP, layer.image)  # shared: one layer, no copies
        segmentation.AddSegment(segment, name)
    return node


def labelmap_to_segmentation_node(
    labelmap: np.ndarray,
    geometry: Geometry,
    catalog: AnatomyCatalog,
    scene: Any,
    name: str = "FVLM anatomies",
    node: Any = None,
    reference_volume_node: Any = None,
) -> Any:
    """A segmentation node with one segment per anatomy of an anatomy label map (blocking).

    See :func:`set_anatomy_segments`; an existing ``node`` is updated.
    """
    if tuple(labelmap.shape) != geometry.shape_zyx:
        raise GeometryError(
            f"label map shape {labelmap.shape} does not match its geometry {geometry.shape_zyx}"
        )
    labelmap = np.asarray(labelmap, dtype=np.uint8)
    present = [a.name for a in catalog if (labelmap == catalog.label(a.name)).any()]
    layer = AnatomyLayer(_mask_to_oriented_image(labelmap, geometry), present)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    return set_anatomy_segments(node, layer, catalog)


def get_segment_tag(segment: Any, tag: str, default: str | None = None) -> str | None:
    """A segment tag's value (``default`` when the segment has no such tag)."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else default
