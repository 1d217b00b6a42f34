"""The sections of a long prompt (its rules, demonstrations, tools), for synth.section_inputs.

Inputs generated from a long prompt as a whole tend to exercise its opening lines and its most
obvious task; a rule halfway down or the fifth demonstration rarely gets an input that needs
it. So a prompt over LONG_PROMPT_TOKENS is split into sections and some input-generation calls
ask for messages that make the assistant apply one particular section (genpi.synth.inputs).

Splitting is by layout, the way people write long prompts: markdown headings, XML-style
opening tags, "Example 3" / "Tools:" lines, blank-line separated blocks (never inside a ```
fence). Blocks too small to matter join a neighbour, sections too long are cut at blank
lines, and at most `max_sections` remain (the smallest neighbouring pair is merged first, so
every part of the prompt stays in some section).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# A prompt is long above this many tokens: shorter ones fit in one look and are not split.
LONG_PROMPT_TOKENS = 500
# Without a tokenizer, tokens are estimated from words at 0.75 English words per token (the
# usual figure for BPE tokenizers on English prose; code and symbols run higher), and each
# wide (CJK) character counts as a token of its own.
WORDS_PER_TOKEN = 0.75
# A section shorter than this (about 50 tokens: a heading and a sentence) joins a neighbour.
MIN_SECTION_WORDS = 40
# A section longer than this is cut at blank lines (a section is shown to the generator in full).
MAX_SECTION_WORDS = 350
# At most this much of a section is shown in a request (a longer one is cut at a line end).
SHOWN_CHARS = 2000

_HEADING = re.compile(
    r"^\s{0,3}(?:#{1,6}\s+\S"  # markdown heading
    r"|<[A-Za-z][\w-]{0,30}>\s*$"  # <tools>, <examples>
    r"|(?:example|demonstration|sample|tool|function|rule|instruction|step|guideline|output format)s?"
    r"\b[^\n.!?]{0,40}:?\s*$"  # "Example 3", "Tools:", "Rules"
    r"|[A-Z][\w ()/-]{0,30}:\s*$)",  # "Available functions:" (four words or so, then a colon)
    re.IGNORECASE,
)
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


@dataclass(frozen=True)
class Section:
    index: int
    title: str  # its first line, shortened: the label input rows carry
    text: str
    words: int

    @property
    def label(self) -> str:
        return f"{self.index}: {self.title}"

    def shown(self) -> str:
        if len(self.text) <= SHOWN_CHARS:
            return self.text
        cut = self.text.rfind("\n", 0, SHOWN_CHARS)
        return self.text[: cut if cut > SHOWN_CHARS // 2 else SHOWN_CHARS].rstrip() + "\n[...]"


def prompt_tokens(prompt: str, tokenizer=None) -> tuple[int, str]:
    """(tokens in the prompt, how they were counted: "tokenizer" or "words")."""
    if tokenizer is not None:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), "tokenizer"
    wide = sum(unicodedata.east_asian_width(ch) in "WF" for ch in prompt)
    return round(len(prompt.split()) / WORDS_PER_TOKEN) + wide, "words"


def _n_words(text: str) -> int:
    return len(text.split()) + sum(unicodedata.east_asian_width(ch) in "WF" for ch in text) // 2


def _blocks(prompt: str) -> list[str]:
    """Blank-line separated blocks; a ``` fence is never split."""
    blocks, cur, fenced = [], [], False
    for line in prompt.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            if cur:
                blocks.append("\n".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def _is_heading(block: str) -> bool:
    first = block.splitlines()[0]
    return bool(_HEADING.match(first)) and len(first) <= 80


def _heading_only(group: list[str]) -> bool:
    """A group that is nothing but a heading line ("# Demonstrations"): it introduces what follows."""
    return len(group) == 1 and len(group[0].splitlines()) == 1 and _is_heading(group[0])


def _size(group: list[str]) -> int:
    return sum(_n_words(b) for b in group)


def split_sections(prompt: str, max_sections: int) -> list[Section]:
    """At most `max_sections` sections covering the whole prompt in order; [] when the prompt
    has fewer than two parts worth telling apart."""
    groups: list[list[str]] = []
    for b in _blocks(prompt):
        if not groups or _is_heading(b):
            groups.append([b])
        else:
            groups[-1].append(b)
    # Too long: cut at blank lines into pieces of at most MAX_SECTION_WORDS (a single block
    # longer than that stays whole).
    cut: list[list[str]] = []
    for g in groups:
        piece: list[str] = []
        for b in g:
            if piece and _size(piece) + _n_words(b) > MAX_SECTION_WORDS:
                cut.append(piece)
                piece = []
            piece.append(b)
        cut.append(piece)
    groups = cut
    # Too small: a lone heading joins what follows; anything else joins what precedes it.
    i = 0
    while len(groups) > 1 and i < len(groups):
        if _size(groups[i]) >= MIN_SECTION_WORDS:
            i += 1
            continue
        if (_heading_only(groups[i]) and i + 1 < len(groups)) or i == 0:
            groups[i : i + 2] = [groups[i] + groups[i + 1]]
        else:
            groups[i - 1 : i + 1] = [groups[i - 1] + groups[i]]
            i -= 1
    while len(groups) > max(max_sections, 1):
        k = min(range(len(groups) - 1), key=lambda j: _size(groups[j]) + _size(groups[j + 1]))
        groups[k : k + 2] = [groups[k] + groups[k + 1]]
    if len(groups) < 2:
        return []
    out = []
    for idx, g in enumerate(groups):
        title = g[0].splitlines()[0].strip().lstrip("#").strip()
        if _heading_only(g[:1]) and len(g) > 1:  # "Demonstrations > Example 1"
            title += " > " + g[1].splitlines()[0].strip().lstrip("#").strip()
        title = title if len(title) <= 60 else title[:57].rstrip() + "..."
        out.append(Section(idx, title, "\n\n".join(g), _size(g)))
    return out


def prompt_sections(prompt: str, max_sections: int, n_tokens: int) -> list[Section]:
    """The sections inputs are generated for: none when off (max_sections 0) or for a prompt
    of at most LONG_PROMPT_TOKENS."""
    if max_sections <= 0 or n_tokens <= LONG_PROMPT_TOKENS:
        return []
    return split_sections(prompt, max_sections)
