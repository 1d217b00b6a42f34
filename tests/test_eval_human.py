"""Issue 16: evaluation on inputs the generator did not write (the shipped human-written set),
degenerate replies, and the plain-text perplexity check; real calls on the tiny random model."""
from __future__ import annotations

import math

import pytest
import torch

from genpi.data import human_inputs, plain_text
from genpi.eval.metrics import (DEGENERATE_MIN_WORDS, PERPLEXITY_FLAG_RATIO, agreement, is_degenerate,
                                repeated_share)

LOOP = "Plants, bonjour. " * 20


# ------------------------------------------------------------------------------------------
# The degenerate-reply definition, exactly.

def test_a_phrase_repeated_until_the_token_limit_is_degenerate():
    assert repeated_share(LOOP) == 1.0 and is_degenerate(LOOP)
    # The loop after some real text: 4 real words + 2 * 8 = 16 loop words of 20 -> 0.8.
    reply = "Bonjour ! Voici la recette. " + "Plants, bonjour. " * 8
    assert repeated_share(reply) == pytest.approx(16 / 20)
    assert is_degenerate(reply)
    # A repeated sentence (6-gram) and a repeated CJK bigram (characters are the units there).
    assert repeated_share("I like cats. I like dogs. " * 4) == 1.0
    assert is_degenerate("你好你好你好你好") and not is_degenerate("你好你好你好")  # 6 < 8 characters


def test_ordinary_replies_are_not_degenerate():
    text = ("The capital of Japan is Tokyo. It is a large city with many museums, parks and the best "
            "food in the world, and the trains run on time.")
    # The most covering n-gram with three copies is "the" (4 of 28 words).
    assert repeated_share(text) == pytest.approx(4 / 28) and not is_degenerate(text)
    assert repeated_share("a b c d e f g h") == 0.0  # nothing repeats three times
    assert repeated_share("") == 0.0 and not is_degenerate("")


def test_the_thresholds_at_their_edges():
    # Exactly half the words in three copies of a bigram: degenerate; one word fewer copied: not.
    half = "x y x y x y a b c d e f"
    assert repeated_share(half) == 0.5 and is_degenerate(half)
    assert repeated_share("x y x y a b c d e f g h") == 0.0  # two copies are not a loop
    under = "x y x y x y a b c d e f g"
    assert repeated_share(under) == pytest.approx(6 / 13) and not is_degenerate(under)
    # Too short to call a loop, whatever it repeats.
    assert not is_degenerate(" ".join(["no"] * (DEGENERATE_MIN_WORDS - 1)))
    assert is_degenerate(" ".join(["no"] * DEGENERATE_MIN_WORDS))
    # Copies are counted without overlap: "a a a a" holds two "a a", not three.
    assert repeated_share("a a a a b c d e") == 0.5


def test_agreement_compares_chinese_by_characters():
    # Before: each run of Chinese was one "word", so one different character scored 0.
    assert agreement("今天天气很好", "今天天气不好") == pytest.approx(5 / 6)
    assert agreement("the cat sat", "the cat sat on") == pytest.approx(2 * 1 * 0.75 / 1.75)


# ------------------------------------------------------------------------------------------
# The shipped data.

def test_the_human_written_set_is_varied_and_passes_the_input_filter():
    from genpi.config import SynthConfig
    from genpi.synth.inputs import degenerate_reason, words

    rows = human_inputs()
    assert len(rows) >= 40 and len({r["text"] for r in rows}) == len(rows)
    langs = {r["lang"] for r in rows}
    assert {"en", "fr", "es", "de", "zh", "ja"} <= langs
    lengths = [len(words(r["text"])) for r in rows]
    assert min(lengths) <= 4 and max(lengths) >= 40  # from a few words to a paragraph
    assert sum(r["text"].rstrip().endswith(("?", "？")) for r in rows) >= 15  # questions and requests
    assert [r["text"] for r in rows if degenerate_reason(r["text"], SynthConfig())] == []


def test_the_plain_text_is_a_few_pages_of_english():
    text = plain_text()
    assert 1000 <= len(text.split()) <= 3000 and sum(not c.isascii() for c in text) < 10


# ------------------------------------------------------------------------------------------
# The evaluation on the tiny random model.

@pytest.fixture
def tiny_peft(tiny_model_dir, tiny_config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genpi.train.loop import lora_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft_model = get_peft_model(model, lora_config(tiny_config.train), adapter_name="zero")  # B = 0: the base
    peft_model.add_adapter("random", lora_config(tiny_config.train))
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n and ".random." in n:
            torch.nn.init.normal_(p, std=0.5)
    return peft_model, tok


def _entry(tiny_seeds):
    from genpi.manifest import PromptEntry

    return PromptEntry(id="pirate", prompt="You are a pirate. Always say Arr.", seed_inputs=tiny_seeds,
                       checks=[{"type": "regex", "pattern": "a", "name": "has-a"}])


def test_every_adapter_is_evaluated_on_the_shipped_human_set(tiny_peft, tiny_config, tiny_seeds, single_thread_torch):
    from genpi.eval.run import HUMAN_MAX_INPUTS, default_human_inputs, evaluate_many

    peft_model, tok = tiny_peft
    by_text = {r["text"]: r["lang"] for r in human_inputs()}
    used = default_human_inputs()
    # Capped (eval time) but evenly spread over the file: every language group stays in.
    assert len(used) == min(HUMAN_MAX_INPUTS or len(by_text), len(by_text)) and set(used) <= set(by_text)
    assert {"en", "fr", "es", "de", "zh", "ja"} <= {by_text[x] for x in used}
    # The defaults (the tiny pipeline config cuts both for speed).
    cfg = tiny_config.with_overrides(["eval.human_max_inputs=20", "eval.plain_text_max_tokens=2048"])
    evs = evaluate_many(peft_model, tok, _entry(tiny_seeds), tiny_seeds[:2], ["zero", "random"], cfg)
    for name, ev in evs.items():
        h = ev.human
        assert h is not None and h.n_inputs == len(used) and ev.n_heldout == 2
        assert {s.input for s in h.samples} <= set(used) and len(h.samples) == 5
        assert any(by_text[s.input] != "en" for s in h.samples)
        assert set(h.checks) == set(ev.checks) == {"has-a"}
        # KL on the teacher's greedy replies to the human inputs: many more tokens than 2 held-out inputs.
        assert h.metrics.kl.tokens > ev.metrics.kl.tokens > 0 and h.metrics.kl.base > 0
        for m in (ev.metrics, h.metrics):
            for system in ("teacher", "base", "adapter"):
                rate = getattr(m.degenerate, system)
                assert 0.0 <= rate <= 1.0
        # The degenerate rate is the share of the stored replies that is_degenerate calls so (samples).
        assert all(isinstance(s.adapter, str) for s in h.samples)
    # A zero LoRA is the base: its KL and its replies are the base's, its perplexity ratio 1.
    zero = evs["zero"]
    assert zero.human.metrics.kl.adapter == pytest.approx(zero.human.metrics.kl.base, rel=1e-5)
    assert zero.human.metrics.degenerate.adapter == zero.human.metrics.degenerate.base
    assert [s.adapter for s in zero.human.samples] == [s.base for s in zero.human.samples]
    assert zero.plain_text.ratio == pytest.approx(1.0, abs=1e-6) and not zero.plain_text.flagged
    rnd = evs["random"]
    assert rnd.human.metrics.kl.adapter != pytest.approx(rnd.human.metrics.kl.base, rel=1e-3)
    assert rnd.plain_text.base == zero.plain_text.base and rnd.plain_text.ratio != pytest.approx(1.0, abs=1e-3)
    assert rnd.plain_text.flagged == (rnd.plain_text.ratio > PERPLEXITY_FLAG_RATIO)


def test_human_inputs_get_the_held_out_splits_scores_and_none_is_none(tiny_peft, tiny_config, tiny_seeds,
                                                                     single_thread_torch):
    """The same inputs as held-out split and as human set give the same scores (one code path);
    `human=[]` leaves the record's human part None."""
    from genpi.eval.run import evaluate

    peft_model, tok = tiny_peft
    xs = tiny_seeds[:3]
    ev = evaluate(peft_model, tok, _entry(tiny_seeds), xs, "random", tiny_config, human=xs)
    assert ev.human.n_inputs == 3
    human, held = ev.human.metrics.model_dump(), ev.metrics.model_dump()
    assert set(human) == set(held) == {"kl", "agreement", "degenerate"}
    for name in held:
        assert set(human[name]) == set(held[name])
        for k, v in held[name].items():  # a ratio is None where teacher and base agree: then in both
            assert human[name][k] == (None if v is None else pytest.approx(v, rel=1e-5)), (name, k)
    assert ev.human.checks == ev.checks and ev.human.samples == ev.samples[:3]
    assert evaluate(peft_model, tok, _entry(tiny_seeds), xs, "random", tiny_config, human=[]).human is None


def test_plain_text_perplexity_is_the_models_own_loss(tiny_peft):
    """Independently of genpi: exp of the mean next-token loss transformers computes per window."""
    from genpi.eval.run import PLAIN_TEXT_MAX_TOKENS, PLAIN_TEXT_WINDOW, plain_text_perplexity

    peft_model, tok = tiny_peft
    ids = tok(plain_text(), add_special_tokens=False)["input_ids"][:PLAIN_TEXT_MAX_TOKENS]
    windows = [ids[i : i + PLAIN_TEXT_WINDOW] for i in range(0, len(ids), PLAIN_TEXT_WINDOW)]

    def ppl():
        loss = 0.0
        with torch.no_grad():
            for w in windows:
                x = torch.tensor([w])
                loss += float(peft_model(input_ids=x, labels=x).loss) * (len(w) - 1)
        return math.exp(loss / sum(len(w) - 1 for w in windows))

    got = plain_text_perplexity(peft_model, tok, ["random"])["random"]
    with peft_model.disable_adapter():
        base = ppl()
    peft_model.set_adapter("random")
    assert got.tokens == sum(len(w) - 1 for w in windows) > 1000
    assert got.base == pytest.approx(base, rel=1e-4) and got.adapter == pytest.approx(ppl(), rel=1e-4)
    assert got.ratio == pytest.approx(got.adapter / got.base)


def test_human_set_and_plain_text_can_be_cut_for_large_runs(tiny_peft, tiny_config, tiny_seeds, single_thread_torch):
    """eval.human_max_inputs and eval.plain_text_max_tokens: most of an evaluation's cost on a
    small model; 0 leaves each out, a smaller number scores less. At their defaults they stay
    out of fingerprints, so stores made before the settings existed are not redone."""
    from genpi.eval.run import evaluate_many

    peft_model, tok = tiny_peft
    from genpi.config import load_config

    assert not {"human_max_inputs", "plain_text_max_tokens"} & set(load_config(None, []).stage_dict("eval"))
    off = tiny_config.with_overrides(["eval.human_max_inputs=0", "eval.plain_text_max_tokens=0"])
    assert off.stage_dict("eval")["human_max_inputs"] == 0  # a changed evaluation is a new fingerprint
    ev = evaluate_many(peft_model, tok, _entry(tiny_seeds), tiny_seeds[:2], ["random"], off)["random"]
    assert ev.human is None and ev.plain_text is None and ev.n_heldout == 2
    small = tiny_config.with_overrides(["eval.human_max_inputs=3", "eval.plain_text_max_tokens=600"])
    ev = evaluate_many(peft_model, tok, _entry(tiny_seeds), tiny_seeds[:2], ["random"], small)["random"]
    assert ev.human.n_inputs == 3 and 0 < ev.plain_text.tokens <= 600
