"""The Ray runner (`jobs/internalize_many.py`): engine-actor pools on Ray Data for synthesis
and evaluation, Ray Train (+ DeepSpeed) for packed training.

Synthesis and evaluation share one helper, `map_on_engine_actors`: a `map_batches` over an
`ActorPoolStrategy` of actors that each load the base model once. Rows travel pickled in one
binary column, so nested replies, top-k rows and conversations never depend on Arrow
schema inference. Ray Data would wait forever for resources the cluster does not have: the
runner checks first and fails with what is missing, naming the stage that needs it.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import traceback
from typing import Any, Iterable, Iterator

import numpy as np

from genpi.config import GenpiConfig
from genpi.errors import ResourceError
from genpi.pipeline.records import PromptPlan
from genpi.rayinit import ensure_ray
from genpi.store import Store, worker_env

log = logging.getLogger(__name__)


def check_resources(cfg: GenpiConfig, stage: str, actors: int) -> int:
    """How many engine actors for `stage` the cluster can hold (at least one), or ResourceError."""
    import ray

    c = cfg.cluster
    if cfg.engine.kind == "vllm" and c.gpus_per_engine_actor <= 0:
        raise ResourceError(f"{stage}: engine.kind is 'vllm' but cluster.gpus_per_engine_actor is 0: vLLM needs "
                            "a GPU per engine actor (or use engine.kind=hf on CPU)")
    deadline = time.time() + c.resource_wait_s
    while True:
        # One actor's CPUs and GPUs must sit on one node.
        fits = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            per_cpu = math.floor(res.get("CPU", 0) / c.cpus_per_engine_actor) if c.cpus_per_engine_actor else actors
            per_gpu = math.floor(res.get("GPU", 0) / c.gpus_per_engine_actor) if c.gpus_per_engine_actor else actors
            fits.append(min(per_cpu, per_gpu))
        possible = sum(fits)
        if possible >= 1 or time.time() >= deadline:
            break
        time.sleep(min(5.0, max(0.1, deadline - time.time())))
    if possible < 1:
        total = ray.cluster_resources()
        raise ResourceError(
            f"{stage} needs an engine actor with {c.cpus_per_engine_actor:g} CPU and {c.gpus_per_engine_actor:g} GPU "
            f"on one node (cluster.cpus_per_engine_actor, cluster.gpus_per_engine_actor), but the Ray cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU in all and no node that fits one"
            + (f" (waited {c.resource_wait_s:g} s; cluster.resource_wait_s)" if c.resource_wait_s else
               "; on an autoscaling cluster set cluster.resource_wait_s to wait for new nodes")
        )
    if possible < actors:
        log.warning("%s: the cluster holds %d of the %d engine actors asked for (cluster.synth_actors); using %d",
                    stage, possible, actors, possible)
    return min(actors, possible)


def map_on_engine_actors(cfg: GenpiConfig, actor_cls, ctor_kwargs: dict, rows: list[dict], batch_size: int,
                         actors: int) -> Iterator[dict]:
    """Run `actor_cls(**ctor_kwargs)(batch)` over `rows` on a pool of engine actors; yield the
    output rows as they come. Each row must hold "prompt_id"; rows travel pickled."""
    import ray
    from ray.data import ActorPoolStrategy

    # One progress display per stage is the caller's (Ray Data's own bars would print one per
    # stage and per operator).
    ray.data.DataContext.get_current().enable_progress_bars = False
    c = cfg.cluster
    n_batches = math.ceil(len(rows) / batch_size)
    items = [{"prompt_id": r["prompt_id"], "payload": pickle.dumps(r)} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=n_batches).map_batches(
        actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=max(1, min(actors, n_batches))),
        num_cpus=c.cpus_per_engine_actor, num_gpus=c.gpus_per_engine_actor,
        runtime_env={"env_vars": worker_env()})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for payload in batch["payload"]:
            yield pickle.loads(payload)


def _pack(outs: list[dict]) -> dict[str, np.ndarray]:
    return {"prompt_id": np.array([o["prompt_id"] for o in outs], dtype=object),
            "payload": np.array([pickle.dumps(o) for o in outs], dtype=object)}


class SynthActor:
    """One engine per actor, loaded once; runs one synthesis stage on batches of rows."""

    def __init__(self, cfg_json: dict, stage: str):
        from genpi.engines import make_engine

        self.engine = make_engine(GenpiConfig.model_validate(cfg_json))
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from genpi.synth.stages import run_isolated

        return _pack(run_isolated(self.stage, self.engine, [pickle.loads(b) for b in batch["payload"]]))


class EvalActor:
    """Holds the base model once; evaluates one prompt's stored adapter per row (writes eval.json)."""

    def __init__(self, cfg_json: dict, store_uri: str):
        from genpi.models import load_model

        cfg = GenpiConfig.model_validate(cfg_json)
        self.model, self.tok, _ = load_model(cfg.model)
        self.store = Store(store_uri)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from genpi.manifest import PromptEntry
        from genpi.pipeline.stages import evaluate_stored

        out = []
        for payload in batch["payload"]:
            row = pickle.loads(payload)
            t0 = time.time()
            p = PromptPlan(PromptEntry.model_validate(row["entry"]), GenpiConfig.model_validate(row["cfg"]),
                           row["fingerprint"], "new")
            res: dict[str, Any] = {"prompt_id": p.id}
            try:
                res["eval"] = evaluate_stored(self.model, self.tok, self.store, p).model_dump(mode="json")
            except Exception as e:  # this prompt fails; the others are evaluated
                res["error"] = f"{type(e).__name__}: {e}"
                log.error("%s: eval failed\n%s", p.id, traceback.format_exc())
            res["seconds"] = time.time() - t0
            out.append(res)
        return _pack(out)


class SynthOnActors:
    """A `genpi.synth.pipeline.Runner`: each synthesis stage on the engine-actor pool."""

    def __init__(self, cfg: GenpiConfig, actors: int):
        self.cfg, self.actors = cfg, actors

    def __call__(self, stage: str, rows: list[dict]) -> Iterable[dict]:
        from genpi.synth.stages import batch_rows

        yield from map_on_engine_actors(self.cfg, SynthActor, {"cfg_json": self.cfg.model_dump(mode="json"),
                                                               "stage": stage},
                                        rows, batch_rows(stage, self.cfg.engine.batch_size), self.actors)


class RayRunner:
    def __init__(self, cfg: GenpiConfig, facts):
        from genpi.models import resolve_model

        ensure_ray(cfg.cluster)
        # Convert the embedded model once here, not in every actor at the same time.
        resolve_model(cfg.model)
        self.cfg, self.facts = cfg, facts

    def synth_runner(self) -> SynthOnActors:
        return SynthOnActors(self.cfg, check_resources(self.cfg, "synthesis", self.cfg.cluster.synth_actors))

    def train(self, cfg: GenpiConfig, store: Store, jobs, run_name: str):
        from genpi.train.trainer import train_many

        return train_many(cfg, store.uri, jobs, run_name=run_name)

    def evaluate(self, plans: list[PromptPlan], store: Store) -> Iterator[tuple[str, object, str | None, float]]:
        from tqdm.auto import tqdm

        from genpi.eval.result import EvalResult

        rows = [{"prompt_id": p.id, "entry": p.entry.model_dump(mode="json"), "cfg": p.cfg.model_dump(mode="json"),
                 "fingerprint": p.fingerprint} for p in plans]
        actors = check_resources(self.cfg, "evaluation", max(1, min(self.cfg.cluster.synth_actors, len(rows))))
        if not rows:
            return
        with tqdm(total=len(rows), desc="eval", unit="prompt") as bar:
            for r in map_on_engine_actors(self.cfg, EvalActor, {"cfg_json": self.cfg.model_dump(mode="json"),
                                                                "store_uri": store.uri}, rows, 1, actors):
                bar.update(1)
                ev = EvalResult.model_validate(r["eval"]) if "eval" in r else None
                yield r["prompt_id"], ev, r.get("error"), r["seconds"]
