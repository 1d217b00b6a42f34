"""Scores of teacher (base + prompt), base (no prompt) and adapter (no prompt).

Pure functions over replies and logits; the model-driving part is in genpi/eval/run.py.
"""
from __future__ import annotations

import re
from typing import Sequence


def internalization_ratio(s_adapter: float | None, s_base: float | None, s_teacher: float | None) -> float | None:
    """(S_adapter - S_base) / (S_teacher - S_base); None when the prompt changes nothing
    measurable (teacher == base), since any ratio would then be noise."""
    if None in (s_adapter, s_base, s_teacher):
        return None
    gap = s_teacher - s_base
    if abs(gap) < 1e-9:
        return None
    return (s_adapter - s_base) / gap


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            cur[j + 1] = prev[j] + 1 if x == y else max(prev[j + 1], cur[j])
        prev = cur
    return prev[-1]


def agreement(reply: str, reference: str) -> float:
    """ROUGE-L F1 over words between a reply and the teacher's greedy reply (1 = identical)."""
    a, b = _words(reply), _words(reference)
    if not a and not b:
        return 1.0
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def leak_score(reply: str, prompt: str) -> float:
    """Share of the prompt's words the reply reproduces in order (ROUGE-L recall of the prompt).

    Long prompts are compared on their first 400 words: enough to tell recitation apart
    from paraphrase, and it bounds the quadratic LCS."""
    p = _words(prompt)[:400]
    if not p:
        return 0.0
    return _lcs(_words(reply)[: 4 * len(p)], p) / len(p)


def mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
