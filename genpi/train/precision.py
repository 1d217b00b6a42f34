"""bf16 autocast for training on CPUs with native bf16 matrix units (train.autocast).

On the project's CPU (Intel AMX tiles, avx512_bf16) a bf16 matmul runs ~4x the fp32 one, and
a LoRA forward+backward of SmolLM2-135M under `torch.autocast("cpu", torch.bfloat16)` took
~0.57x the fp32 time (measured in bench/train.py's precision arm). The weights (frozen base,
LoRA A/B, optimizer state) stay fp32: only the matmuls run in bf16 (autocast casts their
inputs), and the logits go back to fp32 before any loss. The per-token KL between the fp32
and the autocast next-token distributions of SmolLM2 was ~0.001, against ~0.06 between the
adapter and its teacher. A CPU without such units runs bf16 slower than fp32 (an earlier
machine of this project measured >10x), so "auto" turns it on only where torch reports AMX.
On a GPU the model is already bf16 (DeepSpeed's bf16 mode), so "auto" adds nothing there.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

Setting = Literal["auto", "bf16", "off"]


def cpu_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Intel AMX tiles)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a torch without the probe: assume not (fp32 is never the slow choice)
        return False


def resolve(setting: Setting, device) -> bool:
    """Whether training on `device` runs under bf16 autocast."""
    kind = torch.device(device).type
    if setting == "off":
        return False
    if setting == "bf16":
        return kind in ("cpu", "cuda")
    return kind == "cpu" and cpu_fast_bf16()


def autocast(setting: Setting, device):
    """The context for a training or validation forward on `device` (a no-op when off)."""
    if not resolve(setting, device):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def training_attention(model, setting: Setting, device):
    """Eager (matmul) attention while a CPU trains under bf16 autocast, the model's own after.

    torch's CPU flash-attention backward in bf16 was the largest single cost of a SmolLM2
    training step (20% of it, 51 ms per layer at ~130 tokens); eager attention runs its two
    matmuls on the bf16 units instead (measured 1.1-1.25x tokens/s on the French example's
    batches). In fp32 the two measured the same, so nothing changes there."""
    swap = (resolve(setting, device) and torch.device(device).type == "cpu"
            and hasattr(model, "set_attn_implementation"))
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not swap or before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    setattr(model, _SWAPPED_FROM, before)  # for batch_attention
    try:
        yield
    finally:
        delattr(model, _SWAPPED_FROM)
        model.set_attn_implementation(before)


_SWAPPED_FROM = "_genpi_eager_swapped_from"
# Eager attention keeps, per layer and for the backward, [rows, heads, width, width] scores and
# probabilities: memory in width^2. A batch whose eager attention would hold more than this
# runs the model's own attention (torch's flash kernel: memory in width). Measured on SmolLM2
# under autocast: one 2,019-token prompt-generation example of the 1000+-token shell agent
# prompt peaked at 12.1 GB of RSS in eager attention, 6.9 GB more than in the model's own
# (5.2 GB), and ran 2.2x slower; batches of them took the quality suite's process past the
# machine's 24 GB. Every chunk of the French example's training (rows x width up to 8 x ~400)
# stays under it, and eager, where eager is the faster one.
EAGER_MAX_BYTES = 4 << 30


def eager_attention_bytes(model, rows: int, width: int) -> int:
    """What eager attention holds for the backward of one forward: two fp32 [rows, heads,
    width, width] tensors per layer (the measurement above: 6.9 GB = 1.6 of them)."""
    c = model.config
    return 2 * 4 * rows * c.num_attention_heads * width * width * c.num_hidden_layers


@contextlib.contextmanager
def batch_attention(model, rows: int, width: int):
    """Inside training_attention: the model's own attention for a batch whose eager attention
    would hold more than EAGER_MAX_BYTES (long sequences); nothing changes otherwise."""
    before = getattr(model, _SWAPPED_FROM, None)
    if before is None or eager_attention_bytes(model, rows, width) <= EAGER_MAX_BYTES:
        yield
        return
    model.set_attn_implementation(before)
    try:
        yield
    finally:
        model.set_attn_implementation("eager")


def describe(setting: Setting, device) -> str:
    """For train.json and the logs: what the setting meant on this machine."""
    if resolve(setting, device):
        return "bf16 autocast"
    return "fp32" if torch.device(device).type == "cpu" else "model dtype"
