"""Where in the reply an adapter falls short of the teacher: the KL ratio by reply position.

    python bench/kl_positions.py --prompt french --adapter PATH            # the human-written set
    python bench/kl_positions.py --prompt french --adapter PATH --inputs STORE_DIR/synth/inputs.parquet --split train

The evaluation's KL ratio (genpi.eval.run) is one number over every token of the teacher's
greedy replies. This splits it by the reply position of each token (bins below) and by input:
per bin the summed KL(teacher || base) and KL(teacher || adapter) and their ratio, the same
measure as eval.json's (1 - adapter / base), on the same replies (the teacher's greedy reply
of eval.max_new_tokens to each input). Scored on the adapter's own training inputs, it tells
a fit that is short (the same ratio as on held-out inputs) from one that does not generalize.
The prompt comes from the quality suite (bench/quality/suite.yaml). Prints a table and writes
JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

BINS = ((0, 16), (16, 32), (32, 64), (64, 96), (96, 1 << 30))


def inputs_from(path: str | None, split: str, n: int) -> list[str]:
    from genpi.eval.run import default_human_inputs

    if path is None:
        return default_human_inputs(n)
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    out = [r["input"] for r in rows if r.get("split") == split][:n]
    if not out:
        raise SystemExit(f"{path}: no inputs with split={split!r}")
    return out


def measure(prompt_id: str, adapter: str, inputs: list[str], model: str = "embedded",
            overrides: list[str] | None = None) -> dict:
    """The teacher's greedy replies to `inputs`, then :func:`score` of them."""
    from peft import PeftModel

    from genpi.chat import teacher_messages
    from genpi.config import load_config
    from genpi.engines.base import ChatRequest
    from genpi.engines.hf import HFEngine
    from genpi.models import load_model
    from quality import load_suite

    [entry] = load_suite([prompt_id])
    cfg = load_config(None, [f"model.name={model}", *(overrides or [])])
    base, tok, _ = load_model(cfg.model)
    peft_model = PeftModel.from_pretrained(base, adapter, adapter_name="a")
    engine = HFEngine.for_model(peft_model, tok, cfg)
    reqs = [ChatRequest(teacher_messages(entry.prompt, x), cfg.eval.max_new_tokens, tag=i) for i, x in enumerate(inputs)]
    with peft_model.disable_adapter():
        replies = sorted(engine.generate(reqs), key=lambda c: c.tag)
    try:
        return {"prompt": prompt_id, "adapter": adapter, **score(peft_model, tok, entry.prompt, inputs, replies)}
    finally:
        peft_model.unload()


def score(peft_model, tok, prompt: str, inputs: list[str], replies: list, top_k: int = 100) -> dict:
    """KL(teacher || base) and KL(teacher || adapter "a" of peft_model), summed per bin of reply
    positions and per input, on each input's teacher reply (a Completion); empty replies are
    skipped, as the evaluation skips them. `adapter_topk`: the adapter's KL over the teacher's
    top_k and one tail bucket (the training's measure, engine.top_k_logprobs): what is left of
    the full KL beyond it is the part no fit of the training's targets can remove."""
    from genpi.chat import student_messages, teacher_messages
    from genpi.eval.metrics import internalization_ratio
    from genpi.eval.run import _reply_logprobs

    bins = {b: {"tokens": 0, "base": 0.0, "adapter": 0.0} for b in BINS}
    per_input = []
    tail_mass = adapter_topk = 0.0
    for x, c in zip(inputs, replies):
        if not c.text.strip():
            continue
        turn = {"role": "assistant", "content": c.text, "token_ids": c.token_ids}
        t_conv, s_conv = [*teacher_messages(prompt, x), turn], [*student_messages(x), turn]
        with peft_model.disable_adapter():
            lp_t = _reply_logprobs(peft_model, tok, [t_conv])[0]
            lp_b = _reply_logprobs(peft_model, tok, [s_conv])[0]
        peft_model.set_adapter("a")
        lp_a = _reply_logprobs(peft_model, tok, [s_conv])[0]
        p = lp_t.exp()
        # Per reply token; eval's _kl_sum is the sum of these over every token.
        kb, ka = (p * (lp_t - lp_b)).sum(-1), (p * (lp_t - lp_a)).sum(-1)
        # The same KL as training sees it: the teacher's top-k plus one bucket for the rest
        # (genpi.train.losses.topk_kl); by coarse-graining it is at most the full KL.
        v, ids = lp_t.topk(top_k, dim=-1)
        lq = lp_a.gather(-1, ids)
        p_tail = (1 - v.exp().sum(-1)).clamp_min(1e-12)
        q_tail = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
        coarse = (v.exp() * (v - lq)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
        tail_mass += float(p_tail.sum())
        adapter_topk += float(coarse.sum())
        for lo, hi in BINS:
            b = bins[(lo, hi)]
            b["tokens"] += len(kb[lo:hi])
            b["base"] += float(kb[lo:hi].sum())
            b["adapter"] += float(ka[lo:hi].sum())
        per_input.append({"input": x, "tokens": len(kb), "base": float(kb.sum()), "adapter": float(ka.sum())})

    def ratio(a: float, b: float) -> float | None:  # eval.json's measure: the teacher's KL is 0
        return internalization_ratio(a, b, 0.0)

    rows = [{"positions": f"{lo + 1}-{hi}" if hi < BINS[-1][1] else f"{lo + 1}+",
             **v, "ratio": ratio(v["adapter"], v["base"])} for (lo, hi), v in bins.items() if v["tokens"]]
    tb, ta = sum(r["base"] for r in rows), sum(r["adapter"] for r in rows)
    return {"n_inputs": len(per_input), "by_position": rows,
            "total": {"tokens": sum(r["tokens"] for r in rows), "base": tb, "adapter": ta, "ratio": ratio(ta, tb)},
            "top_k": top_k, "adapter_topk": adapter_topk, "ratio_topk": ratio(adapter_topk, tb),
            "teacher_tail_mass": tail_mass / max(1, sum(r["tokens"] for r in rows)),
            "by_input": sorted(per_input, key=lambda r: -r["adapter"])}


def table(res: dict) -> str:
    lines = ["| reply positions | tokens | KL sum, base | KL sum, adapter | KL ratio | share of the adapter's KL |",
             "|---|---|---|---|---|---|"]
    total = res["total"]["adapter"] or 1.0
    for r in [*res["by_position"], {"positions": "all", **res["total"]}]:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['positions']} | {r['tokens']} | {r['base']:.1f} | {r['adapter']:.1f} | "
                     f"{ratio} | {r['adapter'] / total:.0%} |")
    lines.append(f"\nThe adapter's KL over the teacher's top-{res['top_k']} plus a tail bucket (what training "
                 f"matches): {res['adapter_topk']:.1f} of {res['total']['adapter']:.1f}; the teacher's mass beyond "
                 f"its top-{res['top_k']}: {res['teacher_tail_mass']:.3f} per token.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", required=True, help="a prompt id of the quality suite")
    ap.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json inside)")
    ap.add_argument("--inputs", help="an inputs.parquet of a synthesis (default: the human-written set)")
    ap.add_argument("--split", default="heldout", help="with --inputs: train or heldout")
    ap.add_argument("-n", type=int, default=20, help="inputs scored")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = measure(args.prompt, args.adapter, inputs_from(args.inputs, args.split, args.n), args.model)
    res["inputs"] = args.inputs or "human-written set"
    res["split"] = args.split if args.inputs else None
    print(table(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
