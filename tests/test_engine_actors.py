"""The Ray runner's engine actors (genpi.pipeline.engine_actors): built once and used by the 4
synthesis passes and by evaluation, producing what the in-process runner produces; torch
running on the CPUs Ray assigned; resources released when the pool closes."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from genpi.config import load_config
from genpi.manifest import PromptEntry
from genpi.pipeline.records import PromptPlan
from genpi.store import Store
from genpi.synth.pipeline import SynthJob, synthesize_many

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES, TINY_SEEDS  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = {
    "pirate": "You are a pirate. Always answer like a pirate and say Arr.",
    "chef": "You are a cooking assistant. Give short recipes as numbered steps.",
}


def _plans(cfg) -> list[PromptPlan]:
    return [PromptPlan(PromptEntry(id=pid, prompt=p, seed_inputs=TINY_SEEDS), cfg, "fp", "new")
            for pid, p in PROMPTS.items()]


def _synth_jobs(plans, store: Store) -> list[SynthJob]:
    return [SynthJob(p.entry, p.cfg, store.prompt_dir(p.id, p.fingerprint)) for p in plans]


def _same(a, b, tol: float = 1e-4) -> bool:
    """Equal, but floats (log-probabilities) only up to rounding: the two processes' kernels
    may sum in another order; texts and token ids must be identical."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _free_cpus_return(ray, timeout: float = 30.0) -> bool:
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == total:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def both(ray_local, tiny_model_dir, tmp_path_factory):
    """2 prompts synthesized and evaluated in-process and on a Ray runner with 2 engine actors
    of 1 CPU (one thread each, like the in-process runner here); the adapters evaluated are
    the in-process run's, so that evaluation is compared on equal adapters."""
    from genpi.pipeline.local import LocalRunner
    from genpi.pipeline.plan import model_facts
    from genpi.pipeline.ray_runner import RayRunner
    from genpi.train.jobs import TrainJob

    root = tmp_path_factory.mktemp("engine-actors")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "cluster.synth_actors=2",
                             "cluster.cpus_per_engine_actor=1"])
    plans = _plans(cfg)
    facts = model_facts(cfg)
    stores = {k: Store(str(root / k)) for k in ("local", "ray")}

    local = LocalRunner(cfg, facts)
    synth_local = synthesize_many(_synth_jobs(plans, stores["local"]), stores["local"], local.synth_runner(),
                                  progress=False)
    outcomes = list(local.train(cfg, stores["local"], [
        TrainJob(p.id, stores["local"].prompt_dir(p.id, p.fingerprint), p.entry.prompt) for p in plans], "t"))
    assert all(o.status == "trained" for o in outcomes), outcomes
    eval_local = {pid: ev for pid, ev, err, _ in local.evaluate(plans, stores["local"])}

    ray_runner = RayRunner(cfg, facts)
    try:
        synth_ray = synthesize_many(_synth_jobs(plans, stores["ray"]), stores["ray"], ray_runner.synth_runner(),
                                    progress=False)
        for p in plans:
            rel = f"prompts/{p.id}/{p.fingerprint}/adapter"
            shutil.copytree(root / "local" / rel, root / "ray" / rel)
        eval_ray = {pid: (ev, err) for pid, ev, err, _ in ray_runner.evaluate(plans, stores["ray"])}
    finally:
        ray_runner.close()
    return {"root": root, "plans": plans, "synth": (synth_local, synth_ray), "eval": (eval_local, eval_ray),
            "stats": ray_runner.engine_stats}


def test_one_engine_per_actor_for_four_passes_and_evaluation(both):
    stats = both["stats"]
    assert len(stats) == 2, stats  # cluster.synth_actors=2, both used
    assert len({s["pid"] for s in stats}) == 2
    for s in stats:
        # Built once; the same actor ran inputs, replies + reasons ("generate") and role-play, and evaluated.
        assert s["engines_built"] == 1, s
    calls = {k: sum(s["calls"].get(k, 0) for s in stats) for k in ("inputs", "generate", "roleplay", "evaluate")}
    assert calls["inputs"] >= 1 and calls["generate"] >= 2 and calls["roleplay"] >= 1, calls
    assert calls["evaluate"] == len(PROMPTS), calls


def test_synthesis_and_evaluation_equal_the_in_process_runner(both):
    import pyarrow.parquet as pq

    synth_local, synth_ray = both["synth"]
    assert all("summary" in r for r in synth_ray.values()), synth_ray
    root = both["root"]
    for p in both["plans"]:
        sub = Path("prompts") / p.id / p.fingerprint / "synth"
        files = sorted(f.name for f in (root / "local" / sub).glob("*.parquet"))
        assert {"inputs.parquet", "to_be.parquet", "conversations.parquet"} <= set(files), files
        assert files == sorted(f.name for f in (root / "ray" / sub).glob("*.parquet"))
        for name in files:
            got = pq.read_table(root / "ray" / sub / name).to_pylist()
            want = pq.read_table(root / "local" / sub / name).to_pylist()
            assert _same(got, want), f"{p.id}/{name}"
    eval_local, eval_ray = both["eval"]
    assert eval_ray.keys() == eval_local.keys()
    for pid, (ev, err) in eval_ray.items():
        assert err is None and ev is not None, err
        ml, mr = eval_local[pid].model_dump(mode="json")["metrics"], ev.model_dump(mode="json")["metrics"]
        assert mr["kl"] == pytest.approx(ml["kl"], rel=1e-4, abs=1e-6), pid
        assert mr.keys() == ml.keys()


def test_closing_releases_every_cpu_and_placement_group(both, ray_local):
    from ray.util import placement_group_table

    assert _free_cpus_return(ray_local), ray_local.available_resources()
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


def test_actors_run_torch_on_the_cpus_ray_assigned(ray_local, tiny_model_dir):
    """An image or pod that sets OMP_NUM_THREADS=1 would keep Ray from sizing torch's threads."""
    from genpi.pipeline.engine_actors import EnginePool

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "cluster.cpus_per_engine_actor=2"])
    pool = EnginePool(cfg, "synthesis", "hf", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        [info] = list(pool.map("info", [()], on_error=lambda args, e: pytest.fail(str(e))))
    finally:
        pool.close()
    assert info["cpus"] == 2 and info["torch_threads"] == 2, info


def test_a_dead_actor_fails_only_its_batches_and_the_map_ends(ray_local, tiny_model_dir):
    import ray

    from genpi.pipeline.engine_actors import EnginePool

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "cluster.cpus_per_engine_actor=1"])
    pool = EnginePool(cfg, "synthesis", "hf")
    try:
        [first] = list(pool.map("info", [()], on_error=lambda args, e: pytest.fail(str(e))))
        ray.kill(pool.actors[0])
        # ray.kill returns before the actor is gone, and a call sent at once may still be served
        # (CI saw one): wait until the actor's death is what a call gets.
        deadline = time.time() + 120
        while True:
            try:
                ray.get(pool.actors[0].info.remote(), timeout=120)
            except ray.exceptions.RayActorError:
                break
            assert time.time() < deadline, "the killed actor still answers after 120 s"
            time.sleep(0.2)
        out = list(pool.map("info", [(), ()], on_error=lambda args, e: f"failed: {type(e).__name__}"))
    finally:
        pool.close()
    assert first["engines_built"] == 1
    assert len(out) == 2 and all(o.startswith("failed: ") for o in out), out


def test_no_resources_within_the_wait_names_the_stage_and_withdraws_the_demand(ray_local, tiny_model_dir):
    from ray.util import placement_group_table

    from genpi.errors import ResourceError
    from genpi.pipeline.ray_runner import RayRunner

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "cluster.gpus_per_engine_actor=1",
                             "cluster.resource_wait_s=3"])
    runner = RayRunner(cfg, None)
    t0 = time.time()
    with pytest.raises(ResourceError, match=r"^synthesis needs .*1 GPU.*3 s \(cluster.resource_wait_s\)"):
        runner.synth_runner()
    assert time.time() - t0 >= 3
    runner.close()
    # The pending placement group (the autoscaler's demand) went with the error.
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())


def test_the_evaluation_pool_stays_open_for_the_next_waves_synthesis(ray_local, tiny_model_dir, tmp_path):
    """Waves: evaluation of wave k and synthesis of wave k+1 use one pool (one engine start per
    wave, not two); training still closes it (its workers need those CPUs), and so does the end."""
    from genpi.pipeline.plan import model_facts
    from genpi.pipeline.ray_runner import RayRunner

    cfg = load_config(None, [*TINY_OVERRIDES, f"model.name={tiny_model_dir}", f"store={tmp_path / 'store'}",
                             "cluster.synth_actors=1", "cluster.cpus_per_engine_actor=1"])
    store = Store(cfg.store)
    runner = RayRunner(cfg, model_facts(cfg))
    try:
        pool = runner.synth_runner().pool
        # Nothing was synthesized: the prompt fails in evaluation, on the pool's actor.
        [(pid, ev, error, _)] = list(runner.evaluate(_plans(cfg)[:1], store))
        assert pid == "pirate" and ev is None and "inputs.parquet" in error, error
        assert runner._pool is pool and not pool._closed
        assert runner.synth_runner().pool is pool
        [info] = list(pool.map("info", [()], on_error=lambda args, e: pytest.fail(str(e))))
        assert info["engines_built"] == 1 and info["calls"]["evaluate"] == 1, info
        # A larger synthesis than the pool holds gets a new pool.
        bigger = RayRunner(cfg.with_overrides({"cluster.synth_actors": 2}), model_facts(cfg))
        bigger._pool, runner._pool = pool, None
        assert bigger.synth_runner().pool is not pool and pool._closed
        bigger.close()
    finally:
        runner.close()
    assert runner._pool is None
