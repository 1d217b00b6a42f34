"""Self Role-Playing: role swap, end markers, batching (one engine call per side per turn),
failure isolation between prompts, and multi-turn training examples."""

from __future__ import annotations

import pytest

from genpi.config import ModelConfig, load_config
from genpi.engines.base import ChatRequest, Completion
from genpi.engines.hf import HFEngine
from genpi.models import load_model
from genpi.synth.roleplay import (
    Conversation,
    clean_env_turn,
    degenerate_turn,
    env_messages,
    env_system,
    first_turns,
    run_roleplay,
)
from genpi.synth.stages import request_dict, run_isolated

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPT = "You are a pirate. Always answer like a pirate and say Arr."


class CountingEngine:
    """The real HF engine, counting calls and requests per call."""

    def __init__(self, engine):
        self.engine = engine
        self.batch_size = engine.batch_size
        self.calls: list[int] = []

    def generate(self, requests, progress=None):
        self.calls.append(len(requests))
        return self.engine.generate(requests, progress)


class ScriptedEngine:
    """Test double for the loop's control flow only: replies from a script keyed by the
    conversation's first message (real generation is covered by the tests above/below)."""

    batch_size = 8

    def __init__(self, env_script: dict[str, list[str]]):
        self.env_script = env_script
        self.calls: list[int] = []

    def generate(self, requests, progress=None):
        self.calls.append(len(requests))
        outs = []
        for r in requests:
            if r.messages[0]["content"].startswith("You are role-playing"):
                first = r.messages[1]["content"]  # the input, now the env's own first turn
                turn = sum(m["role"] == "assistant" for m in r.messages[1:])
                text = self.env_script[first][turn - 1]
            else:
                text = ["Sure, here you go.", "Happy to help with that too.", "Yes indeed, that works well."][len(r.messages) // 2 - 1]
            outs.append(Completion(text=text, token_ids=[1, 2, 0], finish_reason="stop", prompt_tokens=5))
        return outs


def _conv(i: int, text: str) -> Conversation:
    return first_turns(i, text, {"text": f"first reply {i}", "token_ids": [5, 6, 0]})


def test_env_view_swaps_roles_and_carries_prompt_and_end_condition():
    conv = _conv(0, "hello there")
    conv.messages += [{"role": "user", "content": "next question"}, {"role": "assistant", "content": "answer"}]
    system = env_system(PROMPT, ["seed one", "seed two"], "[END]")
    view = env_messages(system, conv)
    assert view[0]["role"] == "system" and PROMPT in view[0]["content"] and "[END]" in view[0]["content"]
    assert "seed one" in view[0]["content"]
    assert [m["role"] for m in view[1:]] == ["assistant", "user", "assistant", "user"]
    assert [m["content"] for m in view[1:4]] == ["hello there", "first reply 0", "next question"]
    # The agent's latest reply reaches the other side framed with its task.
    assert "answer" in view[4]["content"] and view[4]["content"] != "answer"


def test_end_marker_and_degenerate_turns():
    assert clean_env_turn("Thanks, bye! [END_CONVERSATION]", "[END_CONVERSATION]") == ("Thanks, bye!", True)
    assert clean_env_turn("  more please ", "[END_CONVERSATION]") == ("more please", False)
    assert degenerate_turn("", []) == "empty"
    assert degenerate_turn("Same thing", ["same   thing"]) == "echo"
    assert degenerate_turn("go go go go go go go go go", []) == "repetitive"
    assert degenerate_turn("<|im_start|>user", []) == "special_tokens"
    assert degenerate_turn("What about tomorrow?", ["hello"]) is None


def test_roleplay_loop_with_scripted_engine_drops_ended_conversations():
    # a: ends by marker at its 2nd env turn; b: goes to the turn limit; c: empty env turn.
    script = {
        "input a": ["follow-up a", "thanks [END_CONVERSATION]"],
        "input b": ["what about tomorrow", "and on sunday morning", "never used"],
        "input c": [""],
    }
    engine = ScriptedEngine(script)
    convs = [_conv(i, f"input {k}") for i, k in enumerate("abc")]
    stats = run_roleplay(engine, [(PROMPT, [], c) for c in convs], max_turns=3, end_marker="[END_CONVERSATION]",
                         env_max_new_tokens=16, agent_max_new_tokens=16, top_k_logprobs=0, temperature=0.0, seed=0)
    a, b, c = convs
    assert a.end_reason == "end_marker" and a.agent_turns == 2
    assert b.end_reason == "max_turns" and b.agent_turns == 3
    assert c.end_reason == "env_empty" and c.agent_turns == 1
    # env(3) agent(2) env(2: c dropped) agent(1: a ended) -> each turn is one call for the batch
    assert engine.calls == [3, 2, 2, 1]
    assert stats.calls == 4 and stats.ended == {"end_marker": 1, "max_turns": 1, "env_empty": 1}
    for conv in convs:
        roles = [m["role"] for m in conv.messages]
        assert roles == ["user", "assistant"] * conv.agent_turns
        assert all("[END_CONVERSATION]" not in m["content"] for m in conv.messages)


def test_real_engine_one_call_per_side_per_turn(tiny_model_dir, tiny_seeds):
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    engine = CountingEngine(HFEngine(model, tok, batch_size=4))
    convs = [_conv(i, s) for i, s in enumerate(tiny_seeds[:6])]
    # The first agent turn must be real token ids of this tokenizer for later encoding.
    for c in convs:
        ids = tok(c.messages[1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        c.messages[1]["token_ids"] = ids
    stats = run_roleplay(engine, [(PROMPT, tiny_seeds[:2], c) for c in convs], max_turns=3, end_marker="[END]",
                         env_max_new_tokens=8, agent_max_new_tokens=8, top_k_logprobs=5, temperature=0.8, seed=1)
    # 6 conversations, 2 more turns: at most 4 engine calls whatever the batch (serial: 24).
    assert stats.calls == len(engine.calls) <= 4
    assert engine.calls[0] == 6
    for c in convs:
        roles = [m["role"] for m in c.messages]
        assert roles == ["user", "assistant"] * c.agent_turns
        for m in c.messages[2:]:
            if m["role"] == "assistant":
                assert m["token_ids"] and len(m["topk_ids"]) == len(m["token_ids"])


def test_one_bad_prompt_fails_alone_in_a_mixed_batch(tiny_model_dir):
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    engine = HFEngine(model, tok, batch_size=4)
    good = [{"prompt_id": "good", "kind": "to_be",
             "request": request_dict(ChatRequest([{"role": "user", "content": f"hi {i}"}], max_new_tokens=4))}
            for i in range(3)]
    # A request for an adapter the engine does not have is a real engine error.
    bad = [{"prompt_id": "bad", "kind": "to_be",
            "request": request_dict(ChatRequest([{"role": "user", "content": "x"}], max_new_tokens=4, adapter="nope"))}]
    outs = run_isolated("generate", engine, good + bad)
    errors = [o for o in outs if "error" in o]
    assert [o["prompt_id"] for o in errors] == ["bad"] and "nope" in errors[0]["error"]
    assert sorted(o["prompt_id"] for o in outs if "error" not in o) == ["good"] * 3


def test_conversations_become_multi_turn_training_examples(tiny_overrides, tiny_model_dir, tiny_seeds, tmp_path):
    from genpi.manifest import PromptEntry
    from genpi.store import Store
    from genpi.synth.pipeline import load_synth, synthesize
    from genpi.train.loop import build_examples
    from genpi.train.losses import IGNORE_INDEX

    cfg = load_config(None, tiny_overrides).with_overrides({"synth.roleplay_max_turns": 3,
                                                            "synth.roleplay_conversations": 3})
    model, tok, _ = load_model(cfg.model)
    store = Store(tmp_path / "store")
    entry = PromptEntry(id="pirate", prompt=PROMPT, seed_inputs=tiny_seeds)
    pdir = store.prompt_dir(entry.id, "fp")
    summary = synthesize(HFEngine(model, tok, 4), entry, cfg, store, pdir)
    synth = load_synth(store, pdir)
    convs = synth["conversations"]
    assert summary["conversations"]["count"] == len(convs) == 3
    multi = [c for c in convs if c["agent_turns"] > 1]
    assert multi, f"no multi-turn conversation: {[c['end_reason'] for c in convs]}"
    ts = build_examples(tok, synth, PROMPT, cfg.train)
    sft = [ex for kind, ex in ts.examples if kind == "sft"]
    # Every training input gives one example; role-played ones are longer (several turns).
    sft_dropped = sum(n for why, n in ts.dropped.items() if why.startswith("sft_"))
    assert len(sft) + sft_dropped == len([r for r in synth["to_be"] if r["text"].strip()])
    agent_tokens = max(sum(len(m["token_ids"]) for m in c["messages"] if m["role"] == "assistant") for c in multi)
    labelled = max(sum(1 for t in ex.labels if t != IGNORE_INDEX) for ex in sft)
    assert labelled >= agent_tokens - 1  # every agent turn is a target (the prompt never appears)
    assert all(PROMPT not in tok.decode(ex.input_ids) for ex in sft)
