"""The GenPI invariant in one leaf module: the teacher sees the prompt, the student never does.

Synthesis (teacher replies, role-play), training (the student's input), evaluation (teacher
vs base vs adapter) and serving (the tokens a client no longer sends) all build their
messages here, so they cannot drift apart.

The student side sends no system message at all, exactly as a client of the served
adapter does: if the model's chat template injects a default system prompt (SmolLM2's
does), that default is part of training, evaluation and serving alike.

Also the id rule: a prompt id becomes a directory name in the store and the `model` name
clients send, so one pattern guards both the manifest and every request.

This module imports nothing from genpi (and nothing heavy), so anything may import it.
"""
from __future__ import annotations

import re
from typing import Callable

# Used with fullmatch (`$` would accept a final "\n"); ".." is refused separately.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_id(value: object) -> bool:
    """True for a portable prompt id: safe as a path component and as an API model name."""
    return isinstance(value, str) and bool(ID_RE.fullmatch(value)) and ".." not in value


def teacher_messages(prompt: str, user_input: str) -> list[dict[str, str]]:
    """What the teacher (base model + prompt) sees: the prompt in the system slot."""
    return [{"role": "system", "content": prompt}, {"role": "user", "content": user_input}]


def student_messages(user_input: str) -> list[dict[str, str]]:
    """What the student (adapter, or the bare base) sees: the input alone, never the prompt."""
    return [{"role": "user", "content": user_input}]


def prompt_tokens_saved(count_tokens: Callable[[list[dict[str, str]]], int], prompt: str,
                        user_input: str = "x") -> int:
    """Input tokens a client no longer sends: the teacher's request minus the student's.

    `count_tokens` is an engine's `count_prompt_tokens` (the model's chat template, as every
    engine renders it), so serving reports what evaluation measures per held-out input.
    """
    return count_tokens(teacher_messages(prompt, user_input)) - count_tokens(student_messages(user_input))
