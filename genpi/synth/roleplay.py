"""Self Role-Playing: multi-turn conversations played by one model on both sides (GenPI).

The agent is the model WITH the prompt (the teacher): its turns, with their top-k
log-probabilities, are the training data. The other side (the user, or the environment
the prompt describes: a terminal, a website, a tool) is the same model with the roles
swapped: it sees the conversation from the other seat, under a system message built from
the prompt alone, its example inputs and an end condition. Nothing here is specific to a
prompt: a new prompt needs no new code.

All active conversations advance together: one engine call per turn for the whole batch
(the reference implementation makes one call per conversation per turn); a conversation
that ends (end marker, empty or degenerate turn, turn limit) drops out of the batch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from genpi.chat import teacher_messages
from genpi.engines.base import ChatRequest, Completion, Engine

ENV_SYSTEM = (
    "You are role-playing the other side of a conversation with an AI assistant. "
    'The assistant follows these instructions:\n"""\n{prompt}\n"""\n'
    "{demos}"
    "You play the user. If the instructions say the assistant works with a program, a terminal, "
    "a tool or a website, you play that instead and reply exactly as it would. "
    "Write only your next message: short, natural, continuing the conversation. "
    "When the request has been fully handled or there is nothing left to say, reply with {end} alone."
)


ENV_TURN = 'The assistant replied:\n"""\n{reply}\n"""\nNow write your reply to the assistant: a short follow-up question or request, in your own words.'


@dataclass
class Conversation:
    """One role-play; `messages` is the agent's view without the prompt (user/assistant)."""
    input_idx: int
    messages: list[dict[str, Any]]
    end_reason: str | None = None  # None while active
    tag: Any = None

    @property
    def agent_turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")


@dataclass
class RolePlayStats:
    calls: int = 0  # engine calls (one per side per turn, whatever the batch size)
    env_tokens: int = 0
    agent_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)  # turns removed, and why
    ended: Counter = field(default_factory=Counter)  # why conversations ended


def env_system(prompt: str, demos: list[str], end_marker: str) -> str:
    shown = "".join(f"- {d}\n" for d in demos[:3])
    demo_text = f"Examples of messages users send to this assistant:\n{shown}" if shown else ""
    return ENV_SYSTEM.format(prompt=prompt, demos=demo_text, end=end_marker)


def env_messages(system: str, conv: Conversation) -> list[dict[str, str]]:
    """The conversation seen from the other seat: its user turns become its own (assistant)
    turns and the agent's replies arrive as user messages."""
    swap = {"user": "assistant", "assistant": "user"}
    out = [{"role": "system", "content": system}] + [
        {"role": swap[m["role"]], "content": m["content"]} for m in conv.messages
    ]
    # The agent's latest reply arrives framed with the task: a small model shown a bare
    # reply in the user slot mostly copies it back instead of answering it.
    out[-1] = {"role": "user", "content": ENV_TURN.format(reply=out[-1]["content"])}
    return out


def agent_messages(prompt: str, conv: Conversation) -> list[dict[str, str]]:
    first, *rest = conv.messages
    return teacher_messages(prompt, first["content"]) + [
        {"role": m["role"], "content": m["content"]} for m in rest
    ]


def clean_env_turn(text: str, end_marker: str) -> tuple[str, bool]:
    """(text before the end marker, whether the marker was there)."""
    if end_marker in text:
        return text.split(end_marker, 1)[0].strip(), True
    return text.strip(), False


def degenerate_turn(text: str, previous: list[str]) -> str | None:
    """Why a generated turn is unusable, or None."""
    if not text.strip():
        return "empty"
    if any(tok in text for tok in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
        return "special_tokens"
    words = text.lower().split()
    mine = set(zip(words, words[1:])) or set(words)
    for p in previous:
        pw = p.lower().split()
        theirs = set(zip(pw, pw[1:])) or set(pw)
        # Copying an earlier turn (a small model's favourite failure as the other side) is
        # not a new turn: half of its word pairs taken from one earlier turn counts as echo.
        if mine and len(mine & theirs) / len(mine) >= 0.5:
            return "echo"
    if len(words) >= 8 and len(set(words)) / len(words) < 0.3:
        return "repetitive"
    return None


def run_roleplay(
    engine: Engine,
    items: list[tuple[str, list[str], Conversation]],
    *,
    max_turns: int,
    end_marker: str,
    env_max_new_tokens: int,
    agent_max_new_tokens: int,
    top_k_logprobs: int,
    temperature: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> RolePlayStats:
    """Advance conversations of any number of prompts, all in one batch, until each ends.

    items: (prompt, demo inputs, conversation opened by [user input, agent reply]);
    conversations of one prompt share its environment system message (a shared prefix that
    vLLM's prefix caching reuses). The conversations are updated in place;
    the final environment turn is never kept (nothing is trained on it).
    """
    stats = RolePlayStats()
    systems = {}
    for prompt, demos, _ in items:
        if prompt not in systems:
            systems[prompt] = env_system(prompt, demos, end_marker)
    for _, _, conv in items:
        if conv.agent_turns >= max_turns:
            conv.end_reason = "max_turns"
    for turn in range(1, max_turns):
        active = [(p, c) for p, _, c in items if c.end_reason is None]
        if not active:
            break
        # 1. the other side speaks: one call for every active conversation
        reqs = [
            ChatRequest(env_messages(systems[p], c), max_new_tokens=env_max_new_tokens,
                        temperature=temperature, top_p=0.95, seed=seed + 7_919 * turn)
            for p, c in active
        ]
        outs = engine.generate(reqs)
        stats.calls += 1
        speaking = []
        for (p, c), out in zip(active, outs):
            stats.env_tokens += len(out.token_ids)
            text, ended = clean_env_turn(out.text, end_marker)
            if ended:
                c.end_reason = "end_marker"
                continue
            why = degenerate_turn(text, [m["content"] for m in c.messages])
            if why is not None:
                stats.dropped[f"env_{why}"] += 1
                c.end_reason = f"env_{why}"
                continue
            c.messages.append({"role": "user", "content": text})
            speaking.append((p, c))
        if progress:
            progress(len(active))
        if not speaking:
            continue
        # 2. the agent (the teacher, with the prompt) answers: one call for all of them
        reqs = [
            ChatRequest(agent_messages(p, c), max_new_tokens=agent_max_new_tokens,
                        top_k_logprobs=top_k_logprobs)
            for p, c in speaking
        ]
        outs = engine.generate(reqs)
        stats.calls += 1
        for (p, c), out in zip(speaking, outs):
            stats.agent_tokens += len(out.token_ids)
            why = degenerate_turn(out.text, [m["content"] for m in c.messages])
            if why is not None:
                # The user turn without an answer is useless for training: drop both.
                c.messages.pop()
                stats.dropped[f"agent_{why}"] += 1
                c.end_reason = f"agent_{why}"
                continue
            c.messages.append(_agent_turn(out))
            if c.agent_turns >= max_turns:
                c.end_reason = "max_turns"
        if progress:
            progress(len(speaking))
    for _, _, c in items:
        c.end_reason = c.end_reason or "max_turns"
        stats.ended[c.end_reason] += 1
    return stats


def _agent_turn(out: Completion) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": out.text,
        "token_ids": list(out.token_ids),
        "topk_ids": out.topk_ids,
        "topk_logprobs": out.topk_logprobs,
        "finish_reason": out.finish_reason,
    }


def first_turns(input_idx: int, user_input: str, reply: dict[str, Any]) -> Conversation:
    """A conversation opened by a training input and the teacher's greedy reply to it."""
    return Conversation(
        input_idx=input_idx,
        messages=[
            {"role": "user", "content": user_input},
            {"role": "assistant", "content": reply["text"], "token_ids": list(reply["token_ids"]),
             "topk_ids": reply.get("topk_ids"), "topk_logprobs": reply.get("topk_logprobs"),
             "finish_reason": reply.get("finish_reason", "stop")},
        ],
    )
