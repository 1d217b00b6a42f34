"""The synthesis stages as functions of (engine, rows) -> rows, batched across prompts.

A row is one (prompt, item) pair: a prompt to find inputs for, one generation request, or
one conversation to role-play. The same functions run in-process on one engine (one
prompt, `genpi internalize`) and inside Ray Data engine actors (many prompts,
`genpi.pipeline.ray_runner`), so both paths produce the same data. Rows are plain dicts of
Python values; nothing here imports Ray.

A batch may mix prompts; when it fails, each prompt's rows are retried alone so that one
prompt's bad data (or a request its prompt makes impossible) fails that prompt only.
"""
from __future__ import annotations

import dataclasses
import traceback
from collections import Counter, defaultdict
from typing import Any, Callable

from genpi.config import SynthConfig
from genpi.engines.base import ChatRequest, Completion, Engine
from genpi.synth import inputs as inp
from genpi.synth import sections as sec
from genpi.synth.diversity import versus_human
from genpi.synth.roleplay import Conversation, run_roleplay

Row = dict[str, Any]


# --- 1. pseudo inputs: one row per prompt ---------------------------------------------------
# The inputs pass rounds each round's calls up to a multiple of this (or of the engine batch,
# when smaller), not to whole engine batches: each call is one list of candidate inputs, and
# at engine batch 128 whole batches tripled the French job's inputs pass (56 s at 32, 198 s
# at 128) for candidates it did not need. 32 is what the pass used before the batch grew.
INPUT_CALLS_UNIT = 32


def inputs_stage(engine: Engine, rows: list[Row]) -> list[Row]:
    """rows: {prompt_id, prompt, seeds, synth}. Rounds of list-continuation requests for
    every prompt still short of inputs, one engine call per round for the whole batch."""
    state = []
    for r in rows:
        cfg = SynthConfig(**r["synth"])
        # Generic inputs (synth.generic_share) are a quota of their own within the training inputs.
        s = {"row": r, "cfg": cfg, "pool": inp.InputPool(cfg, list(r["seeds"])), "rounds": 0, "calls": 0,
             "need": cfg.n_train_inputs - cfg.generic_inputs + cfg.n_heldout_inputs, "tokens": 0, "sections": [],
             "need_generic": cfg.generic_inputs, "generic_calls": 0}
        if cfg.section_inputs:
            n_tok, counted = sec.prompt_tokens(r["prompt"], getattr(engine, "tok", None))
            s["sections"] = sec.prompt_sections(r["prompt"], cfg.section_inputs, n_tok)
            s["prompt_tokens"] = {"tokens": n_tok, "counted_by": counted}
        state.append(s)
    unit = min(getattr(engine, "batch_size", 8), INPUT_CALLS_UNIT)
    while True:
        # A prompt with sections has one round even when its seeds are enough: every section
        # gets its inputs.
        short = [s for s in state if s["rounds"] < s["cfg"].max_input_rounds and
                 (s["pool"].count() < s["need"] or s["pool"].count(generic=True) < s["need_generic"]
                  or (s["sections"] and not s["rounds"]))]
        if not short:
            break
        # Enough calls for each shortfall at ~6 usable items per call (and, the first time, two
        # per section: one for the whole prompt, one for the section); the total is rounded up
        # to whole units (spare rows of a batch cost little and add candidates to choose from).
        calls = [max(-(-(s["need"] - s["pool"].count()) // 6), 0 if s["rounds"] else 2 * len(s["sections"]))
                 for s in short]
        spare = -(-sum(calls) // unit) * unit - sum(calls)
        for i in range(spare):
            calls[i % len(calls)] += 1
        reqs, owner = [], []
        for s, n in zip(short, calls):
            new = inp.input_requests(s["row"]["prompt"], s["pool"].texts(), s["cfg"], s["rounds"], n,
                                     first_call=s["calls"], sections=s["sections"])
            s["calls"] += n
            g = max(-(-(s["need_generic"] - s["pool"].count(generic=True)) // 6), 0)
            if g:
                new += inp.generic_requests(s["row"]["prompt"], s["pool"].texts(generic=True), s["cfg"],
                                            s["rounds"], g, first_call=s["generic_calls"])
                s["generic_calls"] += g
            reqs += new
            owner += [s] * len(new)
        for s, r, c in zip(owner, reqs, engine.generate(reqs)):
            s["tokens"] += len(c.token_ids)
            meta = {k: v for k, v in r.tag.items() if k not in ("first_item", inp.GENERIC)}
            source = inp.GENERIC if r.tag.get(inp.GENERIC) else "generated"
            for item in inp.parse_items(c.text):
                s["pool"].add(item, source, meta)
        for s in short:
            s["rounds"] += 1
    return [_inputs_out(s) for s in state]


def _inputs_out(s: dict) -> Row:
    cfg, pool = s["cfg"], s["pool"]
    train, held = inp.split_inputs(pool, cfg.n_train_inputs, cfg.n_heldout_inputs, cfg.seed,
                                   n_generic=cfg.generic_inputs)
    diversity = pool.count() / s["need"]
    stats = {
        "kept": len(pool.items),
        "wanted": s["need"] + s["need_generic"],
        "seeds": len(s["row"]["seeds"]),
        "rounds": s["rounds"],
        "dropped": dict(pool.dropped),
        "train": len(train),
        "heldout": len(held),
        "diversity": round(diversity, 3),
        "below_diversity_target": diversity < cfg.min_diversity,
        # The written inputs beside the human-written set (synth/summary.json "diversity").
        "diversity_vs_human": versus_human([r["input"] for r in train + held]),
    }
    if cfg.section_inputs:
        stats["prompt_tokens"] = s["prompt_tokens"]
        stats["sections"] = {x.label: sum(r.get("section") == x.label for r in train + held) for x in s["sections"]}
    if cfg.generic_inputs:
        stats["generic"] = {"wanted": cfg.generic_inputs, "train": sum(r["source"] == inp.GENERIC for r in train)}
    if cfg.seed_topics:
        stats["topics"] = dict(Counter(r["topic"] for r in train + held if r.get("topic")))
    return {"prompt_id": s["row"]["prompt_id"], "inputs": train + held, "stats": stats, "tokens": s["tokens"]}


# --- 2. one generation request per row ------------------------------------------------------
def generate_stage(engine: Engine, rows: list[Row]) -> list[Row]:
    """rows: {prompt_id, kind, request (ChatRequest fields)} -> {prompt_id, kind, completion}."""
    reqs = [ChatRequest(**r["request"]) for r in rows]
    outs = engine.generate(reqs)
    return [
        {"prompt_id": r["prompt_id"], "kind": r["kind"], "completion": completion_dict(c),
         "tokens": len(c.token_ids)}
        for r, c in zip(rows, outs)
    ]


def request_dict(req: ChatRequest) -> dict:
    return dataclasses.asdict(req)


def completion_dict(c: Completion) -> dict:
    return dataclasses.asdict(c)


# --- 3. role-play: one row per conversation -------------------------------------------------
def roleplay_stage(engine: Engine, rows: list[Row]) -> list[Row]:
    """rows: {prompt_id, prompt, demos, input_idx, messages, settings}; conversations with the
    same settings advance together, one engine call per side per turn."""
    groups: dict[tuple, list[tuple[Row, Conversation]]] = defaultdict(list)
    for r in rows:
        key = tuple(sorted(r["settings"].items()))
        groups[key].append((r, Conversation(input_idx=r["input_idx"], messages=list(r["messages"]))))
    out = []
    for key, members in groups.items():
        settings = dict(key)
        stats = run_roleplay(engine, [(r["prompt"], r["demos"], c) for r, c in members], **settings)
        for r, c in members:
            tokens = sum(len(m.get("token_ids") or []) for m in c.messages[2:])
            out.append({"prompt_id": r["prompt_id"], "input_idx": c.input_idx, "messages": c.messages,
                        "end_reason": c.end_reason, "tokens": tokens, "engine_calls": stats.calls})
    return out


STAGES: dict[str, Callable[[Engine, list[Row]], list[Row]]] = {
    "inputs": inputs_stage,
    "generate": generate_stage,
    "roleplay": roleplay_stage,
}


def batch_rows(stage: str, engine_batch: int) -> int:
    """Rows per call of a stage: enough to fill the engine's batches."""
    return {"inputs": 8, "generate": 4 * engine_batch, "roleplay": engine_batch}[stage]


def run_isolated(stage: str, engine: Engine, rows: list[Row]) -> list[Row]:
    """Run a stage on a batch; if it fails, retry each prompt's rows alone, and turn a
    prompt that still fails into one error row naming it (the others' rows stand)."""
    fn = STAGES[stage]
    try:
        return fn(engine, rows)
    except Exception as first:
        by_prompt: dict[str, list[Row]] = defaultdict(list)
        for r in rows:
            by_prompt[r["prompt_id"]].append(r)
        if len(by_prompt) == 1:
            return [_error_row(next(iter(by_prompt)), stage, first)]
        out: list[Row] = []
        for pid, prow in by_prompt.items():
            try:
                out += fn(engine, prow)
            except Exception as e:
                out.append(_error_row(pid, stage, e))
        return out


def _error_row(prompt_id: str, stage: str, e: Exception) -> Row:
    return {"prompt_id": prompt_id, "error": f"{stage}: {type(e).__name__}: {e}",
            "traceback": traceback.format_exc(), "tokens": 0}
