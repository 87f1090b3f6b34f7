"""fvlm_core: fine-grained CT vision-language pretraining (fVLM) and zero-shot anatomy findings.

Data flows one way: volume (:mod:`fvlm_core.io`) -> segmentation (:mod:`fvlm_core.segmentation`)
-> model-space sample (:mod:`fvlm_core.preprocess`) -> anatomy embeddings (:mod:`fvlm_core.model`)
-> findings (:mod:`fvlm_core.zeroshot`) -> display (the Slicer module).
"""

__version__ = "0.1.0"
