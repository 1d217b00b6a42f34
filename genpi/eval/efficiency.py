"""What a request costs with the prompt and without it: input tokens, prefill FLOPs, latency.

Used by the per-adapter evaluation (genpi/eval/run.py) and by bench/efficiency.py, which
measures the same quantities per prompt-length bucket.
"""
from __future__ import annotations

import time

import torch


def prefill_flops(model_config, n_params: int, n_tokens: int) -> float:
    """Forward FLOPs to prefill `n_tokens` tokens: 2 per weight per token (the dense part)
    plus causal attention, QK^T and AV, 2 * 2 * layers * d_model * T^2 / 2.

    The attention term is why long prompts cost more than linearly: at 2k tokens on a
    135M model it is already ~15% of the total."""
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    d = getattr(model_config, "hidden_size", 0) or 0
    return 2.0 * n_params * n_tokens + 2.0 * layers * d * n_tokens * n_tokens


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_latency(model, input_ids: list[int], new_tokens: int, repeats: int, pad_id: int) -> dict:
    """Batch-1 prefill time (the time to the first token) and the time to generate
    `new_tokens` tokens, medians of `repeats` runs after one warm-up."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    prefill, total = [], []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up: first-call allocations and kernel selection
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
            _sync(device)
            total.append(time.perf_counter() - t0)
    return {"prefill_s": sorted(prefill)[len(prefill) // 2], "generate_s": sorted(total)[len(total) // 2]}


def compare(model, *, with_prompt_ids: list[int], without_ids: list[int], n_params: int,
            new_tokens: int, repeats: int, pad_id: int, base_ctx=None) -> dict:
    """Side by side: the prompted request on the base and the bare request on the adapter.

    `model` is in its adapter state; `base_ctx` is a context manager that turns it into the
    base for the prompted arm (PEFT's `disable_adapter()`), None to use it as it is."""
    import contextlib

    with base_ctx if base_ctx is not None else contextlib.nullcontext():
        lat_p = measure_latency(model, with_prompt_ids, new_tokens, repeats, pad_id)
    lat_a = measure_latency(model, without_ids, new_tokens, repeats, pad_id)
    cfg = model.config
    f_p = prefill_flops(cfg, n_params, len(with_prompt_ids))
    f_a = prefill_flops(cfg, n_params, len(without_ids))
    return {
        "input_tokens_with_prompt": len(with_prompt_ids),
        "input_tokens_without_prompt": len(without_ids),
        "prefill_flops_with_prompt": f_p,
        "prefill_flops_without_prompt": f_a,
        "latency_with_prompt": lat_p,
        "latency_adapter_without_prompt": lat_a,
        "ratio_input_tokens": len(without_ids) / max(1, len(with_prompt_ids)),
        "ratio_prefill_flops": f_a / max(f_p, 1.0),
        "ratio_prefill_s": lat_a["prefill_s"] / max(lat_p["prefill_s"], 1e-9),
        "ratio_generate_s": lat_a["generate_s"] / max(lat_p["generate_s"], 1e-9),
    }
