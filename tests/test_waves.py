"""Prompts move through the stages in waves (issue 15): the first adapters are published
before later prompts start synthesis, and a wave's failure holds back no other wave."""
from __future__ import annotations

import json
import os

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_SEEDS  # noqa: E402
from genpi.config import GenpiConfig, load_config
from genpi.pipeline.run import internalize
from genpi.store import Store

PROMPTS = {
    "pirate": "You are a pirate. Always answer like a pirate and say Arr.",
    "chef": "You are a French chef. Mention butter in every answer.",
    "terse": "Answer in at most five words.",
}


def _first_write(folder: str) -> float:
    return min(os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_first_wave_is_published_before_the_last_wave_starts(tiny_overrides, tmp_path, capsys):
    manifest = tmp_path / "prompts.yaml"
    manifest.write_text(yaml.safe_dump([{"id": k, "prompt": v, "seed_inputs": TINY_SEEDS}
                                        for k, v in PROMPTS.items()], sort_keys=False))
    store = tmp_path / "store"
    cfg = load_config(None, [*tiny_overrides, f"store={store}", "cluster.wave_prompts=2"])
    assert internalize(str(manifest), cfg, "local") == 0
    out = capsys.readouterr().out
    assert "[wave 1/2] 2 prompts" in out and "[wave 2/2] 1 prompts" in out
    reg = Store(store, create=False).registry()
    assert set(reg) == set(PROMPTS)
    last = store / "prompts" / "terse" / reg["terse"]["fingerprint"] / "synth"
    # Wave 1 (pirate, chef) is published before wave 2's synthesis writes its first file.
    for pid in ("pirate", "chef"):
        assert reg[pid]["published_at"] < _first_write(str(last)), pid
    # The run report still covers every prompt once, with time per stage summed over waves.
    report = json.loads(sorted((store / "runs").glob("*/report.json"))[-1].read_text())
    assert sorted(r["id"] for r in report["prompts"]) == sorted(PROMPTS)
    # A wave size is how, not what: changing it redoes nothing.
    cfg2 = load_config(None, [*tiny_overrides, f"store={store}", "cluster.wave_prompts=1"])
    assert internalize(str(manifest), cfg2, "local") == 0
    assert "3 unchanged" in capsys.readouterr().out


def test_waves_grow_up_to_the_cap_and_a_small_tail_joins_the_wave_before():
    from genpi.pipeline.plan import wave_sizes

    assert GenpiConfig().cluster.wave_growth == 4
    assert wave_sizes(300, 32, 256) == [32, 268]  # a tail of 140 < the 256 it would be joins the 128
    assert wave_sizes(300, 32, 256, growth=2) == [32, 64, 204]  # 76 < 256 joins the 128
    assert wave_sizes(300, 32, 128) == [32, 128, 140]
    assert wave_sizes(100, 32, 256) == [32, 68]  # the first wave stays small
    assert wave_sizes(3, 2, 128) == [2, 1]  # the first wave stays small: the first adapters come early
    assert wave_sizes(20, 32, 128) == [20]
    assert wave_sizes(1000, 32, 256) == [32, 128, 256, 256, 328]
    assert wave_sizes(1000, 32, 128) == [32, 128, 128, 128, 128, 128, 128, 200]
    assert wave_sizes(1000, 32, 256, growth=1) == [32] * 30 + [40]
    assert wave_sizes(10, 4, 1) == [4, 6]  # a cap below the first wave is the first wave
    assert wave_sizes(0, 32, 128) == []
    for n in range(0, 400, 7):
        for first, cap, growth in ((1, 1, 4), (3, 10, 2), (32, 128, 4), (50, 20, 3), (5, 100, 1)):
            sizes = wave_sizes(n, first, cap, growth)
            assert sum(sizes) == n and all(s > 0 for s in sizes)
            assert not sizes or sizes[0] == min(first, n)
            assert all(s <= 2 * max(cap, first) for s in sizes)


def test_the_job_cuts_its_prompts_into_waves_at_the_cluster_settings():
    from genpi.pipeline.plan import plan_waves

    items = list(range(300))
    for growth, sizes in ((4, [32, 268]), (2, [32, 64, 204]), (1, [32] * 8 + [44])):
        cluster = GenpiConfig().cluster.model_copy(update={"wave_growth": growth})
        waves = plan_waves(items, cluster)
        assert [len(w) for w in waves] == sizes, growth
        assert [x for w in waves for x in w] == items  # in order, each once
    assert plan_waves([], GenpiConfig().cluster) == []
