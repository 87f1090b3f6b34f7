"""benchmarks/bench_store.py runs end to end at a smoke size and reports every field the README's
numbers come from (the full sizes are minutes of work: run them by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_store_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_store.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    e = r["embed"]
    assert e["scans"] == 2 and e["windows"] >= 2 and e["throughput_ratio_to_bare_forward"] > 0
    assert {"meets_target", "target_ratio_min", "encoder_s_per_scan"} <= e.keys()
    q = r["query"]
    assert q["rows"] == q["scans"] * q["findings"] == 200 * 16 and q["prompts_encoded"] == 0
    assert q["store_bytes_per_scan"] > 4 * 256 * 4  # at least the raw float32 embeddings
    s = r["search"]["sizes"]
    assert set(s) == {"1000", "10000"}
    for v in s.values():
        assert 0.0 <= v["recall_at_10"] <= 1.0 and v["exact_ms_median"] > 0 and v["index_ms_median"] > 0
    assert s["1000"]["recall_at_10"] == 1.0  # the index probes every list of a small store
