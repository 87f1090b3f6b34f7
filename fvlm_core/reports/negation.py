"""Negation and uncertainty cues (NegEx-style, clause-scoped) for radiology report text.

A mention of a term in a clause is ``"negated"`` when a negation cue precedes it in the clause
("no", "without", "absence of", "negative for", "free of") or follows it ("was not observed",
"was not detected", "is not seen", "within normal limits"), ``"uncertain"`` when a hedge applies
("cannot be excluded", "suspicious for", "possible", "?"), else ``"positive"``.

Decision (documented): an *uncertain* mention counts as a mention of the finding, i.e. as
positive, for finding labels and for the negation-aware abnormality of an anatomy. CT-RATE's
manual labels mark hedged findings ("... cannot be excluded", "... compatible with ...") as
present, and for training texts a hedged finding is still an abnormal description.

Pseudo-negations ("no significant change", "not present in the previous examination") are
removed before cue detection: they deny a change, not the finding; unless the mention itself is
the change ("No increase in heart size": the increase is the finding, and it is denied). A
negation inside the mention negates it ("The heart is not enlarged" matched as one phrase), and
"negative" after a finding denies it ("Lung nodule negative.").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NEGATED", "POSITIVE", "UNCERTAIN", "Mention", "classify", "find_mentions", "prepare"]

POSITIVE, NEGATED, UNCERTAIN = "positive", "negated", "uncertain"

_PSEUDO = re.compile(
    r"\bno (?:significant |marked |apparent |obvious |evident )?(?:change|difference|progression|regression|"
    r"increase|decrease|interval change)s?\b|\bnot (?:changed|significantly changed)\b|"
    r"\b(?:was|were|is|are)? ?not (?:present|seen|observed|detected|visible) (?:in|on|at) the (?:previous|prior|former)"
    r"|\bno longer\b|\bnot only\b|\bgram negative\b",
)
# Cues that deny what follows them in the clause.
_PRE_NEG = re.compile(
    r"\b(?:no|not|without|absence of|absent|negative for|free of|neither|nor|rather than|instead of|"
    r"none of|ruled out|exclude[ds]?)\b",
)
# Cues that deny what precedes them in the clause.
_POST_NEG = re.compile(
    r"\b(?:(?:was|were|is|are|has been|have been|could|can|did|does|do) )?not (?:\w+ )?"
    r"(?:observed|detected|seen|identified|noted|found|present|evident|visuali[sz]ed|monitored|determined|"
    r"demonstrated|appreciated|considered|described|encountered|shown|reach(?:ed)?|exceed(?:ed)?|reaching|"
    r"pathologic(?:al)?|significant|enlarged|increased|remarkable|noticeable|distinguished|included)\b"
    r"|\b(?:is|are|was|were) (?:absent|normal|unremarkable|natural)\b|\bwithin normal limits\b|\bnot available\b"
    r"|\b(?:completely|totally|entirely|fully) (?:regressed|resolved|disappeared)\b|\b(?:full|complete|total|significant) regression\b"
    r"|\b(?:have|has|had|appears? to be|appeared to be|is|are|was|were) (?:\w+ )?regressed\b"
    r"|\b(?:was|were|has been|have been) removed\b|\bresolved\b|\bdisappeared\b"
    r"|\bnegative\b(?!\s+for\b)",
)
# A cue inside the matched phrase itself ("heart is not enlarged", "size was not increased").
_INNER_NEG = re.compile(r"\b(?:no|not|without)\b")
# Hedges: the finding is possible. "cannot be excluded" is checked (and blanked) before negation
# because it holds "not"; weak hedges ("compatible with") only apply when nothing negates.
_STRONG_UNCERTAIN = re.compile(
    r"\b(?:can ?not|could not|cannot|may not|not) be (?:excluded|ruled out|distinguished|differentiated)\b|"
    r"\bnot excluded\b|\b(?:cannot|could not|can not) rule out\b"
)
_UNCERTAIN = re.compile(
    r"\b(?:suspicious|suspected|suspicion|possible|possibly|probable|probably|likely|"
    r"questionable|equivocal|consistent with|compatible with|suggestive of|suggesting|favou?r(?:ing)?|"
    r"differential diagnosis|may|might|could)\b|\?",
)


def prepare(text: str) -> str:
    """Lower-case and normalise hyphenation/whitespace for matching ("ground-glass" -> "ground glass")."""
    text = (text or "").lower()
    text = re.sub(r"(?<=[a-z])[-‐/](?=[a-z])", " ", text)
    return re.sub(r"\s+", " ", text)


@dataclass(frozen=True)
class Mention:
    """A term found in a clause and its status (``positive``, ``negated`` or ``uncertain``)."""

    term: str
    start: int
    status: str
    clause: str


def _blank_pseudo(clause: str, start: int, end: int) -> str:
    """The clause with its pseudo-negations blanked, except one that overlaps the mention."""

    def blank(m: re.Match) -> str:
        overlaps = m.start() < end and start < m.end()
        return m.group(0) if overlaps else "~" * len(m.group(0))

    return _PSEUDO.sub(blank, clause)


def classify(clause: str, start: int, end: int) -> str:
    """Status of the term at ``clause[start:end]`` (``clause`` already :func:`prepare`-d)."""
    clean = _blank_pseudo(clause, start, end)
    if _STRONG_UNCERTAIN.search(clean):
        return UNCERTAIN
    before, inside, after = clean[:start], clean[start:end], clean[end:]
    if _PRE_NEG.search(before) or _INNER_NEG.search(inside) or _POST_NEG.search(after):
        return NEGATED
    if _UNCERTAIN.search(clean):
        return UNCERTAIN
    return POSITIVE


def find_mentions(clause: str, pattern: re.Pattern) -> list[Mention]:
    """All matches of ``pattern`` in a prepared clause, each with its negation status."""
    return [
        Mention(m.group(0), m.start(), classify(clause, m.start(), m.end()), clause)
        for m in pattern.finditer(clause)
    ]
