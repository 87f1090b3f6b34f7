"""The module's logic without Qt: MRML nodes in, MRML nodes out.

``FVLMSlicerLogic`` (in ``FVLMSlicer.py``) is this class plus Slicer's
``ScriptedLoadableModuleLogic``; headless (``slicer-core``) it is used directly::

    logic = AnalysisLogic(scene)
    nodes = logic.analyze(volume_node, segmentation_node=None, model_dir="~/fvlm-demo/model")
    nodes.table, nodes.segmentation, nodes.similarity_volumes

For the GUI the same work is split so that the GUI thread never does voxel work:

* :meth:`start` (GUI thread): views of the volume and segmentation layers
  (:class:`~FVLMSlicerLib.snapshot.InputSnapshot`), then a background job that converts them,
  runs the analysis and prepares the results as VTK objects (:meth:`prepare`);
* :class:`ResultApplier` (GUI thread, one small step per timer tick): attaches the prepared
  objects to the scene: segments, table, one similarity volume per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm_core.errors import CheckpointError, FVLMError, InputError
from fvlm_core.io import Geometry

from .jobs import JobStatus, ProcessJob, ThreadJob
from .mrml_io import map_segmentation, segmentation_layers, set_anatomy_segments, volume_view
from .results import (
    ATTR_ROLE,
    ATTR_SIMILARITY,
    ATTR_SOURCE_VOLUME,
    PreparedResults,
    ResultNodes,
    apply_to_segmentation,
    fill_table,
    prepare_results,
    set_similarity_volume,
)
from .runner import AnalysisOutput, AnalysisRequest, run_analysis
from .settings import read_model_info, remembered_model_dir
from .snapshot import InputSnapshot
from .warm import WarmProcessJob, shared_worker


@dataclass
class JobContext:
    """What the results of a job need: the analysed volume, its grid, the model's anatomies.

    Attributes:
        geometry: the CT's world geometry when the analysis started.
    """

    volume_node_id: str
    model_dir: str
    anatomies: list[str]
    segment_mapping: dict[str, str]
    geometry: Geometry
    anatomy_source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)


class AnalysisLogic:
    """Analyze a CT volume node; results as MRML nodes (see module docstring)."""

    def __init__(self, scene: Any = None) -> None:
        if scene is None:
            import slicer

            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise FVLMError("no MRML scene: pass one (headless: FVLMSlicerLib.headless.new_scene())")
        self.scene = scene

    # --- inputs ------------------------------------------------------------------------------
    @staticmethod
    def resolve_model_dir(model_dir: str | os.PathLike | None) -> str:
        """``model_dir`` or, when empty, the model ``fvlm demo`` trained last."""
        path = str(model_dir or "").strip()
        if path in ("", "."):  # "." is an unset pathlib.Path parameter
            path = remembered_model_dir()
        if not path:
            raise CheckpointError(
                "no model folder given and no demo model remembered. Import the official fVLM weights or "
                "choose a model folder (a folder written by `fvlm demo`, `fvlm train` or "
                "`fvlm import-checkpoint`)."
            )
        return str(Path(path).expanduser())

    def make_request(
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
    ) -> tuple[AnalysisRequest, JobContext]:
        """Take views of the nodes for a background analysis (GUI thread; no voxel copies).

        The intensities are checked (CT in HU unless ``allow_non_hu``) when the job converts
        the snapshot, off the GUI thread.

        Args:
            volume_node: the CT (vtkMRMLScalarVolumeNode).
            segmentation_node: anatomies to use (e.g. from the TotalSegmentator extension);
                ``None`` runs the built-in segmenter (or ``anatomy_source="totalsegmentator"``).
            model_dir: saved model folder; empty = the model ``fvlm demo`` trained last.
            anatomy_source: ``"segmentation"``, ``"builtin"`` or ``"totalsegmentator"``; ``None``
                = ``"segmentation"`` when a segmentation node is given, else ``"builtin"``.
            findings: ``Finding`` dicts; ``None`` = the model's default findings.
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"gpu"`` or ``"mps"``.
            similarity_maps: also compute per-finding similarity maps.
            segment_overrides: segment name -> model anatomy; wins over the mapping by the
                segment's name, terminology or TotalSegmentator class.
            allow_non_hu: analyse a volume whose values do not look like CT in HU (NaN or
                infinite values are still refused).

        Raises:
            InputError: no volume, or a segmentation none of whose segments is a model anatomy.
        """
        if volume_node is None:
            raise InputError("no input volume: select the CT to analyze.")
        model_dir = self.resolve_model_dir(model_dir)
        catalog = read_model_info(model_dir).catalog()
        view, geometry = volume_view(volume_node)
        source = anatomy_source or ("segmentation" if segmentation_node is not None else "builtin")
        layers, mapping = None, {}
        if source == "segmentation":
            if segmentation_node is None:
                raise InputError("anatomy source is 'segmentation' but no segmentation node was selected.")
            mapping = map_segmentation(segmentation_node, catalog, segment_overrides)
            layers = segmentation_layers(segmentation_node, catalog, mapping)
        request = AnalysisRequest(
            model_dir=model_dir,
            snapshot=InputSnapshot(
                view, geometry, volume_node.GetName(), layers, check_intensities=not allow_non_hu
            ),
            anatomy_source=source,
            findings=findings,
            device=device,
            similarity_maps=similarity_maps,
            allow_non_hu=allow_non_hu,
        )
        context = JobContext(volume_node.GetID(), model_dir, catalog.names, mapping, geometry, source)
        return request, context

    # --- outputs -----------------------------------------------------------------------------
    @staticmethod
    def prepare(output: AnalysisOutput, context: JobContext) -> PreparedResults:
        """Results as VTK objects ready for the scene (any thread: touches no scene)."""
        from fvlm_core.anatomy import get_catalog

        catalog = get_catalog(output.anatomies or context.anatomies)
        return prepare_results(output.summary, output.labelmap, context.geometry, catalog)

    def output_node(self, class_name: str, role: str, volume_node: Any, name: str) -> Any:
        """The result node of this role made for this volume before, or a new one."""
        for node in self.result_nodes(class_name, volume_node):
            if node.GetAttribute(ATTR_ROLE) == role:
                return node
        node = self.scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(ATTR_ROLE, role)
        node.SetAttribute(ATTR_SOURCE_VOLUME, volume_node.GetID())
        return node

    def result_nodes(self, class_name: str, volume_node: Any) -> list[Any]:
        """Nodes of ``class_name`` this module made for ``volume_node``."""
        out = []
        for i in range(self.scene.GetNumberOfNodesByClass(class_name)):
            node = self.scene.GetNthNodeByClass(i, class_name)
            if node.GetAttribute(ATTR_SOURCE_VOLUME) == volume_node.GetID():
                out.append(node)
        return out

    def finish(self, status: JobStatus, context: JobContext) -> ResultNodes:
        """Put a finished job's results into the scene in one go (console, tests)."""
        applier = ResultApplier(self, status, context)
        while not applier.step():
            pass
        return applier.nodes

    # --- running -----------------------------------------------------------------------------
    def start(
        self,
        *args: Any,
        background: str = "process",
        python: str | None = None,
        env_update: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        """Start a background analysis; returns ``(job, context)``; poll ``job.poll()``.

        ``background``: ``"warm"`` (the module's warm worker process: torch and the last model
        stay loaded between analyses; what the panel uses), ``"process"`` (a new process for
        this analysis) or ``"thread"`` (in this process).
        """
        request, context = self.make_request(*args, **kwargs)

        def prepare(output: AnalysisOutput) -> PreparedResults:
            return self.prepare(output, context)

        if background == "thread":
            job = ThreadJob(request, prepare=prepare)
        elif background == "process":
            job = ProcessJob(request, python=python, env_update=env_update, prepare=prepare)
        elif background == "warm":
            job = WarmProcessJob(request, shared_worker(python, env_update), prepare=prepare)
        else:
            raise FVLMError(f"background={background!r}: use 'warm', 'process' or 'thread'")
        return job.start(), context

    def analyze(
        self, *args: Any, progress: Callable[[str, float], None] | None = None, **kwargs: Any
    ) -> ResultNodes:
        """Run the whole analysis now (blocking) and return the result nodes.

        Takes the arguments of :meth:`make_request` (``volume_node, segmentation_node=None,
        model_dir=None``, then ``anatomy_source``, ``findings``, ``device``, ``similarity_maps``,
        ``segment_overrides``, ``allow_non_hu``), and ``progress``, called with
        ``(message, fraction)`` as the analysis advances.
        """
        request, context = self.make_request(*args, **kwargs)
        output = run_analysis(request, progress)
        return self.finish(JobStatus("done", "finish", 1.0, "", output), context)


class ResultApplier:
    """Attaches a finished job's prepared results to the scene, one small step per call.

    Each :meth:`step` does bounded MRML work (the voxels were copied off the GUI thread by
    :meth:`AnalysisLogic.prepare`): the segments, then the table, then one similarity volume
    per step, then the removal of similarity volumes an earlier run left for this volume.
    """

    def __init__(self, logic: AnalysisLogic, status: JobStatus, context: JobContext) -> None:
        if status.state != "done" or status.output is None:
            raise FVLMError(status.error or f"analysis {status.state}")
        self.logic, self.status, self.context = logic, status, context
        self.nodes: ResultNodes | None = None
        self._steps = self._generate()

    def step(self) -> bool:
        """Do the next step; True once everything is in the scene (then :attr:`nodes` is set)."""
        try:
            next(self._steps)
            return False
        except StopIteration:
            return True

    def _generate(self) -> Iterator[None]:
        logic, context = self.logic, self.context
        volume = logic.scene.GetNodeByID(context.volume_node_id)
        if volume is None:
            raise InputError("the analysed volume was removed from the scene before the results arrived.")
        prepared = self.status.prepared or logic.prepare(self.status.output, context)
        yield
        seg = logic.output_node(
            "vtkMRMLSegmentationNode", "anatomies", volume, f"{volume.GetName()} FVLM anatomies"
        )
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        set_anatomy_segments(seg, prepared.layer, prepared.catalog)
        apply_to_segmentation(seg, prepared.summary)
        yield
        table = logic.output_node("vtkMRMLTableNode", "findings", volume, f"{volume.GetName()} FVLM findings")
        fill_table(table, prepared.summary)
        table.SetAttribute("FVLM.SegmentationNodeID", seg.GetID())
        yield
        existing = {
            tuple(node.GetAttribute(ATTR_SIMILARITY).split("|", 1)): node
            for node in logic.result_nodes("vtkMRMLScalarVolumeNode", volume)
            if node.GetAttribute(ATTR_SIMILARITY)
        }
        volumes = {}
        for key, overlay in prepared.overlays.items():
            node = set_similarity_volume(logic.scene, existing.pop(key, None), key, overlay, seg)
            node.SetAttribute(ATTR_SOURCE_VOLUME, volume.GetID())
            volumes[key] = node
            yield
        for stale in existing.values():  # maps of findings this run did not flag
            for i in reversed(range(stale.GetNumberOfDisplayNodes())):
                logic.scene.RemoveNode(stale.GetNthDisplayNode(i))
            logic.scene.RemoveNode(stale)
        self.nodes = ResultNodes(seg, table, volumes, prepared.summary)
