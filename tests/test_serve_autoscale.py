"""Autoscaling shown, not only configured (issue 17): genpi's CPU serving app on the local Ray
goes from 1 model replica to 2 under concurrent HTTP load and back to 1 after it, with the
replica counts over time recorded (bench/serve_autoscale.py, the function the bench runs)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    name = "genpi_bench_serve_autoscale"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "serve_autoscale.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_delays_merge_into_genpis_own_autoscaling_options(tmp_path):
    """The bench serves genpi's deployment options; only Ray's reaction delays are added."""
    from genpi.config import load_config
    from genpi.serve.config import INGRESS, MODEL, deployment_options

    cfg = load_config(None, [f"store={tmp_path}", "serve.min_replicas=1", "serve.max_replicas=2",
                             "serve.target_ongoing_requests=2", "serve.max_ongoing_requests=16",
                             *_bench().REACTION])
    b = _bench()
    opts, plain = b.autoscale_options(cfg, b.DELAYS), deployment_options(cfg)
    for name in (MODEL, INGRESS):
        assert opts[name]["autoscaling_config"] == {**plain[name]["autoscaling_config"], **b.DELAYS}
        assert {k: v for k, v in opts[name].items() if k != "autoscaling_config"} == \
            {k: v for k, v in plain[name].items() if k != "autoscaling_config"}
    assert opts[MODEL]["autoscaling_config"]["max_replicas"] == 2
    assert opts[MODEL]["autoscaling_config"]["target_ongoing_requests"] == 2
    # genpi's own settings reach both deployments (unset, Ray's 30 s / 600 s apply)
    for name in (MODEL, INGRESS):
        assert opts[name]["autoscaling_config"]["upscale_delay_s"] == 1
        assert opts[name]["autoscaling_config"]["downscale_delay_s"] == 4
    assert "upscale_delay_s" not in deployment_options(load_config(None, [f"store={tmp_path}"]))[MODEL]["autoscaling_config"]
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**opts[MODEL]["autoscaling_config"])  # Ray accepts every field


def test_rates_split_by_phase_and_replica_count():
    b = _bench()
    timeline = [{"t": 0, "phase": "idle", "replicas": 1}, {"t": 2, "phase": "load", "replicas": 1},
                {"t": 6, "phase": "load", "replicas": 2}, {"t": 8, "phase": "cooldown", "replicas": 2},
                {"t": 10, "phase": "cooldown", "replicas": 1}]
    t0 = 100.0
    # 4 answers under 1 replica (2..6 s), 4 under 2 (6..8 s), one failed, one straggler after.
    done = [(t0 + t, 0.1, 200) for t in (2.5, 3, 4, 5.5, 6.1, 6.5, 7, 7.9)] + [(t0 + 7.5, 0.1, 500), (t0 + 8.2, 0.1, 200)]
    per_phase, by = b._rates(timeline, done, t0, (2, 8))
    assert per_phase["idle"] == {"seconds": 2, "requests": 0, "requests_per_s": 0.0}
    assert per_phase["load"] == {"seconds": 6, "requests": 8, "requests_per_s": 1.33}
    assert per_phase["cooldown"]["requests"] == 1
    assert by == {"1": {"seconds": 4, "requests": 4, "requests_per_s": 1.0},
                  "2": {"seconds": 2, "requests": 4, "requests_per_s": 2.0}}


@pytest.mark.slow  # ~2.5 min on 2 busy cores: a second replica process starts (~25 s) and stops
@pytest.mark.timeout(600)
# Ray 2.60 marks metrics_interval_s deprecated yet still pushes the handle's metrics at it (the
# replacement env variables must be set before Ray starts, not per deployment).
@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_load_adds_a_replica_and_idle_removes_it(ray_local, tiny_model_dir, tmp_path):
    from ray import serve

    b = _bench()
    cfg, models = b.prepare(str(tiny_model_dir), str(tmp_path / "store"), 3, b._bench_serve()._free_port())
    try:
        res = b.run_autoscale(cfg, models, clients=8, max_tokens=16, baseline_s=4, load_s=20, hold_s=5,
                              load_max_s=150, cooldown_max_s=90, settle_s=3)
    finally:
        serve.shutdown()
    print(b.summary(res))
    tl = res["timeline"]
    phases = [p["phase"] for p in tl]
    # The phases come in order, each polled several times, about once a second.
    assert phases == sorted(phases, key=["idle", "load", "cooldown"].index)
    assert all(phases.count(ph) >= 3 for ph in ("idle", "load", "cooldown")), phases
    assert all(0 <= b2["t"] - a["t"] < 5 for a, b2 in zip(tl, tl[1:])), [p["t"] for p in tl]
    assert res["errors"] == 0, res["first_error"]
    # Idle: one replica, nothing in flight.
    assert all(p["replicas"] == 1 and p["in_flight"] == 0 for p in tl if p["phase"] == "idle")
    # Load: 8 clients in flight, and the autoscaler adds the second replica (and no third).
    load = [p for p in tl if p["phase"] == "load"]
    assert max(p["in_flight"] for p in load) == 8
    assert load[0]["replicas"] == 1 and any(p["replicas"] == 2 for p in load)
    assert res["max_replicas_reached"] == 2 and all(p["replicas"] + p["starting"] <= 2 for p in tl)
    assert res["scale_up_decided_s"] is not None and res["scale_up_s"] is not None
    assert 0 < res["scale_up_decided_s"] <= res["scale_up_s"] < res["load_end_s"] - res["load_start_s"]
    # Both replica counts served requests under load.
    assert res["load_by_replicas"]["1"]["requests"] > 0 and res["load_by_replicas"]["2"]["requests"] > 0
    # After the load: back down to one replica, and it stays there.
    cool = [p for p in tl if p["phase"] == "cooldown"]
    assert cool[0]["replicas"] == 2 and cool[-1]["replicas"] == 1 and res["replicas_after"] == 1
    assert res["scale_down_s"] is not None and res["scale_down_s"] > 0
    first_down = next(i for i, p in enumerate(cool) if p["replicas"] == 1)
    assert all(p["replicas"] == 1 for p in cool[first_down:])
    assert cool[-1]["in_flight"] == 0
