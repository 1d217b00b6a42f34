"""A short reason why the prompted reply differs from the unprompted one (GenPI step 3).

The model sees the input and both outputs, not the prompt: the reason must describe the
behaviour change, and it becomes part of the prompt-generation target.
"""
from __future__ import annotations

from genpi.config import SynthConfig
from genpi.engines.base import ChatRequest

ASK = (
    "The same assistant answered one message twice. The first answer was written without "
    "special instructions; the second followed special instructions.\n\n"
    "Message:\n{input}\n\nAnswer without instructions:\n{as_is}\n\nAnswer with instructions:\n{to_be}\n\n"
    "In two or three sentences, explain how the second answer differs from the first and "
    "what the instructions must have asked for."
)
PREFIX = "The second answer"


def reason_requests(rows: list[dict], synth: SynthConfig) -> list[ChatRequest]:
    """rows: {input, as_is, to_be}; the reply is pre-filled so it starts on topic."""
    return [
        ChatRequest(
            [{"role": "user", "content": ASK.format(**r)}],
            assistant_prefix=PREFIX,
            max_new_tokens=synth.reason_max_new_tokens,
            temperature=0.7,
            top_p=0.9,
            seed=synth.seed + i,
            tag={"input_idx": i},
        )
        for i, r in enumerate(rows)
    ]


def finish_reason_text(generated: str) -> str:
    text = (PREFIX + " " + generated.strip()).strip()
    # Keep whole sentences only: a reason cut mid-sentence by the token limit reads badly.
    if "." in text and not text.endswith((".", "!", "?")):
        text = text[: text.rfind(".") + 1]
    return text
