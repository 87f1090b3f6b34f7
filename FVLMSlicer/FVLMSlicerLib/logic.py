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

After an analysis, :meth:`AnalysisLogic.find_similar` (the scans of an embedding store most like
each anatomy) and :meth:`AnalysisLogic.export_dicom` (the results as DICOM SEG and SR into
Slicer's DICOM database) return a :class:`~FVLMSlicerLib.job.TaskJob` for the warm worker
(``tasks.py``); :meth:`AnalysisLogic.wait` runs any of these jobs to its end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fvlm_core import errors
from fvlm_core.errors import CheckpointError, FVLMError, InputError

from . import dicomdb
from .job import AnalysisJob, JobInputs, TaskJob, WorkerJob
from .mrml_io import map_segmentation, segmentation_layers, volume_view
from .results import ATTR_SOURCE_VOLUME, ResultNodes, anatomy_segments, find_results, show_steps
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
            keep_embeddings=True,  # for "Similar cases": kept with the result (and the scene)
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
        return self.wait(self.start(*args, **kwargs)).nodes

    @staticmethod
    def wait(job: WorkerJob) -> WorkerJob:
        """Run a started job to its end (blocking; the Python console); raise the library's error
        the worker reported, or :class:`~fvlm_core.errors.CancelledError`."""
        status = job.wait()
        if status.state == "cancelled":
            raise errors.CancelledError("cancelled")
        if status.state != "done":
            kind = getattr(errors, job.error_type or "", FVLMError)
            raise (kind if isinstance(kind, type) and issubclass(kind, FVLMError) else FVLMError)(
                status.error
            )
        return job

    def find_similar(
        self,
        nodes: ResultNodes,
        store_dir: str | os.PathLike,
        k: int = 5,
        worker: WarmWorker | None = None,
        idle_minutes: float | None = DEFAULT_IDLE_MINUTES,
    ) -> TaskJob:
        """Start the search of an embedding store (``fvlm embed``) for the ``k`` scans most like
        each anatomy of an analysis, with the anatomy embeddings its result keeps; the job's
        ``output`` is ``tasks.similar_cases``' (matches per anatomy, with their volume paths).

        Raises:
            InputError: no store chosen, or a result without embeddings (an older analysis).
        """
        result = nodes.result
        if result is None or result.embeddings is None or not result.embeddings.vectors:
            raise InputError(
                "this analysis kept no anatomy embeddings (it was made by an older version, or no anatomy "
                "was scored): analyse the CT again to search a store with it."
            )
        store = str(store_dir or "").strip()
        if not store:
            raise InputError("choose an embedding store: a folder made by `fvlm embed` with this model.")
        task = {
            "task": "similar",
            "store": str(Path(store).expanduser()),
            "k": int(k),
            "embeddings": result.embeddings.to_dict(),
        }
        return TaskJob(worker or shared_worker(idle_minutes=idle_minutes), task).start()

    def export_dicom(
        self,
        nodes: ResultNodes,
        worker: WarmWorker | None = None,
        idle_minutes: float | None = DEFAULT_IDLE_MINUTES,
        database: Any = None,
    ) -> TaskJob:
        """Start the export of an analysis as ``fvlm analyze --dicom-out`` writes it (a DICOM SEG of
        the anatomies and a TID 1500 SR of the findings, referencing the source series) into
        Slicer's DICOM database (``database``: default ``slicer.dicomDatabase``); the job's
        ``value`` lists the objects put into it (``dicomdb.py`` says how, as QuantitativeReporting).

        Raises:
            InputError: the volume did not come from the DICOM database, or the database is not open.
        """
        volume = self.scene.GetNodeByID(nodes.table.GetAttribute(ATTR_SOURCE_VOLUME) or "")
        db = database if database is not None else dicomdb.database()
        blocker = dicomdb.export_blocker(volume, db)
        if blocker:
            raise InputError(blocker)
        result = nodes.result
        mapping = {
            sid: a for sid, a in anatomy_segments(nodes.segmentation).items() if a in result.anatomy_names
        }
        layers, segments = segmentation_layers(nodes.segmentation, mapping)
        task = {"task": "dicom", "result": result.to_dict(), "segmenter": dicomdb.segmenter_fields(result)}
        return TaskJob(
            worker or shared_worker(idle_minutes=idle_minutes),
            task,
            prepare=lambda: dicomdb.source_files_steps(db, volume),
            layers=layers,
            segments=segments,
            finish=lambda written, job_dir: dicomdb.insert_steps(db, written),
        ).start()

    def load_case(self, match: dict[str, Any]) -> Any:
        """Load a similar case's volume (a match of :meth:`find_similar`) with Slicer's volume
        reader (``slicer.util.loadVolume``, as File > Add Data); the new volume node.

        Raises:
            InputError: its path is not reachable from this computer, or is a DICOM folder.
        """
        import slicer

        source, scan = str(match.get("source") or ""), str(match.get("scan", ""))
        if not source or not os.path.exists(source):
            raise InputError(
                f"the volume of {scan} is not reachable from this computer: "
                + (f"{source} does not exist here." if source else "the store records no path for it.")
                + " Copy it to that path (or mount the drive it is on) to load it."
            )
        if os.path.isdir(source):
            raise InputError(
                f"the volume of {scan} is a DICOM series folder ({source}): import it in the DICOM module "
                "(Import DICOM files) and load it from there."
            )
        return slicer.util.loadVolume(source, {"name": scan})

    def find_results(self, volume_node: Any = None) -> ResultNodes | None:
        """Results this module left in the scene (e.g. a loaded .mrb), or None."""
        return find_results(self.scene, volume_node)
