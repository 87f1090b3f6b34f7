"""Rule-based, negation-aware extraction of the 18 CT-RATE abnormality labels from report text.

Each label has a pattern of medical phrasings (synonyms, plural/adjective forms, common
translation variants of CT-RATE's Turkish-to-English reports), optionally a site pattern that
must (``require``) or must not (``exclude``) occur in the same clause (a "nodule" of the thyroid
is not a lung nodule). A label is 1 when some clause mentions it and the mention is not negated
(:mod:`fvlm_core.reports.negation`; uncertain mentions count as present).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from fvlm_core.errors import InputError, ReportWarning
from fvlm_core.findings import CTRATE_LABEL_ANATOMY, CTRATE_LABELS
from fvlm_core.reports.negation import NEGATED, find_mentions, prepare
from fvlm_core.reports.sentences import clauses, looks_english, split_sentences

__all__ = [
    "LABEL_RULES",
    "LabelRule",
    "extract_labels",
    "label_mentions",
    "labels_by_anatomy",
    "score_labels",
]


@dataclass(frozen=True)
class LabelRule:
    """Phrasings of one label.

    Attributes:
        pattern: regex of the finding's phrasings (on prepared, lower-case text).
        require: regex that must also occur in the clause (site), or ``None``.
        exclude: regex that vetoes a mention when it occurs in the clause (other organ), or ``None``.
        sentence_require: like ``require`` but searched in the whole sentence.
        pseudo: label-specific phrases that look like negation but are not (blanked before the
            negation check).
    """

    pattern: re.Pattern
    require: re.Pattern | None = None
    exclude: re.Pattern | None = None
    sentence_require: re.Pattern | None = None
    pseudo: re.Pattern | None = None


def _rx(s: str) -> re.Pattern:
    return re.compile(s)


_NON_LUNG_ORGAN = (
    r"\b(?:thyroid|adrenal|liver|hepatic|kidney|renal|spleen|splenic|pancrea|breast|axilla|gland|lymph|"
    r"mediastin|bone|vertebra|ribs?\b|gallbladder|stomach|gastric|soft tissue|muscle|esophag|skin)"
)

# "thickening", "thickness increase", "increase in thickness", "prominence".
_THICK = r"(?:thicken\w*|thickness(?: \w+){0,2} increas\w*|increas\w*(?: \w+){0,3} thickness|prominen\w*)"

LABEL_RULES: dict[str, LabelRule | tuple[LabelRule, ...]] = {
    "Medical material": LabelRule(
        _rx(
            r"\bcatheters?\b|\bstents?\b|\bstented\b|pacemaker|\bport\b|\b(?:chest|drainage|drain|nasogastric|"
            r"endotracheal|tracheostomy|thoracostomy|feeding|gastrostomy|tracheal|intubation) (?:tube|cannula)s?\b|"
            r"\bcannula\b|prosthe(?:sis|tic|ses)|\bsutures?\b|(?:sternotomy|sternal|surgical|metallic|metal) "
            r"(?:wires?|sutures?|clips?|implants?|materials?|plates?|screws?)|\bwires?\b|\bclips?\b|"
            r"(?:breast|silicone|metallic|dental|cochlear|orthopedic|penile) implants?\b|"
            r"\bgrafts?\b|\belectrodes?\b|\bleads?\b|\bdefibrillator\b|\bicd\b|\bcoils?\b|\bfilter\b|valve "
            r"replacement|\bscrews?\b|\bplates?\b|fixation|\bcabg\b|\bbypass\b|\bdrains?\b|\btubes?\b|"
            r"medical (?:device|material)|\bmaterials? (?:for|secondary|related) |embolization material|"
            r"\bexpander\b|\bspacer\b|\bcerclage\b|\bshunt\b"
        ),
        exclude=_rx(r"contrast material|calcul|\btube current|bronch|end ?plate|plate like"),
    ),
    # Calcification / atheroma of a non-coronary artery of the chest (CT-RATE is a chest set: the
    # annotators left abdominal-aorta-only and aortic-valve calcifications out).
    "Arterial wall calcification": LabelRule(
        _rx(r"atherom\w*|atheroscler\w*|calcif\w*|calcium|plaques?"),
        require=_rx(
            r"(?<!abdominal )aort(?!ic valve|o ?pulmonary|a ?pulmonary|ic window)|\barch\b|carotid|subclavian|"
            r"brachiocephalic|(?<!coronary )(?:arter|vascular|vessel|venous)"
        ),
        exclude=_rx(r"lymph|nodul|valve|pleura|lung|pericard"),
    ),
    "Cardiomegaly": LabelRule(
        _rx(
            r"cardiomegal|(?:heart|cardiac)(?: \w+){0,3} (?:sizes?|dimensions?|volume|silhouette|shadow)"
            r"(?: \w+){0,3} (?:increased|enlarged)|(?:heart|cardiac) (?:is|was|appears) (?:\w+ )?"
            r"(?:larger|enlarged|large)|increased? in (?:the )?(?:heart|cardiac) (?:sizes?|dimensions?)|"
            r"(?:ctr|cardiothoracic (?:ratio|index))(?: \w+){0,3} increase|increased?(?: \w+){0,3} "
            r"(?:ctr|cardiothoracic (?:ratio|index))|enlargement of the heart|(?:enlarged|large) heart"
        ),
        exclude=_rx(r"(?<!than )\bnormal\b|chamber|atri(?:um|a|al)\b|ventric"),
    ),
    "Pericardial effusion": LabelRule(
        _rx(
            r"pericardi\w*(?: \w+){0,2} (?:effusion|fluid)|(?:effusion|fluid)(?: \w+){0,8} pericardi|hemopericard|"
            r"pericardial effusion thickening"
        ),
    ),
    "Coronary artery wall calcification": LabelRule(
        _rx(r"coronar\w*|\b(?:lad|lcx|rca|cx|lmca)\b|(?:left )?anterior descending|circumflex|left main"),
        sentence_require=_rx(r"calcif|atherom|plaque|atheroscler"),
    ),
    "Hiatal hernia": LabelRule(_rx(r"hiat(?:al|us) hernia|hernia(?: \w+){0,4} hiat|paraesophageal hernia")),
    "Lymphadenopathy": LabelRule(
        _rx(
            r"lymphadenopath|\blaps?\b|lymph nodes?(?! stations?)|\blns?\b|adenopath|lymph nodular|conglomerat"
        ),
        # CT-RATE's annotators mark any stated lymph node, including "nodes that did not reach
        # pathological size": such size qualifiers do not negate the node itself.
        pseudo=_rx(
            r"(?:did|do|does|has|have|had)? ?not (?:reach\w*|exceed\w*|meet\w*)(?: the)? (?:pathologic\w*|significant)|"
            r"(?:is|are|was|were)? ?not (?:observed |seen |detected )?(?:in |of |at )?(?:pathologic\w*|significant) "
            r"(?:size|dimension|appearance|configuration)"
        ),
    ),
    "Emphysema": LabelRule(_rx(r"emphysem|\bbullae?\b|bullous|blebs?\b")),
    # "Fibroatelectasis" is a fibrotic sequela, not atelectasis; "collapse fracture" is bone.
    "Atelectasis": LabelRule(
        _rx(r"(?<!fibro)(?<!fibro )atelecta|collapse"), exclude=_rx(r"fracture|vertebra|corpus|bone")
    ),
    # "nodular" as an adjective of another pattern (nodular consolidation / ground glass /
    # thickening, reticulonodular) is not a nodule; nodules of other organs or the pleura neither.
    "Lung nodule": LabelRule(
        _rx(
            r"(?<!reticulo)(?:micro)?nodules?\b|(?<!reticulo)(?<!multi)(?:micro)?nodular (?:lesions?|appearances?|"
            r"formations?|structures?|images?|foci|focus|pattern|densit(?:y|ies)(?! increas)|opacit(?:y|ies))|"
            r"(?:centri|centr|centro)\w*(?:acinar|lobular) nodul"
        ),
        exclude=_rx(
            _NON_LUNG_ORGAN
            + r"|(?<!sub)pleural (?:nodul|plaque)|nodul\w*(?: lesions?)? (?:in|of|on) the pleura\b"
        ),
    ),
    "Lung opacity": (
        LabelRule(
            _rx(r"ground glass|opacit|infiltrat|crazy paving|\bgga\b|dep[ae]nd[ae]nt densit"),
            exclude=_rx(
                r"fat|mesenter|liver|hepat|bone|sclero|soft tissue|muscle|kidney|breast|spleen|pancrea|adrenal|thyroid"
            ),
        ),
        # "Density increase" is an opacity unless it is a sequela / band / atelectasis density.
        LabelRule(
            _rx(r"density increase|increased density|densit(?:y|ies)(?: \w+){0,2} increas"),
            exclude=_rx(
                r"fat|mesenter|liver|hepat|bone|sclero|soft tissue|muscle|kidney|breast|spleen|pancrea|adrenal|thyroid|sequel|"
                r"fibro|pleuroparenchymal|pleural parenchymal|\bband|linear|atelecta"
            ),
        ),
    ),
    "Pulmonary fibrotic sequela": LabelRule(
        _rx(
            r"fibro\w*|sequel\w*|(?:parenchymal|subpleural|pleural|fibrotic|linear) bands?|band like|"
            r"band atelect|linear (?:density|densities)|scar\w*|honeycomb\w*|volume loss|"
            r"pleuro ?parenchymal(?! fat)"
        ),
        exclude=_rx(
            r"fibroadenoma|fibroid|fibrous dysplasia|fibroma|fibrocystic|"
            r"\b(?:liver|hepat\w*|breast|kidneys?|renal|spleen|splenic|humer\w*|fracture|bones?|rib|ribs|"
            r"vertebra\w*|femur|clavicle|thyroid|pancrea\w*|adrenal|colon|stomach|mesenter\w*)\b"
        ),
    ),
    "Pleural effusion": LabelRule(
        _rx(r"pleural effusion|pleural fluid|hydrothorax|hydropneumothorax|hydropnomothorax|effusion"),
        exclude=_rx(
            r"pericard|perirenal|perinephric|renal|kidney|spleen|splenic|subcapsular|liver|hepat|joint|"
            r"abdom|pelvi|peritoneal|subcutaneous|fatty tissue"
        ),
    ),
    "Mosaic attenuation pattern": LabelRule(_rx(r"mosaic|air trapping")),
    "Peribronchial thickening": LabelRule(
        _rx(
            rf"peribronch\w*(?: \w+){{0,4}} {_THICK}|bronch\w* walls?(?: \w+){{0,2}} {_THICK}|"
            rf"{_THICK}(?: \w+){{0,5}} (?:peribronch|bronch\w* wall)|peribronchial cuffing|"
            rf"peribronchovascular (?:sheath|interstitium)(?: \w+){{0,3}} (?:{_THICK}|calibration increase)"
        ),
    ),
    "Consolidation": LabelRule(_rx(r"consolidat")),
    "Bronchiectasis": LabelRule(_rx(r"bronchiecta|bronchiolecta")),
    "Interlobular septal thickening": LabelRule(
        _rx(
            rf"(?:interlobular|interlobar|septal|septa|septum|septae)(?: \w+){{0,2}} {_THICK}|"
            rf"{_THICK}(?: \w+){{0,4}} (?:interlobular |interlobar )?sept|interlob(?:ular|ar) sept\w*|crazy paving"
        ),
    ),
}


def _split(text: str) -> list[tuple[str, list[str]]]:
    """Prepared sentences, each with its clauses (computed once per report, shared by all labels)."""
    out = []
    for sentence in split_sentences(text):
        sent = prepare(sentence)
        out.append((sent, clauses(sent)))
    return out


def _mentions(parts: list[tuple[str, list[str]]], label: str) -> list:
    rules = LABEL_RULES[label]
    rules = rules if isinstance(rules, tuple) else (rules,)
    found = []
    for sent, sent_clauses in parts:
        for clause in sent_clauses:
            for rule in rules:
                if rule.sentence_require is not None and not rule.sentence_require.search(sent):
                    continue
                if rule.require is not None and not rule.require.search(clause):
                    continue
                if rule.exclude is not None and rule.exclude.search(clause):
                    continue
                text_for_cues = clause
                if rule.pseudo is not None:  # keep offsets: blank, don't delete
                    text_for_cues = rule.pseudo.sub(lambda m: "~" * len(m.group(0)), clause)
                mentions = find_mentions(text_for_cues, rule.pattern)
                if mentions and _required_term_negated(rule, clause, sent):
                    # "coronary arteries show no calcification": the site is stated, the finding denied
                    mentions = [replace(m, status=NEGATED) for m in mentions]
                found.extend(mentions)
    return found


def _required_term_negated(rule: LabelRule, clause: str, sentence: str) -> bool:
    """True when every mention of the rule's required term (the finding word of a site rule) is negated."""
    required = rule.require if rule.require is not None else rule.sentence_require
    if required is None:
        return False
    where = clause if required.search(clause) else sentence
    statuses = [m.status for m in find_mentions(where, required)]
    return bool(statuses) and all(st == NEGATED for st in statuses)


def label_mentions(text: str, label: str) -> list:
    """Mentions (:class:`~fvlm_core.reports.negation.Mention`) of ``label`` in ``text``, with status."""
    return _mentions(_split(text), label)


def extract_labels(
    text: str, labels: Iterable[str] = CTRATE_LABELS, on_bad_report: str = "warn"
) -> dict[str, int]:
    """The CT-RATE finding labels a report states: ``{label: 0/1}`` in CT-RATE order.

    A label is 1 when at least one mention is not negated (uncertain mentions count).
    Empty text (or ``None`` / NaN) gives all zeros. Non-English text gives all zeros and a
    :class:`~fvlm_core.errors.ReportWarning` (``on_bad_report="warn"``), an
    :class:`~fvlm_core.errors.InputError` (``"error"``) or nothing (``"ignore"``).
    """
    labels = list(labels)
    unknown = [lbl for lbl in labels if lbl not in LABEL_RULES]
    if unknown:
        raise InputError(f"unknown CT-RATE label(s) {unknown} (known: {', '.join(CTRATE_LABELS)})")
    if text is None or (isinstance(text, float) and text != text):
        text = ""
    if not isinstance(text, str):
        raise InputError(f"report text must be a string, got {type(text).__name__}")
    if text.strip() and not looks_english(text):
        msg = "report does not look like English text; all labels set to 0 (translate it first)"
        if on_bad_report == "error":
            raise InputError(msg)
        if on_bad_report == "warn":
            warnings.warn(msg, ReportWarning, stacklevel=2)
        return dict.fromkeys(labels, 0)
    parts = _split(text)
    return {lbl: int(any(m.status != NEGATED for m in _mentions(parts, lbl))) for lbl in labels}


def score_labels(gold, pred, labels: Sequence[str] = CTRATE_LABELS) -> dict:
    """Per-label F1 / precision / recall / support and the macro F1 (sklearn ``f1_score``).

    Args:
        gold, pred: ``{label: sequence of 0/1}`` (or any table indexed by column name) holding
            ``labels``, rows in the same order.

    Returns:
        ``{"n": rows, "per_label": {label: {"f1", "precision", "recall", "support"}},
        "macro_f1": float, "min_f1": float}``.
    """
    from sklearn.metrics import f1_score, precision_score, recall_score

    per_label = {}
    for lbl in labels:
        y, p = [int(v) for v in gold[lbl]], [int(v) for v in pred[lbl]]
        per_label[lbl] = {
            "f1": float(f1_score(y, p, zero_division=0)),
            "precision": float(precision_score(y, p, zero_division=0)),
            "recall": float(recall_score(y, p, zero_division=0)),
            "support": int(sum(y)),
        }
    f1s = [v["f1"] for v in per_label.values()]
    n = len(next(iter(gold[lbl] for lbl in labels))) if labels else 0
    return {"n": n, "per_label": per_label, "macro_f1": float(sum(f1s) / len(f1s)), "min_f1": float(min(f1s))}


def labels_by_anatomy(labels: Mapping[str, int | bool]) -> dict[str, frozenset[str]]:
    """Positive labels grouped by the anatomy fVLM scores them on (``CTRATE_LABEL_ANATOMY``).

    Every anatomy of the mapping appears (empty set when none); labels without an anatomy
    (Medical material, Lymphadenopathy) are left out.
    """
    groups: dict[str, set[str]] = {a: set() for a in dict.fromkeys(CTRATE_LABEL_ANATOMY.values())}
    for label, value in labels.items():
        anatomy = CTRATE_LABEL_ANATOMY.get(label)
        if anatomy is not None and value:
            groups[anatomy].add(label)
    return {a: frozenset(s) for a, s in groups.items()}
