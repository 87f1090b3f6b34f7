"""Shared pieces of the benchmarks: the demo's training batch and wall-clock medians."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def bench_args(description: str, repeats: int) -> argparse.Namespace:
    """The benchmarks' ``--repeats`` and ``--threads`` (default 1: the demo trains each model on
    one core), parsed, with torch's thread count set."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def demo_batch(seed: int = 0):
    """A demo training batch: ``image (16, 1, 64, 64, 64)`` in [0, 1] and ``labels (16, 64, 64, 64)``
    uint8 with 4 anatomies (values 0-4)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(16, 1, 64, 64, 64, generator=gen)
    labels = torch.randint(0, 5, (16, 64, 64, 64), generator=gen, dtype=torch.uint8)
    return image, labels


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    return alternated_median_ms({"fn": fn}, repeats)["fn"]


def alternated_median_ms(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each step, timed in turn (one warm-up call each first), so that drift
    in the machine's load hits all of them alike."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def overhead_fields(
    name: str, ms: dict[str, float], with_step: str, without_step: str, target_max: float
) -> dict[str, object]:
    """How much step ``with_step`` adds to ``without_step`` (a fraction, as ``name``), the target
    it is held to (``target_<name>_max``) and ``meets_target``, for a benchmark's JSON."""
    overhead = ms[with_step] / ms[without_step] - 1
    return {
        name: round(overhead, 4),
        f"target_{name}_max": target_max,
        "meets_target": overhead <= target_max,
    }


# --- yardsticks and process measurements (bench_builtin_segmenter, bench_train_step, bench_analyze)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def vit_b(seed: int = 0):
    """fvlm-base's image encoder (MONAI ViT-B, 112 x 256 x 352 input, SDPA attention), random
    weights, in eval mode: the unit the speed targets are stated in."""
    import torch

    from fvlm_core.model import load_config
    from fvlm_core.model.vision import ViTEncoder

    torch.manual_seed(seed)
    return ViTEncoder(load_config("fvlm-base").vision).eval()


def vit_b_forward_s(model=None, image=None) -> float:
    """Seconds of one bare ViT-B forward (no grad) on a ``(1, 1, 112, 256, 352)`` window."""
    import torch

    model = model if model is not None else vit_b()
    image = image if image is not None else torch.rand(1, 1, 112, 256, 352)
    with torch.inference_mode():
        t = time.perf_counter()
        model(image)
        return time.perf_counter() - t


def load_note() -> dict[str, object]:
    """The machine's load averages and CPU count, to print next to any timing."""
    import os

    return {"load_average_1_5_15": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}
