"""Packed training: K adapters on one frozen base, each as if it were trained alone.

One adapter trained alone is a pack of one: this is genpi's only training loop. One step
takes the next batch of every adapter still training (:func:`member_batches`: the batches
it would see alone, in the same order), runs them in one forward with per-sample adapter
indices (:mod:`genpi.train.multilora`), and minimises ``sum_k loss_k`` where ``loss_k`` is
adapter k's own joint loss (per-token means over its own samples only, through
:func:`genpi.train.losses.token_scale`). Adapter k's gradient is therefore exactly its solo gradient.
:class:`PackedAdamW` then clips each adapter's gradient to its own norm and applies
AdamW with each adapter's own learning rate, step count (bias correction) and
active/finished flag. Adapters with fewer steps, or early-stopped, simply drop out.

Data parallel within a pack (``rank``/``world``): each rank takes samples rank::world of
the step's samples; per-adapter token counts are global, and the loss is multiplied by
``world`` because DeepSpeed averages gradients across ranks -- the update is the same
for any number of ranks. Every rank runs the same number of backward passes per step
(ZeRO-2 reduces gradients on each one, so unequal counts hang or mix steps): a rank with
fewer micro-batches pads with zero-weighted forward/backward passes of the same shape of
graph. Every tensor a collective sees lives on the parameters' device (NCCL has no CPU
backend).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from genpi.config import TrainConfig
from genpi.train import dependence, precision, validation
from genpi.train.data import EncodedExample, collate
from genpi.train.loop import TrainingSet, lr_at, make_batches, micro_batches
from genpi.train.losses import (IGNORE_INDEX, PARTS, joint_loss, token_ce, token_scale, topk_both_kl, topk_kl,
                                topk_reverse_kl)


# ---- optimizer ---------------------------------------------------------------------------
class PackedAdamW(torch.optim.Optimizer):
    """AdamW over stacked [K, ...] LoRA parameters with per-adapter clipping, lr and steps.

    Element-wise like torch's AdamW (same update formula), so it also works on the flat
    fp32 partitions DeepSpeed ZeRO hands its wrapped optimizer: :meth:`bind_zero` maps
    every element of a partition back to its adapter (through DeepSpeed's own
    ``_hp_mapping``), and the per-adapter squared gradient norms are summed across ranks.
    Call :meth:`set_adapters` before every step.
    """

    def __init__(self, params: Sequence[Tensor], n_adapters: int, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        super().__init__(list(params), dict(lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay))
        self.n_adapters, self.max_grad_norm = n_adapters, max_grad_norm
        self._runs: dict[int, tuple[Tensor, Tensor]] = {}  # id(flat partition) -> (owner, length) runs
        self.partitioned = False
        self.set_adapters([0.0] * n_adapters, [False] * n_adapters, [1] * n_adapters)
        self.last_grad_norms = torch.zeros(n_adapters, device="cpu")

    def set_adapters(self, lr: Sequence[float], active: Sequence[bool], step: Sequence[int]) -> None:
        """Per adapter: learning rate, whether it trains this step, its update count after this step."""
        # Slot K is the "nobody" adapter for ZeRO's alignment padding: inactive, lr 0.
        # Host tensors (explicitly: never on whatever the default device is); moved per use.
        self._lr = torch.tensor([*lr, 0.0], dtype=torch.float64, device="cpu")
        self._active = torch.tensor([*active, False], device="cpu")
        self._step = torch.tensor([*step, 1], dtype=torch.float64, device="cpu").clamp_min(1)

    def bind_zero(self, stacked: Sequence[Tensor]) -> None:
        """After ``deepspeed.initialize``: learn which adapter owns each element of the flat
        partitions now in ``param_groups`` (padding -> slot K)."""
        flats = [g["params"][0] for g in self.param_groups]
        for gi, flat in enumerate(flats):
            owner = torch.full((flat.numel(),), self.n_adapters, dtype=torch.int32, device="cpu")
            for p in stacked:
                m = getattr(p, "_hp_mapping", None)
                if m is None or m.param_group_index != gi:
                    continue
                per = p.numel() // p.shape[0]
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                ids = torch.arange(lp.start, lp.start + lp.numel, device="cpu") // per
                owner[hp.start:hp.start + hp.numel] = ids.to(torch.int32)
            # Run-length form: a partition is a few long runs of one adapter each.
            change = torch.ones(owner.numel(), dtype=torch.bool, device="cpu")
            change[1:] = owner[1:] != owner[:-1]
            starts = change.nonzero().flatten()
            lengths = torch.diff(torch.cat([starts, torch.tensor([owner.numel()], device="cpu")]))
            self._runs[id(flat)] = (owner[starts].long(), lengths)
        self.partitioned = True

    def _expand(self, p: Tensor, vec: Tensor) -> Tensor:
        """A per-adapter vector [K+1] as a tensor broadcastable to p's elements."""
        vec = vec.to(p.device)
        runs = self._runs.get(id(p))
        if runs is None:  # stacked [K, ...]: one row per adapter
            return vec[: self.n_adapters].view(-1, *([1] * (p.dim() - 1)))
        owner, lengths = runs
        return vec[owner.to(p.device)].repeat_interleave(lengths.to(p.device), output_size=p.numel()).view_as(p)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        dev = params[0].device
        k1 = self.n_adapters + 1
        sq = torch.zeros(k1, dtype=torch.float32, device=dev)
        for p in params:
            g2 = p.grad.float().pow(2)
            runs = self._runs.get(id(p))
            if runs is None:
                sq[: self.n_adapters] += g2.reshape(p.shape[0], -1).sum(1)
            else:
                owner, lengths = runs
                sq.index_add_(0, owner.to(dev).repeat_interleave(lengths.to(dev)), g2.flatten())
        if self.partitioned and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sq)  # each rank holds a different slice of every adapter
        norms = sq.sqrt()
        self.last_grad_norms = norms[: self.n_adapters].cpu()
        # torch.nn.utils.clip_grad_norm_'s rule, per adapter.
        coef = (self.max_grad_norm / (norms.double() + 1e-6)).clamp(max=1.0)
        b1, b2 = self.param_groups[0]["betas"]
        eps, wd = self.param_groups[0]["eps"], self.param_groups[0]["weight_decay"]
        step_size = (self._lr / (1 - b1 ** self._step)).float()
        bc2_sqrt = (1 - b2 ** self._step).sqrt().float()
        active = self._active.to(dev)
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            act = self._expand(p, active)
            g = p.grad * self._expand(p, coef.float().to(dev)).to(p.grad.dtype)
            if wd:
                p.mul_(torch.where(act, 1 - self._expand(p, (self._lr * wd).float()), 1.0))
            m.copy_(torch.where(act, torch.lerp(m, g, 1 - b1), m))
            v.copy_(torch.where(act, v * b2 + (1 - b2) * g * g, v))
            denom = (v.sqrt() / self._expand(p, bc2_sqrt)).add_(eps)
            p.sub_(torch.where(act, self._expand(p, step_size) * m / denom, 0.0))
        return None


# ---- the pack ----------------------------------------------------------------------------
@dataclass
class PackMember:
    key: str  # prompt id
    ts: TrainingSet
    seed: int = 0  # LoRA init seed; the batch order uses cfg.seed


@dataclass
class PackProgress:
    """Everything about a pack's progress that a checkpoint must restore (JSON-able)."""
    step: list[int]
    total: list[int]
    done: list[bool]
    stop_reason: list[str | None]
    epoch_losses: list[list[float]]
    cur_sum: list[float]
    cur_n: list[int]
    history: list[list[dict]]
    pack_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    # Held-out KL (train.val_inputs, genpi.train.validation), per adapter: the KL after each
    # epoch ([] without validation) and the epoch (1-based) with the lowest, None before any.
    val_kl: list[list[float]] = field(default_factory=list)
    best_epoch: list[int | None] = field(default_factory=list)
    # That epoch's LoRA weights, by slot, on the host: tensors, so not in to_dict (JSON); the
    # Ray runner checkpoints them beside progress.json (validation.save_best / load_best).
    best_weights: dict[int, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Progress saved before held-out KL existed has neither list.
        self.val_kl = self.val_kl or [[] for _ in self.step]
        self.best_epoch = self.best_epoch or [None] * len(self.step)

    @classmethod
    def start(cls, totals: list[int]) -> "PackProgress":
        k = len(totals)
        return cls([0] * k, totals, [t == 0 for t in totals], [None if t else "no_batches" for t in totals],
                   [[] for _ in range(k)], [0.0] * k, [0] * k, [[] for _ in range(k)])

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "best_weights"}


def member_batches(ts: TrainingSet, cfg: TrainConfig) -> list[tuple[int, str, list[EncodedExample]]]:
    """(epoch, kind, examples) for every step of one adapter, whatever pack it is in."""
    return [(e, kind, exs) for e in range(cfg.epochs) for kind, exs in make_batches(ts, cfg.batch_size, cfg.seed, e)]


def _counts(ex: EncodedExample) -> tuple[int, int]:
    """(CE targets, KL targets) of one example, as the losses count them (position 0 never)."""
    ce = sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)
    kl = sum(ex.kl_mask[1:]) if ex.kl_ids is not None else 0
    return ce, kl


def _all_reduce(t: Tensor, world: int) -> Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def _chunks(local: list, cfg: TrainConfig, micro_batch: int | None) -> list[list]:
    """One rank's share of a step in forward/backward chunks: `micro_batch` sequences when
    given, else as many as fit in train.max_batch_tokens padded tokens."""
    if micro_batch:
        return [local[i:i + micro_batch] for i in range(0, len(local), micro_batch)]
    return micro_batches(local, cfg.max_batch_tokens, length=lambda s: len(s[2]))


def pack_step(model, pack, samples: list[tuple[int, str, EncodedExample]], cfg: TrainConfig, pad_id: int,
              device, rank: int = 0, world: int = 1, micro_batch: int | None = None,
              backward: Callable[[Tensor, bool], None] | None = None, divergence: str = "forward") -> Tensor:
    """Forward + backward of one packed step; returns per-slot [K, 3] sums of (sft, pg, kl)
    per-token losses and [K, 3] token counts, summed over ranks, stacked as [2, K, 3]
    (on ``device``, the parameters' device). ``divergence``: the KL part is KL(teacher ||
    student) ("forward", off-policy data), KL(student || teacher) ("reverse", the on-policy
    phase's own replies by default) or their sum ("both")."""
    # Every tensor created here without an explicit device (ours, and token_scale's) lands
    # on the parameters' device: a collective never gets a host tensor (NCCL has no CPU
    # backend), and no per-chunk host round trip is needed.
    with torch.device(device):
        return _pack_step(model, pack, samples, cfg, pad_id, device, rank, world, micro_batch,
                          backward or (lambda loss, last: loss.backward()),
                          {"forward": topk_kl, "reverse": topk_reverse_kl, "both": topk_both_kl}[divergence])


def _pack_step(model, pack, samples, cfg, pad_id, device, rank, world, micro_batch, backward, kl_fn) -> Tensor:
    k = pack.n_adapters
    # Token counts of the whole step (all ranks, all chunks), per adapter and part (PARTS),
    # counted on the host (Python ints), then one copy to the device.
    host = [[0, 0, 0] for _ in range(k)]
    for slot, kind, ex in samples:
        ce, kl = _counts(ex)
        host[slot][0 if kind == "sft" else 1] += ce
        # KL is a part only where it is trained (w_kl > 0) and the teacher's rows are.
        host[slot][2] += kl if kind == "sft" and cfg.w_kl > 0 else 0
    counts = torch.tensor(host, dtype=torch.float32, device=device)
    # The factor `world` undoes DeepSpeed's gradient averaging over ranks.
    scale = token_scale(counts, (cfg.w_sft, cfg.w_pg, cfg.w_kl)) * world
    sums = torch.zeros(k, 3, device=device)
    # `scale` holds the whole step's token counts, so the split never changes the gradient.
    chunks = _chunks(samples[rank::world], cfg, micro_batch)
    # Same number of backward passes on every rank (ZeRO-2 communicates on each): every rank
    # sees all samples, so each computes every rank's chunk count -- no collective needed.
    n_chunks = max(len(_chunks(samples[r::world], cfg, micro_batch)) for r in range(world))
    # A rank with fewer chunks pads with zero-weighted passes over the step's shortest sample:
    # a real forward, so its gradient hooks fire for the same parameters in the same order
    # as a real micro-batch (ZeRO-2's reduce buckets are laid out in hook order).
    filler = [min(samples, key=lambda s: len(s[2]))] if samples else []
    for c in range(n_chunks):
        real = c < len(chunks)
        chunk = chunks[c] if real else filler
        batch = {n: t.to(device) for n, t in collate([ex for _, _, ex in chunk], pad_id).items()}
        slots = torch.tensor([s for s, _, _ in chunk], device=device)
        is_sft = torch.tensor([kind == "sft" for _, kind, _ in chunk], device=device)
        labels = batch["labels"]
        tgt = (labels != IGNORE_INDEX).nonzero()
        start = max(0, int(tgt[:, 1].min()) - 1) if len(tgt) else 0
        with pack.route_to(slots), precision.autocast(cfg.autocast, device), \
                precision.batch_attention(model, *batch["input_ids"].shape):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=torch.arange(start, labels.shape[1], device=device)).logits
        # No fp32 copy of the whole [B, T, V] logits: every loss takes its target rows and
        # computes them in fp32 itself. The copy was 18.6 GiB of a 64-sequence micro-batch of
        # a 152k vocabulary in bf16, and ran the first GPU run out of memory (2026-12-04).
        sl = slice(start, None)
        ce_sum, _ = token_ce(logits, labels[:, sl])
        part = torch.where(is_sft, 0, 1)
        loss = (ce_sum * scale[slots, part]).sum()
        if real:
            sums.index_put_((slots, part), ce_sum.detach().float(), accumulate=True)
        if "kl_ids" in batch and cfg.w_kl > 0:
            kl_sum, _ = kl_fn(logits, batch["kl_ids"][:, sl], batch["kl_logprobs"][:, sl], batch["kl_mask"][:, sl])
            loss = loss + (kl_sum * scale[slots, 2]).sum()
            if real:
                sums.index_put_((slots, torch.full_like(slots, 2)), kl_sum.detach().float(), accumulate=True)
        backward(loss if real else loss * 0.0, c == n_chunks - 1)
    return torch.stack([_all_reduce(sums, world), counts])


def train_pack(model, pack, members: Sequence[PackMember], cfg: TrainConfig, pad_id: int, *,
               optimizer=None, engine=None, rank: int = 0, world: int = 1, micro_batch: int | None = None,
               progress: PackProgress | None = None,
               on_step: Callable[[PackProgress], None] | None = None,
               divergence: str = "forward", step_offset: Sequence[int] | None = None) -> PackProgress:
    """Train the pack's adapters (slot i = members[i]) until each has run its epochs or stopped early.

    Plain torch: pass ``optimizer`` (a :class:`PackedAdamW` over ``pack.parameters()``).
    DeepSpeed: pass ``engine`` (its optimizer wraps a PackedAdamW); backward/step go through it.
    ``progress`` resumes a checkpointed pack; ``on_step`` sees the progress after each step.
    A later phase on the same optimizer (the on-policy phase) passes ``divergence`` for its KL
    part and ``step_offset``, each adapter's steps so far, so that AdamW's bias correction
    goes on from the moments it holds rather than restarting at step 1.
    Adapters with validation examples (``ts.val``) are scored after each epoch and end with
    the weights of their best epoch (:mod:`genpi.train.validation`)."""
    opt = optimizer if engine is None else engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps ours
    device = next(iter(pack.parameters())).device
    # Before the plans: it replaces the examples it drops from the KL term. The config decides
    # (the on-policy phase's, phase_config, has it off), not the divergence: "forward" is also
    # an on-policy choice now.
    dependence.apply(model, pack, members, cfg, pad_id, device, rank, world)
    plans = [member_batches(m.ts, cfg) for m in members]
    prog = progress or PackProgress.start([len(p) for p in plans])
    vals = {i: m.ts.val for i, m in enumerate(members) if m.ts.val}
    validation.forget_unsaved(prog)
    weights = (cfg.w_sft, cfg.w_pg, cfg.w_kl)
    offset = list(step_offset) if step_offset is not None else [0] * len(members)
    backward = None
    if engine is not None:
        def backward(loss, last):
            # DeepSpeed reduces (and under ZeRO-2 partitions) gradients at the accumulation
            # boundary: only the step's last micro-batch is one. We scale the loss ourselves.
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss, scale_wrt_gas=False)
    # Eager attention while a CPU trains in bf16 (precision.training_attention).
    with precision.training_attention(model, cfg.autocast, device):
        model.train()
        while not all(prog.done):
            t0 = time.time()
            active = [i for i, d in enumerate(prog.done) if not d]
            samples = [(i, plans[i][prog.step[i]][1], ex) for i in active for ex in plans[i][prog.step[i]][2]]
            # To the host once per step (after the collective): the logs below are Python floats.
            sums, counts = pack_step(model, pack, samples, cfg, pad_id, device, rank, world, micro_batch, backward,
                                     divergence).cpu()
            inner.set_adapters([lr_at(prog.step[i], prog.total[i], cfg) for i in range(len(members))],
                               [not d for d in prog.done], [s + 1 + offset[i] for i, s in enumerate(prog.step)])
            if engine is not None:
                engine.step()
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
            prog.tokens += sum(len(ex) for _, _, ex in samples)
            losses, means = joint_loss(sums, counts, weights)
            ended = []
            for i in active:
                epoch, kind = plans[i][prog.step[i]][:2]
                logs = {"step": prog.step[i], "epoch": epoch, "kind": kind, "loss": float(losses[i]),
                        "grad_norm": float(inner.last_grad_norms[i]), "lr": lr_at(prog.step[i], prog.total[i], cfg)}
                logs.update({name: float(m) for name, m, n in zip(PARTS, means[i], counts[i]) if n > 0})
                prog.history[i].append(logs)
                prog.cur_sum[i] += logs["loss"]
                prog.cur_n[i] += 1
                prog.step[i] += 1
                last_of_epoch = prog.step[i] == prog.total[i] or plans[i][prog.step[i]][0] != epoch
                if last_of_epoch:
                    ended.append(i)
            scored = [i for i in ended if i in vals]
            if scored:  # after the step: the weights the epoch ended with
                kl = validation.score(model, pack, {i: vals[i] for i in scored}, cfg, pad_id, device, rank, world)
                for i in scored:
                    validation.record(prog, pack, i, kl[i])
            for i in ended:
                _end_epoch(prog, i, cfg)
            prog.pack_steps += 1
            prog.seconds += time.time() - t0
            if on_step:
                on_step(prog)
    validation.restore_best(pack, prog)
    return prog


def _end_epoch(prog: PackProgress, i: int, cfg: TrainConfig) -> None:
    prog.epoch_losses[i].append(prog.cur_sum[i] / max(1, prog.cur_n[i]))
    prog.cur_sum[i], prog.cur_n[i] = 0.0, 0
    if prog.step[i] >= prog.total[i]:
        prog.done[i], prog.stop_reason[i] = True, "finished"
        return
    patience = cfg.early_stop_patience
    # With validation, the held-out KL decides; without, the training loss.
    losses, what = (prog.val_kl[i], ", val_kl") if prog.val_kl[i] else (prog.epoch_losses[i], "")
    if patience and len(losses) > patience and min(losses[-patience:]) >= min(losses[:-patience]):
        prog.done[i], prog.stop_reason[i] = True, f"early_stop(epoch {len(losses)}{what})"


def adapter_stats(prog: PackProgress, i: int, member: PackMember) -> dict:
    """train.json content for one adapter of a finished pack."""
    from collections import Counter

    hist = prog.history[i]
    return {
        "steps": prog.step[i],
        "planned_steps": prog.total[i],
        "stop_reason": prog.stop_reason[i],
        "examples": dict(Counter(k for k, _ in member.ts.examples)),
        "dropped": dict(member.ts.dropped),
        "epoch_losses": prog.epoch_losses[i],
        # The adapter written is this epoch's (1-based): the lowest held-out KL, else the last.
        "chosen_epoch": prog.best_epoch[i] or len(prog.epoch_losses[i]),
        "val_inputs": len(member.ts.val),
        "val_kl": prog.val_kl[i],
        **member.ts.val_info,
        **member.ts.phase_info,
        "first_loss": hist[0]["loss"] if hist else math.nan,
        "last_loss": sum(h["loss"] for h in hist[-5:]) / max(1, len(hist[-5:])),
        "history": hist,
    }
