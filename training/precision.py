"""Training precision: what ``train.precision`` resolves to, and whether bf16 pays on this CPU.

bf16 autocast is the GPU default. On a CPU it is a gamble: with native bf16 instructions
(AVX512-BF16, AMX) the demo's training step runs about 1.5x faster; without them it runs slower
than fp32. :func:`bf16_is_faster` settles it by timing the caller's own step both ways.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fvlm_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for ``train.precision`` on ``device``.

    ``auto`` is bf16 on a GPU that supports it and fp32 otherwise (a CPU's bf16 speed varies:
    ask for ``bf16`` explicitly, or decide with :func:`bf16_is_faster`). fp16 needs a GPU (its
    loss scaling is CUDA's).
    """
    import torch

    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {'|'.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32, auto or (on a CPU with bf16) bf16")
    return requested


def bf16_is_faster(step: Callable[[], None], repeats: int = 3, margin: float = 1.15) -> bool:
    """Whether ``step`` (a forward and backward, run on the CPU) is at least ``margin`` times
    faster under bf16 autocast than in fp32; the best of ``repeats`` timings after a warm-up each."""

    import torch

    def best(bf16: bool) -> float:
        times = []
        for i in range(repeats + 1):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                step()
            if i:  # the first call warms up (allocations, kernel selection)
                times.append(time.perf_counter() - t)
        return min(times)

    return best(False) >= margin * best(True)
