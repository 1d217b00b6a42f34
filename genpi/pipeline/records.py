"""The records the pipeline passes around: one plan and one outcome per prompt (Ray-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: keeps this module a leaf
    from genpi.config import GenpiConfig
    from genpi.manifest import PromptEntry

STAGES = ("synth", "train", "eval")


@dataclass
class PromptPlan:
    entry: "PromptEntry"
    cfg: "GenpiConfig"
    fingerprint: str
    status: str  # new | changed | unchanged
    prompt_tokens: int = 0
    # The genpi.pipeline.plan.LONG_PROMPT_SETTINGS keys this prompt trains with.
    long_settings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass
class PromptOutcome:
    """What happened to one prompt in one run (the run report's row)."""
    id: str
    fingerprint: str
    status: str = "pending"  # published | skipped | failed (pending while the run goes on)
    error: str | None = None
    failed_stage: str | None = None
    prompt_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # Seconds inside model calls per stage: synth (engine calls), train (training steps, the
    # prompt's share of its pack's), eval (the prompt's evaluation).
    model_seconds: dict[str, float] = field(default_factory=dict)
    eval: Any = None  # genpi.eval.result.EvalResult once evaluated (or read back on skip)
