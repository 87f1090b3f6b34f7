"""Anatomy-level decomposition of a CT report (fVLM's per-anatomy training texts).

``decompose_report(findings, impression)`` splits both sections into sentences, assigns each
sentence to every anatomy it speaks of (:mod:`fvlm_core.reports.lexicon`; a sentence that names
no organ but a CT-RATE finding, e.g. "Fibrotic sequelae." or "Arterial wall calcification.", goes
to that finding's anatomy; one that only refers back, "It ...", to the previous sentence's), and
decides per anatomy:

* ``abnormal`` — the flag training uses (normal–normal pairing, the training text's head). The
  public fVLM release reads an anatomy as abnormal when its conclusion text (extracted from the
  impression) is present; here the impression must *state an abnormality* of the anatomy: one
  of its impression sentences is abnormal by :func:`sentence_is_abnormal` ("Heart and aorta are
  normal." or "No finding compatible with pneumonia." concludes nothing abnormal). A report
  without an impression (no sections) has nothing to apply the rule to; the negation-aware
  decision over the whole report is used instead (documented deviation).
* ``abnormal_findings`` — negation-aware: some sentence of the anatomy (findings or impression)
  states an abnormality that is not negated ("no", "was not detected", "without", "within
  normal limits", ...); hedged statements ("cannot be excluded") count as abnormal.

Training text (the reference style of fVLM's CT-RATE dataset code): an
abnormal anatomy's text is its impression sentences followed by its findings sentences; a
normal anatomy's text is the template ``"{anatomy} shows no significant abnormalities."``
(anatomy name as in the catalog, lower case) followed by its findings sentences, if any.
Sentences end with a period; quotes and parentheses are dropped as the reference does.

An LLM (or any other) decomposer can replace the rule-based sentence assignment: pass
``decomposer=callable(findings, impression, anatomies) -> {anatomy: (findings_text,
impression_text)}``; fVLM's published files (``desc_info.json`` / ``conc_info.json``) load with
:func:`load_decomposition_files`. Normality is then decided on those texts the same way.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fvlm_core.anatomy import CTRATE_CATALOG, EXTENDED_CATALOG
from fvlm_core.errors import DataError, InputError, ReportWarning
from fvlm_core.findings import CTRATE_LABEL_ANATOMY
from fvlm_core.reports.labels import label_mentions
from fvlm_core.reports.lexicon import anatomies_in
from fvlm_core.reports.negation import NEGATED, classify, prepare
from fvlm_core.reports.sentences import clauses, looks_english, split_sentences

__all__ = [
    "Decomposer",
    "ReportDecomposition",
    "decompose_report",
    "decomposition_from_texts",
    "load_decomposition_files",
    "normal_template",
    "reference_caption",
    "reference_decomposition",
    "sentence_is_abnormal",
    "training_text",
]

#: ``(findings, impression, anatomies) -> {anatomy: (findings_text, impression_text)}``.
Decomposer = Callable[[str, str, Sequence[str]], Mapping[str, "tuple[str, str] | str"]]


def normal_template(anatomy: str) -> str:
    """The reference normal description, with the anatomy name as the reference writes it:
    ``"lung shows no significant abnormalities."`` (underscores become spaces)."""
    return f"{anatomy.replace('_', ' ')} shows no significant abnormalities."


_STRIPPED = str.maketrans("", "", "\"'()")


def training_text(sentences: Sequence[str]) -> str:
    """Join sentences the reference way: each ends with a period; quotes, apostrophes and
    parentheses are removed (as fVLM's CT-RATE dataset does). The reference concatenates
    without a space; a space is used here, which BERT-style tokenizers split identically."""
    parts = []
    for s in sentences:
        s = s.translate(_STRIPPED).strip()
        if s and s[-1].isalnum():
            s += "."
        if s:
            parts.append(s)
    return " ".join(parts)


# Words that describe an abnormality (a finding noun, a change, a device). A clause with none of
# them ("heart contour, size are normal", "when examined in the lung window") states nothing
# abnormal.
_ABNORMAL = re.compile(
    r"lesion|mass\b|masses|nodul|effusion|thicken|thickness|calcif|plaque|atherom|atheroscler|hernia|dilat|"
    r"enlarg|increas|decreas|densit|opacit|consolidat|atelecta|emphysem|bullae?\b|fibro|sequel|\bbands?\b|"
    r"bronchiecta|cyst|stones?\b|calcul|hypodens|hyperdens|stent|catheter|\bport\b|pacemaker|prosthe|"
    r"suture|\bclips?\b|\bwires?\b|fractur|degenerat|osteophyt|scolios|kyphos|lymph nodes?|lymphadeno|\blaps?\b|"
    r"ectasi|ectatic|aneurysm|thromb|embol|edema|oedema|\bfluid|free air|pneumothorax|pneumonia|pneumoni|"
    r"infiltrat|ground glass|atroph|steatos|megaly|itis\b|osis\b|oma\b|omas\b|metasta|tumou?r|malignan|"
    r"wider than|larger than|smaller than|narrow|stenos|occlu|irregular|mosaic|sept\w* thicken|honeycomb|"
    r"air trapping|collapse|volume loss|distortion|retraction|operat|resect|ectomy|otomy|graft|"
    r"abnormal|patholog|suspicious|infect|inflam|abscess|cavit|bronchogram|budding|crazy paving|"
    r"reticul|interstitial|hypertroph|deform|displace|eventration|elevation|herniat|diverticul|polyp|"
    r"varic|collateral|anomal|aberrant|accessory|variant|tortuous|elongat|ectopic|lobulat|heterogen|"
    r"deviat|\bshift|"
    r"\?"
)
_NORMAL_STATEMENT = re.compile(
    r"\b(?:is|are|was|were|appears?|seem|looks?)\s+(?:\w+\s+)?(?:normal|natural|unremarkable|preserved|open|"
    r"patent|clear|usual|intact|regular|symmetric\w*)\b|\bwithin normal limits\b|\bno (?:significant |obvious |"
    r"apparent )?(?:patholog\w*|abnormalit\w*|findings?)\b"
)


def sentence_is_abnormal(sentence: str) -> bool:
    """Whether a sentence states an abnormality that no cue negates (hedged = abnormal)."""
    for clause in clauses(prepare(sentence)):
        clean = re.sub(
            r"\b(?:wider|larger|smaller|greater|higher|lower|thicker) than normal\b", "enlarged", clause
        )
        for m in _ABNORMAL.finditer(clean):
            if classify(clean, m.start(), m.end()) != NEGATED and not _NORMAL_STATEMENT.search(clean):
                return True
    return False


@dataclass
class ReportDecomposition:
    """Per-anatomy view of one report.

    Attributes:
        anatomies: anatomy names, in order.
        texts: ``{anatomy: training text}`` (reference style).
        abnormal: ``{anatomy: bool}``: the impression states an abnormality of it (negation-aware;
            without an impression, ``abnormal_findings``).
        abnormal_findings: ``{anatomy: bool}``, negation-aware.
        sentences: ``{anatomy: [sentence, ...]}`` findings then impression sentences.
        findings_sentences / impression_sentences: the same split by section.
        unassigned: sentences that name no anatomy of the list.
        language: ``"en"``, ``"unknown"`` (not English: nothing extracted) or ``"empty"``.
        has_impression: whether an impression was given (the impression rule needs one).
    """

    anatomies: list[str]
    texts: dict[str, str]
    abnormal: dict[str, bool]
    abnormal_findings: dict[str, bool]
    sentences: dict[str, list[str]]
    findings_sentences: dict[str, list[str]] = field(default_factory=dict)
    impression_sentences: dict[str, list[str]] = field(default_factory=dict)
    unassigned: list[str] = field(default_factory=list)
    language: str = "en"
    has_impression: bool = True

    def to_dict(self) -> dict:
        return {
            "anatomies": list(self.anatomies),
            "texts": dict(self.texts),
            "abnormal": dict(self.abnormal),
            "abnormal_findings": dict(self.abnormal_findings),
            "findings_sentences": {a: list(s) for a, s in self.findings_sentences.items()},
            "impression_sentences": {a: list(s) for a, s in self.impression_sentences.items()},
            "unassigned": list(self.unassigned),
            "language": self.language,
            "has_impression": self.has_impression,
        }


def _dedupe(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in items:
        key = prepare(s).strip(" .")
        if key and key not in seen:
            seen.add(key)
            out.append(s.strip())
    return out


def _assemble(
    findings_by: Mapping[str, list[str]],
    impression_by: Mapping[str, list[str]],
    anatomies: Sequence[str],
    has_impression: bool,
    unassigned: list[str],
    language: str,
) -> ReportDecomposition:
    texts, abnormal, abnormal_findings, sentences = {}, {}, {}, {}
    for a in anatomies:
        f_s, i_s = _dedupe(findings_by.get(a, [])), _dedupe(impression_by.get(a, []))
        sentences[a] = f_s + i_s
        impression_abnormal = [s for s in i_s if sentence_is_abnormal(s)]
        abnormal_findings[a] = bool(impression_abnormal) or any(sentence_is_abnormal(s) for s in f_s)
        # the reference's rule (an anatomy is abnormal when the impression concludes something
        # about it), negation-aware: "Heart and aorta are normal." concludes nothing abnormal
        abnormal[a] = bool(impression_abnormal) if has_impression else abnormal_findings[a]
        # Reference order: impression (conclusion) first, then findings; a normal anatomy gets
        # the template in place of the impression.
        head = i_s if abnormal[a] else [normal_template(a)]
        texts[a] = training_text([*head, *f_s])
    return ReportDecomposition(
        anatomies=list(anatomies),
        texts=texts,
        abnormal=abnormal,
        abnormal_findings=abnormal_findings,
        sentences=sentences,
        findings_sentences={a: _dedupe(findings_by.get(a, [])) for a in anatomies},
        impression_sentences={a: _dedupe(impression_by.get(a, [])) for a in anatomies},
        unassigned=unassigned,
        language=language,
        has_impression=has_impression,
    )


# A sentence that names no anatomy but refers back ("It was evaluated in favor of infection.",
# "The described mass has grown.") belongs to the anatomies of the sentence before it.
_ANAPHORA = re.compile(
    r"^(?:it|its|this|these|those|they|their|the (?:appearance|outlook|image|view|lesion|lesions|mass|masses|"
    r"described|findings?|manifestations?|larger|largest|former|latter)|findings?|appearances?|however|"
    r"(?:is|are|was|were) (?:evaluated|considered|compatible|consistent)|compatible with|consistent with|"
    r"in favor of|primarily|first of all)\b"
)


def _finding_anatomies(sentence: str, anatomies: Sequence[str]) -> list[str]:
    """Anatomies (of ``anatomies``, in that order) of the CT-RATE findings a sentence mentions,
    negated or not, when it names no organ of any catalog ("Fibrotic sequelae." -> lung)."""
    if anatomies_in(prepare(sentence), EXTENDED_CATALOG.names):
        return []
    found = {
        a for label, a in CTRATE_LABEL_ANATOMY.items() if a in anatomies and label_mentions(sentence, label)
    }
    return [a for a in anatomies if a in found]


def _assign(text: str, anatomies: Sequence[str], unassigned: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {a: [] for a in anatomies}
    previous: list[str] = []
    for sentence in split_sentences(text):
        prepared = prepare(sentence).lstrip(" .;:,-")
        hits = anatomies_in(prepared, anatomies)
        if not hits:
            hits = _finding_anatomies(sentence, anatomies)
        if not hits and previous and _ANAPHORA.match(prepared):
            hits = previous
        for a in hits:
            out[a].append(sentence)
        if not hits:
            unassigned.append(sentence)
        previous = hits
    return out


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:  # NaN: an empty cell of a table read with pandas
        return ""
    raise InputError(f"report text must be a string, got {type(value).__name__}")


def decompose_report(
    findings: str,
    impression: str = "",
    anatomies: Sequence[str] = tuple(CTRATE_CATALOG.names),
    decomposer: Decomposer | None = None,
    on_bad_report: str = "warn",
) -> ReportDecomposition:
    """Decompose one report into per-anatomy descriptions and normal/abnormal flags.

    Args:
        findings: the findings section (or the whole report when it has no sections).
        impression: the impression / conclusion section (``""`` when absent).
        anatomies: anatomy names (default: the 4 CT-RATE anatomies).
        decomposer: optional replacement for the rule-based sentence assignment (e.g. an LLM):
            ``(findings, impression, anatomies) -> {anatomy: (findings_text, impression_text)}``.
        on_bad_report: ``"warn"`` (default) emits a :class:`ReportWarning` for an empty or
            non-English report and returns an all-normal decomposition with ``language``
            ``"empty"`` / ``"unknown"``; ``"error"`` raises :class:`InputError`; ``"ignore"``.

    Returns:
        :class:`ReportDecomposition`.
    """
    findings, impression = _as_text(findings).strip(), _as_text(impression).strip()
    anatomies = list(anatomies)
    if on_bad_report not in ("warn", "error", "ignore"):
        raise InputError(f"on_bad_report must be 'warn', 'error' or 'ignore', got {on_bad_report!r}")
    language = "en"
    if not findings and not impression:
        language = "empty"
    elif not looks_english(f"{findings} {impression}"):
        language = "unknown"
    if language != "en":
        msg = (
            ("report is empty" if language == "empty" else "report does not look like English text")
            + "; every anatomy gets the normal template (nothing can be extracted). The rules are for English reports: translate it first."
        )
        if on_bad_report == "error":
            raise InputError(msg)
        if on_bad_report == "warn":
            warnings.warn(msg, ReportWarning, stacklevel=2)
        empty = {a: [] for a in anatomies}
        return _assemble(empty, empty, anatomies, bool(impression), [], language)
    if decomposer is not None:
        parts = decomposer(findings, impression, anatomies)
        return decomposition_from_texts(
            {a: _part(parts.get(a), 0) for a in anatomies},
            {a: _part(parts.get(a), 1) for a in anatomies},
            anatomies,
            has_impression=bool(impression),
        )
    unassigned: list[str] = []
    f_by = _assign(findings, anatomies, unassigned)
    i_by = _assign(impression, anatomies, unassigned)
    return _assemble(f_by, i_by, anatomies, bool(impression), unassigned, language)


def _part(value, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value if index == 0 else ""
    return _as_text(value[index]) if len(value) > index else ""


def decomposition_from_texts(
    findings_by_anatomy: Mapping[str, str],
    impression_by_anatomy: Mapping[str, str] | None,
    anatomies: Sequence[str] | None = None,
    has_impression: bool | None = None,
) -> ReportDecomposition:
    """Build a decomposition from per-anatomy texts (an LLM's output, fVLM's published files).

    ``impression_by_anatomy`` decides the ``abnormal`` flag (its text states an abnormality,
    negation-aware); ``None`` means no impression is known (the whole text decides instead).
    :func:`reference_decomposition` sets the reference's flag (any conclusion text) itself.
    """
    anatomies = list(anatomies or dict.fromkeys([*findings_by_anatomy, *(impression_by_anatomy or {})]))
    impression_by_anatomy = impression_by_anatomy or {}
    if has_impression is None:
        has_impression = bool(impression_by_anatomy)
    f_by = {a: split_sentences(_as_text(findings_by_anatomy.get(a))) for a in anatomies}
    i_by = {a: split_sentences(_as_text(impression_by_anatomy.get(a))) for a in anatomies}
    return _assemble(f_by, i_by, anatomies, has_impression, [], "en")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist; pass the path of fVLM's {path.name}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{what} file {path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(
            f"{what} file {path} must map scan id -> {{anatomy: text}} (fVLM's desc_info/conc_info layout)"
        )
    return data


def reference_caption(anatomy: str, description: str | None, conclusion: str | None) -> str:
    """An anatomy's training text as fVLM's CT-RATE dataset (``caption_datasets.py``) builds it
    from the decomposition files: the conclusion, or the normal template when there is none,
    then the description, each made to end with a period, concatenated without a space;
    quotes, apostrophes and parentheses removed. ``None`` means the anatomy is not in that
    file; an empty string in the file becomes ``"."`` there, as in the reference."""
    desc = "" if description is None else _as_text(description)
    if description is not None and not desc.endswith("."):
        desc += "."
    conc = "" if conclusion is None else _as_text(conclusion)
    if conclusion is not None and not conc.endswith("."):
        conc += "."
    if not conc:
        conc = normal_template(anatomy)
    return (conc + desc).translate(_STRIPPED)


def load_decomposition_files(
    desc_path: str | os.PathLike,
    conc_path: str | os.PathLike | None = None,
    anatomies: Sequence[str] | None = None,
) -> dict[str, ReportDecomposition]:
    """Load fVLM's published decompositions: ``desc_info.json`` (findings per anatomy) and
    ``conc_info.json`` (impression per anatomy), both ``{scan_id: {anatomy: text}}`` with scan
    ids like ``train_1_a`` (shared by the scan's reconstructions).

    With both files, texts and abnormal flags are the reference's (:func:`reference_caption`;
    abnormal: the text does not start with the normal template, i.e. the conclusion names the
    anatomy); a scan or anatomy missing from the files gets the normal template, as there.
    Without ``conc_path`` the rule-based texts and the negation-aware flag are used.
    ``anatomies`` defaults to the 4 CT-RATE anatomies.

    Returns:
        ``{scan_id: ReportDecomposition}`` for every scan id in either file.
    """
    desc = _read_json(Path(desc_path), "description (desc_info)")
    conc = _read_json(Path(conc_path), "conclusion (conc_info)") if conc_path is not None else None
    anatomies = list(anatomies or CTRATE_CATALOG.names)
    out = {}
    for scan in dict.fromkeys([*desc, *(conc or {})]):
        if conc is None:
            out[scan] = decomposition_from_texts(desc.get(scan, {}), None, anatomies, has_impression=False)
        else:
            out[scan] = reference_decomposition(desc.get(scan, {}), conc.get(scan, {}), anatomies)
    return out


def reference_decomposition(
    description: Mapping[str, str], conclusion: Mapping[str, str], anatomies: Sequence[str]
) -> ReportDecomposition:
    """One scan's entries of fVLM's decomposition files (``{anatomy: text}`` each; empty for a
    scan the files lack) as the reference trains on them: texts by :func:`reference_caption`,
    abnormal when the text does not start with the normal template."""
    dec = decomposition_from_texts(description, conclusion, anatomies, has_impression=True)
    for a in anatomies:
        dec.texts[a] = reference_caption(a, description.get(a), conclusion.get(a))
        dec.abnormal[a] = not dec.texts[a].startswith(normal_template(a))
    return dec
