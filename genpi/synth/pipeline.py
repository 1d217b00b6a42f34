"""Synthesis for one prompt on one engine: inputs -> TO-BE -> AS-IS -> reasons, each a
Parquet file under `<prompt dir>/synth/`, each skipped when already there (resume)."""
from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from genpi.config import GenpiConfig
from genpi.engines.base import ChatRequest, Completion, Engine
from genpi.manifest import PromptEntry
from genpi.store import Store
from genpi.synth import inputs as inp
from genpi.synth.reasons import finish_reason_text, reason_requests
from genpi.synth.replies import as_is_requests, to_be_requests

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
PARAPHRASE_ASK = (
    'Rewrite the following instructions for an AI assistant in your own words, keeping every rule:\n"""\n{prompt}\n"""'
)


def _run(engine: Engine, reqs: list[ChatRequest], desc: str) -> list[Completion]:
    with tqdm(total=len(reqs), desc=desc, unit="req", leave=False) as bar:
        return engine.generate(reqs, progress=bar.update)


def synthesize(engine: Engine, entry: PromptEntry, cfg: GenpiConfig, store: Store, pdir: str) -> dict:
    """Run every missing synthesis stage for `entry`; return the synthesis summary."""
    sdir = f"{pdir}/synth"
    if store.exists(f"{sdir}/{COMPLETE}"):
        return store.read_json(f"{sdir}/summary.json")
    s = cfg.synth
    timings: dict[str, float] = {}

    # 1. pseudo inputs ----------------------------------------------------------------
    path = f"{sdir}/inputs.parquet"
    if store.exists(path):
        rows = store.read_parquet(path)
        input_stats = store.read_json(f"{sdir}/inputs_stats.json")
    else:
        t0 = time.time()
        pool = inp.InputPool(s, entry.seed_inputs)
        need = s.n_train_inputs + s.n_heldout_inputs
        rounds = 0
        with tqdm(total=need, desc=f"{entry.id}: inputs", unit="input", leave=False) as bar:
            bar.update(len(pool.items))
            while len(pool.items) < need and rounds < s.max_input_rounds:
                examples = pool.texts()
                # Enough calls for the shortfall at ~6 usable items per call, rounded up to whole
                # engine batches (a nearly empty last batch costs almost a full one).
                batch = getattr(engine, "batch_size", 8)
                n_calls = -(-(need - len(pool.items)) // 6)
                n_calls = -(-n_calls // batch) * batch
                outs = engine.generate(inp.input_requests(entry.prompt, examples, s, rounds, n_calls))
                before = len(pool.items)
                for c in outs:
                    for item in inp.parse_items(c.text):
                        pool.add(item, "generated")
                bar.update(len(pool.items) - before)
                rounds += 1
        train, held = inp.split_inputs(pool, s.n_train_inputs, s.n_heldout_inputs, s.seed)
        rows = train + held
        input_stats = {
            "kept": len(pool.items),
            "seeds": len(entry.seed_inputs),
            "rounds": rounds,
            "dropped": dict(pool.dropped),
            "train": len(train),
            "heldout": len(held),
        }
        if len(pool.items) < need:
            log.warning("%s: only %d usable inputs after %d rounds (wanted %d)", entry.id, len(pool.items), rounds, need)
        store.write_json(f"{sdir}/inputs_stats.json", input_stats)
        store.write_parquet(path, rows)
        timings["inputs_s"] = time.time() - t0
    train_inputs = [r["input"] for r in rows if r["split"] == "train"]
    if not train_inputs:
        raise ValueError(f"{entry.id}: no usable training inputs could be generated (see inputs_stats.json)")

    # 2. TO-BE: teacher replies with top-k log-probabilities ---------------------------
    path = f"{sdir}/to_be.parquet"
    if store.exists(path):
        to_be = store.read_parquet(path)
    else:
        t0 = time.time()
        outs = _run(engine, to_be_requests(entry.prompt, train_inputs, s, cfg.engine), f"{entry.id}: teacher replies")
        to_be = [_reply_row(c, train_inputs) for c in outs]
        store.write_parquet(path, to_be)
        timings["to_be_s"] = time.time() - t0

    # 3. AS-IS replies and reasons, for the prompt-generation examples -----------------
    n_pg = 0 if (cfg.train.pg_target == "off" or cfg.train.w_pg == 0) else min(s.n_pg_examples, len(train_inputs))
    pg_inputs = train_inputs[:n_pg]
    path = f"{sdir}/as_is.parquet"
    if store.exists(path):
        as_is = store.read_parquet(path)
    else:
        t0 = time.time()
        outs = _run(engine, as_is_requests(pg_inputs, s), f"{entry.id}: no-prompt replies")
        as_is = [_reply_row(c, pg_inputs, with_topk=False) for c in outs]
        store.write_parquet(path, as_is)
        timings["as_is_s"] = time.time() - t0
    path = f"{sdir}/reasons.parquet"
    if store.exists(path):
        reasons = store.read_parquet(path)
    else:
        t0 = time.time()
        greedy = {r["input_idx"]: r["text"] for r in to_be if r["sample"] == 0}
        triples = [{"input": r["input"], "as_is": r["text"], "to_be": greedy[r["input_idx"]]} for r in as_is]
        if s.reasons and triples:
            outs = _run(engine, reason_requests(triples, s), f"{entry.id}: reasons")
            reasons = [{"input_idx": i, "reason": finish_reason_text(c.text)} for i, c in enumerate(outs)]
        else:
            reasons = [{"input_idx": i, "reason": ""} for i in range(len(triples))]
        store.write_parquet(path, reasons)
        timings["reasons_s"] = time.time() - t0

    # 4. the PG target when it is a paraphrase ----------------------------------------
    paraphrase = None
    if n_pg and cfg.train.pg_target == "paraphrase":
        path = f"{sdir}/paraphrase.json"
        if store.exists(path):
            paraphrase = store.read_json(path)["text"]
        else:
            req = ChatRequest([{"role": "user", "content": PARAPHRASE_ASK.format(prompt=entry.prompt)}],
                              max_new_tokens=max(64, min(1024, len(entry.prompt) // 3)))
            paraphrase = engine.generate([req])[0].text
            store.write_json(path, {"text": paraphrase})

    dropped_replies = sum(1 for r in to_be if not r["text"].strip())
    summary = {
        "inputs": input_stats,
        "to_be_replies": len(to_be),
        "to_be_empty": dropped_replies,
        "to_be_truncated": sum(1 for r in to_be if r["finish_reason"] == "length"),
        "pg_examples": len(as_is),
        "paraphrase": paraphrase is not None,
        "timings": timings,
    }
    store.write_json(f"{sdir}/summary.json", summary)
    store.write_json(f"{sdir}/{COMPLETE}", {"finished_at": time.time()})
    return summary


def _reply_row(c: Completion, inputs: list[str], with_topk: bool = True) -> dict:
    row = {
        "input_idx": c.tag["input_idx"],
        "input": inputs[c.tag["input_idx"]],
        "sample": c.tag.get("sample", 0),
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
    }
    if with_topk:
        row["topk_ids"] = c.topk_ids
        row["topk_logprobs"] = c.topk_logprobs
    return row


def load_synth(store: Store, pdir: str) -> dict:
    sdir = f"{pdir}/synth"
    out = {name: store.read_parquet(f"{sdir}/{name}.parquet") for name in ("inputs", "to_be", "as_is", "reasons")}
    p = f"{sdir}/paraphrase.json"
    out["paraphrase"] = store.read_json(p)["text"] if store.exists(p) else None
    return out
