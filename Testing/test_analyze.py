"""`Analyzer.analyze` / `fvlm analyze` on synthetic phantoms with the tiny model.

The tiny model has random weights: these tests check the pipeline (schema, statuses, prompt
caching, windows, geometry of the similarity maps), not diagnostic accuracy. The localisation
test controls the tokens (see ``_IntensityTokens``) so the expected peak is known.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm_core.anatomy import EXTENDED_CATALOG
from fvlm_core.errors import ConfigError, InputError
from fvlm_core.findings import Finding, FindingSet
from fvlm_core.geometry import Geometry
from fvlm_core.io import CTVolume, read_image, write_image
from fvlm_core.zeroshot.analyzer import Analyzer, load_findings_file

SIZE = (48, 48, 48)


def _segmentation(labels: np.ndarray, geometry: Geometry, catalog=EXTENDED_CATALOG):
    from fvlm_core.segmentation import AnatomySegmentation

    return AnatomySegmentation.from_labelmap(labels, geometry, catalog, "test")


def _phantom(findings=(), index=0, size=SIZE):
    from fvlm_core.data.synth import make_phantom

    s = make_phantom(7, index, "valid", size, findings=list(findings))
    return CTVolume(s.hu.astype(np.float32), s.geometry, source=s.name), s.labels


@pytest.fixture(scope="module")
def analyzer():
    from fvlm_core.model import FVLM

    torch.manual_seed(0)
    return Analyzer(FVLM.from_config("fvlm-tiny"), device="cpu", name="tiny-random")


def test_output_schema_and_default_threshold(analyzer):
    ct, labels = _phantom()
    result = analyzer.analyze(ct, _segmentation(labels, ct.geometry), similarity_maps=False)
    d = json.loads(json.dumps(result.to_dict()))  # JSON-serialisable
    assert [a["name"] for a in d["anatomies"]] == ["lung", "heart", "esophagus", "aorta"]
    per_anatomy = {a["name"]: [f["name"] for f in a["findings"]] for a in d["anatomies"]}
    assert len(per_anatomy["lung"]) == 11 and per_anatomy["aorta"] == ["Arterial wall calcification"]
    assert sum(len(v) for v in per_anatomy.values()) == 16
    vox_ml = ct.geometry.voxel_volume_ml
    seg_facts = _segmentation(labels, ct.geometry).facts
    for a in d["anatomies"]:
        expected = "partial" if seg_facts[a["name"]].cut_by_fov else "present"
        assert a["status"] == expected and a["scored"]
        value = EXTENDED_CATALOG.label(a["name"])
        assert a["volume_ml"] == pytest.approx(np.count_nonzero(labels == value) * vox_ml, rel=1e-3)
        for f in a["findings"]:
            # a model without calibration: the raw score, called an uncalibrated score
            assert 0.0 < f["raw_score"] < 1.0 and f["value"] == f["raw_score"] and f["probability"] is None
            assert (f["scale"], f["calibration"]) == ("uncalibrated score", "none")
            assert f["threshold"] == f["raw_threshold"] == 0.5 and f["threshold_source"] == "default"
            assert f["flagged"] == (f["raw_score"] > 0.5)
    assert any("0.5 used" in n for n in d["notes"])
    assert any(n.startswith("Uncalibrated scores, not probabilities, for 16 finding(s)") for n in d["notes"])
    assert len(d["windows"]) == 1  # all 4 anatomies fit in one window: one encoder forward
    assert set(d["timings_s"]) >= {"preprocess", "embed", "score"}


def test_calibrated_thresholds_are_used(analyzer, monkeypatch):
    ct, labels = _phantom()
    monkeypatch.setitem(analyzer.config.thresholds, "Emphysema", 0.0)
    result = analyzer.analyze(ct, _segmentation(labels, ct.geometry), similarity_maps=False)
    f = result.finding("lung", "Emphysema")
    assert (f.threshold, f.threshold_source, f.flagged) == (0.0, "calibrated", True)
    assert result.finding("lung", "Atelectasis").threshold_source == "default"


def _with_calibration(analyzer, monkeypatch, name: str, entry: dict, threshold: float) -> None:
    monkeypatch.setitem(analyzer.config.thresholds, name, threshold)
    monkeypatch.setitem(analyzer.config.calibration, name, entry)


def test_calibrated_probability_threshold_on_the_same_scale_and_the_same_decisions(analyzer, monkeypatch):
    from fvlm_core.calibration import Calibration

    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)
    raw = analyzer.analyze(ct, seg, similarity_maps=False).finding("lung", "Emphysema").raw_score
    platt = Calibration("platt", "test", a=0.5, b=-1.0)
    for t in (raw - 1e-4, raw + 1e-4):  # just below and just above the raw score
        _with_calibration(analyzer, monkeypatch, "Emphysema", platt.to_dict(), t)
        result = analyzer.analyze(ct, seg, similarity_maps=False)
        f = result.finding("lung", "Emphysema")
        assert (f.scale, f.calibration, f.raw_score, f.raw_threshold) == ("probability", "platt", raw, t)
        assert f.probability == pytest.approx(1 / (1 + math.exp(-(0.5 * math.log(raw / (1 - raw)) - 1.0))))
        assert f.threshold == pytest.approx(platt.probability(t)) and f.value == f.probability
        assert f.flagged == (raw > t) == (f.probability > f.threshold)
        d = f.to_dict()
        assert (d["scale"], d["value"], d["raw_score"]) == ("probability", f.probability, raw)  # not rounded
        other = result.finding("lung", "Atelectasis")  # no calibration: its raw score, not a probability
        assert (other.scale, other.probability, other.value) == ("uncalibrated score", None, other.raw_score)
    # a finding of that name worded otherwise keeps its raw score (the calibration is the wording's)
    reworded = Finding.from_name("Emphysema", "lung", ["Emphysematous lung."], ["Normal lung."])
    f = analyzer.analyze(ct, seg, FindingSet([reworded]), similarity_maps=False).finding("lung", "Emphysema")
    assert (f.scale, f.threshold_source, f.probability) == ("uncalibrated score", "default", None)


def test_a_finding_calibration_kept_raw_says_why(analyzer, monkeypatch):
    kept = {"method": "none", "reason": "raw score kept: the calibration set has only 3 positives"}
    _with_calibration(analyzer, monkeypatch, "Emphysema", kept, 0.3)
    ct, labels = _phantom()
    result = analyzer.analyze(ct, _segmentation(labels, ct.geometry), similarity_maps=False)
    f = result.finding("lung", "Emphysema")
    assert (f.scale, f.threshold, f.calibration_note) == ("uncalibrated score", 0.3, kept["reason"])
    assert f"Emphysema: {kept['reason']}" in result.notes


def test_absent_and_partial_anatomies(analyzer):
    ct, labels = _phantom()
    labels = labels.copy()
    labels[labels == EXTENDED_CATALOG.label("esophagus")] = 0
    # cut the volume below the lung apex: the lung touches the top face of the field of view
    lung_z = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    top = int(lung_z[len(lung_z) // 2])
    g = ct.geometry
    cut_geom = Geometry((g.size[0], g.size[1], top), g.spacing, g.origin, g.direction)
    ct_cut = CTVolume(ct.array[:top].copy(), cut_geom, "cut")
    result = analyzer.analyze(ct_cut, _segmentation(labels[:top], cut_geom), similarity_maps=False)
    eso = result.anatomy("esophagus")
    assert eso.status == "absent" and not eso.scored and eso.volume_ml == 0
    assert [f.raw_score for f in eso.findings] == [None] and not eso.findings[0].flagged
    lung = result.anatomy("lung")
    assert lung.status == "partial" and lung.scored and "field of view" in lung.note
    assert all(0 < f.raw_score < 1 for f in lung.findings)


def test_no_model_anatomy_is_an_error_not_zeros(analyzer):
    ct, labels = _phantom()
    empty = np.zeros_like(labels)
    with pytest.raises(InputError, match="none of this model's anatomies"):
        analyzer.analyze(ct, _segmentation(empty, ct.geometry))
    result = analyzer.analyze(ct, _segmentation(empty, ct.geometry), require_anatomy=False)
    assert all(a.status == "absent" and not a.scored for a in result.anatomies)
    assert all(f.raw_score is None for a in result.anatomies for f in a.findings)


def test_prompt_on_unknown_anatomy(analyzer, tmp_path):
    ct, labels = _phantom()
    bad = FindingSet([Finding.from_name("Splenomegaly", "spleen")])
    with pytest.raises(ConfigError, match="spleen"):
        analyzer.analyze(ct, _segmentation(labels, ct.geometry), bad)
    path = tmp_path / "p.yaml"
    path.write_text("- {name: Splenomegaly, anatomy: spleen}\n")
    with pytest.raises(ConfigError, match="spleen"):
        analyzer.check_findings(load_findings_file(path))


def test_second_analysis_does_no_text_encoder_work(analyzer):
    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)
    calls = []
    hook = analyzer.model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        user = Finding.from_name(
            "Big heart", "heart", positive=["Enlarged heart.", "Cardiomegaly."], source="user"
        )
        fs = FindingSet([*analyzer.default_findings(), user])
        analyzer.analyze(ct, seg, fs, similarity_maps=False)
        n_first = len(calls)
        analyzer.analyze(ct, seg, fs, similarity_maps=False)
        assert len(calls) == n_first  # every prompt came from the cache
        assert analyzer.prompts.encoder_calls >= 1
    finally:
        hook.remove()


def test_user_finding_scored_with_its_wordings(analyzer):
    ct, labels = _phantom()
    user = Finding.from_name(
        "Big heart", "heart", positive=["Enlarged heart."], negative=["Normal heart size."]
    )
    result = analyzer.analyze(
        ct, _segmentation(labels, ct.geometry), FindingSet([user]), similarity_maps=False
    )
    f = result.finding("heart", "Big heart")
    emb = analyzer.finding_embeddings([user])
    assert f.source == "user" and f.positive == ("Enlarged heart.",)
    assert [a.name for a in result.anatomies if a.findings] == ["heart"]
    assert 0 < f.raw_score < 1 and emb.positive.shape[0] == 1


def test_reference_windows_one_per_anatomy(analyzer):
    ct, labels = _phantom()
    result = analyzer.analyze(
        ct, _segmentation(labels, ct.geometry), similarity_maps=False, strategy="reference"
    )
    assert [w.anatomies for w in result.windows] == [("lung",), ("heart",), ("esophagus",), ("aorta",)]


def test_precision_switches_bf16_autocast_and_the_reference_windows_stay_fp32(analyzer):
    """``precision``: ``auto`` is fp32 on the CPU; ``bf16`` autocasts the image encoder (scores
    close to fp32's, not equal: the switch is real); the reference windows ignore it (eval.py
    runs in fp32); an unknown precision is refused."""
    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)

    def raw(precision: str, strategy: str) -> np.ndarray:
        result = Analyzer(analyzer.model, "cpu", precision=precision).analyze(
            ct, seg, similarity_maps=False, strategy=strategy
        )
        return np.array([f.raw_score for a in result.anatomies for f in a.findings])

    fp32 = raw("fp32", "shared")
    assert np.array_equal(raw("auto", "shared"), fp32)
    bf16 = raw("bf16", "shared")
    assert 0 < np.abs(bf16 - fp32).max() < 0.02
    assert np.array_equal(raw("bf16", "reference"), raw("fp32", "reference"))
    assert (
        Analyzer(analyzer.model, "cpu").bf16 is False
        and Analyzer(analyzer.model, "cpu", precision="bf16").bf16
    )
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        Analyzer(analyzer.model, "cpu", precision="fp16")


def test_device_errors(analyzer):
    """The analyzer takes the library's device rule (fvlm_core.devices): names are trimmed and
    case-blind, ``gpu`` means CUDA, and an absent or unknown device is refused by name."""
    assert Analyzer(analyzer.model, device=" CPU ").device == torch.device("cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "gpu"):
            with pytest.raises(ConfigError, match="no CUDA GPU"):
                Analyzer(analyzer.model, device=name)
    with pytest.raises(ConfigError, match="'tpu'"):
        Analyzer(analyzer.model, device="tpu")


def test_model_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        Analyzer.from_pretrained(tmp_path)


# ---------------------------------------------------------------- localisation


class _IntensityTokens(torch.nn.Module):
    """Controlled token encoder: token = normalize(f * d + (1 - f) * e), f = mean input in its patch.

    With identity value / output / anatomy projections, a token's score against the prompt
    difference ``d`` then grows with the patch's mean intensity, so where a rendered finding
    raises intensity the map must rise exactly there.
    """

    def __init__(self, d: torch.Tensor, e: torch.Tensor, patch, n_levels: int) -> None:
        super().__init__()
        self.d, self.e, self.patch, self.n_levels = d, e, tuple(patch), n_levels

    def forward(self, image):
        from fvlm_core.model import TokenGrid

        f = F.avg_pool3d(image.float(), self.patch, self.patch)
        grid = tuple(f.shape[2:])
        f = f.flatten(2).transpose(1, 2)  # (B, L, 1)
        tok = f * self.d + (1 - f) * self.e
        return TokenGrid(levels=[tok] * self.n_levels, grid=grid, patch_size=self.patch)


def _controlled_analyzer(finding: Finding) -> Analyzer:
    from fvlm_core.model import FVLM

    torch.manual_seed(1)
    model = FVLM.from_config("fvlm-tiny")
    an = Analyzer(model, device="cpu", name="controlled")
    emb = an.finding_embeddings([finding])
    d = F.normalize(emb.positive[0] - emb.negative[0], dim=0)
    e = torch.randn_like(d)
    e = F.normalize(e - (e @ d) * d, dim=0)
    c = model.config.vision.hidden_size
    assert c == model.config.embed_dim
    with torch.no_grad():
        eye = torch.eye(c)
        model.attention.in_proj_weight[2 * c :] = eye
        model.attention.in_proj_bias.zero_()
        model.attention.out_proj.weight.copy_(eye)
        model.attention.out_proj.bias.zero_()
        for p in model.vision_projs:
            p.weight.copy_(eye)
            p.bias.zero_()
    model.visual_encoder = _IntensityTokens(
        d, e, model.config.vision.patch_size, model.config.vision.num_levels
    )
    return an


def _to_ras_storage(ct: CTVolume, labels: np.ndarray) -> tuple[CTVolume, np.ndarray]:
    """The same scan stored with x and y flipped (RAS-like direction): a viewer shows the same image."""
    g = ct.geometry
    corner = g.index_zyx_to_ras((0, g.size[1] - 1, g.size[0] - 1))  # new voxel (0, 0, 0)
    lps = corner * np.array([-1.0, -1.0, 1.0])
    geom = Geometry(g.size, g.spacing, tuple(float(v) for v in lps), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return CTVolume(ct.array[:, ::-1, ::-1].copy(), geom, ct.source), labels[:, ::-1, ::-1].copy()


@pytest.mark.parametrize("ras", [False, True])
def test_similarity_map_on_ct_grid_peaks_at_rendered_finding(ras, tmp_path):
    finding = Finding.from_name("Pleural effusion", "lung", source="ctrate")
    an = _controlled_analyzer(finding)
    with_f, labels = _phantom(["Pleural effusion"], index=3)
    without, labels0 = _phantom([], index=3)
    region = np.abs(with_f.array - without.array) > 150  # the rendered effusion
    assert region.sum() > 50
    if ras:
        with_f, labels = _to_ras_storage(with_f, labels)
        without, labels0 = _to_ras_storage(without, labels0)
        region = region[:, ::-1, ::-1]
    maps = {}
    for key, ct, lab in (("with", with_f, labels), ("without", without, labels0)):
        res = an.analyze(ct, _segmentation(lab, ct.geometry), FindingSet([finding]), similarity_maps="all")
        m = res.similarity_maps[("lung", "Pleural effusion")].full()
        assert m.shape == ct.array.shape and m.dtype == np.float32
        maps[key] = m
        paths = res.write_maps(tmp_path / key)
        img = read_image(paths[("lung", "Pleural effusion")])
        assert Geometry.from_sitk(img).same_grid(ct.geometry)
    # zero far from the lung: every non-zero voxel is within one token (8 x 6 mm) of the lung mask
    lung = labels == 1
    assert np.all(maps["with"] >= 0) and maps["with"][lung].min() > 0
    diff = maps["with"] - maps["without"]
    peak = np.unravel_index(np.argmax(diff), diff.shape)
    sp = np.asarray(with_f.geometry.spacing_zyx)
    pts = np.argwhere(region)
    dist_mm = np.sqrt((((pts - np.asarray(peak)) * sp) ** 2).sum(1)).min()
    token_mm = 8 * 6.0
    assert dist_mm < token_mm * math.sqrt(3) / 2, f"peak {dist_mm:.0f} mm from the rendered effusion"
    assert diff[region].mean() > 5 * np.abs(diff[~region & lung]).mean()
    # mirrored position (left-right flip) of the peak is not where the map is high
    assert diff[peak] > 0 and diff[peak[0], peak[1], diff.shape[2] - 1 - peak[2]] < 0.5 * diff[peak]


# ---------------------------------------------------------------- command line


def test_cli_analyze_with_segmentation_prompts_and_maps(analyzer, tmp_path):
    from fvlm_training.cli import main

    model_dir = tmp_path / "model"
    analyzer.model.save_pretrained(model_dir)
    ct, labels = _phantom(["Pleural effusion"])
    write_image(ct.array.astype(np.int16), ct.geometry, tmp_path / "ct.nii.gz")
    write_image(labels[:, :, :].astype(np.uint8) * (labels <= 4), ct.geometry, tmp_path / "seg.nii.gz")
    (tmp_path / "prompts.json").write_text(
        json.dumps(
            [{"name": "Fluid", "anatomy": "lung", "positive": ["Pleural fluid."], "negative": ["No fluid."]}]
        )
    )
    out = tmp_path / "results.json"
    argv = [
        "analyze", str(tmp_path / "ct.nii.gz"), "--segmentation", str(tmp_path / "seg.nii.gz"),
        "--model", str(model_dir), "--prompts", str(tmp_path / "prompts.json"), "--device", "cpu",
        "--maps-dir", str(tmp_path / "maps"), "--all-maps", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(out.read_text())
    lung = next(a for a in d["anatomies"] if a["name"] == "lung")
    assert [f["name"] for f in lung["findings"]][-1] == "Fluid"
    assert len(d["similarity_maps"]) == 17 and all(m["file"] for m in d["similarity_maps"])
    img = read_image(d["similarity_maps"][0]["file"])
    assert Geometry.from_sitk(img).same_grid(ct.geometry)
    assert main([*argv[:-3], "--device", "cuda", "--out", str(out)]) == (
        0 if torch.cuda.is_available() else 2
    )


def test_cli_console_and_json_name_probabilities_and_uncalibrated_scores(analyzer, tmp_path, capsys):
    """What a user reads: a calibrated finding as a probability with its threshold in percent and
    its raw score; one without calibration as an "uncalibrated score", never a "probability"."""
    from fvlm_core.calibration import Calibration
    from fvlm_training.cli import main

    model_dir = tmp_path / "model"
    platt = Calibration("platt", "test", a=0.5, b=-1.0)
    analyzer.model.save_pretrained(
        model_dir, thresholds={"Emphysema": 0.02}, calibration={"Emphysema": platt.to_dict()}
    )
    ct, labels = _phantom()
    write_image(ct.array.astype(np.int16), ct.geometry, tmp_path / "ct.nii.gz")
    write_image(labels.astype(np.uint8) * (labels <= 4), ct.geometry, tmp_path / "seg.nii.gz")
    out = tmp_path / "results.json"
    argv = [
        "analyze", str(tmp_path / "ct.nii.gz"), "--segmentation", str(tmp_path / "seg.nii.gz"),
        "--model", str(model_dir), "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    d = json.loads(out.read_text())
    lung = {f["name"]: f for a in d["anatomies"] if a["name"] == "lung" for f in a["findings"]}
    emph = lung["Emphysema"]
    assert (emph["scale"], emph["calibration"], emph["raw_threshold"]) == ("probability", "platt", 0.02)
    assert emph["probability"] == pytest.approx(platt.probability(emph["raw_score"]), abs=1e-6)
    assert emph["threshold"] == pytest.approx(platt.probability(0.02))
    p, t = f"{100 * emph['probability']:.1f}", f"{100 * emph['threshold']:.1f}"
    sign, flag = (">", "FLAGGED") if emph["flagged"] else ("<=", "not flagged")
    line = next(x for x in lines if x.startswith("Emphysema (lung): "))
    assert line.startswith(f"Emphysema (lung): probability {p} % {sign} threshold {t} % (raw score ")
    assert line.endswith(f"; Platt calibration, calibrated threshold) {flag}")
    other = next(x for x in lines if x.startswith("Atelectasis (lung): "))
    raw = lung["Atelectasis"]["raw_score"]
    assert (
        other.startswith(f"Atelectasis (lung): uncalibrated score {raw:.4f} ") and "probability" not in other
    )
    assert lung["Atelectasis"]["probability"] is None and lung["Atelectasis"]["value"] == raw
    assert sum(" (lung): " in x for x in lines) == 11  # every finding is listed, flagged or not


def test_progress_and_cancel(analyzer):
    from fvlm_core.errors import CancelledError

    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)
    seen = []
    analyzer.analyze(ct, seg, similarity_maps=False, progress=lambda m, f: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        analyzer.analyze(ct, seg, similarity_maps=False, should_cancel=cancel_after_two)


@pytest.mark.slow
def test_real_chest_ct_with_reference_heart_mask(analyzer, ts_dir, tmp_path):
    """A real CT (LPS, 1.5 mm) with its TotalSegmentator heart mask: statuses and a map on its grid."""
    from fvlm_core.io import read_ct
    from fvlm_core.segmentation import get_backend

    ct = read_ct(ts_dir / "chest_ct.nii.gz")
    seg = get_backend("labelmap", path=ts_dir / "chest_heart.nii.gz", class_map={1: "heart"}).segment(
        ct, EXTENDED_CATALOG.subset(["lung", "heart", "esophagus", "aorta"])
    )
    res = analyzer.analyze(ct, seg, similarity_maps="all")
    status = {a.name: a.status for a in res.anatomies}
    assert status == {"lung": "absent", "heart": "present", "esophagus": "absent", "aorta": "absent"}
    heart = res.anatomy("heart")
    assert heart.volume_ml == pytest.approx(np.count_nonzero(seg.labelmap == 2) * ct.geometry.voxel_volume_ml)
    assert 300 < heart.volume_ml < 1500  # an adult heart
    m = res.similarity_maps[("heart", "Cardiomegaly")].full()
    assert m.shape == ct.array.shape
    # the map covers the heart and stays within about one token (8 x 6 mm) of it
    mask = seg.labelmap == 2
    assert m[mask].min() > 0
    from scipy import ndimage

    dist_mm = ndimage.distance_transform_edt(~mask, sampling=ct.geometry.spacing_zyx)
    reach = 48 * math.sqrt(3) + 6  # a token's diagonal plus one model-space voxel of interpolation
    assert np.count_nonzero(m[dist_mm > reach]) == 0 and np.count_nonzero(m[dist_mm > 30]) > 0


def test_window_cap_leaves_cut_anatomy_unscored(analyzer):
    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)
    result = analyzer.analyze(ct, seg, similarity_maps=False, max_window_zyx=(16, 16, 16))
    lung = result.anatomy("lung")
    assert lung.status in ("present", "partial") and not lung.scored and "90%" in lung.note
    assert all(f.raw_score is None and not f.flagged for f in lung.findings)
    assert any(n.startswith("lung: not scored") for n in result.notes)


def test_a_calibration_applies_only_to_the_wording_and_text_side_it_was_fitted_with(analyzer, tmp_path):
    """Bound to the finding's wording and the model's text identity (the prompt store's): a
    wording edited in config.yaml, another text.max_length, or a --prompts finding worded
    otherwise get the raw score and 0.5 (and a note why); the same wording, also through
    --prompts, gets the calibration. Before, the first two kept the old Platt map."""
    import yaml

    from fvlm_core.calibration import Calibration
    from fvlm_core.findings import Finding
    from fvlm_core.zeroshot.analyzer import Analyzer

    model_dir = tmp_path / "model"
    platt = Calibration("platt", "test", a=0.5, b=-1.0)
    analyzer.model.save_pretrained(
        model_dir,
        thresholds={"Emphysema": 0.02},
        calibration={"Emphysema": platt.to_dict()},
        store_prompts=False,
    )
    ct, labels = _phantom()
    seg = _segmentation(labels, ct.geometry)

    def emphysema(findings=None):
        an = Analyzer.from_pretrained(model_dir, device="cpu")
        res = an.analyze(ct, seg, findings, similarity_maps=False)
        return res.finding("lung", "Emphysema"), res.notes

    f, _ = emphysema()
    assert (f.calibration, f.threshold_source, f.raw_threshold) == ("platt", "calibrated", 0.02)
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    original = dict(config)
    # the same wording given through --prompts: the calibration applies
    same = Finding.from_name("Emphysema", "lung")
    assert emphysema([same])[0].calibration == "platt"
    # another wording through --prompts: it does not
    other = Finding.from_name("Emphysema", "lung", positive="Emphysema is present.")
    f, notes = emphysema([other])
    assert (f.calibration, f.threshold_source, f.raw_threshold, f.probability) == (
        "none",
        "default",
        0.5,
        None,
    )
    assert "fitted on another wording (lung: Emphysema. / Not Emphysema.)" in f.calibration_note
    assert any(n.startswith("Emphysema: the threshold and calibration were fitted on another") for n in notes)
    # the wording edited in config.yaml
    config["findings"] = [
        {**d, "positive": ["Emphysema is present."]} if d["name"] == "Emphysema" else d
        for d in config["findings"]
    ]
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    f, _ = emphysema()
    assert (f.calibration, f.threshold_source, f.scale) == ("none", "default", "uncalibrated score")
    # the text side changed: another max_length (what the encoder sees of a prompt)
    config = {**original, "text": {**original["text"], "max_length": 8}}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    f, _ = emphysema()
    assert (f.calibration, f.threshold_source) == ("none", "default")
    assert "another text encoder, tokenizer or text settings" in f.calibration_note
    (model_dir / "config.yaml").write_text(yaml.safe_dump(original))
    assert emphysema()[0].calibration == "platt"
    assert original["calibrated_with"]["Emphysema"]["positive"] == ["Emphysema."]  # what it records


def test_a_segmentation_of_another_scan_is_detected_by_its_intensities(
    analyzer, tmp_path, monkeypatch, capsys
):
    """The phantom's own segmentation passes; the same label map moved by half the volume (a
    segmentation that does not belong to this CT: its lung over soft tissue) gets a warning and
    a note, and is refused before any encoding with --strict-segmentation."""
    from fvlm_core.errors import FVLMWarning, InputError
    from fvlm_training.cli import main

    ct, labels = _phantom()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FVLMWarning)
        ok = analyzer.analyze(ct, _segmentation(labels, ct.geometry), similarity_maps=False)
    assert not any("does not look like it belongs" in n for n in ok.notes)
    moved = np.roll(labels, labels.shape[2] // 2, axis=2)  # lung, heart and aorta land on other tissue
    with pytest.warns(
        FVLMWarning, match=r"does not look like it belongs to this CT: \w+: \d+% of its voxels"
    ):
        res = analyzer.analyze(ct, _segmentation(moved, ct.geometry), similarity_maps=False)
    assert any("does not look like it belongs" in n and "(air)" in n for n in res.notes)
    encoded = []
    monkeypatch.setattr(analyzer, "encode_model_space", lambda *a, **k: encoded.append(1))
    with pytest.raises(InputError, match="Refused"):
        analyzer.analyze(
            ct, _segmentation(moved, ct.geometry), similarity_maps=False, segmentation_check="strict"
        )
    assert encoded == []
    monkeypatch.undo()
    # the command line: --strict-segmentation refuses, with the anatomy and its intensities named
    model_dir = tmp_path / "model"
    analyzer.model.save_pretrained(model_dir, store_prompts=False)
    write_image(ct.array.astype(np.int16), ct.geometry, tmp_path / "ct.nii.gz")
    write_image((moved * (moved <= 4)).astype(np.uint8), ct.geometry, tmp_path / "seg.nii.gz")
    argv = ["analyze", str(tmp_path / "ct.nii.gz"), "--segmentation", str(tmp_path / "seg.nii.gz")]
    argv += [
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r.json"),
        "--strict-segmentation",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "of its voxels are below -400 HU (air)" in err and "strict segmentation check" in err
    assert not (tmp_path / "r.json").exists()


def test_the_issue_case_another_scans_multilabel_on_a_112_slice_ct(ts_dir):
    """The reported case, on the real files: TotalSegmentator's segmentation of the 30-slice
    example CT put on the 112-slice one (its lung voxels average -78 HU, against -744 HU on the
    CT it belongs to)."""
    from fvlm_core.io import read_ct
    from fvlm_core.segmentation import get_backend
    from fvlm_core.segmentation.plausibility import check_intensities

    names = list(EXTENDED_CATALOG.names)
    for ct_file, expect in (("example_ct_sm.nii.gz", []), ("example_ct.nii.gz", ["lung", "bone"])):
        ct = read_ct(ts_dir / ct_file)
        seg = get_backend("labelmap", path=ts_dir / "example_seg.nii.gz").segment(ct, EXTENDED_CATALOG)
        found = check_intensities(ct.array, np.asarray(seg.labelmap), names)
        assert [f.anatomy for f in found] == expect, ct_file
    lung = found[0]
    assert lung.mean_hu == pytest.approx(-78, abs=1) and lung.fraction < 0.1
