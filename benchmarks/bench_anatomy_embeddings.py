"""Benchmark: fvlm-base anatomy embeddings for one crop vs a bare ViT forward (prints JSON).

Three measurements, each in its own process so peak RSS is its own:

- ``fvlm``: ``FVLM.encode_image`` for one 112 x 256 x 352 crop with 4 anatomies (one ViT forward
  with fused attention, token membership, one pooling attention for all anatomies, projections).
  The model includes a BERT-base text encoder (CXR-BERT's size, randomly initialised: only its
  memory matters here).
- ``vit_sdpa``: the bare MONAI ViT-B forward with fused attention (torch SDPA).
- ``vit_explicit``: the same ViT with MONAI's explicit attention matrix (``use_flash_attention=False``),
  the reference implementation's baseline.

Targets (issue 3): one ViT forward per crop for all anatomies, ``fvlm`` at most 1.1x ``vit_sdpa``,
peak RSS under 3 GB. On a shared machine the separate medians drift with the load, so the ``fvlm``
process also times a bare encoder forward right after each call (``fvlm_over_vit_sdpa_paired``). fp32, ``--threads`` CPU threads (default 2).

    python benchmarks/bench_anatomy_embeddings.py [--repeats 5] [--threads 2] [--size 112 256 352]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import WINDOW, BenchParser, base_config, load_note, text_folder


def _labels(size):
    """Four anatomies shaped roughly like lungs, heart, esophagus and aorta in a chest crop."""
    import torch

    z, y, x = (torch.arange(s, dtype=torch.float32) for s in size)
    zz, yy, xx = z[:, None, None] / size[0], y[None, :, None] / size[1], x[None, None, :] / size[2]
    lab = torch.zeros(size, dtype=torch.uint8)
    lungs = (((xx - 0.3) / 0.2) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1) | (
        ((xx - 0.7) / 0.2) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1
    )
    lab[lungs.expand(size) & (zz > 0.05).expand(size)] = 1
    heart = ((xx - 0.55) / 0.15) ** 2 + ((yy - 0.45) / 0.15) ** 2 + ((zz - 0.3) / 0.3) ** 2 < 1
    lab[heart] = 2
    esophagus = ((xx - 0.5) / 0.02) ** 2 + ((yy - 0.7) / 0.03) ** 2 < 1
    lab[esophagus.expand(size)] = 3
    aorta = ((xx - 0.45) / 0.04) ** 2 + ((yy - 0.65) / 0.04) ** 2 < 1
    lab[aorta.expand(size)] = 4
    return lab[None]


def _child(mode: str, repeats: int, threads: int, size) -> dict:
    import torch

    torch.set_num_threads(threads)
    from fvlm_core.model import FVLM, FVLMConfig
    from fvlm_core.model.vision import ViTEncoder

    cfg = FVLMConfig.from_dict(base_config())
    torch.manual_seed(0)
    image = torch.rand(1, 1, *size)
    if mode == "fvlm":
        with tempfile.TemporaryDirectory() as tmp:
            d = base_config(text_folder(Path(tmp)))
            model = FVLM(FVLMConfig.from_dict(d), load_text_weights=False).eval()
        labels = _labels(size)
        calls = []
        model.visual_encoder.register_forward_hook(lambda *a: calls.append(1))

        def step():
            return model.encode_image(image, labels)
    else:
        enc = ViTEncoder(cfg.vision).eval()
        enc.set_flash_attention(mode == "vit_sdpa")

        def step():
            return enc(image)

    times, paired = [], []
    with torch.inference_mode():
        out = step()  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
            if mode == "fvlm":  # the bare encoder forward right after, in the same process and load
                n_calls = len(calls)
                t0 = time.perf_counter()
                model.visual_encoder(image)
                paired.append(times[-1] / (time.perf_counter() - t0))
                del calls[n_calls:]
    result = {
        "mode": mode,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "times_s": [round(t, 3) for t in times],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    if mode == "fvlm":
        result["vit_forwards_per_crop"] = len(calls) / (repeats + 1)
        result["paired_ratio_to_bare_vit"] = [round(r, 3) for r in paired]
        result["paired_ratio_median"] = round(statistics.median(paired), 3)
        result["present"] = out.present[0].tolist()
        result["tokens_per_anatomy"] = out.membership[0].sum(-1).tolist()
    return result


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=3, default=WINDOW, metavar=("Z", "Y", "X"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    size = tuple(args.size)
    if args.mode:
        print(json.dumps(_child(args.mode, args.repeats, args.threads, size)))
        return 0
    results = {}
    for mode in ("vit_sdpa", "vit_explicit", "fvlm"):
        cmd = [sys.executable, __file__, "--mode", mode, "--repeats", str(args.repeats)]
        cmd += ["--threads", str(args.threads), "--size", *map(str, size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    f, v, e = results["fvlm"], results["vit_sdpa"], results["vit_explicit"]
    summary = {
        "input_zyx": list(size),
        "threads": args.threads,
        "dtype": "float32",
        "torch": torch.__version__,
        **load_note(),
        "results": results,
        "fvlm_over_vit_sdpa": round(f["median_s"] / v["median_s"], 3),
        # robust under load: each fvlm call timed against a bare encoder forward right after it
        "fvlm_over_vit_sdpa_paired": f["paired_ratio_median"],
        "vit_explicit_over_vit_sdpa": round(e["median_s"] / v["median_s"], 3),
        "targets": {
            "one_vit_forward_per_crop": f["vit_forwards_per_crop"] == 1,
            "fvlm_at_most_1.1x_vit": f["paired_ratio_median"] <= 1.1,
            "peak_rss_under_3gb": f["peak_rss_gb"] < 3.0,
        },
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
