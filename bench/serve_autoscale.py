"""Autoscaling shown, not only configured: the CPU serving app on a local Ray adds a model
replica under load and removes it after, with the replica counts over time.

    python bench/serve_autoscale.py --quick          # tiny random model, ~2 min
    python bench/serve_autoscale.py --model embedded --clients 8 --load-s 60

Phases, one after another on one running app (genpi's own deployments and options,
serve.min_replicas=1, serve.max_replicas=2, a low serve.target_ongoing_requests):
  idle      no requests: the model deployment stays at 1 replica;
  load      `--clients` concurrent clients (httpx, closed loop: each sends its next request
            when its last one is answered) over published adapters and the bare base, for
            `--load-s` seconds, extended (up to `--load-max-s`) until the added replica has
            served for `--hold-s` seconds, so the load rows measure 2 replicas too;
  cooldown  no requests again, until the deployment is back at 1 replica (`--cooldown-max-s`).
Every ~1 s the RUNNING (and STARTING) replicas of each deployment (serve.status()) and the
client requests in flight are recorded. JSON (timeline, time to scale up after the load
starts, time to scale down after it ends, most replicas, requests/s per phase and per replica
count) goes to <--out>/serve-autoscale.json.

The reaction delays are set short: serve.upscale_delay_s=1 and serve.downscale_delay_s=4
(genpi's settings; Ray's defaults are 30 s and 600 s), and Ray's 30 s averaging window and
metrics interval, which genpi does not expose, are merged into genpi's deployment options
(genpi.serve.config.deployment_options) for both deployments, as an operator would in the
YAML `genpi serve --print-config` writes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GENPI_CACHE", str(REPO / ".cache" / "genpi"))

# Fast reactions, so a bench of minutes shows both directions.
REACTION = ["serve.upscale_delay_s=1", "serve.downscale_delay_s=4"]
DELAYS = {"look_back_period_s": 2.0, "metrics_interval_s": 0.5}


def _bench_serve():
    """bench/serve.py as a module (its tiny model, untrained adapters and questions), loaded by
    path: this file is also imported by the tests, where bench/ is not on sys.path."""
    name = "genpi_bench_serve"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "serve.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def autoscale_options(cfg, delays: dict) -> dict:
    """genpi's deployment options with the reaction delays merged into each autoscaling_config."""
    from genpi.serve.config import deployment_options

    opts = deployment_options(cfg)
    for o in opts.values():
        o["autoscaling_config"] = {**o["autoscaling_config"], **delays}
    return opts


def replica_counts() -> dict:
    """{deployment: {"running": n, "starting": n}} of genpi's app, from the Serve controller."""
    from ray import serve

    from genpi.serve.config import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    out = {}
    for name, d in (app.deployments.items() if app else ()):
        states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
        out[name] = {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0)}
    return out


class Load:
    """`clients` threads in a closed loop over `models`, until stop(); counts what is in flight."""

    def __init__(self, url: str, models: list[str], clients: int, max_tokens: int, questions: list[str]):
        self.url, self.models, self.clients, self.max_tokens, self.questions = url, models, clients, max_tokens, questions
        self.lock = threading.Lock()
        self.in_flight = 0
        self.done: list[tuple[float, float, int]] = []  # (finished at, latency s, HTTP status or 0)
        self.first_error: str | None = None
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import httpx

        n = i
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self._stop.is_set():
                body = {"model": self.models[n % len(self.models)], "temperature": 0, "max_tokens": self.max_tokens,
                        "messages": [{"role": "user", "content": self.questions[n % len(self.questions)]}]}
                n += self.clients
                with self.lock:
                    self.in_flight += 1
                t0 = time.time()
                try:
                    status = c.post("/v1/chat/completions", json=body).status_code
                    err = None if status == 200 else f"HTTP {status}"
                except httpx.HTTPError as e:
                    status, err = 0, f"{type(e).__name__}: {e}"
                with self.lock:
                    self.in_flight -= 1
                    self.done.append((time.time(), time.time() - t0, status))
                    if err and self.first_error is None:
                        self.first_error = err

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120) -> None:
        for t in self.threads:
            t.join(timeout)


def _rates(timeline: list[dict], done: list[tuple[float, float, int]], t0: float, load_window: tuple[float, float]):
    """Requests answered per second in each phase, and in the load phase per model replica count
    (the count at the poll before each answer; time at each count from the polls)."""
    phases: dict[str, dict] = {}
    for i, p in enumerate(timeline):
        end = timeline[i + 1]["t"] if i + 1 < len(timeline) else p["t"]
        ph = phases.setdefault(p["phase"], {"start": p["t"], "end": end})
        ph["end"] = end
    per_phase = {}
    for name, ph in phases.items():
        n = sum(1 for f, _, s in done if ph["start"] <= f - t0 < ph["end"] and s == 200)
        secs = ph["end"] - ph["start"]
        per_phase[name] = {"seconds": round(secs, 1), "requests": n, "requests_per_s": round(n / secs, 2) if secs else 0}
    by_count: dict[int, dict] = {}
    lo, hi = load_window
    polls = [p for p in timeline if lo <= p["t"] < hi]
    for i, p in enumerate(polls):
        end = polls[i + 1]["t"] if i + 1 < len(polls) else hi
        row = by_count.setdefault(p["replicas"], {"seconds": 0.0, "requests": 0})
        row["seconds"] += end - p["t"]
        row["requests"] += sum(1 for f, _, s in done if p["t"] <= f - t0 < end and s == 200)
    for row in by_count.values():
        row["requests_per_s"] = round(row["requests"] / row["seconds"], 2) if row["seconds"] else 0
        row["seconds"] = round(row["seconds"], 1)
    return per_phase, {str(k): v for k, v in sorted(by_count.items())}


def run_autoscale(cfg, models: list[str], *, clients: int = 8, max_tokens: int = 16, baseline_s: float = 5,
                  load_s: float = 30, hold_s: float = 8, load_max_s: float = 150, cooldown_max_s: float = 90,
                  settle_s: float = 4, poll_s: float = 1.0, delays: dict | None = None) -> dict:
    """Deploy genpi's app on the running Ray (ray.init done by the caller), run idle/load/cooldown,
    delete the app; returns the result dict (timeline and the summary figures)."""
    from ray import serve

    from genpi.serve.app import GenpiIngress
    from genpi.serve.config import APP_NAME, INGRESS, MODEL, app_args_config
    from genpi.serve.replica import GenpiAdapters

    bs = _bench_serve()
    delays = dict(DELAYS if delays is None else delays)
    s = cfg.serve
    config, opts = app_args_config(cfg), autoscale_options(cfg, delays)
    url = f"http://127.0.0.1:{s.port}"
    serve.start(http_options={"host": "127.0.0.1", "port": s.port})
    model = GenpiAdapters.options(name=MODEL, **opts[MODEL]).bind(config)
    serve.run(GenpiIngress.options(name=INGRESS, **opts[INGRESS]).bind(model, config), name=APP_NAME, route_prefix="/")
    load = Load(url, models, clients, max_tokens, bs.QUESTIONS)
    timeline: list[dict] = []
    try:
        import httpx

        for m in models:  # every adapter read once on the first replica: the load starts warm
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": m, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request for {m}: HTTP {r.status_code}: {r.text[:300]}")
        t0 = time.time()
        phase, load_start, load_end, up_at, down_at = "idle", None, None, None, None

        def poll() -> dict:
            c = replica_counts()
            p = {"t": round(time.time() - t0, 2), "phase": phase, "replicas": c.get(MODEL, {}).get("running", 0),
                 "starting": c.get(MODEL, {}).get("starting", 0), "ingress_replicas": c.get(INGRESS, {}).get("running", 0),
                 "in_flight": load.in_flight, "answered": len(load.done)}
            timeline.append(p)
            print(f"{p['t']:7.1f}s  {p['phase']:<8} replicas {p['replicas']} (+{p['starting']} starting)  "
                  f"ingress {p['ingress_replicas']}  in flight {p['in_flight']:>2}  answered {p['answered']}", flush=True)
            return p

        while True:
            p = poll()
            now = p["t"]
            # Each switch is recorded as a poll of its own, so a phase's time (and its
            # requests/s) ends exactly where the next one starts.
            if phase == "idle" and now >= baseline_s:
                phase = "load"
                load_start = poll()["t"]
                load.start()
            elif phase == "load":
                if up_at is None and p["replicas"] >= 2:
                    up_at = now
                held = up_at is not None and now - up_at >= hold_s
                if (now - load_start >= load_s and held) or now - load_start >= load_max_s:
                    load.stop()
                    phase = "cooldown"
                    load_end = poll()["t"]
            elif phase == "cooldown":
                if down_at is None and up_at is not None and p["replicas"] <= s.min_replicas:
                    down_at = now
                if (down_at is not None and now - down_at >= settle_s) or now - load_end >= cooldown_max_s:
                    break
            time.sleep(max(0.0, poll_s - (time.time() - t0 - now)))
        load.join(30)
    finally:
        load.stop()
        serve.delete(APP_NAME)
    decided = next((p["t"] for p in timeline if p["phase"] == "load" and p["replicas"] + p["starting"] >= 2), None)
    per_phase, by_count = _rates(timeline, load.done, t0, (load_start, load_end))
    lat = sorted(d[1] for d in load.done if d[2] == 200)
    return {
        "bench": "serve-autoscale", "model": cfg.model.name, "clients": clients, "max_tokens": max_tokens,
        "models": models, "poll_s": poll_s,
        "autoscaling_config": {MODEL: opts[MODEL]["autoscaling_config"], INGRESS: opts[INGRESS]["autoscaling_config"]},
        "max_ongoing_requests": s.max_ongoing_requests, "cpus_per_replica": s.cpus_per_replica,
        "load_start_s": load_start, "load_end_s": load_end,
        # From the first poll of the load phase: the autoscaler's decision (a replica STARTING),
        # then the new replica RUNNING; from the last poll of the load: back to min_replicas.
        "scale_up_decided_s": None if decided is None else round(decided - load_start, 1),
        "scale_up_s": None if up_at is None else round(up_at - load_start, 1),
        "scale_down_s": None if down_at is None else round(down_at - load_end, 1),
        "replicas_before": timeline[0]["replicas"], "max_replicas_reached": max(p["replicas"] for p in timeline),
        "replicas_after": timeline[-1]["replicas"],
        "requests": len(load.done), "errors": sum(1 for d in load.done if d[2] != 200), "first_error": load.first_error,
        "latency_ms_p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "latency_ms_p95": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1) if lat else None,
        "per_phase": per_phase, "load_by_replicas": by_count, "timeline": timeline,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def summary(res: dict) -> str:
    """The readable part: the replica count over time as one row per change, and the figures."""
    lines = [f"autoscaling, {res['model']}: {res['clients']} clients, max_tokens={res['max_tokens']}, "
             f"target_ongoing_requests={res['autoscaling_config']['GenpiAdapters']['target_ongoing_requests']}",
             f"{'t (s)':>7}  {'phase':<8} {'replicas':>8} {'starting':>8} {'in flight':>9}"]
    last = None
    for p in res["timeline"]:
        key = (p["phase"], p["replicas"], p["starting"])
        if key != last:
            lines.append(f"{p['t']:>7.1f}  {p['phase']:<8} {p['replicas']:>8} {p['starting']:>8} {p['in_flight']:>9}")
            last = key
    lines.append(f"{res['timeline'][-1]['t']:>7.1f}  end")
    lines.append(f"scale up: decided {res['scale_up_decided_s']} s, replica RUNNING {res['scale_up_s']} s after the load "
                 f"started; scale down: {res['scale_down_s']} s after it ended; replicas "
                 f"{res['replicas_before']} -> {res['max_replicas_reached']} -> {res['replicas_after']}")
    rates = ", ".join(f"{k} {v['requests_per_s']}/s" for k, v in res["per_phase"].items())
    by = ", ".join(f"{k} replica(s) {v['requests_per_s']}/s over {v['seconds']} s" for k, v in res["load_by_replicas"].items())
    lines.append(f"requests/s per phase: {rates}; under load by replica count: {by}")
    lines.append(f"{res['requests']} requests, {res['errors']} errors, p50 {res['latency_ms_p50']} ms, "
                 f"p95 {res['latency_ms_p95']} ms")
    return "\n".join(lines)


def prepare(model: str, store: str, n_adapters: int, port: int, overrides: list[str] = ()):
    """(cfg, models): `n_adapters` untrained adapters published on `model` (bench/serve.py's),
    and the serving config with the autoscaling settings of this bench."""
    from genpi.config import load_config
    from genpi.manifest import PromptEntry
    from genpi.serve.config import base_model_name

    entries = [PromptEntry(id=f"scale-a{i}", prompt=f"Autoscale adapter {i}: answer briefly.") for i in range(n_adapters)]
    _bench_serve()._publish_untrained(model, store, entries)
    cfg = load_config(None, [f"model.name={model}", f"store={store}", f"serve.port={port}", "serve.host=127.0.0.1",
                             "serve.min_replicas=1", "serve.max_replicas=2", "serve.target_ongoing_requests=2",
                             "serve.max_ongoing_requests=16", "serve.cpus_per_replica=1", "serve.cpus_per_ingress=0.1",
                             *REACTION, *overrides])
    return cfg, [e.id for e in entries] + [base_model_name(cfg)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="model.name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--quick", action="store_true", help="a tiny random model (the tests' shape) instead of --model")
    ap.add_argument("--store", default=str(REPO / ".cache" / "bench" / "autoscale-store"))
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--baseline-s", type=float, default=5)
    ap.add_argument("--load-s", type=float, default=30)
    ap.add_argument("--hold-s", type=float, default=8)
    ap.add_argument("--load-max-s", type=float, default=150)
    ap.add_argument("--cooldown-max-s", type=float, default=90)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    bs = _bench_serve()
    model = bs._tiny_model() if args.quick else args.model
    cfg, models = prepare(model, args.store, args.adapters, bs._free_port())

    import ray

    # 2 model replicas of 1 CPU each and the ingress; one torch thread per replica (OMP).
    # The replicas' access logs stay in Ray's log folder: the timeline is the output here.
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "GENPI_CACHE": os.environ["GENPI_CACHE"]}})
    try:
        res = run_autoscale(cfg, models, clients=args.clients, max_tokens=args.max_tokens, baseline_s=args.baseline_s,
                            load_s=args.load_s, hold_s=args.hold_s, load_max_s=args.load_max_s,
                            cooldown_max_s=args.cooldown_max_s)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    sys.path.insert(0, str(REPO / "bench"))
    from common import environment

    res["environment"] = environment()
    print("\n" + summary(res))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serve-autoscale.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"written {path}")
    ok = res["scale_up_s"] is not None and res["scale_down_s"] is not None and res["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
