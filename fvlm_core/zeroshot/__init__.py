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

_EXPORTS = {  # submodule -> the public names it defines
    "analyzer": ("Analyzer",),
    "results": ("AnalysisResult", "AnatomyMap", "AnatomyResult", "FindingResult"),
    "pipeline": ("AnalysisRequest", "run"),
    "prompt_files": ("load_findings_file", "merge_findings"),
    "prompts": ("PromptCache", "ModelPrompts"),
    "windows": ("WindowPlan", "plan_windows"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
