"""Packed multi-LoRA training vs one adapter after another with plain PEFT, side by side.

    python bench/train.py                       # CPU, the embedded SmolLM2-135M, fp32
    python bench/train.py --device cuda         # GPU, a random Qwen2-0.5B-shaped model, bf16
    python bench/train.py --device cuda --model llama-1b   # other shapes: bench/common.py SHAPES

Both arms train adapters on the same kind of batches (synthetic but realistically shaped
data: a chat prompt part, a labelled reply with the teacher's top-k on it, a few
prompt-generation examples), in the same process and the same dtype (PEFT's adapters are
kept in the base's dtype, as the pack's are). The PEFT reference is warmed up, then timed at
each of --peft-batch-sizes and reported at its best: the baseline a careful PEFT user would
run, one adapter at a time. Printed and written to bench/results/train-<device>.json:
tokens/s, adapters/hour, the packed/PEFT ratios, and on a GPU the model FLOP utilisation of
each arm (:func:`train_flops`: the frozen base's matmuls forward + input gradients, the
output layer only at the positions the loop computes, LoRA forward + both gradients, causal
attention) against the GPU's bf16 dense peak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, random_model  # noqa: E402  (puts the checkout on sys.path)
from genpi.config import TrainConfig  # noqa: E402
from genpi.train.data import EncodedExample  # noqa: E402
from genpi.train.loop import TrainingSet, lora_config  # noqa: E402
from genpi.train.losses import IGNORE_INDEX, joint_loss, token_ce, topk_kl  # noqa: E402
from genpi.train.packed import PackedAdamW, PackMember, member_batches, train_pack  # noqa: E402

# bf16 dense peak TFLOP/s by GPU name (without sparsity): MFU is against this.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def synthetic_set(seed: int, vocab: int, n_sft: int, n_pg: int, prompt_len: int, reply_len: int, topk: int) -> TrainingSet:
    rnd = random.Random(seed)
    ts = TrainingSet()

    def ex(n_prompt: int, n_target: int, kl: bool) -> EncodedExample:
        ids = [rnd.randrange(10, vocab) for _ in range(n_prompt + n_target)]
        labels = [-100] * n_prompt + ids[n_prompt:]
        mask = [False] * n_prompt + [kl] * n_target
        rows = [[t, *rnd.sample(range(10, vocab), topk - 1)] if on else [] for t, on in zip(ids, mask)]
        lps = [[-0.5] + [-3.0 - 0.1 * j for j in range(topk - 1)] if on else [] for on in mask]
        return EncodedExample(ids, labels, mask, rows if kl else None, lps if kl else None, n_target)

    ts.examples += [("sft", ex(prompt_len + rnd.randint(-8, 8), reply_len + rnd.randint(-8, 0), True))
                    for _ in range(n_sft)]
    ts.examples += [("pg", ex(prompt_len * 3, reply_len * 2, False)) for _ in range(n_pg)]
    return ts


# ---- FLOPs ---------------------------------------------------------------------------------
def model_sizes(model) -> dict:
    """Parameter counts the FLOPs model needs: the body's matmul weights (everything but the
    input embeddings and the output layer), the output layer, layers and width."""
    conf = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = head.data_ptr() == emb.data_ptr()
    body = total - emb.numel() - (0 if tied else head.numel())
    return {"body": body, "head": head.numel(), "layers": conf.num_hidden_layers, "hidden": conf.hidden_size}


def train_flops(sizes: dict, lora_params: int, examples) -> float:
    """FLOPs of one forward + backward of adapter training over ``examples``, counting what
    the training loop computes for each sequence of T tokens:
    - frozen base matmuls: 2 per weight per token forward + 2 for the input gradient (frozen
      weights get no weight gradient): 4 x body x T;
    - the output layer only at the positions the loop keeps (``logits_to_keep`` from the
      position before the first target to the end): 4 x head x kept;
    - the adapter's own LoRA weights: forward, input and weight gradients: 6 x lora x T;
    - causal attention (QK^T and AV over the positions before each query, the half that
      flash attention computes): forward 2 x layers x hidden x T(T+1), backward twice that."""
    total = 0.0
    for ex in examples:
        t = len(ex.input_ids)
        first = next((i for i, y in enumerate(ex.labels) if y != IGNORE_INDEX), t)
        kept = t - max(0, first - 1)
        total += 4.0 * sizes["body"] * t + 4.0 * sizes["head"] * kept + 6.0 * lora_params * t
        total += 3 * 2.0 * sizes["layers"] * sizes["hidden"] * t * (t + 1)
    return total


def lora_params_per_adapter(model, cfg: TrainConfig) -> int:
    from genpi.train.multilora import target_names

    r = cfg.lora_r
    return sum(r * (m.in_features + m.out_features) for n in target_names(model, cfg.target_modules)
               for m in [model.get_submodule(n)])


# ---- the PEFT reference --------------------------------------------------------------------
def peft_batch_loss(model, kind: str, batch: dict, cfg: TrainConfig) -> torch.Tensor:
    """The joint loss of one batch under a plain PEFT model, as genpi's one-adapter loop
    computed it before every adapter trained as a pack (logits from the first target on)."""
    labels = batch["labels"]
    targets = (labels != -100).nonzero()
    start = max(0, int(targets[:, 1].min()) - 1) if len(targets) else 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=torch.arange(start, labels.shape[1], device=labels.device)).logits
    ce, n_ce = token_ce(logits, labels[:, start:])
    zero = torch.zeros((), device=logits.device)
    kl, n_kl = zero, zero.long()
    if kind == "sft" and "kl_ids" in batch and cfg.w_kl > 0:
        kl_sum, n = topk_kl(logits, batch["kl_ids"][:, start:], batch["kl_logprobs"][:, start:], batch["kl_mask"][:, start:])
        kl, n_kl = kl_sum.sum(), n.sum()
    part = [ce.sum(), zero, kl] if kind == "sft" else [zero, ce.sum(), zero]
    n_part = [n_ce.sum(), zero.long(), n_kl] if kind == "sft" else [zero.long(), n_ce.sum(), zero.long()]
    loss, _ = joint_loss(torch.stack(part)[None], torch.stack(n_part)[None], (cfg.w_sft, cfg.w_pg, cfg.w_kl))
    return loss[0]


def run_peft_one_by_one(model, members, cfg: TrainConfig, pad: int, device, max_steps: int | None = None
                        ) -> tuple[float, int, list]:
    """The reference: plain PEFT, one adapter at a time (torch AdamW, clip_grad_norm_), timed
    alone; adapters in the base's dtype (autocast_adapter_dtype=False), like the pack's.
    Returns (seconds, tokens, the examples trained on)."""
    from peft import get_peft_model

    from genpi.train.data import collate

    tokens, seen, t0 = 0, [], time.perf_counter()
    for m in members:
        peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=False)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        peft_model.train()
        for _, kind, exs in member_batches(m.ts, cfg)[:max_steps]:
            batch = {k: v.to(device) for k, v in collate(exs, pad).items()}
            loss = peft_batch_loss(peft_model, kind, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            tokens += sum(len(e) for e in exs)
            seen += exs
        peft_model.unload()
    _sync(device)
    return time.perf_counter() - t0, tokens, seen


def peft_sweep(model, cfg: TrainConfig, pad: int, device, batch_sizes: list[int], n_ref: int, steps: int,
               make_set) -> dict:
    """PEFT's tokens/s at each per-adapter batch size (warmed up at that size first), best kept.
    A size that runs out of GPU memory ends the sweep (larger ones would too)."""
    points = []
    for b in batch_sizes:
        cfg_b = cfg.model_copy(update={"batch_size": b})
        members = [PackMember(f"ref{i}", make_set(1000 + i, b * steps, min(b, 2)), seed=i) for i in range(n_ref)]
        try:
            run_peft_one_by_one(model, members[:1], cfg_b, pad, device, max_steps=1)  # warm-up, untimed
            secs, tokens, seen = run_peft_one_by_one(model, members, cfg_b, pad, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            points.append({"batch_size": b, "status": "out of GPU memory"})
            break
        points.append({"batch_size": b, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
                       "examples": seen})
        print(f"  PEFT one by one, batch {b:4d}: {tokens / secs:10.0f} tokens/s", flush=True)
    best = max((p for p in points if "tokens_per_s" in p), key=lambda p: p["tokens_per_s"])
    return {"points": points, "best": best}


def run_packed(model, members, cfg: TrainConfig, pad: int, device, micro_batch: int | None) -> tuple[float, int]:
    from genpi.train.multilora import PackedLora

    pack = PackedLora(model, len(members), cfg.lora_r, cfg.lora_alpha, cfg.target_modules, seeds=range(len(members)))
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.grad_clip)
    try:
        t0 = time.perf_counter()
        prog = train_pack(model, pack, members, cfg, pad, optimizer=opt, micro_batch=micro_batch)
        _sync(device)
        secs = time.perf_counter() - t0
    finally:  # also after running out of memory: the base is reused at a smaller micro-batch
        pack.remove()
    return secs, prog.tokens


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_base(device: str, shape: str):
    if device == "cpu":
        from genpi.config import ModelConfig
        from genpi.models import load_model

        model, tok, _ = load_model(ModelConfig(device="cpu", dtype="float32"))
        return model, tok.pad_token_id, "SmolLM2-135M-Instruct (embedded), fp32"
    return random_model(shape, device), 0, f"{shape} shape (random weights), bf16"


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name.upper()), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=list(SHAPES), default="qwen2-0.5b", help="GPU: the random model's shape")
    ap.add_argument("--adapters", type=int, help="N adapters in the pack (default: 4 on CPU, 64 on GPU)")
    ap.add_argument("--steps", type=int, help="SFT steps per adapter (default 3 on CPU, 4 on GPU)")
    ap.add_argument("--batch-size", type=int, help="per-adapter batch (default 4 on CPU, 8 on GPU)")
    ap.add_argument("--reference-adapters", type=int, help="PEFT reference: adapters timed per batch size (default 2)")
    ap.add_argument("--peft-batch-sizes", help="comma-separated per-adapter batch sizes for the PEFT reference "
                    "(default: the batch size on CPU; 1, 2, 4 and 8 times it on GPU)")
    ap.add_argument("--micro-batch", type=int, help="sequences per packed forward (default: all; GPU 32, halved on running out of memory)")
    ap.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the GPU (default: by name, H100/H200 989)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a busy 2-core machine more threads spin-wait on each other)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: not measured (torch.cuda.is_available() is False on this machine)")
    gpu = args.device == "cuda"
    n = args.adapters or (64 if gpu else 4)
    steps = args.steps or (4 if gpu else 3)
    bs = args.batch_size or (8 if gpu else 4)
    n_ref = min(n, args.reference_adapters or 2)
    micro = args.micro_batch or (32 if gpu else None)  # 64 ran out of memory on an H200 (141 GB)
    sweep = ([int(b) for b in args.peft_batch_sizes.split(",")] if args.peft_batch_sizes
             else [bs, 2 * bs, 4 * bs, 8 * bs] if gpu else [bs])
    if not gpu:
        torch.set_num_threads(args.threads)
    model, pad, model_desc = load_base(args.device, args.model)
    vocab = model.config.vocab_size
    prompt_len, reply_len = (256, 256) if gpu else (48, 64)
    # One epoch of `steps` SFT batches per adapter (+1 PG batch), as in a real pack.
    # Both arms in the base's dtype (PEFT runs no autocast); the CPU's bf16 autocast
    # (train.autocast) is measured on its own below, packed against packed.
    cfg = TrainConfig(lora_r=16, lora_alpha=32, epochs=1, batch_size=bs, lr=2e-3, autocast="off")

    def make_set(seed: int, n_sft: int, n_pg: int) -> TrainingSet:
        return synthetic_set(seed, vocab, n_sft, n_pg, prompt_len, reply_len, 20)

    members = [PackMember(f"p{i}", make_set(i, bs * steps, min(bs, 2)), seed=i) for i in range(n)]
    device = next(model.parameters()).device
    sizes, lora_p = model_sizes(model), lora_params_per_adapter(model, cfg)

    # Warm-up (allocator, kernels) of the packed arm on one adapter, outside its timing.
    run_packed(model, members[:1], cfg, pad, device, micro)
    print(f"  warm-up done; timing PEFT one adapter at a time at batch sizes {sweep}, then the pack of {n}", flush=True)
    ref = peft_sweep(model, cfg, pad, device, sweep, n_ref, steps, make_set)
    while True:  # the largest micro-batch that fits, halving from the default (as the PEFT sweep stops)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            packed_s, packed_tok = run_packed(model, members, cfg, pad, device, micro)
            break
        except torch.cuda.OutOfMemoryError:
            if not micro or micro <= 1:
                raise
            torch.cuda.empty_cache()
            print(f"  packed: out of GPU memory at micro-batch {micro}; trying {micro // 2}", flush=True)
            micro //= 2
    packed_examples = [ex for m in members for _, ex in m.ts.examples]
    best = ref["best"]
    # PEFT time for the pack's N adapters: their tokens at PEFT's best measured rate.
    ref_s = packed_tok / best["tokens_per_s"]
    res = {
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)",
        "model": model_desc, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "adapters": n, "batch_per_adapter": bs, "steps_per_adapter": steps + 1, "micro_batch": micro,
        "reference_measured_on": n_ref,
        "peft_batch_sweep": [{k: v for k, v in p.items() if k != "examples"} for p in ref["points"]],
        "peft_one_by_one": {"seconds": ref_s, "tokens_per_s": best["tokens_per_s"], "batch_size": best["batch_size"],
                            "adapters_per_hour": n / ref_s * 3600, "warmed_up": True},
        "packed": {"seconds": packed_s, "tokens_per_s": packed_tok / packed_s,
                   "adapters_per_hour": n / packed_s * 3600},
    }
    res["ratio_adapters_per_hour"] = res["packed"]["adapters_per_hour"] / res["peft_one_by_one"]["adapters_per_hour"]
    res["ratio_tokens_per_s"] = res["packed"]["tokens_per_s"] / res["peft_one_by_one"]["tokens_per_s"]
    if gpu:
        peak = peak_tflops(res["device"], args.peak_tflops)
        res["flops_model"] = train_flops.__doc__.split("\n")[0]
        res["peak_tflops"] = peak
        packed_flops = train_flops(sizes, lora_p, packed_examples)
        peft_flops = train_flops(sizes, lora_p, best["examples"])
        res["packed"]["tflops_per_s"] = packed_flops / packed_s / 1e12
        res["peft_one_by_one"]["tflops_per_s"] = peft_flops / best["seconds"] / 1e12
        res["mfu"] = res["packed"]["tflops_per_s"] / peak if peak else None
        res["peft_mfu"] = res["peft_one_by_one"]["tflops_per_s"] / peak if peak else None
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if not gpu:
        # train.autocast on this CPU: the same pack, fp32 (above) against bf16 matmuls.
        from genpi.train.precision import cpu_fast_bf16

        bf = cfg.model_copy(update={"autocast": "bf16"})
        run_packed(model, members[:1], bf, pad, device, micro)  # warm-up: oneDNN's bf16 kernels
        bf_s, bf_tok = run_packed(model, members, bf, pad, device, micro)
        res["precision"] = {"cpu_fast_bf16": cpu_fast_bf16(), "fp32_tokens_per_s": res["packed"]["tokens_per_s"],
                            "bf16_autocast_tokens_per_s": bf_tok / bf_s,
                            "ratio_bf16_autocast_to_fp32": (bf_tok / bf_s) / res["packed"]["tokens_per_s"]}
    print(f"{res['device']}, {model_desc}: {n} adapters x {steps + 1} steps, batch {bs} per adapter")
    for name in ("peft_one_by_one", "packed"):
        r = res[name]
        print(f"  {name:16s} {r['seconds']:8.1f} s  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['adapters_per_hour']:10.0f} adapters/hour")
    print(f"  ratio packed / one-by-one (PEFT at its best batch, {best['batch_size']}): "
          f"{res['ratio_adapters_per_hour']:.2f}x adapters/hour, {res['ratio_tokens_per_s']:.2f}x tokens/s")
    if "precision" in res:
        pr = res["precision"]
        print(f"  packed under bf16 autocast (train.autocast; AMX on this CPU: {pr['cpu_fast_bf16']}): "
              f"{pr['bf16_autocast_tokens_per_s']:.0f} tokens/s, {pr['ratio_bf16_autocast_to_fp32']:.2f}x fp32")
    if gpu and res["mfu"] is not None:
        print(f"  MFU packed {res['mfu']:.1%} (PEFT one-by-one {res['peft_mfu']:.1%}) of {res['peak_tflops']:.0f} TFLOP/s")
    elif gpu:
        print(f"  {res['packed']['tflops_per_s']:.1f} TFLOP/s packed; MFU: unknown peak for this GPU (--peak-tflops)")
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"train-{args.device}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
