"""The Ray runner (`jobs/internalize_many.py`): pools of long-lived engine actors for synthesis
and evaluation (`genpi.pipeline.engine_actors`), Ray Train (+ DeepSpeed) for packed training.

A pool lives from one training to the next: synthesis's 4 passes share its actors (one engine
each), but training runs after them and needs those CPUs/GPUs (on one machine every one of
them; on an autoscaling cluster, holding GPU nodes idle through training costs more than
building an engine again), so the pool is closed before training starts and evaluation
creates its own. That pool stays open into the next wave's synthesis when the engine kind is
the same (transformers), so a wave pays one engine start, not two. Closing a pool also
withdraws the stage's resource demand from the autoscaler. A synthesis call carries a pass name and a
few prompts' jobs; the actor reads and writes the store itself, so rows (top-k included)
never travel between the driver and the actors.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

from genpi.config import GenpiConfig
from genpi.errors import ResourceError
from genpi.pipeline.engine_actors import EnginePool
from genpi.pipeline.records import PromptPlan
from genpi.rayinit import actor_cpus, ensure_ray
from genpi.store import Store, worker_env

log = logging.getLogger(__name__)


def check_resources(cfg: GenpiConfig, stage: str) -> None:
    """Fail at once (ResourceError naming `stage` and what is missing) when no engine actor can
    ever run: vLLM without GPUs, or, with cluster.resource_wait_s=0 ("check once"), no alive
    node large enough for one actor. With a wait, the pool's pending actors ask the
    autoscaler for nodes and wait for them instead."""
    import ray

    c = cfg.cluster
    cpus = actor_cpus(c.cpus_per_engine_actor)
    if cfg.engine.kind == "vllm" and c.gpus_per_engine_actor <= 0:
        raise ResourceError(f"{stage}: engine.kind is 'vllm' but cluster.gpus_per_engine_actor is 0: vLLM needs "
                            "a GPU per engine actor (or use engine.kind=hf on CPU)")
    if c.resource_wait_s:
        return
    # One actor's CPUs and GPUs must sit on one node.
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("CPU", 0) >= cpus and res.get("GPU", 0) >= c.gpus_per_engine_actor:
            return
    total = ray.cluster_resources()
    raise ResourceError(
        f"{stage} needs an engine actor with {cpus:g} CPU and {c.gpus_per_engine_actor:g} GPU "
        f"on one node (cluster.cpus_per_engine_actor, cluster.gpus_per_engine_actor), but the Ray cluster has "
        f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU in all and no node that fits one; "
        "on an autoscaling cluster set cluster.resource_wait_s to wait for new nodes")


def _failed_rows(stage: str, rows: list[dict], e: BaseException, **extra) -> list[dict]:
    """One error row per prompt of a batch whose actor died (the other batches stand)."""
    pids = dict.fromkeys(r["prompt_id"] for r in rows)
    return [{"prompt_id": pid, "error": f"{stage}: engine actor failed: {type(e).__name__}: {e}", **extra}
            for pid in pids]


class SynthOnActors:
    """A `genpi.synth.pipeline.Runner`: each call runs one synthesis pass for a group of
    prompts on an actor of the pool, which writes their files to the store itself and sends
    back one small record per prompt; groups finish in any order."""

    def __init__(self, cfg: GenpiConfig, pool: EnginePool):
        self.cfg, self.pool = cfg, pool
        # prompt_groups' `workers`, from the configuration rather than the actors the cluster
        # granted, so that the in-process runner (given the same) batches the same rows.
        self.workers = cfg.cluster.synth_actors

    def __call__(self, pass_name: str, groups: list[list], store: Store) -> Iterable[list[dict]]:
        def failed(args: tuple, e: BaseException) -> list[dict]:
            jobs = args[1]
            out = _failed_rows(pass_name, [{"prompt_id": j.id} for j in jobs], e,
                               **{"pass": pass_name, "rows": 0, "tokens": 0, "model_s": 0.0})
            # The actor wrote nothing for these prompts: their error.json is written here.
            for j, rec in zip(jobs, out):
                try:
                    store.write_json(f"{j.pdir}/error.json", {"error": rec["error"], "traceback": None})
                except Exception as w:  # the record still fails the prompt in the run report
                    log.warning("%s: error.json not written: %s", j.id, w)
            return out

        calls = [(pass_name, group, store.uri) for group in groups]
        yield from self.pool.map("synth_pass", calls, failed, ordered=False)


class RayRunner:
    def __init__(self, cfg: GenpiConfig, facts):
        from genpi.models import resolve_model

        ensure_ray(cfg.cluster)
        # Convert the embedded model once here, not in every actor at the same time.
        resolve_model(cfg.model)
        self.cfg, self.facts = cfg, facts
        self._pool: EnginePool | None = None
        self.engine_stats: list[dict] = []  # every closed pool's actors: engines built, threads, calls

    def _engine_pool(self, stage: str, kind: str, actors: int | None = None) -> EnginePool:
        """The open pool if it holds `kind` engines, else a new one (the old one closed first)."""
        if self._pool is not None and self._pool.kind == kind and self._pool.size >= (actors or self.cfg.cluster.synth_actors):
            return self._pool
        self.release()
        check_resources(self.cfg, stage)
        self._pool = EnginePool(self.cfg, stage, kind, actors=actors, runtime_env={"env_vars": worker_env()})
        return self._pool

    def release(self) -> None:
        """Close the engine-actor pool: its actors end, their CPUs/GPUs and demand are released."""
        if self._pool is not None:
            self._pool.close()
            self.engine_stats += self._pool.stats
            self._pool = None

    def close(self) -> None:
        self.release()

    def synth_runner(self) -> SynthOnActors:
        return SynthOnActors(self.cfg, self._engine_pool("synthesis", self.cfg.engine.kind))

    def train(self, cfg: GenpiConfig, store: Store, jobs, run_name: str):
        from genpi.train.trainer import train_many

        # The training workers need the CPUs/GPUs the engine actors hold.
        self.release()
        return train_many(cfg, store.uri, jobs, run_name=run_name)

    def evaluate(self, plans: list[PromptPlan], store: Store) -> Iterator[tuple[str, object, str | None, float]]:
        """(prompt id, EvalResult or None, error or None, seconds) per prompt, as each finishes.
        Evaluation needs the transformers model: a vLLM run evaluates on transformers actors."""
        from tqdm.auto import tqdm

        from genpi.eval.result import EvalResult

        rows = [{"prompt_id": p.id, "entry": p.entry.model_dump(mode="json"), "cfg": p.cfg.model_dump(mode="json"),
                 "fingerprint": p.fingerprint} for p in plans]
        check_resources(self.cfg, "evaluation")
        if not rows:
            return
        pool = self._engine_pool("evaluation", "hf", min(self.cfg.cluster.synth_actors, len(rows)))
        try:
            with tqdm(total=len(rows), desc="eval", unit="prompt") as bar:
                calls = [([r], store.uri) for r in rows]
                for out in pool.map("evaluate", calls, lambda args, e: _failed_rows("eval", args[0], e, seconds=0.0),
                                    ordered=False):
                    for r in out:
                        bar.update(1)
                        ev = EvalResult.model_validate(r["eval"]) if "eval" in r else None
                        yield r["prompt_id"], ev, r.get("error"), r["seconds"]
        except BaseException:
            self.release()
            raise
        # The pool stays open: the next wave's synthesis uses it (the job's end closes it).
