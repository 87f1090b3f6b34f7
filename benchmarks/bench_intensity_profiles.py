"""Benchmark: the cost of anatomy intensity profiles (prints JSON).

- ``profiles_ms``: :func:`fvlm_core.model.profile.intensity_profiles` alone, for a demo batch
  (16 windows of 64^3, 4 anatomies, 32 bins) and for one fvlm-base crop (112 x 256 x 352).
- ``train_step_ms``: one fvlm-tiny forward + backward of the anatomy embeddings on the demo
  batch, with the profiles (as the bundled config) and without (``profile_bins: 0``).

Target: the profiles add at most 10% to a demo training step. One thread by default (the demo
trains each model on one core).

    python benchmarks/bench_intensity_profiles.py [--repeats 10] [--threads 1] [--smoke]
"""

from __future__ import annotations

import json

from timing import alternated_median_ms, bench_args, demo_batch, load_note, median_ms, overhead_fields


def main(argv=None) -> int:
    args = bench_args(__doc__, repeats=10, argv=argv)

    import torch

    from fvlm_core.model import FVLM, FVLMConfig, load_config
    from fvlm_core.model.profile import intensity_profiles

    demo_image, demo_labels = demo_batch()
    gen = torch.Generator().manual_seed(1)
    crop_image = torch.rand(1, 1, 112, 256, 352, generator=gen)
    crop_labels = torch.randint(0, 5, (1, 112, 256, 352), generator=gen, dtype=torch.uint8)
    profiles_ms = {
        "demo_batch_16x64^3": median_ms(
            lambda: intensity_profiles(demo_image, demo_labels, 4, 32, 0.216), args.repeats
        ),
        "base_crop_112x256x352": median_ms(
            lambda: intensity_profiles(crop_image, crop_labels, 4, 32, 0.003), args.repeats
        ),
    }

    steps = {}
    for name, bins in (("with_profiles", None), ("without_profiles", 0)):
        cfg = load_config("fvlm-tiny").to_dict()
        if bins is not None:
            cfg["profile_bins"] = bins
        torch.manual_seed(0)
        model = FVLM(FVLMConfig.from_dict(cfg), load_text_weights=False).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model.encode_image(demo_image, demo_labels).embeddings.sum().backward()

        steps[name] = step
    step_ms = alternated_median_ms(steps, args.repeats)
    result = {
        "threads": args.threads,
        "profiles_ms": {k: round(v, 2) for k, v in profiles_ms.items()},
        "train_step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        **overhead_fields("step_overhead", step_ms, "with_profiles", "without_profiles", target_max=0.10),
    }
    result.update(load_note())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
