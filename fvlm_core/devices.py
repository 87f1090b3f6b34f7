"""Which torch device to run on: one rule for the CLI, training, the Slicer module and checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fvlm_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Names a user may give (``gpu`` is the Slicer panel's word for ``cuda``).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps", "gpu")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for a user's choice; a requested device that is absent is an error.

    Args:
        device: ``auto`` (CUDA, else Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``gpu``
            (= ``cuda``), ``mps``, or a ``torch.device``.
        local_rank: under torchrun, the process's GPU: ``cuda`` (and ``auto`` on a CUDA machine)
            become ``cuda:<local_rank>``.

    Raises:
        ConfigError: the name is unknown, or the device is not available to this PyTorch.
    """
    import torch

    name = str(device or "auto").strip().lower()
    if name == "gpu":
        name = "cuda"
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif _mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            built = "a CUDA build" if torch.version.cuda else f"a CPU-only build ({torch.__version__})"
            raise ConfigError(
                f"device {name}: no CUDA GPU is available to PyTorch (this is {built}). "
                "Use device cpu (or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU."
            )
        if name == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"device {name!r}: use cuda or cuda:N with N a GPU index ({exc})") from None
    if name == "mps":
        if not _mps_available():
            raise ConfigError("device mps: Apple Metal (MPS) is not available here. Use cpu or auto.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device {str(device)!r}: use one of {', '.join(DEVICE_CHOICES)}.")
