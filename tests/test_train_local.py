"""The in-process training runner: one adapter is a pack of one through the packed loop.

Real torch steps on tiny models and real files in a store; every adapter written here is
read back as a standard PEFT folder."""
from __future__ import annotations

import random

import pytest
import torch

from genpi.config import ModelConfig, TrainConfig, load_config
from genpi.engines.hf import HFEngine
from genpi.manifest import PromptEntry
from genpi.models import load_model
from genpi.store import Store
from genpi.synth.pipeline import load_synth, synthesize
from genpi.train.data import EncodedExample, collate
from genpi.train.jobs import TrainJob, train_local
from genpi.train.loop import build_examples, micro_batches
from genpi.train.losses import joint_loss, token_ce, topk_kl
from genpi.train.multilora import PackedLora
from genpi.train.packed import pack_step

PROMPT = "You are a pirate. Always answer like a pirate and say Arr."

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _weights(tc: TrainConfig) -> tuple[float, float, float]:
    return tc.w_sft, tc.w_pg, tc.w_kl


def _sft_loss(model, batch: dict, tc: TrainConfig) -> tuple[float, dict]:
    """The joint loss (SFT + KL parts) of one SFT batch under `model`, and its per-token means."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, n_ce = token_ce(logits, batch["labels"])
    kl, n_kl = topk_kl(logits, batch["kl_ids"], batch["kl_logprobs"], batch["kl_mask"])
    sums = torch.stack([ce.sum(), torch.zeros(()), kl.sum()])[None]
    counts = torch.stack([n_ce.sum(), torch.zeros((), dtype=torch.long), n_kl.sum()])[None]
    assert counts[0, 0] > 0 and counts[0, 2] > 0
    total, means = joint_loss(sums, counts, _weights(tc))
    return float(total[0]), {"sft": float(means[0, 0]), "kl": float(means[0, 2])}


def _base_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before: dict) -> None:
    """Training leaves the shared base model exactly as it was: weights, frozen, eval mode."""
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------
def test_few_steps_lower_joint_loss(tiny_config, tiny_model_dir, tiny_seeds, tmp_path):
    """Synthesize with the tiny model, then a few epochs at a high LR on the same batches
    must lower the joint loss, and the saved adapter must carry that improvement."""
    from peft import PeftModel

    cfg = tiny_config.with_overrides(
        {"train.epochs": 8, "train.lr": 1e-2, "train.warmup_ratio": 0.0, "train.batch_size": 16}
    )
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(tmp_path / "store")
    entry = PromptEntry(id="pirate", prompt=PROMPT, seed_inputs=tiny_seeds)
    pdir = store.prompt_dir(entry.id, "fp")
    synthesize(HFEngine(model, tok, cfg.engine.batch_size), entry, cfg, store, pdir)
    ts = build_examples(tok, load_synth(store, pdir), entry.prompt, cfg.train)
    sft = [ex for kind, ex in ts.examples if kind == "sft"]
    assert sft and any(kind == "pg" for kind, _ in ts.examples)
    assert all(ex.kl_ids is not None for ex in sft), "teacher top-k did not reach the training examples"

    batch = collate(sft, tok.pad_token_id)
    with torch.no_grad():
        before, before_logs = _sft_loss(model, batch, cfg.train)
    base_state = _base_state(model)

    [out] = train_local(cfg, store, [TrainJob(entry.id, pdir, entry.prompt)], model, tok, str(tiny_model_dir),
                        progress=False)
    assert out.status == "trained", out
    stats = out.stats
    assert store.read_json(f"{pdir}/train.json") == stats

    # One sft batch and one pg batch per epoch (batch_size >= examples): the same batches every
    # epoch, so first and last losses of each kind are comparable.
    for kind in ("sft", "pg"):
        losses = [h["loss"] for h in stats["history"] if h["kind"] == kind]
        assert len(losses) == cfg.train.epochs
        assert losses[-1] < 0.8 * losses[0], f"{kind} loss did not drop: {losses}"
    assert stats["steps"] == 2 * cfg.train.epochs
    _assert_unchanged(model, base_state)

    # The saved adapter (plain PEFT) has learned what the history says.
    peft_model = PeftModel.from_pretrained(model, f"{pdir}/adapter")
    try:
        with torch.no_grad():
            after, after_logs = _sft_loss(peft_model, batch, cfg.train)
    finally:
        peft_model.unload()
    assert after < 0.8 * before, (before_logs, after_logs)
    assert after_logs["sft"] < before_logs["sft"]

    # The KL term alone is trainable too. (In the joint run above it may rise: memorising
    # the sampled tokens sharpens the student beyond the teacher's broad distribution.)
    kl_only = cfg.model_copy(update={"train": cfg.train.model_copy(update={"w_sft": 0.0, "w_pg": 0.0})})
    kl_job = TrainJob(entry.id, store.prompt_dir(entry.id, "fp-kl"), entry.prompt, data_dir=pdir)
    [out] = train_local(kl_only, store, [kl_job], model, tok, str(tiny_model_dir), progress=False)
    assert out.status == "trained", out
    kls = [h["kl"] for h in out.stats["history"] if h["kind"] == "sft"]
    assert kls[-1] < 0.8 * kls[0], kls
    assert store.exists(f"{kl_job.pdir}/adapter/adapter_model.safetensors")


# ------------------------------------------------------------------------------------------
def _step(model, pack, samples, cfg: TrainConfig):
    """One packed step's (joint loss, per-token means, token counts, chunk count, gradients)."""
    params = pack.parameters()
    for p in params:
        p.grad = None
    lasts: list[bool] = []

    def backward(loss, last):
        lasts.append(last)
        loss.backward()

    sums, counts = pack_step(model, pack, samples, cfg, 0, "cpu", backward=backward)
    assert lasts == [False] * (len(lasts) - 1) + [True]  # only the step's last chunk ends it
    loss, means = joint_loss(sums, counts, _weights(cfg))
    return float(loss[0]), means[0], counts[0], len(lasts), [p.grad.clone() for p in params]


def _pack_of_one(tiny_llama):
    model = tiny_llama()
    pack = PackedLora(model, 1, 4, 8)
    for n, p in pack.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would make every LoRA-A gradient zero
    return model, pack


@pytest.mark.parametrize("kind", ["sft", "pg"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_llama, kind):
    """A batch over train.max_batch_tokens runs as micro-batches; the loss it reports and the
    gradient it leaves are those of the whole batch at once (per-token means over the batch)."""
    rnd = random.Random(0)

    def example(n_prompt, n_target):
        ids = [rnd.randrange(2, 128) for _ in range(n_prompt + n_target)]
        labels = [-100] * n_prompt + ids[n_prompt:]
        mask = [False] * n_prompt + [True] * n_target
        rows = [[t, *rnd.sample(range(2, 128), 4)] if m else [] for t, m in zip(ids, mask)]
        lps = [[-0.4, -2.0, -2.5, -3.0, -3.5] if m else [] for m in mask]
        kl = kind == "sft"
        return EncodedExample(ids, labels, mask, rows if kl else None, lps if kl else None, n_target)

    exs = [example(rnd.randint(5, 30), rnd.randint(3, 20)) for _ in range(6)]
    samples = [(0, kind, ex) for ex in exs]
    model, pack = _pack_of_one(tiny_llama)

    def cfg(max_tokens):
        # fp32: the equality below is exact only there (bf16 rounds with the chunk's shape).
        return TrainConfig(max_batch_tokens=max_tokens, w_sft=0.5, w_pg=0.3, w_kl=1.0, autocast="off")

    whole_loss, whole_means, whole_counts, whole_chunks, whole_grads = _step(model, pack, samples, cfg(10_000))
    assert len(micro_batches(samples, 60, length=lambda s: len(s[2]))) >= 3
    split_loss, split_means, split_counts, split_chunks, split_grads = _step(model, pack, samples, cfg(60))
    assert split_chunks >= 3 and whole_chunks == 1
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for part in (0, 2) if kind == "sft" else (1,):  # (sft, kl) or pg
        assert whole_counts[part] > 0
        assert float(split_means[part]) == pytest.approx(float(whole_means[part]), rel=1e-5)
        assert split_counts[part] == whole_counts[part]
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # An example longer than the budget is never cut: it forms a micro-batch of its own.
    assert [len(g) for g in micro_batches(samples, 10, length=lambda s: len(s[2]))] == [1] * len(exs)


def test_micro_batches_count_kl_only_where_teacher_rows_are(tiny_llama):
    """A micro-batch without any teacher top-k rows has no KL part; the whole batch's KL mean
    is still taken over the rows that exist (no KeyError, same value as unsplit)."""
    rnd = random.Random(1)

    def example(with_kl):
        ids = [rnd.randrange(2, 128) for _ in range(20)]
        mask = [False] * 10 + [with_kl] * 10
        rows = [[t, *rnd.sample(range(2, 128), 3)] if m else [] for t, m in zip(ids, mask)]
        lps = [[-0.5, -2.0, -2.5, -3.0] if m else [] for m in mask]
        return EncodedExample(ids, [-100] * 10 + ids[10:], mask, rows if with_kl else None,
                              lps if with_kl else None, 10)

    exs = [example(False), example(False), example(True), example(True)]  # first chunk has no KL
    samples = [(0, "sft", ex) for ex in exs]
    model, pack = _pack_of_one(tiny_llama)
    _, whole_means, whole_counts, _, _ = _step(model, pack, samples, TrainConfig(max_batch_tokens=1000))
    _, split_means, split_counts, split_chunks, _ = _step(model, pack, samples, TrainConfig(max_batch_tokens=40))
    assert split_chunks == 2
    assert split_counts[2] == whole_counts[2] == 20  # positions 10..19 of the two KL examples
    assert float(split_means[2]) == pytest.approx(float(whole_means[2]), rel=1e-5)
    assert float(split_means[0]) == pytest.approx(float(whole_means[0]), rel=1e-5)


# ------------------------------------------------------------------------------------------
from fake_synth import train_jobs as _jobs  # noqa: E402


def _cfg(tiny_model_dir, pack_size: int):
    # fp32: packs of 2 and of 1 are compared exactly (bf16 rounds with the batch's shape).
    return load_config(None, [f"model.name={tiny_model_dir}", "train.autocast=off", "train.epochs=2", "train.batch_size=2",
                              "train.lora_r=4", "train.lora_alpha=8", "train.lr=5e-3", f"train.pack_size={pack_size}",
                              # a small on-policy phase: the packs compare it too, at a fraction of the default's time
                              "train.on_policy_epochs=1", "train.on_policy_max_new_tokens=8"])


def _adapter(pdir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{pdir}/adapter/adapter_model.safetensors")


def test_a_pack_of_two_writes_the_adapters_of_two_packs_of_one(tiny_model_dir, tmp_path):
    """train_local on 2 good prompts (and one with broken data): pack_size 2 and pack_size 1
    write the same adapters; the broken prompt fails alone; the base is left as it was."""
    from peft import PeftModel

    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    base_state = _base_state(model)
    adapters, packs = {}, {}
    for size in (2, 1):
        store = Store(tmp_path / f"pack{size}")
        jobs = _jobs(store, tok, ["fr1", "bad", "fr2"], broken={"bad"})
        outcomes = train_local(_cfg(tiny_model_dir, size), store, jobs, model, tok, str(tiny_model_dir),
                               progress=False)
        assert [o.prompt_id for o in outcomes] == ["fr1", "bad", "fr2"]
        status = {o.prompt_id: o for o in outcomes}
        assert status["bad"].status == "failed" and "to_be.parquet" in status["bad"].error
        assert not store.exists(f"{jobs[1].pdir}/adapter")
        for o in (status["fr1"], status["fr2"]):
            assert o.status == "trained", o
            assert store.read_json(f"{o.pdir}/train.json") == o.stats
            assert o.stats["pack_size"] == size and o.stats["workers"] == 1
            assert o.stats["steps"] == o.stats["planned_steps"] == 6 and o.stats["stop_reason"] == "finished"
        packs[size] = sorted(status[k].pack for k in ("fr1", "fr2"))
        adapters[size] = [_adapter(j.pdir) for j in (jobs[0], jobs[2])]
        _assert_unchanged(model, base_state)
    assert packs == {2: [0, 0], 1: [0, 1]}
    for packed, alone in zip(adapters[2], adapters[1]):
        assert packed.keys() == alone.keys()
        assert any(float(v.abs().max()) > 1e-4 for k, v in alone.items() if "lora_B" in k)  # it trained
        for key in alone:
            torch.testing.assert_close(packed[key], alone[key], rtol=1e-4, atol=2e-6)

    # A standard PEFT folder: plain PEFT loads it on the base, and it changes the output.
    ids = torch.tensor([tok.encode("Say hello.")])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(model, f"{jobs[0].pdir}/adapter")
        after = peft_model(input_ids=ids).logits
        peft_model.unload()
    assert (after - before).abs().max() > 1e-4


def test_train_local_skips_what_is_trained(tiny_model_dir, tmp_path):
    """An adapter already in the store is never trained again (files untouched); the others
    in the same call are trained."""
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(tmp_path / "store")
    cfg = _cfg(tiny_model_dir, 2)
    jobs = _jobs(store, tok, ["a", "b"])
    [first] = train_local(cfg, store, jobs[:1], model, tok, str(tiny_model_dir), progress=False)
    assert first.status == "trained"
    a_files = sorted((tmp_path / "store").rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in a_files if p.is_file() and "/prompts/b/" not in str(p)}

    outcomes = train_local(cfg, store, jobs, model, tok, str(tiny_model_dir), progress=False)
    assert [(o.prompt_id, o.status) for o in outcomes] == [("a", "skipped"), ("b", "trained")]
    assert outcomes[1].stats["pack_size"] == 1  # only b was left to train
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    again = train_local(cfg, store, jobs, model, tok, str(tiny_model_dir), progress=False)
    assert [o.status for o in again] == ["skipped", "skipped"]
