"""Benchmark: one fvlm-tiny demo training step, fp32 vs bf16 autocast, with and without the text
adapter (prints JSON).

A step here is what the demo's trainer runs per batch: the anatomy embeddings of 16 windows of
64^3 and the text features of the batch's distinct anatomy texts (from synthetic reports), then
one backward through both. The frozen MiniLM's token states are cached beforehand, as in
training, so the text side costs only the adapter.

Targets: the adapter adds at most 15% to an fp32 step. bf16 is reported, not targeted: its gain
depends on the CPU (``fvlm demo --precision auto`` measures it and uses bf16 only where it is
at least 1.15x faster).

    python benchmarks/bench_demo_step.py [--repeats 8] [--threads 1] [--smoke]
"""

from __future__ import annotations

import json

from timing import alternated_median_ms, bench_args, demo_batch, load_note, overhead_fields


def batch_texts(n: int = 16, seed: int = 0) -> list[str]:
    """The distinct anatomy texts of ``n`` synthetic phantoms' reports."""
    from fvlm_core.data.synth import make_phantom
    from fvlm_core.reports import decompose_report

    anatomies = ["lung", "heart", "esophagus", "aorta"]
    texts: set[str] = set()
    for i in range(n):
        report = make_phantom(seed, i, size_zyx=(32, 32, 32)).report
        dec = decompose_report(report.get("Findings_EN", ""), report.get("Impressions_EN", ""), anatomies)
        texts.update(dec.texts[a] for a in anatomies)
    return sorted(texts)


def main(argv=None) -> int:
    args = bench_args(__doc__, repeats=8, argv=argv)

    import torch

    from fvlm_core.model import FVLM, FVLMConfig, load_config
    from fvlm_core.model.text import TextCache

    image, labels = demo_batch()
    texts = batch_texts(len(image))

    steps = {}
    for adapter in (True, False):
        cfg = load_config("fvlm-tiny").to_dict()
        if not adapter:
            cfg["text"]["adapter_width"] = 0
        torch.manual_seed(0)
        model = FVLM(FVLMConfig.from_dict(cfg)).train()
        cache = TextCache()
        model.cache_text(texts, cache)  # the frozen encoder's part, cached as the trainer does

        def train_step(model=model, cache=cache, bf16=False):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                img = model.encode_image(image, labels).embeddings
                txt = model.encode_text(texts, cache)
            (img.float().sum() + txt.float().sum()).backward()

        name = "adapter" if adapter else "no_adapter"
        steps[f"fp32_{name}"] = train_step
        if adapter:
            steps[f"bf16_{name}"] = lambda model=model, fn=train_step: fn(model, bf16=True)
    ms = alternated_median_ms(steps, args.repeats)
    result = {
        "threads": args.threads,
        "distinct_texts_per_batch": len(texts),
        "train_step_ms": {k: round(v, 1) for k, v in ms.items()},
        **overhead_fields("adapter_overhead_fp32", ms, "fp32_adapter", "fp32_no_adapter", target_max=0.15),
        "bf16_speedup": round(ms["fp32_adapter"] / ms["bf16_adapter"], 3),
    }
    result.update(load_note())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
