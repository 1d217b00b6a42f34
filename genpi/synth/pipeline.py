"""Synthesis for many prompts at once: inputs -> replies -> reasons -> role-play.

Each pass runs one stage over the rows of every prompt that still needs it (a row is a
(prompt, item) pair, see `genpi.synth.stages`) through a *runner*: in-process on one
engine (`LocalRunner`) or fanned out over Ray Data engine actors
(`genpi.pipeline.ray_runner.SynthOnActors`). After each pass every prompt's results are
written as Parquet under `<prompt dir>/synth/`, so a killed job redoes only the passes a
prompt has no file for; `_COMPLETE` is written last. A prompt whose rows fail is
recorded as failed and leaves the later passes; the others go on.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

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

COMPLETE = "_COMPLETE"
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


class Runner(Protocol):
    def __call__(self, stage: str, rows: list[Row]) -> Iterable[Row]:
        """Output rows of `stage` for `rows`, yielded as they are ready (any order)."""
        ...


class LocalRunner:
    """Runs the stages in this process on one engine, a batch of rows at a time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, stage: str, rows: list[Row]) -> Iterable[Row]:
        n = batch_rows(stage, getattr(self.engine, "batch_size", 8))
        for start in range(0, len(rows), n):
            yield from run_isolated(stage, self.engine, rows[start : start + n])


class _Progress:
    """One progress display for the whole synthesis: rows done and tokens per second."""

    def __init__(self, enabled: bool):
        self.bar = tqdm(total=0, desc="synthesis", unit="row", disable=not enabled)
        self.tokens = 0
        self.t0 = time.time()

    def stage(self, name: str, n_rows: int) -> None:
        self.bar.total += n_rows
        self.bar.set_description(f"synthesis [{name}]")
        self.bar.refresh()

    def row(self, row: Row) -> None:
        self.tokens += row.get("tokens", 0)
        self.bar.update(1)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.time() - self.t0, 1e-6):.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def synthesize(engine: Engine, entry: PromptEntry, cfg: GenpiConfig, store: Store, pdir: str) -> dict:
    """Every missing synthesis stage of one prompt on one engine; its summary (raises on failure)."""
    result = synthesize_many([SynthJob(entry, cfg, pdir)], store, LocalRunner(engine), progress=False)[entry.id]
    if "error" in result:
        raise ValueError(result["error"])
    return result["summary"]


def synthesize_many(jobs: list[SynthJob], store: Store, runner: Runner, progress: bool = True) -> dict[str, dict]:
    """Synthesize every job; prompt id -> {"summary": ...} or {"error": ...}."""
    results: dict[str, dict] = {}
    live: dict[str, SynthJob] = {}
    for j in jobs:
        if store.exists(f"{j.pdir}/synth/{COMPLETE}"):
            results[j.id] = {"summary": store.read_json(f"{j.pdir}/synth/summary.json"), "skipped": True}
        else:
            live[j.id] = j
    bar = _Progress(progress and bool(live))
    timings: dict[str, float] = {}
    try:
        for name, make_rows, write in _PASSES:
            todo = {pid: j for pid, j in live.items() if pid not in results}
            rows = [r for j in todo.values() for r in make_rows(j, store)]
            if not rows:
                continue
            t0 = time.time()
            bar.stage(name, len(rows))
            grouped: dict[str, list[Row]] = defaultdict(list)
            stage = rows[0]["stage"]
            for out in runner(stage, [{k: v for k, v in r.items() if k != "stage"} for r in rows]):
                bar.row(out)
                grouped[out["prompt_id"]].append(out)
            timings[f"{name}_s"] = round(time.time() - t0, 2)
            for pid in {r["prompt_id"] for r in rows}:
                outs = grouped.get(pid, [])
                errors = [o for o in outs if "error" in o]
                if errors:
                    results[pid] = {"error": errors[0]["error"]}
                    log.error("%s: synthesis failed: %s", pid, errors[0]["error"])
                    store.write_json(f"{todo[pid].pdir}/error.json",
                                     {"error": errors[0]["error"], "traceback": errors[0].get("traceback")})
                    continue
                try:
                    write(todo[pid], store, outs)
                except Exception as e:  # e.g. no usable inputs: this prompt fails, not the job
                    results[pid] = {"error": f"{name}: {type(e).__name__}: {e}"}
                    log.error("%s: synthesis failed: %s", pid, results[pid]["error"])
                    store.write_json(f"{todo[pid].pdir}/error.json", {"error": results[pid]["error"]})
    finally:
        bar.close()
    for pid, j in live.items():
        if pid not in results:
            summary = _summary(j, store, timings)
            store.write_json(f"{j.pdir}/synth/summary.json", summary)
            store.write_json(f"{j.pdir}/synth/{COMPLETE}", {"finished_at": time.time()})
            results[pid] = {"summary": summary}
    return results


# --- the passes: rows to run, and how each prompt's outputs are written ---------------------
def _sdir(j: SynthJob) -> str:
    return f"{j.pdir}/synth"


def _inputs_rows(j: SynthJob, store: Store) -> list[Row]:
    if store.exists(f"{_sdir(j)}/inputs.parquet"):
        return []
    return [{"stage": "inputs", "prompt_id": j.id, "prompt": j.entry.prompt, "seeds": list(j.entry.seed_inputs),
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
        rows.append({"stage": "generate", "prompt_id": j.id, "kind": kind, "request": request_dict(r)})
    return rows


def _write_replies(j: SynthJob, store: Store, outs: list[Row]) -> None:
    train = _train_inputs(j, store)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for o in outs:
        by_kind[o["kind"]].append(o["completion"])
    if "paraphrase" in by_kind:
        store.write_json(f"{_sdir(j)}/paraphrase.json", {"text": by_kind["paraphrase"][0]["text"]})
    for kind in ("to_be", "as_is"):
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
    return [{"stage": "generate", "prompt_id": j.id, "kind": "reason", "request": request_dict(r)}
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
    return [{"stage": "roleplay", "prompt_id": j.id, "prompt": j.entry.prompt, "demos": list(j.entry.seed_inputs),
             "input_idx": r["input_idx"], "messages": first_turns(r["input_idx"], r["input"], r).messages,
             "settings": settings} for r in starts]


def _write_roleplay(j: SynthJob, store: Store, outs: list[Row]) -> None:
    rows = sorted(({"input_idx": o["input_idx"], "messages": o["messages"], "end_reason": o["end_reason"],
                    "agent_turns": sum(m["role"] == "assistant" for m in o["messages"])} for o in outs),
                  key=lambda r: r["input_idx"])
    store.write_parquet(f"{_sdir(j)}/conversations.parquet", rows)


_PASSES: list[tuple[str, Callable[[SynthJob, Store], list[Row]], Callable[[SynthJob, Store, list[Row]], None]]] = [
    ("inputs", _inputs_rows, _write_inputs),
    ("replies", _replies_rows, _write_replies),
    ("reasons", _reasons_rows, _write_reasons),
    ("roleplay", _roleplay_rows, _write_roleplay),
]


def _summary(j: SynthJob, store: Store, timings: dict[str, float]) -> dict:
    sdir = _sdir(j)
    to_be = store.read_parquet(f"{sdir}/to_be.parquet")
    convs = load_conversations(store, j.pdir)
    ended = Counter(c["end_reason"] for c in convs)
    return {
        "inputs": store.read_json(f"{sdir}/inputs_stats.json"),
        "to_be_replies": len(to_be),
        "to_be_empty": sum(1 for r in to_be if not r["text"].strip()),
        "to_be_truncated": sum(1 for r in to_be if r["finish_reason"] == "length"),
        "pg_examples": len(store.read_parquet(f"{sdir}/as_is.parquet")),
        "paraphrase": store.exists(f"{sdir}/paraphrase.json"),
        "conversations": {
            "count": len(convs),
            "agent_turns": sum(c["agent_turns"] for c in convs),
            "multi_turn": sum(1 for c in convs if c["agent_turns"] > 1),
            "ended": dict(ended),
        },
        "timings": timings,
    }


def load_conversations(store: Store, pdir: str) -> list[dict]:
    path = f"{pdir}/synth/conversations.parquet"
    return store.read_parquet(path) if store.exists(path) else []


def load_synth(store: Store, pdir: str) -> dict:
    sdir = f"{pdir}/synth"
    out: dict[str, Any] = {name: store.read_parquet(f"{sdir}/{name}.parquet") for name in ("inputs", "to_be", "as_is", "reasons")}
    out["conversations"] = load_conversations(store, pdir)
    p = f"{sdir}/paraphrase.json"
    out["paraphrase"] = store.read_json(p)["text"] if store.exists(p) else None
    return out


# The synthesis summary has one line per prompt up to this many prompts; beyond, totals, the
# failures (at most this many) and the prompts short of usable inputs.
MAX_SUMMARY_LINES = 20


def _first_line(error: str, limit: int) -> str:
    line = (error.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def format_summaries(results: dict[str, dict]) -> str:
    """The synthesis summary a person reads on the console: a table of every prompt for a few
    prompts; totals, failures and outliers (each list capped) for hundreds."""
    if len(results) <= MAX_SUMMARY_LINES:
        return _summary_table(results)
    failed = {pid: r["error"] for pid, r in results.items() if "error" in r}
    ok = [r for r in results.values() if "error" not in r]
    reused = sum(1 for r in ok if r.get("skipped"))
    inp = [r["summary"]["inputs"] for r in ok]
    convs = [r["summary"].get("conversations", {}) for r in ok]
    low = sorted(pid for pid, r in results.items()
                 if "error" not in r and r["summary"]["inputs"].get("below_diversity_target"))
    lines = [
        f"synthesis: {len(results)} prompts: {len(ok) - reused} done, {reused} reused, {len(failed)} failed",
        f"  inputs kept {sum(i['kept'] for i in inp):,}/{sum(i.get('wanted', i['kept']) for i in inp):,} "
        f"(dropped {sum(sum(i['dropped'].values()) for i in inp):,}); "
        f"replies {sum(r['summary']['to_be_replies'] for r in ok):,}; "
        f"conversations {sum(c.get('count', 0) for c in convs):,} with {sum(c.get('agent_turns', 0) for c in convs):,} agent turns",
    ]
    if low:
        shown = ", ".join(low[:MAX_SUMMARY_LINES]) + (f" and {len(low) - MAX_SUMMARY_LINES} more"
                                                      if len(low) > MAX_SUMMARY_LINES else "")
        lines.append(f"  {len(low)} below the input diversity target: {shown}")
    for pid in sorted(failed)[:MAX_SUMMARY_LINES]:
        lines.append(f"  FAILED {pid}: {_first_line(failed[pid], 160)}")
    if len(failed) > MAX_SUMMARY_LINES:
        lines.append(f"  ... and {len(failed) - MAX_SUMMARY_LINES} more failures (every one is in the run report)")
    lines.append("  per-prompt figures: synth/summary.json in each prompt's directory of the store")
    return "\n".join(lines)


def _summary_table(results: dict[str, dict]) -> str:
    lines = [f"{'prompt':<24} {'status':<8} {'inputs':>10} {'dropped':>8} {'replies':>8} {'convs':>6} {'turns':>6}"]
    for pid, r in sorted(results.items()):
        if "error" in r:
            lines.append(f"{pid:<24} {'FAILED':<8} {_first_line(r['error'], 80)}")
            continue
        s = r["summary"]
        inp = s["inputs"]
        flag = " (low diversity)" if inp.get("below_diversity_target") else ""
        conv = s.get("conversations", {})
        status = "reused" if r.get("skipped") else "done"
        lines.append(
            f"{pid:<24} {status:<8} {inp['kept']:>4}/{inp.get('wanted', inp['kept']):<5} "
            f"{sum(inp['dropped'].values()):>8} {s['to_be_replies']:>8} {conv.get('count', 0):>6} "
            f"{conv.get('agent_turns', 0):>6}{flag}"
        )
    return "\n".join(lines)
