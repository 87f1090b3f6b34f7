"""The one "analyse one CT" pipeline: request and result types (exact JSON, files), the one backend
choice, ``run()`` with stages and cancel (``fvlm_core.zeroshot.pipeline`` / ``results``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from fvlm_core.errors import CancelledError, ConfigError
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, write_image
from fvlm_core.zeroshot.pipeline import STAGES, AnalysisRequest, AnalyzerCache, run
from fvlm_core.zeroshot.results import AnalysisResult, AnatomyMap


def _phantom(size=(48, 48, 48), findings=("Pleural effusion",)):
    from fvlm_core.data.synth import make_phantom

    s = make_phantom(7, 0, "valid", size, findings=list(findings))
    return CTVolume(s.hu.astype(np.float32), s.geometry, source=s.name), s.labels


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random model, the phantom CT and its anatomy label map as files."""
    from fvlm_core.model import FVLM

    tmp = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    FVLM.from_config("fvlm-tiny").save_pretrained(tmp / "model")
    ct, labels = _phantom()
    write_image(ct.array.astype(np.int16), ct.geometry, tmp / "ct.nii.gz")
    write_image((labels * (labels <= 4)).astype(np.uint8), ct.geometry, tmp / "seg.nii.gz")
    return tmp


def _request(files, **changes) -> AnalysisRequest:
    options = dict(
        ct=str(files / "ct.nii.gz"),
        model=str(files / "model"),
        segmentation="labelmap",
        labelmap=str(files / "seg.nii.gz"),
        class_map="anatomy",
        device="cpu",
        similarity_maps="all",
        keep_labelmap=True,
    )
    return AnalysisRequest(**{**options, **changes})


def test_request_json_and_file_round_trip_exactly(tmp_path):
    request = AnalysisRequest(
        ct="ct.nrrd",
        model="m",
        segmentation="segments",
        segments=[{"file": "layer_0.nrrd", "value": 3, "anatomy": "heart"}],
        findings=[{"name": "X", "anatomy": "lung", "positive": ["X."], "negative": ["No x."]}],
        similarity_maps="all",
        max_window=[64, 128, 128],
    )
    assert AnalysisRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert AnalysisRequest.load(request.save(tmp_path / "request.json")) == request
    with pytest.raises(ConfigError, match="unknown field"):
        AnalysisRequest.from_dict({**request.to_dict(), "colour": "red"})
    for bad in ({"segmentation": "magic"}, {"windows": "tiled"}, {"similarity_maps": "some"}):
        with pytest.raises(ConfigError):
            AnalysisRequest("ct", "m", **bad).check()


def test_anatomy_map_crop_is_lossless():
    full = np.zeros((6, 7, 8), np.float32)
    full[1:4, 2:5, 3:7] = np.random.default_rng(0).uniform(0.1, 1, (3, 3, 4))
    amap = AnatomyMap.from_full(full)
    assert (amap.start, amap.size, amap.shape) == ((1, 2, 3), (3, 3, 4), (6, 7, 8))
    np.testing.assert_array_equal(amap.full(), full)
    box = (slice(0, 2), slice(3, 7), slice(0, 8))  # partly outside the map's box
    np.testing.assert_array_equal(amap.crop(box), full[box])


def test_run_result_round_trips_through_json_and_files(files, tmp_path):
    """The result of ``run`` read back from its JSON (all but arrays) and from its folder (all)."""
    seen = []
    result = run(_request(files), progress=lambda m, f: seen.append((m, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [s for s in STAGES if any(m.startswith(s) for m, _ in seen)] == list(STAGES)
    assert set(result.timings) >= {"read", "load_model", "segment", "preprocess", "embed", "score"}
    assert result.segmentation["source"] == str(files / "seg.nii.gz") and result.ct == str(
        files / "ct.nii.gz"
    )
    assert result.labelmap.shape == result.geometry.shape_zyx and result.similarity_maps
    lung = result.anatomy("lung")
    assert lung.box_zyx is not None and (result.labelmap[lung.box] == 1).any()

    text = json.dumps(result.to_dict())
    back = AnalysisResult.from_dict(json.loads(text))
    assert json.dumps(back.to_dict()) == text  # exact: nothing rounded, nothing lost
    assert back.anatomies == result.anatomies and back.windows == result.windows
    assert back.geometry.same_grid(result.geometry)

    loaded = AnalysisResult.load(result.save(tmp_path / "out"))
    assert json.dumps(loaded.to_dict()) == text
    np.testing.assert_array_equal(loaded.labelmap, result.labelmap)
    for key, amap in result.similarity_maps.items():
        np.testing.assert_array_equal(loaded.similarity_maps[key].values, amap.values)
    with pytest.raises(FileExistsError):
        result.save(tmp_path / "out")  # a result never replaces another


def test_the_model_is_reused_and_cancel_stops_at_a_stage(files):
    cache = AnalyzerCache()
    run(_request(files, similarity_maps=False), analyzers=cache)
    assert not cache.reused
    run(_request(files, similarity_maps=False), analyzers=cache)
    assert cache.reused
    calls = []

    def cancel_after(n: int):
        return lambda: calls.append(1) or len(calls) > n

    with pytest.raises(CancelledError):
        run(_request(files), should_cancel=cancel_after(3), analyzers=cache)


def test_bad_findings_are_refused_before_the_ct_is_segmented(files, monkeypatch):
    import fvlm_core.segmentation.choice as choice

    monkeypatch.setattr(choice, "segment", lambda *a, **k: pytest.fail("segmented"))
    bad = [{"name": "Fracture", "anatomy": "femur", "positive": ["Fracture."], "negative": ["No fracture."]}]
    with pytest.raises(ConfigError, match="femur"):
        run(_request(files, extra_findings=bad))


def test_one_backend_choice_warns_and_passes_the_same_options_everywhere(files, monkeypatch, tmp_path):
    """``fvlm segment``, ``fvlm analyze`` (``run``) and ``make_segmenter`` build their backend in
    ``choose_backend``: TotalSegmentator gets the device and ``roi_subset`` from each, and the
    coarse-voxel warning is given by all of them (only ``segment`` gave it before)."""
    from fvlm_core.commands import segment as segment_command
    from fvlm_core.data.ctrate import make_segmenter
    from fvlm_core.errors import recorded_warnings
    from fvlm_core.segmentation import choice

    seen = []

    class Stop(Exception):
        pass

    def get_backend(name, **options):
        seen.append((name, {k: v for k, v in options.items() if k != "should_cancel"}))
        raise Stop

    monkeypatch.setattr(choice, "get_backend", get_backend)
    with pytest.raises(Stop):
        run(_request(files, segmentation="totalsegmentator", labelmap=None, fast=True))
    with pytest.raises(Stop):
        make_segmenter("totalsegmentator", fast=True, device="cpu")
    parser = argparse.ArgumentParser()
    segment_command.add_arguments(parser)
    ct_file, out = str(files / "ct.nii.gz"), str(tmp_path / "a.nii.gz")
    args = parser.parse_args(
        [ct_file, "--backend", "totalsegmentator", "--fast", "--device", "cpu", "--out", out]
    )
    with pytest.raises(Stop):
        segment_command.run(args)
    expected = {"fast": True, "device": "cpu", "allow_download": False, "roi_subset": True}
    assert seen == [("totalsegmentator", expected)] * 3
    monkeypatch.undo()

    coarse = CTVolume(*_coarse(files))
    from fvlm_core.anatomy import CTRATE_CATALOG
    from fvlm_core.segmentation.choice import choose_backend, segment

    with recorded_warnings() as warned:
        segment(coarse, CTRATE_CATALOG, choose_backend("builtin"))
    assert any("coarser" in w for w in warned)


def _coarse(files):
    from fvlm_core.io import read_ct

    ct = read_ct(files / "ct.nii.gz")
    g = ct.geometry
    return ct.array, Geometry(g.size, (g.spacing[0], g.spacing[1], 20.0), g.origin, g.direction), "coarse"
