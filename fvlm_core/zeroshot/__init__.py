"""Zero-shot findings: window planning, prompt embeddings, the Analyzer and similarity maps.

>>> from fvlm_core.zeroshot import Analyzer
>>> analyzer = Analyzer.from_pretrained("models/fvlm-tiny", device="auto")
>>> result = analyzer.analyze(ct, segmentation)          # fvlm_core.segmentation.AnatomySegmentation
>>> result.to_dict()["anatomies"][0]["findings"][0]      # name, probability, threshold, flagged, ...
>>> from fvlm_core.zeroshot import AnalysisRequest, run    # the whole pipeline for one CT file
>>> result = run(AnalysisRequest(ct="chest.nii.gz", model="models/fvlm-tiny"))

The names are imported on first use (:mod:`fvlm_core.lazy` says why).
"""

from __future__ import annotations

from fvlm_core.lazy import lazy_exports

_EXPORTS = {
    "Analyzer": "fvlm_core.zeroshot.analyzer",
    "AnalysisResult": "fvlm_core.zeroshot.results",
    "AnatomyMap": "fvlm_core.zeroshot.results",
    "AnatomyResult": "fvlm_core.zeroshot.results",
    "FindingResult": "fvlm_core.zeroshot.results",
    "AnalysisRequest": "fvlm_core.zeroshot.pipeline",
    "run": "fvlm_core.zeroshot.pipeline",
    "load_findings_file": "fvlm_core.zeroshot.prompt_files",
    "merge_findings": "fvlm_core.zeroshot.prompt_files",
    "PromptCache": "fvlm_core.zeroshot.prompts",
    "ModelPrompts": "fvlm_core.zeroshot.prompts",
    "WindowPlan": "fvlm_core.zeroshot.windows",
    "plan_windows": "fvlm_core.zeroshot.windows",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
