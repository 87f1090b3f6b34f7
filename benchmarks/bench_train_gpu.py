"""Training step of fvlm-base with the CT-RATE recipe's GPU settings: time and memory (prints JSON).

Needs a CUDA GPU: on a machine without one it says so and exits with status 2 (nothing runs),
unless ``--device cpu`` asks for the same steps on the CPU (memory is then the process's peak
RSS; at full size that is far too slow and large for a laptop: use ``--smoke`` or a small
``--batch``).

What the recipe sets (training/configs/ctrate-base.yaml; ctrate-paper.yaml alike): 14 crops of
112 x 256 x 352 per GPU (``train.batch_size``, the default ``--batch``), ``precision: auto`` =
bf16 autocast on a GPU that supports it, ``grad_checkpointing: false``, AdamW (lr 1e-4, weight
decay 0.01), SDPA attention (``vision.flash_attention: true``; on CUDA the fused kernels take
the attention dropout). One step is the trainer's: anatomy embeddings of the batch, the
batch's distinct descriptions through the trainable text encoder (BERT-base, CXR-BERT's size,
random weights), the fine-grained contrastive loss, backward, optimizer step.

Settings, in one process, one after the other: the recipe's (``--checkpointing off``), with
activation checkpointing (``on``), and with ``--reference-like`` the public code's way on the
same device: fp32 without TF32 matrix products, MONAI's explicit attention, every text padded
to 384 tokens. For each: seconds per step (median of ``--steps`` after ``--warmup``,
synchronised), samples/s, peak memory (``torch.cuda.max_memory_allocated`` and reserved; on the
CPU the peak RSS so far), and a bare ViT-B forward (one window, no grad, the setting's
precision) timed right after, so that the step is also stated in bare forwards of this device
(``step_in_bare_forwards``). A setting that runs out of memory is reported as such and the next
one runs. ``speedup_vs_reference_like`` compares the recipe's step with the public code's way
measured in the same run.

    python benchmarks/bench_train_gpu.py [--batch 14] [--steps 10] [--warmup 3] [--reference-like]
        [--precision bf16|fp32] [--checkpointing off,on] [--device cuda:0]
    python benchmarks/bench_train_gpu.py --device cpu --smoke   # every stage once, tiny widths
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_train_step import CONFIGS, fvlm_base, gpu_recipes, loss_of, step_inputs
from timing import BenchParser, load_note, peak_rss_mb, text_folder, train_crop

NO_GPU_EXIT = 2
RECIPE_BATCH = int(gpu_recipes()["ctrate-base"]["batch_size"] or 14)


def no_gpu_reason(device: str) -> str | None:
    """Why this machine cannot run the benchmark on ``device``, or ``None`` when it can."""
    import torch

    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"--device must be a CUDA device (cuda or cuda:N) or cpu, got {device!r}"
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU is available here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, or "
            "give --device cpu (with --smoke or a small --batch) for the same steps on the CPU."
        )
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


def settings(args: argparse.Namespace) -> list[dict]:
    """The settings to run: the recipe's precision with checkpointing off and/or on, then the
    public code's way (``--reference-like``)."""
    out = [
        {"name": f"{args.precision}" + ("_ckpt" if mode == "on" else ""), "config": "sdpa"}
        | {"precision": args.precision, "ckpt": mode == "on", "tf32": True}
        for mode in args.checkpointing
    ]
    if args.reference_like:
        out.append(
            {"name": "reference_like", "config": "reference_like", "precision": "fp32", "ckpt": False}
            | {"tf32": False}
        )
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {
            "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1024**3, 2),
            "max_memory_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1024**3, 2),
        }
    return {"peak_rss_gb_so_far": round(peak_rss_mb() / 1024, 2)}


def _bare_forward_s(model, image, device, bf16: bool) -> float:
    """One bare forward of the model's ViT on one window, in the setting's precision."""
    import torch

    enc = model.visual_encoder
    enc.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        enc(image[:1])  # warm-up (eval-mode kernels)
        _sync(device)
        t = time.perf_counter()
        enc(image[:1])
        _sync(device)
        out = time.perf_counter() - t
    model.train()
    return out


def run_setting(args: argparse.Namespace, setting: dict, folder: Path) -> dict:
    """Train ``--warmup + --steps`` steps with one setting; timings, memory, a bare forward."""
    import torch

    from fvlm_core.loss import FineGrainedContrastiveLoss

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = setting["tf32"]
    torch.manual_seed(0)
    model = fvlm_base(folder, {**CONFIGS[setting["config"]], "ckpt": setting["ckpt"]}).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda"
    )  # the recipe's optimizer (the trainer's fused kernel on a GPU)
    loss_fn = FineGrainedContrastiveLoss(disease_pairs=0.0, co_teaching_alpha=1.0)
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in step_inputs(args.batch, args.size).items()
    }
    bf16 = setting["precision"] == "bf16"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    result = {k: setting[k] for k in ("name", "config", "precision", "tf32")}
    result["grad_checkpointing"] = setting["ckpt"]
    try:
        for i in range(args.warmup + args.steps):
            _sync(device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(model, loss_fn, batch)
            loss.backward()
            opt.step()
            model.clamp_temperature_()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        step = statistics.median(times)
        result |= _memory(device)
        bare = _bare_forward_s(model, batch["image"], device, bf16)
        result |= {
            "step_s_median": round(step, 4),
            "samples_per_s": round(args.batch / step, 2),
            "bare_vit_forward_s": round(bare, 4),
            "step_in_bare_forwards": round(step / bare, 2),
            "loss_last": round(float(loss), 4),
        }
    except torch.cuda.OutOfMemoryError as exc:
        result |= {"out_of_memory": str(exc).splitlines()[0], **_memory(device)}
    del model, opt, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def summarise(args: argparse.Namespace, results: list[dict]) -> dict:
    import torch

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = {
        "benchmark": f"fvlm-base training step on {name}",
        "device": args.device,
        "device_name": name,
        "batch_per_gpu": args.batch,
        "crop_zyx": list(args.size),
        "precision": args.precision,
        "optimizer": "AdamW, lr 1e-4, weight decay 0.01 (fused on a GPU)",
        "text_encoder": "BERT-base (CXR-BERT's size), random weights, trainable",
        "settings": results,
        "gpu_recipes": gpu_recipes(),
        "torch": torch.__version__,
        **load_note(),
    }
    done = {r["name"]: r for r in results if "step_s_median" in r}
    recipe, like = done.get(args.precision), done.get("reference_like")
    if recipe and like:  # the same device, the same run
        out["speedup_vs_reference_like"] = round(like["step_s_median"] / recipe["step_s_median"], 2)
    return out


def main(argv=None) -> int:
    p = BenchParser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same steps on the CPU)")
    p.add_argument(
        "--batch", type=int, default=RECIPE_BATCH, help=f"crops per GPU (ctrate-base: {RECIPE_BATCH})"
    )
    p.add_argument(
        "--size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="crop (112 256 352; smoke 32 64 64)"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16: the recipes on a GPU")
    p.add_argument("--checkpointing", default="off,on", help="comma-separated: off, on")
    p.add_argument(
        "--reference-like",
        action="store_true",
        help="also the public code's way: fp32 without TF32, explicit attention, texts padded to 384",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup = min(args.batch, 2), 1, 1
    args.size = tuple(args.size or train_crop())
    args.checkpointing = [m.strip() for m in args.checkpointing.split(",") if m.strip()]
    if not args.checkpointing or any(m not in ("off", "on") for m in args.checkpointing):
        p.error("--checkpointing takes off, on or off,on")
    reason = no_gpu_reason(args.device)
    if reason:
        print(f"bench_train_gpu: {reason}", file=sys.stderr)
        return NO_GPU_EXIT
    import torch

    if args.precision == "bf16" and args.device != "cpu" and not torch.cuda.is_bf16_supported():
        print("bench_train_gpu: this GPU has no bf16; use --precision fp32", file=sys.stderr)
        return NO_GPU_EXIT
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = text_folder(Path(tmp))
        for setting in settings(args):
            results.append(run_setting(args, setting, folder))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps(summarise(args, results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
