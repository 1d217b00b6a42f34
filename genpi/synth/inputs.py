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
from collections import Counter

from genpi.config import SynthConfig
from genpi.engines.base import ChatRequest

_ITEM = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*•])\s*(.+?)\s*$")

ASK = (
    'An AI assistant follows these instructions:\n"""\n{prompt}\n"""\n'
    "List realistic, varied messages that users send to this assistant, one per line. "
    "Each message is what a user would actually type."
)


def input_requests(prompt: str, examples: list[str], cfg: SynthConfig, round_idx: int, n_calls: int) -> list[ChatRequest]:
    """One batch of list-continuation requests; each call shows a different few-shot sample."""
    reqs = []
    for call in range(n_calls):
        rnd = random.Random(cfg.seed * 100_003 + round_idx * 1_009 + call)
        shown = rnd.sample(examples, min(3, len(examples))) if examples else []
        prefix = "".join(f"{k + 1}. {x}\n" for k, x in enumerate(shown)) + f"{len(shown) + 1}."
        reqs.append(
            ChatRequest(
                messages=[{"role": "user", "content": ASK.format(prompt=prompt)}],
                assistant_prefix=prefix,
                max_new_tokens=cfg.input_max_new_tokens,
                temperature=cfg.input_temperature,
                top_p=cfg.input_top_p,
                seed=cfg.seed * 7919 + round_idx * 131 + call,
                tag={"first_item": len(shown) + 1},
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


def normalise(s: str) -> str:
    return re.sub(r"[^\w]+", " ", s.lower()).strip()


def degenerate_reason(s: str, cfg: SynthConfig) -> str | None:
    """Why an input is unusable, or None."""
    if len(s) < cfg.min_input_chars:
        return "too_short"
    if len(s) > cfg.max_input_chars:
        return "too_long"
    letters = sum(ch.isalpha() for ch in s)
    if letters < 0.5 * len(s):
        return "not_text"
    words = normalise(s).split()
    if len(words) < 3:
        return "too_few_words"
    top = Counter(words).most_common(1)[0][1]
    if len(words) >= 6 and top / len(words) > 0.4:
        return "repetitive"
    if any(tok in s for tok in ("<|", "|>", "[END")):
        return "special_tokens"
    return None


def shingles(key: str) -> set[str]:
    """Words and word pairs of a normalised input: pairs tell "reset my password" from
    "my password reset failed" better than bags of words, words catch reordered copies."""
    words = key.split()
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


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
        for s in seeds:
            self.add(s, "seed")

    def add(self, text: str, source: str) -> bool:
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
        return True

    def texts(self) -> list[str]:
        return [t for t, _ in self.items]


def split_inputs(pool: InputPool, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out inputs come from generated ones (seeds are examples, kept for training);
    the two sets are disjoint by normalised text because the pool is de-duplicated."""
    generated = [(t, s) for t, s in pool.items if s != "seed"]
    seeds = [(t, s) for t, s in pool.items if s == "seed"]
    rnd = random.Random(seed)
    rnd.shuffle(generated)
    if len(generated) < n_heldout:
        # Too few generated inputs: hold out some seeds too rather than evaluate on nothing.
        extra = seeds[: n_heldout - len(generated)]
        seeds = seeds[len(extra) :]
        generated = generated + extra
    held = generated[:n_heldout]
    train = (seeds + generated[n_heldout:])[:n_train]
    return (
        [{"input": t, "source": s, "split": "train"} for t, s in train],
        [{"input": t, "source": s, "split": "heldout"} for t, s in held],
    )
