"""Plan a run: validate every prompt against the model, fingerprint it, estimate its cost.

The fingerprint holds content only (prompt, seed inputs, checks, base model and revision,
tokenizer, the stage settings that change what a stage produces); settings that change how
a stage runs are left out by `GenpiConfig.stage_dict`, so changing them redoes nothing.
Ray-free and model-weight-free: planning needs the tokenizer and the model's config only.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from genpi.config import ConfigError, GenpiConfig
from genpi.manifest import ManifestError, PromptEntry, validate_prompt_lengths
from genpi.pipeline.records import PromptPlan
from genpi.store import Store, fingerprint

# What a prompt of train.long_prompt_tokens or more (1000: the quality issue's class of long
# prompts) trains with instead of the defaults, which the short prompts chose. On shell_agent
# (1,782 tokens) at full size, off-policy lr 2e-3 over 3 epochs, then 8 on-policy epochs at
# lr 1e-3, took the KL ratio on the human-written set from 0.64 to 0.71, each of the four a
# step of 0.01-0.03 (README, bench/quality.py's lr2mix, lr2mix8, lr2off3mix8, lr2off3mix8on1);
# on the 7 short prompts lr 2e-3 lost (0.71 against 0.77), so they keep the defaults. It costs
# the long prompt about 1.3 times the default's training time.
LONG_PROMPT_SETTINGS: dict[str, Any] = {"train.lr": 2e-3, "train.epochs": 3, "train.on_policy_epochs": 8,
                                        "train.on_policy_lr": 1e-3}

# The plan lists prompts one per line up to this many; beyond, totals and the odd ones out
# (at most MAX_ODD_LINES of them), so that a plan of hundreds of prompts fits a screen.
MAX_PLAN_LINES = 20
MAX_ODD_LINES = 15


def wave_sizes(n: int, first: int, cap: int, growth: int = 4) -> list[int]:
    """Sizes of the waves `n` prompts go through: `first`, then each `growth` times the one
    before, up to `cap` (or `first` if larger). A remainder smaller than the wave it would
    have made joins the wave before (it would pay a whole wave's fixed costs -- Ray Train's
    start, the engine actors' model load, ~38 s on 2 CPU cores -- for fewer prompts than the
    plan gives a wave there; so the last wave holds up to twice `cap`); the first wave is
    never enlarged."""
    cap = max(cap, first)
    sizes: list[int] = []
    size = first
    while n > 0:
        take = min(size, n)
        if len(sizes) > 1 and take < size:
            sizes[-1] += take
        else:
            sizes.append(take)
        n -= take
        size = min(size * growth, cap)
    return sizes


def plan_waves(items: list, cluster) -> list[list]:
    """`items` cut into consecutive waves of `wave_sizes` at the cluster's wave settings."""
    waves, at = [], 0
    for size in wave_sizes(len(items), cluster.wave_prompts, cluster.max_wave_prompts, cluster.wave_growth):
        waves.append(items[at:at + size])
        at += size
    return waves


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


@dataclass
class ModelFacts:
    """What planning needs from the base model: its identity, tokenizer and context."""
    identity: str
    path: str
    tok: Any
    context: int


def model_facts(cfg: GenpiConfig) -> ModelFacts:
    from transformers import AutoConfig

    from genpi.models import context_limit, load_tokenizer, resolve_model

    resolved = resolve_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    context = context_limit(AutoConfig.from_pretrained(resolved.path, revision=cfg.model.revision), cfg.model)
    return ModelFacts(resolved.identity, resolved.path, tok, context)


def check_lengths(entries: list[PromptEntry], tok, context: int, cfg: GenpiConfig) -> None:
    """A prompt must leave room for an input and a reply inside the model's context."""
    budget = context - cfg.synth.reply_max_new_tokens - 128
    if budget <= 0:
        raise ConfigError(
            f"model.max_context: a context of {context} tokens leaves no room for a prompt after "
            f"{cfg.synth.reply_max_new_tokens} reply tokens (synth.reply_max_new_tokens) and 128 input tokens; "
            "raise model.max_context or lower synth.reply_max_new_tokens"
        )
    problems = validate_prompt_lengths(entries, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]), budget)
    if problems:
        raise ManifestError(problems)


def _setting(cfg: GenpiConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def prompt_config(cfg: GenpiConfig, entry: PromptEntry, n_tokens: int) -> tuple[GenpiConfig, tuple[str, ...]]:
    """One prompt's config, and the long-prompt settings it took: the run's config; then, for a
    prompt of train.long_prompt_tokens or more, LONG_PROMPT_SETTINGS wherever the run's config
    still holds the shipped default (a value other than the default, from a config file or the
    command line, wins even for long prompts; the config keeps no record of which values were
    written, so one written equal to the default is not told apart from it); then the prompt's manifest entry's overrides, which win over both."""
    long = {}
    if cfg.train.long_prompt_tokens and n_tokens >= cfg.train.long_prompt_tokens:
        shipped = GenpiConfig()
        long = {k: v for k, v in LONG_PROMPT_SETTINGS.items() if _setting(cfg, k) == _setting(shipped, k)}
    pcfg = cfg.with_overrides(long, f"long-prompt settings ({n_tokens} tokens)") if long else cfg
    if entry.overrides:
        pcfg = pcfg.with_overrides(entry.overrides, f"prompt '{entry.id}' overrides")
    return pcfg, tuple(k for k, v in long.items() if _setting(pcfg, k) == v)


def plan(entries: list[PromptEntry], cfg: GenpiConfig, store: Store, facts: ModelFacts) -> list[PromptPlan]:
    """Per-prompt configs and fingerprints, and whether each is already published."""
    check_lengths(entries, facts.tok, facts.context, cfg)
    reg = store.registry()
    tid = tokenizer_identity(facts.tok)
    plans = []
    for e in entries:
        n_tokens = len(facts.tok(e.prompt, add_special_tokens=False)["input_ids"])
        pcfg, long = prompt_config(cfg, e, n_tokens)
        fp = prompt_fingerprint(e, pcfg, facts.identity, tid)
        if store.is_done(e.id, fp):
            status = "unchanged"
        else:
            status = "changed" if e.id in reg else "new"
        plans.append(PromptPlan(e, pcfg, fp, status, n_tokens, long_settings=long))
    return plans


def token_budget(p: PromptPlan) -> dict[str, int]:
    """A rough count of the tokens a prompt costs: generated, prefilled, trained on."""
    s, t = p.cfg.synth, p.cfg.train
    n_pg = 0 if t.pg_target == "off" or t.w_pg == 0 else min(s.n_pg_examples, s.n_train_inputs)
    replies = s.n_train_inputs * (1 + s.teacher_samples)
    turns = s.roleplay_conversations * max(0, s.roleplay_max_turns - 1)
    inputs_calls = math.ceil((s.n_train_inputs + s.n_heldout_inputs) / 6)
    generated = (inputs_calls * s.input_max_new_tokens + (replies + n_pg) * s.reply_max_new_tokens
                 + n_pg * s.reason_max_new_tokens + turns * (s.env_max_new_tokens + s.reply_max_new_tokens))
    prefill = (inputs_calls + replies + 2 * turns) * (p.prompt_tokens + 40)
    trained = t.epochs * (replies * (40 + s.reply_max_new_tokens) + n_pg * (p.prompt_tokens + 3 * s.reply_max_new_tokens))
    if t.on_policy_epochs:  # the adapter's own replies: sampled once per round, trained on each phase epoch
        generated += t.on_policy_rounds * s.n_train_inputs * t.on_policy_max_new_tokens
        # the teacher's scoring
        prefill += t.on_policy_rounds * s.n_train_inputs * (p.prompt_tokens + 40 + t.on_policy_max_new_tokens)
        trained += t.on_policy_epochs * s.n_train_inputs * (40 + t.on_policy_max_new_tokens)
        # train.on_policy_replay: that share of the teacher replies again, in every phase epoch
        trained += t.on_policy_epochs * round(t.on_policy_replay * replies) * (40 + s.reply_max_new_tokens)
    return {"generated": generated, "prefill": prefill, "trained": trained}


def _plan_line(p: PromptPlan, todo: bool, why: str = "") -> str:
    b = token_budget(p) if todo else {}
    budget = f"~{b['generated']:,} generated, ~{b['trained']:,} trained tokens" if b else "nothing to do"
    return (f"  {p.id:<28} {p.status:<10} {p.fingerprint}  {p.prompt_tokens:>6} prompt tokens  {budget}"
            + (f"  [{why}]" if why else ""))


def _settings_note(p: PromptPlan) -> str:
    """The prompt's settings of its own: its manifest overrides, the long-prompt settings."""
    notes = []
    if p.entry.overrides:
        notes.append("own settings: " + ", ".join(sorted(p.entry.overrides)))
    if p.long_settings:
        notes.append("long prompt: " + ", ".join(f"{k}={_setting(p.cfg, k)}" for k in p.long_settings))
    return "; ".join(notes)


def _odd_ones(plans: list[PromptPlan]) -> list[tuple[PromptPlan, str]]:
    """The prompts that differ from the bulk: a status other than the commonest one (e.g. the
    few changed among hundreds unchanged), or settings of their own (per-prompt overrides)."""
    common = Counter(p.status for p in plans).most_common(1)[0][0]
    odd = []
    for p in plans:
        why = [p.status] if p.status != common else []
        if _settings_note(p):
            why.append(_settings_note(p))
        if why:
            odd.append((p, "; ".join(why)))
    return odd


def format_plan(plans: list[PromptPlan], force: bool = False) -> str:
    """The plan as people read it: counts, one line per prompt (up to MAX_PLAN_LINES prompts;
    beyond, the prompt lengths and the odd ones out), the budget."""
    counts = Counter(p.status for p in plans)
    todo = [p for p in plans if force or p.status != "unchanged"]
    todo_ids = {id(p) for p in todo}
    total: Counter = Counter()
    for p in todo:
        total.update(token_budget(p))
    if len(plans) <= MAX_PLAN_LINES:
        lines = [_plan_line(p, id(p) in todo_ids, _settings_note(p)) for p in plans]
    else:
        lengths = sorted(plans, key=lambda p: p.prompt_tokens)
        longest = lengths[-1]
        lines = [f"  prompt tokens: min {lengths[0].prompt_tokens}, median {lengths[len(lengths) // 2].prompt_tokens}, "
                 f"max {longest.prompt_tokens} ({longest.id})"]
        odd = _odd_ones(plans)
        lines += [_plan_line(p, id(p) in todo_ids, why) for p, why in odd[:MAX_ODD_LINES]]
        if len(odd) > MAX_ODD_LINES:
            lines.append(f"  ... and {len(odd) - MAX_ODD_LINES} more that differ from the rest")
        lines.append(f"  ({len(plans) - min(len(odd), MAX_ODD_LINES)} prompts not listed; "
                     "the run report lists every prompt with its fingerprint)")
    head = (f"plan: {len(plans)} prompts: {counts['new']} new, {counts['changed']} changed, "
            f"{counts['unchanged']} unchanged" + (" (--force: every prompt is redone)" if force else ""))
    tail = (f"estimated budget for {len(todo)} prompts: ~{total['generated']:,} generated tokens, "
            f"~{total['prefill']:,} prefill tokens, ~{total['trained']:,} training tokens")
    return "\n".join([head, *lines, tail])
