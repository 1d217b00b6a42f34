"""Synthesis fanned out over a Ray cluster with Ray Data.

Each pass of `genpi.synth.pipeline.synthesize_many` becomes one Ray Data pipeline over
the rows of every prompt of the manifest: `map_batches` over a pool of engine actors,
each loading the base model once (transformers on CPU, vLLM with one actor per GPU).
Rows travel pickled in one binary column, so the nested replies, top-k rows and
conversations never depend on Arrow schema inference. Ray Data would wait forever for
resources the cluster does not have: the runner checks first and fails with what is missing.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
from typing import Iterable

import numpy as np

from genpi.config import ClusterConfig, GenpiConfig
from genpi.store import worker_env
from genpi.synth.stages import Row, batch_rows, run_isolated

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The Ray cluster cannot provide what the config asks for; the message says what is missing."""


class SynthActor:
    """One engine per actor, loaded once; runs one stage on batches of pickled rows."""

    def __init__(self, cfg_json: dict, stage: str):
        from genpi.engines import make_engine

        self.engine = make_engine(GenpiConfig.model_validate(cfg_json))
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [pickle.loads(b) for b in batch["payload"]]
        outs = run_isolated(self.stage, self.engine, rows)
        return {
            "prompt_id": np.array([o["prompt_id"] for o in outs], dtype=object),
            "payload": np.array([pickle.dumps(o) for o in outs], dtype=object),
        }


def ensure_ray(cluster: ClusterConfig) -> None:
    import ray

    if not ray.is_initialized():
        # None: RAY_ADDRESS when set (ray job submit sets it), else a local Ray.
        ray.init(address=cluster.address, include_dashboard=False)


def check_resources(cfg: GenpiConfig, actors: int) -> int:
    """How many engine actors the cluster can hold (at least one), or ResourceError."""
    import ray

    c = cfg.cluster
    if cfg.engine.kind == "vllm" and c.gpus_per_engine_actor <= 0:
        raise ResourceError("engine.kind is 'vllm' but cluster.gpus_per_engine_actor is 0: vLLM needs a GPU "
                            "per engine actor (or use engine.kind=hf on CPU)")
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
            f"synthesis needs an engine actor with {c.cpus_per_engine_actor:g} CPU and {c.gpus_per_engine_actor:g} GPU "
            f"on one node (cluster.cpus_per_engine_actor, cluster.gpus_per_engine_actor), but the Ray cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU in all and no node that fits one"
            + (f" (waited {c.resource_wait_s:g} s; cluster.resource_wait_s)" if c.resource_wait_s else
               "; on an autoscaling cluster set cluster.resource_wait_s to wait for new nodes")
        )
    if possible < actors:
        log.warning("the cluster holds %d of the %d engine actors asked for (cluster.synth_actors); using %d",
                    possible, actors, possible)
    return min(actors, possible)


class RayDataRunner:
    """A `genpi.synth.pipeline.Runner` that runs each stage as a Ray Data pipeline."""

    def __init__(self, cfg: GenpiConfig):
        from genpi.models import resolve_model

        ensure_ray(cfg.cluster)
        # Convert the embedded model once here, not in every actor at the same time.
        resolve_model(cfg.model)
        self.cfg = cfg
        self.actors = check_resources(cfg, cfg.cluster.synth_actors)

    def __call__(self, stage: str, rows: list[Row]) -> Iterable[Row]:
        import ray
        from ray.data import ActorPoolStrategy

        # One progress display for the whole synthesis is the pipeline's (Ray Data's own bars
        # would print one per stage and per operator).
        ray.data.DataContext.get_current().enable_progress_bars = False
        c = self.cfg.cluster
        n = batch_rows(stage, self.cfg.engine.batch_size)
        n_batches = math.ceil(len(rows) / n)
        items = [{"prompt_id": r["prompt_id"], "payload": pickle.dumps(r)} for r in rows]
        ds = ray.data.from_items(items, override_num_blocks=n_batches)
        ds = ds.map_batches(
            SynthActor,
            fn_constructor_kwargs={"cfg_json": self.cfg.model_dump(mode="json"), "stage": stage},
            batch_size=n,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=max(1, min(self.actors, n_batches))),
            num_cpus=c.cpus_per_engine_actor,
            num_gpus=c.gpus_per_engine_actor,
            runtime_env={"env_vars": worker_env()},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for payload in batch["payload"]:
                yield pickle.loads(payload)
