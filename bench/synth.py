"""Role-play throughput: batched Self Role-Playing against one call per conversation per turn.

    python bench/synth.py [--conversations 16] [--turns 3] [--device cpu|cuda] [--model embedded|<shape>-random]

Both arms run the same conversations (same prompt, inputs and first replies) through the
same engine in one process, one after the other: (a) genpi's batched role-play, every
active conversation advancing in one engine call per side per turn; (b) the reference
approach (GenPI's released code), one engine call per conversation per turn. Prints
generated tokens/s of each and the ratio, and writes bench/results/synth-<device>.json.
On a GPU, `--model qwen2-0.5b-random` (or smollm2-135m-random, llama-1b-random) builds a
random-weight model of that shape in bf16 (bench/common.py) for throughput; vLLM is not
measured here.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL_NAMES, build_model as build  # noqa: E402

PROMPT = "You are a cooking assistant. Give short recipes as numbered steps and always suggest a side dish."
INPUTS = ["How do I boil an egg?", "What can I cook with rice and beans?", "How do I make pancakes?",
          "What is a quick vegetarian dinner?", "How long do I roast a chicken?", "How do I make a salad dressing?",
          "What goes well with grilled fish?", "How do I cook pasta properly?"]


class Serial:
    """The reference: every request is its own engine call."""

    def __init__(self, engine):
        self.engine = engine
        self.batch_size = 1

    def generate(self, requests, progress=None):
        return [self.engine.generate([r])[0] for r in requests]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="embedded", choices=MODEL_NAMES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: not measured (torch.cuda.is_available() is False on this machine)")
    from genpi.engines.base import ChatRequest
    from genpi.engines.hf import HFEngine
    from genpi.synth.roleplay import first_turns, run_roleplay

    model, tok = build(args.model, args.device)
    engine = HFEngine(model, tok, batch_size=args.conversations)
    inputs = [INPUTS[i % len(INPUTS)] + ("" if i < len(INPUTS) else f" (variant {i})") for i in range(args.conversations)]
    firsts = engine.generate([ChatRequest([{"role": "system", "content": PROMPT}, {"role": "user", "content": x}],
                                          max_new_tokens=args.new_tokens) for x in inputs])
    start = [first_turns(i, x, {"text": c.text or "Sure.", "token_ids": c.token_ids}) for i, (x, c) in
             enumerate(zip(inputs, firsts))]
    results = {}
    for arm, eng in (("batched", engine), ("serial", Serial(engine))):
        convs = copy.deepcopy(start)
        t0 = time.time()
        stats = run_roleplay(eng, [(PROMPT, INPUTS[:3], c) for c in convs], max_turns=args.turns,
                             end_marker="[END_CONVERSATION]", env_max_new_tokens=args.new_tokens,
                             agent_max_new_tokens=args.new_tokens, top_k_logprobs=20, temperature=0.8, seed=0)
        dt = time.time() - t0
        tokens = stats.env_tokens + stats.agent_tokens
        calls = stats.calls if arm == "batched" else None
        results[arm] = {"seconds": round(dt, 2), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
                        "engine_calls": calls, "ended": dict(stats.ended)}
        print(f"{arm:>8}: {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} tokens/s; conversations ended: {dict(stats.ended)}")
    ratio = results["batched"]["tokens_per_s"] / max(results["serial"]["tokens_per_s"], 1e-9)
    print(f"batched / serial role-play throughput: {ratio:.2f}x "
          f"({args.conversations} conversations, up to {args.turns} agent turns, {args.device}, {args.model})")
    out = {"bench": "synth-roleplay", "device": args.device, "model": args.model, "torch": torch.__version__,
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "config": vars(args), "arms": results, "ratio_batched_over_serial": round(ratio, 2),
           "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out) / f"synth-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
