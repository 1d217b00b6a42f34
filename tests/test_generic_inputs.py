"""synth.generic_share (issue 16): a share of the training inputs are everyday messages to
any assistant, generated without the prompt, so the adapter learns what the prompted model
does with messages its prompt did not anticipate. Off, the stage is exactly as before
(tests/test_input_diversity.py holds the digests)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_input_diversity import FRENCH, TOPIC_NAMES, ListEngine  # noqa: E402

from genpi.config import ConfigError, GenpiConfig, SynthConfig
from genpi.data import human_inputs
from genpi.synth.inputs import GENERIC, GENERIC_STARTERS, generic_requests, normalise
from genpi.synth.stages import inputs_stage

SENTIMENT = "You are a sentiment classifier for product reviews. Reply with one word: positive, negative or neutral."


def _rows(**synth):
    return [{"prompt_id": "s", "prompt": SENTIMENT, "seeds": ["The lid broke on day one.", "Love the colour."],
             "synth": SynthConfig(seed=5, n_train_inputs=20, n_heldout_inputs=6, **synth).model_dump()}]


def test_generic_inputs_take_training_places_only_and_never_see_the_prompt():
    engine = ListEngine()
    [out] = inputs_stage(engine, _rows(generic_share=0.4))  # 8 of 20
    train = [r for r in out["inputs"] if r["split"] == "train"]
    held = [r for r in out["inputs"] if r["split"] == "heldout"]
    assert len(train) == 20 and len(held) == 6
    assert sum(r["source"] == GENERIC for r in train) == 8
    assert not any(r["source"] == GENERIC for r in held), "the held-out split stays the prompt's own"
    assert out["stats"]["generic"] == {"wanted": 8, "train": 8}
    assert out["stats"]["wanted"] == 26
    generic = [r for r in engine.lists if r.tag.get(GENERIC)]
    own = [r for r in engine.lists if not r.tag.get(GENERIC)]
    assert generic and own
    for r in generic:
        text = r.messages[0]["content"]
        assert "sentiment" not in text and "classifier" not in text, text
        assert r.tag["topic"] in TOPIC_NAMES
    # The first generic calls continue the shipped starters, the prompt's calls its seeds.
    assert any("1. " + s in r.assistant_prefix for r in generic for s in GENERIC_STARTERS)
    assert all("The lid broke" in r.assistant_prefix or "Love the colour" in r.assistant_prefix for r in own[:1])
    # Generic rows carry the topic they were asked for; the prompt's own rows an empty one.
    assert all(r["topic"] in TOPIC_NAMES for r in train if r["source"] == GENERIC)
    assert all(r["topic"] == "" for r in out["inputs"] if r["source"] != GENERIC)


def test_generic_requests_are_deterministic_and_rotate_topics():
    cfg = SynthConfig(seed=2)
    a = generic_requests(FRENCH["prompt"], [], cfg, 0, 6)
    b = generic_requests(FRENCH["prompt"], [], cfg, 0, 6)
    assert [(r.messages, r.assistant_prefix, r.seed) for r in a] == [(r.messages, r.assistant_prefix, r.seed) for r in b]
    assert len({r.tag["topic"] for r in a}) == 6
    later = generic_requests(FRENCH["prompt"], ["How tall is Mont Blanc?"] * 3, cfg, 1, 2, first_call=6)
    assert {r.tag["topic"] for r in later}.isdisjoint({r.tag["topic"] for r in a})
    assert all("How tall is Mont Blanc?" in r.assistant_prefix for r in later)


def test_starters_are_not_the_evaluation_set():
    human = {normalise(h["text"]) for h in human_inputs()}
    assert not human & {normalise(s) for s in GENERIC_STARTERS}


def test_the_share_is_checked_and_rounded():
    assert SynthConfig(n_train_inputs=80, generic_share=0.25).generic_inputs == 20
    assert SynthConfig(n_train_inputs=16, generic_share=0.25).generic_inputs == 4
    with pytest.raises(ConfigError, match=r"field 'synth.generic_share': Input should be less than 1"):
        GenpiConfig().with_overrides({"synth.generic_share": 1.0})


def test_off_by_default_and_absent_from_the_default_fingerprint():
    assert SynthConfig().generic_inputs == 0
    assert "generic_share" not in GenpiConfig().stage_dict("synth")
    assert GenpiConfig().with_overrides({"synth.generic_share": 0.25}).stage_dict("synth")["generic_share"] == 0.25


def test_generic_inputs_end_to_end_on_the_tiny_model_with_scripted_input_lists(tiny_model_dir, tmp_path):
    """Through synthesis, its stored rows and the training examples: the generic inputs get
    teacher replies like the others and train."""
    from conftest import TINY_OVERRIDES

    from genpi.config import load_config
    from genpi.engines.hf import HFEngine
    from genpi.manifest import PromptEntry
    from genpi.models import load_model
    from genpi.store import Store
    from genpi.synth.pipeline import load_synth, synthesize
    from genpi.train.loop import build_examples

    cfg = load_config(None, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "synth.n_train_inputs=8",
                             "synth.n_heldout_inputs=2", "synth.generic_share=0.5"])
    model, tok, _ = load_model(cfg.model)
    store = Store(tmp_path / "store")
    entry = PromptEntry(id="sentiment", prompt=SENTIMENT, seed_inputs=["The lid broke on day one."])
    pdir = store.prompt_dir(entry.id, "fp")
    summary = synthesize(ListEngine(HFEngine(model, tok, 4)), entry, cfg, store, pdir)
    assert summary["inputs"]["generic"] == {"wanted": 4, "train": 4}
    synth = load_synth(store, pdir)
    generic = {r["input"] for r in synth["inputs"] if r["source"] == GENERIC}
    assert len(generic) == 4 and all(r["split"] == "train" for r in synth["inputs"] if r["input"] in generic)
    assert generic <= {r["input"] for r in synth["to_be"]}, "every generic input has the prompted model's reply"
    ts = build_examples(tok, synth, SENTIMENT, cfg.train)
    assert generic <= set(ts.inputs)
