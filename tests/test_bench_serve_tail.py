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


def _serve_store():
    """bench/serve_store.py, loaded without putting bench/ on sys.path (its common.py, train.py
    would shadow other modules of those names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_store", REPO / "bench" / "serve_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_read_figures_tell_a_first_read_from_a_read_again():
    """A row's reads come from the replica's log: an adapter read before (in the log before the
    row, or earlier in the row) is a read again, on an object store from the local copy."""
    rf = _serve_store().read_figures
    before = {"adapter_reads": 2, "adapter_read_log": [("a@1", 5.0), ("b@1", 7.0)]}
    after = {"adapter_reads": 6, "adapter_read_log": before["adapter_read_log"] + [
        ("c@1", 100.0), ("a@1", 10.0), ("c@1", 20.0), ("d@1", 300.0)]}
    f = rf(before, after)
    assert f["first_read_ms"] == {"n": 2, "mean": 200.0, "p50": 200.0, "p95": 290.0}
    assert f["reread_ms"]["n"] == 2 and f["reread_ms"]["mean"] == 15.0
    assert f["adapter_read_ms"]["n"] == 4 and f["adapter_read_ms"]["p95"] <= 300.0
    assert rf(after, after) == {"adapter_read_ms": None, "first_read_ms": None, "reread_ms": None}


def test_s3_store_serves_a_copy_of_the_published_store(tmp_path, monkeypatch):
    """--s3's store: a moto server on 127.0.0.1 holding what the app reads (registry records,
    DONE, adapter folders), reached through the AWS_* variables, which are restored after."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import os

    import torch
    from safetensors.torch import save_file

    from genpi.store import Store, fingerprint

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
              "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    local = Store(tmp_path / "serve-store")
    for i in range(3):
        fp, d = fingerprint({"i": i}), tmp_path / f"adapter{i}"
        d.mkdir()
        save_file({"w": torch.full((4,), float(i))}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"r": 2}))
        pdir = local.prompt_dir(f"p{i}", fp)
        local.write_json(f"{pdir}/spec.json", {"entry": {"prompt": f"prompt {i}"}})
        local.put_dir(str(d), f"{pdir}/adapter")
        local.publish(f"p{i}", fp)
    bench = _serve_store()
    with bench.s3_store(str(tmp_path / "serve-store")) as uri:
        assert uri == "s3://genpi-bench/serve-store"
        assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        remote = Store(uri, create=False)
        assert remote.registry() == local.registry() and len(local.registry()) == 3
        assert all(remote.is_done(i, e["fingerprint"]) for i, e in remote.registry().items())
        times = bench.load_times({"local": str(tmp_path / "serve-store"), "s3": uri}, 2)
        assert times["local"]["n"] == times["s3"]["n"] == 2 and times["s3"]["mean"] > 0
    assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_ACCESS_KEY_ID" not in os.environ


@pytest.mark.slow  # ~2 min on 2 busy cores: Ray start, two deployments per arm, the S3 server
@pytest.mark.timeout(900)
def test_long_tail_row_on_s3(tmp_path):
    """bench/serve.py --quick --s3 at tiny sizes: the long tail served from the S3 server, each
    arm's first read of an adapter a download, timed next to a local store's load time."""
    tail, n, loads = 12, 16, 5
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--quick", "--s3",
                           "--store", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--adapters", "2",
                           "--tail-adapters", str(tail), "--load-requests", str(n), "--clients", "4",
                           "--load-time-adapters", str(loads)],
                          cwd=REPO, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "out").glob("serve-*.json")
    res = json.loads(path.read_text())
    assert res["store"] == "s3://genpi-bench/s"
    assert {k: v["n"] for k, v in res["adapter_load_ms"].items()} == {"local": loads, "s3": loads}
    lt = res["under_load"]["long_tail"]
    for arm in ("batched", "one_at_a_time"):
        r, c = lt[arm], lt[arm]["cache"]
        assert r["requests"] == n and r["errors"] == 0, r
        # An empty adapter folder per arm: every requested adapter downloaded once, and timed.
        assert c["first_read_ms"]["n"] == lt["distinct_requested"], c
        again = (c["reread_ms"] or {"n": 0})["n"]
        assert c["adapter_reads"] == c["adapter_read_ms"]["n"] == c["first_read_ms"]["n"] + again, c
        assert 0 < c["adapter_read_ms"]["p50"] <= c["adapter_read_ms"]["p95"], c
    assert "batched: adapter reads from the S3 store, first read" in proc.stdout
    assert "one adapter loaded at a time" in proc.stdout and "s3 store" in proc.stdout
