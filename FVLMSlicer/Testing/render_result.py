"""Render a picture of an FVLM result the way Slicer shows it, headless, from the MRML nodes.

    python FVLMSlicer/Testing/render_result.py [--model DIR] [--out docs/images/slicer_result.png]

Runs the module's logic on real MRML (``slicer-core``): the chest CT from ../shared/data is
loaded by Slicer's reader, the reference heart and aorta masks plus the built-in lungs form the
input segmentation, the analysis runs (``--model``; default: the model ``fvlm demo`` trained
last, else a random-weight fvlm-tiny, which is said in the caption), and an axial slice is drawn
from the result nodes: CT, segments in their result colours and opacities (flagged anatomies
highlighted, others dimmed), the strongest similarity map as an overlay, and the findings table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "FVLMSlicer"))
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = (
    Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct" / "totalsegmentator"
)


def build_scene(data_dir: Path):
    """Scene with the chest CT (Slicer reader) and the input segmentation."""
    import slicer
    from FVLMSlicerLib import mrml_io
    from FVLMSlicerLib.headless import new_scene

    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.io import read_label_map
    from fvlm_core.segmentation.builtin import BuiltinBackend

    scene = new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest_ct")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(data_dir / "chest_ct.nii.gz"))
    if not storage.ReadData(volume):
        raise OSError(f"Slicer could not read {data_dir / 'chest_ct.nii.gz'}")
    ct = mrml_io.volume_node_to_ct(volume)
    heart = read_label_map(data_dir / "chest_heart.nii.gz", reference=ct.geometry).array > 0
    aorta = read_label_map(data_dir / "chest_aorta_cropped.nii.gz")
    lungs = BuiltinBackend().segment(ct, CTRATE_CATALOG).mask("lung")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "input anatomies")
    seg.CreateDefaultDisplayNodes()
    for sid, name, mask, geometry in (
        ("heart", "heart", heart, ct.geometry),
        ("aorta", "aorta", aorta.array > 0, aorta.geometry),
        ("lungs", "lungs", lungs, ct.geometry),
    ):
        seg.GetSegmentation().AddEmptySegment(sid, name, [0.5, 0.5, 0.5])
        mrml_io.set_segment_mask(seg, sid, mask, geometry)
    return scene, volume, seg


def resolve_model(model: str | None, random_weights: bool = False) -> tuple[str, str]:
    """(model folder, caption)."""
    from FVLMSlicerLib.settings import read_model_info, remembered_model_dir

    path = "" if random_weights else (model or remembered_model_dir())
    if path:
        info = read_model_info(path)
        return path, f"model: {info.name} ({Path(path).name})"
    import torch

    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="fvlm-tiny-random-")
    FVLM.from_config("fvlm-tiny").save_pretrained(out)
    return out, "model: fvlm-tiny with RANDOM weights (display demo, probabilities meaningless)"


def render(volume, nodes, out: Path, caption: str) -> Path:
    """Draw an axial slice (radiological view) through the most flagged anatomy from the nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from FVLMSlicerLib import mrml_io
    from FVLMSlicerLib.results import table_rows

    from fvlm_core.io import array_to_sitk

    ct = mrml_io.volume_node_to_ct(volume)

    def to_lps(array: np.ndarray) -> np.ndarray:  # display order: rows anterior->posterior, cols R->L
        return sitk.GetArrayFromImage(sitk.DICOMOrient(array_to_sitk(array, ct.geometry), "LPS"))

    hu = to_lps(ct.array)
    seg_node = nodes.segmentation
    display = seg_node.GetDisplayNode()
    segmentation = seg_node.GetSegmentation()
    layers = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        mask = to_lps(mrml_io.segment_mask(seg_node, sid, ct.geometry).astype(np.uint8)) > 0
        layers.append((segment.GetName(), mask, segment.GetColor(), display.GetSegmentOpacity2DFill(sid)))
    rows = table_rows(nodes.table)
    flagged = [r for r in rows if r["flagged"] == "1"]
    focus = max(flagged, key=lambda r: float(r["probability"]))["anatomy"] if flagged else "heart"
    focus_mask = next((m for n, m, _, _ in layers if n.lower() == focus), layers[0][1])
    z = int(np.median(np.flatnonzero(focus_mask.any(axis=(1, 2)))))

    spacing = ct.geometry.spacing
    fig = plt.figure(figsize=(10, 5.2), dpi=100, facecolor="black")
    ax = fig.add_axes((0.0, 0.05, 0.5, 0.88))
    ax.imshow(np.clip((hu[z] + 1000) / 1400, 0, 1), cmap="gray", aspect=spacing[1] / spacing[0])
    rgba = np.zeros((*hu.shape[1:], 4))
    for _, mask, color, opacity in layers:
        rgba[mask[z]] = (*color, opacity)
    ax.imshow(rgba, aspect=spacing[1] / spacing[0])
    if nodes.similarity_volumes:
        key = max(nodes.similarity_volumes, key=nodes.probability)
        sim = to_lps(mrml_io.volume_node_to_ct(nodes.similarity_volumes[key]).array)[z]
        shown = np.ma.masked_where(sim <= np.percentile(sim, 97), sim)
        ax.imshow(shown, cmap="hot", alpha=0.55, aspect=spacing[1] / spacing[0])
        ax.set_title(f"similarity map: {key[1]} ({key[0]})", color="white", fontsize=9)
    for _name, mask, color, opacity in layers:
        if mask[z].any():
            ax.contour(mask[z], levels=[0.5], colors=[color], linewidths=1.2 if opacity > 0.3 else 0.5)
    ax.text(3, 12, "R", color="white", fontsize=9)
    ax.set_axis_off()

    tab = fig.add_axes((0.52, 0.05, 0.46, 0.88))
    tab.set_axis_off()
    tab.set_facecolor("black")
    lines = [f"{'anatomy':<10}{'finding':<34}{'p':>6}{'thr':>6}"]
    for r in rows:
        p = "  n/a" if r["probability"].lower() == "nan" else f"{float(r['probability']):6.2f}"
        lines.append(f"{r['anatomy']:<10}{r['finding'][:33]:<34}{p:>6}{float(r['threshold']):6.2f}")
    colors = ["white"] + ["#ff5a45" if r["flagged"] == "1" else "#9a9a9a" for r in rows]
    for i, (line, color) in enumerate(zip(lines, colors)):
        tab.text(
            0,
            1 - i * 0.052,
            line,
            color=color,
            family="monospace",
            fontsize=8,
            va="top",
            transform=tab.transAxes,
        )
    fig.text(
        0.01, 0.01, "FVLM (headless Slicer MRML): red = flagged. " + caption, color="#cccccc", fontsize=8
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor="black")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model folder (default: last `fvlm demo` model, else random tiny)"
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with chest_ct.nii.gz and its masks")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "slicer_result.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random", action="store_true", help="use a random-weight fvlm-tiny (display demo)")
    args = parser.parse_args(argv)

    from FVLMSlicerLib.logic import AnalysisLogic

    scene, volume, seg = build_scene(Path(args.data))
    model_dir, caption = resolve_model(args.model, args.random)
    nodes = AnalysisLogic(scene).analyze(volume, seg, model_dir=model_dir, device=args.device)
    path = render(volume, nodes, Path(args.out), caption)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
