"""Anatomy lexicon: the words a report uses for each anatomy of the catalogs.

``STRONG`` terms name an anatomy (or a finding that only occurs there: "emphysema" -> lung,
"hiatal hernia" -> esophagus). ``WEAK`` terms ("lobe", "parenchyma", "segment", "nodule";
"atherosclerosis") point to their anatomy only when the sentence names no organ at all ("right
lobe of the thyroid", "liver parenchyma", "coronary atherosclerosis" stay off lung/aorta).
Patterns run on :func:`fvlm_core.reports.negation.prepare`-d (lower-case) text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fvlm_core.anatomy import EXTENDED_CATALOG

__all__ = ["STRONG", "WEAK", "anatomies_in", "anatomy_title"]

STRONG: dict[str, str] = {
    "lung": (
        r"\blungs?\b|\bpulmonary(?! arter| trunk| conus| vein| veno| embol| valve| hypertension)|\bpleura\w*|"
        r"pleuroparenchymal|\bbronch(?:i|us|ial|iol\w*|iectasis|iectatic|ovascular|ogram\w*|opneumon\w*)\b|"
        r"peribronch\w*|alveol\w*|interstiti\w*|pneumo(?:n\w*|thorax|nia|nitis)|hemithora\w*|hydrothorax|"
        r"atelecta\w*|emphysem\w*|\bbullae?\b|ground glass|consolidat\w*|lingula\w*|fissur\w*|subpleural|"
        r"(?:interlobular|interlobar) sept\w*|septal thicken\w*|mosaic|honeycomb\w*|infiltrat\w*|"
        r"\blobes?\b(?= of the (?:right|left|both) lungs?)|(?:upper|middle|lower) lobes?|micronodul\w*|"
        r"parenchymal bands?|tree in bud|budding tree|crazy paving|air trapping|\bcovid\w*"
    ),
    "heart": (
        r"\bheart\b|cardi(?:ac|o\w*|um|omegal\w*)|pericardi\w*|coronar\w*|\batri(?:um|a|al)\b|biatrial|ventric\w*|"
        r"myocard\w*|\bctr\b|(?:aortic|mitral|tricuspid|pulmonary) valve|\b(?:lad|lcx|rca)\b|"
        r"interatrial|interventricular|epicardi\w*"
    ),
    "esophagus": r"(?<!para)o?esophag\w*|hiat(?:al|us)(?: hernia)?|gastro ?esophageal|paraesophageal hernia",
    "aorta": (
        r"\baort(?:a|ic)\b(?! valve| window| ?pulmonary)|aortic arch|\barcus\b|thoracoabdominal aorta|"
        r"mediastinal (?:main |major )?(?:vascular|vessel)\w*|(?:great|main|major) vessels|"
        r"(?<!coronary )(?<!pulmonary )(?:vascular|vessel) structures|"
        r"(?:brachiocephalic|subclavian|carotid) arter\w*|brachiocephalic trunk"
    ),
    "trachea": r"(?<![a-z])trache(?:a|al)\b(?! tube)|\bmain bronch\w*|carina\b",
    "pulmonary_artery": (
        r"pulmonary (?:arter\w*|trunk|conus|embol\w*)|pulmonary thromboembol\w*|\bpa diameter|main pulmonary"
    ),
    "liver": (
        r"\bliver\b|hepat(?!ic flexure)\w*|hepatomegal\w*|hepatosteatos\w*|steatos\w*|\bportal vein|"
        r"periportal|bile ducts?|biliary|choledoch\w*|pneumobilia"
    ),
    "gallbladder": r"gall ?bladder|cholecyst\w*|cholelith\w*|bile sludge",
    "spleen": r"\bspleen\b|splen(?!ic flexure)\w*",
    "pancreas": r"pancrea\w*",
    "stomach": r"\bstomach\b|\bgastric\b|perigastric|\bfundus\b|pylor\w*",
    "kidney": r"\bkidneys?\b|(?<!ad)\brenal\b|perirenal|nephr\w*|pelvicalyceal|pyelo\w*|calyx|calyces|ureter\w*",
    "adrenal_gland": r"adrenal\w*|surrenal",
    "small_bowel": r"small (?:bowel|intestin\w*)|duoden\w*|jejun\w*|\bile(?:um|al)\b|bowel loops",
    "colon": r"\bcolon\w*|sigmoid|cec(?:um|al)|\brect(?:um|al)\b|(?:hepatic|splenic) flexure|diverticul\w*",
    "urinary_bladder": r"(?<!gall)(?<!gall )\bbladder\b|vesical\b",
    "thyroid_gland": r"thyroid\w*|goiter|goitre",
    "prostate": r"prostat\w*",
    "bone": (
        r"\bbones?\b|osseous|vertebra\w*|\bribs?\b|costal|stern(?:um|al|otomy)|\bspin(?:e|al)\b|scoliosis|"
        r"kyphos\w*|osteophyt\w*|spondyl\w*|clavic\w*|scapul\w*|humer\w*|femor\w*|femur|sacr(?:um|al)|"
        r"\bcorpus\b|vertebral corpus|end ?plates?|lytic|blastic|fractur\w*|schmorl|osteo\w*"
    ),
}

WEAK: dict[str, str] = {
    "lung": r"\blob(?:e|es|ar)\b|parenchym\w*|\bsegment\w*|nodul\w*|\bapical\b|\bapex\b|\bbasal\b|effusion",
    # A bare "Atherosclerosis." / "aneurysmatic dilatation" in a chest report is about the aorta.
    "aorta": r"atheroscler\w*|atherom\w*|aneurysm\w*",
}

_STRONG_RX = {a: re.compile(p) for a, p in STRONG.items()}
_WEAK_RX = {a: re.compile(p) for a, p in WEAK.items()}


def anatomy_title(name: str) -> str:
    """Display name used in the normal template ("Lung", "Pulmonary artery")."""
    if name in EXTENDED_CATALOG:
        return EXTENDED_CATALOG[name].title
    return name.replace("_", " ").capitalize()


def anatomies_in(text: str, anatomies: Sequence[str]) -> list[str]:
    """Anatomies (of ``anatomies``, in that order) that a prepared sentence speaks of.

    Anatomies with no lexicon entry match their own name ("left_atrium" -> "left atrium").
    """
    strong = []
    for a in anatomies:
        rx = _STRONG_RX.get(a) or re.compile(r"\b" + re.escape(a.replace("_", " ")) + r"\w*")
        if rx.search(text):
            strong.append(a)
    # Weak terms count only when no other *known* organ is named (any catalog anatomy, so that
    # "liver parenchyma" stays off the lung even in a 4-anatomy decomposition).
    others = [a for a, rx in _STRONG_RX.items() if rx.search(text)]
    for a in anatomies:
        if a in strong or a not in _WEAK_RX:
            continue
        if not others and _WEAK_RX[a].search(text):
            strong.append(a)
    order = {a: i for i, a in enumerate(anatomies)}
    return sorted(strong, key=order.__getitem__)
