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
