"""TotalSegmentator backend (optional extra ``pip install "fvlm[totalseg]"``).

Runs TotalSegmentator's "total" task through its Python API and merges the classes into a
catalog. It never downloads weights unless ``allow_download=True``: without weights it stops
with a message saying how to get them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fvlm_core.anatomy import CTRATE_CATALOG, AnatomyCatalog
from fvlm_core.devices import resolve_device
from fvlm_core.errors import ConfigError, DependencyError
from fvlm_core.io import CTVolume, read_label_map, write_image
from fvlm_core.segmentation.base import AnatomySegmentation, Progress
from fvlm_core.segmentation.labelmap import merge_labels
from fvlm_core.segmentation.totalseg_classes import TOTAL_CLASS_MAP

if TYPE_CHECKING:
    import torch

#: nnU-Net datasets that ``totalseg_download_weights -t total`` / ``-t total_fast`` fetch
#: (TotalSegmentator 2.x): full resolution (5 parts) or ``--fast`` (3 mm), each with the 6 mm model.
TOTAL_DATASETS = {False: (291, 292, 293, 294, 295, 298), True: (297, 298)}

INSTALL_HINT = 'pip install "fvlm[totalseg]"  (or: pip install totalsegmentator)'


def totalseg_home() -> Path:
    """Folder TotalSegmentator keeps its weights in (``TOTALSEG_HOME_DIR`` or ``~/.totalsegmentator``)."""
    return Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))


def weights_dir() -> Path:
    """``TOTALSEG_WEIGHTS_PATH`` if set, else ``<home>/nnunet/results``."""
    env = os.environ.get("TOTALSEG_WEIGHTS_PATH")
    return Path(env) if env else totalseg_home() / "nnunet" / "results"


def missing_weights(fast: bool) -> list[int]:
    """Dataset ids of the "total" task whose weights are not on disk."""
    root = weights_dir()
    have = {p.name.split("_")[0] for p in root.glob("Dataset*")} if root.is_dir() else set()
    return [d for d in TOTAL_DATASETS[fast] if f"Dataset{d}" not in have]


def totalsegmentator_available() -> bool:
    return importlib.util.find_spec("totalsegmentator") is not None


def totalseg_device(device: torch.device) -> str:
    """TotalSegmentator's word for a torch device: ``gpu`` / ``gpu:N``, ``cpu`` or ``mps``.

    Its Python API accepts only these (``validate_device_type_api``) and maps ``gpu`` to ``cuda:0``.
    """
    if device.type == "cuda":
        return "gpu" if device.index is None else f"gpu:{device.index}"
    if device.type in ("cpu", "mps"):
        return device.type
    raise ConfigError(f"device {device}: TotalSegmentator runs on gpu, cpu or mps only")


class TotalSegmentatorBackend:
    """Segment with TotalSegmentator ("total" task) and merge its classes into a catalog.

    Args:
        fast: use the 3 mm ``--fast`` model (needs only dataset 297).
        device: a name :func:`fvlm_core.devices.resolve_device` takes (``auto``: CUDA, else MPS,
            else CPU; ``gpu`` = ``cuda``) or a ``torch.device``; checked by :meth:`check`.
        allow_download: let TotalSegmentator download missing weights (internet needed).
    """

    name = "totalsegmentator"

    def __init__(
        self, fast: bool = False, device: str | torch.device = "auto", allow_download: bool = False
    ) -> None:
        self.fast = fast
        self.device = device
        self.allow_download = allow_download

    def check(self) -> None:
        """Refuse to start when something the run needs is missing.

        Raises:
            DependencyError: the package or its weights are missing.
            ConfigError: the device is unknown or not available here.
        """
        if not totalsegmentator_available():
            raise DependencyError(
                f"the totalsegmentator backend needs the TotalSegmentator package: {INSTALL_HINT}"
            )
        missing = missing_weights(self.fast)
        if missing and not self.allow_download:
            raise DependencyError(
                f"TotalSegmentator weights for the 'total' task{' (--fast)' if self.fast else ''} are missing "
                f"from {weights_dir()} (datasets {', '.join(map(str, missing))}). Get them on a machine with "
                "internet access with `totalseg_download_weights -t total"
                f"{'_fast' if self.fast else ''}`, copy the folder and set TOTALSEG_HOME_DIR to it, or pass "
                "--allow-download to let TotalSegmentator download them now."
            )
        self.device_word()

    def device_word(self) -> str:
        """TotalSegmentator's word for :attr:`device` (resolved by :func:`resolve_device`)."""
        return totalseg_device(resolve_device(self.device))

    def segment(
        self, ct: CTVolume, catalog: AnatomyCatalog = CTRATE_CATALOG, progress: Progress | None = None
    ) -> AnatomySegmentation:
        self.check()
        from totalsegmentator.python_api import totalsegmentator

        if progress:
            progress("TotalSegmentator", 0.0)
        with tempfile.TemporaryDirectory(prefix="fvlm-totalseg-") as tmp:
            src = Path(tmp) / "ct.nii.gz"
            out = Path(tmp) / "seg.nii.gz"
            write_image(ct.array, ct.geometry, src)
            totalsegmentator(
                str(src), str(out), ml=True, fast=self.fast, device=self.device_word(), quiet=True
            )
            lab = read_label_map(out, reference=ct.geometry).array
        if progress:
            progress("done", 1.0)
        labelmap = merge_labels(lab, TOTAL_CLASS_MAP, catalog)
        return AnatomySegmentation.from_labelmap(labelmap, ct.geometry, catalog, self.name)
