"""Sentence and clause splitting for English radiology reports (CT-RATE style).

CT-RATE reports are machine-translated Turkish reports: long sentences, ``;`` used as a colon,
impression items separated by ``"`` or bullets (``•``, ``·``), measurements such as ``3.3 cm``.
Splitting is rule-based and conservative: a period ends a sentence only when followed by space
or end of text (so decimals survive) and not after a known abbreviation.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["clauses", "looks_english", "normalize", "split_sections", "split_sentences"]

_ABBREVIATIONS = ("e.g", "i.e", "approx", "vs", "dr", "fig", "cf")
# Item separators used in CT-RATE impressions: quotes, bullets, numbered items.
_ITEM_BREAK = re.compile(r"\s*(?:[\"“”•·▪●]|\s-\s(?=[A-Z])|\n\s*\n|\n\s*(?:\d+[.)]|[-*])\s+)\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_SECTION_HEADER = re.compile(
    r"^\s*(?P<name>findings?|impressions?|conclusions?|results?|opinion|diagnosis|"
    r"clinical information|technique|comparison|indication|history)\s*[:\-]\s*",
    re.IGNORECASE | re.MULTILINE,
)


def normalize(text: str) -> str:
    """Unicode-normalise, unify quotes/dashes and whitespace; keep case."""
    text = unicodedata.normalize("NFKC", text or "")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2013", "-").replace("\u2014", "-")
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Returns:
        list of stripped, non-empty sentences (trailing period kept) in reading order.
    """
    text = normalize(text)
    out: list[str] = []
    for item in _ITEM_BREAK.split(text):
        parts = _SENTENCE_END.split(item)
        buf = ""
        for part in parts:
            buf = f"{buf} {part}".strip() if buf else part.strip()
            last = buf.rsplit(" ", 1)[-1].rstrip(".").lower()
            if buf.endswith(".") and (last in _ABBREVIATIONS and not buf.endswith("..")):
                continue  # "approx. 3 mm": not a sentence end
            if buf.strip(" .;,?"):
                out.append(buf)
            buf = ""
        if buf.strip(" .;,?"):
            out.append(buf)
    return out


# A clause ends at ";" / ":" , at contrast words, and at "and"/"," that open a new statement, so
# that a negation in one statement does not reach a finding in the next
# ("calibration was normal and no wall thickening" / "no wall thickening, and there are sutures").
_CLAUSE_BREAK = re.compile(
    r"\s*[;:]\s*|\s*,?\s+(?:but|however|although|though|whereas|while|except|apart from|other than)\b[\s,]*"
    r"|\s*,?\s+and\s+(?=(?:no|there|a|an|the|in|on|at|it|its|is|are|was|were|also|both|bilateral|"
    r"several|multiple|mild|minimal|millimetric)\b)|\s*,\s+(?=(?:there|a|an|its|it)\s)",
    re.IGNORECASE,
)


def clauses(sentence: str) -> list[str]:
    """Split one sentence into clauses (the scope of a negation cue)."""
    return [c for c in (p.strip(" ,.") for p in _CLAUSE_BREAK.split(sentence)) if c]


def split_sections(text: str) -> tuple[str, str]:
    """Split a free-text report into ``(findings, impression)``.

    Recognises headers such as ``Findings:`` and ``Impression:`` / ``Conclusion:``. Text
    before any header, and reports without headers, count as findings (impression ``""``).
    Clinical information / technique sections are dropped.
    """
    text = text or ""
    matches = list(_SECTION_HEADER.finditer(text))
    if not matches:
        return text.strip(), ""
    findings: list[str] = [text[: matches[0].start()].strip()]
    impression: list[str] = []
    for m, nxt in zip(matches, [*matches[1:], None]):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        name = m.group("name").lower()
        if name.startswith(("impression", "conclusion", "opinion", "diagnosis")):
            impression.append(body)
        elif name.startswith(("finding", "result")):
            findings.append(body)
    return " ".join(f for f in findings if f), " ".join(i for i in impression if i)


# English function words and report vocabulary that other languages do not share (so "no",
# "normal", "pleural" are left out: Spanish and German reports use them too).
_EN_WORDS = frozenset(
    [
        "the",
        "of",
        "in",
        "is",
        "are",
        "was",
        "were",
        "and",
        "with",
        "to",
        "both",
        "there",
        "on",
        "at",
        "which",
        "as",
        "by",
        "be",
        "or",
        "this",
        "that",
        "from",
        "than",
        "not",
        "for",
        "except",
        "within",
        "when",
        "compared",
        "observed",
        "detected",
        "seen",
        "right",
        "left",
        "lung",
        "lungs",
        "heart",
        "size",
        "it",
        "its",
        "has",
        "have",
        "been",
        "examination",
        "limits",
        "emphysema",
        "emphysematous",
        "atelectasis",
        "atelectatic",
        "nodule",
        "nodules",
        "nodular",
        "effusion",
        "hernia",
        "hiatal",
        "consolidation",
        "consolidations",
        "opacity",
        "opacities",
        "bronchiectasis",
        "cardiomegaly",
        "calcification",
        "calcifications",
        "calcified",
        "calcific",
        "thickening",
        "thickenings",
        "lymph",
        "node",
        "nodes",
        "ground",
        "glass",
        "changes",
        "change",
        "areas",
        "area",
        "mild",
        "minimal",
        "appearance",
        "sequelae",
        "sequela",
        "pneumonia",
        "infiltration",
        "plaques",
        "plaque",
        "atheroma",
        "atherosclerotic",
        "density",
        "densities",
        "increase",
        "increased",
        "millimetric",
        "segment",
        "segments",
        "lobe",
        "lobes",
        "upper",
        "lower",
        "middle",
        "bilateral",
        "mass",
        "lesion",
        "lesions",
        "findings",
        "finding",
        "enlarged",
        "dilatation",
        "aortic",
        "aorta",
        "coronary",
        "arteries",
        "artery",
        "pericardial",
        "thyroid",
        "liver",
        "kidney",
        "kidneys",
        "spleen",
        "degenerative",
        "bone",
        "structures",
        "hepatosteatosis",
        "cyst",
        "small",
        "large",
        "diffuse",
        "focal",
        "multiple",
        "several",
        "recommended",
        "evaluation",
        "compatible",
        "consistent",
        "chest",
        "thorax",
        "thoracic",
    ]
)


def looks_english(text: str) -> bool:
    """Heuristic: ``True`` for English report text, ``False`` for other languages or noise.

    At most 10% of the letters are outside ASCII, and, for texts of 8 words or more, at least
    20% of the words are English function words or English report vocabulary (CT-RATE reports:
    32-54% for whole reports, impressions rarely below 25%). Shorter ASCII texts pass: a few
    words ("Hiatal hernia.") cannot be told apart reliably.
    """
    words = re.findall(r"[^\W\d_]+", (text or "").lower())
    if not words:
        return False
    letters = "".join(words)
    if sum(1 for ch in letters if ord(ch) > 127) / len(letters) > 0.10:
        return False
    if len(words) < 8:
        return True
    return sum(w in _EN_WORDS for w in words) / len(words) >= 0.20
