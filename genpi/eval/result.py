"""The eval.json schema: one prompt's evaluation as a typed record.

Written by the evaluation (genpi/eval/run.py), read by the run reports, the registry summary,
the CLI and the benchmarks. Every score is given for three systems on the same held-out inputs:
the teacher (base model with the prompt), the base (without it) and the adapter (without it),
plus the internalization ratio (adapter - base) / (teacher - base), None where teacher and
base score the same (a ratio would then be noise). The held-out split's scores are `metrics`
and `checks`; the human-written set's are under `human`; `plain_text` is the perplexity check.

eval.json files written before this record existed keep each declared check under
`metrics` as "check:NAME"; `EvalResult.model_validate` reads those too (stores in use have them).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

EVAL_FILE = "eval.json"
_OLD_CHECK_PREFIX = "check:"  # how eval.json files before this record keyed their checks


class Metric(BaseModel):
    """One score for each system and the internalization ratio (None: not measurable)."""
    teacher: float | None = None
    base: float | None = None
    adapter: float | None = None
    ratio: float | None = None


class KLMetric(Metric):
    """Mean per-token KL(teacher || system) on the teacher's replies (teacher is 0)."""
    tokens: int | None = None  # the teacher reply tokens the mean is over


class Metrics(BaseModel):
    kl: KLMetric
    agreement: Metric  # ROUGE-L F1 with the teacher's greedy reply
    # Share of degenerate replies (genpi.eval.metrics.is_degenerate: a repeated n-gram fills
    # the reply); lower is better for every system and the teacher is no target, so no ratio.
    # None in eval.json files written before it was measured.
    degenerate: Metric | None = None


class Latency(BaseModel):
    prefill_s: float
    generate_s: float


class Efficiency(BaseModel):
    """What a request no longer sends with the adapter, and what that saves (batch 1).
    None where nothing was measured."""
    input_tokens_with_prompt: float | None = None
    input_tokens_without_prompt: float | None = None
    input_tokens_saved_per_request: float | None = None
    input_tokens_saved_share: float | None = None
    prefill_flops_saved_per_request: float | None = None
    latency_with_prompt: Latency | None = None
    latency_adapter_without_prompt: Latency | None = None
    prefill_speedup: float | None = None
    generate_speedup: float | None = None


class Leak(BaseModel):
    """Share of the prompt each system recites under the leak probes (max over probes)."""
    teacher: float
    base: float
    adapter: float


class Sample(BaseModel):
    input: str
    teacher: str
    base: str
    adapter: str


class LeakSample(BaseModel):
    probe: str
    adapter: str


class InputSetEval(BaseModel):
    """The same scores as the held-out split's, on another set of inputs (the human-written
    user messages shipped in genpi/data/human_inputs.jsonl)."""
    n_inputs: int
    metrics: Metrics
    checks: dict[str, Metric] = Field(default_factory=dict)
    samples: list[Sample] = Field(default_factory=list)

    def check_ratios(self) -> dict[str, float | None]:
        return {name: m.ratio for name, m in self.checks.items()}


class PlainTextPerplexity(BaseModel):
    """What the adapter costs where its prompt does not apply: perplexity of general English
    prose (genpi/data/plain_text.txt) with the adapter and with the base, neither prompted."""
    base: float
    adapter: float
    ratio: float  # adapter / base; above genpi.eval.metrics.PERPLEXITY_FLAG_RATIO is flagged
    tokens: int  # the predicted tokens the perplexities are over
    flagged: bool


class EvalResult(BaseModel):
    prompt_id: str
    n_heldout: int
    metrics: Metrics
    checks: dict[str, Metric] = Field(default_factory=dict)  # by the manifest check's name
    efficiency: Efficiency = Field(default_factory=Efficiency)
    leak: Leak | None = None  # None when no leak probes are configured
    samples: list[Sample] = Field(default_factory=list)
    leak_samples: list[LeakSample] = Field(default_factory=list)
    # The human-written set, kept apart from the held-out split's `metrics`/`checks` above;
    # None in eval.json files written before it was measured (or when it was not run).
    human: InputSetEval | None = None
    plain_text: PlainTextPerplexity | None = None  # None: not measured (older eval.json files)

    @model_validator(mode="before")
    @classmethod
    def _from_old_layout(cls, data: Any) -> Any:
        """Move "check:NAME" entries out of `metrics`; an empty `leak` ({}) means no probes."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        metrics = data.get("metrics")
        if isinstance(metrics, dict) and any(k.startswith(_OLD_CHECK_PREFIX) for k in metrics):
            data["metrics"] = {k: v for k, v in metrics.items() if not k.startswith(_OLD_CHECK_PREFIX)}
            old = {k[len(_OLD_CHECK_PREFIX):]: v for k, v in metrics.items() if k.startswith(_OLD_CHECK_PREFIX)}
            data["checks"] = {**old, **(data.get("checks") or {})}
        if data.get("leak") == {}:
            data["leak"] = None
        return data

    @classmethod
    def read(cls, store, pdir: str) -> EvalResult | None:
        """The eval.json of a prompt folder, or None when it has none."""
        path = f"{pdir}/{EVAL_FILE}"
        if not store.exists(path):
            return None
        return cls.model_validate(store.read_json(path))

    def write(self, store, pdir: str) -> None:
        """Atomically (Store.write_json), so a reader never sees half a file."""
        store.write_json(f"{pdir}/{EVAL_FILE}", self.to_json())

    def to_json(self) -> dict:
        """The eval.json content (what report.json embeds per prompt)."""
        return self.model_dump(mode="json")

    def check_ratios(self) -> dict[str, float | None]:
        return {name: m.ratio for name, m in self.checks.items()}


def registry_summary(ev: EvalResult | None) -> dict:
    """What the registry keeps next to a published fingerprint (serving shows it per adapter):
    the held-out KL ratio and, where measured, the human-written set's."""
    if ev is None:
        return {}
    out = {"kl_ratio": ev.metrics.kl.ratio}
    if ev.human is not None:
        out["human_kl_ratio"] = ev.human.metrics.kl.ratio
    return out
