"""Batch internalization of a whole manifest on a Ray cluster (`jobs/internalize_many.py`).

Plan first (validate every prompt, fingerprint it, skip what is published unchanged),
then one stage at a time over every prompt that needs it: synthesis with Ray Data
(`genpi.synth.ray_data`), packed training with Ray Train + DeepSpeed
(`genpi.train.trainer`), evaluation on Ray Data engine actors, publish. Every stage
writes its output per prompt in the store before the next starts and is skipped where
that output exists, so a job killed at any moment and submitted again redoes only the
unfinished stages of unfinished prompts. A prompt that fails is recorded with its stage
and error; the others go on.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import traceback
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genpi.config import GenpiConfig
from genpi.internalize import PromptPlan, check_lengths, plan
from genpi.manifest import PromptEntry, load_manifest
from genpi.store import Store, worker_env

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    id: str
    fingerprint: str
    status: str = "pending"  # published | skipped | failed
    error: str | None = None
    failed_stage: str | None = None
    prompt_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    eval: dict | None = None


def load_and_plan(entries: list[PromptEntry], cfg: GenpiConfig, store: Store) -> tuple[list[PromptPlan], Any]:
    """Check every prompt's length against the model and fingerprint it."""
    from transformers import AutoConfig

    from genpi.models import context_limit, load_tokenizer, resolve_model

    resolved = resolve_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    context = context_limit(AutoConfig.from_pretrained(resolved.path, revision=cfg.model.revision), cfg.model)
    check_lengths(entries, tok, context, cfg)
    return plan(entries, cfg, store, resolved.identity, tok), tok


def token_budget(p: PromptPlan, prompt_tokens: int) -> dict[str, int]:
    """A rough count of the tokens a prompt costs: generated, prefilled, trained on."""
    s, t = p.cfg.synth, p.cfg.train
    n_pg = 0 if t.pg_target == "off" or t.w_pg == 0 else min(s.n_pg_examples, s.n_train_inputs)
    replies = s.n_train_inputs * (1 + s.teacher_samples)
    turns = s.roleplay_conversations * max(0, s.roleplay_max_turns - 1)
    inputs_calls = math.ceil((s.n_train_inputs + s.n_heldout_inputs) / 6)
    generated = (inputs_calls * s.input_max_new_tokens + (replies + n_pg) * s.reply_max_new_tokens
                 + n_pg * s.reason_max_new_tokens + turns * (s.env_max_new_tokens + s.reply_max_new_tokens))
    prefill = (inputs_calls + replies + 2 * turns) * (prompt_tokens + 40)
    trained = t.epochs * (replies * (40 + s.reply_max_new_tokens) + n_pg * (prompt_tokens + 3 * s.reply_max_new_tokens))
    return {"generated": generated, "prefill": prefill, "trained": trained}


def format_plan(plans: list[PromptPlan], prompt_tokens: dict[str, int], invalid: int = 0) -> str:
    counts = defaultdict(int)
    for p in plans:
        counts[p.status] += 1
    todo = [p for p in plans if p.status != "unchanged"]
    total = defaultdict(int)
    lines = []
    for p in plans:
        b = token_budget(p, prompt_tokens[p.id]) if p.status != "unchanged" else {}
        for k, v in b.items():
            total[k] += v
        budget = f"~{b['generated']:,} generated, ~{b['trained']:,} trained tokens" if b else "nothing to do"
        lines.append(f"  {p.id:<28} {p.status:<10} {p.fingerprint}  {prompt_tokens[p.id]:>6} prompt tokens  {budget}")
    head = (f"plan: {len(plans)} prompts: {counts['new']} new, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged, {invalid} invalid")
    tail = (f"estimated budget for {len(todo)} prompts: ~{total['generated']:,} generated tokens, "
            f"~{total['prefill']:,} prefill tokens, ~{total['trained']:,} training tokens")
    return "\n".join([head, *lines, tail])


class BatchRun:
    """Runs the stages over every planned prompt; `run()` returns one Outcome per prompt."""

    def __init__(self, cfg: GenpiConfig, store: Store, plans: list[PromptPlan], prompt_tokens: dict[str, int]):
        self.cfg, self.store, self.plans = cfg, store, plans
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.out = {p.id: Outcome(p.id, p.fingerprint, prompt_tokens=prompt_tokens[p.id]) for p in plans}
        self.stage_seconds: dict[str, float] = {}

    def pdir(self, p: PromptPlan) -> str:
        return self.store.prompt_dir(p.id, p.fingerprint)

    def live(self) -> list[PromptPlan]:
        return [p for p in self.plans if self.out[p.id].status == "pending"]

    def fail(self, pid: str, stage: str, error: str) -> None:
        o = self.out[pid]
        o.status, o.failed_stage, o.error = "failed", stage, error
        log.error("%s: %s failed: %s", pid, stage, error)

    def run(self) -> list[Outcome]:
        for p in self.plans:
            if p.status == "unchanged":
                self._skip(p)
            elif not self.store.exists(f"{self.pdir(p)}/spec.json"):
                self.store.write_json(f"{self.pdir(p)}/spec.json", {
                    "entry": p.entry.model_dump(mode="json"), "config": p.cfg.model_dump(mode="json"),
                    "fingerprint": p.fingerprint})
        for stage in ("synth", "train", "eval"):
            if not self.live():
                break
            t0 = time.time()
            getattr(self, f"_{stage}")()
            self.stage_seconds[stage] = round(time.time() - t0, 2)
            done = sum(o.status == "pending" for o in self.out.values())
            failed = sum(o.failed_stage == stage for o in self.out.values())
            print(f"[{stage}] {done} prompts ready for the next stage, {failed} failed, "
                  f"{self.stage_seconds[stage]:.0f} s", flush=True)
        return [self.out[p.id] for p in self.plans]

    def _skip(self, p: PromptPlan) -> None:
        o = self.out[p.id]
        o.status = "skipped"
        ev = f"{self.pdir(p)}/eval.json"
        o.eval = self.store.read_json(ev) if self.store.exists(ev) else None
        # A job killed between DONE and the registry update left it pointing elsewhere.
        if self.store.published(p.id) != p.fingerprint:
            self.store.publish(p.id, p.fingerprint, _registry_summary(o.eval))

    # ---- stages -----------------------------------------------------------------------
    def _synth(self) -> None:
        from genpi.synth.pipeline import SynthJob, format_summaries, synthesize_many
        from genpi.synth.ray_data import RayDataRunner

        jobs = [SynthJob(p.entry, p.cfg, self.pdir(p)) for p in self.live()]
        t0 = time.time()
        results = synthesize_many(jobs, self.store, RayDataRunner(self.cfg))
        print(format_summaries(results), flush=True)
        for pid, r in results.items():
            self.out[pid].seconds["synth"] = round((time.time() - t0) / max(1, len(jobs)), 2)
            if "error" in r:
                self.fail(pid, "synth", r["error"])

    def _train(self) -> None:
        from genpi.train.trainer import TrainJob, train_many

        # Prompts whose own overrides change the training settings train in packs of their own.
        groups: dict[str, list[PromptPlan]] = defaultdict(list)
        for p in self.live():
            groups[p.cfg.train.model_dump_json()].append(p)
        for i, members in enumerate(groups.values()):
            cfg = self.cfg.model_copy(update={"train": members[0].cfg.train})
            jobs = [TrainJob(p.id, self.pdir(p), p.entry.prompt) for p in members]
            t0 = time.time()
            outcomes = train_many(cfg, self.store.uri, jobs, run_name=f"train-{self.run_id}-{i}")
            for o in outcomes:
                self.out[o.prompt_id].seconds["train"] = round((time.time() - t0) / max(1, len(jobs)), 2)
                if o.status == "failed":
                    self.fail(o.prompt_id, "train", o.error or "training failed")
            tps = [o.stats.get("tokens_per_s") for o in outcomes if o.stats and o.stats.get("tokens_per_s")]
            if tps:
                print(f"[train] pack group {i + 1}/{len(groups)}: {len(jobs)} adapters, "
                      f"~{sum(tps) / len(tps):.0f} tokens/s per pack", flush=True)

    def _eval(self) -> None:
        import ray
        from ray.data import ActorPoolStrategy
        from tqdm.auto import tqdm

        from genpi.synth.ray_data import check_resources

        live = self.live()
        c = self.cfg.cluster
        rows = [{"prompt_id": p.id, "payload": pickle.dumps(
            {"entry": p.entry.model_dump(mode="json"), "cfg": p.cfg.model_dump(mode="json"),
             "fingerprint": p.fingerprint})} for p in live]
        actors = check_resources(self.cfg, min(c.synth_actors, len(rows)))
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            EvalActor, fn_constructor_kwargs={"cfg_json": self.cfg.model_dump(mode="json"), "store_uri": self.store.uri},
            batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
            num_cpus=c.cpus_per_engine_actor, num_gpus=c.gpus_per_engine_actor,
            runtime_env={"env_vars": worker_env()})
        with tqdm(total=len(rows), desc="eval", unit="prompt") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for payload in batch["payload"]:
                    r = pickle.loads(payload)
                    o = self.out[r["prompt_id"]]
                    o.seconds["eval"] = round(r["seconds"], 2)
                    bar.update(1)
                    if "error" in r:
                        self.fail(o.id, "eval", r["error"])
                        continue
                    o.eval = r["eval"]
                    self.store.publish(o.id, o.fingerprint, _registry_summary(o.eval))
                    o.status = "published"
                    bar.set_postfix(published=sum(x.status == "published" for x in self.out.values()))


def _registry_summary(ev: dict | None) -> dict:
    return {"kl_ratio": ev["metrics"]["kl"]["ratio"]} if ev else {}


class EvalActor:
    """Holds the base model once; evaluates one prompt's adapter per call (writes eval.json)."""

    def __init__(self, cfg_json: dict, store_uri: str):
        from genpi.internalize import Internalizer

        self.internalizer = Internalizer(GenpiConfig.model_validate(cfg_json), Store(store_uri))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for payload in batch["payload"]:
            row = pickle.loads(payload)
            t0 = time.time()
            entry = PromptEntry.model_validate(row["entry"])
            p = PromptPlan(entry, GenpiConfig.model_validate(row["cfg"]), row["fingerprint"], "new")
            res: dict[str, Any] = {"prompt_id": entry.id}
            try:
                res["eval"] = self.internalizer._eval(p, self.internalizer.store.prompt_dir(entry.id, p.fingerprint))
            except Exception as e:  # this prompt fails; the others are evaluated
                res["error"] = f"{type(e).__name__}: {e}"
                log.error("%s: eval failed\n%s", entry.id, traceback.format_exc())
            res["seconds"] = time.time() - t0
            out.append(res)
        return {"prompt_id": np.array([r["prompt_id"] for r in out], dtype=object),
                "payload": np.array([pickle.dumps(r) for r in out], dtype=object)}


def internalize_many(manifest: str, cfg: GenpiConfig, dry_run: bool = False) -> int:
    """Plan, then synthesize, train, evaluate and publish every prompt; the exit status
    (0: every prompt published or unchanged, 1: some failed)."""
    from genpi.eval.report import write_run_report

    t0 = time.time()
    # The whole manifest is validated (every problem listed at once) before anything is created.
    entries = load_manifest(manifest, validate_overrides=lambda o: cfg.with_overrides(o))
    store = Store(cfg.store)
    plans, tok = load_and_plan(entries, cfg, store)
    prompt_tokens = {p.id: len(tok(p.entry.prompt, add_special_tokens=False)["input_ids"]) for p in plans}
    print(format_plan(plans, prompt_tokens), flush=True)
    if dry_run:
        return 0
    from genpi.synth.ray_data import ensure_ray

    ensure_ray(cfg.cluster)
    run = BatchRun(cfg, store, plans, prompt_tokens)
    outcomes = run.run()
    seconds = time.time() - t0
    counts = {s: sum(o.status == s for o in outcomes) for s in ("published", "skipped", "failed")}
    extra = {"started_at": t0, "store": store.uri, "manifest": str(manifest), "counts": counts,
             "stages": run.stage_seconds}
    run_dir, text = write_run_report(store, plans, outcomes, seconds, run_id=run.run_id, extra=extra)
    print(text)
    try:
        from genpi.eval.html_report import write_html_report

        html = write_html_report(store, run_dir, store.read_json(f"{run_dir}/report.json"))
        print(f"report: {html}")
    except Exception as e:  # the page is for people; its failure must not fail the run
        log.warning("HTML report not written: %s", e)
        print(f"report: {run_dir}/report.md")
    print(f"{counts['published']} published, {counts['skipped']} unchanged, {counts['failed']} failed "
          f"in {seconds / 60:.1f} min", flush=True)
    return 0 if counts["failed"] == 0 else 1
