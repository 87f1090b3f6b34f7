"""The module's logic without Qt: MRML nodes in, MRML nodes out.

``FVLMSlicerLogic`` (in ``FVLMSlicer.py``) is this class plus Slicer's
``ScriptedLoadableModuleLogic``; headless (``slicer-core``) it is used directly::

    logic = AnalysisLogic(scene)
    nodes = logic.analyze(volume_node, segmentation_node=None, model_dir="~/fvlm-demo/model")
    nodes.table, nodes.segmentation, nodes.similarity_volumes, nodes.result

:meth:`AnalysisLogic.start` takes views of the nodes (no voxel copies) and returns an
:class:`~FVLMSlicerLib.job.AnalysisJob` that the panel's timer steps: the analysis runs in the
warm worker, the results go into the scene a short step at a time (``results.show_steps``).
:meth:`AnalysisLogic.analyze` runs the same job to its end (the Python console).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fvlm_core import errors
from fvlm_core.errors import CheckpointError, FVLMError, InputError

from .job import AnalysisJob, JobInputs
from .mrml_io import map_segmentation, segmentation_layers, volume_view
from .results import ResultNodes, find_results, show_steps
from .settings import read_model_info, remembered_model_dir
from .warm import DEFAULT_IDLE_MINUTES, WarmWorker, shared_worker

NO_MODEL = (
    "no model folder chosen. Click 'Import official fVLM weights...' (the official checkpoint and its "
    "text encoder) or 'Choose model folder...' (a folder holding config.yaml and model.safetensors)."
)


class AnalysisLogic:
    """Analyze a CT volume node; results as MRML nodes (see the module docstring)."""

    def __init__(self, scene: Any = None) -> None:
        if scene is None:
            import slicer

            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise FVLMError("no MRML scene: pass one (headless: FVLMSlicerLib.headless.new_scene())")
        self.scene = scene

    @staticmethod
    def resolve_model_dir(model_dir: str | os.PathLike | None) -> str:
        """``model_dir`` or, when empty, the model ``fvlm demo`` trained last (a source checkout)."""
        path = str(model_dir or "").strip()
        if path in ("", "."):  # "." is an unset pathlib.Path parameter
            path = remembered_model_dir()
        if not path:
            raise CheckpointError(NO_MODEL)
        return str(Path(path).expanduser())

    def start(
        self,
        volume_node: Any,
        segmentation_node: Any = None,
        model_dir: str | os.PathLike | None = None,
        anatomy_source: str | None = None,
        findings: list[dict[str, Any]] | None = None,
        device: str = "auto",
        similarity_maps: bool = True,
        segment_overrides: dict[str, str] | None = None,
        allow_non_hu: bool = False,
        worker: WarmWorker | None = None,
        idle_minutes: float | None = DEFAULT_IDLE_MINUTES,
    ) -> AnalysisJob:
        """Start an analysis in the warm worker; step the returned job until it has finished.

        Args:
            volume_node: the CT (vtkMRMLScalarVolumeNode).
            segmentation_node: anatomies to use (e.g. from the TotalSegmentator extension);
                ``None`` runs the built-in segmenter (or ``anatomy_source="totalsegmentator"``).
            model_dir: saved model folder.
            anatomy_source: ``"segmentation"``, ``"builtin"`` or ``"totalsegmentator"``; ``None``
                = ``"segmentation"`` when a segmentation node is given, else ``"builtin"``.
            findings: ``Finding`` dicts; ``None`` = the model's default findings.
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"gpu"`` or ``"mps"``.
            similarity_maps: also compute the similarity maps of flagged findings.
            segment_overrides: segment name -> model anatomy; wins over the mapping by the
                segment's name, terminology or TotalSegmentator class.
            allow_non_hu: analyse a volume whose values do not look like CT in HU (NaN or
                infinite values are still refused).
            worker: the worker to use (default: the module's warm worker, ``idle_minutes``).

        Raises:
            InputError: no volume, or a segmentation none of whose segments is a model anatomy.
        """
        from fvlm_core.zeroshot.pipeline import AnalysisRequest

        if volume_node is None:
            raise InputError("no input volume: select the CT to analyze.")
        model_dir = self.resolve_model_dir(model_dir)
        catalog = read_model_info(model_dir).catalog()
        view, geometry = volume_view(volume_node)
        source = anatomy_source or ("segmentation" if segmentation_node is not None else "builtin")
        layers, segments = [], []
        if source == "segmentation":
            if segmentation_node is None:
                raise InputError("anatomy source is 'segmentation' but no segmentation node was selected.")
            mapping = map_segmentation(segmentation_node, catalog, segment_overrides)
            layers, segments = segmentation_layers(segmentation_node, mapping)
        # the CT file is named after the node: the worker's messages about it name it
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", volume_node.GetName()).strip("._") or "volume"
        request = AnalysisRequest(
            ct=f"{name}.nrrd",
            model=model_dir,
            segmentation="segments" if source == "segmentation" else source,
            findings=findings,
            device=device,
            similarity_maps=bool(similarity_maps),
            allow_non_hu=allow_non_hu,
            keep_labelmap=True,
        )
        inputs = JobInputs(view, geometry, volume_node.GetName(), layers, segments)
        volume_id = volume_node.GetID()
        job = AnalysisJob(
            worker or shared_worker(idle_minutes=idle_minutes),
            inputs,
            request,
            lambda result: show_steps(self.scene, volume_id, result),
        )
        job.anatomy_source = source
        return job.start()

    def analyze(self, *args: Any, **kwargs: Any) -> ResultNodes:
        """Run the whole analysis now (blocking) and return the result nodes.

        Takes the arguments of :meth:`start`. Raises the library's error the worker reported
        (e.g. :class:`~fvlm_core.errors.InputError` for a volume that is not CT).
        """
        job = self.start(*args, **kwargs)
        status = job.wait()
        if status.state == "cancelled":
            raise errors.CancelledError("analysis cancelled")
        if status.state != "done":
            kind = getattr(errors, job.error_type or "", FVLMError)
            raise (kind if isinstance(kind, type) and issubclass(kind, FVLMError) else FVLMError)(
                status.error
            )
        return job.nodes

    def find_results(self, volume_node: Any = None) -> ResultNodes | None:
        """Results this module left in the scene (e.g. a loaded .mrb), or None."""
        return find_results(self.scene, volume_node)
