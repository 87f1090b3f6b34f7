"""The similarity overlay as Slicer draws it: rendered offscreen by Slicer's slice pipeline.

``FVLMSlicer/Testing/render_views.py`` renders a slice view from real MRML with the classes a
Slicer slice view uses (``vtkMRMLSliceLogic`` blending the layers through their display nodes,
the segmentation and colour-legend displayable managers). The test puts a map shaped like the
analyzer's (token blocks over the anatomy's whole window, 0 outside it), in an analysis result,
through the module's code that puts results into the scene (``results.show_steps``) and checks
the pixels: untouched outside the anatomy and below the threshold, coloured above it, a legend
drawn, and the same fixed colour scale for every map (a 13-18 % map stays dark red).
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
from FVLMSlicerLib.results import show_steps  # noqa: E402
from render_views import SliceView, application_logic  # noqa: E402

from fvlm_core.anatomy import CTRATE_CATALOG  # noqa: E402
from fvlm_core.io import read_ct  # noqa: E402
from fvlm_core.zeroshot.results import AnalysisResult, AnatomyMap, AnatomyResult, FindingResult  # noqa: E402

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


def shown_map(scene, volume, ct, lung: np.ndarray, similarity: np.ndarray, threshold: float):
    """Put a result whose lung finding is flagged, with ``similarity`` as its map, into the scene
    (the module's own steps); the similarity volume node."""
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(lung))
    finding = FindingResult("Emphysema", 0.9, threshold, "calibrated", True, raw_threshold=threshold)
    anatomies = [AnatomyResult("lung", "present", 1.0, int(lung.sum()), True, 0, "", [finding])]
    anatomies[0].box_zyx = (tuple(b.start for b in box), tuple(b.stop for b in box))
    anatomies += [AnatomyResult(name, "absent", 0.0) for name in ("heart", "esophagus", "aorta")]
    result = AnalysisResult(anatomies, {("lung", "Emphysema"): AnatomyMap.from_full(similarity)}, ct.geometry)
    result.labelmap = lung.astype(np.uint8)
    steps = show_steps(scene, volume.GetID(), result)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value.similarity_volumes[("lung", "Emphysema")]


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
    node = shown_map(scene, volume, ct, lung, similarity, THRESHOLD)
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
    # a map whose tokens all lie between 13 and 18 %, above a 10 % threshold: on the fixed scale
    # it is dark red, not the whole red-to-yellow ramp of a window from the threshold to its top
    faint = np.where(similarity > 0, 0.13 + (similarity - 0.2) / 0.7 * 0.05, 0.0).astype(np.float32)
    faint_node = shown_map(scene, volume, ct, lung, faint, 0.10)
    view.composite.SetForegroundVolumeID(faint_node.GetID())
    faint_shown = view.render().astype(int)
    return {
        "base": base, "shown": shown, "legend": with_legend, "ct": ct, "view": view, "classes": classes,
        "faint": faint_shown, "faint_node": faint_node, "node": node, "lung": lung,
    }  # fmt: skip


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


def test_every_overlay_has_the_same_fixed_colour_scale(rendered):
    """The colour window is 0-100 % for every map (not threshold-to-maximum): a faint map's
    hottest voxels get the colour of 18 %, far from the yellow a 100 % voxel gets."""
    for node in (rendered["node"], rendered["faint_node"]):
        display = node.GetDisplayNode()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == overlay.WINDOW_PERCENT
    ct, base, faint = rendered["ct"], rendered["base"], rendered["faint"]
    idx = _pixel_voxels(rendered["view"], ct)
    inside = np.all((idx >= 0) & (idx < np.array(ct.array.shape)), axis=-1)
    z, y, x = (np.clip(idx[..., a], 0, ct.array.shape[a] - 1) for a in range(3))
    lung = inside & rendered["lung"][z, y, x] & _homogeneous(rendered["lung"].astype(int))[z, y, x]
    tinted = lung & (np.abs(faint - base).sum(-1) > 3)
    assert tinted.mean() > 0.5 * lung.mean()  # the faint map is shown (above its 10 % threshold)
    # green rises from dark red (level 0) to yellow (level 1): at 13-18 % it stays near the bottom
    _, g_top, _, _ = overlay.overlay_rgba(1.0)
    _, g_faint, _, _ = overlay.overlay_rgba(0.18)
    green = faint[..., 1] - 0.4 * base[..., 1]  # the overlay's share at opacity 0.6
    assert np.percentile(green[tinted], 95) < 255 * 0.6 * (g_faint + 0.1 * (g_top - g_faint))
