"""Packed multi-LoRA training vs one adapter after another with plain PEFT, side by side.

    python bench/train.py                       # CPU, the embedded SmolLM2-135M, fp32
    python bench/train.py --device cuda         # GPU, a random Qwen2-0.5B-shaped model, bf16

Both runs train the same N adapters on the same batches (synthetic but realistically
shaped data: a chat prompt part, a labelled reply with the teacher's top-k on it, a few
prompt-generation examples), in the same process. Printed and written to
bench/results/train-<device>.json: tokens/s, adapters/hour, the packed/PEFT ratio, and on
GPU the model FLOP utilisation (4 x params FLOPs per token: forward + input gradients; the
frozen base has no weight gradients) against --peak-tflops (H100 SXM bf16 dense: 989).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.config import TrainConfig  # noqa: E402
from genpi.train.data import EncodedExample  # noqa: E402
from genpi.train.loop import TrainingSet, lora_config  # noqa: E402
from genpi.train.losses import joint_loss, token_ce, topk_kl  # noqa: E402
from genpi.train.packed import PackedAdamW, PackMember, member_batches, train_pack  # noqa: E402


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


def run_peft_one_by_one(model, members, cfg: TrainConfig, pad: int, device) -> tuple[float, int]:
    """The reference: plain PEFT, one adapter at a time (torch AdamW, clip_grad_norm_), timed alone."""
    from peft import get_peft_model

    from genpi.train.data import collate

    tokens, t0 = 0, time.perf_counter()
    for m in members:
        peft_model = get_peft_model(model, lora_config(cfg))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        peft_model.train()
        for _, kind, exs in member_batches(m.ts, cfg):
            batch = {k: v.to(device) for k, v in collate(exs, pad).items()}
            loss = peft_batch_loss(peft_model, kind, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            tokens += sum(len(e) for e in exs)
        peft_model.unload()
    _sync(device)
    return time.perf_counter() - t0, tokens


def run_packed(model, members, cfg: TrainConfig, pad: int, device, micro_batch: int | None) -> tuple[float, int]:
    from genpi.train.multilora import PackedLora

    pack = PackedLora(model, len(members), cfg.lora_r, cfg.lora_alpha, cfg.target_modules, seeds=range(len(members)))
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.grad_clip)
    t0 = time.perf_counter()
    prog = train_pack(model, pack, members, cfg, pad, optimizer=opt, micro_batch=micro_batch)
    _sync(device)
    secs = time.perf_counter() - t0
    pack.remove()
    return secs, prog.tokens


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_base(device: str):
    if device == "cpu":
        from genpi.config import ModelConfig
        from genpi.models import load_model

        model, tok, _ = load_model(ModelConfig(device="cpu", dtype="float32"))
        return model, tok.pad_token_id, "SmolLM2-135M-Instruct (embedded), fp32"
    from transformers import Qwen2Config, Qwen2ForCausalLM

    conf = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(conf).to(device=device, dtype=torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, 0, "Qwen2-0.5B shape (random weights), bf16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--adapters", type=int, help="N adapters (default: 4 on CPU, 64 on GPU)")
    ap.add_argument("--steps", type=int, help="steps per adapter (default 3 on CPU, 4 on GPU)")
    ap.add_argument("--batch-size", type=int, help="per-adapter batch (default 4 on CPU, 8 on GPU)")
    ap.add_argument("--reference-adapters", type=int,
                    help="train only this many adapters one by one and scale the time to N (GPU default 4)")
    ap.add_argument("--micro-batch", type=int, help="sequences per packed forward (default: all; GPU 64)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a busy 2-core machine more threads spin-wait on each other)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU bench: not measured (no CUDA device)")
        return
    gpu = args.device == "cuda"
    n = args.adapters or (64 if gpu else 4)
    steps = args.steps or (4 if gpu else 3)
    bs = args.batch_size or (8 if gpu else 4)
    n_ref = min(n, args.reference_adapters or (4 if gpu else n))
    micro = args.micro_batch or (64 if gpu else None)
    if not gpu:
        torch.set_num_threads(args.threads)
    model, pad, model_desc = load_base(args.device)
    vocab = model.config.vocab_size
    prompt_len, reply_len = (256, 256) if gpu else (48, 64)
    # One epoch of `steps` SFT batches per adapter (+1 PG batch), as in a real pack.
    cfg = TrainConfig(lora_r=16, lora_alpha=32, epochs=1, batch_size=bs, lr=2e-3)
    members = [PackMember(f"p{i}", synthetic_set(i, vocab, bs * steps, min(bs, 2), prompt_len, reply_len, 20), seed=i)
               for i in range(n)]
    device = next(model.parameters()).device

    # Warm-up (allocator, kernels) on one adapter, outside both timings.
    run_packed(model, members[:1], cfg.model_copy(update={"epochs": 1}), pad, device, micro)
    print(f"  warm-up done; timing {n_ref} adapter(s) one by one with PEFT, then the pack of {n}", flush=True)
    ref_s, ref_tok = run_peft_one_by_one(model, members[:n_ref], cfg, pad, device)
    ref_s *= n / n_ref
    ref_tok = ref_tok * n // n_ref
    packed_s, packed_tok = run_packed(model, members, cfg, pad, device, micro)

    res = {
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)",
        "model": model_desc, "adapters": n, "batch_per_adapter": bs, "steps_per_adapter": steps + 1,
        "reference_measured_on": n_ref,
        "peft_one_by_one": {"seconds": ref_s, "tokens_per_s": ref_tok / ref_s, "adapters_per_hour": n / ref_s * 3600},
        "packed": {"seconds": packed_s, "tokens_per_s": packed_tok / packed_s,
                   "adapters_per_hour": n / packed_s * 3600},
    }
    res["ratio_adapters_per_hour"] = res["packed"]["adapters_per_hour"] / res["peft_one_by_one"]["adapters_per_hour"]
    res["ratio_tokens_per_s"] = res["packed"]["tokens_per_s"] / res["peft_one_by_one"]["tokens_per_s"]
    if gpu:
        n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once: the lm_head matmul
        flops_per_token = 4 * n_params
        res["mfu"] = res["packed"]["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
        res["peft_mfu"] = res["peft_one_by_one"]["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{res['device']}, {model_desc}: {n} adapters x {steps + 1} steps, batch {bs} per adapter")
    for name in ("peft_one_by_one", "packed"):
        r = res[name]
        print(f"  {name:16s} {r['seconds']:8.1f} s  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['adapters_per_hour']:10.0f} adapters/hour")
    print(f"  ratio packed / one-by-one: {res['ratio_adapters_per_hour']:.2f}x adapters/hour, "
          f"{res['ratio_tokens_per_s']:.2f}x tokens/s")
    if gpu:
        print(f"  MFU packed {res['mfu']:.1%} (PEFT one-by-one {res['peft_mfu']:.1%}) of {args.peak_tflops:.0f} TFLOP/s")
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"train-{args.device}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"  written to {path}")


if __name__ == "__main__":
    main()
