"""Synthesis for many prompts at once: inputs -> replies -> reasons -> role-play.

Each pass (`genpi.synth.passes`) runs over every prompt that still needs it, in small groups
of prompts (`prompt_groups`), through a *runner*: in-process on one engine (`LocalRunner`)
or on Ray engine actors (`genpi.pipeline.ray_runner.SynthOnActors`). Whoever runs a group
makes its rows from the store, runs them, writes each prompt's results as Parquet under
`<prompt dir>/synth/` and sends back one small record per prompt: the driver never holds
output rows (teacher top-k: tens of MB per prompt), so its memory does not grow with the
number of prompts. A killed job redoes only the passes a prompt has no file for;
`_COMPLETE` is written last. A prompt whose rows fail is recorded as failed and leaves the
later passes; the others go on.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, Protocol

from tqdm.auto import tqdm

from genpi.config import GenpiConfig
from genpi.engines.base import Engine
from genpi.manifest import PromptEntry
from genpi.store import Store
from genpi.synth.passes import PASSES, SynthJob, run_pass

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
# A call of a pass holds this many prompts at most: a worker then holds a few prompts' rows
# (to_be top-k at default sizes: ~60 MB of Python lists per prompt), not a wave's.
MAX_GROUP_PROMPTS = 4


def prompt_groups(jobs: list[SynthJob], workers: int, max_prompts: int = MAX_GROUP_PROMPTS) -> list[list[SynthJob]]:
    """`jobs` in consecutive groups of at most `max_prompts`, a whole number of rounds of
    `workers` groups where there are enough jobs, sizes differing by one at most (balanced
    over the pool's actors). Both runners group with this and the same `workers`, so they
    batch the same rows together and write the same synthesis."""
    if not jobs:
        return []
    workers, max_prompts = max(1, workers), max(1, max_prompts)
    needed = -(-len(jobs) // max_prompts)
    n = min(len(jobs), -(-needed // workers) * workers)
    size, extra = divmod(len(jobs), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        groups.append(jobs[start:end])
        start = end
    return groups


class Runner(Protocol):
    workers: int  # the `workers` of prompt_groups: cluster.synth_actors for both runners

    def __call__(self, pass_name: str, groups: list[list[SynthJob]], store: Store) -> Iterable[list[dict]]:
        """Run pass `pass_name` for each group (each prompt's files written where it ran);
        each group's records (`genpi.synth.passes.run_pass`), yielded as groups finish."""
        ...


class LocalRunner:
    """Runs the passes in this process on one engine, a group of prompts at a time."""

    def __init__(self, engine: Engine, workers: int = 1):
        self.engine, self.workers = engine, workers
        self.calls: Counter = Counter()

    def __call__(self, pass_name: str, groups: list[list[SynthJob]], store: Store) -> Iterable[list[dict]]:
        for group in groups:
            yield run_pass(self.engine, pass_name, group, store, self.calls)


class _Progress:
    """One progress display for the whole synthesis: prompts done per pass, tokens per second."""

    def __init__(self, enabled: bool):
        self.bar = tqdm(total=0, desc="synthesis", unit="prompt", disable=not enabled)
        self.tokens = 0
        self.t0 = time.time()

    def stage(self, name: str, n_prompts: int) -> None:
        self.bar.total += n_prompts
        self.bar.set_description(f"synthesis [{name}]")
        self.bar.refresh()

    def group(self, records: list[dict]) -> None:
        self.tokens += sum(r.get("tokens", 0) for r in records)
        self.bar.update(len(records))
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
    """Synthesize every job; prompt id -> {"summary": ...} or {"error": ...}, with "model_s":
    the prompt's seconds inside engine calls in this run."""
    results: dict[str, dict] = {}
    live: dict[str, SynthJob] = {}
    for j in jobs:
        if store.exists(f"{j.pdir}/synth/{COMPLETE}"):
            results[j.id] = {"summary": store.read_json(f"{j.pdir}/synth/summary.json"), "skipped": True,
                             "model_s": 0.0}
        else:
            live[j.id] = j
    bar = _Progress(progress and bool(live))
    timings: dict[str, float] = {}
    model_s: dict[str, float] = defaultdict(float)
    try:
        for p in PASSES:
            todo = [j for pid, j in live.items()
                    if pid not in results and not store.exists(f"{j.pdir}/synth/{p.last_file}")]
            if not todo:
                continue
            t0 = time.time()
            bar.stage(p.name, len(todo))
            for records in runner(p.name, prompt_groups(todo, runner.workers), store):
                bar.group(records)
                for rec in records:
                    model_s[rec["prompt_id"]] += rec.get("model_s", 0.0)
                    if "error" in rec:  # error.json is written where the error happened
                        results[rec["prompt_id"]] = {"error": rec["error"]}
            timings[f"{p.name}_s"] = round(time.time() - t0, 2)
    finally:
        bar.close()
    for pid, j in live.items():
        if pid not in results:
            summary = _summary(j, store, timings)
            store.write_json(f"{j.pdir}/synth/summary.json", summary)
            store.write_json(f"{j.pdir}/synth/{COMPLETE}", {"finished_at": time.time()})
            results[pid] = {"summary": summary}
        results[pid]["model_s"] = round(model_s.get(pid, 0.0), 3)
    return results


def _columns(store: Store, path: str, columns: list[str]) -> list[dict]:
    """Only `columns` of a Parquet file: the summary needs no token ids or top-k, and reading
    them would put a prompt's whole teacher output in the driver."""
    import pyarrow.parquet as pq

    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        have = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=have).to_pylist() if pf.metadata.num_rows else []


def _summary(j: SynthJob, store: Store, timings: dict[str, float]) -> dict:
    sdir = f"{j.pdir}/synth"
    to_be = _columns(store, f"{sdir}/to_be.parquet", ["text", "finish_reason"])
    conv_path = f"{sdir}/conversations.parquet"
    convs = _columns(store, conv_path, ["end_reason", "agent_turns"]) if store.exists(conv_path) else []
    ended = Counter(c["end_reason"] for c in convs)
    inputs = store.read_json(f"{sdir}/inputs_stats.json")
    # The inputs' diversity beside the human-written set's (genpi.synth.diversity), on its own.
    diversity = inputs.pop("diversity_vs_human", None)
    return {
        "inputs": inputs,
        **({"diversity": diversity} if diversity else {}),
        "to_be_replies": len(to_be),
        "to_be_empty": sum(1 for r in to_be if not r["text"].strip()),
        "to_be_truncated": sum(1 for r in to_be if r["finish_reason"] == "length"),
        "pg_examples": len(_columns(store, f"{sdir}/as_is.parquet", ["input_idx"])),
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
