"""Inputs closer to real users (issue 16): input-generation calls steered by seed topics and
styles (synth.seed_topics), long prompts exercised section by section (synth.section_inputs),
and the inputs' diversity measured beside the human-written set's. Both options off must
leave the requests, and so the stored inputs, exactly as they were."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES  # noqa: E402
from genpi.config import SynthConfig, load_config
from genpi.data import human_inputs
from genpi.engines.base import Completion
from genpi.synth.diversity import human_measures, measures
from genpi.synth.inputs import ASK, input_requests
from genpi.synth.sections import (LONG_PROMPT_TOKENS, MIN_SECTION_WORDS, prompt_sections, prompt_tokens,
                                  split_sections)
from genpi.synth.stages import inputs_stage
from genpi.synth.topics import load_topics, topic_plan, topics_of

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"
SHELL = yaml.safe_load((EXAMPLES / "shell_agent.yaml").read_text())
FRENCH = yaml.safe_load((EXAMPLES / "french.yaml").read_text())
TOPIC_NAMES = {t.name for t in load_topics()[0]}

VOCAB = ("apple river window garden engine letter music winter doctor market ticket bridge camera pencil "
         "rabbit silver forest planet candle butter orange island jacket ladder mirror needle pocket saddle "
         "tunnel violin wallet yellow zebra anchor basket castle").split()


class ListEngine:
    """Test double for the input lists only (a model's lists cannot be relied on to parse):
    six made-up items per request, drawn from the request's seed and focus (as when OLD_STAGE
    was recorded, for requests without one)."""

    batch_size = 8

    def __init__(self, inner=None):
        self.inner, self.lists = inner, []
        if inner is not None:
            self.batch_size, self.tok = inner.batch_size, inner.tok

    def generate(self, requests, progress=None):
        lists = [r for r in requests if isinstance(r.tag, dict) and "first_item" in r.tag]
        others = [r for r in requests if r not in lists]
        done = dict(zip(map(id, others), self.inner.generate(others) if others else []))
        self.lists += lists
        out = []
        for r in requests:
            if r in lists:
                focus = {k: v for k, v in r.tag.items() if k != "first_item"}
                rnd = random.Random(f"{r.seed}:{sorted(focus.items())}" if focus else r.seed)
                first = r.tag["first_item"]
                items = [" ".join(rnd.sample(VOCAB, 6)) + "?" for _ in range(6)]
                text = "\n".join([items[0]] + [f"{first + k}. {x}" for k, x in enumerate(items[1:], 1)])
                out.append(Completion(text=text, token_ids=[1] * len(text.split()), finish_reason="stop",
                                      prompt_tokens=10))
            else:
                out.append(done[id(r)])
        return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- (b) both options off: the requests and the stage's output exactly as before --------------
# Digests taken with the code before seed_topics/section_inputs existed (commit 46f1c05).
OLD_REQUESTS = "81e87418ddfa21c728357e18f0445f90432c10b6e30d0a79f99d88badca58ea6"
OLD_STAGE = "be1efc8807b63b0bfb6c072486ced5d56b72b5420a59b2a0d244dea5028be325"


def test_with_both_options_off_requests_and_inputs_are_exactly_as_before():
    assert ASK == ('An AI assistant follows these instructions:\n"""\n{prompt}\n"""\n'
                   "List realistic, varied messages that users send to this assistant, one per line. "
                   "Each message is what a user would actually type.")
    cfg = SynthConfig(seed=3)
    reqs = [dataclasses.asdict(x) for r in range(2) for x in input_requests(SHELL["prompt"], SHELL["seed_inputs"], cfg, r, 5)]
    assert _digest(reqs) == OLD_REQUESTS
    assert all(r["messages"][0]["content"] == ASK.format(prompt=SHELL["prompt"]) and set(r["tag"]) == {"first_item"}
               for r in reqs)
    rows = [{"prompt_id": "a", "prompt": SHELL["prompt"], "seeds": SHELL["seed_inputs"][:3],
             "synth": SynthConfig(seed=5, n_train_inputs=30, n_heldout_inputs=8).model_dump()},
            {"prompt_id": "b", "prompt": "Answer in French.", "seeds": [],
             "synth": SynthConfig(seed=5, n_train_inputs=20, n_heldout_inputs=8).model_dump()}]
    out = inputs_stage(ListEngine(), rows)
    for o in out:  # the one addition: the diversity figures (kept out of the rows)
        assert set(o["stats"].pop("diversity_vs_human")) == {"inputs", "human"}
        assert all(set(r) == {"input", "source", "split"} for r in o["inputs"])
    assert _digest(out) == OLD_STAGE


# --- (a) seed topics ---------------------------------------------------------------------------
def _topics(reqs) -> list[str]:
    return [r.tag["topic"] for r in reqs]


def test_topics_list_is_varied_and_parsed():
    topics, styles = load_topics()
    assert 70 <= len(topics) <= 100 and len(TOPIC_NAMES) == len(topics)
    assert all(t.keywords for t in topics)
    assert {"written in French", "written in Spanish", "written in German"} <= set(styles)
    assert any("typo" in s for s in styles) and any("long" in s for s in styles) and any("formal" in s for s in styles)
    assert "cooking and recipes" in topics_of("How long do I bake a banana bread?")
    assert "pets" in topics_of("My cat keeps scratching the sofa") and "pets" not in topics_of("a catalogue")
    assert "weather" in topics_of("Quel temps fera-t-il demain ? météo") and not topics_of("zzz qqq")


def test_seed_topics_steer_each_call_to_one_of_k_topics_deterministically():
    k = 5
    cfg = SynthConfig(seed=3, seed_topics=k)
    prompt = FRENCH["prompt"]
    reqs = input_requests(prompt, FRENCH["seed_inputs"], cfg, 0, 10)
    topics = _topics(reqs)
    assert len(set(topics)) == k and set(topics) <= TOPIC_NAMES
    assert topics[:k] == topics[k:]  # every topic in turn
    for r in reqs:
        content = r.messages[0]["content"]
        assert content.startswith(ASK.format(prompt=prompt))  # steering is added, ASK kept
        assert f"about {r.tag['topic']} " in content and "Style of the messages: " in content
    styles = {re.search(r"Style of the messages: (.*)\.$", r.messages[0]["content"]).group(1) for r in reqs}
    assert len(styles) >= 5 and styles <= set(load_topics()[1])
    # The sampling and the few-shot prefix are those of the unsteered requests.
    plain = input_requests(prompt, FRENCH["seed_inputs"], SynthConfig(seed=3), 0, 10)
    assert [(r.seed, r.assistant_prefix) for r in reqs] == [(r.seed, r.assistant_prefix) for r in plain]
    # Same config, same requests; later rounds carry on through the topics.
    again = input_requests(prompt, FRENCH["seed_inputs"], cfg, 0, 10)
    assert [dataclasses.asdict(r) for r in again] == [dataclasses.asdict(r) for r in reqs]
    later = input_requests(prompt, FRENCH["seed_inputs"], cfg, 1, 3, first_call=10)
    assert set(_topics(later)) <= set(topics)
    # Another seed or another prompt draws other topics.
    other_seed = _topics(input_requests(prompt, [], SynthConfig(seed=4, seed_topics=k), 0, k))
    other_prompt = _topics(input_requests(SHELL["prompt"], [], cfg, 0, k))
    assert set(other_seed) != set(topics) and set(other_prompt) != set(topics)
    assert topic_plan(prompt, 3, 0) is None
    assert len(topic_plan(prompt, 3, 500).topics) == len(TOPIC_NAMES)  # capped at the list


# --- (c) sections of a long prompt -----------------------------------------------------------
def test_a_long_agent_prompt_splits_into_sensible_sections_covering_it(smollm_tokenizer):
    prompt = SHELL["prompt"]
    n_tok, how = prompt_tokens(prompt, smollm_tokenizer)
    assert (n_tok, how) == (1782, "tokenizer")
    n_words, how = prompt_tokens(prompt)
    assert how == "words" and LONG_PROMPT_TOKENS < n_words < 2 * n_tok
    secs = prompt_sections(prompt, 8, n_tok)
    assert len(secs) == 8 and [s.index for s in secs] == list(range(8))
    titles = [s.title for s in secs]
    assert titles[0].startswith("You are Shelly")
    assert {"The environment", "How every turn is written", "Rules"} <= set(titles), titles
    assert sum("Example" in t for t in titles) >= 3, titles
    assert all(s.words >= MIN_SECTION_WORDS for s in secs)
    # In order, nothing lost: the sections are the prompt's blocks.
    assert re.sub(r"\s+", " ", " ".join(s.text for s in secs)) == re.sub(r"\s+", " ", prompt).strip()
    # A code fence is never cut (fence lines come in pairs; prose may mention ``` inline).
    assert all(sum(ln.strip().startswith("```") for ln in s.text.splitlines()) % 2 == 0 for s in secs)
    # Fewer allowed: neighbours merge, still covering everything.
    three = split_sections(prompt, 3)
    assert len(three) == 3 and sum(s.words for s in three) == sum(s.words for s in secs)


def test_every_section_gets_requests_and_half_the_calls_stay_on_the_whole_prompt():
    secs = prompt_sections(SHELL["prompt"], 8, prompt_tokens(SHELL["prompt"])[0])
    cfg = SynthConfig(seed=1, section_inputs=8)
    reqs = input_requests(SHELL["prompt"], SHELL["seed_inputs"], cfg, 0, 2 * len(secs), sections=secs)
    whole = [r for r in reqs if r.tag["section"] == "whole"]
    assert len(whole) == len(secs)
    assert all(r.messages[0]["content"] == ASK.format(prompt=SHELL["prompt"]) for r in whole)
    by_label = {r.tag["section"]: r for r in reqs if r not in whole}
    assert set(by_label) == {s.label for s in secs}
    for s in secs:
        content = by_label[s.label].messages[0]["content"]
        assert content.startswith(ASK.format(prompt=SHELL["prompt"]))  # the whole prompt is shown
        assert "apply this part of its instructions" in content and s.shown() in content


def test_a_short_prompt_is_never_split():
    prompt = FRENCH["prompt"]
    n_tok = prompt_tokens(prompt)[0]
    assert n_tok < LONG_PROMPT_TOKENS
    assert prompt_sections(prompt, 8, n_tok) == []
    assert prompt_sections(SHELL["prompt"], 0, 5000) == []  # off
    cfg = SynthConfig(seed=2, n_train_inputs=10, n_heldout_inputs=4, section_inputs=8)
    [out] = inputs_stage(ListEngine(), [{"prompt_id": "fr", "prompt": prompt, "seeds": FRENCH["seed_inputs"],
                                         "synth": cfg.model_dump()}])
    assert out["stats"]["sections"] == {} and out["stats"]["prompt_tokens"]["counted_by"] == "words"
    assert all(set(r) == {"input", "source", "split"} for r in out["inputs"])


# --- (d) the diversity measure ---------------------------------------------------------------
def test_diversity_tells_human_messages_from_near_identical_ones():
    human = human_measures()
    assert human == measures([r["text"] for r in human_inputs()])
    same = [f"How do I reset my password for account {i}?" for i in range(40)]
    flat = measures(same)
    assert human["distinct_2"] > 0.9 and flat["distinct_2"] < 0.3
    assert human["mean_jaccard"] < 0.1 and flat["mean_jaccard"] > 0.6
    assert human["words_stdev"] > 4 and flat["words_stdev"] < 1
    assert human["non_english"] > 0.2 and flat["non_english"] == 0.0 and human["languages"] >= 5
    assert human["topics_covered"] >= 25 and flat["topics_covered"] <= 2
    assert measures([])["n"] == 0


# --- (e) end to end: one long prompt, both options, the tiny model ---------------------------
@pytest.mark.usefixtures("single_thread_torch")
def test_both_options_end_to_end_on_the_tiny_model_with_scripted_input_lists(tiny_model_dir, tmp_path):
    """Tiny random model for replies and role-play; the input lists scripted (ListEngine)."""
    from genpi.engines.hf import HFEngine
    from genpi.manifest import PromptEntry
    from genpi.models import load_model
    from genpi.store import Store
    from genpi.synth.pipeline import load_synth, synthesize
    from genpi.train.loop import build_examples

    cfg = load_config(None, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "synth.n_train_inputs=8",
                             "synth.n_heldout_inputs=4", "synth.seed_topics=4", "synth.section_inputs=6"])
    model, tok, _ = load_model(cfg.model)
    engine = ListEngine(HFEngine(model, tok, 4))
    store = Store(tmp_path / "store")
    entry = PromptEntry(id="shell", prompt=SHELL["prompt"], seed_inputs=SHELL["seed_inputs"])
    pdir = store.prompt_dir(entry.id, "fp")
    summary = synthesize(engine, entry, cfg, store, pdir)
    # 10 seeds already cover the 12 inputs wanted, yet every section got its calls.
    labels = {r.tag["section"] for r in engine.lists} - {"whole"}
    assert len(labels) == 6 and {r.tag["topic"] for r in engine.lists if "topic" in r.tag} <= TOPIC_NAMES
    stats = summary["inputs"]
    assert stats["prompt_tokens"] == {"tokens": 1782, "counted_by": "tokenizer"}
    assert set(stats["sections"]) == labels and sum(stats["sections"].values()) >= 1
    assert set(summary["diversity"]) == {"inputs", "human"}
    assert summary["diversity"]["inputs"]["n"] == 12 and summary["diversity"]["human"] == human_measures()
    assert json.loads((Path(pdir) / "synth" / "summary.json").read_text())["diversity"] == summary["diversity"]
    # The extra columns do not trouble the readers: the synthesis loader and the training examples.
    synth = load_synth(store, pdir)
    rows = synth["inputs"]
    assert all(set(r) == {"input", "source", "split", "section", "topic"} for r in rows)
    assert {r["section"] for r in rows} <= labels | {"whole"}
    assert all(r["section"] == "whole" and r["topic"] == "" for r in rows if r["source"] == "seed")
    assert {r["split"] for r in rows} == {"train", "heldout"}
    ts = build_examples(tok, synth, SHELL["prompt"], cfg.train)
    assert ts.examples
