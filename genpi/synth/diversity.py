"""How varied a set of user inputs is, measured the same way on the human-written set.

Synthesized inputs stand in for real users' messages; a small generator's lists tend to be
short English questions on one subject, worded alike. These numbers (cheap: a sample of
SAMPLE texts, no model) put a prompt's inputs beside the shipped human-written messages
(genpi/data/human_inputs.jsonl) in its synth/summary.json:

- distinct_2: distinct word pairs / all word pairs (within each text) -- repeated phrasing
  lowers it;
- mean_jaccard: mean word-set Jaccard similarity over all pairs of texts -- near-paraphrases
  raise it;
- words_mean, words_stdev: lengths in words, and their spread (real messages range from
  three words to a paragraph);
- non_english: share of texts py3langid does not identify as English; languages: how many
  languages occur;
- topic_coverage: share of the everyday topics of genpi/data/topics.txt that some text's
  keywords touch (topics_covered: how many).

Words are genpi.synth.inputs' units (characters in scripts without spaces). Every measure
depends on how many texts there are (more texts, more topics, fewer distinct pairs), so both
sets are measured on a sample of the same size.
"""
from __future__ import annotations

import functools
import random
import statistics
from itertools import combinations
from typing import Sequence

from genpi.synth.inputs import tokens, words
from genpi.synth.topics import load_topics, topics_of

# Texts measured per set: about the human set's size, so the two are measured alike.
SAMPLE = 40


def _sample(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    texts = list(texts)
    return texts if len(texts) <= n else random.Random(seed).sample(texts, n)


def _language(text: str) -> str:
    from genpi.checks import detect_language  # py3langid: about a second to load, once

    return detect_language(text)[0]


def measures(texts: Sequence[str], sample: int = SAMPLE) -> dict:
    """The diversity numbers of `texts` (see the module docstring), rounded for reading."""
    shown = _sample([t for t in texts if t.strip()], sample)
    toks = [tokens(t) for t in shown]
    pairs = [p for ts in toks for p in zip(ts, ts[1:])]
    sets = [set(ts) for ts in toks]
    jac = [len(a & b) / len(a | b) for a, b in combinations(sets, 2) if a | b]
    lengths = [len(words(t)) for t in shown]
    langs = [_language(t) for t in shown]
    covered = set().union(*(topics_of(t) for t in shown)) if shown else set()
    n_topics = len(load_topics()[0])
    return {
        "n": len(texts),
        "measured": len(shown),
        "distinct_2": round(len(set(pairs)) / len(pairs), 3) if pairs else 0.0,
        "mean_jaccard": round(statistics.fmean(jac), 3) if jac else 0.0,
        "words_mean": round(statistics.fmean(lengths), 1) if lengths else 0.0,
        "words_stdev": round(statistics.pstdev(lengths), 1) if lengths else 0.0,
        "non_english": round(sum(lang != "en" for lang in langs) / len(langs), 3) if langs else 0.0,
        "languages": len(set(langs)),
        "topics_covered": len(covered),
        "topic_coverage": round(len(covered) / n_topics, 3) if n_topics else 0.0,
    }


@functools.lru_cache(maxsize=1)
def _human() -> dict:
    from genpi.data import human_inputs

    return measures([r["text"] for r in human_inputs()])


def human_measures() -> dict:
    """measures() of the shipped human-written messages (computed once per process)."""
    return dict(_human())


def versus_human(texts: Sequence[str]) -> dict:
    """{"inputs": measures(texts), "human": measures(human-written set)}: side by side."""
    return {"inputs": measures(texts), "human": human_measures()}
