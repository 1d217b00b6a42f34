"""What internalization saves per request, by prompt length: input tokens, prefill FLOPs, latency.

    python bench/efficiency.py                                   # embedded SmolLM2-135M, CPU
    python bench/efficiency.py --device cuda --model qwen2-0.5b-random

For prompts of about 64, 256, 1024 and 2048 tokens (cut from the shell agent example at
token boundaries, so every bucket is real prose) and one user question, it measures side by
side in one process: (a) the base model with the prompt in the system slot, (b) the same
base with a LoRA adapter (r=16, all linear layers, unmerged, as it is served) and no prompt.
Per bucket: input tokens, prefill FLOPs (dense + causal attention), batch-1 prefill time
(time to first token) and the time to generate 16 tokens, medians of --repeats runs, and
the (b)/(a) ratios. Results go to bench/results/efficiency-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, build_model, environment  # noqa: E402

BUCKETS = (64, 256, 1024, 2048)
QUESTION = "How many files in my home directory were changed in the last week?"


def run(model_name: str = "embedded", device: str = "cpu", buckets=BUCKETS, repeats: int = 3,
        new_tokens: int = 16, model=None, tok=None) -> dict:
    import torch
    from peft import get_peft_model

    from genpi.config import TrainConfig
    from genpi.engines.hf import HFEngine
    from genpi.eval.efficiency import compare
    from genpi.manifest import load_manifest
    from genpi.chat import student_messages, teacher_messages
    from genpi.train.loop import lora_config

    if model is None:
        model, tok = build_model(model_name, device)
    [agent] = load_manifest(REPO / "examples" / "prompts" / "shell_agent.yaml")
    source = tok(agent.prompt, add_special_tokens=False)["input_ids"]
    while len(source) < max(buckets):  # longer buckets than the example repeat it
        source = source + source
    n_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    # A trained adapter costs what a random one of the same shape costs: B is set non-zero so
    # PEFT cannot skip the LoRA path.
    peft_model = get_peft_model(model, lora_config(TrainConfig()))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    peft_model.eval()
    engine = HFEngine(peft_model, tok, 1)
    rows = []
    for n in buckets:
        prompt = tok.decode(source[:n])
        r = compare(peft_model, with_prompt_ids=engine.render(teacher_messages(prompt, QUESTION)),
                    without_ids=engine.render(student_messages(QUESTION)), n_params=n_params,
                    new_tokens=new_tokens, repeats=repeats, pad_id=engine.pad_id,
                    base_ctx=peft_model.disable_adapter())
        r["bucket_prompt_tokens"] = n
        rows.append(r)
        print(f"prompt ~{n:>5} tokens: input {r['input_tokens_with_prompt']} -> {r['input_tokens_without_prompt']} "
              f"({r['ratio_input_tokens']:.3f}x), prefill FLOPs {r['ratio_prefill_flops']:.3f}x, "
              f"prefill {r['latency_with_prompt']['prefill_s'] * 1000:.0f} -> "
              f"{r['latency_adapter_without_prompt']['prefill_s'] * 1000:.0f} ms ({r['ratio_prefill_s']:.2f}x), "
              f"{new_tokens} tokens {r['latency_with_prompt']['generate_s']:.2f} -> "
              f"{r['latency_adapter_without_prompt']['generate_s']:.2f} s ({r['ratio_generate_s']:.2f}x)", flush=True)
    peft_model.unload()
    return {"bench": "efficiency", "environment": environment(), "device": device, "model": model_name,
            "config": {"buckets": list(buckets), "repeats": repeats, "new_tokens": new_tokens, "question": QUESTION,
                       "adapter": "LoRA r=16 all-linear, unmerged"},
            "buckets": rows}


def table(res: dict) -> str:
    lines = ["| prompt tokens | input tokens with → without | prefill FLOPs ratio | prefill ms with → without "
             "| prefill ratio | 16-token reply s with → without | reply ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in res["buckets"]:
        lp, la = r["latency_with_prompt"], r["latency_adapter_without_prompt"]
        lines.append(f"| {r['bucket_prompt_tokens']} | {r['input_tokens_with_prompt']} → {r['input_tokens_without_prompt']} "
                     f"| {r['ratio_prefill_flops']:.3f} | {lp['prefill_s'] * 1000:.0f} → {la['prefill_s'] * 1000:.0f} "
                     f"| {r['ratio_prefill_s']:.2f} | {lp['generate_s']:.2f} → {la['generate_s']:.2f} "
                     f"| {r['ratio_generate_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default=None, help="embedded (CPU default), qwen2-0.5b-random (GPU default), "
                    "smollm2-135m-random or llama-1b-random")
    ap.add_argument("--buckets", default=",".join(map(str, BUCKETS)), help="prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: not measured (torch.cuda.is_available() is False on this machine)")
    model_name = args.model or ("embedded" if args.device == "cpu" else "qwen2-0.5b-random")
    res = run(model_name, args.device, [int(b) for b in args.buckets.split(",")], args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"efficiency-{res['environment']['machine']}.json"
    path.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"written: {path}")
    return res


if __name__ == "__main__":
    main()
