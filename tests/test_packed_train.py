"""Packed training: an adapter trained in a pack equals the same adapter trained alone."""
from __future__ import annotations

import random

import pytest
import torch

from genpi.config import TrainConfig
from genpi.train.data import EncodedExample
from genpi.train.loop import TrainingSet
from genpi.train.multilora import PackedLora
from genpi.train.packed import PackedAdamW, PackMember, PackProgress, _end_epoch, member_batches, train_pack

VOCAB, PAD = 128, 0


def _example(rnd: random.Random, kind: str, with_kl: bool) -> EncodedExample:
    """A realistic-shaped example: an unlabelled prompt part, then labelled target tokens
    (with the teacher's top-k rows on them for SFT)."""
    n_prompt, n_target = rnd.randint(3, 8), rnd.randint(2, 7)
    ids = [rnd.randrange(1, VOCAB) for _ in range(n_prompt + n_target)]
    labels = [-100] * n_prompt + ids[n_prompt:]
    kl_mask = [False] * n_prompt + [with_kl] * n_target
    kl_ids = kl_lps = None
    if with_kl:
        kl_ids, kl_lps = [], []
        for on in kl_mask:
            if not on:
                kl_ids.append([]), kl_lps.append([])
                continue
            row = rnd.sample(range(VOCAB), 4)
            raw = torch.tensor([rnd.random() for _ in row]) + 0.1
            lp = torch.log(raw / raw.sum() * 0.9)  # 0.1 of the mass in the tail bucket
            kl_ids.append(row), kl_lps.append(lp.tolist())
    return EncodedExample(ids, labels, kl_mask, kl_ids, kl_lps, n_target)


def _training_set(seed: int, n_sft: int, n_pg: int) -> TrainingSet:
    rnd = random.Random(seed)
    ts = TrainingSet()
    ts.examples += [("sft", _example(rnd, "sft", with_kl=i % 3 != 2)) for i in range(n_sft)]
    ts.examples += [("pg", _example(rnd, "pg", with_kl=False)) for _ in range(n_pg)]
    return ts


# A small clip makes clipping bind on every step, differently per adapter; sizes differ so
# adapters have different step counts (different lr schedules, and the short ones drop out).
# fp32 (train.autocast=off): the equalities below are exact only in fp32; bf16 matmuls round
# differently with the batch's shape (tests/test_precision.py covers the autocast).
CFG = TrainConfig(lora_r=4, lora_alpha=8, epochs=2, batch_size=3, lr=5e-3, grad_clip=0.05, warmup_ratio=0.2,
                  autocast="off")
MEMBERS = [("a", 7, 2), ("b", 3, 1), ("c", 11, 3)]


def _train(tiny_llama, members, cfg=CFG):
    model = tiny_llama(seed=0)
    pack = PackedLora(model, len(members), cfg.lora_r, cfg.lora_alpha, seeds=[m.seed for m in members])
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.grad_clip)
    prog = train_pack(model, pack, members, cfg, PAD, optimizer=opt)
    return pack, prog


@pytest.fixture
def members():
    return [PackMember(key, _training_set(i, n_sft, n_pg), seed=100 + i) for i, (key, n_sft, n_pg) in enumerate(MEMBERS)]


def test_adapter_in_a_pack_equals_the_adapter_alone(tiny_llama, members, single_thread_torch):
    pack, prog = _train(tiny_llama, members)
    assert prog.step == [len(member_batches(m.ts, CFG)) for m in members] and all(prog.done)
    assert len(set(prog.step)) == 3  # different lengths: adapters really dropped out at different steps
    clipped = [h["grad_norm"] > CFG.grad_clip for hs in prog.history for h in hs]
    assert sum(clipped) > len(clipped) // 2  # per-adapter clipping was active
    for i, m in enumerate(members):
        alone, alone_prog = _train(tiny_llama, [m])
        got, want = pack.adapter_state(i), alone.adapter_state(0)
        moved = 0.0
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-6)
            moved += float((want[key] - _init(m.seed, key, tiny_llama)).abs().max())
        assert moved > 1e-3  # the adapter trained at all
        losses = [h["loss"] for h in prog.history[i]]
        assert losses == pytest.approx([h["loss"] for h in alone_prog.history[0]], rel=1e-4, abs=1e-6)


def _init(seed, key, tiny_llama):
    return PackedLora(tiny_llama(seed=0), 1, CFG.lora_r, CFG.lora_alpha, seeds=[seed]).adapter_state(0)[key]


def test_packed_adamw_matches_torch_adamw_with_clipping():
    """For one adapter the optimizer is torch's AdamW + clip_grad_norm_; per adapter with several."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5))
    refs = [torch.nn.Parameter(stacked.detach()[k].clone()) for k in range(3)]
    opt = PackedAdamW([stacked], 3, max_grad_norm=0.5, weight_decay=0.01)
    ref_opts = [torch.optim.AdamW([r], lr=0.1 * (k + 1), weight_decay=0.01) for k, r in enumerate(refs)]
    steps = [0, 0, 0]
    for it in range(6):
        grads = torch.randn(3, 4, 5) * (it + 1)
        active = [True, it % 2 == 0, it < 3]  # adapter 1 skips steps, adapter 2 finishes early
        stacked.grad = grads.clone()
        opt.set_adapters([0.1 * (k + 1) for k in range(3)], active, [s + 1 for s in steps])
        opt.step()
        for k in range(3):
            if active[k]:
                refs[k].grad = grads[k].clone()
                torch.nn.utils.clip_grad_norm_([refs[k]], 0.5)
                ref_opts[k].step()
                steps[k] += 1
    for k in range(3):
        torch.testing.assert_close(stacked.detach()[k], refs[k].detach(), rtol=1e-5, atol=1e-6)


def test_early_stopping_per_adapter():
    cfg = TrainConfig(early_stop_patience=2)
    prog = PackProgress.start([100, 100])
    for loss in (3.0, 2.0, 2.5, 2.1):  # no gain over 2.0 for two epochs -> stop adapter 0
        for i, value in enumerate((loss, 5.0 - len(prog.epoch_losses[1]))):  # adapter 1 keeps improving
            prog.cur_sum[i], prog.cur_n[i], prog.step[i] = value, 1, prog.step[i] + 10
            _end_epoch(prog, i, cfg)
    assert prog.done == [True, False] and prog.stop_reason[0].startswith("early_stop")
    assert prog.epoch_losses[0] == [3.0, 2.0, 2.5, 2.1]


def test_token_budget_chunks_leave_the_packed_training_unchanged(tiny_llama, members, single_thread_torch):
    """With train.max_batch_tokens small enough that every step runs as several chunks (some
    without teacher rows), the pack trains to the same adapters as in one forward per step."""
    from genpi.train.loop import micro_batches

    small = CFG.model_copy(update={"max_batch_tokens": 24})
    samples = [(0, k, ex) for k, ex in members[2].ts.examples]
    assert len(micro_batches(samples, 24, length=lambda s: len(s[2]))) > 3
    whole, _ = _train(tiny_llama, members)
    split, _ = _train(tiny_llama, members, small)
    for i in range(len(members)):
        got, want = split.adapter_state(i), whole.adapter_state(i)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-6)


def test_collectives_get_the_parameters_device_simulated_second_device(tiny_llama, members, monkeypatch,
                                                                      single_thread_torch):
    """Simulated accelerator: a GPU worker's parameters are on CUDA while torch's default
    device is the CPU, and NCCL rejects a CPU tensor ("No backend type associated with device
    type cpu"). Here the parameters are on the CPU and the default device is another one
    ("meta"); rank 0 of a pretend world of 2 runs a packed step and a ZeRO-style optimizer
    step, and every tensor handed to a collective must be on the parameters' device."""
    from genpi.train.packed import pack_step

    seen = []

    def all_reduce(t, *args, **kwargs):  # the narrowest boundary: record, as if rank 1 added zeros
        seen.append(t.device)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    model = tiny_llama(seed=0)
    pack = PackedLora(model, len(members), CFG.lora_r, CFG.lora_alpha, seeds=[m.seed for m in members])
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=CFG.grad_clip)
    opt.partitioned = True  # as under ZeRO: each rank's norms are partial, summed across ranks
    samples = [(i, kind, ex) for i, m in enumerate(members) for kind, ex in m.ts.examples[:3]]
    params_device = pack.parameters()[0].device
    torch.set_default_device("meta")
    try:
        out = pack_step(model, pack, samples, CFG, PAD, params_device, rank=0, world=2)
        opt.set_adapters([1e-3] * len(members), [True] * len(members), [1] * len(members))
        opt.step()
    finally:
        torch.set_default_device(None)
    assert len(seen) == 2 and set(seen) == {params_device}, seen  # the loss sums, the grad norms
    assert out.device == params_device and bool(out[1].sum() > 0)
    assert all(p.grad is not None and p.grad.device == params_device for p in pack.parameters())


def test_packed_step_never_copies_the_whole_logits_to_fp32(tiny_llama, members):
    """A bf16 base's [B, T, V] logits stay bf16: each loss upcasts only its target rows.
    A whole fp32 copy was 18.6 GiB for 64 sequences of 512 tokens with a 152k vocabulary and
    ran the first GPU run out of memory (2026-12-04). Recorded here with a dispatch mode:
    every fp32 result of 3 dims ending in the vocabulary is such a copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fp32Logits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 3
                        and t.shape[-1] == VOCAB):
                    self.seen.append(str(func))
            return out

    model = tiny_llama(seed=0).to(torch.bfloat16)
    pack = PackedLora(model, len(members), CFG.lora_r, CFG.lora_alpha, seeds=[m.seed for m in members])
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=CFG.grad_clip)
    cfg = CFG.model_copy(update={"epochs": 1})
    with Fp32Logits() as mode:
        prog = train_pack(model, pack, members, cfg, PAD, optimizer=opt)
    assert all(prog.done) and all(h[-1]["loss"] > 0 for h in prog.history)
    assert mode.seen == [], mode.seen[:3]
