"""The one generation interface every engine implements.

Requests are chat messages (the engine applies the model's own chat template), so
synthesis, evaluation and serving never build prompt strings by hand. A completion
carries the generated token ids (ending with the end-of-turn id when the model stopped
on it) and, when asked, the top-k log-probabilities at each generated position: exactly
what the trainer needs for the KL term, aligned token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k_logprobs: int = 0  # 0 = do not record
    adapter: str | None = None  # name of a loaded LoRA adapter; None = base model
    seed: int | None = None
    # Text the assistant's reply must start with (the engine continues it): lets a small
    # model continue a numbered list instead of obeying a meta-instruction it cannot follow.
    assistant_prefix: str | None = None
    tag: Any = None  # caller's bookkeeping, returned untouched


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn reached) or "length"
    prompt_tokens: int
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    tag: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    def generate(
        self, requests: list[ChatRequest], progress: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Completions in the order of `requests`; `progress(n)` is called as batches finish."""
        ...

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int: ...


def render_chat(tokenizer, messages: list[dict[str, str]], assistant_prefix: str | None = None) -> list[int]:
    """Token ids of a chat in the model's own template, ending where the reply starts (or
    continuing a pre-filled `assistant_prefix`). Every engine uses this, so all see the same tokens."""
    if assistant_prefix:
        msgs = [*messages, {"role": "assistant", "content": assistant_prefix}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
