"""Report decomposition: sentence splitting, anatomy assignment, reference and negation-aware
normality, training texts, fVLM decomposition files, LLM hook, and bad input.

Real report sentences are read from ../shared/data at run time (referenced by report id and
sentence index; that data is CC BY-NC-SA and is not copied into the project); the other example
sentences are written for these tests in CT-RATE style.
"""

from __future__ import annotations

import csv
import json
import warnings

import pytest

from fvlm_core.anatomy import EXTENDED_CATALOG
from fvlm_core.errors import DataError, InputError
from fvlm_core.reports import (
    ReportWarning,
    decompose_report,
    load_decomposition_files,
    looks_english,
    normal_template,
    sentence_is_abnormal,
    split_sections,
    split_sentences,
)
from fvlm_core.reports.lexicon import anatomies_in
from fvlm_core.reports.negation import NEGATED, POSITIVE, UNCERTAIN, classify, prepare

CT4 = ["lung", "heart", "esophagus", "aorta"]

# Real sentences of the shared labelled reports, referenced as (AccessionNo, index among
# split_sentences(report_text)) so that no text of that CC BY-NC-SA data is copied here, with
# the anatomies among the 4 CT-RATE ones a reader expects and whether it states an abnormality.
REAL_SENTENCE_REFS = [
    (("train_1", 3), {"heart"}, False),
    (("train_1", 2), {"aorta"}, False),
    (("train_1", 1), {"heart", "aorta"}, False),
    (("train_1", 4), {"esophagus"}, False),
    (("train_1", 7), {"lung"}, False),
    (("train_68", 7), {"lung"}, False),
    (("train_1", 0), {"lung"}, False),
    (("train_113", 6), {"esophagus"}, True),
    (("train_443", 5), {"heart"}, True),
    (("train_263", 1), {"aorta"}, True),
    (("train_75", 9), {"heart"}, True),
    (("train_455", 2), {"aorta"}, True),
    (("train_84", 3), {"aorta", "heart"}, True),
    (("train_177", 6), {"lung"}, True),
    (("train_1", 9), set(), False),
]

# Sentences written for this test in the same style.
WRITTEN_SENTENCES = [
    ("Sequelae densities are seen in the apical segments of both upper lung lobes.", {"lung"}, True),
    ("A 5 mm nodule is seen in the right upper lobe.", {"lung"}, True),
    ("The thyroid gland contains a small hypodense nodule.", set(), True),
]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report_sentences(reports_csv):
    """AccessionNo -> the report's sentences (split_sentences of report_text)."""
    return {row["AccessionNo"]: split_sentences(row["report_text"]) for row in _rows(reports_csv)}


@pytest.mark.parametrize(("ref", "anatomies", "abnormal"), REAL_SENTENCE_REFS)
def test_real_sentences_anatomy_and_normality(report_sentences, ref, anatomies, abnormal):
    accession, index = ref
    sentence = report_sentences[accession][index]
    assert set(anatomies_in(prepare(sentence), CT4)) == anatomies, sentence
    assert sentence_is_abnormal(sentence) is abnormal, sentence


@pytest.mark.parametrize(("sentence", "anatomies", "abnormal"), WRITTEN_SENTENCES)
def test_written_sentences_anatomy_and_normality(sentence, anatomies, abnormal):
    assert set(anatomies_in(prepare(sentence), CT4)) == anatomies
    assert sentence_is_abnormal(sentence) is abnormal


def test_extended_catalog_anatomies():
    names = EXTENDED_CATALOG.names
    cases = {
        "No focal lesion is seen in the liver within the scan range.": {"liver"},
        "Both adrenal glands are normal without a mass.": {"adrenal_gland"},
        "The thyroid gland contains a small hypodense nodule.": {"thyroid_gland"},
        "Spleen size and density are normal.": {"spleen"},
        "No solid or cystic renal mass is seen.": {"kidney"},
        "Vertebral body heights are maintained.": {"bone"},
        "The main pulmonary artery measures 31 mm, wider than normal.": {"pulmonary_artery"},
    }
    for sentence, expected in cases.items():
        assert set(anatomies_in(prepare(sentence), names)) == expected, sentence
    # "adrenal" must not be read as renal, nor "liver parenchyma" as lung
    assert "kidney" not in anatomies_in(prepare("Bilateral adrenal glands were normal."), names)
    assert "lung" not in anatomies_in(prepare("Liver parenchyma density decreased."), names)


def test_negation_cues():
    def status(clause, term):
        c = prepare(clause)
        i = c.index(term)
        return classify(c, i, i + len(term))

    assert status("no pleural effusion or pneumothorax was detected", "pneumothorax") == NEGATED
    assert status("pericardial effusion was not observed", "pericardial effusion") == NEGATED
    assert status("ctr is within normal limits", "ctr") == NEGATED
    assert status("a mass without calcification", "calcification") == NEGATED
    assert status("malignancy cannot be excluded", "malignancy") == UNCERTAIN
    assert status("minimal pericardial effusion is observed", "pericardial effusion") == POSITIVE
    # pseudo-negation: "no significant change" denies a change, not the nodule
    assert status("the nodule shows no significant change", "nodule") == POSITIVE


def test_sentence_splitting_keeps_decimals_and_impression_items():
    text = 'A nodule of 3.3 cm is seen. Approx. 5 mm effusion." Hiatal hernia " Emphysema• Atelectasis'
    sents = split_sentences(text)
    assert sents[0] == "A nodule of 3.3 cm is seen."
    assert "Approx. 5 mm effusion." in sents
    assert sents[-3:] == ["Hiatal hernia", "Emphysema", "Atelectasis"]


def test_decompose_reference_and_negation_aware():
    findings = (
        "Both main bronchi and the trachea are open. Heart contour and size and the main mediastinal vessels are "
        "normal. The thoracic aorta is of normal diameter. No pericardial effusion or thickening was seen. "
        "The thoracic esophagus has a normal calibre without significant wall thickening. "
        "A small hiatal hernia is seen. In the lung window, a subpleural nodule of "
        "3 mm is seen in the apicoposterior segment of the left upper lobe. "
        "Calcific atheroma plaques are seen diffusely in the coronary arteries."
    )
    impression = "Hiatal hernia. Millimetric nodule in the left lung."
    r = decompose_report(findings, impression)
    assert r.anatomies == CT4
    # impression rule: abnormal iff the impression states an abnormality of the anatomy
    assert r.abnormal == {"lung": True, "heart": False, "esophagus": True, "aorta": False}
    # negation-aware: the coronary plaques make the heart abnormal although the impression is silent
    assert r.abnormal_findings == {"lung": True, "heart": True, "esophagus": True, "aorta": False}
    # normal anatomy: template followed by its findings sentences
    assert r.texts["aorta"].startswith(normal_template("aorta"))
    assert "The thoracic aorta is of normal diameter." in r.texts["aorta"]
    assert r.texts["heart"].startswith("heart shows no significant abnormalities. ")
    assert "coronary arteries" in r.texts["heart"]
    # abnormal anatomy (reference order): impression sentences, then findings sentences, no template
    assert r.texts["esophagus"].startswith("Hiatal hernia. ")
    assert "shows no significant" not in r.texts["esophagus"]
    assert r.texts["esophagus"].index("Hiatal hernia.") < r.texts["esophagus"].index("A small hiatal hernia")
    assert r.texts["lung"].startswith("Millimetric nodule in the left lung. ")
    assert r.sentences["lung"][-1] == "Millimetric nodule in the left lung."


def test_normal_anatomy_without_sentences_is_template_only():
    r = decompose_report("No pericardial effusion or thickening was seen.", "Normal thoracic CT.")
    assert r.texts["aorta"] == "aorta shows no significant abnormalities."
    assert r.texts["lung"] == "lung shows no significant abnormalities."
    assert not any(r.abnormal.values()) and not any(r.abnormal_findings.values())


def test_extended_anatomies_in_decomposition():
    r = decompose_report(
        "Hepatosteatosis is present in the liver. The spleen is normal.",
        "Hepatosteatosis.",
        anatomies=["lung", "liver", "spleen"],
    )
    assert r.abnormal == {"lung": False, "liver": True, "spleen": False}
    assert r.texts["spleen"] == "spleen shows no significant abnormalities. The spleen is normal."
    assert normal_template("pulmonary_artery") == "pulmonary artery shows no significant abnormalities."


def test_context_sentences_follow_their_anatomy():
    r = decompose_report(
        "Patchy ground glass areas are observed in both lungs. This appearance was considered in favor of "
        "infection first. No pericardial effusion or thickening was seen.",
        "Ground glass areas in both lungs. Findings may be compatible with infection. Atherosclerosis.",
    )
    assert "This appearance was considered in favor of infection first." in r.sentences["lung"]
    assert "Findings may be compatible with infection." in r.sentences["lung"]
    assert r.impression_sentences["aorta"] == ["Atherosclerosis."]  # bare atherosclerosis -> aorta
    assert r.sentences["heart"] == ["No pericardial effusion or thickening was seen."]
    # ... but "coronary atherosclerosis" names the heart, and "Clinical correlation" names nothing
    assert anatomies_in(prepare("Coronary atherosclerosis."), CT4) == ["heart"]
    r = decompose_report("Clinical correlation is recommended.", "")
    assert r.unassigned == ["Clinical correlation is recommended."]


def test_report_with_no_sections_is_findings():
    text = "A small hiatal hernia is seen. No pericardial effusion or thickening was seen."
    assert split_sections(text) == (text, "")
    f, i = split_sections("FINDINGS: A small hiatal hernia is seen.\nIMPRESSION: Hiatal hernia.")
    assert (f, i) == ("A small hiatal hernia is seen.", "Hiatal hernia.")
    r = decompose_report(text, "")
    assert not r.has_impression
    # without an impression the reference rule has nothing to read: negation-aware decides
    assert r.abnormal["esophagus"] and not r.abnormal["heart"]
    assert r.abnormal == r.abnormal_findings


def test_empty_and_non_english_reports():
    with pytest.warns(ReportWarning, match="empty"):
        r = decompose_report("", None)
    assert r.language == "empty"
    assert r.texts == {a: normal_template(a) for a in CT4}
    turkish = "Her iki akciğerde plevral efüzyon izlenmedi. Kalp boyutları normaldir. Hiatal herni izlendi."
    assert not looks_english(turkish)
    for other in (
        "Her iki akcigerde plevral efuzyon izlenmedi. Kalp boyutlari normal sinirlarda. Mediastende lenf nodu yok.",
        "No se observa derrame pleural en ambos pulmones. El corazón tiene tamaño normal y no hay masas.",
        "Kein Pleuraerguss. Herz normal groß. Keine Raumforderung in der Lunge, kein Nachweis von Rundherden.",
    ):
        assert not looks_english(other), other
    assert looks_english("A small hiatal hernia is seen.")
    assert looks_english("Emphysema, bronchiectasis, atelectasis.")  # an impression list
    with pytest.warns(ReportWarning, match="English"):
        r = decompose_report(turkish, "")
    assert r.language == "unknown" and not any(r.abnormal_findings.values())
    with pytest.raises(InputError, match="English"):
        decompose_report(turkish, "", on_bad_report="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decompose_report(turkish, "", on_bad_report="ignore")


def test_llm_hook_replaces_assignment():
    calls = []

    def fake_llm(findings, impression, anatomies):
        calls.append(list(anatomies))
        return {
            "lung": ("Small left pleural effusion.", "Pleural effusion."),
            "heart": "Heart size is normal.",
        }

    r = decompose_report("Some text.", "Pleural effusion.", decomposer=fake_llm)
    assert calls == [CT4]
    assert r.abnormal == {"lung": True, "heart": False, "esophagus": False, "aorta": False}
    assert r.texts["lung"] == "Pleural effusion. Small left pleural effusion."
    assert r.texts["heart"] == "heart shows no significant abnormalities. Heart size is normal."


def test_load_fvlm_decomposition_files(tmp_path):
    """fVLM's files give the texts its CT-RATE dataset builds (caption_datasets.py): conclusion or
    the normal template, then the description, each ending with a period, no space between them,
    quotes and parentheses removed; abnormal = the text does not start with the template."""
    desc = {
        "train_1_a": {"lung": "Minimal pleural effusion (on the left)", "heart": "Heart size is normal."},
        "train_2_a": {"aorta": "The thoracic aorta is of normal diameter.", "esophagus": ""},
    }
    conc = {"train_1_a": {"lung": "Left pleural effusion."}, "train_2_a": {}}
    (tmp_path / "desc_info.json").write_text(json.dumps(desc))
    (tmp_path / "conc_info.json").write_text(json.dumps(conc))
    out = load_decomposition_files(tmp_path / "desc_info.json", tmp_path / "conc_info.json")
    assert set(out) == {"train_1_a", "train_2_a"}
    a = out["train_1_a"]
    assert a.abnormal == {"lung": True, "heart": False, "esophagus": False, "aorta": False}
    assert a.texts["lung"] == "Left pleural effusion.Minimal pleural effusion on the left."
    assert a.texts["heart"] == "heart shows no significant abnormalities.Heart size is normal."
    assert a.texts["aorta"] == "aorta shows no significant abnormalities."
    b = out["train_2_a"]
    assert (
        b.texts["aorta"]
        == "aorta shows no significant abnormalities.The thoracic aorta is of normal diameter."
    )
    assert b.texts["esophagus"] == "esophagus shows no significant abnormalities.."  # "" becomes "." there
    assert not any(b.abnormal.values())
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="scan id"):
        load_decomposition_files(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        load_decomposition_files(tmp_path / "missing.json")


def test_sentence_naming_a_finding_but_no_organ_goes_to_the_finding_anatomy():
    r = decompose_report(
        "Heart size is normal. Fibrotic sequelae. Arterial wall calcification.", "Fibrotic sequelae."
    )
    assert r.texts["lung"] == "Fibrotic sequelae. Fibrotic sequelae."  # impression, then findings
    assert r.abnormal["lung"] and r.abnormal_findings["lung"]
    assert r.findings_sentences["aorta"] == ["Arterial wall calcification."] and r.abnormal_findings["aorta"]
    assert not r.unassigned
    # another organ named: not moved to a CT-RATE anatomy
    other = decompose_report("Calcification in the liver. A nodule in the thyroid gland.")
    assert len(other.unassigned) == 2 and not any(other.findings_sentences.values())


@pytest.mark.slow
def test_prepare_with_decomposition_files(tmp_path):
    """`fvlm prepare --decomposition DIR`: the cache holds the files' texts and flags; a scan the
    files lack gets the normal templates (as the reference) and is counted."""
    from fvlm_core.data import synth
    from fvlm_core.data.cache import load_sample
    from fvlm_core.data.layout import scan_id_of
    from fvlm_training.cli import main

    size = (24, 32, 40)
    data = tmp_path / "cohort"
    synth.generate_cohort(data, 3, seed=2, size_zyx=size, recon_fraction=0.0, valid_fraction=0.0)
    names = sorted(
        s.name for s in synth.iter_cohort(3, seed=2, size_zyx=size, recon_fraction=0.0, valid_fraction=0.0)
    )
    scans = [scan_id_of(n) for n in names]
    files = tmp_path / "decomposition"
    files.mkdir()
    desc = {scans[0]: {"lung": "Bilateral (minimal) effusion"}, scans[1]: {"heart": "Heart size is normal."}}
    conc = {scans[0]: {"lung": "Pleural effusion"}, scans[1]: {}}
    (files / "desc_info.json").write_text(json.dumps(desc))
    (files / "conc_info.json").write_text(json.dumps(conc))
    out = tmp_path / "cache"
    argv = ["prepare", "--dataset", str(data), "--out", str(out), "--config", "fvlm-tiny"]
    assert main([*argv, "--decomposition", str(files)]) == 0
    first, second, third = (load_sample(out, n) for n in names)
    assert first.texts["lung"] == "Pleural effusion.Bilateral minimal effusion." and first.abnormal["lung"]
    assert first.texts["heart"] == "heart shows no significant abnormalities." and not first.abnormal["heart"]
    assert second.texts["heart"] == "heart shows no significant abnormalities.Heart size is normal."
    assert not any(second.abnormal.values()) and second.meta["decomposition"] == "files"
    assert all(t == normal_template(a) for a, t in third.texts.items())
    assert third.meta["decomposition"].startswith("files: scan absent")
    summary = json.loads((out / "_prepare" / "summary-train-0of1.json").read_text())
    assert summary["decomposition"]["volumes_without_entry"] == 1
    # a folder without the files is refused before anything is prepared
    assert main([*argv[:-4], "--out", str(tmp_path / "other"), "--decomposition", str(tmp_path)]) == 2
    assert not (tmp_path / "other" / f"{names[0]}.json").exists()
    # a cache prepared by rules is not mixed with one prepared from the files
    assert main([*argv, "--decomposition", str(files)]) == 0  # resumed: same settings
    rules = tmp_path / "rules"
    assert (
        main(
            ["prepare", "--dataset", str(data), "--out", str(rules), "--config", "fvlm-tiny", "--limit", "1"]
        )
        == 0
    )
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(data),
                "--out",
                str(rules),
                "--config",
                "fvlm-tiny",
                "--decomposition",
                str(files),
            ]
        )
        == 2
    )


def test_real_reports_are_english(reports_csv):
    texts = [row["report_text"] for row in _rows(reports_csv)]
    assert all(looks_english(t) for t in texts)
    impressions = [t[t.find('"') :] for t in texts if '"' in t]
    assert all(looks_english(t) for t in impressions)


def test_real_reports_decomposition(reports_csv):
    """Whole real reports: the negation-aware flag agrees with the manual labels of each anatomy."""
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY

    hits = total = missed = 0
    for row in _rows(reports_csv)[:120]:
        text = row["report_text"]
        k = text.find('"')  # CT-RATE's impression items start at the first quote
        findings, impression = (text[:k], text[k:]) if k >= 0 else (text, "")
        r = decompose_report(findings, impression)
        for a in CT4:
            gold = any(row[lbl] == "1" for lbl, an in CTRATE_LABEL_ANATOMY.items() if an == a)
            total += 1
            hits += gold == r.abnormal_findings[a]
            missed += gold and not r.abnormal_findings[a]
    # a labelled finding on an anatomy is (almost) never missed; agreement is high overall
    assert missed <= 2
    assert hits / total >= 0.85


def test_impression_flag_is_negation_aware():
    """Issue 25: the flag training uses (normal-normal pairing) read any impression sentence
    about an anatomy as a finding, so "Heart and aorta are normal." marked both abnormal."""
    findings = "Heart contour and size are normal. A 5 mm nodule is seen in the right lung."
    impression = "Heart and aorta are normal. No pleural effusion was detected. Nodule in the right lung."
    r = decompose_report(findings, impression)
    assert r.impression_sentences["heart"] == ["Heart and aorta are normal."]  # still assigned
    assert r.abnormal == {"lung": True, "heart": False, "esophagus": False, "aorta": False}
    assert r.texts["heart"] == "heart shows no significant abnormalities. Heart contour and size are normal."
    assert r.texts["aorta"] == "aorta shows no significant abnormalities."
    # the abnormal anatomy keeps all its impression sentences first, as before
    assert r.texts["lung"].startswith("No pleural effusion was detected. Nodule in the right lung. ")
    # a conclusion that the heart is displaced is a finding
    assert decompose_report("Heart size is normal.", "Right deviation in mediastinum and heart").abnormal[
        "heart"
    ]


def _flag_counts(reports_csv) -> dict[str, dict[str, float]]:
    """Both anatomy flags against the manual labels of the 800 reports (gold: any of the
    anatomy's CT-RATE labels is 1). ``impression``: the flag training uses, on the reports with
    an impression (CT-RATE's impression items start at the first quote); ``findings``: the
    negation-aware flag over the whole report, on all reports."""
    from fvlm_core.findings import CTRATE_LABEL_ANATOMY

    pairs: dict[str, list[tuple[bool, bool]]] = {"impression": [], "findings": []}
    for row in _rows(reports_csv):
        text = row["report_text"]
        k = text.find('"')
        r = decompose_report(*((text[:k], text[k:]) if k >= 0 else (text, "")))
        for a in CT4:
            gold = any(row[lbl] == "1" for lbl, an in CTRATE_LABEL_ANATOMY.items() if an == a)
            pairs["findings"].append((gold, r.abnormal_findings[a]))
            if k >= 0:
                pairs["impression"].append((gold, r.abnormal[a]))
    out = {}
    for name, p in pairs.items():
        tp = sum(g and f for g, f in p)
        flagged, positive = sum(f for _, f in p), sum(g for g, _ in p)
        agree = sum(g == f for g, f in p)
        out[name] = {
            "anatomies": len(p),
            "agreement": agree / len(p),
            "precision": tp / flagged,
            "recall": tp / positive,
        }
    return out


def test_abnormal_flags_on_the_800_labelled_reports(reports_csv):
    """What each flag measures, on the 800 manually labelled reports. The impression flag says
    whether the impression concludes something abnormal about the anatomy: an impression names
    the main findings only, so against the whole-report labels its recall is low by design and
    its precision is what the rule controls (92.0 % before it was negation-aware: 67 anatomies
    flagged from normal or negated statements). The findings flag says whether the report states
    any abnormality of the anatomy: it should find nearly every labelled one."""
    m = _flag_counts(reports_csv)
    print(
        "\n".join(
            f"{k}: {v['anatomies']} anatomies, agreement {v['agreement']:.1%}, "
            f"precision {v['precision']:.1%}, recall {v['recall']:.1%}"
            for k, v in m.items()
        )
    )
    imp, fnd = m["impression"], m["findings"]
    assert imp["anatomies"] == 594 * 4 and fnd["anatomies"] == 800 * 4
    assert imp["precision"] >= 0.94 and imp["recall"] >= 0.75
    assert fnd["agreement"] >= 0.95 and fnd["recall"] >= 0.995
