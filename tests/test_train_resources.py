"""Training workers the cluster cannot hold: fail with what is missing, never wait forever.

Ray Train (2.60, Train v2) waits 60 s for a worker group's placement group, then retries,
by default without limit (FailureConfig.controller_failure_limit=-1): a job whose training
workers can never be placed hung. With cluster.resource_wait_s=0 ("check once") the job now
fails at once, naming the settings; with a wait, Ray Train retries for about that long."""
from __future__ import annotations

import builtins
import io
import logging
import sys
import time

import pytest

from genpi.config import load_config
from genpi.store import Store
from genpi.train.placement import controller_failure_limit, train_resource_problem
from genpi.train.trainer import TRAIN_ERROR, _progress, train_many

from fake_synth import train_jobs  # noqa: E402


def test_resource_problem_counts_workers_per_node():
    nodes = [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert train_resource_problem(nodes, 3, 2, 0) is None  # 2 + 1 workers
    problem = train_resource_problem(nodes, 4, 2, 0)
    assert "4 worker(s)" in problem and "hold 3" in problem and "cluster.resource_wait_s" in problem
    assert train_resource_problem(nodes, 1, 1, 1) is None
    assert "hold 1" in train_resource_problem(nodes, 2, 1, 1)  # one GPU in the cluster
    assert "hold 0" in train_resource_problem([], 1, 1, 0)  # scaling from zero, no node yet


def test_controller_failure_limit_follows_the_resource_wait():
    assert controller_failure_limit(0, 60) == 0
    assert controller_failure_limit(600, 60) == 10
    assert controller_failure_limit(61, 60) == 2


# ~20-40 s: a Ray Train run that never starts workers, on the session's Ray (4 logical CPUs).
@pytest.mark.timeout(300)
def test_workers_that_cannot_fit_fail_at_once_naming_the_settings(ray_local, smollm_tokenizer, tmp_path):
    store = Store(tmp_path / "store")
    cfg = load_config(None, ["train.epochs=1", "train.batch_size=2", "cluster.train_workers=1",
                             "cluster.cpus_per_train_worker=64", "cluster.resource_wait_s=0"])
    jobs = train_jobs(store, smollm_tokenizer, ["a", "b"])
    t0 = time.time()
    outcomes = train_many(cfg, store.uri, jobs, run_name="t-no-room")
    assert time.time() - t0 < 60, "it waited for workers that cannot be placed"
    assert [o.status for o in outcomes] == ["failed", "failed"]
    for o in outcomes:
        assert o.error.startswith("ResourceError") and "cluster.cpus_per_train_worker" in o.error


def test_a_progress_line_reaches_the_log_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train's workers run with print replaced by one that writes the line and also logs
    it; the training progress lines reached the driver twice."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    out = io.StringIO()
    handler = logging.StreamHandler(out)  # a worker's root logger ends up in the same log
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)  # as Ray Train configures its workers' logging
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        _progress("[train] pack 1/1: step 10/88")
    finally:
        root.removeHandler(handler)
    assert out.getvalue().count("step 10/88") == 1, out.getvalue()
    with monkeypatch.context() as m:  # the same line through print: twice (the defect)
        m.setattr(sys, "stdout", out)
        m.setattr(builtins, "print", redirected_print)
        root.addHandler(handler)
        try:
            print("[train] pack 1/1: step 20/88", flush=True)
        finally:
            root.removeHandler(handler)
    assert out.getvalue().count("step 20/88") == 2


# ~40-90 s: one Ray Train run of 3 one-prompt packs on the tiny model.
@pytest.mark.timeout(600)
def test_a_failing_pack_fails_only_its_own_prompts(ray_local, tiny_model_dir, smollm_tokenizer, tmp_path):
    """Issue 15: an error in one pack failed every pack after it in the same Ray Train run
    ("pack did not finish"); now the pack's own prompts fail with its error and the rest train."""
    store = Store(tmp_path / "store")
    cfg = load_config(None, ["train.epochs=1", "train.batch_size=2", "train.lora_r=4", "train.pack_size=1",
                             "cluster.train_workers=1", f"model.name={tiny_model_dir}",
                             "train.on_policy_epochs=1", "train.on_policy_max_new_tokens=8"])  # small, not the default's
    jobs = train_jobs(store, smollm_tokenizer, ["a", "b", "c"])
    for j in jobs:  # a stale failure of an earlier run is not this run's outcome
        store.write_json(f"{j.pdir}/{TRAIN_ERROR}", {"error": "an earlier run's failure"})
    from genpi.train.jobs import plan_packs, prepare_jobs

    sets, _ = prepare_jobs(cfg, store, smollm_tokenizer, jobs)
    first = plan_packs({k: ts.tokens() for k, ts in sets.items()}, 1)[0][0]  # the first pack's prompt
    outcomes = {o.prompt_id: o for o in train_many(cfg, store.uri, jobs, run_name="t-fail", _fail_prompt=first)}
    assert outcomes[first].status == "failed", outcomes[first]
    assert f"injected training failure for {first}" in outcomes[first].error and outcomes[first].pack == 0
    rest = [j for j in jobs if j.prompt_id != first]
    assert {outcomes[j.prompt_id].status for j in rest} == {"trained"}, {k: o.error for k, o in outcomes.items()}
    # The packs after the failed one trained on a base without its LoRA layers.
    for j in rest:
        assert store.read_json(f"{j.pdir}/train.json")["steps"] > 0


@pytest.mark.parametrize("user_value", [None, "3"])
def test_ray_train_polls_its_workers_every_half_second_unless_the_user_says(monkeypatch, tiny_model_dir, tmp_path,
                                                                            user_value):
    """A run ends at the controller's first poll after its workers return: at Ray's 2 s default
    that cost up to 2 s per wave. Ray Train hands this variable on to its controller."""
    if user_value is None:
        monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    else:
        monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", user_value)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"store={tmp_path / 'store'}"])
    Store(tmp_path / "store")
    assert train_many(cfg, str(tmp_path / "store"), []) == []  # no job: no Ray started
    import os

    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == (user_value or "0.5")
