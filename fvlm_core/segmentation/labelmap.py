"""Use an existing segmentation: a TotalSegmentator file, a folder of masks, or any named label map."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog, load_class_map
from fvlm_core.errors import GeometryError, InputError
from fvlm_core.io import CTVolume, read_label_map
from fvlm_core.segmentation.base import AnatomySegmentation, Progress
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP

_MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

ClassMapLike = Mapping[int, str] | str | os.PathLike | None


def _strip_suffix(name: str) -> str | None:
    for suffix in _MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def class_lookup(catalog: AnatomyCatalog, class_map: Mapping[int, str]) -> np.ndarray:
    """``lut[value] = anatomy label`` for a class map whose names are TotalSegmentator classes
    (matched by the catalog's patterns) or catalog anatomy names."""
    lut = catalog.lookup_table(class_map)
    for value, cls in class_map.items():
        if cls in catalog:
            lut[value] = catalog.label(cls)
    return lut


def merge_labels(labelmap: np.ndarray, class_map: Mapping[int, str], catalog: AnatomyCatalog) -> np.ndarray:
    """Map a named label map into ``catalog``'s anatomy values (unnamed values -> background).

    ``class_map``: value -> a TotalSegmentator class or a catalog anatomy name. Raises
    :class:`~fvlm_core.errors.InputError` for negative values (no class map names them).
    """
    labelmap = np.asarray(labelmap)
    if labelmap.size and labelmap.min() < 0:
        raise InputError("label map holds negative values; class values must be >= 0")
    lut = class_lookup(catalog, class_map)
    top = int(labelmap.max()) if labelmap.size else 0
    if top >= lut.size:
        lut = np.concatenate([lut, np.zeros(top + 1 - lut.size, dtype=lut.dtype)])
    return lut[labelmap]


_CARET_LABEL = re.compile(r'<Label\s+Key="(\d+)"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>', re.S)


def embedded_class_map(path: str | os.PathLike) -> dict[int, str] | None:
    """Class map stored in a NIfTI header extension, as TotalSegmentator writes its ``--ml`` files
    (a CIFTI/Caret XML label table), or ``None`` when there is none."""
    name = str(path).lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    try:
        import nibabel as nib

        extensions = nib.load(str(path)).header.extensions
    except Exception:  # unreadable here: the image reader reports it properly later
        return None
    for ext in extensions:
        content = ext.get_content()
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        labels = {int(k): v.strip() for k, v in _CARET_LABEL.findall(text)}
        if labels:
            return labels
    return None


def resolve_class_map(class_map: ClassMapLike) -> Mapping[int, str] | str | None:
    """``None``/``"auto"``, ``"total"``, ``"anatomy"``, a dict, or a JSON file path -> usable form."""
    if class_map is None or isinstance(class_map, Mapping):
        return class_map
    text = str(class_map)
    if text in ("auto", "total", "anatomy"):
        return None if text == "auto" else text
    return load_class_map(text)


class LabelMapBackend:
    """Reads a segmentation made elsewhere and maps it into a catalog on the CT's grid.

    Args:
        path: one of
            * a TotalSegmentator multilabel file (``--ml``; values per its "total" class map),
            * a folder of per-class masks ``<class>.nii.gz`` (TotalSegmentator without ``--ml``),
            * any label map with ``class_map`` (value -> TotalSegmentator class or anatomy name),
            * a label map already in anatomy values (``class_map="anatomy"``).
        class_map: ``None`` (auto: the class map TotalSegmentator embeds in its NIfTI header when
            present; otherwise a file whose largest value exceeds the catalog size is read as
            TotalSegmentator "total", else as anatomy values), ``"total"``, ``"anatomy"``,
            a dict ``{value: name}`` or a JSON file path of that form.

    A label map on another grid is resampled to the CT by physical position (nearest neighbour);
    one that does not overlap the CT raises :class:`~fvlm_core.errors.GeometryError`.
    """

    name = "labelmap"

    def __init__(self, path: str | os.PathLike, class_map: ClassMapLike = None) -> None:
        self.path = Path(path)
        self.class_map = resolve_class_map(class_map)

    def segment(
        self, ct: CTVolume, catalog: AnatomyCatalog = CTRATE_CATALOG, progress: Progress | None = None
    ) -> AnatomySegmentation:
        if not self.path.exists():
            raise InputError(f"{self.path}: label map not found. Pass an existing file or folder of masks.")
        if self.path.is_dir():
            labelmap = self._from_folder(ct, catalog, progress)
        else:
            if progress:
                progress(f"reading {self.path.name}", 0.0)
            lab = read_label_map(self.path, reference=ct.geometry).array
            labelmap = self._map_values(lab, catalog)
        if progress:
            progress("done", 1.0)
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, self.name)

    def _map_values(self, lab: np.ndarray, catalog: AnatomyCatalog) -> np.ndarray:
        cm = self.class_map
        top = int(lab.max()) if lab.size else 0
        if cm is None:
            cm = embedded_class_map(self.path) or ("total" if top > len(catalog) else "anatomy")
        if cm == "anatomy":
            if top > len(catalog):
                raise InputError(
                    f"{self.path}: holds value {top} but catalog {catalog.name!r} has {len(catalog)} anatomies. "
                    "Pass --class-map JSON naming each value (or 'total' for a TotalSegmentator file)."
                )
            return lab.astype(np.uint8)
        return merge_labels(lab, TOTAL_CLASS_MAP if cm == "total" else cm, catalog)

    def _from_folder(self, ct: CTVolume, catalog: AnatomyCatalog, progress: Progress | None) -> np.ndarray:
        files = sorted(
            (stem, f)
            for f in self.path.iterdir()
            if f.is_file() and (stem := _strip_suffix(f.name)) is not None
        )
        wanted = [
            (stem, f, lbl) for stem, f in files if (lbl := int(class_lookup(catalog, {0: stem})[0])) > 0
        ]
        if not files:
            raise InputError(
                f"{self.path}: folder holds no mask files (<class>.nii.gz). Point to a mask folder."
            )
        labelmap = np.zeros(ct.geometry.shape_zyx, dtype=np.uint8)
        for k, (stem, f, lbl) in enumerate(wanted):
            if progress:
                progress(f"reading {stem}", k / max(len(wanted), 1))
            m = read_label_map(f, reference=ct.geometry).array > 0
            labelmap[m & (labelmap == 0)] = lbl
        return labelmap


class SegmentsBackend:
    """A segmentation stored as label-map layers, its segments painted one after the other.

    The layout of a 3D Slicer segmentation: segments share label-map layers (each layer a file
    with its own grid), a segment is one value of one layer, and where segments of different
    layers overlap the later segment wins. The 3D Slicer module writes the layers of the chosen
    segmentation this way for its worker.

    Args:
        segments: ``[{"file": layer path, "value": label value in it, "anatomy": catalog name}]``
            in the segmentation's order (later ones win where they overlap).

    A layer on another grid is resampled to the CT (nearest neighbour); a layer entirely
    outside the CT contributes nothing.
    """

    name = "segments"

    def __init__(self, segments: list[Mapping[str, object]]) -> None:
        if not segments:
            raise InputError("no segment of the segmentation is an anatomy of the model: nothing to analyse.")
        self.segments = [dict(s) for s in segments]

    def segment(
        self, ct: CTVolume, catalog: AnatomyCatalog = CTRATE_CATALOG, progress: Progress | None = None
    ) -> AnatomySegmentation:
        labelmap = np.zeros(ct.geometry.shape_zyx, dtype=np.uint8)
        layers: dict[str, np.ndarray | None] = {}
        for k, s in enumerate(self.segments):
            path = str(s["file"])
            if path not in layers:
                if progress:
                    progress(f"reading {Path(path).name}", k / len(self.segments))
                try:
                    layers[path] = read_label_map(path, reference=ct.geometry).array
                except GeometryError:
                    layers[path] = None  # the layer lies outside the CT
            if layers[path] is not None:
                labelmap[layers[path] == int(s["value"])] = catalog.label(str(s["anatomy"]))
        if progress:
            progress("done", 1.0)
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, self.name)
