"""Decoding throughput: the transformers engine's own loop against ``model.generate``.

    python bench/decode.py [--rows 32] [--new-tokens 64] [--device cpu|cuda] [--model embedded|<shape>-random]

Both arms decode the same batch of teacher requests (a short system prompt, varied
questions, left-padded) in one process, alternately, twice each: (a) genpi.engines.decode
(top-p on the top 1024 candidates, finished rows leave the batch, top-k per step, last
position prefill logits); (b) ``model.generate`` with ``output_logits`` and the top-k taken
from its logits afterwards, as the engine did before. Two settings: the synthesis replies'
(temperature 0.8, top-p 0.95, top-100 log-probabilities) and the evaluation's (greedy).
Prints tokens/s of each arm and the ratio, writes bench/results/decode-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL_NAMES, build_model as build  # noqa: E402

PROMPT = "You are a helpful assistant. Always answer in French, whatever language the user writes in."
QUESTIONS = ["What is the capital of Japan?", "How do I boil an egg?", "Can you recommend a book for a long train ride?",
             "Why is the sky blue?", "What should I pack for a weekend at the beach?", "How many minutes are in a day?",
             "Give me three tips to sleep better.", "What is a healthy breakfast?"]
SETTINGS = {"synthesis": dict(temperature=0.8, top_p=0.95, top_k_logprobs=100),
            "evaluation": dict(temperature=0.0, top_p=1.0, top_k_logprobs=0)}


def reference(model, ids, mask, *, max_new_tokens, eos_ids, pad_id, temperature, top_p, top_k_logprobs):
    """What the engine ran before: model.generate, then the top-k of every step's logits."""
    import torch

    sample = temperature > 0
    kw = dict(temperature=temperature, top_p=top_p, top_k=0) if sample else dict(temperature=None, top_p=None,
                                                                                 top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                             pad_token_id=pad_id, eos_token_id=eos_ids, return_dict_in_generate=True,
                             output_logits=top_k_logprobs > 0, **kw)
    if top_k_logprobs:
        for step_logits in out.logits:
            torch.log_softmax(step_logits.float(), dim=-1).topk(top_k_logprobs, dim=-1)
    gen = out.sequences[:, ids.shape[1]:].tolist()
    n = 0
    for row in gen:  # tokens up to and including the first end-of-turn id
        n += next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
    return n


def run(model, tok, n_rows: int, new_tokens: int, device: str, repeats: int = 2) -> dict:
    """{setting: both arms' runs, best tokens/s and the ratio} on one batch of n_rows requests."""
    import torch

    from genpi.engines.decode import decode
    from genpi.engines.hf import HFEngine

    engine = HFEngine(model, tok, batch_size=n_rows)
    rows = [engine.render([{"role": "system", "content": PROMPT},
                           {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}])
            for i in range(n_rows)]
    width = max(map(len, rows))
    ids = torch.tensor([[engine.pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    results = {}
    for name, setting in SETTINGS.items():
        arms = {"loop": [], "generate": []}
        for rep in range(repeats):
            for arm in arms:  # alternately: a slower moment of the host hits both arms
                torch.manual_seed(rep)
                t0 = time.perf_counter()
                if arm == "loop":
                    out = decode(model, ids, mask, max_new_tokens=new_tokens, eos_ids=engine.eos_ids, **setting)
                    n = sum(len(d.tokens) for d in out)
                else:
                    n = reference(model, ids, mask, max_new_tokens=new_tokens, eos_ids=engine.eos_ids,
                                  pad_id=engine.pad_id, **setting)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                arms[arm].append({"tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1)})
        best = {arm: max(r["tokens_per_s"] for r in runs) for arm, runs in arms.items()}
        results[name] = {"setting": setting, "arms": arms, "best_tokens_per_s": best,
                         "ratio_loop_over_generate": round(best["loop"] / max(best["generate"], 1e-9), 2)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="embedded", choices=MODEL_NAMES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: not measured (torch.cuda.is_available() is False on this machine)")
    model, tok = build(args.model, args.device)
    results = run(model, tok, args.rows, args.new_tokens, args.device)
    for name, r in results.items():
        best = r["best_tokens_per_s"]
        print(f"{name:>10}: loop {best['loop']:.1f} tokens/s, model.generate {best['generate']:.1f} tokens/s "
              f"-> {r['ratio_loop_over_generate']:.2f}x ({args.rows} rows, up to {args.new_tokens} new tokens, "
              f"{args.device}, {args.model})")
    out = {"bench": "decode", "device": args.device, "model": args.model, "torch": torch.__version__,
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "config": vars(args), "settings": results, "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(args.out) / f"decode-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
