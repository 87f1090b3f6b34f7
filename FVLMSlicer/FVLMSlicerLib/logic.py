"""The module's logic without Qt: MRML nodes in, MRML nodes out.

``FVLMSlicerLogic`` (in ``FVLMSlicer.py``) is this class plus Slicer's
``ScriptedLoadableModuleLogic``; headless (``slicer-core``) it is used directly::

    logic = AnalysisLogic(scene)
    nodes = logic.analyze(volume_node, segmentation_node=None, model_dir="~/fvlm-demo/model")
    nodes.table, nodes.segmentation, nodes.similarity_volumes

For the GUI the same work is split into :meth:`start` (main thread: nodes -> arrays, launch a
background job) and :meth:`finish` (main thread: summary -> nodes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_core.errors import CheckpointError, FVLMError, InputError
from fvlm_core.io import check_hu

from .mrml_io import labelmap_to_segmentation_node, segmentation_node_to_labelmap, volume_node_to_ct
from .results import ATTR_ROLE, ATTR_SOURCE_VOLUME, ResultNodes, apply_summary
from .runner import AnalysisRequest, JobStatus, ProcessJob, ThreadJob, run_analysis
from .settings import read_model_info, remembered_model_dir


@dataclass
class JobContext:
    """What :meth:`AnalysisLogic.finish` needs to put a job's results into the scene."""

    volume_node_id: str
    model_dir: str
    anatomies: list[str]
    segment_mapping: dict[str, str]


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
                "no model folder given and no demo model remembered. Run `fvlm demo` (it trains a small "
                "model and records its folder) or choose a model folder."
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
        """Read the nodes into an :class:`AnalysisRequest` (main thread only: touches MRML).

        Raises:
            InputError: no volume, a volume that is not CT in HU (unless ``allow_non_hu``), or a
                segmentation none of whose segments is a model anatomy.
        """
        if volume_node is None:
            raise InputError("no input volume: select the CT to analyze.")
        model_dir = self.resolve_model_dir(model_dir)
        info = read_model_info(model_dir)
        catalog = info.catalog()
        ct = volume_node_to_ct(volume_node)
        if not allow_non_hu:
            check_hu(ct.array, volume_node.GetName())
        source = anatomy_source or ("segmentation" if segmentation_node is not None else "builtin")
        labelmap, mapping = None, {}
        if source == "segmentation":
            if segmentation_node is None:
                raise InputError("anatomy source is 'segmentation' but no segmentation node was selected.")
            labelmap, mapping = segmentation_node_to_labelmap(
                segmentation_node, ct.geometry, catalog, overrides=segment_overrides
            )
        request = AnalysisRequest(
            ct=ct,
            model_dir=model_dir,
            labelmap=labelmap,
            anatomy_source=source,
            findings=findings,
            device=device,
            similarity_maps=similarity_maps,
        )
        return request, JobContext(volume_node.GetID(), model_dir, catalog.names, mapping)

    # --- outputs -----------------------------------------------------------------------------
    def _output_node(self, class_name: str, role: str, volume_node: Any, name: str) -> Any:
        """The result node of this role made for this volume before, or a new one."""
        for i in range(self.scene.GetNumberOfNodesByClass(class_name)):
            node = self.scene.GetNthNodeByClass(i, class_name)
            if (
                node.GetAttribute(ATTR_ROLE) == role
                and node.GetAttribute(ATTR_SOURCE_VOLUME) == volume_node.GetID()
            ):
                return node
        node = self.scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(ATTR_ROLE, role)
        node.SetAttribute(ATTR_SOURCE_VOLUME, volume_node.GetID())
        return node

    def finish(self, status: JobStatus, context: JobContext) -> ResultNodes:
        """Put a finished job's results into the scene (main thread)."""
        if status.state != "done" or status.output is None:
            raise FVLMError(status.error or f"analysis {status.state}")
        from fvlm_core.anatomy import get_catalog

        output = status.output
        volume_node = self.scene.GetNodeByID(context.volume_node_id)
        if volume_node is None:
            raise InputError("the analysed volume was removed from the scene before the results arrived.")
        ct_geometry = volume_node_to_ct(volume_node).geometry
        catalog = get_catalog(output.anatomies or context.anatomies)
        seg_node = self._output_node(
            "vtkMRMLSegmentationNode", "anatomies", volume_node, f"{volume_node.GetName()} FVLM anatomies"
        )
        labelmap_to_segmentation_node(
            output.labelmap,
            ct_geometry,
            catalog,
            self.scene,
            node=seg_node,
            reference_volume_node=volume_node,
        )
        table = self._output_node(
            "vtkMRMLTableNode", "findings", volume_node, f"{volume_node.GetName()} FVLM findings"
        )
        nodes = apply_summary(self.scene, output.summary, seg_node, ct_geometry, table_node=table)
        for node in nodes.similarity_volumes.values():
            node.SetAttribute(ATTR_SOURCE_VOLUME, volume_node.GetID())
        return nodes

    # --- running -----------------------------------------------------------------------------
    def start(
        self, *args: Any, background: str = "process", python: str | None = None, env=None, **kwargs: Any
    ):
        """Start a background analysis; returns ``(job, context)``; poll ``job.poll()``."""
        request, context = self.make_request(*args, **kwargs)
        if background == "thread":
            job = ThreadJob(request)
        elif background == "process":
            job = ProcessJob(request, python=python, env=env)
        else:
            raise FVLMError(f"background={background!r}: use 'process' or 'thread'")
        return job.start(), context

    def analyze(
        self,
        volume_node: Any,
        segmentation_node: Any = None,
        model_dir: str | os.PathLike | None = None,
        anatomy_source: str | None = None,
        findings: list[dict[str, Any]] | None = None,
        device: str = "auto",
        similarity_maps: bool = True,
        progress=None,
        segment_overrides: dict[str, str] | None = None,
    ) -> ResultNodes:
        """Run the whole analysis now (blocking) and return the result nodes.

        Args:
            volume_node: the CT (vtkMRMLScalarVolumeNode).
            segmentation_node: anatomies to use (e.g. from the TotalSegmentator extension);
                ``None`` runs the built-in segmenter (or ``anatomy_source="totalsegmentator"``).
            model_dir: saved model folder; empty = the model ``fvlm demo`` trained last.
            findings: ``Finding`` dicts; ``None`` = the model's default findings.
            device: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        """
        request, context = self.make_request(
            volume_node,
            segmentation_node,
            model_dir,
            anatomy_source,
            findings,
            device,
            similarity_maps,
            segment_overrides,
        )
        output = run_analysis(request, progress)
        return self.finish(JobStatus("done", "finish", 1.0, "", output), context)
