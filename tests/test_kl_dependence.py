"""Prompt dependence (train.kl_min_dependence): examples whose teacher reply the base already
gives without the prompt leave the KL term; the others train as before.

Real torch on a tiny random model. "Independent" examples carry top-k rows taken from the
base model's own distribution on the student's input (what a teacher whose prompt changes
nothing would give); "dependent" ones carry another distribution."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from genpi.config import TrainConfig, load_config
from genpi.train import dependence, validation
from genpi.train.data import EncodedExample, collate
from genpi.train.loop import TrainingSet
from genpi.train.losses import topk_kl
from genpi.train.multilora import PackedLora
from genpi.train.onpolicy import phase_config
from genpi.train.packed import PackedAdamW, PackMember, adapter_stats, train_pack

from test_packed_train import CFG, PAD, VOCAB, _example

pytestmark = pytest.mark.usefixtures("single_thread_torch")
K = 8


def _base_rows(model, ex: EncodedExample) -> EncodedExample:
    """ex with its teacher rows replaced by the model's own top-K at each KL position."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0].float(), -1)
    ids, lps = [], []
    for t, on in enumerate(ex.kl_mask):
        if not on:
            ids.append([]), lps.append([])
            continue
        top = lp[t - 1].topk(K)  # position t is predicted from t - 1
        ids.append(top.indices.tolist()), lps.append(top.values.tolist())
    return dataclasses.replace(ex, kl_ids=ids, kl_logprobs=lps)


def _set(model, seed: int, n_dep: int, n_indep: int, n_pg: int = 1) -> tuple[TrainingSet, set[int]]:
    """A training set with dependent and independent SFT examples (shuffled) and PG examples;
    the positions of the independent ones."""
    rnd = random.Random(seed)
    exs = [("dep", _example(rnd, "sft", True)) for _ in range(n_dep)]
    exs += [("indep", _base_rows(model, _example(rnd, "sft", True))) for _ in range(n_indep)]
    rnd.shuffle(exs)
    ts = TrainingSet()
    ts.examples = [("sft", ex) for _, ex in exs] + [("pg", _example(rnd, "pg", False)) for _ in range(n_pg)]
    return ts, {i for i, (tag, _) in enumerate(exs) if tag == "indep"}


def _pack(model, n: int):
    return PackedLora(model, n, CFG.lora_r, CFG.lora_alpha, seeds=list(range(1, n + 1)))


def test_the_base_scores_its_own_rows_near_zero_and_other_rows_well_above(tiny_llama):
    """example_kl with slot -1 is the top-k KL of the bare base, per example, as the loss
    computes it; a trained-looking adapter in the pack changes nothing about it."""
    model = tiny_llama(seed=0)
    ts, indep = _set(model, 0, 5, 4)
    pack = _pack(model, 2)
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_(std=0.2)  # adapters far from the base: slot -1 must not see them
    items = [(-1, ex) for kind, ex in ts.examples if kind == "sft"]
    rows = validation.example_kl(model, pack, items, CFG, PAD, "cpu")
    dep = (rows[:, 0] / rows[:, 1]).tolist()
    assert max(dep[i] for i in indep) < 1e-4
    assert min(dep[i] for i in range(len(items)) if i not in indep) > 0.1
    for (_, ex), (s, n) in zip(items, rows.tolist()):  # each row is that example alone, on the base
        b = collate([ex], PAD)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        kl, want_n = topk_kl(logits, b["kl_ids"], b["kl_logprobs"], b["kl_mask"])
        assert (s, n) == pytest.approx((float(kl[0]), float(want_n[0])), rel=1e-4, abs=1e-6)


def test_independent_examples_leave_the_kl_term_and_keep_their_sft_term(tiny_llama):
    model = tiny_llama(seed=0)
    ts, indep = _set(model, 1, 6, 3)
    before = [(k, ex) for k, ex in ts.examples]
    member = PackMember("a", ts)
    cfg = CFG.model_copy(update={"kl_min_dependence": 0.01})
    dependence.apply(model, _pack(model, 1), [member], cfg, PAD, "cpu")
    for i, ((kind, old), (_, new)) in enumerate(zip(before, ts.examples)):
        assert new.input_ids == old.input_ids and new.labels == old.labels  # SFT unchanged
        if kind == "sft" and i in indep:
            assert not any(new.kl_mask)
        else:
            assert new is old
    info = ts.phase_info["kl_dependence"]
    assert (info["scored"], info["dropped_from_kl"], info["min"]) == (9, 3, 0.01)
    assert info["p10"] < 0.01 < info["p90"]
    # Applied once: a second call (the same pack's resumed loop) changes nothing.
    again = list(ts.examples)
    dependence.apply(model, _pack(model, 1), [member], cfg, PAD, "cpu")
    assert ts.examples == again


def test_off_by_default_and_in_the_on_policy_phase(tiny_llama, monkeypatch):
    assert TrainConfig().kl_min_dependence == 0.0
    assert phase_config(TrainConfig(kl_min_dependence=0.05, on_policy_epochs=1)).kl_min_dependence == 0.0
    monkeypatch.setattr(validation, "example_kl", lambda *a, **k: pytest.fail("scored while off"))
    model = tiny_llama(seed=0)
    ts, _ = _set(model, 2, 2, 2)
    dependence.apply(model, _pack(model, 1), [PackMember("a", ts)], CFG, PAD, "cpu")
    assert "kl_dependence" not in ts.phase_info
    with pytest.raises(ValueError, match="kl_min_dependence"):
        load_config(None, ["train.kl_min_dependence=-1"])


def _trained(tiny_llama, sets, cfg):
    model = tiny_llama(seed=0)
    members = [PackMember(k, ts, seed=100 + i) for i, (k, ts) in enumerate(sets)]
    pack = _pack(model, len(members))
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.grad_clip)
    prog = train_pack(model, pack, members, cfg, PAD, optimizer=opt)
    return pack, prog, members


def test_a_pack_trained_with_the_threshold_equals_one_trained_without_those_kl_rows(tiny_llama):
    """In a pack of two: with train.kl_min_dependence, each adapter ends exactly as the same
    pack trained without the option on data whose independent examples have no KL rows;
    and differs from the pack trained on everything. train.json reports the drops."""
    ref = tiny_llama(seed=0)  # the same weights as every model built below
    a, ia = _set(ref, 3, 6, 4)
    b, ib = _set(ref, 4, 5, 2)
    cfg = CFG.model_copy(update={"kl_min_dependence": 0.01, "epochs": 2})

    def copy(ts):
        out = TrainingSet()
        out.examples = list(ts.examples)
        return out

    def cleared(ts, indep):
        out = copy(ts)
        out.examples = [(k, dataclasses.replace(ex, kl_mask=[False] * len(ex)) if k == "sft" and i in indep else ex)
                        for i, (k, ex) in enumerate(ts.examples)]
        return out

    got, prog, members = _trained(tiny_llama, [("a", copy(a)), ("b", copy(b))], cfg)
    want, _, _ = _trained(tiny_llama, [("a", cleared(a, ia)), ("b", cleared(b, ib))],
                          cfg.model_copy(update={"kl_min_dependence": 0.0}))
    every, _, _ = _trained(tiny_llama, [("a", copy(a)), ("b", copy(b))], cfg.model_copy(update={"kl_min_dependence": 0.0}))
    for i in range(2):
        g, w, e = got.adapter_state(i), want.adapter_state(i), every.adapter_state(i)
        for key in w:
            torch.testing.assert_close(g[key], w[key], rtol=1e-5, atol=1e-7)
        assert any(not torch.allclose(g[key], e[key], rtol=1e-4, atol=1e-6) for key in w)
    stats = [adapter_stats(prog, i, m)["kl_dependence"] for i, m in enumerate(members)]
    assert [(s["scored"], s["dropped_from_kl"]) for s in stats] == [(10, 4), (7, 2)]


def test_off_leaves_the_training_fingerprint_of_existing_stores_unchanged():
    """Every store trained before the option has kl_min_dependence 0 in effect: at 0 it stays
    out of the training stage's fingerprint (finished adapters are not trained again after an
    upgrade); set, it enters it."""
    from genpi.config import GenpiConfig

    assert "kl_min_dependence" not in GenpiConfig().stage_dict("train")
    on = GenpiConfig.model_validate({"train": {"kl_min_dependence": 0.05}})
    assert on.stage_dict("train")["kl_min_dependence"] == 0.05
