"""bench/serve.py --quick's long-tail row (issue 17): many published adapters, a Zipf-like
request mix, an adapter cache far smaller than the adapters requested; batched vs one at a
time on the same request sequence, every figure consistent with what the replica counted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_zipf_picks_are_a_long_tail():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    zipf_picks = module.zipf_picks

    ids = [f"t{i}" for i in range(300)]
    picks = zipf_picks(ids, 5000)
    assert picks == zipf_picks(ids, 5000)  # seeded: both arms get the same sequence
    counts = sorted((picks.count(i) for i in set(picks)), reverse=True)
    top8 = sum(counts[:8]) / len(picks)
    assert 0.4 < top8 < 0.65 and len(counts) > 200, (top8, len(counts))
    assert picks.count("t0") > 10 * picks.count("t30") > 0


@pytest.mark.slow  # 4 min on 2 cores under load (Ray start, two deployments per arm, 44 adapters published)
def test_long_tail_row_quick(tmp_path):
    """Small sizes (40 adapters, 40 requests per row), bench/serve.py run as a user runs it."""
    adapters, tail, n, cache = 4, 40, 40, 8
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--quick", "--store", str(tmp_path / "s"),
                           "--out", str(tmp_path / "out"), "--adapters", str(adapters), "--tail-adapters", str(tail),
                           "--load-requests", str(n), "--clients", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "out").glob("serve-*.json")
    ul = json.loads(path.read_text())["under_load"]
    lt = ul["long_tail"]
    assert lt["adapters"] == tail and lt["adapter_cache"] == cache and cache < lt["distinct_requested"] <= tail
    for arm in ("batched", "one_at_a_time"):
        warm, r = ul[arm]["cache"], lt[arm]
        # The first row's adapters fit the cache after its warm-up: nothing read or loaded again.
        assert warm["adapter_reads"] == warm["slot_loads"] == 0, warm
        assert r["requests"] == n and r["errors"] == 0, r
        c = r["cache"]
        # One slot acquisition per request (every tail request names an adapter) ...
        assert c["slot_hits"] + c["slot_loads"] == n, c
        # ... each requested adapter read and loaded at least once; beyond the free slots a load evicts.
        assert c["adapter_reads"] >= lt["distinct_requested"] and c["slot_loads"] >= lt["distinct_requested"], c
        assert c["slot_evictions"] >= c["slot_loads"] - (cache - adapters) > 0, c
        assert r["latency_ms_p50"] <= r["latency_ms_p95"]
    assert lt["batched"]["cache"]["max_rows_seen"] > 1 and lt["one_at_a_time"]["cache"]["max_rows_seen"] == 1
    assert lt["requests_per_s_ratio"] == lt["batched"]["requests_per_s"] / lt["one_at_a_time"]["requests_per_s"]
    assert "long tail: 40 adapters" in proc.stdout
