"""The panel's "Similar cases" (issue 30, item 4): an analysis keeps its anatomy embeddings
(``AnalysisResult.embeddings``, exact in JSON, bit for bit what ``fvlm embed`` stores), the warm
worker searches an embedding store made by the real ``fvlm embed`` with them, the panel lists
the top matches per anatomy with their scores, one click loads a match whose volume is on this
computer and says why one is not, and a store of another model is refused with the library's
message. Run on the module's widget as in ``test_slicer_widget.py`` (its fixtures: the
PythonQt-like layer, real MRML, the worker started through a ``PythonSlicer`` launcher).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_slicer_widget as panel_tests
from test_slicer_widget import _choose, _idle, _run_until, pythonqt

from fvlm_core.io import write_image

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
# the panel tests' fixtures: the module in a Slicer-like application, a random fvlm-tiny, the widget
env, tiny_model, widget = panel_tests.env, panel_tests.tiny_model, panel_tests.widget
N_SCANS = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 phantoms as NIfTI in HU with their anatomy masks (a cohort folder as `fvlm embed` reads it)."""
    from fvlm_core.data.synth import make_phantom

    root = tmp_path_factory.mktemp("similar_cohort")
    data, masks = root / "data", root / "masks"
    rows = ["scan,Pleural effusion"]
    for i in range(N_SCANS):
        s = make_phantom(11, i, "valid", (32, 40, 40), prevalence={"Pleural effusion": 0.5})
        write_image(s.hu.astype(np.int16), s.geometry, data / f"p{i:03d}.nii.gz")
        write_image((s.labels * (s.labels <= 4)).astype(np.uint8), s.geometry, masks / f"p{i:03d}.nii.gz")
        rows.append(f"p{i:03d},{int('Pleural effusion' in s.findings)}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data, masks


def _embed(cohort, model, out, *extra) -> None:
    from fvlm_training.cli import main

    data, masks = cohort
    argv = ["embed", str(data), "--masks", str(masks), "--model", str(model), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--workers", "0", *extra]) == 0


def _analyse_scan(widget, env, cohort, model, name: str):
    """Load a cohort scan and its mask through Slicer's readers, analyse it in the panel."""
    import render_result

    data, masks = cohort
    volume, seg = render_result.load_inputs(env.scene, data / f"{name}.nii.gz", masks / f"{name}.nii.gz")
    _choose(widget, volume, seg, model)
    widget.ui.analyzeButton.click()
    _run_until(lambda: _idle(widget), 300)
    assert widget._results is not None, widget.ui.statusLabel.text
    return widget._results


def _similar_table(w) -> list[list[str]]:
    t = w.ui.similarTable
    return [[t.item(r, c).text() for c in range(t.columnCount)] for r in range(t.rowCount)]


def _find_similar(widget, store) -> None:
    widget.ui.storePathLineEdit.currentPath = str(store)
    assert widget.ui.findSimilarButton.enabled, widget.ui.findSimilarButton.toolTip
    widget.ui.findSimilarButton.click()
    _run_until(lambda: _idle(widget), 120)


def test_an_analysis_keeps_its_anatomy_embeddings_exactly_as_a_store_holds_them(cohort, tiny_model):
    """The pipeline's kept embeddings: bit for bit ``embed_ct``'s (what `fvlm embed` stores), the
    model's store identity, exact through JSON and through the result folder."""
    from fvlm_core.anatomy import get_catalog
    from fvlm_core.io import read_ct
    from fvlm_core.segmentation import get_backend
    from fvlm_core.store.encode import embed_ct
    from fvlm_core.store.format import ModelIdentity
    from fvlm_core.zeroshot.pipeline import AnalysisRequest, AnalyzerCache, run
    from fvlm_core.zeroshot.results import AnalysisResult

    data, masks = cohort
    request = AnalysisRequest(
        ct=str(data / "p000.nii.gz"),
        model=str(tiny_model),
        segmentation="labelmap",
        labelmap=str(masks / "p000.nii.gz"),
        class_map="anatomy",
        device="cpu",
        keep_embeddings=True,
    )
    cache = AnalyzerCache()
    result = run(request, analyzers=cache)
    assert run(AnalysisRequest(**{**request.to_dict(), "keep_embeddings": False})).embeddings is None
    kept = result.embeddings
    analyzer = cache.get(str(tiny_model), "cpu")
    ct = read_ct(request.ct)
    seg = get_backend("labelmap", path=request.labelmap, class_map="anatomy").segment(
        ct, get_catalog(analyzer.anatomies)
    )
    stored = embed_ct(analyzer, ct, seg).vectors
    assert sorted(kept.vectors) == sorted(stored) == sorted(a.name for a in result.anatomies if a.scored)
    for name, vector in stored.items():
        assert kept.vectors[name].dtype == np.float32 and np.array_equal(kept.vectors[name], vector)
    assert kept.model == ModelIdentity.of_folder(tiny_model).to_dict()
    assert (kept.windows, kept.max_window_zyx) == ("shared", None)
    for back in (
        AnalysisResult.from_json(result.to_json()),
        AnalysisResult.load(result.save(data.parent / "r")),
    ):
        assert back.embeddings.model == kept.model and back.embeddings.windows == "shared"
        assert all(np.array_equal(back.embeddings.vectors[n], v) for n, v in kept.vectors.items())
    assert "embeddings" not in json.loads(
        run(AnalysisRequest(**{**request.to_dict(), "keep_embeddings": False})).to_json()
    )


@pytest.mark.slow
def test_similar_cases_from_the_panel(widget, env, tiny_model, cohort, tmp_path):
    """Top matches per anatomy with scores (the scan itself first), load on click, an unreachable
    volume said so, another model's store refused, the search in the worker (GUI steps short)."""
    import shutil

    from fvlm_core.model import FVLM

    data, masks = cohort
    copy = tmp_path / "cohort"  # p003's volume is moved away after embedding: not reachable any more
    shutil.copytree(data, copy)
    store = tmp_path / "cohort.store"
    _embed((copy, masks), tiny_model, store)
    (copy / "p003.nii.gz").unlink()
    ui = widget.ui
    _analyse_scan(widget, env, cohort, tiny_model, "p000")
    # the store the user chose: the panel's matches
    ui.storePathLineEdit.currentPath = str(store)
    ui.findSimilarButton.click()
    job = widget._taskJob
    _run_until(lambda: _idle(widget), 120)
    assert ui.statusLabel.text.startswith("Similar cases: 16 matches"), ui.statusLabel.text
    assert job.status.longest_step_s < 0.2, "the search ran on the GUI thread"
    rows = _similar_table(widget)
    assert [" ".join(ui.similarTable.horizontalHeaderItem(c).text().split()) for c in range(5)] == [
        "Anatomy", "Rank", "Scan", "Similarity", "Volume",
    ]  # fmt: skip
    assert len(rows) == 4 * N_SCANS and [r[0] for r in rows[::N_SCANS]] == [
        "lung",
        "heart",
        "esophagus",
        "aorta",
    ]
    for anatomy in ("lung", "heart", "esophagus", "aorta"):
        mine = [r for r in rows if r[0] == anatomy]
        assert [int(r[1]) for r in mine] == [1, 2, 3, 4] and mine[0][2] == "p000"  # the scan itself first
        assert float(mine[0][3]) == pytest.approx(1.0, abs=1e-3)
        scores = [float(r[3]) for r in mine]
        assert scores == sorted(scores, reverse=True)
    assert "4 scans of model" in ui.similarNoteLabel.text
    # the scores are the store's own search's (the library call, run here on the same vectors)
    from fvlm_core.store import EmbeddingStore, search_like

    expected = search_like(EmbeddingStore.open(store), widget._results.result.embeddings.vectors, "heart", 4)
    assert [(r[2], r[3]) for r in rows if r[0] == "heart"] == [(m.scan, f"{m.score:.3f}") for m in expected]
    # p003's volume is not reachable: greyed, no Load button, the reason in its tooltip
    gone = next(i for i, r in enumerate(rows) if r[2] == "p003")
    assert rows[gone][4] == "not reachable" and ui.similarTable.cellWidget(gone, 4) is None
    assert ui.similarTable.item(gone, 2).foreground().color().name() == "#757575"
    tip = ui.similarTable.item(gone, 2).toolTip()
    assert tip.startswith(f"p003: {copy / 'p003.nii.gz'}. Its lung is ") and tip.endswith(
        "not on this computer."
    )
    ui.similarTable.selectRow(gone)
    pythonqt.unwrap(ui.similarTable).itemDoubleClicked.emit(pythonqt.unwrap(ui.similarTable.item(gone, 2)))
    assert ui.statusLabel.text.startswith("Cannot load p003: the volume of p003 is not reachable")
    assert str(copy / "p003.nii.gz") in ui.statusLabel.text and env.scene.GetFirstNodeByName("p003") is None
    # a reachable one loads with one click, through Slicer's volume reader, named after the scan
    row = next(i for i, r in enumerate(rows) if r[2] == "p001")
    assert all(ui.similarTable.cellWidget(i, 4) is not None for i, r in enumerate(rows) if r[2] != "p003")
    ui.similarTable.cellWidget(row, 4).click()
    loaded = env.scene.GetFirstNodeByName("p001")
    assert loaded is not None and ui.statusLabel.text.startswith("Loaded p001 as 'p001'")
    from fvlm_core.io import read_ct

    assert np.array_equal(slicer.util.arrayFromVolume(loaded), read_ct(copy / "p001.nii.gz").array)
    # a store of another model: refused with the library's message, nothing listed
    import torch

    torch.manual_seed(1)
    other = tmp_path / "other-model"
    FVLM.from_config("fvlm-tiny").save_pretrained(other)
    other_store = tmp_path / "other.store"
    _embed(cohort, other, other_store, "--limit", "1")
    _find_similar(widget, other_store)
    assert ui.statusLabel.text.startswith("Similar cases failed:")
    assert _similar_table(widget) == [] and "cannot compare this analysis with it" in ui.similarNoteLabel.text
    assert f"made from {other.resolve()}" in ui.similarNoteLabel.text and "not of" in ui.similarNoteLabel.text


def test_find_similar_says_why_it_cannot_run(widget, env, tiny_model, cohort):
    """Disabled with the reason: no analysis yet, no store chosen, an analysis without embeddings."""
    from FVLMSlicerLib.results import ResultNodes

    from fvlm_core.zeroshot.results import AnalysisResult, AnatomyResult

    ui = widget.ui
    assert not ui.findSimilarButton.enabled and ui.findSimilarButton.toolTip.startswith("Analyse a CT first")
    old = AnalysisResult([AnatomyResult("lung", "present", 500.0, 100, True, 0)])  # no embeddings kept
    widget._results = ResultNodes(None, None, {}, old)
    ui.storePathLineEdit.currentPath = str(cohort[0])
    widget._updateButtons()
    assert not ui.findSimilarButton.enabled and "kept no anatomy embeddings" in ui.findSimilarButton.toolTip
    from fvlm_core.zeroshot.results import AnatomyEmbeddings

    old.embeddings = AnatomyEmbeddings({"lung": np.ones(128, np.float32)})
    ui.storePathLineEdit.currentPath = ""
    widget._updateButtons()
    assert not ui.findSimilarButton.enabled and ui.findSimilarButton.toolTip.startswith(
        "Choose an embedding store"
    )
    ui.storePathLineEdit.currentPath = str(cohort[0])
    assert ui.findSimilarButton.enabled
    widget._results = None
