"""Long prompts (train.long_prompt_tokens or more) train with plan.LONG_PROMPT_SETTINGS: the
shipped defaults were chosen on short prompts, and shell_agent preferred other ones."""
from __future__ import annotations

import pytest

from genpi.config import load_config
from genpi.manifest import PromptEntry
from genpi.pipeline.plan import LONG_PROMPT_SETTINGS, ModelFacts, format_plan, plan, prompt_config, prompt_fingerprint
from genpi.store import Store

ENTRY = PromptEntry(id="agent", prompt="You are an agent.")


def _train(cfg, **kw):
    return cfg.train.model_copy(update=kw)


def test_a_long_prompt_takes_the_long_settings_and_a_short_one_does_not():
    cfg = load_config(None, [])
    long_cfg, taken = prompt_config(cfg, ENTRY, 1782)
    assert taken == tuple(LONG_PROMPT_SETTINGS) == ("train.lr", "train.epochs", "train.on_policy_epochs",
                                                    "train.on_policy_lr")
    assert long_cfg.train == _train(cfg, lr=2e-3, epochs=3, on_policy_epochs=8, on_policy_lr=1e-3)
    assert long_cfg.train != cfg.train  # the defaults differ from them, so the rule changes something
    short_cfg, taken = prompt_config(cfg, ENTRY, 999)
    assert taken == () and short_cfg == cfg
    assert prompt_config(cfg, ENTRY, 1000)[1]  # the threshold counts as long


def test_settings_the_user_set_win_over_the_long_prompt_ones():
    # on the command line (or in a config file): kept, even for a long prompt
    cfg = load_config(None, ["train.lr=1e-3"])
    pcfg, taken = prompt_config(cfg, ENTRY, 1782)
    assert taken == ("train.epochs", "train.on_policy_epochs", "train.on_policy_lr")
    assert pcfg.train == _train(cfg, lr=1e-3, epochs=3, on_policy_epochs=8, on_policy_lr=1e-3)
    # in the prompt's manifest entry: applied last, and not reported as a long-prompt setting
    entry = ENTRY.model_copy(update={"overrides": {"train.on_policy_epochs": 3}})
    pcfg, taken = prompt_config(load_config(None, []), entry, 1782)
    assert taken == ("train.lr", "train.epochs", "train.on_policy_lr")
    assert pcfg.train.on_policy_epochs == 3 and pcfg.train.lr == 2e-3
    # train.long_prompt_tokens=0 turns the rule off; a higher threshold moves it
    assert prompt_config(load_config(None, ["train.long_prompt_tokens=0"]), ENTRY, 10**6)[1] == ()
    assert prompt_config(load_config(None, ["train.long_prompt_tokens=2000"]), ENTRY, 1782)[1] == ()


def test_the_threshold_enters_fingerprints_only_through_the_settings_it_changes():
    """Stores made before the rule keep their short prompts' fingerprints; a long prompt's
    fingerprint follows what it trains with."""
    on, off = load_config(None, []), load_config(None, ["train.long_prompt_tokens=0"])
    assert prompt_fingerprint(ENTRY, prompt_config(on, ENTRY, 50)[0], "model", "tok") == \
        prompt_fingerprint(ENTRY, prompt_config(off, ENTRY, 50)[0], "model", "tok")
    assert prompt_fingerprint(ENTRY, prompt_config(on, ENTRY, 1782)[0], "model", "tok") != \
        prompt_fingerprint(ENTRY, prompt_config(off, ENTRY, 1782)[0], "model", "tok")
    assert "long_prompt_tokens" not in on.stage_dict("train")


class _WordTokenizer:
    """One token per word: the plan only counts a prompt's tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize("n_plans", [2, 30])  # one line per prompt, and the long plan's odd ones out
def test_the_plan_gives_long_prompts_their_settings_and_says_so(tmp_path, n_plans, monkeypatch):
    import genpi.pipeline.plan as plan_mod

    monkeypatch.setattr(plan_mod, "tokenizer_identity", lambda tok: "words")
    long = PromptEntry(id="long", prompt="word " * 1200)
    shorts = [PromptEntry(id=f"short{i}", prompt="Answer in French.") for i in range(n_plans - 2)]
    shorts.append(PromptEntry(id="own", prompt="Answer in Spanish.", overrides={"train.epochs": 4}))
    cfg = load_config(None, [])
    plans = plan([long, *shorts], cfg, Store(tmp_path), ModelFacts("model", "/m", _WordTokenizer(), 8192))
    by_id = {p.id: p for p in plans}
    assert by_id["long"].cfg.train.lr == 2e-3 and by_id["long"].long_settings == tuple(LONG_PROMPT_SETTINGS)
    assert all(by_id[e.id].cfg == cfg and not by_id[e.id].long_settings for e in shorts[:-1])
    assert by_id["own"].cfg.train == _train(cfg, epochs=4) and not by_id["own"].long_settings
    text = format_plan(plans)
    [line] = [ln for ln in text.splitlines() if ln.lstrip().startswith("long ")]
    assert "long prompt: train.lr=0.002, train.epochs=3, train.on_policy_epochs=8, train.on_policy_lr=0.001" in line
    assert "long prompt" not in text.replace(line, "")
    # a prompt's own manifest overrides are marked too, in a short plan as in a long one
    [own] = [ln for ln in text.splitlines() if ln.lstrip().startswith("own ")]
    assert own.endswith("[own settings: train.epochs]")
