"""Pseudo user inputs generated from the prompt alone (no per-prompt code).

Small instruct models do not follow "write N messages" meta-instructions reliably, but
they continue a numbered list well. So each request shows the prompt, asks for user
messages, and pre-fills the reply with a numbered list of a few example inputs (seed
inputs from the manifest, else inputs generated in earlier rounds); the model writes
the next items. Parsing is line-based and forgiving; cleaning removes duplicates,
degenerate lines and anything outside the length limits, and counts why.
"""
from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter
from typing import Sequence

from genpi.config import SynthConfig
from genpi.engines.base import ChatRequest
from genpi.synth.sections import Section
from genpi.synth.topics import TopicPlan, topic_plan

# The section of inputs generated for the whole prompt (and of seeds), in input rows.
WHOLE = "whole"
_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s*(.+?)\s*$")

ASK = (
    'An AI assistant follows these instructions:\n"""\n{prompt}\n"""\n'
    "List realistic, varied messages that users send to this assistant, one per line. "
    "Each message is what a user would actually type."
)


# Steering added to ASK (synth.seed_topics, synth.section_inputs); with both off ASK is sent as is.
TOPIC_ASK = ("\nThis time, list messages about {topic} (as far as users of this assistant would bring it up)."
             "\nStyle of the messages: {style}.")
SECTION_ASK = ("\nThis time, list messages that would make the assistant apply this part of its instructions:"
               '\n"""\n{section}\n"""')
STYLE_ASK = "\nStyle of the messages: {style}."

# Generic inputs (synth.generic_share): messages to any assistant, the prompt not shown. Their
# source in the input rows; the request; the topics drawn when synth.seed_topics is off.
GENERIC = "generic"
GENERIC_ASK = ("List realistic, varied messages that people send to an AI assistant, one per line. "
               "Each message is what a user would actually type.")
GENERIC_TOPIC_ASK = "\nThis time, list messages about {topic}.\nStyle of the messages: {style}."
GENERIC_TOPICS = 16
# The list the first generic calls continue, before any generic input exists (written for it:
# none is in genpi/data/human_inputs.jsonl, the evaluation's set).
GENERIC_STARTERS = (
    "What can I cook tonight with rice, spinach and two eggs?",
    "can you check my grammar: me and him goes to the gym every monday",
    "Explain how a mortgage works in simple terms.",
    "Give me three ideas for a rainy Sunday with kids.",
    "Quelle est la meilleure façon d'apprendre à nager à 40 ans ?",
    "My laptop fan got very loud after the last update, what can I do?",
)


def _focus(call: int, topics: TopicPlan | None, sections: Sequence[Section]) -> tuple[str, dict]:
    """What call number `call` (counted over all rounds of a prompt) asks for beyond ASK, and
    its tag: with sections, even calls are for the whole prompt and odd ones for each section
    in turn (half the budget each); whole-prompt calls go through the topics in turn."""
    if sections and call % 2:
        sec = sections[(call // 2) % len(sections)]
        ask = SECTION_ASK.format(section=sec.shown())
        return ask + (STYLE_ASK.format(style=topics.style(call)) if topics else ""), {"section": sec.label}
    k = call // 2 if sections else call
    tag = {"section": WHOLE} if sections else {}
    if topics is None:
        return "", tag
    return TOPIC_ASK.format(topic=topics.topic(k), style=topics.style(call)), {**tag, "topic": topics.topic(k)}


def input_requests(prompt: str, examples: list[str], cfg: SynthConfig, round_idx: int, n_calls: int,
                   first_call: int = 0, sections: Sequence[Section] = ()) -> list[ChatRequest]:
    """One batch of list-continuation requests; each call shows a different few-shot sample.
    `first_call`: calls this prompt made in earlier rounds (topics and sections rotate over
    all of them); `sections`: the prompt's sections (genpi.synth.sections), or none."""
    topics = topic_plan(prompt, cfg.seed, cfg.seed_topics)
    reqs = []
    for call in range(n_calls):
        rnd = random.Random(cfg.seed * 100_003 + round_idx * 1_009 + call)
        shown = rnd.sample(examples, min(3, len(examples))) if examples else []
        prefix = "".join(f"{k + 1}. {x}\n" for k, x in enumerate(shown)) + f"{len(shown) + 1}."
        extra, tag = _focus(first_call + call, topics, sections)
        reqs.append(
            ChatRequest(
                messages=[{"role": "user", "content": ASK.format(prompt=prompt) + extra}],
                assistant_prefix=prefix,
                max_new_tokens=cfg.input_max_new_tokens,
                temperature=cfg.input_temperature,
                top_p=cfg.input_top_p,
                seed=cfg.seed * 7919 + round_idx * 131 + call,
                tag={"first_item": len(shown) + 1, **tag},
            )
        )
    return reqs


def generic_requests(prompt: str, examples: list[str], cfg: SynthConfig, round_idx: int, n_calls: int,
                     first_call: int = 0) -> list[ChatRequest]:
    """List-continuation requests for generic inputs: the prompt is not shown (it only seeds
    the topic draw); each call names a topic and a style and continues a few earlier generic
    inputs (GENERIC_STARTERS before there are any). `first_call`: generic calls made in earlier
    rounds."""
    topics = topic_plan(prompt, cfg.seed, cfg.seed_topics or GENERIC_TOPICS)
    pool = examples or list(GENERIC_STARTERS)
    reqs = []
    for call in range(first_call, first_call + n_calls):
        rnd = random.Random(cfg.seed * 100_003 + round_idx * 1_009 + call + 500_009)
        shown = rnd.sample(pool, min(3, len(pool)))
        prefix = "".join(f"{k + 1}. {x}\n" for k, x in enumerate(shown)) + f"{len(shown) + 1}."
        topic = topics.topic(call)
        reqs.append(
            ChatRequest(
                messages=[{"role": "user", "content": GENERIC_ASK + GENERIC_TOPIC_ASK.format(
                    topic=topic, style=topics.style(call))}],
                assistant_prefix=prefix,
                max_new_tokens=cfg.input_max_new_tokens,
                temperature=cfg.input_temperature,
                top_p=cfg.input_top_p,
                seed=cfg.seed * 7919 + round_idx * 131 + call + 500_009,
                tag={"first_item": len(shown) + 1, "topic": topic, GENERIC: True},
            )
        )
    return reqs


def parse_items(text: str, first_is_item: bool = True) -> list[str]:
    """Items of a numbered or bulleted list; the first line continues the pre-filled '4.'."""
    items = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            # A blank line usually ends the list; whatever follows is commentary.
            if items:
                break
            continue
        m = _ITEM.match(line)
        if m:
            items.append(m.group(1))
        elif i == 0 and first_is_item:
            items.append(line.strip())
        elif items:
            break  # prose after the list
    return [_strip_quotes(x) for x in items]


def _strip_quotes(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] in "\"'“" and s[-1] in "\"'”":
        s = s[1:-1].strip()
    return s


def _is_mark(ch: str) -> bool:
    """A combining mark (Thai and Devanagari vowel signs, tone marks, decomposed accents): part
    of the letter before it. `\\w` does not match marks, so splitting on non-word characters
    alone cut Thai words apart at every vowel sign."""
    return unicodedata.category(ch).startswith("M")


def normalise(s: str) -> str:
    """Lower case, everything but letters, digits, "_" and combining marks turned into single
    spaces (for text without marks exactly the old `[^\\w]+` -> " " rule)."""
    kept = "".join(ch if ch.isalnum() or ch == "_" or _is_mark(ch) else " " for ch in s.lower())
    return " ".join(kept.split())


# Scripts that do not put spaces between words, with the characters per word assumed when
# counting them (the standard library has no word segmenter and genpi takes no dependency for
# one): Chinese words average under two characters and Japanese ones about two, so two
# characters count as a word; a Thai, Lao, Khmer or Myanmar word averages three to four letters
# (a letter with its combining marks), so three count as one. Korean separates words by spaces.
_CJK = re.compile("[\u3005\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                  "\uff66-\uff9f\U00020000-\U0002fa1f]")
_SEA = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")
UNITS_PER_WORD = {"cjk": 2, "sea": 3}


def _units(text: str) -> list[list[tuple[str, str]]]:
    """Per space-separated word of the normalised text, its units with their script kind: a run
    of other scripts is one unit ("other"); in scripts without spaces each character (with its
    combining marks) is one ("cjk", "sea")."""
    out = []
    for word in normalise(text).split():
        units: list[tuple[str, str]] = []
        for ch in word:
            kind = "cjk" if _CJK.match(ch) else "sea" if _SEA.match(ch) else "other"
            if units and (_is_mark(ch) or kind == units[-1][1] == "other"):
                units[-1] = (units[-1][0] + ch, units[-1][1])  # a mark joins its letter
            else:
                units.append((ch, kind))
        out.append(units)
    return out


def tokens(text: str) -> list[str]:
    """Words of spaced scripts and single characters of scripts without spaces: the units for
    comparing texts (near-duplicate shingles, ROUGE-L, repeated n-grams), as Chinese and
    Japanese ROUGE are computed on characters. For space-separated text: normalise(text).split()."""
    return [u for units in _units(text) for u, _ in units]


def words(text: str) -> list[str]:
    """Words as the input filter counts them: spaced words as they are, runs of a script without
    spaces cut into pseudo-words of UNITS_PER_WORD characters. For space-separated text:
    normalise(text).split()."""
    out: list[str] = []
    for units in _units(text):
        run: list[str] = []
        for i, (unit, kind) in enumerate(units):
            run.append(unit)
            nxt = units[i + 1][1] if i + 1 < len(units) else None
            if nxt != kind or len(run) == UNITS_PER_WORD.get(kind, 1):
                out.append("".join(run))
                run = []
    return out


def display_width(s: str) -> int:
    """Length in columns: wide (CJK) characters count two, as each carries about as much as two
    or three Latin letters, so the length limits mean the same in every script."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def degenerate_reason(s: str, cfg: SynthConfig) -> str | None:
    """Why an input is unusable, or None."""
    width = display_width(s)
    if width < cfg.min_input_chars:
        return "too_short"
    if width > cfg.max_input_chars:
        return "too_long"
    letters = sum(ch.isalpha() or _is_mark(ch) for ch in s)
    if letters < 0.5 * len(s):
        return "not_text"
    words_ = words(s)
    if len(words_) < 3:
        return "too_few_words"
    top = Counter(words_).most_common(1)[0][1]
    if len(words_) >= 6 and top / len(words_) > 0.4:
        return "repetitive"
    if any(tok in s for tok in ("<|", "|>", "[END")):
        return "special_tokens"
    return None


def shingles(key: str) -> set[str]:
    """Words and word pairs of a normalised input: pairs tell "reset my password" from
    "my password reset failed" better than bags of words, words catch reordered copies.
    In scripts without spaces the units are characters (character bigrams, as usual for CJK)."""
    units = tokens(key)
    return set(units) | {f"{a} {b}" for a, b in zip(units, units[1:])}


def _near_duplicate(a: set[str], b: set[str], threshold: float) -> bool:
    if not a or not b:
        return False
    return len(a & b) / len(a | b) >= threshold


class InputPool:
    """Accumulates cleaned, de-duplicated inputs and the reasons others were dropped."""

    def __init__(self, cfg: SynthConfig, seeds: list[str]):
        self.cfg = cfg
        self.items: list[tuple[str, str]] = []  # (text, source)
        self._keys: set[str] = set()
        self._shingles: list[set[str]] = []
        self.dropped: Counter[str] = Counter()
        # text -> what it was generated for ({"section": ..., "topic": ...}), when steered.
        self.meta: dict[str, dict[str, str]] = {}
        for s in seeds:
            self.add(s, "seed")

    def add(self, text: str, source: str, meta: dict[str, str] | None = None) -> bool:
        reason = degenerate_reason(text, self.cfg)
        key = normalise(text)
        if reason is None and key in self._keys:
            reason = "duplicate"
        words = shingles(key)
        if reason is None and any(_near_duplicate(words, other, self.cfg.near_dup_threshold)
                                  for other in self._shingles):
            reason = "near_duplicate"
        if reason is not None:
            self.dropped[reason] += 1
            return False
        self._keys.add(key)
        self._shingles.append(words)
        self.items.append((text, source))
        if meta:
            self.meta[text] = meta
        return True

    def texts(self, generic: bool = False) -> list[str]:
        """The prompt's own inputs (seeds and generated), or the generic ones."""
        return [t for t, s in self.items if (s == GENERIC) == generic]

    def count(self, generic: bool = False) -> int:
        return len(self.texts(generic))


def split_inputs(pool: InputPool, n_train: int, n_heldout: int, seed: int,
                 n_generic: int = 0) -> tuple[list[dict], list[dict]]:
    """Held-out inputs come from generated ones (seeds are examples, kept for training);
    the two sets are disjoint by normalised text because the pool is de-duplicated. Up to
    n_generic generic inputs take training places; they are never held out."""
    generic = [(t, s) for t, s in pool.items if s == GENERIC][:n_generic]
    generated = [(t, s) for t, s in pool.items if s not in ("seed", GENERIC)]
    seeds = [(t, s) for t, s in pool.items if s == "seed"]
    rnd = random.Random(seed)
    rnd.shuffle(generated)
    if len(generated) < n_heldout:
        # Too few generated inputs: hold out some seeds too rather than evaluate on nothing.
        extra = seeds[: n_heldout - len(generated)]
        seeds = seeds[len(extra) :]
        generated = generated + extra
    held = generated[:n_heldout]
    train = (seeds + generated[n_heldout:])[: n_train - len(generic)] + generic
    # Steered generation adds a column per tag (the same ones in every row, as Parquet needs);
    # unsteered rows are exactly as before.
    keys = sorted({k for m in pool.meta.values() for k in m})

    def row(t: str, s: str, split: str) -> dict:
        m = pool.meta.get(t, {})
        return {"input": t, "source": s, "split": split, **{k: m.get(k, _META_DEFAULT.get(k, "")) for k in keys}}

    return [row(t, s, "train") for t, s in train], [row(t, s, "heldout") for t, s in held]


# What a seed (or an input made before a tag existed) is marked with.
_META_DEFAULT = {"section": WHOLE, "topic": ""}
