"""User findings from a ``--prompts`` file: read, checked and merged with the model's findings.

Kept apart from the analyzer (no torch import), so a bad prompts file is refused in a moment,
before the model is loaded. Entries are ``{name, anatomy, positive, negative}``; wordings left
out get the defaults (``"{X}."`` / ``"Not {X}."``) and a warning says so; a user finding named
like one of the model's replaces it, with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fvlm_core.errors import ConfigError, InputError, warn
from fvlm_core.findings import Finding, FindingSet, name_key


def wording(f: Finding) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """What a calibrated threshold belongs to: the anatomy and both wordings."""
    return (f.anatomy, tuple(f.positive), tuple(f.negative))


_FINDING_KEYS = ("name", "anatomy", "positive", "negative")


def _user_finding(d: Any, i: int, path: Path) -> Finding:
    """Entry ``i`` (1-based) of a prompts file as a user :class:`Finding`; wordings left out get
    the defaults, with a warning."""
    where = f"--prompts {path}: entry {i}"
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} is not a mapping with name and anatomy")
    unknown = sorted(set(map(str, d)) - set(_FINDING_KEYS))
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(_FINDING_KEYS)}); "
            "check their spelling"
        )
    for key in ("name", "anatomy"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ConfigError(f"{where} needs a {key} (text), got {d.get(key)!r}")
    for key in ("positive", "negative"):
        value = d.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise ConfigError(f"{where}: {key} must be a text or a list of texts, got {value!r}")
    finding = Finding.from_dict({**d, "source": "user"})
    missing = [k for k in ("positive", "negative") if not d.get(k)]
    if missing:
        defaults = [repr(w) for k in missing for w in getattr(finding, k)]
        warn(
            f"{where} ({finding.name!r} on {finding.anatomy}) gives no {' or '.join(missing)} wording, so "
            f"the default {' / '.join(defaults)} {'is' if len(defaults) == 1 else 'are'} used. Add "
            f"{' and '.join(missing)}: [...] to the entry to choose the wording."
        )
    return finding


def merge_findings(defaults: FindingSet, user: FindingSet) -> FindingSet:
    """The model's findings with the user's added; a user finding named like a built-in one
    replaces it (in its place), with a warning saying so."""
    by_name = {f.name: f for f in user}
    mine = {name_key(f.name): f.name for f in defaults}
    alike = [(mine[name_key(n)], n) for n in by_name if name_key(n) in mine and mine[name_key(n)] != n]
    if alike:
        shown = "; ".join(f"{n!r} (the model's {m!r})" for m, n in alike)
        raise ConfigError(
            f"--prompts: {shown} differ from the model's findings only in case, spaces or punctuation. "
            "Use the model's exact name to replace its finding, or a name that differs in its letters or "
            "digits to score both."
        )
    out, replaced = [], []
    for f in defaults:
        mine = by_name.pop(f.name, None)
        if mine is None:
            out.append(f)
            continue
        out.append(mine)
        replaced.append((f, mine))
    for old, new in replaced:
        same = wording(old) == wording(new)
        warn(
            f"--prompts: {new.name!r} replaces the model's finding of that name "
            f"({old.anatomy}: {' / '.join(old.positive + old.negative)})"
            + ("" if same else f" with yours ({new.anatomy}: {' / '.join(new.positive + new.negative)})")
            + ". Rename yours to score both."
        )
    return FindingSet(out + [f for f in user if f.name in by_name])


def load_findings_file(path: str | os.PathLike) -> FindingSet:
    """Read user findings from JSON or YAML: a list of Finding dicts (name, anatomy, optional
    positive / negative wordings), or ``{"findings": [...]}``.

    Wordings left out get the defaults (``"{X}."`` / ``"Not {X}."``) with an
    :class:`~fvlm_core.errors.FVLMWarning`.

    Raises:
        InputError: the file cannot be read or is not UTF-8 text.
        ConfigError: not JSON/YAML, not a list of findings, an unknown key, or a name given twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"--prompts {path}: not UTF-8 text (byte {exc.start} cannot be decoded). Save the file as UTF-8 "
            "(in most editors: Save as... > Encoding: UTF-8) and retry."
        ) from exc
    except OSError as exc:
        raise InputError(f"--prompts {path}: cannot read the file ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--prompts {path}: not valid JSON/YAML ({exc})") from exc
    if isinstance(data, Mapping):
        data = data.get("findings")
    if not isinstance(data, list) or not data:
        raise ConfigError(
            f"--prompts {path}: expected a non-empty list of findings like "
            '[{"name": "Pleural effusion", "anatomy": "lung", "positive": ["Pleural effusion."], '
            '"negative": ["No pleural effusion."]}]'
        )
    out: list[Finding] = []
    for i, d in enumerate(data, start=1):
        finding = _user_finding(d, i, path)
        first = next((k for k, f in enumerate(out, start=1) if f.name == finding.name), None)
        if first is not None:
            raise ConfigError(
                f"--prompts {path}: entries {first} and {i} are both named {finding.name!r}; "
                "give each finding its own name"
            )
        out.append(finding)
    return FindingSet(out)
