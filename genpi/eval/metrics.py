"""Scores of teacher (base + prompt), base (no prompt) and adapter (no prompt).

Pure functions over replies and logits; the model-driving part is in genpi/eval/run.py.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from genpi.synth.inputs import tokens

# An adapter that raises the perplexity of plain text (where its prompt does not apply) by more
# than this factor over the base is flagged in the reports (issue 16: "do no harm", 10%).
PERPLEXITY_FLAG_RATIO = 1.10


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
    """Lower-cased words; characters in scripts without spaces (Chinese, Japanese, Thai), as
    ROUGE is computed on characters there (whole runs of Chinese would be one "word").
    For space-separated text this is re.findall(r"\\w+", text.lower())."""
    return tokens(text)


# A degenerate reply: one n-gram, repeated, fills at least half of it, e.g. "Plants, bonjour.
# Plants, bonjour. ..." until the token limit. Precisely: among the reply's words (_words:
# punctuation and case ignored, characters in scripts without spaces), take any n-gram with
# n <= DEGENERATE_MAX_N; its non-overlapping occurrences, if there are at least
# DEGENERATE_MIN_REPEATS, cover count * n words; the reply is degenerate when the largest such
# cover is >= DEGENERATE_SHARE of its words and it has at least DEGENERATE_MIN_WORDS words.
# Why these numbers: a small model's loops repeat a word, a phrase or a whole sentence (12 words
# covers a short sentence); three copies tell a loop from a phrase said twice on purpose; half
# the reply is "fills most of it" with margin, since a reply cut at the token limit usually
# starts with some real text before the loop; in ordinary prose the most frequent word ("the")
# covers well under 10%; below 8 words ("no no no") there is too little to call it a loop.
DEGENERATE_MAX_N = 12
DEGENERATE_MIN_REPEATS = 3
DEGENERATE_SHARE = 0.5
DEGENERATE_MIN_WORDS = 8


def _non_overlapping(ws: list[str], gram: tuple[str, ...]) -> int:
    n, i, count = len(gram), 0, 0
    while i + n <= len(ws):
        if tuple(ws[i : i + n]) == gram:
            count, i = count + 1, i + n
        else:
            i += 1
    return count


def repeated_share(reply: str) -> float:
    """The largest share of the reply's words covered by the non-overlapping copies of one
    n-gram (n <= DEGENERATE_MAX_N, at least DEGENERATE_MIN_REPEATS copies); 0 when none."""
    ws = _words(reply)
    best = 0.0
    for n in range(1, min(DEGENERATE_MAX_N, len(ws) // DEGENERATE_MIN_REPEATS) + 1):
        grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
        for gram, overlapping in grams.most_common():
            if overlapping < DEGENERATE_MIN_REPEATS or overlapping * n / len(ws) <= best:
                break  # most_common order: no later n-gram can cover more
            count = _non_overlapping(ws, gram)
            if count >= DEGENERATE_MIN_REPEATS:
                best = max(best, count * n / len(ws))
    return best


def is_degenerate(reply: str) -> bool:
    """Whether a repeated n-gram fills the reply (see the definition above)."""
    return len(_words(reply)) >= DEGENERATE_MIN_WORDS and repeated_share(reply) >= DEGENERATE_SHARE


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
