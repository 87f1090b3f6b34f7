"""What a model folder's stored thresholds and calibrations were fitted with, and whether they
apply to a finding now.

A threshold and a calibration map are fitted on one finding's raw scores, and a raw score is a
function of the finding's wordings *and* of the text side that embeds them (the text encoder's
weights, ``text/``'s tokenizer and configuration, the config's text settings such as
``text.max_length``: the prompt store's *text identity*, :mod:`fvlm_core.model.prompt_store`).
So each stored entry records, in the config's ``calibrated_with``, the finding's anatomy and
wordings and the text identity it was fitted with::

    calibrated_with:
      Emphysema: {anatomy: lung, positive: [Emphysema.], negative: [Not emphysema.],
                  text_identity: 3f1c...}

and it applies to a finding only when both are the same now. A wording edited in
``config.yaml``, another ``max_length``, another tokenizer, or a ``--prompts`` finding worded
otherwise: the entry does not apply, and the finding is reported with its uncalibrated raw
score and the default threshold (and a note saying why). Where the text identity cannot be
computed (weights saved before it existed, or a model built in memory), the wording alone is
compared. Entries stored before ``calibrated_with`` existed apply only to the config's own
finding of that name, worded as the config words it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fvlm_core.calibration import Calibration
from fvlm_core.errors import ConfigError
from fvlm_core.findings import Finding

_KEYS = ("anatomy", "positive", "negative", "text_identity")


def fitted_with(finding: Finding, text_identity: str | None) -> dict[str, Any]:
    """The ``calibrated_with`` entry of a threshold or calibration fitted on ``finding``'s scores
    by a model whose text side is ``text_identity``."""
    return {
        "anatomy": finding.anatomy,
        "positive": list(finding.positive),
        "negative": list(finding.negative),
        "text_identity": text_identity,
    }


def check_entries(entries: Any) -> dict[str, dict[str, Any]]:
    """The config's ``calibrated_with`` field, checked (:class:`ConfigError` naming the finding)."""
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        raise ConfigError(
            f"config option calibrated_with must map finding names to wordings, got {entries!r}"
        )
    out = {}
    for name, e in entries.items():
        where = f"config option calibrated_with of {name!r}"
        if (
            not isinstance(e, Mapping)
            or set(e) - set(_KEYS)
            or not {"anatomy", "positive", "negative"} <= set(e)
        ):
            raise ConfigError(f"{where} must have the keys {', '.join(_KEYS)}, got {e!r}")
        texts = [e["positive"], e["negative"]]
        if not isinstance(e["anatomy"], str) or not all(
            isinstance(t, list) and t and all(isinstance(x, str) for x in t) for t in texts
        ):
            raise ConfigError(f"{where}: anatomy must be text and positive/negative lists of text, got {e!r}")
        identity = e.get("text_identity")
        if identity is not None and not isinstance(identity, str):
            raise ConfigError(f"{where}: text_identity must be text, got {identity!r}")
        out[str(name)] = {k: (list(e[k]) if k in ("positive", "negative") else e.get(k)) for k in _KEYS}
    return out


def bind_new_entries(config, updates: dict, identity: str, before=None) -> None:
    """Record in ``config.calibrated_with`` what the stored thresholds and calibrations were
    fitted with: those given to :func:`~fvlm_core.model.checkpoint.save_pretrained`
    on the config's findings of their names, with the text side ``identity``; those carried over
    from ``before`` (the config the model had) without a record, on ``before``'s wording (the
    only one they can have been fitted on), text side unknown. Recorded entries are kept (and
    checked against the text side when used)."""
    given = set(updates.get("thresholds") or {}) | set(updates.get("calibration") or {})
    own = {f.name: f for f in config.finding_set()}
    old = {f.name: f for f in before.finding_set()} if before is not None else {}
    for name in set(config.thresholds) | set(config.calibration):
        if name in given:
            found, text = own.get(name), identity
        elif name not in config.calibrated_with:
            found, text = old.get(name), None
        else:
            continue
        if found is not None:
            config.calibrated_with[name] = fitted_with(found, text)
        else:  # fitted on a wording this folder does not know: never applied
            config.calibrated_with.pop(name, None)


class StoredCalibration:
    """A model config's thresholds and calibrations, and which of them apply to a finding
    (see the module docstring).

    Args:
        config: the :class:`~fvlm_core.model.config.FVLMConfig`.
        text_identity: the model's text identity now (None: unknown, the wording alone counts).
    """

    def __init__(self, config, text_identity: str | None) -> None:
        self.config = config
        self.text_identity = text_identity

    def why_not(self, finding: Finding) -> str | None:
        """Why the stored entries of ``finding.name`` do not apply to ``finding`` (None: they do,
        or there are none)."""
        name = finding.name
        if name not in self.config.thresholds and name not in self.config.calibration:
            return None
        entry = self.config.calibrated_with.get(name)
        if entry is None:  # stored before calibrated_with: the config's own finding, as worded there
            own = {f.name: f for f in self.config.finding_set()}.get(name)
            if own is not None and fitted_with(own, None) == fitted_with(finding, None):
                return None
            return "the threshold and calibration were fitted on another wording"
        now = fitted_with(finding, self.text_identity)
        if any(entry[k] != now[k] for k in ("anatomy", "positive", "negative")):
            was = f"{entry['anatomy']}: {' / '.join(entry['positive'] + entry['negative'])}"
            return f"the threshold and calibration were fitted on another wording ({was})"
        fitted, current = entry.get("text_identity"), self.text_identity
        if fitted and current and fitted != current:
            return (
                "the threshold and calibration were fitted with another text encoder, tokenizer or text "
                "settings (e.g. text.max_length) than the model has now"
            )
        return None

    def threshold(self, finding: Finding) -> float | None:
        """The stored threshold (raw scale) of ``finding`` when it applies, else None."""
        t = self.config.thresholds.get(finding.name)
        return None if t is None or self.why_not(finding) is not None else float(t)

    def calibration(self, finding: Finding) -> Calibration | None:
        """The stored calibration of ``finding`` when it applies, else None."""
        entry = self.config.calibration.get(finding.name)
        if entry is None or self.why_not(finding) is not None:
            return None
        return Calibration.from_dict(entry, finding.name)

    def thresholds(self, findings: Iterable[Finding]) -> dict[str, float]:
        """name -> stored threshold, of ``findings`` whose stored threshold applies."""
        return {f.name: t for f in findings if (t := self.threshold(f)) is not None}

    def calibrations(self, findings: Iterable[Finding]) -> dict[str, Calibration]:
        """name -> stored calibration, of ``findings`` whose stored calibration applies."""
        return {f.name: c for f in findings if (c := self.calibration(f)) is not None}
