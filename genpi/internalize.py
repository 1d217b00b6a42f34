"""Internalize the prompts of a manifest on this machine: plan, synthesize, train, evaluate,
publish, report. Every stage is resumable from the store; one failing prompt is recorded
and the others go on. (jobs/internalize_many.py runs the same stages at cluster scale.)"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field

from genpi.config import GenpiConfig
from genpi.manifest import PromptEntry, validate_prompt_lengths
from genpi.store import Store, fingerprint

log = logging.getLogger(__name__)

STAGES = ("synth", "train", "eval")


@dataclass
class PromptPlan:
    entry: PromptEntry
    cfg: GenpiConfig
    fingerprint: str
    status: str  # new | changed | unchanged

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass
class PromptResult:
    id: str
    fingerprint: str
    status: str  # published | skipped | failed
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    eval: dict | None = None


def tokenizer_identity(tok) -> str:
    blob = f"{type(tok).__name__}:{len(tok)}:{tok.chat_template}:{tok.eos_token}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prompt_fingerprint(entry: PromptEntry, cfg: GenpiConfig, model_identity: str, tok_identity: str) -> str:
    return fingerprint(
        {
            "prompt": entry.prompt,
            "seed_inputs": entry.seed_inputs,
            "checks": [c.model_dump(mode="json") for c in entry.checks],
            "model": model_identity,
            "model_revision": cfg.model.revision,
            "tokenizer": tok_identity,
            "top_k_logprobs": cfg.engine.top_k_logprobs,
            "synth": cfg.stage_dict("synth"),
            "train": cfg.stage_dict("train"),
            "eval": cfg.stage_dict("eval"),
        }
    )


def plan(entries: list[PromptEntry], cfg: GenpiConfig, store: Store, model_identity: str, tok) -> list[PromptPlan]:
    """Per-prompt configs and fingerprints, and whether each is already published."""
    reg = store.registry()
    tid = tokenizer_identity(tok)
    plans = []
    for e in entries:
        pcfg = cfg.with_overrides(e.overrides, f"prompt '{e.id}' overrides") if e.overrides else cfg
        fp = prompt_fingerprint(e, pcfg, model_identity, tid)
        if store.is_done(e.id, fp):
            status = "unchanged"
        else:
            status = "changed" if e.id in reg else "new"
        plans.append(PromptPlan(e, pcfg, fp, status))
    return plans


def check_lengths(entries: list[PromptEntry], tok, context: int, cfg: GenpiConfig) -> None:
    """A prompt must leave room for an input and a reply inside the model's context."""
    budget = context - cfg.synth.reply_max_new_tokens - 128
    if budget <= 0:
        from genpi.config import ConfigError

        raise ConfigError(
            f"model.max_context: a context of {context} tokens leaves no room for a prompt after "
            f"{cfg.synth.reply_max_new_tokens} reply tokens (synth.reply_max_new_tokens) and 128 input tokens; "
            "raise model.max_context or lower synth.reply_max_new_tokens"
        )
    problems = validate_prompt_lengths(entries, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]), budget)
    if problems:
        from genpi.manifest import ManifestError

        raise ManifestError(problems)


class Internalizer:
    """Holds the base model once and runs every stage of every prompt on it."""

    def __init__(self, cfg: GenpiConfig, store: Store):
        from genpi.models import load_tokenizer, resolve_model

        self.cfg = cfg
        self.store = store
        # The tokenizer and the model's identity are enough to plan; the weights are loaded
        # on first use, so a re-run with nothing to do stays fast.
        self.resolved = resolve_model(cfg.model)
        self.tok = load_tokenizer(cfg.model)
        self._model = self._engine = None

    @property
    def model(self):
        if self._model is None:
            from genpi.models import load_model

            self._model, _, _ = load_model(self.cfg.model)
        return self._model

    @property
    def engine(self):
        if self._engine is None:
            from genpi.engines.hf import HFEngine

            self._engine = HFEngine(self.model, self.tok, self.cfg.engine.batch_size)
        return self._engine

    def context(self) -> int:
        from transformers import AutoConfig

        from genpi.models import context_limit

        return context_limit(AutoConfig.from_pretrained(self.resolved.path, revision=self.cfg.model.revision),
                             self.cfg.model)

    def run(self, plans: list[PromptPlan], force: bool = False) -> list[PromptResult]:
        results = []
        for i, p in enumerate(plans):
            if p.status == "unchanged" and not force:
                log.info("[%d/%d] %s: unchanged (fingerprint %s), skipped", i + 1, len(plans), p.id, p.fingerprint)
                pdir = self.store.prompt_dir(p.id, p.fingerprint)
                ev = self.store.read_json(f"{pdir}/eval.json") if self.store.exists(f"{pdir}/eval.json") else None
                results.append(PromptResult(p.id, p.fingerprint, "skipped", eval=ev))
                continue
            log.info("[%d/%d] %s: internalizing (fingerprint %s)", i + 1, len(plans), p.id, p.fingerprint)
            if force:
                self.clear(p)
            results.append(self.run_one(p))
        return results

    def clear(self, p: PromptPlan) -> None:
        """Forget every stage's output of this fingerprint (DONE first, so nothing half-redone is served)."""
        pdir = self.store.prompt_dir(p.id, p.fingerprint)
        for name in ("DONE", "eval.json", "adapter", "train.json", "synth", "error.json"):
            self.store.remove(f"{pdir}/{name}")

    def run_one(self, p: PromptPlan) -> PromptResult:
        res = PromptResult(p.id, p.fingerprint, "failed")
        pdir = self.store.prompt_dir(p.id, p.fingerprint)
        try:
            if not self.store.exists(f"{pdir}/spec.json"):
                self.store.write_json(
                    f"{pdir}/spec.json",
                    {"entry": p.entry.model_dump(mode="json"), "config": p.cfg.model_dump(mode="json"),
                     "model": self.resolved.identity, "fingerprint": p.fingerprint},
                )
            for stage in STAGES:
                t0 = time.time()
                getattr(self, f"_{stage}")(p, pdir)
                res.seconds[stage] = time.time() - t0
            res.eval = self.store.read_json(f"{pdir}/eval.json")
            self.store.publish(p.id, p.fingerprint, {"kl_ratio": res.eval["metrics"]["kl"]["ratio"]})
            res.status = "published"
        except Exception as e:  # one prompt's failure must not stop the others
            res.error = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s\n%s", p.id, res.error, traceback.format_exc())
            self.store.write_json(f"{pdir}/error.json", {"error": res.error, "traceback": traceback.format_exc()})
        return res

    def reevaluate(self, p: PromptPlan, pdir: str) -> dict:
        """Evaluate an already trained adapter again (e.g. after changing eval settings)."""
        return self._eval(p, pdir, force=True)

    # ---- stages ------------------------------------------------------------------------
    def _synth(self, p: PromptPlan, pdir: str) -> None:
        from genpi.synth.pipeline import synthesize

        synthesize(self.engine, p.entry, p.cfg, self.store, pdir)

    def _train(self, p: PromptPlan, pdir: str) -> None:
        from tqdm.auto import tqdm

        from genpi.synth.pipeline import load_synth
        from genpi.train.loop import build_examples, train_adapter

        if self.store.exists(f"{pdir}/adapter/adapter_model.safetensors"):
            return
        ts = build_examples(self.tok, load_synth(self.store, pdir), p.entry.prompt, p.cfg.train)
        with tempfile.TemporaryDirectory(prefix="genpi-adapter-") as tmp, \
                tqdm(desc=f"{p.id}: training", unit="step", leave=False) as bar:
            def on_step(step, total, logs):
                bar.total = total
                bar.set_postfix(loss=f"{logs['loss']:.3f}", kind=logs["kind"])
                bar.update(1)
            stats = train_adapter(self.model, self.tok, ts, p.cfg.train, tmp, on_step)
            stats["examples"] = dict(stats["examples"])
            self.store.write_json(f"{pdir}/train.json", stats)
            # The adapter folder appears whole: a killed run never leaves a half adapter.
            self.store.put_dir(tmp, f"{pdir}/adapter")

    def _eval(self, p: PromptPlan, pdir: str, force: bool = False) -> dict:
        if self.store.exists(f"{pdir}/eval.json") and not force:
            return self.store.read_json(f"{pdir}/eval.json")
        from peft import PeftModel

        from genpi.eval.run import evaluate

        inputs = self.store.read_parquet(f"{pdir}/synth/inputs.parquet")
        heldout = [r["input"] for r in inputs if r["split"] == "heldout"]
        with tempfile.TemporaryDirectory(prefix="genpi-eval-") as tmp:
            adir = self.store.get_dir(f"{pdir}/adapter", tmp)
            name = "a_" + uuid.uuid4().hex[:8]
            peft_model = PeftModel.from_pretrained(self.model, adir, adapter_name=name)
            try:
                result = evaluate(peft_model, self.tok, p.entry, heldout, name, p.cfg)
            finally:
                peft_model.unload()
        self.store.write_json(f"{pdir}/eval.json", result)
        return result
