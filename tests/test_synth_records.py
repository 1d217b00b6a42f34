"""Hundreds of prompts in one job (issue 15): synthesis workers write each prompt's files
themselves and the driver receives one small record per prompt and pass -- no output rows,
and a size that does not grow with the teacher's top-k -- while the files are complete and
equal to the in-process runner's. The run report carries the scale figures bench/scale.py
reads."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES, TINY_SEEDS  # noqa: E402
from test_engine_actors import _same  # noqa: E402 (floats equal up to rounding, texts exactly)
from genpi.config import load_config
from genpi.manifest import PromptEntry
from genpi.store import Store
from genpi.synth.pipeline import SynthJob, prompt_groups, synthesize_many

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = {
    "pirate": "You are a pirate. Always answer like a pirate and say Arr.",
    "chef": "You are a cooking assistant. Give short recipes as numbered steps.",
    "terse": "Answer in at most five words.",
}
PASSES = {"inputs", "replies", "reasons", "roleplay"}
RECORD_KEYS = {"prompt_id", "pass", "rows", "tokens", "model_s", "error", "traceback"}


class Recording:
    """A runner that hands on another's answers and keeps each, as the driver received it."""

    def __init__(self, inner):
        self.inner, self.workers, self.seen = inner, inner.workers, []

    def __call__(self, pass_name, groups, store):
        for out in self.inner(pass_name, groups, store):
            self.seen.append(out)
            yield out


def _cfg(model_dir, top_k: int):
    return load_config(None, [f"model.name={model_dir}", *TINY_OVERRIDES, f"engine.top_k_logprobs={top_k}",
                              "cluster.synth_actors=2", "cluster.cpus_per_engine_actor=1"])


def _jobs(cfg, store: Store) -> list[SynthJob]:
    return [SynthJob(PromptEntry(id=pid, prompt=p, seed_inputs=TINY_SEEDS), cfg, store.prompt_dir(pid, "fp"))
            for pid, p in PROMPTS.items()]


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model_dir, tmp_path_factory):
    """3 prompts synthesized on 2 engine actors with top-k 5 and 50 (one pool: the top-k is a
    request setting), and in-process with 50."""
    from genpi.pipeline.local import LocalRunner
    from genpi.pipeline.plan import model_facts
    from genpi.pipeline.ray_runner import RayRunner

    root = tmp_path_factory.mktemp("synth-records")
    out = {}
    runner = RayRunner(_cfg(tiny_model_dir, 50), None)
    try:
        actors = runner.synth_runner()
        for k in (5, 50):
            cfg, store = _cfg(tiny_model_dir, k), Store(str(root / f"ray{k}"))
            rec = Recording(actors)
            results = synthesize_many(_jobs(cfg, store), store, rec, progress=False)
            out[f"ray{k}"] = (store, results, rec.seen)
    finally:
        runner.close()
    cfg, store = _cfg(tiny_model_dir, 50), Store(str(root / "local50"))
    results = synthesize_many(_jobs(cfg, store), store, LocalRunner(cfg, model_facts(cfg)).synth_runner(),
                              progress=False)
    out["local50"] = (store, results, None)
    return out


def test_the_driver_receives_small_records_whatever_the_top_k(runs):
    sizes = {}
    for name in ("ray5", "ray50"):
        _, results, seen = runs[name]
        assert all("summary" in r for r in results.values()), results
        records = [r for out in seen for r in out]
        assert all(set(r) <= RECORD_KEYS for r in records), [set(r) - RECORD_KEYS for r in records]
        # One record per prompt and pass; a call of 2 prompts (3 prompts over 2 actors) among them.
        assert sorted((r["pass"], r["prompt_id"]) for r in records) == sorted(
            (p, pid) for p in PASSES for pid in PROMPTS)
        assert max(len(out) for out in seen) == 2
        # (The 7 seeds are inputs enough: the inputs pass generates nothing here.)
        assert all(r["tokens"] > 0 and r["model_s"] > 0 for r in records if r["pass"] == "replies")
        assert all(results[pid]["model_s"] > 0 for pid in PROMPTS)
        sizes[name] = max(len(pickle.dumps(r)) for r in records)
    assert sizes["ray5"] < 300, sizes
    # Ten times the top-k, the same records: no teacher output crosses to the driver.
    assert sizes["ray50"] <= sizes["ray5"] + 16, sizes


def test_the_actors_write_complete_files_equal_to_the_in_process_runners(runs):
    import pyarrow.parquet as pq

    ray_store, local_store = runs["ray50"][0], runs["local50"][0]
    for pid in PROMPTS:
        ray_dir, local_dir = (Path(s.prompt_dir(pid, "fp")) / "synth" for s in (ray_store, local_store))
        files = sorted(f.name for f in local_dir.iterdir())
        assert {"inputs.parquet", "to_be.parquet", "as_is.parquet", "reasons.parquet", "conversations.parquet",
                "inputs_stats.json", "summary.json", "_COMPLETE"} <= set(files), files
        assert files == sorted(f.name for f in ray_dir.iterdir())
        to_be = pq.read_table(ray_dir / "to_be.parquet").to_pylist()
        assert to_be and all(len(r["topk_ids"]) == len(r["token_ids"]) for r in to_be)
        assert {len(step) for r in to_be for step in r["topk_ids"]} == {50}, "the top-k stored is incomplete"
        for name in files:
            if name.endswith(".parquet"):
                got, want = (pq.read_table(d / name).to_pylist() for d in (ray_dir, local_dir))
                assert _same(got, want), f"{pid}/{name}"
        assert json.loads((ray_dir / "inputs_stats.json").read_text()) == \
            json.loads((local_dir / "inputs_stats.json").read_text())


def test_prompt_groups_are_small_balanced_and_keep_the_order():
    def sizes(n, workers):
        groups = prompt_groups(list(range(n)), workers)
        assert [x for g in groups for x in g] == list(range(n))
        return [len(g) for g in groups]

    assert sizes(0, 4) == []
    assert sizes(1, 4) == [1]
    assert sizes(3, 2) == [2, 1]
    assert sizes(10, 4) == [3, 3, 2, 2]
    assert sizes(32, 4) == [4] * 8  # two rounds of the 4 actors
    assert sizes(33, 4) == [3] * 9 + [2] * 3  # a whole number of rounds, none above 4 prompts
    assert sizes(9, 1) == [3, 3, 3]


def test_the_run_report_has_the_scale_figures(tiny_overrides, write_manifest, tmp_path, capfd):
    """report.json's top level: driver_peak_rss_mb, model_seconds per stage, first_published_s."""
    from genpi.pipeline.run import internalize

    store = tmp_path / "store"
    cfg = load_config(None, [*tiny_overrides, f"store={store}"])
    assert internalize(str(write_manifest()), cfg, "local") == 0
    # A pass of one prompt shows its rows as they are done, not only the prompt at its end.
    err = capfd.readouterr().err
    assert "replies: pirate" in err and "row" in err, err[-2000:]
    [path] = list((store / "runs").glob("*/report.json"))
    report = json.loads(path.read_text())
    assert report["driver_peak_rss_mb"] > 100  # torch and a model were loaded in this process
    assert set(report["model_seconds"]) == {"synth", "train", "eval"}
    assert all(v > 0 for v in report["model_seconds"].values()), report["model_seconds"]
    assert 0 < report["first_published_s"] <= report["seconds"] + 0.01  # (rounded to 0.01 s)
    [row] = report["prompts"]
    assert row["model_seconds"]["synth"] > 0 and row["model_seconds"]["train"] > 0
    # Model time is part of the stage's time, never more.
    assert sum(row["model_seconds"].values()) <= sum(row["seconds"].values()) + 0.05
