"""Packs -> Ray Train workers -> DeepSpeed ZeRO-2 -> published PEFT adapters; resume."""
from __future__ import annotations

import glob
import os
import random

import pytest
import torch

from genpi.config import load_config
from genpi.store import Store
from genpi.train.jobs import TrainJob, plan_packs, prepare_jobs
from genpi.train.optim_backend import PLAIN_STATE
from genpi.train.trainer import train_many

from fake_synth import train_jobs as _jobs  # noqa: E402

def test_plan_packs_balances_tokens():
    rnd = random.Random(0)
    tokens = {f"p{i}": rnd.randint(100, 5000) for i in range(37)}
    packs = plan_packs(tokens, 8)
    assert len(packs) == 5 and sorted(k for p in packs for k in p) == sorted(tokens)
    assert max(len(p) for p in packs) <= 8
    loads = [sum(tokens[k] for k in p) for p in packs]
    assert max(loads) - min(loads) <= max(tokens.values())  # LPT bound: within one prompt's tokens
    assert plan_packs({}, 4) == [] and plan_packs({"a": 1}, 4) == [["a"]]


def test_prepare_jobs_fails_only_the_broken_prompt(smollm_tokenizer, tmp_path):
    store = Store(tmp_path / "store")
    cfg = load_config(None, ["train.batch_size=2"])
    jobs = _jobs(store, smollm_tokenizer, ["a", "b", "c"], broken={"b"})
    os.makedirs(f"{jobs[2].pdir}/adapter")
    open(f"{jobs[2].pdir}/adapter/adapter_model.safetensors", "wb").close()
    sets, outcomes = prepare_jobs(cfg, store, smollm_tokenizer, jobs)
    assert set(sets) == {"a"} and sets["a"].tokens() > 0
    status = {o.prompt_id: (o.status, o.error) for o in outcomes}
    assert status["c"] == ("skipped", None)
    assert status["b"][0] == "failed" and "to_be.parquet" in status["b"][1]


TRAIN = ["train.epochs=1", "train.batch_size=2", "train.lora_r=4", "train.lora_alpha=8", "train.pack_size=2",
         "cluster.train_workers=2", "cluster.cpus_per_train_worker=1", "train.zero_stage=2",
         # The on-policy phase runs, small: at the default (5 epochs, 96-token samples) it was
         # half of the SmolLM2 test's time. test_trainer_ranks checks the default's phase.
         "train.on_policy_epochs=1", "train.on_policy_max_new_tokens=8"]


def test_two_workers_zero2_publish_peft_adapters(ray_local, smollm_tokenizer, tmp_path):
    """The embedded SmolLM2 under Ray Train (2 CPU workers, DeepSpeed ZeRO-2): 3 prompts in
    2 packs and one broken prompt; every good adapter is published, loads in plain PEFT and
    changes the model's output; checkpoints hold adapter state only."""
    from peft import PeftModel

    from genpi.models import load_model

    store = Store(tmp_path / "store")
    cfg = load_config(None, [*TRAIN, "train.checkpoint_every_steps=1", "train.lr=1e-2"])
    jobs = _jobs(store, smollm_tokenizer, ["fr1", "fr2", "bad", "fr3"], broken={"bad"})
    outcomes = train_many(cfg, store.uri, jobs, run_name="t-zero2")
    status = {o.prompt_id: o for o in outcomes}
    assert [o.prompt_id for o in outcomes] == ["fr1", "fr2", "bad", "fr3"]
    assert status["bad"].status == "failed" and status["bad"].error
    assert {k: status[k].status for k in ("fr1", "fr2", "fr3")} == dict.fromkeys(("fr1", "fr2", "fr3"), "trained")
    packs = [status[k].pack for k in ("fr1", "fr2", "fr3")]
    assert sorted(packs.count(p) for p in set(packs)) == [1, 2]  # pack_size=2: one pack of 2, one of 1
    st = status["fr1"].stats
    assert st["workers"] == 2 and st["zero_stage"] == 2 and st["deepspeed"] and len(st["worker_memory"]) == 2
    assert all(m["peak_rss_mb"] > 100 for m in st["worker_memory"])
    assert st["steps"] == st["planned_steps"] == 3 and st["stop_reason"] == "finished"

    # Checkpoints: the trainable state, never the 500 MB base.
    ckpt_files = [f for f in glob.glob(str(tmp_path / "store/runs/train/t-zero2/**/*"), recursive=True)
                  if os.path.isfile(f)]
    assert any(f.endswith("progress.json") for f in ckpt_files)
    assert any("optim_states" in f for f in ckpt_files)
    assert max(os.path.getsize(f) for f in ckpt_files) < 50 * 2**20

    base, tok, _ = load_model(cfg.model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, f"{jobs[0].pdir}/adapter")
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2


def _adapter(pdir):
    from safetensors.torch import load_file

    return load_file(f"{pdir}/adapter/adapter_model.safetensors")


@pytest.mark.parametrize("workers", [2, 1], ids=["deepspeed-2-workers", "plain-1-worker"])
def test_resume_after_a_failure_gives_the_same_adapters(ray_local, tiny_model_dir, smollm_tokenizer, tmp_path,
                                                        workers):
    """A worker fails after a checkpoint; Ray Train restarts the workers from it; the adapters
    equal those of an uninterrupted run. Two workers checkpoint through DeepSpeed; one CPU
    worker trains without it (optim_backend.uses_deepspeed) and checkpoints its own torch file."""
    cfg = load_config(None, [*TRAIN, f"model.name={tiny_model_dir}", "train.checkpoint_every_steps=2",
                             "train.epochs=2", "train.lr=5e-3", f"cluster.train_workers={workers}"])
    results = {}
    for name, fail in (("plain", None), ("resumed", 3)):
        store = Store(tmp_path / name)
        jobs = _jobs(store, smollm_tokenizer, ["x", "y"])
        outcomes = train_many(cfg, store.uri, jobs, run_name=name, _fail_after_steps=fail)
        assert [o.status for o in outcomes] == ["trained", "trained"], outcomes
        results[name] = [_adapter(j.pdir) for j in jobs]
        # 6 pack steps, checkpoints every 2; the injected failure comes right after the one at step 4.
        assert outcomes[0].stats["resumed_at_pack_step"] == (4 if fail else None)
        assert outcomes[0].stats["deepspeed"] is (workers > 1)
    marker_runs = glob.glob(str(tmp_path / "resumed/runs/train/resumed/checkpoint_*"))
    assert marker_runs, "the resumed run reported no checkpoint"
    saved = glob.glob(str(tmp_path / "resumed/runs/train/resumed/checkpoint_*/**/*"), recursive=True)
    if workers == 1:
        assert any(f.endswith(PLAIN_STATE) for f in saved) and not any("optim_states" in f for f in saved)
    for plain, resumed in zip(results["plain"], results["resumed"]):
        assert plain.keys() == resumed.keys()
        assert any(float(v.abs().max()) > 0 for k, v in plain.items() if "lora_B" in k)
        for key in plain:
            torch.testing.assert_close(resumed[key], plain[key], rtol=1e-5, atol=1e-7)
