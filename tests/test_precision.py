"""train.autocast: bf16 matmuls on CPUs with AMX, fp32 weights and losses, same training signal."""
from __future__ import annotations

import random

import pytest
import torch

from genpi.config import GenpiConfig, TrainConfig
from genpi.train import precision
from genpi.train.multilora import PackedLora
from genpi.train.packed import pack_step


def test_the_setting_resolves_per_device():
    assert precision.resolve("off", "cpu") is False
    assert precision.resolve("bf16", "cpu") is True
    # On a GPU the model itself is bf16 (DeepSpeed's bf16 mode): "auto" adds no autocast.
    assert precision.resolve("auto", "cuda") is False
    assert precision.resolve("auto", "cpu") is precision.cpu_fast_bf16()
    assert TrainConfig().autocast == "auto"
    with pytest.raises(ValueError):
        TrainConfig(autocast="fp16")


def test_autocast_is_content_old_fingerprints_hold_with_it_off():
    """It changes the adapter a run writes (slightly), so it is part of the training stage's
    fingerprint; "off" (what every store before it trained with) leaves old fingerprints as they were."""
    off = GenpiConfig.model_validate({"train": {"autocast": "off"}})
    auto = GenpiConfig()
    assert "autocast" not in off.stage_dict("train")
    assert auto.stage_dict("train")["autocast"] == "auto"


def _samples(vocab: int, n: int):
    from genpi.train.data import EncodedExample

    rnd = random.Random(0)
    out = []
    for i in range(n):
        ids = [rnd.randrange(1, vocab) for _ in range(rnd.randint(10, 20))]
        cut = len(ids) // 2
        kl_ids = [[] if j < cut else rnd.sample(range(vocab), 5) for j in range(len(ids))]
        kl_lps = [[] if j < cut else [-1.0, -2.0, -2.5, -3.0, -3.5] for j in range(len(ids))]
        ex = EncodedExample(ids, [-100] * cut + ids[cut:], [False] * cut + [True] * (len(ids) - cut),
                            kl_ids, kl_lps, len(ids) - cut)
        out.append((i % 2, "sft", ex))
    return out


def _step(model, setting: str, samples):
    cfg = TrainConfig(lora_r=4, lora_alpha=8, autocast=setting)
    pack = PackedLora(model, 2, cfg.lora_r, cfg.lora_alpha, seeds=[1, 2])
    for p in pack.parameters():  # B starts at zero: give it values so the LoRA path matters
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.05)
    dtypes = set()
    hook = model.model.layers[0].mlp.up_proj.base.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    try:
        sums, counts = pack_step(model, pack, samples, cfg, 0, torch.device("cpu"))
    finally:
        hook.remove()
    grads = torch.cat([p.grad.flatten() for p in pack.parameters()])
    params = {p.dtype for p in pack.parameters()} | {p.grad.dtype for p in pack.parameters()}
    pack.remove()
    return sums, counts, grads, dtypes, params


def test_a_bf16_autocast_step_trains_as_fp32_does(tiny_llama, single_thread_torch):
    """A real packed step under "bf16": the base's matmuls ran in bf16, the LoRA weights and their
    gradients stayed fp32, and the losses and gradients match the fp32 step's closely."""
    samples = _samples(128, 6)
    s32, c32, g32, d32, p32 = _step(tiny_llama(seed=0, hidden_size=64, intermediate_size=128), "off", samples)
    s16, c16, g16, d16, p16 = _step(tiny_llama(seed=0, hidden_size=64, intermediate_size=128), "bf16", samples)
    assert d32 == {torch.float32} and d16 == {torch.bfloat16}
    assert p32 == p16 == {torch.float32} and s16.dtype == torch.float32
    assert torch.equal(c32, c16)
    torch.testing.assert_close(s16, s32, rtol=2e-2, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.99, cos
    assert not torch.equal(g16, g32)  # bf16 really ran: not the same numbers


def test_training_under_autocast_uses_eager_attention_and_gives_the_model_back(tiny_llama, single_thread_torch):
    """The CPU's bf16 flash-attention backward is slow: training swaps in eager attention for
    its loop and restores the model's own (which the engine sharing it generates with)."""
    from genpi.train.loop import TrainingSet
    from genpi.train.packed import PackedAdamW, PackMember, train_pack

    model = tiny_llama(seed=0)
    model.set_attn_implementation("sdpa")
    samples = _samples(128, 4)
    ts = TrainingSet(examples=[("sft", ex) for _, _, ex in samples])
    seen = {}
    for setting in ("bf16", "off"):
        cfg = TrainConfig(lora_r=4, lora_alpha=8, epochs=1, batch_size=2, autocast=setting)
        pack = PackedLora(model, 1, 4, 8, seeds=[0])
        train_pack(model, pack, [PackMember("a", ts)], cfg, 0, optimizer=PackedAdamW(pack.parameters(), 1),
                   on_step=lambda pr: seen.setdefault(setting, model.config._attn_implementation))
        pack.remove()
        assert model.config._attn_implementation == "sdpa"
    assert seen == {"bf16": "eager", "off": "sdpa"}


def test_a_long_batch_under_autocast_runs_the_models_own_attention(tiny_llama, single_thread_torch, monkeypatch):
    """Eager attention holds [rows, heads, width, width] tensors per layer for the backward: a
    2,019-token prompt-generation example of the shell agent prompt peaked at 12.1 GB in
    eager attention. A batch whose eager attention would hold over EAGER_MAX_BYTES runs the
    model's own (flash) attention; shorter batches stay eager; the model ends as it was."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from genpi.train.data import EncodedExample
    from genpi.train.loop import TrainingSet
    from genpi.train.packed import PackedAdamW, PackMember, train_pack

    smol = SimpleNamespace(config=LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30))  # SmolLM2-135M's shape
    assert precision.eager_attention_bytes(smol, 1, 2019) > precision.EAGER_MAX_BYTES  # the shell agent's PG example
    assert precision.eager_attention_bytes(smol, 8, 400) <= precision.EAGER_MAX_BYTES  # the French example's batches

    model = tiny_llama(seed=0)
    model.set_attn_implementation("sdpa")
    rnd = random.Random(0)
    exs = []
    for n in (12, 14, 200, 11):  # one long example, in a batch of its own
        ids = [rnd.randrange(1, 128) for _ in range(n)]
        exs.append(EncodedExample(ids, [-100] * 5 + ids[5:], [False] * n, None, None, n - 5))
    # The budget between the short batches' eager bytes and the long one's.
    monkeypatch.setattr(precision, "EAGER_MAX_BYTES", precision.eager_attention_bytes(model, 1, 100))
    seen = []
    forward = model.forward

    def recording(*a, **k):
        seen.append((k["input_ids"].shape[1], model.config._attn_implementation))
        return forward(*a, **k)
    model.forward = recording
    cfg = TrainConfig(lora_r=4, lora_alpha=8, epochs=1, batch_size=1, autocast="bf16")
    pack = PackedLora(model, 1, 4, 8, seeds=[0])
    train_pack(model, pack, [PackMember("a", TrainingSet(examples=[("sft", ex) for ex in exs]))], cfg, 0,
               optimizer=PackedAdamW(pack.parameters(), 1))
    pack.remove()
    assert sorted(seen) == [(11, "eager"), (12, "eager"), (14, "eager"), (200, "sdpa")]
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, precision._SWAPPED_FROM)
    with precision.batch_attention(model, 1, 10_000):  # outside training: nothing to change
        assert model.config._attn_implementation == "sdpa"
