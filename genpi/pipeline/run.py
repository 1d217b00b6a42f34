"""The pipeline: plan -> synthesize -> train -> evaluate -> publish, as explicit calls.

`internalize(manifest, cfg, runner_kind)` is what both entry points call: `genpi internalize`
with the in-process runner, `jobs/internalize_many.py` with the Ray runner. A runner
decides only where work runs (`genpi.pipeline.local`, `genpi.pipeline.ray_runner`); what
is read and written per prompt is the same (`genpi.pipeline.stages`). Prompts go through
the stages in waves (`cluster.wave_prompts` first, growing by `cluster.wave_growth` up to `cluster.max_wave_prompts`,
`plan.plan_waves`): the first adapters are published while later
prompts have not started synthesis, and a failure late in the job holds back no earlier
wave. Synthesis rows never reach the driver (its workers write them; the driver gets a small
record per prompt), so the driver's memory does not grow with the prompts. Each stage writes its outputs to
the store before the next starts, so a run killed at any moment and started again redoes
only unfinished stages. A prompt that fails is recorded with its stage and error; the
others go on.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict

from genpi.config import GenpiConfig
from genpi.errors import ResourceError
from genpi.pipeline import stages
from genpi.pipeline.plan import format_plan, model_facts, plan, plan_waves
from genpi.pipeline.records import PromptOutcome, PromptPlan
from genpi.store import Store, open_store

log = logging.getLogger(__name__)


class Run:
    """One run's outcomes, one per prompt, updated stage by stage."""

    def __init__(self, plans: list[PromptPlan]):
        self.id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.plans = plans
        self.out = {p.id: PromptOutcome(p.id, p.fingerprint, prompt_tokens=p.prompt_tokens) for p in plans}
        self.stage_seconds: dict[str, float] = {}
        self.first_published_at: float | None = None  # time.time() of this run's first publish

    def live(self, wave: list[PromptPlan] | None = None) -> list[PromptPlan]:
        """Prompts still in the run (of `wave` when given)."""
        return [p for p in (self.plans if wave is None else wave) if self.out[p.id].status == "pending"]

    def fail(self, pid: str, stage: str, error: str) -> None:
        o = self.out[pid]
        o.status, o.failed_stage, o.error = "failed", stage, error
        log.error("%s: %s failed: %s", pid, stage, error)

    def outcomes(self) -> list[PromptOutcome]:
        return [self.out[p.id] for p in self.plans]

    def fail_all(self, stage: str, error: str, wave: list[PromptPlan]) -> None:
        """A stage that cannot run at all (e.g. the cluster lacks what it needs) fails every
        prompt of the wave still in the run, so the report says why and the exit status is 1."""
        for p in self.live(wave):
            self.fail(p.id, stage, error)

    def stage_done(self, stage: str, t0: float, wave: list[PromptPlan]) -> None:
        seconds = time.time() - t0
        self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + seconds, 2)
        ready = len(self.live(wave))
        failed = sum(self.out[p.id].failed_stage == stage for p in wave)
        print(f"[{stage}] {ready} prompts ready for the next stage, {failed} failed, {seconds:.0f} s", flush=True)


def synthesize(run: Run, runner, store: Store, wave: list[PromptPlan]) -> None:
    from genpi.synth.pipeline import SynthJob, format_summaries, synthesize_many

    live = run.live(wave)
    t0 = time.time()
    try:
        synth_runner = runner.synth_runner()
    except ResourceError as e:
        run.fail_all("synth", f"ResourceError: {e}", wave)
        run.stage_done("synth", t0, wave)
        return
    results = synthesize_many([SynthJob(p.entry, p.cfg, store.prompt_dir(p.id, p.fingerprint)) for p in live],
                              store, synth_runner)
    print(format_summaries(results), flush=True)
    for pid, r in results.items():
        run.out[pid].seconds["synth"] = round((time.time() - t0) / max(1, len(live)), 2)
        run.out[pid].model_seconds["synth"] = r.get("model_s", 0.0)
        if "error" in r:
            run.fail(pid, "synth", r["error"])
    run.stage_done("synth", t0, wave)


def train(run: Run, runner, store: Store, cfg: GenpiConfig, wave: list[PromptPlan], name: str) -> None:
    from genpi.train.jobs import TrainJob

    t0 = time.time()
    # Prompts whose own overrides change the training settings train in packs of their own.
    groups: dict[str, list[PromptPlan]] = defaultdict(list)
    for p in run.live(wave):
        groups[p.cfg.train.model_dump_json()].append(p)
    for i, members in enumerate(groups.values()):
        gcfg = cfg.model_copy(update={"train": members[0].cfg.train})
        jobs = [TrainJob(p.id, store.prompt_dir(p.id, p.fingerprint), p.entry.prompt) for p in members]
        g0 = time.time()
        for o in runner.train(gcfg, store, jobs, run_name=f"train-{run.id}-{name}{i}"):
            run.out[o.prompt_id].seconds["train"] = round((time.time() - g0) / max(1, len(jobs)), 2)
            if o.stats.get("pack_seconds") is not None:  # train.json: seconds in the pack's steps
                run.out[o.prompt_id].model_seconds["train"] = round(
                    o.stats["pack_seconds"] / max(1, o.stats.get("pack_size", 1)), 3)
            if o.status == "failed":
                run.fail(o.prompt_id, "train", o.error or "training failed")
    run.stage_done("train", t0, wave)


def evaluate_and_publish(run: Run, runner, store: Store, wave: list[PromptPlan]) -> None:
    """Evaluate each trained adapter and publish it as soon as its evaluation is written."""
    t0 = time.time()
    by_id = {p.id: p for p in run.live(wave)}
    try:
        for pid, ev, error, seconds in runner.evaluate(list(by_id.values()), store):
            o = run.out[pid]
            o.seconds["eval"] = round(seconds, 2)
            o.model_seconds["eval"] = round(seconds, 3)
            if error:
                run.fail(pid, "eval", error)
                continue
            stages.publish(store, by_id[pid], ev, o)
            if run.first_published_at is None:
                run.first_published_at = time.time()
    except ResourceError as e:
        run.fail_all("eval", f"ResourceError: {e}", wave)
    run.stage_done("eval", t0, wave)


def make_runner(kind: str, cfg: GenpiConfig, facts):
    if kind == "local":
        from genpi.pipeline.local import LocalRunner

        return LocalRunner(cfg, facts)
    if kind == "ray":
        from genpi.pipeline.ray_runner import RayRunner

        return RayRunner(cfg, facts)
    raise ValueError(f"unknown runner {kind!r} (local or ray)")


def internalize(manifest: str, cfg: GenpiConfig, runner_kind: str, *, dry_run: bool = False,
                force: bool = False) -> int:
    """Plan, then synthesize, train, evaluate and publish every prompt that needs it; the exit
    status (0: every prompt published or unchanged, 1: some failed). Bad input raises
    ConfigError/ManifestError/ModelError before anything is started or written."""
    from genpi.pipeline.summary import finish_report
    from genpi.manifest import load_manifest

    t0 = time.time()
    # The whole manifest is validated (every problem listed at once) before anything is created.
    entries = load_manifest(manifest, validate_overrides=lambda o: cfg.with_overrides(o))
    store = open_store(cfg.store, create=False)
    facts = model_facts(cfg)
    plans = plan(entries, cfg, store, facts)
    print(format_plan(plans, force=force), flush=True)
    todo = [p for p in plans if force or p.status != "unchanged"]
    todo_ids = {p.id for p in todo}
    # One registry read for the whole manifest (hundreds of prompts, maybe on an object store);
    # an unchanged prompt is DONE already, so only its registry entry can be stale.
    registry = store.registry()
    stale = [p for p in plans if p.id not in todo_ids
             and registry.get(p.id, {}).get("fingerprint") != p.fingerprint]
    if dry_run:
        return 0
    if not todo and not stale:
        # Nothing to do: succeed without writing anything (the store may well be read-only).
        print(f"0 published, {len(plans)} unchanged (skipped), 0 failed: nothing to do, nothing written",
              flush=True)
        return 0
    # Fail before Ray starts or a model loads when the store cannot take our files.
    store.check_writable()
    run = Run(plans)
    for p in plans:
        if p.id in todo_ids:
            if force:
                stages.clear(store, p)
            stages.write_spec(store, p, facts.identity)
        else:
            stages.skip(store, p, run.out[p.id])
    if todo:
        runner = make_runner(runner_kind, cfg, facts)
        try:
            waves = plan_waves(todo, cfg.cluster)
            if len(waves) > 1:
                print(f"{len(todo)} prompts in {len(waves)} waves of {', '.join(str(len(w)) for w in waves)}",
                      flush=True)
            for n, wave in enumerate(waves, 1):
                name = f"w{n}-" if len(waves) > 1 else ""
                if len(waves) > 1:
                    print(f"[wave {n}/{len(waves)}] {len(wave)} prompts", flush=True)
                synthesize(run, runner, store, wave)
                if run.live(wave):
                    train(run, runner, store, cfg, wave, name)
                if run.live(wave):
                    evaluate_and_publish(run, runner, store, wave)
        finally:
            # The Ray runner's engine actors end here (and their resource demand with them).
            runner.close()
    return finish_report(store, run, manifest, time.time() - t0, started_at=t0)
