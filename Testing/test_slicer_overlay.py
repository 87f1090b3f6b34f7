"""The similarity overlay as Slicer draws it: rendered offscreen by Slicer's slice pipeline.

``FVLMSlicer/Testing/render_views.py`` renders a slice view from real MRML with the classes a
Slicer slice view uses (``vtkMRMLSliceLogic`` blending the layers through their display nodes,
the segmentation and colour-legend displayable managers). The test puts a map shaped like the
analyzer's (token blocks over the anatomy's whole window, 0 outside it) through the module's
overlay code and checks the pixels: untouched outside the anatomy and below the threshold,
coloured above it, and a legend drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FVLMSlicer"))
sys.path.insert(0, str(ROOT / "FVLMSlicer" / "Testing"))

from FVLMSlicerLib import mrml_io, overlay  # noqa: E402
from FVLMSlicerLib.headless import new_scene  # noqa: E402
from FVLMSlicerLib.results import set_similarity_volume  # noqa: E402
from FVLMSlicerLib.summary import AnatomyMap  # noqa: E402
from render_views import SliceView, application_logic  # noqa: E402

from fvlm_core.anatomy import CTRATE_CATALOG  # noqa: E402
from fvlm_core.io import read_ct  # noqa: E402

THRESHOLD = 0.55


def _token_map(shape, window: tuple[slice, slice, slice], patch=(4, 8, 8), seed=0) -> np.ndarray:
    """A map like the analyzer's: one value per token patch inside the window, 0 outside."""
    rng = np.random.default_rng(seed)
    grid = [-(-s // p) for s, p in zip(shape, patch)]
    blocks = rng.uniform(0.2, 0.9, size=grid).astype(np.float32)
    full = (
        blocks.repeat(patch[0], 0).repeat(patch[1], 1).repeat(patch[2], 2)[: shape[0], : shape[1], : shape[2]]
    )
    out = np.zeros(shape, dtype=np.float32)
    out[window] = full[window]
    return out


def _pixel_voxels(view: SliceView, ct) -> np.ndarray:
    """``(H, W, 3)`` nearest voxel index (z, y, x) shown at each screen pixel."""
    w, h = view.size
    xy_to_ras = np.array([[view.node.GetXYToRAS().GetElement(i, j) for j in range(4)] for i in range(4)])
    rows, cols = np.mgrid[0:h, 0:w]
    xy = np.stack([cols, h - 1 - rows, np.zeros_like(rows), np.ones_like(rows)], -1).reshape(-1, 4).T
    ijk = np.linalg.inv(ct.geometry.affine_ras) @ xy_to_ras @ xy
    return np.rint(ijk[2::-1].T).astype(int).reshape(h, w, 3)  # (k, j, i) = (z, y, x)


def _homogeneous(classes: np.ndarray) -> np.ndarray:
    """Voxels whose 6 neighbours have their class (pixels there do not depend on sampling)."""
    core = np.ones(classes.shape, dtype=bool)
    for axis in range(3):
        for step in (-1, 1):
            core &= np.roll(classes, step, axis) == classes
    return core


@pytest.fixture(scope="module")
def rendered(ts_dir):
    from fvlm_core.segmentation.builtin import BuiltinBackend

    scene = new_scene()
    app = application_logic(scene)
    view = SliceView(scene, app, "Red", (320, 320))  # views exist before results, as in Slicer
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    volume = mrml_io.ct_to_volume_node(ct, scene, "chest")
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(1400, -300)
    lung = BuiltinBackend().segment(ct, CTRATE_CATALOG).mask("lung")
    z, y, x = ct.array.shape
    window = (slice(0, z), slice(10, y - 10), slice(10, x - 10))  # wider than the lungs
    similarity = _token_map(ct.array.shape, window)
    prepared = overlay.prepare_overlay(AnatomyMap.inside(similarity, lung), ct.geometry, THRESHOLD)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "anatomies")
    node = set_similarity_volume(scene, None, ("lung", "Emphysema"), prepared, seg)
    view.composite.SetBackgroundVolumeID(volume.GetID())
    view.node.SetOrientation("Axial")
    view.fit()
    view.set_offset(ct.geometry.index_zyx_to_ras((int(np.median(np.flatnonzero(lung.any((1, 2))))), 0, 0))[2])
    base = view.render().astype(int)
    view.composite.SetForegroundVolumeID(node.GetID())
    view.composite.SetForegroundOpacity(0.6)
    overlay.set_legend_visible(node, True)
    with_legend = view.render().astype(int)
    overlay.set_legend_visible(node, False)
    shown = view.render().astype(int)
    classes = np.where(lung, np.where(similarity > THRESHOLD, 2, 1), 0)
    return {"base": base, "shown": shown, "legend": with_legend, "ct": ct, "view": view, "classes": classes}


def test_overlay_colours_only_anatomy_voxels_above_the_threshold(rendered):
    ct, base, shown = rendered["ct"], rendered["base"], rendered["shown"]
    idx = _pixel_voxels(rendered["view"], ct)
    inside = np.all((idx >= 0) & (idx < np.array(ct.array.shape)), axis=-1)
    z, y, x = (np.clip(idx[..., a], 0, ct.array.shape[a] - 1) for a in range(3))
    classes = rendered["classes"]
    pixel_class = np.where(inside, classes[z, y, x], -1)
    reliable = inside & _homogeneous(classes)[z, y, x]
    changed = np.abs(shown - base).sum(-1) > 3
    outside = reliable & (pixel_class == 0)
    below = reliable & (pixel_class == 1)
    above = reliable & (pixel_class == 2)
    assert outside.sum() > 5000 and below.sum() > 500 and above.sum() > 500
    assert changed[outside].mean() < 0.002  # no tint outside the anatomy, even inside the map's window
    assert changed[below].mean() < 0.002  # nor where the map is below the finding's threshold
    assert changed[above].mean() > 0.98
    warm = shown[..., 0] - shown[..., 2]  # the colour table runs from red to yellow: more red than blue
    assert (warm[above] - (base[..., 0] - base[..., 2])[above]).mean() > 40


def test_legend_is_drawn_for_the_shown_overlay(rendered):
    legend = np.abs(rendered["legend"] - rendered["shown"]).sum(-1) > 30
    w = rendered["view"].size[0]
    assert legend.sum() > 300  # the colour bar and its labels
    assert legend[:, : w // 2].sum() < legend[:, w // 2 :].sum()  # at its default place, the right side
