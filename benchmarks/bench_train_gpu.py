"""GPU training throughput of fvlm-base with the CT-RATE recipe's settings (prints JSON).

Needs a CUDA GPU: on a machine without one it says so and exits with status 2 (nothing runs).

What the recipes set (training/configs/ctrate-base.yaml and ctrate-paper.yaml): 14 crops of
112 x 256 x 352 per GPU (global batch 14 x GPUs), ``precision: auto`` = bf16 autocast on a GPU
that supports it, ``grad_checkpointing: false``, AdamW (lr 1e-4, weight decay 0.05), SDPA
attention (``vision.flash_attention: true``; on CUDA the fused kernels take the attention
dropout). One training step here is the trainer's: anatomy embeddings of the batch, the
batch's distinct descriptions through the trainable text encoder (BERT-base, CXR-BERT's size,
random weights), the fine-grained contrastive loss, backward, optimizer step.

For each setting (activation checkpointing off and on by default): samples/s and seconds per
step (median of ``--steps`` after ``--warmup``, CUDA-synchronised), and peak GPU memory
(``torch.cuda.max_memory_allocated``; reserved too). A setting that runs out of memory is
reported as such and the next one runs.

    python benchmarks/bench_train_gpu.py [--batch 14] [--steps 10] [--warmup 3]
        [--precision bf16|fp32] [--checkpointing off,on] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_anatomy_embeddings import _bert_base_folder  # noqa: E402
from bench_train_step import CONFIGS, fvlm_base, gpu_recipes, loss_of, step_inputs  # noqa: E402

NO_GPU_EXIT = 2


def no_gpu_reason(device: str) -> str | None:
    """Why this machine cannot run the benchmark on ``device``, or ``None`` when it can."""
    import torch

    if not device.startswith("cuda"):
        return f"--device must be a CUDA device (cuda or cuda:N), got {device!r}"
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU is available here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine; for the "
            "CPU training step use benchmarks/bench_train_step.py."
        )
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


def run_setting(args, checkpointing: bool, text_folder: Path) -> dict:
    """Train ``--warmup + --steps`` steps with one setting; timings and peak memory."""
    import torch

    from fvlm_core.loss import FineGrainedContrastiveLoss

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = fvlm_base(text_folder, {**CONFIGS["sdpa"], "ckpt": checkpointing}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    loss_fn = FineGrainedContrastiveLoss(disease_pairs=0.0, co_teaching_alpha=1.0)
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in step_inputs(args.batch, args.size).items()
    }
    bf16 = args.precision == "bf16"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    try:
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(model, loss_fn, batch)
            loss.backward()
            opt.step()
            model.clamp_temperature_()
            torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        step = statistics.median(times)
        result = {
            "grad_checkpointing": checkpointing,
            "step_s_median": round(step, 4),
            "samples_per_s": round(args.batch / step, 2),
            "loss_last": round(float(loss), 4),
        }
    except torch.cuda.OutOfMemoryError as exc:
        result = {"grad_checkpointing": checkpointing, "out_of_memory": str(exc).splitlines()[0]}
    result["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
    result["max_memory_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1024**3, 2)
    del model, opt, batch
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=14, help="crops per GPU (the recipes: 14)")
    p.add_argument("--size", type=int, nargs=3, default=(112, 256, 352), metavar=("Z", "Y", "X"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16: the recipes on a GPU")
    p.add_argument("--checkpointing", default="off,on", help="comma-separated: off, on")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.checkpointing.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        p.error(f"--checkpointing takes off, on or off,on; got {args.checkpointing!r}")
    reason = no_gpu_reason(args.device)
    if reason:
        print(f"bench_train_gpu: {reason}", file=sys.stderr)
        return NO_GPU_EXIT
    import torch

    if args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        print("bench_train_gpu: this GPU has no bf16; use --precision fp32", file=sys.stderr)
        return NO_GPU_EXIT
    torch.backends.cuda.matmul.allow_tf32 = True  # what a fp32 run on an Ampere+ GPU would use
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = _bert_base_folder(Path(tmp))
        for mode in modes:
            results.append(run_setting(args, mode == "on", folder))
            print(json.dumps(results[-1]), file=sys.stderr)
    summary = {
        "benchmark": f"fvlm-base training step on {torch.cuda.get_device_name(args.device)}",
        "batch_per_gpu": args.batch,
        "crop_zyx": list(args.size),
        "precision": args.precision,
        "optimizer": "AdamW (fused), lr 1e-4, weight decay 0.05",
        "text_encoder": "BERT-base (CXR-BERT's size), random weights, trainable",
        "settings": results,
        "gpu_recipes": gpu_recipes(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
