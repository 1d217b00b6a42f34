"""Turn conversations into training tensors with the model's real chat template.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant",
"content": str}``. An assistant message may also carry what the engine actually
generated, so that training sees exactly the teacher's tokens:

* ``token_ids``: list[int], the generated ids, including the final end-of-turn
  (or eos) id when generation stopped on it;
* ``topk_ids`` / ``topk_logprobs``: list[list[int]] / list[list[float]], one row
  per generated token (same length as ``token_ids``): the teacher's top-k for
  that token. Rows may differ in length (vLLM returns k or k + 1 entries).

The encoded sequence is the concatenation of separately tokenised pieces of the
rendered template: the text before each assistant reply (unlabelled), the reply
tokens + the end-of-turn token (labelled), and the template's text after the
end-of-turn (e.g. "\\n", unlabelled). Rendering goes through
``tokenizer.apply_chat_template``, so whatever the template does -- including
injecting a default system prompt, as SmolLM2's does -- is kept.

Everything per position is aligned with ``input_ids`` (see genpi.train.losses):
``labels[t]`` / ``kl_*[t]`` describe the token at t.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from genpi.train.losses import IGNORE_INDEX

TrainOn = Literal["assistant", "last_assistant"]
_ROLES = ("system", "user", "assistant")


class ExampleTooLong(ValueError):
    """The encoded example has more tokens than allowed. Never truncated: the caller drops or reports it."""

    def __init__(self, n_tokens: int, max_length: int) -> None:
        self.n_tokens = n_tokens
        self.max_length = max_length
        super().__init__(
            f"example is {n_tokens} tokens long, over max_length={max_length} "
            f"(by {n_tokens - max_length}); it is not truncated -- drop it or raise max_length"
        )


class ChatTemplateError(ValueError):
    """The chat template renders conversations in a way that cannot be split into turns."""


@dataclass
class EncodedExample:
    """One tokenised conversation.

    ``kl_ids`` / ``kl_logprobs`` are None when no trained turn carries teacher
    top-k; otherwise they have one row per position, empty where ``kl_mask`` is
    False. Use :func:`collate` to turn them into padded tensors.
    """

    input_ids: list[int]
    labels: list[int]
    kl_mask: list[bool]
    kl_ids: list[list[int]] | None
    kl_logprobs: list[list[float]] | None
    n_target_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # Special tokens come from the rendered text itself (the template writes them).
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def end_of_turn_token(tokenizer: Any) -> tuple[int, str]:
    """The id and text the chat template puts right after an assistant reply.

    Found by rendering a one-turn conversation, not guessed from ``eos_token``:
    this is the token that ends an assistant turn in training, so it must also be
    a stop token in synthesis and serving (for SmolLM2: ``<|im_end|>``).
    """
    sentinel = "GENPI-END-OF-TURN-PROBE"
    text = _render(
        tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], False
    )
    if sentinel not in text:
        raise ChatTemplateError("the chat template does not render the assistant content")
    ids = _tokenize(tokenizer, text[text.index(sentinel) + len(sentinel) :])
    if not ids:
        raise ChatTemplateError("the chat template writes nothing after an assistant reply (no end-of-turn token)")
    return ids[0], _decode(tokenizer, ids[:1])


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    for i, message in enumerate(messages):
        if message.get("role") not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {_ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a str, got {type(message.get('content')).__name__}")
        has_ids = "token_ids" in message
        has_topk = "topk_ids" in message or "topk_logprobs" in message
        if (has_ids or has_topk) and message["role"] != "assistant":
            raise ValueError(f"message {i}: only assistant messages may carry token_ids / top-k")
        if has_topk and not has_ids:
            raise ValueError(f"message {i}: topk_ids / topk_logprobs need token_ids")
        if not has_ids:
            continue
        n = len(message["token_ids"])
        if n == 0:
            raise ValueError(f"message {i}: token_ids is empty")
        if has_topk:
            topk_ids, topk_lps = message.get("topk_ids"), message.get("topk_logprobs")
            if topk_ids is None or topk_lps is None:
                raise ValueError(f"message {i}: give both topk_ids and topk_logprobs, or neither")
            if len(topk_ids) != n or len(topk_lps) != n:
                raise ValueError(
                    f"message {i}: {n} token_ids but {len(topk_ids)} topk_ids rows and "
                    f"{len(topk_lps)} topk_logprobs rows; they must match one to one"
                )
            for j, (row_ids, row_lps) in enumerate(zip(topk_ids, topk_lps)):
                if len(row_ids) == 0 or len(row_ids) != len(row_lps):
                    raise ValueError(
                        f"message {i}, token {j}: top-k row must be non-empty with as many ids "
                        f"({len(row_ids)}) as logprobs ({len(row_lps)})"
                    )


def _content_in_rendering(rendered_reply: str, content: str, index: int) -> str:
    """The assistant content as the template wrote it (some templates trim it)."""
    for candidate in (content, content.strip()):
        if rendered_reply.startswith(candidate):
            return candidate
    raise ChatTemplateError(
        f"message {index}: the chat template changes the assistant content beyond trimming "
        f"whitespace, so its tokens cannot be located; rendered reply starts {rendered_reply[:80]!r}"
    )


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    max_length: int,
    train_on: TrainOn = "assistant",
) -> EncodedExample:
    """Tokenise a conversation with assistant-only labels (and teacher top-k rows).

    ``train_on="assistant"`` labels every assistant turn, ``"last_assistant"``
    only the last one (earlier turns are context). The target of a turn is its
    content tokens + the end-of-turn token, so the adapter learns to stop. The
    encoding ends after the last assistant turn; later messages (e.g. the final
    environment turn of a role-play) are dropped.

    With ``token_ids``: those exact ids are the turn's tokens (and the KL rows sit
    on them). If they end in the end-of-turn or eos id, that id is the labelled
    stop. If not (the teacher was cut off by a length limit), the end-of-turn
    token is appended so the sequence follows the template, but it is *not*
    labelled: the teacher never chose to stop there.

    Raises :class:`ExampleTooLong` above ``max_length`` (never truncates) and
    :class:`ChatTemplateError` when the template cannot be split into turns.
    """
    if train_on not in ("assistant", "last_assistant"):
        raise ValueError(f"train_on must be 'assistant' or 'last_assistant', got {train_on!r}")
    _check_messages(messages)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_at:
        raise ValueError("the conversation has no assistant turn to train on")
    trained = set(assistant_at) if train_on == "assistant" else {assistant_at[-1]}
    # Render from role/content only: token ids and top-k rows are not template input.
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    input_ids: list[int] = []
    labels: list[int] = []
    kl_mask: list[bool] = []
    kl_ids: list[list[int]] = []
    kl_logprobs: list[list[float]] = []
    any_kl = False

    def add(
        ids: Sequence[int],
        labelled: Sequence[bool] | bool = False,
        rows: Sequence[tuple[Sequence[int], Sequence[float]] | None] | None = None,
    ) -> None:
        """Append tokens; ``rows[j]`` is token j's teacher top-k (ids, logprobs) or None."""
        flags = [labelled] * len(ids) if isinstance(labelled, bool) else list(labelled)
        for j, token in enumerate(ids):
            row = rows[j] if rows is not None and flags[j] else None
            input_ids.append(int(token))
            labels.append(int(token) if flags[j] else IGNORE_INDEX)
            kl_mask.append(row is not None)
            kl_ids.append([int(v) for v in row[0]] if row is not None else [])
            kl_logprobs.append([float(v) for v in row[1]] if row is not None else [])

    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    rendered = ""  # the conversation rendered so far; each new rendering must extend it
    for index in assistant_at:
        prompt = _render(tokenizer, plain[:index], add_generation_prompt=True)
        if not prompt.startswith(rendered):
            raise ChatTemplateError(
                f"message {index}: rendering the conversation up to this turn does not extend the "
                "rendering of the earlier turns (the template rewrites history), so turns cannot be split"
            )
        add(_tokenize(tokenizer, prompt[len(rendered):]))

        full = _render(tokenizer, plain[: index + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"message {index}: the rendered assistant turn does not start with the generation prompt"
            )
        reply = full[len(prompt):]
        content = _content_in_rendering(reply, messages[index]["content"], index)
        after_ids = _tokenize(tokenizer, reply[len(content):])
        if not after_ids:
            raise ChatTemplateError(f"message {index}: the template writes no end-of-turn token after the reply")
        end_of_turn, between_turns = after_ids[0], after_ids[1:]
        is_trained = index in trained
        message = messages[index]

        if "token_ids" not in message:
            add(_tokenize(tokenizer, content) + [end_of_turn], labelled=is_trained)
        else:
            generated = [int(t) for t in message["token_ids"]]
            stopped = generated[-1] == end_of_turn or generated[-1] in stop_ids
            content_ids = generated[:-1] if stopped else generated
            decoded = _decode(tokenizer, content_ids)
            if decoded.strip() != content.strip():
                raise ValueError(
                    f"message {index}: token_ids decode to {decoded[:80]!r}... but content is "
                    f"{content[:80]!r}...; they must be the same reply (same tokenizer?)"
                )
            turn = generated if stopped else generated + [end_of_turn]
            flags = [is_trained] * len(generated) + ([] if stopped else [False])
            rows = None
            if "topk_ids" in message and is_trained:
                rows = list(zip(message["topk_ids"], message["topk_logprobs"]))
                rows += [] if stopped else [None]
                any_kl = True
            add(turn, labelled=flags, rows=rows)
        add(between_turns)
        rendered = full

    if len(input_ids) > max_length:
        raise ExampleTooLong(len(input_ids), max_length)
    n_target = sum(label != IGNORE_INDEX for label in labels)
    return EncodedExample(
        input_ids=input_ids,
        labels=labels,
        kl_mask=kl_mask,
        kl_ids=kl_ids if any_kl else None,
        kl_logprobs=kl_logprobs if any_kl else None,
        n_target_tokens=n_target,
    )


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors.

    Always: ``input_ids`` [B, T] int64 (``pad_id``), ``attention_mask`` [B, T] int64,
    ``labels`` [B, T] int64 (-100 on padding). When at least one example has
    teacher top-k: ``kl_ids`` [B, T, K] int64 (0 padding), ``kl_logprobs``
    [B, T, K] float32 (``-inf`` padding, which :func:`genpi.train.losses.topk_kl`
    reads as probability 0) and ``kl_mask`` [B, T] bool, K = the longest row.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    batch, length = len(examples), max(len(ex) for ex in examples)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = ex.input_ids
        attention_mask[b, :n] = 1
        labels[b, :n] = ex.labels
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }

    with_kl = [ex for ex in examples if ex.kl_ids is not None and any(ex.kl_mask)]
    if not with_kl:
        return out
    k = max(len(row) for ex in with_kl for row, on in zip(ex.kl_ids, ex.kl_mask) if on)
    kl_ids = np.zeros((batch, length, k), dtype=np.int64)
    kl_logprobs = np.full((batch, length, k), -np.inf, dtype=np.float32)
    kl_mask = np.zeros((batch, length), dtype=bool)
    for b, ex in enumerate(examples):
        if ex.kl_ids is None or ex.kl_logprobs is None:
            continue
        for t, on in enumerate(ex.kl_mask):
            if on:
                row_ids, row_lps = ex.kl_ids[t], ex.kl_logprobs[t]
                kl_ids[b, t, : len(row_ids)] = row_ids
                kl_logprobs[b, t, : len(row_lps)] = row_lps
                kl_mask[b, t] = True
    out["kl_ids"] = torch.from_numpy(kl_ids)
    out["kl_logprobs"] = torch.from_numpy(kl_logprobs)
    out["kl_mask"] = torch.from_numpy(kl_mask)
    return out


# --- prompt generation (PG) examples -------------------------------------------------

PG_TEMPLATE = (
    "Below is an input, the reply a model gave WITHOUT extra instructions (AS-IS), "
    "and the reply it gave WITH them (TO-BE).\n\n"
    "Input:\n{input}\n\n"
    "AS-IS reply:\n{as_is}\n\n"
    "TO-BE reply:\n{to_be}\n\n"
    "Which instructions explain the change from AS-IS to TO-BE? "
    "Write the instructions, then explain why the reply changes."
)
PG_TARGET_TEMPLATE = "Instructions:\n{prompt}\n\nWhy the output changes:\n{reason}"
_PG_FIELDS = ("input", "as_is", "to_be")
_PG_PLACEHOLDER = re.compile(r"\{(input|as_is|to_be|prompt|reason)\}")


def _fill(template: str, values: Mapping[str, str]) -> str:
    # One regex pass instead of str.format: braces in the values (code, JSON) or in
    # the template are left alone, and a value that contains "{to_be}" is not re-filled.
    return _PG_PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def pg_messages(
    input_text: str,
    as_is: str,
    to_be: str,
    prompt_text: str | None,
    reason: str | None,
    template: str | None = None,
) -> list[dict[str, str]] | None:
    """The GenPI prompt-generation example: one user turn, one assistant target.

    The user turn shows the input, the reply without the prompt (AS-IS) and with
    it (TO-BE); ``template`` (default :data:`PG_TEMPLATE`) must contain the
    placeholders ``{input}``, ``{as_is}`` and ``{to_be}``. The assistant target
    is ``prompt_text`` (verbatim or a paraphrase -- the caller's choice) followed
    by the reason, never truncated. Returns None when ``prompt_text`` is None (PG off).
    """
    if prompt_text is None:
        return None
    template = PG_TEMPLATE if template is None else template
    missing = [f"{{{name}}}" for name in _PG_FIELDS if f"{{{name}}}" not in template]
    if missing:
        raise ValueError(f"PG template lacks placeholder(s) {missing}")
    user = _fill(template, {"input": input_text, "as_is": as_is, "to_be": to_be})
    if reason and reason.strip():
        target = _fill(PG_TARGET_TEMPLATE, {"prompt": prompt_text, "reason": reason.strip()})
    else:
        target = f"Instructions:\n{prompt_text}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": target}]
