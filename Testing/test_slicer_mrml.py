"""FVLMSlicerLib against real MRML (headless Slicer core, ``pip install slicer-core``).

The chest CT is loaded by Slicer's own volume reader; the reference heart and the aorta (on
its own cropped grid) plus the built-in segmenter's lungs form the input segmentation; the
analysis runs with a tiny random-weight fvlm model; results are checked in the nodes and
after saving/reloading .seg.nrrd, .tsv and .mrb.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

import nibabel as nib  # noqa: E402
import vtk  # noqa: E402

# FVLMSlicerLib: on sys.path by conftest.py; the test tools beside the module's test harness
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FVLMSlicer" / "Testing"))
from FVLMSlicerLib import mrml_io  # noqa: E402
from FVLMSlicerLib.headless import new_scene  # noqa: E402
from FVLMSlicerLib.logic import AnalysisLogic  # noqa: E402
from FVLMSlicerLib.results import (  # noqa: E402
    ATTR_ROLE,
    FINDING_TAGS,
    dimmed_color,
    find_results,
    finding_tag,
    highlight_color,
    rows,
)
from scene_tools import (  # noqa: E402
    load_scene_mrb,
    save_scene_mrb,
    segment_mask,
    segmentation_node_to_labelmap,
    set_segment_mask,
    table_rows,
)

from fvlm_core.anatomy import CTRATE_CATALOG  # noqa: E402
from fvlm_core.io import read_ct, read_label_map  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_volume(scene, path: Path, name: str):
    """Read with Slicer's archetype reader (ITK, LPS -> RAS by Slicer itself)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _rgba(color_node, index: int) -> list[float]:
    rgba = [0.0] * 4
    color_node.GetColor(index, rgba)
    return rgba


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml_io.matrix_to_numpy(m)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from fvlm_core.calibration import Calibration
    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fvlm-tiny")
    model = FVLM.from_config("fvlm-tiny")
    # the heart's findings calibrated, the others not: the table and tags show both kinds of rows
    platt = Calibration("platt", "test", a=0.5, b=-1.0).to_dict()
    heart = [f["name"] for f in model.config.findings if f["anatomy"] == "heart"]
    model.save_pretrained(out, calibration={name: platt for name in heart}, thresholds={heart[0]: 0.3})
    return out


@pytest.fixture(scope="module")
def chest(ts_dir):
    """Scene with the chest CT and an input segmentation (reference heart + aorta, built-in lungs)."""
    from fvlm_core.segmentation.builtin import BuiltinBackend

    scene = new_scene()
    volume = _load_volume(scene, ts_dir / "chest_ct.nii.gz", "chest_ct")
    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    heart = read_label_map(ts_dir / "chest_heart.nii.gz").array > 0
    aorta = read_label_map(ts_dir / "chest_aorta_cropped.nii.gz")  # its own grid
    builtin = BuiltinBackend().segment(ct, CTRATE_CATALOG)

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "input anatomies")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = seg.GetSegmentation()
    # like the TotalSegmentator extension: terminology-coded heart, plain names elsewhere
    segmentation.AddEmptySegment("s_heart", "heart", [0.9, 0.3, 0.3])
    segmentation.GetSegment("s_heart").SetTag(
        "TerminologyEntry",
        "Segmentation category and type - Total Segmentator~SCT^123037004^Anatomical Structure~SCT^80891009^Heart~^^~~^^~^^",
    )
    set_segment_mask(seg, "s_heart", heart, ct.geometry)
    segmentation.AddEmptySegment("s_aorta", "aorta", [0.8, 0.2, 0.2])
    set_segment_mask(seg, "s_aorta", aorta.array > 0, aorta.geometry)
    for side in ("left", "right"):
        segmentation.AddEmptySegment(f"s_lung_{side}", f"{side.capitalize()} lung", [0.7, 0.6, 0.5])
        set_segment_mask(seg, f"s_lung_{side}", builtin.classes[f"lung_{side}"], ct.geometry)
    segmentation.AddEmptySegment("s_body", "body", [0.5, 0.5, 0.5])  # no model anatomy: ignored
    set_segment_mask(seg, "s_body", builtin.classes["body"], ct.geometry)
    return {"scene": scene, "volume": volume, "ct": ct, "seg": seg, "heart": heart, "builtin": builtin}


@pytest.fixture(scope="module")
def analysed(chest, tiny_model):
    """The chest analysed as the panel does it (the warm worker, the results shown in steps);
    the maps' voxels are copied on their way into the scene (the job lets go of them after)."""
    logic = AnalysisLogic(chest["scene"])
    job = logic.start(chest["volume"], chest["seg"], model_dir=str(tiny_model), device="cpu")
    show, maps = job.show, {}

    def keep_maps(result):
        maps.update({key: amap.full() for key, amap in result.similarity_maps.items()})
        return (yield from show(result))

    job.show = keep_maps
    status = job.wait(600)
    assert status.state == "done", status.error
    job.nodes.maps = maps
    return job.nodes


def test_volume_node_matches_fvlm_core_reader(chest, ts_dir):
    ct = mrml_io.volume_node_to_ct(chest["volume"])
    assert ct.geometry.same_grid(chest["ct"].geometry)
    np.testing.assert_array_equal(ct.array, chest["ct"].array)
    # Slicer's IJKToRAS equals the NIfTI affine (RAS) that nibabel reads independently
    np.testing.assert_allclose(
        _ijk_to_ras(chest["volume"]), nib.load(ts_dir / "chest_ct.nii.gz").affine, atol=1e-3
    )


def test_input_segments_become_anatomy_labels_on_the_ct_grid(chest, ts_dir):
    labelmap, mapping = segmentation_node_to_labelmap(chest["seg"], chest["ct"].geometry, CTRATE_CATALOG)
    assert mapping == {
        "s_heart": "heart",
        "s_aorta": "aorta",
        "s_lung_left": "lung",
        "s_lung_right": "lung",
    }
    aorta_ref = (
        read_label_map(ts_dir / "chest_aorta_cropped.nii.gz", reference=chest["ct"].geometry).array > 0
    )
    lung = chest["builtin"].mask("lung")
    # segment order heart, aorta, lungs: a later segment wins where they overlap
    np.testing.assert_array_equal(labelmap == CTRATE_CATALOG.label("lung"), lung)
    np.testing.assert_array_equal(labelmap == CTRATE_CATALOG.label("aorta"), aorta_ref & ~lung)
    np.testing.assert_array_equal(
        labelmap == CTRATE_CATALOG.label("heart"), chest["heart"] & ~aorta_ref & ~lung
    )
    assert (labelmap == CTRATE_CATALOG.label("heart")).sum() > 0.95 * chest["heart"].sum()


def test_lps_mask_lands_on_the_same_physical_voxel_in_slicer(tmp_path, chest, ts_dir):
    """A mask on an LPS grid with flipped/permuted axes marks the same RAS point in Slicer."""
    ct = chest["ct"]
    # the same CT stored with its x axis reversed (array flipped, header direction and origin to match):
    # every voxel keeps its physical position, only the storage order changes
    from fvlm_core.geometry import Geometry
    from fvlm_core.io import write_image

    g = ct.geometry
    d = g.direction_matrix.copy()
    d[:, 0] *= -1
    origin = g.affine_lps @ [g.size[0] - 1, 0, 0, 1]
    flipped_geometry = Geometry(g.size, g.spacing, tuple(origin[:3]), tuple(d.reshape(-1)))
    path = write_image(ct.array[:, :, ::-1].copy(), flipped_geometry, tmp_path / "flipped_lps.nrrd")
    scene = new_scene()
    node = _load_volume(scene, path, "flipped")
    in_slicer = mrml_io.volume_node_to_ct(node)  # Slicer may reorder slices to keep IJK right-handed
    heart = chest["heart"][:, :, ::-1].copy()  # the mask, stored like the flipped file
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.GetSegmentation().AddEmptySegment("heart", "heart", [1, 0, 0])
    set_segment_mask(seg, "heart", heart, flipped_geometry)

    z, y, x = (int(v) for v in np.argwhere(chest["heart"])[len(np.argwhere(chest["heart"])) // 2])
    ras = ct.geometry.index_zyx_to_ras((z, y, x))  # where the voxel is, from the original file
    np.testing.assert_allclose(
        ras, (nib.load(ts_dir / "chest_ct.nii.gz").affine @ [x, y, z, 1])[:3], atol=1e-3
    )
    # Slicer: the segment's labelmap at that RAS point is set, and the volume maps it back to a voxel of the mask
    oriented = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        seg, "heart", oriented, True
    )
    world_to_ijk = vtk.vtkMatrix4x4()
    oriented.GetWorldToImageMatrix(world_to_ijk)
    i, j, k = np.rint(mrml_io.matrix_to_numpy(world_to_ijk) @ [*ras, 1])[:3].astype(int)
    assert oriented.GetScalarComponentAsDouble(i, j, k, 0) == 1
    # the volume node holds the same HU at that RAS point
    ijk = np.rint(np.linalg.inv(_ijk_to_ras(node)) @ [*ras, 1])[:3].astype(int)
    assert in_slicer.array[ijk[2], ijk[1], ijk[0]] == ct.array[z, y, x]
    assert ijk[0] == ct.geometry.size[0] - 1 - x  # the reversed axis, seen through the header
    np.testing.assert_allclose(in_slicer.geometry.index_zyx_to_ras(ijk[::-1]), ras, atol=1e-3)
    # and back out of Slicer onto the original grid: the same voxel
    back = segment_mask(seg, "heart", ct.geometry)
    np.testing.assert_array_equal(back, chest["heart"])


def test_results_table_rows_match_the_analysis(analysed):
    """Calibrated findings in the probability column, the others in the uncalibrated score column
    (never called probabilities); thresholds on the row's scale; raw scores beside them."""
    from fvlm_core.calibration import Calibration

    platt = Calibration("platt", "test", a=0.5, b=-1.0)
    rows_ = table_rows(analysed.table)
    expected = rows(analysed.result)
    assert len(rows_) == len(expected) == 16  # the CT-RATE findings of the 4 anatomies
    assert list(rows_[0])[:9] == [
        "anatomy", "finding", "probability (%)", "uncalibrated score (x100)", "threshold (same scale)",
        "flagged", "raw score (x100)", "raw threshold (x100)", "calibration",
    ]  # fmt: skip
    kinds = set()
    first_heart = next(f.name for a, f in expected if a.name == "heart")
    for row, (anatomy, want) in zip(rows_, expected):
        assert (row["anatomy"], row["finding"]) == (anatomy.name, want.name)
        probability, score = row["probability (%)"].lower(), row["uncalibrated score (x100)"].lower()
        if not want.scored:
            assert (probability, score, row["flagged"]) == ("nan", "nan", "n/a")
            continue
        kinds.add(anatomy.name == "heart")
        assert row["flagged"] == ("Yes" if want.flagged else "No")
        assert float(row["raw score (x100)"]) == pytest.approx(100 * want.raw_score, abs=0.0051)
        if anatomy.name == "heart":  # calibrated: percent with one decimal
            assert score == "nan" and row["calibration"] == "probability (Platt)"
            assert float(probability) == pytest.approx(100 * platt.probability(want.raw_score), abs=0.051)
            raw_t = 0.3 if want.name == first_heart else 0.5  # the one stored threshold
            assert float(row["raw threshold (x100)"]) == pytest.approx(100 * raw_t)
            assert float(row["threshold (same scale)"]) == pytest.approx(
                100 * platt.probability(raw_t), abs=0.051
            )
        else:
            assert probability == "nan" and row["calibration"].startswith("uncalibrated score: ")
            assert float(score) == pytest.approx(100 * want.raw_score, abs=0.051)
            assert float(row["threshold (same scale)"]) == float(row["raw threshold (x100)"]) == 50.0
    assert kinds == {True, False}
    notes = {r["anatomy"]: r["note"] for r in rows_}
    assert "not scored" in notes["esophagus"]  # the analyzer's reason, in the table
    present = {a.name for a, f in expected if f.scored}
    assert present == {"lung", "heart", "aorta"}  # esophagus was not given: not scored


def test_segments_are_highlighted_or_dimmed_and_tagged(analysed):
    seg = analysed.segmentation.GetSegmentation()
    assert {seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())} == {"lung", "heart", "aorta"}
    for anatomy in analysed.result.anatomies:
        segment = seg.GetSegment(anatomy.name)
        if segment is None:
            continue
        base = tuple(CTRATE_CATALOG[anatomy.name].color[i] / 255.0 for i in range(3))
        want = highlight_color(base, anatomy.max_flagged_value) if anatomy.flagged else dimmed_color(base)
        np.testing.assert_allclose(segment.GetColor(), want, atol=1e-6)
        if anatomy.flagged:  # flagged: redder than the anatomy colour
            assert segment.GetColor()[0] - segment.GetColor()[2] > base[0] - base[2]
        terminology = mrml_io.get_segment_tag(segment, "TerminologyEntry")
        assert CTRATE_CATALOG[anatomy.name].snomed[0] in terminology
        for f in anatomy.findings:
            tags = {
                kind: mrml_io.get_segment_tag(segment, finding_tag(kind, f.name)) for kind in FINDING_TAGS
            }
            if not f.scored:
                assert set(tags.values()) == {None}
                continue
            value = tags["probability" if f.calibrated else "uncalibratedScore"]
            assert tags["uncalibratedScore" if f.calibrated else "probability"] is None  # one or the other
            assert float(value) == pytest.approx(f.value, abs=1e-4)
            assert float(tags["threshold"]) == pytest.approx(f.threshold, abs=1e-4)
            assert float(tags["rawScore"]) == pytest.approx(f.raw_score, abs=1e-4)
            assert tags["scale"] == (
                "probability (Platt)" if anatomy.name == "heart" else "uncalibrated score"
            )
    assert any(a.flagged for a in analysed.result.anatomies) or not analysed.similarity_volumes
    display = analysed.segmentation.GetDisplayNode()
    for anatomy in analysed.result.anatomies:
        if seg.GetSegment(anatomy.name) is not None:  # flagged drawn opaque, others faint
            opacity = display.GetSegmentOpacity2DFill(anatomy.name)
            assert opacity >= 0.5 if anatomy.flagged else opacity < 0.2


def test_table_row_jumps_to_the_anatomy_centre(analysed, chest):
    from FVLMSlicerLib.results import anatomy_center_ras

    geometry = chest["ct"].geometry
    for anatomy in ("lung", "heart", "aorta"):
        mask = segment_mask(analysed.segmentation, anatomy, geometry)
        voxel_centre = geometry.index_zyx_to_ras(np.argwhere(mask).mean(axis=0))
        # Slicer's segment centre (its bounding box / centroid) lies within a few voxels of the voxel mean
        assert (
            np.linalg.norm(np.subtract(anatomy_center_ras(analysed.segmentation, anatomy), voxel_centre)) < 40
        )
    assert anatomy_center_ras(analysed.segmentation, "esophagus") is None


def test_similarity_maps_lie_on_the_ct_grid_inside_their_anatomy(analysed, chest):
    """Maps are percent volumes on the CT grid, cropped to the anatomy and 0 outside it."""
    from FVLMSlicerLib.overlay import ATTR_COLOR_TABLE

    flagged = {(a.name, f.name): f for a, f in rows(analysed.result) if f.flagged}
    assert set(analysed.similarity_volumes) == set(flagged) & set(analysed.result.similarity_maps)
    assert analysed.similarity_volumes, "the random tiny model flags something on the chest CT"
    ct = chest["ct"]
    for key, node in analysed.similarity_volumes.items():
        anatomy = segment_mask(analysed.segmentation, key[0], ct.geometry)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(anatomy))
        m_node, m_ct = _ijk_to_ras(node), _ijk_to_ras(chest["volume"])
        np.testing.assert_allclose(m_node[:3, :3], m_ct[:3, :3], atol=1e-6)  # same axes and spacing
        start = [box[2].start, box[1].start, box[0].start, 1.0]
        np.testing.assert_allclose(m_node[:3, 3], (m_ct @ start)[:3], atol=1e-4)  # origin at the box
        array = mrml_io.volume_node_to_ct(node).array
        want = np.where(anatomy[box], 100.0 * analysed.maps[key][box], 0.0)
        np.testing.assert_allclose(array, want, atol=1e-4)
        display = node.GetDisplayNode()
        threshold = 100.0 * flagged[key].raw_threshold  # the maps are raw scores, as the raw threshold
        assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(threshold)
        assert display.GetColorNode().GetAttribute(ATTR_COLOR_TABLE) == "1"


def test_segmentation_table_and_scene_survive_save_and_reload(analysed, chest, tmp_path):
    scene = chest["scene"]
    # .seg.nrrd
    storage = analysed.segmentation.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "anatomies.seg.nrrd"))
    assert storage.WriteData(analysed.segmentation)
    other = new_scene()
    seg2 = other.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "anatomies.seg.nrrd"))
    assert reader.ReadData(seg2)
    geometry = chest["ct"].geometry
    for name in ("lung", "heart", "aorta"):
        a, b = (
            seg2.GetSegmentation().GetSegment(name),
            analysed.segmentation.GetSegmentation().GetSegment(name),
        )
        np.testing.assert_allclose(a.GetColor(), b.GetColor(), atol=1e-3)
        for f in analysed.result.anatomy(name).findings:
            for kind in FINDING_TAGS:
                tag = finding_tag(kind, f.name)
                assert mrml_io.get_segment_tag(a, tag) == mrml_io.get_segment_tag(b, tag)
        np.testing.assert_array_equal(
            segment_mask(seg2, name, geometry),
            segment_mask(analysed.segmentation, name, geometry),
        )
    # .tsv
    tstorage = analysed.table.CreateDefaultStorageNode()
    tstorage.SetFileName(str(tmp_path / "findings.tsv"))
    assert tstorage.WriteData(analysed.table)
    table2 = other.AddNewNodeByClass("vtkMRMLTableNode", "reloaded table")
    treader = slicer.vtkMRMLTableStorageNode()
    treader.SetFileName(str(tmp_path / "findings.tsv"))
    assert treader.ReadData(table2)
    assert table_rows(table2) == table_rows(analysed.table)
    # whole scene as .mrb
    assert save_scene_mrb(scene, tmp_path / "scene.mrb")
    loaded = load_scene_mrb(tmp_path / "scene.mrb")
    seg3 = loaded.GetNodeByID(analysed.segmentation.GetID())
    table3 = loaded.GetNodeByID(analysed.table.GetID())
    assert seg3.GetAttribute(ATTR_ROLE) == "anatomies" and table3.GetAttribute(ATTR_ROLE) == "findings"
    assert table_rows(table3) == table_rows(analysed.table)
    lung = seg3.GetSegmentation().GetSegment("lung")
    assert mrml_io.get_segment_tag(lung, "FVLM.flagged") == mrml_io.get_segment_tag(
        analysed.segmentation.GetSegmentation().GetSegment("lung"), "FVLM.flagged"
    )
    # the analysis comes back whole from the scene (its JSON on the table node) with its nodes
    found = find_results(loaded)
    assert found.result.to_dict() == analysed.result.to_dict()
    assert (
        found.segmentation.GetID() == analysed.segmentation.GetID() and found.table.GetID() == table3.GetID()
    )
    assert {k: v.GetID() for k, v in found.similarity_volumes.items()} == {
        k: v.GetID() for k, v in analysed.similarity_volumes.items()
    }
    for node in analysed.similarity_volumes.values():
        node3 = loaded.GetNodeByID(node.GetID())
        np.testing.assert_allclose(_ijk_to_ras(node3), _ijk_to_ras(node), atol=1e-4)
        np.testing.assert_allclose(
            mrml_io.volume_node_to_ct(node3).array, mrml_io.volume_node_to_ct(node).array, atol=1e-5
        )
        display, display3 = node.GetDisplayNode(), node3.GetDisplayNode()  # the overlay's look survives
        assert display3.GetApplyThreshold() and display3.GetLowerThreshold() == display.GetLowerThreshold()
        colors3 = display3.GetColorNode()
        assert (
            colors3 is not None and colors3.GetNumberOfColors() == display.GetColorNode().GetNumberOfColors()
        )
        assert _rgba(colors3, 0)[3] == 0.0  # the transparent low end


def test_rerun_reuses_result_nodes(analysed, chest, tiny_model, tmp_path):
    logic = AnalysisLogic(chest["scene"])
    again = logic.analyze(
        chest["volume"], chest["seg"], model_dir=str(tiny_model), device="cpu", similarity_maps=False
    )
    assert again.segmentation is analysed.segmentation and again.table is analysed.table
    # colours are recomputed from the original colour, not compounded
    lung = again.segmentation.GetSegmentation().GetSegment("lung")
    base = tuple(c / 255.0 for c in CTRATE_CATALOG["lung"].color)
    s = again.result.anatomy("lung")
    want = highlight_color(base, s.max_flagged_value) if s.flagged else dimmed_color(base)
    np.testing.assert_allclose(lung.GetColor(), want, atol=1e-6)
    # the same weights without calibration: the heart's probabilities become uncalibrated scores,
    # and no probability tag of the calibrated run is left on its segment
    import shutil

    from fvlm_core.model.config import load_config

    plain = tmp_path / "uncalibrated"
    shutil.copytree(tiny_model, plain)
    cfg = load_config(plain)
    cfg.calibration = {}
    cfg.save(plain / "config.yaml")
    third = logic.analyze(
        chest["volume"], chest["seg"], model_dir=str(plain), device="cpu", similarity_maps=False
    )
    heart = third.segmentation.GetSegmentation().GetSegment("heart")
    for f in third.result.anatomy("heart").findings:
        assert f.scale == "uncalibrated score"
        assert mrml_io.get_segment_tag(heart, finding_tag("probability", f.name)) is None
        assert float(
            mrml_io.get_segment_tag(heart, finding_tag("uncalibratedScore", f.name))
        ) == pytest.approx(f.raw_score, abs=1e-4)


def _slab(chest, n: int):
    """A scene with ``n`` slices of the chest CT through the heart (its geometry moved to match)."""
    from fvlm_core.geometry import Geometry
    from fvlm_core.io import CTVolume

    ct, g = chest["ct"], chest["ct"].geometry
    start = int(np.flatnonzero(chest["heart"].any(axis=(1, 2)))[0])
    origin = g.affine_lps @ [0, 0, start, 1]
    geometry = Geometry((g.size[0], g.size[1], n), g.spacing, tuple(origin[:3]), g.direction)
    slab = CTVolume(ct.array[start : start + n].copy(), geometry, "chest slab")
    scene = new_scene()
    return scene, slab, mrml_io.ct_to_volume_node(slab, scene, "chest slab")


def test_a_job_reports_its_stages_in_short_steps_and_cancels(chest, tiny_model):
    """The built-in segmenter in the worker on a slab; the job's steps on this side stay short."""
    from fvlm_core.segmentation.builtin import BuiltinBackend

    scene, slab, volume = _slab(chest, 40)
    logic = AnalysisLogic(scene)
    job = logic.start(volume, None, model_dir=str(tiny_model), device="cpu")
    job.cancel()  # before the first step: stops there, starts nothing
    status = job.wait(60)
    assert status.state == "cancelled" and job.nodes is None and not job.job_dir.exists()
    seen = []
    job = logic.start(volume, None, model_dir=str(tiny_model), device="cpu")
    while (delay := job.step()) is not None:
        seen.append(job.status.fraction)
        time.sleep(delay)
    assert job.status.state == "done", job.status.error
    assert seen == sorted(seen) and job.status.fraction == 1.0
    log = "\n".join(job.status.log)
    for stage in ("prepare", "load model", "segment: builtin", "analyze", "finish"):
        assert f"s  {stage}" in log, stage
    assert job.status.longest_step_s < 1.0  # short steps (the 200 ms rule is measured at full size)
    expected = BuiltinBackend().segment(slab, CTRATE_CATALOG).labelmap
    got, _ = segmentation_node_to_labelmap(job.nodes.segmentation, slab.geometry, CTRATE_CATALOG)
    np.testing.assert_array_equal(got, expected)
    assert job.nodes.result.segmentation["source"] == "builtin" and not job.job_dir.exists()


def test_model_folder_defaults_to_the_demo_model(tmp_path, monkeypatch, tiny_model):
    from fvlm_core.errors import CheckpointError

    monkeypatch.setenv("FVLM_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="Import official fVLM weights") as refused:
        AnalysisLogic.resolve_model_dir(".")  # an unset pathlib.Path parameter
    assert "fvlm demo" not in str(refused.value) and "fvlm train" not in str(refused.value)
    (tmp_path / "last_demo_model.txt").write_text(str(tiny_model))  # what training/demo.py writes
    assert AnalysisLogic.resolve_model_dir("") == str(tiny_model)
    assert AnalysisLogic.resolve_model_dir(str(tmp_path)) == str(tmp_path)  # an explicit folder wins


def test_parent_transforms_are_applied_or_refused(chest):
    """A linear parent transform moves volume and segments together; a warping one is refused."""
    from fvlm_core.errors import GeometryError

    scene = new_scene()
    ct = chest["ct"]
    volume = mrml_io.ct_to_volume_node(ct, scene, "moved")
    seg = mrml_io.labelmap_to_segmentation_node(
        chest["heart"].astype(np.uint8) * 2, ct.geometry, CTRATE_CATALOG, scene
    )
    shift = np.eye(4)
    shift[:3, 3] = (12.0, -7.5, 30.0)  # RAS mm
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(mrml_io.numpy_to_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml_io.volume_node_to_ct(volume).geometry
    np.testing.assert_allclose(moved.affine_ras, shift @ ct.geometry.affine_ras, atol=1e-6)
    assert not np.array_equal(segment_mask(seg, "heart", moved), chest["heart"])  # seg not moved yet
    seg.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(segment_mask(seg, "heart", moved), chest["heart"])

    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ((0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100)):
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 5, p[1], p[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(GeometryError, match="Harden"):
        mrml_io.volume_node_to_ct(volume)


def test_a_volume_that_is_not_ct_is_refused_with_a_clear_message(chest, tiny_model):
    """The worker reads the volume with the library's reader and checks; the error names the node
    and reaches the console as the library's InputError; ``allow_non_hu`` lets it through."""
    from fvlm_core.errors import InputError

    scene, slab, _ = _slab(chest, 24)
    from fvlm_core.io import CTVolume

    mr_like = mrml_io.ct_to_volume_node(CTVolume((slab.array + 1024.0) / 4.0, slab.geometry), scene, "T1")
    logic = AnalysisLogic(scene)
    with pytest.raises(InputError, match="'T1'") as refused:
        logic.analyze(mr_like, None, str(tiny_model), device="cpu")
    assert "HU" in str(refused.value) and "fvlm-job" not in str(refused.value)
    try:
        logic.analyze(mr_like, None, str(tiny_model), device="cpu", allow_non_hu=True)
    except InputError as exc:  # e.g. nothing segmented in it: not the intensity check
        assert "HU" not in str(exc)


def test_the_modules_in_slicer_self_test_phantom_analyses_headless(tiny_model):
    """FVLMSlicerTest's phantom (an oblique LPS volume) goes through the same logic headless."""
    import ast

    tree = ast.parse((ROOT / "FVLMSlicer" / "FVLMSlicer.py").read_text())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FVLMSlicerTest")
    phantom = next(n for n in test_class.body if isinstance(n, ast.FunctionDef) and n.name == "_phantom")
    namespace: dict = {}
    exec(compile(ast.Module(body=[phantom], type_ignores=[]), "FVLMSlicer._phantom", "exec"), namespace)
    ct, labels = namespace["_phantom"](None)

    scene = new_scene()
    volume = mrml_io.ct_to_volume_node(ct, scene, "FVLM phantom")
    back = mrml_io.volume_node_to_ct(volume)
    assert back.geometry.same_grid(ct.geometry) and np.array_equal(back.array, ct.array)
    seg = mrml_io.labelmap_to_segmentation_node(labels, ct.geometry, CTRATE_CATALOG, scene, "input")
    nodes = AnalysisLogic(scene).analyze(volume, seg, model_dir=str(tiny_model), device="cpu")
    assert nodes.table.GetNumberOfRows() == 16
    assert {a.name: a.status for a in nodes.result.anatomies}["esophagus"] == "absent"
    labelmap, _ = segmentation_node_to_labelmap(nodes.segmentation, ct.geometry, CTRATE_CATALOG)
    np.testing.assert_array_equal(labelmap, labels)


@pytest.mark.slow
def test_a_warm_job_that_does_not_stop_in_time_gets_the_worker_killed_and_a_new_one_next(chest, tiny_model):
    """The other Cancel path of the warm worker (issue 17): the job is still running when the grace
    period ends (0 s here: the first check after cancel), so the worker's whole process tree is
    killed; the job folder goes; the next job starts a new worker and says so."""
    from FVLMSlicerLib.process import process_tree
    from FVLMSlicerLib.warm import WarmWorker

    scene, _, volume = _slab(chest, 24)
    worker = WarmWorker()
    logic = AnalysisLogic(scene)
    try:
        job = logic.start(volume, None, model_dir=str(tiny_model), device="cpu", worker=worker)
        job.cancel_grace_s = 0.0
        deadline = time.monotonic() + 120
        while not any("job 1:" in line for line in job.status.log) and time.monotonic() < deadline:
            time.sleep(job.step() or 0.0)  # until the worker has taken the job
        tree = process_tree(worker.process.pid)
        assert len(tree) >= 1 and job.job_dir.exists()
        job.cancel()
        status = job.wait(60)
        assert status.state == "cancelled" and job.killed_worker and not job.job_dir.exists()
        assert not [pid for pid in tree if process_tree(pid)] and not worker.running()
        assert "the analysis worker was stopped" in status.log[-1]
        job = logic.start(volume, None, model_dir=str(tiny_model), device="cpu", worker=worker)
        status = job.wait(240)
        assert status.state == "done", status.error
        assert any("had ended" in line for line in status.log) and job.finished_info["worker_jobs"] == 1
    finally:
        worker.stop()
