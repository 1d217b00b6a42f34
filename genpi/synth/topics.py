"""Seed topics and writing styles for pseudo inputs (synth.seed_topics), from genpi/data/topics.txt.

A small generator asked for "realistic, varied messages" keeps writing the same few: short
English questions on the prompt's most obvious subject. Self-study data generators seed each
call with a topic instead; here every input-generation call names one everyday topic and one
way of writing ("... about gardening, written in French"), drawn per prompt from a shipped list,
so the inputs spread over subjects, lengths, tones and languages as real users' do. The same
list's keywords measure how many subjects a set of inputs covers (genpi.synth.diversity).
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True)
class Topic:
    name: str
    keywords: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def load_topics() -> tuple[tuple[Topic, ...], tuple[str, ...]]:
    """(topics, styles) of genpi/data/topics.txt, in file order."""
    text = files("genpi.data").joinpath("topics.txt").read_text(encoding="utf-8")
    topics, styles, in_styles = [], [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "[styles]":
            in_styles = True
        elif in_styles:
            styles.append(line)
        else:
            name, _, kws = line.partition("|")
            topics.append(Topic(name.strip(), tuple(k.strip().lower() for k in kws.split(",") if k.strip())))
    return tuple(topics), tuple(styles)


def prompt_rng(prompt: str, seed: int, purpose: str) -> random.Random:
    """A generator seeded by the config's seed and the prompt's text (hashed, not Python's
    salted hash()), so the same config and prompt draw the same topics in every process."""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
    return random.Random(f"{purpose}:{seed}:{digest}")


@dataclass(frozen=True)
class TopicPlan:
    """The topics drawn for one prompt, and the order its calls go through the styles."""
    topics: tuple[str, ...]
    styles: tuple[str, ...]

    def topic(self, k: int) -> str:
        return self.topics[k % len(self.topics)]

    def style(self, k: int) -> str:
        # Shifted by one style each time the topics come round again, so a topic does not
        # always come with the same style when len(topics) is a multiple of len(styles).
        return self.styles[(k + k // len(self.topics)) % len(self.styles)]


def topic_plan(prompt: str, seed: int, n_topics: int) -> TopicPlan | None:
    """n_topics distinct topics and a permutation of the styles for this prompt; None when off."""
    if n_topics <= 0:
        return None
    topics, styles = load_topics()
    rnd = prompt_rng(prompt, seed, "topics")
    chosen = rnd.sample([t.name for t in topics], min(n_topics, len(topics)))
    return TopicPlan(tuple(chosen), tuple(rnd.sample(list(styles), len(styles))))


def _keyword_pattern(kw: str) -> re.Pattern:
    body = re.escape(kw[:-1]) + r"\w*" if kw.endswith("*") else re.escape(kw)
    return re.compile(rf"(?<!\w){body}(?!\w)")


@functools.lru_cache(maxsize=1)
def _topic_patterns() -> tuple[tuple[str, re.Pattern], ...]:
    topics, _ = load_topics()
    return tuple((t.name, re.compile("|".join(_keyword_pattern(k).pattern for k in t.keywords)))
                 for t in topics if t.keywords)


def topics_of(text: str) -> set[str]:
    """The topics of topics.txt whose keywords occur in `text` (lower-cased)."""
    low = text.lower()
    return {name for name, pat in _topic_patterns() if pat.search(low)}
