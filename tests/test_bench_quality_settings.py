"""The quality suite's settings as config overrides (bench/quality.py): arms that change only
train.* share the default synthesis, an arm that changes synth.* has its own, and every arm
is reported on the reference held-out split and the human-written set with every figure the
issue asks for (KL ratio, check ratio, leak, perplexity change, degenerate-reply rate)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES  # noqa: E402

ARMS = ["joint", "val_kl", "diverse"]
# Enough training inputs for val_kl's 4 validation inputs plus training ones, and a little
# plain text so the perplexity change is measured (TINY_OVERRIDES turns it off).
EXTRA = ["synth.n_train_inputs=8", "synth.max_input_rounds=3", "eval.plain_text_max_tokens=64"]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_settings_are_labelled_config_overrides_and_the_default_run_is_the_loss_arms(quality):
    from genpi.config import TrainConfig, load_config

    s = quality.settings()
    assert quality.DEFAULT_SETTINGS == ["joint", "sft_pg", "kl_only"]
    assert {"joint", "sft_pg", "kl_only", "val_kl", "diverse"} <= set(s)
    for name, arm in s.items():
        assert arm["label"] and all(k.split(".")[0] in {"train", "synth"} for k in arm["overrides"]), name
        load_config(None, []).with_overrides(arm["overrides"])  # every override is a valid setting
    d = TrainConfig()
    assert s["joint"]["overrides"] == {"train.w_sft": d.w_sft, "train.w_pg": d.w_pg, "train.w_kl": d.w_kl}
    assert s["val_kl"]["overrides"]["train.val_inputs"] == 4 and s["val_kl"]["overrides"]["train.early_stop_patience"] == 1
    assert s["diverse"]["overrides"]["synth.seed_topics"] == 16 and s["diverse"]["overrides"]["synth.section_inputs"] == 6
    # The published methods and the default before the on-policy phase train off-policy only,
    # 4 epochs; the default (joint) and the option arms have the phase.
    off = {"train.epochs": 4, "train.on_policy_epochs": 0}
    assert s["offpolicy"]["overrides"] == {**s["joint"]["overrides"], **quality.PREV_LR, **quality.PREV_REPLAY, **off}
    for arm in ("sft_pg", "kl_only", "epochs3", "epochs2"):
        assert s[arm]["overrides"]["train.on_policy_epochs"] == 0, arm
    assert s["onpolicy"]["overrides"]["train.epochs"] == 4 and d.on_policy_epochs > 0
    # The loss-weight and phase-length arms differ from the default only in what they measure.
    # Measured against the phase as it was until 2026-12-05 (quality.PREV_ON): each arm keeps
    # what it measured then, so its stored adapters and results stay reproducible.
    # And the off-policy lr of their day (quality.PREV_LR, 2e-3 until 2026-12-06), no replay.
    base = load_config(None, []).with_overrides({**quality.PREV_ON, **quality.PREV_LR,
                                                 **quality.PREV_REPLAY}).train.model_dump()
    diff = {arm: {f"train.{k}": v for k, v in load_config(None, []).with_overrides(s[arm]["overrides"]).train
                  .model_dump().items() if base[k] != v}
            for arm in ("on2", "on3", "sft05", "kl_on", "kl_on3", "onlen96", "onfwd", "onboth", "on5", "on5_both96")}
    assert diff["on2"] == {"train.on_policy_epochs": 2} and diff["on3"] == {}
    assert diff["sft05"] == {"train.w_sft": 0.5, "train.on_policy_epochs": 2} and d.w_sft == 0.1
    kl = {"train.w_sft": 0.0, "train.w_pg": 0.0}
    assert diff["kl_on"] == {**kl, "train.on_policy_epochs": 2} and diff["kl_on3"] == kl
    assert diff["onlen96"] == {"train.on_policy_max_new_tokens": 96}
    assert diff["onfwd"] == {"train.on_policy_divergence": "forward"}
    assert diff["onboth"] == {"train.on_policy_divergence": "both"} and diff["on5"] == {"train.on_policy_epochs": 5}
    assert diff["on5_both96"] == {**diff["on5"], **diff["onboth"], **diff["onlen96"]}
    # ... which is the default's phase since 2026-12-05, at the off-policy lr of then; offlr05
    # (5e-4) is the default since 2026-12-06.
    assert (d.on_policy_epochs, d.on_policy_divergence, d.on_policy_max_new_tokens) == (5, "both", 96)
    assert load_config(None, []).with_overrides(s["on5_both96"]["overrides"]).train == \
        load_config(None, []).with_overrides({**quality.PREV_LR, **quality.PREV_REPLAY}).train
    # offlr05 (5e-4) was the default on 2026-12-06 until onmix5 (the replay) won the same day.
    assert load_config(None, []).with_overrides(s["offlr05"]["overrides"]).train == \
        load_config(None, []).with_overrides(quality.PREV_REPLAY).train
    assert load_config(None, []).with_overrides(s["onmix5"]["overrides"]).train == load_config(None, []).train
    assert d.on_policy_replay == 0.5 != quality.PREV_REPLAY["train.on_policy_replay"]
    assert d.lr == 5e-4 != quality.PREV_LR["train.lr"]
    for arm in ("sft_pg", "kl_only", "offpolicy", "epochs3", "epochs2", "onpolicy", "kl_on", "kl_on3"):
        assert s[arm]["overrides"]["train.lr"] == 2e-3, arm
    # Both new arms are the default plus their option (they measure the option, nothing else).
    assert s["generic"]["overrides"] == {**s["joint"]["overrides"], "synth.generic_share": 0.25}
    base = load_config(None, []).train
    assert load_config(None, []).with_overrides(s["off3"]["overrides"]).train == \
        base.model_copy(update={"epochs": 3, "on_policy_replay": 0.0})
    assert load_config(None, []).with_overrides(s["lr2mix"]["overrides"]).train == base.model_copy(update={"lr": 2e-3})
    assert load_config(None, []).with_overrides(s["onmix8"]["overrides"]).train == \
        base.model_copy(update={"on_policy_epochs": 8})
    assert load_config(None, []).with_overrides(s["lr2mix8"]["overrides"]).train == \
        base.model_copy(update={"lr": 2e-3, "on_policy_epochs": 8})
    lr2mix8 = {"lr": 2e-3, "on_policy_epochs": 8}
    for arm, extra in (("lr2mix8on1", {"on_policy_lr": 1e-3}), ("lr2off3mix8", {"epochs": 3}),
                       ("lr2mix8r2", {"on_policy_rounds": 2}), ("lr2mix8on2", {"on_policy_lr": 2e-3}),
                       ("lr2off3mix8on1", {"epochs": 3, "on_policy_lr": 1e-3})):
        assert load_config(None, []).with_overrides(s[arm]["overrides"]).train == \
            base.model_copy(update={**lr2mix8, **extra}), arm
    assert s["sections"]["overrides"] == {**s["joint"]["overrides"], "synth.section_inputs": 6}
    for arm in ("val_kl", "diverse"):
        assert {k: v for k, v in s[arm]["overrides"].items() if k.startswith("train.w_")} == s["joint"]["overrides"]


def test_the_default_arm_takes_the_long_prompt_settings_and_the_others_do_not(quality):
    from genpi.config import load_config
    from genpi.manifest import PromptEntry

    s = quality.settings()
    cfgs = {a: load_config(None, []).with_overrides(s[a]["overrides"])
            for a in ("joint", "onmix5", "lr2off3mix8on1", "offlr05")}
    entry = PromptEntry(id="agent", prompt="You are an agent.")
    long, short = quality.prompt_configs(cfgs, entry, 1782), quality.prompt_configs(cfgs, entry, 300)
    assert short == cfgs and long["joint"] != cfgs["joint"]
    assert long["joint"].train == cfgs["lr2off3mix8on1"].train  # the default on a long prompt: what that arm measured
    others = ("onmix5", "lr2off3mix8on1", "offlr05")
    assert {a: long[a] for a in others} == {a: cfgs[a] for a in others}


def test_main_refuses_an_unknown_setting(quality, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--settings", "joint,nope"])
    assert "nope" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_new_arms_on_a_tiny_model_share_or_own_their_synthesis_and_report_every_figure(
        quality, tiny_model_dir, tmp_path, single_thread_torch):
    store = tmp_path / "store"
    res = quality.run(model=str(tiny_model_dir), store_root=store, prompts=["french"], setting_names=ARMS,
                      overrides=[*TINY_OVERRIDES, *EXTRA])
    # Synthesis folders: the default's (joint and val_kl, which change train.* only) and diverse's.
    folders = sorted(p.parent.parent for p in store.rglob("synth/inputs.parquet"))
    assert len(folders) == 2 and all(f.parent.name == "french" for f in folders)
    fr = res["prompts"]["french"]["settings"]
    assert fr["joint"]["synth_dir"] == fr["val_kl"]["synth_dir"] != fr["diverse"]["synth_dir"]
    assert [fr[s]["synthesis"] for s in ARMS] == ["shared", "shared", "own"]
    shared = next(f for f in folders if f.name == fr["joint"]["synth_dir"])
    own = next(f for f in folders if f.name == fr["diverse"]["synth_dir"])
    assert {p.name for p in shared.glob("quality/*/*") if p.is_dir()} == {"joint", "val_kl"}
    assert {p.name for p in own.glob("quality/*/*") if p.is_dir()} == {"diverse"}
    # diverse's synthesis was steered over the shipped topics; the default's was not.
    assert "topics" in json.loads((own / "synth" / "inputs_stats.json").read_text())
    assert "topics" not in json.loads((shared / "synth" / "inputs_stats.json").read_text())
    # One evaluation pass of all three on the reference split and the human set, and diverse
    # once more on its own held-out split.
    assert len(list(shared.glob("quality/eval-*.json"))) == 1 and len(list(own.glob("quality/eval-*.json"))) == 1
    # val_kl held 4 training inputs out and kept an epoch by their KL.
    assert fr["val_kl"]["train"]["val_inputs"] == 4 and len(fr["val_kl"]["train"]["val_kl"]) >= 1
    assert fr["joint"]["train"]["val_inputs"] == 0

    for s in ARMS:
        row = fr[s]
        for name in ("heldout", "human"):
            f = row[name]
            assert f["n_inputs"] > 0 and set(f["ratios"]) == {"kl", "agreement"}, (s, name)
            assert f["adapter_scores"]["kl"] is not None and "check_ratio" in f
            assert set(f["checks"]) == {"language=fr"} and set(f["checks"]["language=fr"]) == {"teacher", "base",
                                                                                                 "adapter", "ratio"}
            assert 0 <= f["degenerate"]["adapter"] <= 1
        assert row["heldout"]["n_inputs"] == fr["joint"]["heldout"]["n_inputs"]
        assert row["human"]["n_inputs"] == 2  # TINY_OVERRIDES: eval.human_max_inputs=2, for every arm
        assert row["leak"] is not None and row["plain_text"]["ratio"] > 0 and row["plain_text"]["tokens"] > 0
        assert (row["own_heldout"] is not None) == (s == "diverse")
    # Same reference inputs: the teacher and base figures are the same for every arm.
    for name in ("heldout", "human"):
        assert len({json.dumps([fr[s][name]["teacher_scores"], fr[s][name]["base_scores"]]) for s in ARMS}) == 1
    assert fr["diverse"]["own_heldout"]["n_inputs"] > 0

    summary = res["summary"]
    assert summary["baseline"] == "joint" and summary["ranked_on"] == "human"  # diverse has its own inputs
    for s in ARMS:
        p = summary["per_setting"][s]
        for name in ("heldout", "human"):
            assert {"kl_ratio", "check_ratio", "degenerate", "agreement_ratio"} <= set(p[name])
            assert p[name]["degenerate"] is not None
        assert p["leak"] is not None and p["plain_text_ratio"] is not None
        assert ("vs_baseline" in p) == (s != "joint")
    assert summary["per_setting"]["diverse"]["own_heldout"]["n_prompts"] == 1
    json.dumps(res)  # what main writes

    md = quality.table(res)
    head = md.splitlines()[0]
    for col in ("held-out KL ratio", "held-out check ratio", "held-out degenerate", "human KL ratio",
                "human check ratio", "human degenerate", "leak", "perplexity ratio", "KL ratio vs joint"):
        assert col in head
    assert "human-written set" in md  # says what the ranking is on, and why
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| french / ")}
    assert set(rows) == {f"| french / {s}" for s in ARMS}
    assert "(val KL)" in rows["| french / val_kl"]
    for s in ARMS:
        cells = [c.strip() for c in rows[f"| french / {s}"].strip("|").split("|")]
        # KL and degenerate pairs (held-out / human), leak and perplexity are measured on any
        # model (the check ratio is n/a where the random teacher passes it no more than the base).
        assert all("n/a" not in cells[i] for i in (1, 3, 4, 5)), cells
        assert ("n/a" in cells[-1]) == (s != "diverse")  # own held-out KL ratio

    assert set(fr["diverse"]["synth_inputs"]["topics"]) and "topics" not in fr["joint"]["synth_inputs"]
    evals = sorted(store.rglob("quality/eval-*.json"))
    before = {p: p.stat().st_mtime_ns for p in evals}
    again = quality.run(model=str(tiny_model_dir), store_root=store, prompts=["french"], setting_names=ARMS,
                        overrides=[*TINY_OVERRIDES, *EXTRA])  # resumes from the store
    assert again["prompts"]["french"]["settings"]["diverse"]["human"] == fr["diverse"]["human"]
    assert {p: p.stat().st_mtime_ns for p in evals} == before  # nothing evaluated again
    # An evaluation kept before the human set was measured (same fingerprint: its eval settings
    # at their defaults enter none) is done again rather than reported without it.
    shared_eval = next(iter(shared.glob("quality/eval-*.json")))
    old = {s: {**e, "human": None} for s, e in json.loads(shared_eval.read_text()).items()}
    shared_eval.write_text(json.dumps(old))
    third = quality.run(model=str(tiny_model_dir), store_root=store, prompts=["french"], setting_names=ARMS,
                        overrides=[*TINY_OVERRIDES, *EXTRA])
    assert third["prompts"]["french"]["settings"]["joint"]["human"] == fr["joint"]["human"]
    assert all(e["human"] for e in json.loads(shared_eval.read_text()).values())
