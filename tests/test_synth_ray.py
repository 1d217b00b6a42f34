"""Acceptance of synthesis at scale: Ray Data over 3 prompts (plus a broken one) on a local
Ray cluster with the embedded SmolLM2, then checks of the stored conversations."""

from __future__ import annotations

import pytest
import torch

from genpi.config import GenpiConfig, load_config
from genpi.manifest import PromptEntry
from genpi.store import Store
from genpi.synth.pipeline import COMPLETE, SynthJob, format_summaries, load_synth, synthesize_many
from genpi.synth.roleplay import agent_messages, env_messages, env_system

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("single_thread_torch")]

PROMPTS = {
    "french": "Always answer in French, whatever language the user writes in. Be brief and friendly.",
    "pirate": "You are a pirate captain. Answer every question like a pirate, and say Arr at least once.",
    "chef": "You are a cooking assistant. Give short recipes as numbered steps and always suggest a side dish.",
}
SEEDS = ["How do I boil an egg?", "What is the capital of Spain?", "Can you recommend a good book?",
         "How do I fix a flat bicycle tyre?", "What should I pack for a beach trip?"]

SMALL = [
    "synth.n_train_inputs=6", "synth.n_heldout_inputs=2", "synth.max_input_rounds=1", "synth.input_max_new_tokens=60",
    "synth.reply_max_new_tokens=20", "synth.n_pg_examples=2", "synth.reason_max_new_tokens=16",
    "synth.roleplay_conversations=3", "synth.roleplay_max_turns=3", "synth.env_max_new_tokens=20",

    "engine.batch_size=8", "engine.top_k_logprobs=10", "cluster.synth_actors=1",
]


@pytest.fixture(scope="module")
def synthesized(ray_local, tmp_path_factory):
    from genpi.pipeline.ray_runner import RayRunner

    cfg = load_config(None, SMALL)
    store = Store(tmp_path_factory.mktemp("synth-ray") / "store")
    jobs = [SynthJob(PromptEntry(id=pid, prompt=p, seed_inputs=SEEDS), cfg, store.prompt_dir(pid, "fp"))
            for pid, p in PROMPTS.items()]
    # A prompt whose settings leave no usable input: it must fail alone.
    broken = cfg.with_overrides({"synth.min_input_chars": 299, "synth.max_input_chars": 300})
    jobs.append(SynthJob(PromptEntry(id="broken", prompt="Be nice.", seed_inputs=SEEDS), broken,
                         store.prompt_dir("broken", "fp")))
    runner = RayRunner(cfg, None)
    try:
        results = synthesize_many(jobs, store, runner.synth_runner(), progress=False)
    finally:
        runner.close()
    print(format_summaries(results))
    return cfg, store, jobs, results, runner.engine_stats


def test_every_prompt_synthesized_and_broken_one_failed_alone(synthesized):
    cfg, store, jobs, results, _ = synthesized
    assert set(results) == {*PROMPTS, "broken"}
    assert "no usable training inputs" in results["broken"]["error"]
    assert store.exists(f"{store.prompt_dir('broken', 'fp')}/error.json")
    for pid in PROMPTS:
        assert "summary" in results[pid], results[pid]
        pdir = store.prompt_dir(pid, "fp")
        assert store.exists(f"{pdir}/synth/{COMPLETE}")
        inputs = store.read_parquet(f"{pdir}/synth/inputs.parquet")
        train = {r["input"] for r in inputs if r["split"] == "train"}
        held = {r["input"] for r in inputs if r["split"] == "heldout"}
        assert train and held and not (train & held), "held-out inputs must be disjoint from training inputs"
        convs = load_synth(store, pdir)["conversations"]
        assert len(convs) == 3 and {c["messages"][0]["content"] for c in convs} <= train
        summary = results[pid]["summary"]
        assert summary["conversations"]["count"] == 3 and "dropped" in summary["inputs"]


def test_conversations_alternate_and_honour_the_end_marker(synthesized):
    cfg, store, _, _, _ = synthesized
    n_multi = 0
    for pid in PROMPTS:
        for c in load_synth(store, store.prompt_dir(pid, "fp"))["conversations"]:
            roles = [m["role"] for m in c["messages"]]
            assert roles == ["user", "assistant"] * c["agent_turns"], roles  # final env turn dropped
            assert all(cfg.synth.end_marker not in m["content"] for m in c["messages"])
            if c["end_reason"] == "max_turns":
                assert c["agent_turns"] == cfg.synth.roleplay_max_turns
            else:
                assert c["agent_turns"] < cfg.synth.roleplay_max_turns
            n_multi += c["agent_turns"] > 1
    # SmolLM2-135M often copies the agent's reply as the "user" (dropped as an echo), so
    # only some conversations go on; with a real model most do.
    assert n_multi >= 1, "role-play produced no multi-turn conversation"


def _logprobs(model, tok, messages, reply_ids):
    """Log-softmax rows at each position of `reply_ids` appended after the rendered messages."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + list(reply_ids)])
    with torch.no_grad():
        logits = model(full).logits[0, len(ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


def test_agent_turns_come_from_the_prompted_model_env_turns_from_the_swapped_view(synthesized):
    """Recompute with the same model: the stored top-k of each later agent turn is the
    teacher's (prompted) distribution, not the unprompted one; each environment turn is
    more likely under the swapped view it was sampled from than as the agent's own words."""
    from genpi.models import load_model, load_tokenizer
    from genpi.synth.roleplay import Conversation

    cfg, store, jobs, _, _ = synthesized
    model, _, _ = load_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    checked_agent, env_gain = 0, []
    for job in jobs[:3]:
        system = env_system(job.entry.prompt, job.entry.seed_inputs, cfg.synth.end_marker)
        for c in load_synth(store, job.pdir)["conversations"]:
            msgs = c["messages"]
            for k in range(2, len(msgs)):
                m = msgs[k]
                before = Conversation(c["input_idx"], [dict(x) for x in msgs[:k]])
                if m["role"] == "assistant":
                    plain = [{"role": x["role"], "content": x["content"]} for x in msgs[:k]]
                    with_prompt = _logprobs(model, tok, agent_messages(job.entry.prompt, before), m["token_ids"])
                    without = _logprobs(model, tok, plain, m["token_ids"])
                    ids = torch.tensor(m["topk_ids"])
                    stored = torch.tensor(m["topk_logprobs"])
                    err_with = (with_prompt.gather(1, ids) - stored).abs().max().item()
                    err_without = (without.gather(1, ids) - stored).abs().max().item()
                    assert err_with < 2e-2 < err_without, (err_with, err_without)
                    checked_agent += 1
                else:
                    reply = tok(m["content"], add_special_tokens=False)["input_ids"]
                    idx = torch.tensor(reply)[:, None]
                    env_view = _logprobs(model, tok, env_messages(system, before), reply).gather(1, idx).mean()
                    agent_view = _logprobs(model, tok, agent_messages(job.entry.prompt, before), reply).gather(1, idx).mean()
                    env_gain.append((env_view - agent_view).item())
    assert checked_agent >= 1 and env_gain
    assert sum(g > 0 for g in env_gain) >= 0.7 * len(env_gain), env_gain


def test_every_pass_ran_on_the_one_engine_of_the_one_actor(synthesized):
    """cluster.synth_actors=1: the embedded model was loaded once for the 4 passes (a Ray Data
    pool per pass loaded it 4 times)."""
    *_, stats = synthesized
    (actor,) = stats
    assert actor["engines_built"] == 1
    assert actor["calls"].keys() == {"inputs", "generate", "roleplay"}, actor["calls"]


def test_second_run_reuses_everything(synthesized, ray_local):
    from genpi.pipeline.ray_runner import RayRunner

    cfg, store, jobs, _, _ = synthesized
    runner = RayRunner(cfg, None)
    try:
        again = synthesize_many(jobs[:3], store, runner.synth_runner(), progress=False)
    finally:
        runner.close()
    assert all(r.get("skipped") for r in again.values())
    assert runner.engine_stats == [], "an engine was built for a synthesis with nothing to do"


def test_missing_gpus_fail_fast_with_what_is_missing(ray_local, tmp_path):
    from genpi.pipeline.ray_runner import RayRunner, ResourceError

    cfg = GenpiConfig().with_overrides({"cluster.gpus_per_engine_actor": 1})
    # The error names the stage that needs the resources: synthesis and evaluation share the pool.
    with pytest.raises(ResourceError, match=r"^synthesis needs .*1 GPU.*cluster.gpus_per_engine_actor.*0 GPU"):
        RayRunner(cfg, None).synth_runner()
    with pytest.raises(ResourceError, match=r"^evaluation needs .*1 GPU"):
        list(RayRunner(cfg, None).evaluate([], Store(str(tmp_path / "s"))))
