"""TotalSegmentator backend (optional extra ``pip install "fvlm[totalseg]"``).

Runs TotalSegmentator's "total" task through its Python API in a child process
(:mod:`~fvlm_core.segmentation.totalseg_run`, driven by :mod:`~fvlm_core.segmentation.totalseg_process`)
and merges its classes into a catalog on the CT's own grid. By default it predicts only the
classes the catalog's anatomies need (TotalSegmentator's ``roi_subset``) and says so in
``segmentation.details``, with the time of every stage.

Offline unless ``allow_download=True``: missing weights stop it before it starts (the message
says how to get them), and the child process cannot open internet connections (TotalSegmentator's
usage statistics included); the attempts it blocked are listed in ``details["network"]``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog
from fvlm_core.atomic import atomic_path
from fvlm_core.devices import resolve_device
from fvlm_core.errors import ConfigError, DependencyError, FVLMError
from fvlm_core.io import CTVolume, read_label_map, write_image
from fvlm_core.segmentation.base import AnatomySegmentation, Progress
from fvlm_core.segmentation.labelmap import embedded_class_map, merge_labels
from fvlm_core.segmentation.totalseg_classes import (
    TOTAL_CLASS_MAP,
    anatomies_without_total_class,
    total_class_anatomies,
)
from fvlm_core.segmentation.totalseg_process import StageClock, run_child

if TYPE_CHECKING:
    import torch

#: What ``pip`` installs for this backend (the ``[totalseg]`` extra).
INSTALL_REQUIREMENT = "totalsegmentator>=2.4"
INSTALL_HINT = f'pip install "fvlm[totalseg]"  (or: pip install "{INSTALL_REQUIREMENT}")'

#: nnU-Net datasets of the "total" task (TotalSegmentator 2.x): the 3 mm ``fast`` model, the five
#: 1.5 mm part models, and the 6 mm model TotalSegmentator first runs to crop to a ``roi_subset``.
FAST_DATASET = 297
PART_DATASETS = (291, 292, 293, 294, 295)
CROP_DATASET = 298
#: Datasets ``totalseg_download_weights -t total`` / ``-t total_fast`` fetch.
TOTAL_DATASETS = {False: (*PART_DATASETS, CROP_DATASET), True: (FAST_DATASET, CROP_DATASET)}
#: Folder names TotalSegmentator 2.x looks for (its ``map_tasks_config.TASK_ID_WEIGHTS_CONFIGS``).
DATASET_FOLDERS = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    297: "Dataset297_TotalSegmentator_total_3mm_1559subj",
    298: "Dataset298_TotalSegmentator_total_6mm_1559subj",
}


def totalseg_home() -> Path:
    """Folder TotalSegmentator keeps its weights in (``TOTALSEG_HOME_DIR`` or ``~/.totalsegmentator``)."""
    return Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))


def weights_dir() -> Path:
    """``TOTALSEG_WEIGHTS_PATH`` if set, else ``<home>/nnunet/results``."""
    env = os.environ.get("TOTALSEG_WEIGHTS_PATH")
    return Path(env) if env else totalseg_home() / "nnunet" / "results"


def totalsegmentator_available() -> bool:
    return importlib.util.find_spec("totalsegmentator") is not None


def _parts_for(classes: Sequence[str]) -> tuple[int, ...]:
    """The 1.5 mm part models holding ``classes`` (TotalSegmentator runs only those)."""
    from totalsegmentator.map_to_binary import class_map_5_parts, map_taskid_to_partname_ct

    wanted = set(classes)
    return tuple(
        task
        for task in PART_DATASETS
        if wanted & set(class_map_5_parts[map_taskid_to_partname_ct[task]].values())
    )


def required_datasets(fast: bool, roi_subset: Sequence[str] | None = None) -> tuple[int, ...]:
    """Datasets a run loads: the fast or part models (only parts holding ``roi_subset`` when the
    package can say which), plus the 6 mm crop model when ``roi_subset`` is given."""
    if fast:
        models: tuple[int, ...] = (FAST_DATASET,)
    elif roi_subset is not None and totalsegmentator_available():
        models = _parts_for(roi_subset)
    else:
        models = PART_DATASETS
    return (*models, CROP_DATASET) if roi_subset is not None else models


def missing_weights(fast: bool, roi_subset: Sequence[str] | None = None) -> list[int]:
    """Datasets of :func:`required_datasets` without a trained model (``*/fold_0/checkpoint_final.pth``)
    in their folder under :func:`weights_dir`. TotalSegmentator downloads a missing folder."""
    root = weights_dir()
    return [
        d
        for d in required_datasets(fast, roi_subset)
        if not any((root / DATASET_FOLDERS[d]).glob("*/fold_0/checkpoint_final.pth"))
    ]


def totalseg_device(device: torch.device) -> str:
    """TotalSegmentator's word for a torch device: ``gpu`` / ``gpu:N``, ``cpu`` or ``mps``.

    Its Python API accepts only these (``validate_device_type_api``) and maps ``gpu`` to ``cuda:0``.
    """
    if device.type == "cuda":
        return "gpu" if device.index is None else f"gpu:{device.index}"
    if device.type in ("cpu", "mps"):
        return device.type
    raise ConfigError(f"device {device}: TotalSegmentator runs on gpu, cpu or mps only")


def totalsegmentator_status(fast: bool = True) -> dict[str, Any]:
    """What a user interface shows before offering TotalSegmentator (JSON-ready).

    Returns:
        ``installed``, ``version``, ``install_requirement`` (for pip), ``install_hint``,
        ``weights_dir`` and ``missing_weights`` (dataset ids a ``fast`` or full run with a
        ``roi_subset`` lacks; downloaded on first use when downloads are allowed).
    """
    installed = totalsegmentator_available()
    version = importlib.metadata.version("TotalSegmentator") if installed else None
    roi = list(total_class_anatomies(CTRATE_CATALOG))
    return {
        "installed": installed,
        "version": version,
        "install_requirement": INSTALL_REQUIREMENT,
        "install_hint": INSTALL_HINT,
        "weights_dir": str(weights_dir()),
        "missing_weights": missing_weights(fast, roi),
    }


class TotalSegmentatorBackend:
    """Segment with TotalSegmentator ("total" task) and merge its classes into a catalog.

    Args:
        fast: use the 3 mm ``--fast`` model (dataset 297) instead of the 1.5 mm part models.
        device: a name :func:`fvlm_core.devices.resolve_device` takes (``auto``: CUDA, else MPS,
            else CPU; ``gpu`` = ``cuda``) or a ``torch.device``; checked by :meth:`check`.
        allow_download: let TotalSegmentator download missing weights (and reach the internet).
        roi_subset: predict only the classes the catalog's anatomies need (default); ``False``
            predicts all 117 classes and reports the ones no anatomy uses.
        raw_output: also write TotalSegmentator's own multilabel file here (``.nii.gz``: its class
            values, their names in the NIfTI header), e.g. to load it into 3D Slicer.
        should_cancel: polled while TotalSegmentator runs; True kills it and raises
            :class:`~fvlm_core.errors.CancelledError` (so does a progress callback raising it).
    """

    name = "totalsegmentator"

    def __init__(
        self,
        fast: bool = False,
        device: str | torch.device = "auto",
        allow_download: bool = False,
        roi_subset: bool = True,
        raw_output: str | os.PathLike | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.fast = fast
        self.device = device
        self.allow_download = allow_download
        self.roi_subset = roi_subset
        self.raw_output = Path(raw_output) if raw_output is not None else None
        self.should_cancel = should_cancel

    def classes_needed(self, catalog: AnatomyCatalog) -> list[str] | None:
        """The ``roi_subset`` for ``catalog`` (``None``: all classes).

        Raises:
            ConfigError: no anatomy of ``catalog`` is a "total" class.
        """
        classes = list(total_class_anatomies(catalog))
        if not classes:
            raise ConfigError(
                f"catalog {catalog.name!r}: none of its anatomies ({', '.join(catalog.names)}) is a class of "
                "TotalSegmentator's 'total' task; use another backend or a label map."
            )
        return classes if self.roi_subset else None

    def check(self, catalog: AnatomyCatalog = CTRATE_CATALOG) -> None:
        """Refuse to start when something the run needs is missing.

        Raises:
            DependencyError: the package or its weights are missing.
            ConfigError: the device is unknown or not available here, or the catalog has no
                "total" class.
        """
        if not totalsegmentator_available():
            raise DependencyError(
                f"the totalsegmentator backend needs the TotalSegmentator package: {INSTALL_HINT}"
            )
        missing = missing_weights(self.fast, self.classes_needed(catalog))
        if missing and not self.allow_download:
            raise DependencyError(
                f"TotalSegmentator weights for the 'total' task{' (--fast)' if self.fast else ''} are missing "
                f"from {weights_dir()} (datasets {', '.join(map(str, missing))}). Get them on a machine with "
                "internet access with `totalseg_download_weights -t total"
                f"{'_fast' if self.fast else ''}`, copy the folder and set TOTALSEG_HOME_DIR to it, or pass "
                "--allow-download to let TotalSegmentator download them now."
            )
        if self.raw_output is not None and not self.raw_output.name.lower().endswith((".nii", ".nii.gz")):
            raise ConfigError(f"{self.raw_output}: TotalSegmentator's own output is NIfTI; name it .nii.gz")
        self.device_word()

    def device_word(self) -> str:
        """TotalSegmentator's word for :attr:`device` (resolved by :func:`resolve_device`)."""
        return totalseg_device(resolve_device(self.device))

    def segment(
        self, ct: CTVolume, catalog: AnatomyCatalog = CTRATE_CATALOG, progress: Progress | None = None
    ) -> AnatomySegmentation:
        """Run TotalSegmentator on ``ct`` and merge its classes into ``catalog`` on the CT's grid.

        Raises:
            DependencyError, ConfigError: see :meth:`check` (nothing has run yet).
            CancelledError: cancelled (TotalSegmentator and its workers are killed).
            FVLMError: TotalSegmentator failed; the message ends with its last lines.
        """
        self.check(catalog)
        roi = self.classes_needed(catalog)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fvlm-ts-") as tmp:
            files = {k: str(Path(tmp) / v) for k, v in _FILES.items()}
            if progress:
                progress("TotalSegmentator: writing the CT", 0.0)
            write_image(ct.array, ct.geometry, files["input"])
            timings["write input"] = time.perf_counter() - t
            timings.update(self._run(files, roi, progress).finish())
            t = time.perf_counter()
            labels = read_label_map(files["output"], reference=ct.geometry).array
            class_map = embedded_class_map(files["output"]) or TOTAL_CLASS_MAP
            report = json.loads(Path(files["report"]).read_text())
            network = json.loads(Path(files["result"]).read_text())["network_blocked"]
            if self.raw_output is not None:
                with atomic_path(self.raw_output) as target:
                    shutil.copyfile(files["output"], target)
        labelmap = merge_labels(labels, class_map, catalog)
        timings["read and merge"] = time.perf_counter() - t
        details = self._details(catalog, roi, labels, class_map, timings, report, network)
        if progress:
            progress("done", 1.0)
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, self.name, details=details)

    def _run(self, files: dict[str, str], roi: list[str] | None, progress: Progress | None) -> StageClock:
        """Run the child process on ``files``; its clock (stage times, log)."""
        request = {
            **files,
            "fast": self.fast,
            "device": self.device_word(),
            "roi_subset": roi,
            "offline": not self.allow_download,
        }
        Path(files["request"]).write_text(json.dumps(request))
        clock = StageClock(progress)
        # the run's own folder, not a subfolder: multiprocessing puts socket files in it, and
        # their path must stay short (about 100 characters on Linux and macOS)
        temp_dir = str(Path(files["request"]).parent)
        rc = run_child(files["request"], clock, self.should_cancel, temp_dir=temp_dir)
        result_file = Path(files["result"])
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if rc != 0 or not Path(files["output"]).is_file():
            raise _failure(rc, result, clock.log)
        return clock

    def _details(
        self,
        catalog: AnatomyCatalog,
        roi: list[str] | None,
        labels: np.ndarray,
        class_map: dict[int, str],
        timings: dict[str, float],
        report: dict[str, Any],
        network: list[str],
    ) -> dict[str, Any]:
        """What the run did, for ``segmentation.details`` (JSON-ready)."""
        anatomy_of = total_class_anatomies(catalog)
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(class_map, default=0) + 1)
        classes = {
            name: {"value": int(v), "voxels": int(counts[v]), "anatomy": anatomy_of.get(name)}
            for v, name in sorted(class_map.items())
            if v < counts.size and counts[v] > 0
        }
        unused = sorted(n for n, c in classes.items() if c["anatomy"] is None)
        details = {
            "task": "total",
            "fast": self.fast,
            "device": self.device_word(),
            "roi_subset": roi,
            "classes": classes,
            "unused_classes": unused,
            "anatomies_not_in_task": anatomies_without_total_class(catalog),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "network": {"offline": not self.allow_download, "blocked": network},
            "weights_dir": str(weights_dir()),
            "totalsegmentator_report": {k: v for k, v in report.items() if k not in ("input", "output")},
        }
        details["notes"] = _notes(details, len(TOTAL_CLASS_MAP))
        return details


#: Files of one run, in its temporary folder.
_FILES = {
    "input": "ct.nii.gz",
    "output": "totalseg.nii.gz",
    "report": "totalseg_report.json",
    "result": "result.json",
    "request": "request.json",
}


def _failure(rc: int, result: dict[str, Any], log: list[str]) -> FVLMError:
    """The error for a failed run: TotalSegmentator's reason and its last lines."""
    tail = "\n".join(log[-15:])
    reason = result.get("error") or f"TotalSegmentator exited with code {rc}"
    blocked = result.get("network_blocked") or []
    if blocked:
        reason += (
            f" (it tried to reach {', '.join(blocked)}, blocked: this run is offline; "
            "pass --allow-download if that is what it needs)"
        )
    return FVLMError(f"TotalSegmentator failed: {reason}\n{tail}")


def _notes(details: dict[str, Any], n_classes: int) -> list[str]:
    """Human-readable lines on the run (printed by ``fvlm segment``)."""
    mode = "fast, 3 mm" if details["fast"] else "1.5 mm"
    offline = "offline" if details["network"]["offline"] else "downloads allowed"
    notes = [f"TotalSegmentator 'total' task ({mode}) on {details['device']}, {offline}"]
    roi = details["roi_subset"]
    if roi is not None:
        notes.append(
            f"predicted only the {len(roi)} of {n_classes} classes this catalog's anatomies need "
            f"(roi_subset): {', '.join(roi)}"
        )
    if details["unused_classes"]:
        notes.append(f"classes found but used by no anatomy: {', '.join(details['unused_classes'])}")
    if details["anatomies_not_in_task"]:
        notes.append(
            f"not segmented by the 'total' task: {', '.join(details['anatomies_not_in_task'])} "
            "(use --backend labelmap with a segmentation that has them)"
        )
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in details["timings_s"].items())
    notes.append(f"time per stage: {stages}")
    if details["network"]["blocked"]:
        notes.append(f"blocked network access (offline): {', '.join(details['network']['blocked'])}")
    return notes
