"""Long-lived engine actors for the Ray runner: one engine per actor for every pass of a stage.

Synthesis runs 4 passes (inputs, replies, reasons, role-play); a Ray Data `map_batches` per
pass built a new engine in new actors each time (tens of seconds per build on a GPU). An
`EnginePool` instead creates its actors once and sends every pass's calls to them (each
actor keeps up to `max_in_flight` calls queued, so it never waits for the driver).
With the transformers engine the same actors also evaluate: the engine holds the base model
that evaluation needs (with vLLM, evaluation gets a pool of transformers actors of its own).

Each actor sits in a placement group of one bundle (its CPUs and GPUs). A pending placement
group is resource demand the Ray autoscaler sees, so a cluster whose worker groups scale
from zero adds nodes for them; removing the groups at `close()` withdraws the demand. (The
cluster-wide `ray.autoscaler.sdk.request_resources` is not used: it is one setting per
cluster, so one job releasing its request would cancel another job's.) The pool waits up to
`cluster.resource_wait_s` for its first actor's resources, then fails with what is missing,
naming the stage; more actors join while the stage runs as their resources appear, up to
`cluster.synth_actors`; groups still pending at the deadline are given up (logged).

A call whose actor dies fails only the prompts of that call (inside an actor,
`run_isolated` already keeps one prompt's failure to that prompt); the others go on.
Synthesis calls are a pass for a few prompts: the actor reads their inputs from the store and
writes their outputs there, and only small records come back to the driver.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from collections import Counter, deque
from typing import Any, Callable, Iterator

from genpi.config import GenpiConfig
from genpi.errors import ResourceError
from genpi.rayinit import actor_cpus

log = logging.getLogger(__name__)

# Engines built in this process: an actor that rebuilt its engine per pass would show it here.
_ENGINES_BUILT = 0


class EngineActor:
    """Builds one engine (`kind`: "hf" or "vllm") when created and serves every call with it."""

    def __init__(self, cfg_json: dict, kind: str):
        from genpi.engines import make_engine
        from genpi.rayinit import use_assigned_cpus

        global _ENGINES_BUILT
        # Before the model loads, so that loading and every pass use the assigned CPUs.
        self.threads = use_assigned_cpus()
        cfg = GenpiConfig.model_validate(cfg_json)
        if cfg.engine.kind != kind:
            cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"kind": kind})})
        self.engine = make_engine(cfg)
        _ENGINES_BUILT += 1
        self.calls: Counter = Counter()

    def info(self) -> dict[str, Any]:
        import ray
        import torch

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU", 0),
                "torch_threads": torch.get_num_threads(), "engines_built": _ENGINES_BUILT,
                "calls": dict(self.calls)}

    def synth_pass(self, pass_name: str, jobs: list, store_uri: str) -> list[dict]:
        """Synthesis pass `pass_name` for a few prompts (`genpi.synth.passes.SynthJob`): their
        rows made from the store, run here, their files written here; one small record per
        prompt goes back (the rows, top-k included, never leave this actor). The store is
        opened with this worker's own credentials (`genpi.store.worker_env`)."""
        from genpi.store import Store
        from genpi.synth.passes import run_pass

        return run_pass(self.engine, pass_name, jobs, Store(store_uri), self.calls)

    def evaluate(self, rows: list[dict], store_uri: str) -> list[dict]:
        """Evaluate each row's stored adapter on the engine's base model (writes eval.json);
        the model is left as it was (the adapter is unloaded after each prompt)."""
        from genpi.manifest import PromptEntry
        from genpi.pipeline.records import PromptPlan
        from genpi.pipeline.stages import evaluate_stored
        from genpi.store import Store

        self.calls["evaluate"] += 1
        store, out = Store(store_uri), []
        for row in rows:
            t0 = time.time()
            p = PromptPlan(PromptEntry.model_validate(row["entry"]), GenpiConfig.model_validate(row["cfg"]),
                           row["fingerprint"], "new")
            res: dict[str, Any] = {"prompt_id": p.id}
            try:
                res["eval"] = evaluate_stored(self.engine.model, self.engine.tok, store, p).model_dump(mode="json")
            except Exception as e:  # this prompt fails; the others are evaluated
                res["error"] = f"{type(e).__name__}: {e}"
                log.error("%s: eval failed\n%s", p.id, traceback.format_exc())
            res["seconds"] = time.time() - t0
            out.append(res)
        return out


class EnginePool:
    """Up to `actors` (default `cluster.synth_actors`) EngineActors of one kind, created once,
    used by every call of `map` until `close()`."""

    def __init__(self, cfg: GenpiConfig, stage: str, kind: str, *, actors: int | None = None,
                 runtime_env: dict | None = None, max_in_flight: int = 2):
        import ray
        from ray.util.placement_group import placement_group

        c = cfg.cluster
        self.cfg, self.stage, self.kind = cfg, stage, kind
        self.runtime_env, self.max_in_flight = runtime_env, max_in_flight
        self.cpus, self.gpus = actor_cpus(c.cpus_per_engine_actor), c.gpus_per_engine_actor
        self.actors: list = []
        self.groups: dict = {}  # actor -> its placement group
        self.stats: list[dict] = []  # each actor's info(), collected at close()
        self._remote = ray.remote(EngineActor)
        self._cfg_json = cfg.model_dump(mode="json")
        self._closed = False
        bundle = {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v}
        # An actor that asks for no resources needs no reservation (nor any waiting).
        n = self.size = actors or c.synth_actors
        self.pending = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(n)] if bundle else [None] * n
        try:
            self._wait_first(c.resource_wait_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ resources
    def _created(self, pg) -> bool:
        from ray.util import placement_group_table

        return pg is None or placement_group_table(pg).get("state") == "CREATED"

    def _wait_first(self, wait_s: float) -> None:
        """Block until one actor's resources are reserved, or raise ResourceError after `wait_s`
        (0: resources that exist but are busy are waited for; check_resources ran before)."""
        import ray

        t0 = time.time()
        said = False
        while not any(self._created(pg) for pg in self.pending):
            waited = time.time() - t0
            if wait_s and waited >= wait_s:
                total = ray.cluster_resources()
                raise ResourceError(
                    f"{self.stage} needs an engine actor with {self.cpus:g} CPU and {self.gpus:g} GPU on one node "
                    f"(cluster.cpus_per_engine_actor, cluster.gpus_per_engine_actor), but none became available in "
                    f"{wait_s:g} s (cluster.resource_wait_s); the Ray cluster has {total.get('CPU', 0):g} CPU and "
                    f"{total.get('GPU', 0):g} GPU in all (an autoscaling cluster needs a worker group whose nodes "
                    f"hold one actor)")
            if not said and waited > 2:
                print(f"[{self.stage}] waiting for resources for {len(self.pending)} engine actor(s) of "
                      f"{self.cpus:g} CPU and {self.gpus:g} GPU (an autoscaling cluster is adding nodes; "
                      f"cluster.resource_wait_s={wait_s:g})", flush=True)
                said = True
            time.sleep(0.5)
        # Groups that fit the cluster as it is are created within moments of the first.
        self.deadline = max(t0 + wait_s, time.time() + 2.0)

    def _admit(self) -> None:
        """Start an actor in every newly reserved group; give up groups pending past the deadline."""
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        for pg in [pg for pg in self.pending if self._created(pg)]:
            self.pending.remove(pg)
            opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
            if self.runtime_env:
                opts["runtime_env"] = self.runtime_env
            actor = self._remote.options(**opts).remote(self._cfg_json, self.kind)
            self.actors.append(actor)
            self.groups[actor] = pg
        if self.pending and time.time() >= self.deadline:
            for pg in self.pending:
                remove_placement_group(pg)
            log.warning("%s: the cluster holds %d of the %d engine actors asked for (cluster.synth_actors); "
                        "using %d", self.stage, len(self.actors), len(self.actors) + len(self.pending),
                        len(self.actors))
            self.pending = []

    def _drop(self, actor) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self.actors.remove(actor)
        ray.kill(actor)
        if self.groups.get(actor) is not None:
            remove_placement_group(self.groups.pop(actor))

    # ------------------------------------------------------------------ work
    def map(self, method: str, calls: list[tuple], on_error: Callable[[tuple, BaseException], Any],
            ordered: bool = True) -> Iterator[Any]:
        """`actor.<method>(*args)` for each args tuple in `calls`, spread over the actors; the
        results in the order of `calls` (or as they finish). A call whose actor died gives
        `on_error(args, error)` instead, and the pool goes on without that actor."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque(range(len(calls)))
        inflight: dict = {}  # ObjectRef -> (call index, actor)
        load: Counter = Counter()
        done: dict[int, Any] = {}
        next_out = 0
        while queue or inflight:
            self._admit()
            for actor in self.actors:
                while queue and load[actor] < self.max_in_flight:
                    i = queue.popleft()
                    inflight[getattr(actor, method).remote(*calls[i])] = (i, actor)
                    load[actor] += 1
            if not inflight:
                if not self.pending:  # every actor died: the rest fail like the calls that killed them
                    err = ResourceError(f"{self.stage}: no engine actor left (they died; see the errors above)")
                    for i in queue:
                        done[i] = on_error(calls[i], err)
                    queue.clear()
                else:
                    time.sleep(0.5)
            else:
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if self.pending else None)
                for ref in ready:
                    i, actor = inflight.pop(ref)
                    load[actor] -= 1
                    try:
                        done[i] = ray.get(ref)
                    except RayActorError as e:
                        log.error("%s: an engine actor died: %s", self.stage, e)
                        if actor in self.actors:
                            self._drop(actor)
                        done[i] = on_error(calls[i], e)
                    except Exception as e:  # the call failed, its actor lives on
                        done[i] = on_error(calls[i], e)
            if ordered:
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
            else:
                for i in list(done):
                    yield done.pop(i)

    def close(self) -> None:
        """Kill the actors and remove every placement group: the stage's demand is withdrawn."""
        if self._closed:
            return
        self._closed = True
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        if self.actors:
            refs = [a.info.remote() for a in self.actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            for r in ready:
                try:
                    self.stats.append(ray.get(r))
                except Exception:  # a dead actor has no figures to give
                    pass
        for actor in self.actors:
            ray.kill(actor)
        for pg in [*self.groups.values(), *self.pending]:
            if pg is not None:
                remove_placement_group(pg)
        self.actors, self.groups, self.pending = [], {}, []

    def __del__(self):
        # A pool dropped without close() (an exception, a test) must not keep its reservation.
        try:
            self.close()
        except Exception:
            pass
