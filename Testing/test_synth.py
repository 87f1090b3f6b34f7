"""Synthetic cohort: CT-RATE layout, determinism by seed, and findings visible on their anatomy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fvlm_core.data import synth
from fvlm_core.findings import CTRATE_LABEL_ANATOMY, CTRATE_LABELS

SIZE = (40, 40, 40)


def _tree_contents(root: Path) -> dict[str, bytes]:
    """Decoded contents of a cohort: CSV bytes and voxel bytes (gzip headers may hold timestamps)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith(".nii.gz"):
            out[str(p.relative_to(root))] = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes()
        elif p.suffix in (".csv", ".txt"):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_cohort_layout_and_determinism(tmp_path):
    a = synth.generate_cohort(tmp_path / "a", 6, seed=3, size_zyx=SIZE, workers=1, recon_fraction=0.5)
    b = synth.generate_cohort(tmp_path / "b", 6, seed=3, size_zyx=SIZE, workers=2, recon_fraction=0.5)
    synth.generate_cohort(tmp_path / "c", 6, seed=4, size_zyx=SIZE, workers=1, recon_fraction=0.5)
    assert a.n_volumes == b.n_volumes > 6  # some scans got a second reconstruction
    ta, tb, tc = (_tree_contents(tmp_path / k) for k in "abc")
    assert ta.keys() == tb.keys()
    assert all(ta[k] == tb[k] for k in ta), "same seed must give identical arrays and CSVs (any worker count)"
    assert any(ta.get(k) != v for k, v in tc.items()), "another seed must give another cohort"

    root = tmp_path / "a"
    for rel in (
        "metadata/train_metadata.csv",
        "metadata/validation_metadata.csv",
        "radiology_text_reports/train_reports.csv",
        "radiology_text_reports/validation_reports.csv",
        "multi_abnormality_labels/train_predicted_labels.csv",
        "multi_abnormality_labels/valid_predicted_labels.csv",
    ):
        assert (root / rel).is_file(), rel
    with open(root / "metadata/train_metadata.csv") as fh:
        meta = list(csv.DictReader(fh))
    assert list(meta[0]) == list(synth.METADATA_COLUMNS)
    name = meta[0]["VolumeName"]
    vol = root / "dataset" / "train" / synth.volume_relpath(name[: -len(".nii.gz")])
    mask = root / "anatomy_masks" / "train" / synth.volume_relpath(name[: -len(".nii.gz")])
    assert vol.is_file() and mask.is_file()
    stored = sitk.ReadImage(str(vol))
    assert stored.GetPixelID() == sitk.sitkInt16
    assert sitk.GetArrayViewFromImage(stored).min() >= 0  # stored = HU + 1024: air is not negative
    assert float(meta[0]["RescaleIntercept"]) == -1024
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5} and {1, 2, 3, 4} <= set(np.unique(labels))
    with open(root / "multi_abnormality_labels/train_predicted_labels.csv") as fh:
        lab = list(csv.DictReader(fh))
    assert list(lab[0]) == ["VolumeName", *CTRATE_LABELS]
    with open(root / "radiology_text_reports/train_reports.csv") as fh:
        rep = list(csv.DictReader(fh))
    assert [r["VolumeName"] for r in rep] == [r["VolumeName"] for r in meta] == [r["VolumeName"] for r in lab]
    assert all(r["Findings_EN"] and r["Impressions_EN"] for r in rep)


def test_in_memory_cohort_matches_files(tmp_path):
    samples = list(synth.iter_cohort(3, seed=9, size_zyx=SIZE))
    synth.generate_cohort(tmp_path, 3, seed=9, size_zyx=SIZE, recon_fraction=0.0)
    for s in samples:
        split = "train" if s.split == "train" else "valid"
        stored = sitk.GetArrayFromImage(
            sitk.ReadImage(str(tmp_path / "dataset" / split / synth.volume_relpath(s.name)))
        )
        np.testing.assert_array_equal(stored.astype(np.int32) + synth.RESCALE_INTERCEPT, s.hu)
        assert s.hu.dtype == np.int16 and s.labels.dtype == np.uint8 and s.hu.shape == SIZE
        assert s.geometry.shape_zyx == SIZE


def test_realistic_hu_per_tissue():
    s = synth.make_phantom(5, 0, size_zyx=(48, 48, 48), findings=())
    hu, lab = s.hu.astype(float), s.labels
    assert abs(np.median(hu[lab == synth.MASK_VALUES["lung"]]) + 850) < 60
    assert -30 < np.median(hu[lab == synth.MASK_VALUES["aorta"]]) < 300  # blood, plain or contrast
    assert hu[lab == synth.MASK_VALUES["trachea"]].min() < -700  # air in the lumen (partial volume at 6 mm)
    assert np.median(hu[0, :3, :3]) < -950  # air outside the body
    assert hu.max() > 400  # bone
    assert hu.min() >= -1024 and hu.max() <= 3071


ANATOMY_VALUE = {a: synth.MASK_VALUES[a] for a in ("lung", "heart", "esophagus", "aorta")}
SMALL = {"Lung nodule", "Arterial wall calcification", "Coronary artery wall calcification"}
DRAWN_ON_ANATOMY = [f for f in synth.RENDERED_FINDINGS if f in CTRATE_LABEL_ANATOMY]


@pytest.mark.parametrize("finding", DRAWN_ON_ANATOMY)
def test_finding_is_visible_on_its_anatomy(finding):
    """Same phantom (same noise) with and without one finding: the image changes inside that
    finding's anatomy, by a visible amount, and (almost) nowhere else."""
    value = ANATOMY_VALUE[CTRATE_LABEL_ANATOMY[finding]]
    for index in range(2):  # two phantoms: sizes, positions and finding sides differ
        with_f = synth.make_phantom(11, index, size_zyx=(48, 48, 48), findings=(finding,))
        without = synth.make_phantom(11, index, size_zyx=(48, 48, 48), findings=())
        diff = with_f.hu.astype(np.float32) - without.hu.astype(np.float32)
        anatomy = with_f.labels == value
        changed = np.abs(diff) > 100
        assert changed[anatomy].sum() >= 2, f"{finding}: not visible in its anatomy"
        if finding not in SMALL:  # spots and nodules are a few voxels by design
            assert np.abs(diff[anatomy]).mean() > 2.0, f"{finding}: mean HU change in the anatomy too small"
        outside = ~(anatomy | (without.labels == value))
        assert changed[outside].sum() <= 0.05 * changed.sum(), f"{finding}: drawn outside its anatomy"
        if finding == "Cardiomegaly":
            assert anatomy.sum() > 1.3 * (without.labels == value).sum()


def test_finding_labels_and_reports_agree():
    samples = list(synth.iter_cohort(40, seed=2, size_zyx=(24, 24, 24)))
    n_normal = 0
    for s in samples:
        row = s.label_row
        assert {k for k, v in row.items() if v} == set(s.findings)
        text = (s.report["Findings_EN"] + " " + s.report["Impressions_EN"]).lower()
        if not s.findings:
            n_normal += 1
        if "Pleural effusion" in s.findings:
            assert "pleural effusion" in text and "pleural" in s.report["Impressions_EN"].lower()
        if "Hiatal hernia" in s.findings:
            assert "hiatal hernia" in s.report["Impressions_EN"].lower()
        if "Cardiomegaly" in s.findings:
            assert "cardiomegaly" in text or "enlarged" in text
    assert all(len(s.findings) < len(synth.RENDERED_FINDINGS) for s in samples)


def test_prevalence_and_normal_reports():
    rng = np.random.default_rng(0)
    draws = [synth._draw_findings(rng, synth.DEFAULT_PREVALENCE, 0.1) for _ in range(3000)]
    for f, p in synth.DEFAULT_PREVALENCE.items():
        rate = np.mean([f in d for d in draws])
        assert abs(rate - 0.9 * p) < 0.035, (f, rate)  # 20-30% for the core findings
    normal_rate = np.mean([not d for d in draws])
    assert 0.1 < normal_rate < 0.2  # normal scans are common
    pairs = np.mean([("Emphysema" in d) and ("Cardiomegaly" in d) for d in draws])
    assert abs(pairs - 0.9 * 0.25 * 0.25) < 0.02  # independent draws
    normal = synth.make_phantom(0, 0, size_zyx=(24, 24, 24), findings=())
    assert normal.report["Impressions_EN"] in synth.NORMAL_IMPRESSIONS


def test_bad_arguments(tmp_path):
    from fvlm_core.errors import InputError

    with pytest.raises(InputError, match="--n"):
        synth.generate_cohort(tmp_path, 0, seed=0)
    with pytest.raises(InputError, match="prevalence"):
        synth.generate_cohort(tmp_path, 2, seed=0, prevalence={"Bronchiectasis": 0.5})
    with pytest.raises(InputError, match="Bronchiectasis"):
        synth.make_phantom(0, 0, size_zyx=(16, 16, 16), findings=["Bronchiectasis"])
    with pytest.raises(InputError, match="split 'test'"):
        synth.make_phantom(0, 0, "test", size_zyx=(16, 16, 16))
    assert not list(tmp_path.iterdir())


def test_reports_are_understood_by_the_report_rules():
    """The project's own decomposition and label extraction read the synthetic reports right:
    abnormal anatomies (impression rule) and the 18 labels match what was drawn."""
    from fvlm_core.reports import decompose_report, extract_labels

    for s in synth.iter_cohort(120, seed=13, size_zyx=(16, 16, 16)):
        d = decompose_report(s.report["Findings_EN"], s.report["Impressions_EN"])
        for anatomy, abnormal in d.abnormal.items():
            assert abnormal == any(CTRATE_LABEL_ANATOMY.get(f) == anatomy for f in s.findings), (
                anatomy,
                s.report,
            )
        assert extract_labels(s.report["Findings_EN"] + " " + s.report["Impressions_EN"]) == s.label_row, (
            s.report
        )


def test_abnormal_lung_reports_also_rule_out_absent_lung_findings():
    """Like CT-RATE readers, reports of an abnormal lung state some absent lung findings as
    negated (the text side then learns what "no X" means), and the label rules read them as 0."""
    from fvlm_core.reports import extract_labels

    ruled_out = {spec.name: spec.absent for spec in synth.FINDINGS if spec.absent}
    assert set(ruled_out) == {"Emphysema", "Lung nodule", "Consolidation", "Lung opacity", "Atelectasis"}
    rng = np.random.default_rng(4)
    negated = set()
    for _ in range(40):
        report = synth.write_report(frozenset({"Emphysema"}), {}, rng)
        text = report["Findings_EN"] + " " + report["Impressions_EN"]
        for finding, options in ruled_out.items():
            if any(o in text for o in options):
                negated.add(finding)
        labels = extract_labels(text)
        assert [k for k in ruled_out if labels[k]] == ["Emphysema"], text
    assert negated == set(ruled_out) - {"Emphysema"}


# ---------------------------------------------------------------- the table of findings
SPECS = {spec.name: spec for spec in synth.FINDINGS}
SECTIONS = [section.name for section in synth._SECTIONS]


def test_finding_table_is_complete_and_consistent():
    """One row per drawn finding; each names a known section, anatomy and draw slot."""
    assert sorted(synth.RENDERED_FINDINGS) == sorted(SPECS) and len(SPECS) == len(synth.FINDINGS)
    assert list(synth.DEFAULT_PREVALENCE) == list(synth.RENDERED_FINDINGS)
    order = [SECTIONS.index(spec.section) for spec in synth.FINDINGS]  # raises on an unknown section
    runs = [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s]
    assert len(runs) == len(set(runs)), "a section's findings must be adjacent rows (the report groups them)"
    for spec in synth.FINDINGS:
        assert spec.anatomy in (*synth.MASK_VALUES, synth.BACKGROUND, None), spec.name
        assert spec.anatomy == CTRATE_LABEL_ANATOMY.get(spec.name, spec.anatomy), spec.name
        assert spec.present and spec.impression and 0.0 < spec.prevalence <= 1.0, spec.name
        assert spec.paint is not None or spec.shape is not None, f"{spec.name} is never drawn"
        section = synth._SECTIONS[SECTIONS.index(spec.section)]
        assert not spec.absent or section.rules_out, f"{spec.name}: its section never rules findings out"


def _render(seed: int, size: int, findings=()):
    grid = synth._Grid((size,) * 3, synth.default_spacing_zyx((size,) * 3))
    params = synth.sample_params(np.random.default_rng(seed), grid)
    return synth.render_phantom(params, frozenset(findings), grid.shape, grid.spacing)


@pytest.mark.parametrize("name", list(SPECS))
def test_each_finding_paints_only_on_its_anatomy(name):
    """The same phantom with and without one finding differs only on that finding's anatomy
    (the label value it lives on, after any change of shape), and a finding that does not change
    the anatomy's shape leaves the label map alone."""
    spec = SPECS[name]
    drawn = 0
    for seed, size in ((1, 32), (2, 48)):
        hu0, lab0, _ = _render(seed, size)
        hu1, lab1, extras = _render(seed, size, {name})
        changed = (hu1 != hu0) | (lab1 != lab0)
        drawn += int(changed.sum())
        if spec.shape is None:
            np.testing.assert_array_equal(lab1, lab0, err_msg=f"{name}: a painter changed the label map")
        if spec.anatomy is not None:
            value = 0 if spec.anatomy == synth.BACKGROUND else synth.MASK_VALUES[spec.anatomy]
            assert (lab1[changed] == value).all(), f"{name}: drawn outside {spec.anatomy}"
        report = synth.write_report(frozenset({name}), extras, np.random.default_rng(seed))
        assert list(extras) >= ["heart_center", "heart_axes", "aorta_segments"]
        words = spec.words(extras) if spec.words else {}
        assert any(p.format(**words) in report["Findings_EN"] for p in spec.present), report
    # (enlarged nodes may fall wholly on other anatomy in one phantom: the pair must show them)
    assert drawn > 0, f"{name}: nothing drawn"


def test_report_states_a_finding_iff_it_is_drawn():
    """Each finding's sentence and impression appear exactly when it is drawn; its ruling-out
    sentence never does then."""
    rng = np.random.default_rng(0)
    seen = set()
    for k in range(60):
        drawn = frozenset(n for n in SPECS if rng.random() < 0.3)
        _, _, extras = _render(k, 16, drawn)
        report = synth.write_report(drawn, extras, np.random.default_rng(k))
        for spec in synth.FINDINGS:
            words = spec.words(extras) if spec.words else {}
            stated = any(p.format(**words) in report["Findings_EN"] for p in spec.present)
            impressed = any(p.format(**words) in report["Impressions_EN"] for p in spec.impression)
            assert stated == impressed == (spec.name in drawn), (spec.name, report)
            if spec.name in drawn:
                seen.add(spec.name)
                assert not any(p in report["Findings_EN"] for p in spec.absent), (spec.name, report)
        for section in synth._SECTIONS:  # a section with no drawn finding gets a normal sentence
            if not any(SPECS[n].section == section.name for n in drawn):
                assert any(p in report["Findings_EN"] for p in section.normal), (section.name, report)
    assert seen == set(SPECS)
