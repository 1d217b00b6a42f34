"""The synthesis passes, and one pass run for a small group of prompts where the engine is.

A pass (inputs, replies, reasons, role-play) makes each prompt's rows from what the store
holds (see `genpi.synth.stages` for rows), runs them through one stage, and writes each
prompt's outputs under `<prompt dir>/synth/`. `run_pass` does all of that for a group of a
few prompts on one engine -- in this process (`genpi.synth.pipeline.LocalRunner`) or inside
an engine actor (`genpi.pipeline.engine_actors`) -- and returns one small record per prompt
(counts, error, seconds in engine calls). Output rows (teacher top-k log-probabilities: tens
of MB per prompt) never leave the process that made them: the driver of a job of hundreds
of prompts holds records, not rows. Nothing here imports Ray.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from genpi.config import GenpiConfig
from genpi.engines.base import ChatRequest, Engine
from genpi.manifest import PromptEntry
from genpi.store import Store
from genpi.synth.reasons import finish_reason_text, reason_requests
from genpi.synth.replies import as_is_requests, to_be_requests
from genpi.synth.roleplay import first_turns
from genpi.synth.stages import Row, batch_rows, request_dict, run_isolated

log = logging.getLogger(__name__)

PARAPHRASE_ASK = (
    'Rewrite the following instructions for an AI assistant in your own words, keeping every rule:\n"""\n{prompt}\n"""'
)


@dataclass
class SynthJob:
    entry: PromptEntry
    cfg: GenpiConfig
    pdir: str

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass(frozen=True)
class Pass:
    name: str
    stage: str  # the genpi.synth.stages stage its rows run through
    make_rows: Callable[[SynthJob, Store], list[Row]]
    write: Callable[[SynthJob, Store, list[Row]], None]
    # Written last by the pass for every prompt: once it exists the pass has nothing to do
    # for that prompt, so the driver sends no call for it.
    last_file: str


def run_pass(engine: Engine, pass_name: str, jobs: list[SynthJob], store: Store,
             calls: Counter | None = None) -> list[dict]:
    """Pass `pass_name` for `jobs` on `engine`: rows from the store, run in the batches of
    `batch_rows`, each prompt's files written (error.json for a prompt that fails). One
    record per job, in job order: {prompt_id, pass, rows, tokens, model_s[, error]}, where
    model_s is the prompt's share (by rows) of the seconds spent in engine calls. `calls`
    counts the engine batches per stage (an actor's figures)."""
    p = PASS_BY_NAME[pass_name]
    recs = {j.id: {"prompt_id": j.id, "pass": pass_name, "rows": 0, "tokens": 0, "model_s": 0.0} for j in jobs}
    by_id = {j.id: j for j in jobs}
    rows: list[Row] = []
    for j in jobs:
        try:
            made = p.make_rows(j, store)
        except Exception as e:  # e.g. an unreadable earlier file: this prompt fails, not the group
            _fail(store, j, recs[j.id], f"{pass_name}: {type(e).__name__}: {e}")
            continue
        recs[j.id]["rows"] = len(made)
        rows += made
    outs: dict[str, list[Row]] = defaultdict(list)
    n = batch_rows(p.stage, getattr(engine, "batch_size", 8))
    # Rows done within this call: the driver's bar counts whole prompts, so a run of one
    # prompt would otherwise show nothing for the minutes a pass takes (as evaluation does,
    # from an actor too; transient, and at most one update per 5 s).
    bar = tqdm(total=len(rows), desc=f"{pass_name}: {', '.join(recs)[:60]}", unit="row", leave=False,
               mininterval=5, disable=not rows)
    for start in range(0, len(rows), n):
        batch = rows[start : start + n]
        t0 = time.perf_counter()
        results = run_isolated(p.stage, engine, batch)
        seconds = time.perf_counter() - t0
        if calls is not None:
            calls[p.stage] += 1
        for pid, k in Counter(r["prompt_id"] for r in batch).items():
            recs[pid]["model_s"] += seconds * k / len(batch)
        for out in results:
            outs[out["prompt_id"]].append(out)
        bar.update(len(batch))
    bar.close()
    for pid in dict.fromkeys(r["prompt_id"] for r in rows):
        rec, got = recs[pid], outs.pop(pid, [])
        rec["tokens"] = sum(o.get("tokens", 0) for o in got)
        errors = [o for o in got if "error" in o]
        if errors:
            _fail(store, by_id[pid], rec, errors[0]["error"], errors[0].get("traceback"))
            continue
        try:
            p.write(by_id[pid], store, got)
        except Exception as e:  # e.g. no usable inputs: this prompt fails, not the job
            _fail(store, by_id[pid], rec, f"{pass_name}: {type(e).__name__}: {e}")
    return [recs[j.id] for j in jobs]


def _fail(store: Store, j: SynthJob, rec: dict, error: str, tb: str | None = None) -> None:
    rec["error"] = error
    log.error("%s: synthesis failed: %s", j.id, error)
    store.write_json(f"{j.pdir}/error.json", {"error": error, "traceback": tb})


# --- the passes: rows to run, and how each prompt's outputs are written ---------------------
def _sdir(j: SynthJob) -> str:
    return f"{j.pdir}/synth"


def _inputs_rows(j: SynthJob, store: Store) -> list[Row]:
    if store.exists(f"{_sdir(j)}/inputs.parquet"):
        return []
    return [{"prompt_id": j.id, "prompt": j.entry.prompt, "seeds": list(j.entry.seed_inputs),
             "synth": j.cfg.synth.model_dump()}]


def _write_inputs(j: SynthJob, store: Store, outs: list[Row]) -> None:
    (out,) = outs
    if not any(r["split"] == "train" for r in out["inputs"]):
        raise ValueError(f"{j.id}: no usable training inputs could be generated (see inputs_stats.json)")
    if out["stats"]["kept"] < out["stats"]["wanted"]:
        log.warning("%s: only %d usable inputs after %d rounds (wanted %d)", j.id, out["stats"]["kept"],
                    out["stats"]["rounds"], out["stats"]["wanted"])
    store.write_json(f"{_sdir(j)}/inputs_stats.json", out["stats"])
    store.write_parquet(f"{_sdir(j)}/inputs.parquet", out["inputs"])


def _train_inputs(j: SynthJob, store: Store) -> list[str]:
    return [r["input"] for r in store.read_parquet(f"{_sdir(j)}/inputs.parquet") if r["split"] == "train"]


def _n_pg(j: SynthJob, n_train: int) -> int:
    t = j.cfg.train
    return 0 if (t.pg_target == "off" or t.w_pg == 0) else min(j.cfg.synth.n_pg_examples, n_train)


def _replies_rows(j: SynthJob, store: Store) -> list[Row]:
    """TO-BE (teacher, with top-k) and AS-IS replies, and the paraphrased prompt if wanted."""
    s, sdir, rows = j.cfg.synth, _sdir(j), []
    train = _train_inputs(j, store)
    reqs: list[tuple[str, ChatRequest]] = []
    if not store.exists(f"{sdir}/to_be.parquet"):
        reqs += [("to_be", r) for r in to_be_requests(j.entry.prompt, train, s, j.cfg.engine)]
    n_pg = _n_pg(j, len(train))
    if not store.exists(f"{sdir}/as_is.parquet"):
        reqs += [("as_is", r) for r in as_is_requests(train[:n_pg], s)]
    if n_pg and j.cfg.train.pg_target == "paraphrase" and not store.exists(f"{sdir}/paraphrase.json"):
        ask = [{"role": "user", "content": PARAPHRASE_ASK.format(prompt=j.entry.prompt)}]
        reqs.append(("paraphrase", ChatRequest(ask, max_new_tokens=max(64, min(1024, len(j.entry.prompt) // 3)))))
    for kind, r in reqs:
        rows.append({"prompt_id": j.id, "kind": kind, "request": request_dict(r)})
    return rows


def _write_replies(j: SynthJob, store: Store, outs: list[Row]) -> None:
    train = _train_inputs(j, store)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for o in outs:
        by_kind[o["kind"]].append(o["completion"])
    if "paraphrase" in by_kind:
        store.write_json(f"{_sdir(j)}/paraphrase.json", {"text": by_kind["paraphrase"][0]["text"]})
    for kind in ("to_be", "as_is"):  # as_is last: it marks the pass done (Pass.last_file)
        path = f"{_sdir(j)}/{kind}.parquet"
        if store.exists(path):
            continue
        rows = sorted((_reply_row(c, train, kind == "to_be") for c in by_kind.get(kind, [])),
                      key=lambda r: (r["input_idx"], r["sample"]))
        store.write_parquet(path, rows)


def _reply_row(c: dict, inputs: list[str], with_topk: bool) -> dict:
    row = {
        "input_idx": c["tag"]["input_idx"],
        "input": inputs[c["tag"]["input_idx"]],
        "sample": c["tag"].get("sample", 0),
        "text": c["text"],
        "token_ids": c["token_ids"],
        "finish_reason": c["finish_reason"],
    }
    if with_topk:
        row["topk_ids"] = c["topk_ids"]
        row["topk_logprobs"] = c["topk_logprobs"]
    return row


def _greedy(store: Store, j: SynthJob) -> dict[int, dict]:
    return {r["input_idx"]: r for r in store.read_parquet(f"{_sdir(j)}/to_be.parquet") if r["sample"] == 0}


def _reasons_rows(j: SynthJob, store: Store) -> list[Row]:
    if store.exists(f"{_sdir(j)}/reasons.parquet"):
        return []
    as_is = store.read_parquet(f"{_sdir(j)}/as_is.parquet")
    if not (j.cfg.synth.reasons and as_is):
        store.write_parquet(f"{_sdir(j)}/reasons.parquet", [{"input_idx": i, "reason": ""} for i in range(len(as_is))])
        return []
    greedy = _greedy(store, j)
    triples = [{"input": r["input"], "as_is": r["text"], "to_be": greedy[r["input_idx"]]["text"]} for r in as_is]
    return [{"prompt_id": j.id, "kind": "reason", "request": request_dict(r)}
            for r in reason_requests(triples, j.cfg.synth)]


def _write_reasons(j: SynthJob, store: Store, outs: list[Row]) -> None:
    rows = sorted(({"input_idx": o["completion"]["tag"]["input_idx"], "reason": finish_reason_text(o["completion"]["text"])}
                   for o in outs), key=lambda r: r["input_idx"])
    store.write_parquet(f"{_sdir(j)}/reasons.parquet", rows)


def _roleplay_rows(j: SynthJob, store: Store) -> list[Row]:
    s = j.cfg.synth
    if store.exists(f"{_sdir(j)}/conversations.parquet"):
        return []
    greedy = _greedy(store, j)
    # Conversations continue from usable first replies only (an empty reply opens nothing).
    starts = [r for _, r in sorted(greedy.items()) if r["text"].strip()][: s.roleplay_conversations]
    if not starts or s.roleplay_max_turns < 2:
        store.write_parquet(f"{_sdir(j)}/conversations.parquet", [])
        return []
    settings = {"max_turns": s.roleplay_max_turns, "end_marker": s.end_marker,
                "env_max_new_tokens": s.env_max_new_tokens, "agent_max_new_tokens": s.reply_max_new_tokens,
                "top_k_logprobs": j.cfg.engine.top_k_logprobs, "temperature": s.env_temperature, "seed": s.seed}
    return [{"prompt_id": j.id, "prompt": j.entry.prompt, "demos": list(j.entry.seed_inputs),
             "input_idx": r["input_idx"], "messages": first_turns(r["input_idx"], r["input"], r).messages,
             "settings": settings} for r in starts]


def _write_roleplay(j: SynthJob, store: Store, outs: list[Row]) -> None:
    rows = sorted(({"input_idx": o["input_idx"], "messages": o["messages"], "end_reason": o["end_reason"],
                    "agent_turns": sum(m["role"] == "assistant" for m in o["messages"])} for o in outs),
                  key=lambda r: r["input_idx"])
    store.write_parquet(f"{_sdir(j)}/conversations.parquet", rows)


PASSES: list[Pass] = [
    Pass("inputs", "inputs", _inputs_rows, _write_inputs, "inputs.parquet"),
    Pass("replies", "generate", _replies_rows, _write_replies, "as_is.parquet"),
    Pass("reasons", "generate", _reasons_rows, _write_reasons, "reasons.parquet"),
    Pass("roleplay", "roleplay", _roleplay_rows, _write_roleplay, "conversations.parquet"),
]
PASS_BY_NAME = {p.name: p for p in PASSES}
