"""Shared pieces of the benchmarks: their set-up (the checkout's ``fvlm_core`` on ``sys.path``, a
command line with ``--smoke``), the yardstick (a bare ViT-B forward), the smoke size, the demo's
training batch and wall-clock medians.

Smoke size (``--smoke`` on every benchmark, or ``FVLM_BENCH_SMOKE=1``, which child processes
inherit): every stage runs, once, on fvlm-base's layout narrowed to width 48 (the same 12 layers
and heads, the same 112 x 256 x 352 inference window and 1232 tokens, BERT-base narrowed alike;
training steps on 32 x 64 x 64 crops, 16 tokens, through the ViT's interpolated position
embeddings, and on texts of at most 64 tokens), so that the test suite can check in seconds that a benchmark starts, runs its
stages and prints its fields. Its figures measure nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every benchmark imports this module first: fvlm_core from the checkout where none is installed (appended,
# so that an installed copy, the one gpu_check.py installs and checks, still comes first)
sys.path.append(str(ROOT))
SHARED = Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
SMOKE_ENV = "FVLM_BENCH_SMOKE"
#: fvlm-base's widths (hidden, embedding) and the smoke size's
BASE_WIDTH, SMOKE_WIDTH = (768, 256), (48, 32)
#: fvlm-base's input window (z, y, x), kept at the smoke size for inference
WINDOW = (112, 256, 352)
#: the training steps' crop at the smoke size: an attention matrix of 1232 tokens per head and
#: layer costs GBs in a backward whatever the width
SMOKE_CROP = (32, 64, 64)


def smoke() -> bool:
    """Whether this process runs at the smoke size (``FVLM_BENCH_SMOKE`` set and not ``0``)."""
    return os.environ.get(SMOKE_ENV, "0") not in ("", "0")


def train_crop() -> tuple[int, int, int]:
    """The crop (z, y, x) of a benchmarked training step: fvlm-base's window, small at the smoke size."""
    return SMOKE_CROP if smoke() else WINDOW


def add_smoke_argument(parser: argparse.ArgumentParser) -> None:
    """``--smoke``: run every stage once at the smoke size (sets ``FVLM_BENCH_SMOKE`` for children)."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run every stage once at a tiny size (width-48 models) to check that it works; measures nothing",
    )


def set_smoke(on: bool) -> bool:
    """Turn the smoke size on for this process and its children when ``on``; returns :func:`smoke`."""
    if on:
        os.environ[SMOKE_ENV] = "1"
    return smoke()


class BenchParser(argparse.ArgumentParser):
    """A benchmark's command line: described by the first line of its docstring, with ``--smoke``.
    :meth:`parse_args` turns the smoke size on when asked (:func:`set_smoke`); ``args.smoke`` then
    says whether it is on, asked here or inherited from the parent process (``FVLM_BENCH_SMOKE``)."""

    def __init__(self, doc: str) -> None:
        super().__init__(description=doc.splitlines()[0])
        add_smoke_argument(self)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        parsed.smoke = set_smoke(parsed.smoke)
        return parsed


def base_config(text_dir: str | os.PathLike | None = None) -> dict:
    """fvlm-base's config as a dict (narrowed at the smoke size), its text encoder read from
    ``text_dir`` when given (a :func:`text_folder`)."""
    from fvlm_core.model import load_config

    d = load_config("fvlm-base").to_dict()
    if smoke():
        hidden, embed = SMOKE_WIDTH
        d["vision"].update(hidden_size=hidden, mlp_dim=4 * hidden)
        d["embed_dim"] = embed
        d["text"]["max_length"] = 64  # texts padded to 384 cost GBs in a backward whatever the width
    if text_dir is not None:
        d["text"]["name_or_path"] = str(text_dir)
    return d


def _stand_ins():
    """``Testing/official_checkpoint.py``: the official checkpoint's and CXR-BERT's stand-ins."""
    testing = str(ROOT / "Testing")
    if testing not in sys.path:
        sys.path.insert(0, testing)
    import official_checkpoint

    return official_checkpoint


def text_folder(folder: Path) -> Path:
    """A local BERT-base folder (CXR-BERT's size; narrowed at the smoke size): config and
    tokenizer, no weights (build the model with ``load_text_weights=False``)."""
    return _stand_ins().bert_base_folder(folder, hidden=(SMOKE_WIDTH if smoke() else BASE_WIDTH)[0])


def official_model(out: Path, work: Path) -> Path:
    """fvlm-base in the official layout (narrowed at the smoke size) with random values, imported
    by the installed ``fvlm import-checkpoint`` with a :func:`text_folder`, as
    ``Testing/test_import_official.py`` builds it."""
    import json
    import subprocess

    import torch

    stand_ins = _stand_ins()
    shapes = json.loads((SHARED / "fvlm_reference" / "checkpoint_keys.json").read_text())
    if smoke():
        shapes = stand_ins.narrow_official_shapes(shapes, *SMOKE_WIDTH)
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"model": stand_ins.random_official_state(shapes)}, work / "fvlm_official.pth")
    bert = text_folder(work / "bert")  # letters in the vocabulary: any word tokenizes
    cmd = ["fvlm", "import-checkpoint", str(work / "fvlm_official.pth"), "--text-encoder", str(bert)]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"fvlm import-checkpoint failed ({proc.returncode}): {proc.stderr[-3000:]}")
    (work / "fvlm_official.pth").unlink()
    return out


def bench_args(doc: str, repeats: int, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of a benchmark described by ``doc``: ``--repeats``, ``--threads`` (default 1:
    the demo trains each model on one core) and ``--smoke`` (one repeat), parsed, with torch's
    thread count set."""
    import torch

    parser = BenchParser(doc)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    return args


def demo_batch(seed: int = 0):
    """A demo training batch: ``image (16, 1, 64, 64, 64)`` in [0, 1] and ``labels (16, 64, 64, 64)``
    uint8 with 4 anatomies (values 0-4); 2 windows at the smoke size."""
    import torch

    n = 2 if smoke() else 16
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 64, 64, 64, generator=gen)
    labels = torch.randint(0, 5, (n, 64, 64, 64), generator=gen, dtype=torch.uint8)
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
    """fvlm-base's image encoder (MONAI ViT-B, 112 x 256 x 352 input, SDPA attention; narrowed at
    the smoke size), random weights, in eval mode: the unit the speed targets are stated in."""
    import torch

    from fvlm_core.model import FVLMConfig
    from fvlm_core.model.vision import ViTEncoder

    torch.manual_seed(seed)
    return ViTEncoder(FVLMConfig.from_dict(base_config()).vision).eval()


def vit_b_forward_s(model=None, image=None) -> float:
    """Seconds of one bare ViT-B forward (no grad) on a ``(1, 1, 112, 256, 352)`` window."""
    import torch

    model = model if model is not None else vit_b()
    image = image if image is not None else torch.rand(1, 1, *WINDOW)
    with torch.inference_mode():
        t = time.perf_counter()
        model(image)
        return time.perf_counter() - t


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo``), or the platform's word for it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_note() -> dict[str, object]:
    """The machine (processor, CPU count), its load averages and whether this is a smoke run, to
    print next to any timing."""
    return {
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "smoke": smoke(),
    }
