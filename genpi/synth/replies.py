"""AS-IS (student: no prompt) and TO-BE (teacher: prompt in the system slot) replies.

Both sides' messages come from genpi.chat, the rule training, evaluation and serving use too.
"""
from __future__ import annotations

from genpi.chat import student_messages, teacher_messages
from genpi.config import EngineConfig, SynthConfig
from genpi.engines.base import ChatRequest


def to_be_requests(prompt: str, inputs: list[str], synth: SynthConfig, engine: EngineConfig) -> list[ChatRequest]:
    """Greedy teacher reply per input, plus `teacher_samples` sampled ones, all with top-k."""
    reqs = []
    for i, x in enumerate(inputs):
        reqs.append(
            ChatRequest(
                teacher_messages(prompt, x),
                max_new_tokens=synth.reply_max_new_tokens,
                top_k_logprobs=engine.top_k_logprobs,
                tag={"input_idx": i, "sample": 0},
            )
        )
        for s in range(synth.teacher_samples):
            reqs.append(
                ChatRequest(
                    teacher_messages(prompt, x),
                    max_new_tokens=synth.reply_max_new_tokens,
                    temperature=synth.teacher_temperature,
                    top_k_logprobs=engine.top_k_logprobs,
                    seed=synth.seed + 1_000 * (s + 1),
                    tag={"input_idx": i, "sample": s + 1},
                )
            )
    return reqs


def as_is_requests(inputs: list[str], synth: SynthConfig) -> list[ChatRequest]:
    return [
        ChatRequest(student_messages(x), max_new_tokens=synth.reply_max_new_tokens, tag={"input_idx": i})
        for i, x in enumerate(inputs)
    ]
