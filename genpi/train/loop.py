"""The joint-loss training loop for one LoRA adapter on a frozen base (explicit, no Trainer).

Examples come in two kinds, batched separately so each batch has one kind of target:
- "sft": input without the prompt -> the teacher's reply tokens; CE (L_SFT) on them and,
  where the teacher's top-k was recorded, KL(teacher || student) (L_KL) on the same positions;
- "pg": input, AS-IS and TO-BE -> the prompt (verbatim or paraphrased) + the reason (L_PG).
The loss is w_sft*L_SFT + w_pg*L_PG + w_kl*L_KL, each a per-token mean.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from genpi.config import TrainConfig
from genpi.synth.replies import student_messages
from genpi.train.data import EncodedExample, ExampleTooLong, collate, encode_chat, pg_messages
from genpi.train.losses import joint_loss, token_ce, topk_kl

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    examples: list[tuple[str, EncodedExample]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def tokens(self) -> int:
        return sum(len(ex) for _, ex in self.examples)


def build_examples(tok, synth: dict, prompt: str, cfg: TrainConfig) -> TrainingSet:
    """Encode the synthesized data of one prompt; drop (and count) what cannot be used."""
    out = TrainingSet()
    # A role-play conversation starts with the greedy teacher reply to its input and goes on
    # for more turns: it replaces that single-turn example (the first turn is the same).
    convs = {c["input_idx"]: c for c in synth.get("conversations") or [] if c["agent_turns"] > 1}
    for r in synth["to_be"]:
        if not r["text"].strip():
            out.dropped["empty_reply"] += 1
            continue
        if r["sample"] == 0 and r["input_idx"] in convs:
            messages = [_message(m) for m in convs[r["input_idx"]]["messages"]]
            kind = "conversation"
        else:
            messages = [*student_messages(r["input"]), _message({"role": "assistant", **r})]
            kind = "reply"
        try:
            out.examples.append(("sft", encode_chat(tok, messages, cfg.max_length)))
        except ExampleTooLong:
            out.dropped[f"sft_{kind}_too_long"] += 1
        except ValueError as e:  # token ids that do not match the text: a broken row, not a broken run
            out.dropped[f"sft_{kind}_unencodable"] += 1
            log.warning("teacher %s dropped: %s", kind, e)
    if cfg.pg_target != "off" and cfg.w_pg > 0:
        target = synth.get("paraphrase") if cfg.pg_target == "paraphrase" else prompt
        if cfg.pg_target == "paraphrase" and not target:
            raise ValueError("train.pg_target is 'paraphrase' but synthesis produced no paraphrase")
        greedy = {r["input_idx"]: r["text"] for r in synth["to_be"] if r["sample"] == 0}
        reasons = {r["input_idx"]: r["reason"] for r in synth["reasons"]}
        for i, r in enumerate(synth["as_is"]):
            msgs = pg_messages(r["input"], r["text"], greedy.get(r["input_idx"], ""), target, reasons.get(i, ""))
            try:
                out.examples.append(("pg", encode_chat(tok, msgs, cfg.pg_max_length)))
            except ExampleTooLong as e:
                # Never cut the prompt: a PG example that does not fit is dropped and counted.
                out.dropped["pg_too_long"] += 1
                log.warning("prompt-generation example dropped: %s", e)
    return out


def _message(m: dict) -> dict:
    """A stored turn as encode_chat wants it: assistant turns keep the teacher's token ids
    and top-k rows (the SFT/KL targets), other turns are plain text."""
    out = {"role": m["role"], "content": m["text"] if "text" in m else m["content"]}
    if m["role"] == "assistant" and m.get("token_ids") is not None:
        out["token_ids"] = list(m["token_ids"])
        if m.get("topk_ids") is not None:
            out["topk_ids"] = m["topk_ids"]
            out["topk_logprobs"] = m["topk_logprobs"]
    return out


def make_batches(ts: TrainingSet, batch_size: int, seed: int, epoch: int) -> list[tuple[str, list[EncodedExample]]]:
    """Length-sorted buckets per kind (little padding), shuffled in batch order each epoch."""
    rnd = random.Random(seed * 1000 + epoch)
    batches = []
    for kind in ("sft", "pg"):
        exs = [ex for k, ex in ts.examples if k == kind]
        rnd.shuffle(exs)
        # Sort inside windows of 4 batches: less padding, yet varied batch composition.
        window = batch_size * 4
        for w in range(0, len(exs), window):
            chunk = sorted(exs[w : w + window], key=len)
            batches += [(kind, chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    rnd.shuffle(batches)
    return batches


def batch_parts(model, kind: str, batch: dict, cfg: TrainConfig) -> dict:
    """The loss parts {name: (sum[B], n[B])} of one batch (see genpi.train.losses)."""
    labels = batch["labels"]
    # Logits only from the first target position on: the vocabulary projection of the
    # prompt part is a large share of a small model's compute and is never used.
    targets = (labels != -100).nonzero()
    start = max(0, int(targets[:, 1].min()) - 1) if len(targets) else 0
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=torch.arange(start, labels.shape[1], device=labels.device),
    )
    logits = out.logits
    sl = slice(start, None)
    parts = {}
    if kind == "sft":
        parts["sft"] = token_ce(logits, labels[:, sl])
        if "kl_ids" in batch and cfg.w_kl > 0:
            parts["kl"] = topk_kl(logits, batch["kl_ids"][:, sl], batch["kl_logprobs"][:, sl], batch["kl_mask"][:, sl])
    else:
        parts["pg"] = token_ce(logits, labels[:, sl])
    return parts


def loss_weights(cfg: TrainConfig) -> dict[str, float]:
    return {"sft": cfg.w_sft, "pg": cfg.w_pg, "kl": cfg.w_kl}


def batch_loss(model, kind: str, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    return joint_loss(batch_parts(model, kind, batch, cfg), loss_weights(cfg))


def micro_batches(items: list, max_tokens: int, length: Callable[[Any], int] = len) -> list[list]:
    """Consecutive groups whose padded size (count x longest) stays within `max_tokens`;
    an item longer than that is a group of its own (examples are never cut). Used by the
    one-adapter loop and the packed loop alike (`length` reads an item's token count)."""
    groups: list[list] = []
    cur: list = []
    longest = 0
    for item in items:
        n = length(item)
        if cur and (len(cur) + 1) * max(n, longest) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(item)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def backward_batch(model, kind: str, exs: list[EncodedExample], pad: int, cfg: TrainConfig, device) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one batch, in micro-batches of at most `train.max_batch_tokens`
    padded tokens. Each part's per-token mean is taken over the whole batch (a micro-batch
    contributes sum / n_batch), so the gradient is the whole batch's, whatever the split."""
    groups = micro_batches(exs, cfg.max_batch_tokens)
    if len(groups) == 1:
        batch = {k: v.to(device) for k, v in collate(exs, pad).items()}
        loss, logs = batch_loss(model, kind, batch, cfg)
        loss.backward()
        return loss.detach(), logs
    weights = loss_weights(cfg)
    batches = [collate(g, pad) for g in groups]
    # Target tokens of each part in the whole batch, counted as the losses count them.
    # (A micro-batch without teacher rows has no "kl_ids": count KL over those that have them.)
    n_total = {"sft" if kind == "sft" else "pg": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)}
    if kind == "sft" and cfg.w_kl > 0 and any("kl_ids" in b for b in batches):
        n_total["kl"] = sum(int(b["kl_mask"][:, 1:].sum()) for b in batches if "kl_ids" in b)
    sums = dict.fromkeys(n_total, 0.0)
    for b in batches:
        parts = batch_parts(model, kind, {k: v.to(device) for k, v in b.items()}, cfg)
        loss = sum((weights[name] * s.sum() / n_total[name] for name, (s, _) in parts.items()
                    if n_total[name] > 0 and weights[name] != 0.0), torch.zeros((), device=device))
        if loss.requires_grad:
            loss.backward()
        for name, (s, _) in parts.items():
            sums[name] += float(s.detach().sum())
    logs: dict[str, float] = {}
    total = 0.0
    for name, n in n_total.items():
        logs[f"{name}_tokens"] = float(n)
        if n:
            logs[name] = sums[name] / n
            total += weights[name] * logs[name]
    logs["loss"] = total
    logs["micro_batches"] = len(groups)
    return torch.tensor(total), logs


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base_model,
    tok,
    ts: TrainingSet,
    cfg: TrainConfig,
    out_dir: str,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train one adapter on `ts`, save it (PEFT format) to `out_dir`, return training stats.
    The base model is left untouched (the adapter is unloaded afterwards)."""
    from peft import get_peft_model

    if not ts.examples:
        raise ValueError("no usable training examples")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base_model, lora_config(cfg))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total = sum(len(make_batches(ts, cfg.batch_size, cfg.seed, e)) for e in range(cfg.epochs))
    step, t0, history, n_tokens = 0, time.time(), [], 0
    model.train()
    try:
        for epoch in range(cfg.epochs):
            for kind, exs in make_batches(ts, cfg.batch_size, cfg.seed, epoch):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg)
                opt.zero_grad(set_to_none=True)
                loss, logs = backward_batch(model, kind, exs, pad, cfg, device)
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                n_tokens += sum(len(e) for e in exs)
                logs.update(step=step, epoch=epoch, kind=kind, loss=float(loss.detach()), grad_norm=float(gnorm))
                history.append(logs)
                step += 1
                if on_step:
                    on_step(step, total, logs)
        model.eval()
        model.save_pretrained(out_dir)
    finally:
        # Leave the shared base model as it was for the next stage (eval, next adapter).
        model.unload()
    secs = time.time() - t0
    return {
        "steps": step,
        "examples": Counter(k for k, _ in ts.examples),
        "dropped": dict(ts.dropped),
        "tokens_seen": n_tokens,
        "seconds": secs,
        "tokens_per_s": n_tokens / max(secs, 1e-9),
        "first_loss": history[0]["loss"],
        "last_loss": sum(h["loss"] for h in history[-5:]) / len(history[-5:]),
        "history": history,
    }
