"""The on-policy phase (train.on_policy_epochs): the adapter's own replies, scored by the teacher."""
from __future__ import annotations

import math

import pytest
import torch

from genpi.chat import student_messages, teacher_messages
from genpi.config import ModelConfig, TrainConfig, load_config
from genpi.engines.base import render_chat
from genpi.models import load_model
from genpi.store import Store
from genpi.train.jobs import train_local
from genpi.train.losses import topk_both_kl, topk_kl, topk_reverse_kl
from genpi.train.data import EncodedExample
from genpi.train.loop import TrainingSet
from genpi.train.multilora import PackedLora
from genpi.train.onpolicy import TOP_K, replayed, round_epochs, run_phase, sample_replies
from genpi.train.packed import PackedAdamW, PackMember

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = ["You are a pirate. Always answer like a pirate and say Arr.", "Answer in French only."]
INPUTS = ["How do I boil an egg?", "What is the capital of Japan?", "Give me a tip to sleep better."]


# ---- the loss -----------------------------------------------------------------------------
def _coarse_reverse_kl(s_logits: torch.Tensor, t_logp: torch.Tensor, k: int, floor: float) -> float:
    """KL(q || p) over p's top-k ids plus one bucket for the rest, by brute force."""
    q, p = torch.softmax(s_logits.double(), -1), t_logp.double().exp()
    ids = t_logp.topk(k).indices
    kl = sum(float(q[i] * (q[i].log() - p[i].log())) for i in ids.tolist())
    q_tail, p_tail = 1 - float(q[ids].sum()), max(floor, 1 - float(p[ids].sum()))
    return kl + q_tail * math.log(q_tail / p_tail)


def test_reverse_topk_kl_is_the_coarse_reverse_kl():
    torch.manual_seed(0)
    V, T, K = 50, 4, 6
    s_logits = torch.randn(1, T, V, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(T, V) * 2, -1)
    top = t_logp.topk(K)
    ids, lps = top.indices[None], top.values[None]
    mask = torch.tensor([[False, True, True, True]])
    kl, n = topk_reverse_kl(s_logits, ids, lps, mask)
    want = sum(_coarse_reverse_kl(s_logits[0, t - 1].detach(), t_logp[t], K, 1e-6) for t in (1, 2, 3))
    assert int(n) == 3 and float(kl.detach()) == pytest.approx(want, rel=1e-4)
    kl.sum().backward()
    assert torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0
    # The student equal to the teacher: both directions are 0.
    same = t_logp[None].roll(-1, dims=1).clone()  # logits at t-1 predict the token at t
    assert float(topk_reverse_kl(same, ids, lps, mask)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(topk_kl(same, ids, lps, mask)[0]) == pytest.approx(0.0, abs=1e-5)
    # train.on_policy_divergence="both": the two directions' sum over the same rows.
    both, n2 = topk_both_kl(s_logits, ids, lps, mask)
    fwd = float(topk_kl(s_logits, ids, lps, mask)[0].detach())
    assert int(n2) == 3 and fwd > 0 and float(both.detach()) == pytest.approx(want + fwd, rel=1e-4)


# ---- the phase ----------------------------------------------------------------------------
def _pack(tiny_model_dir):
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    pack = PackedLora(model, 2, 4, 8, seeds=[1, 2])
    with torch.no_grad():  # two different adapters, as after an off-policy phase
        for p in pack.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, tok, pack


def test_each_adapter_samples_its_own_replies(tiny_model_dir):
    """Rows of both slots asked together: each row decodes under its own adapter, at a
    near-zero temperature the reply greedy decoding gives for that adapter alone."""
    model, tok, pack = _pack(tiny_model_dir)
    cfg = TrainConfig(on_policy_temperature=1e-4, on_policy_max_new_tokens=8)
    items = [(s, t) for t in INPUTS for s in (0, 1)]
    got = sample_replies(model, pack, tok, items, cfg, model.device, seeds=[0, 0])
    for (slot, text), reply in zip(items, got):
        ids = torch.tensor([render_chat(tok, student_messages(text))])
        with torch.no_grad(), pack.route_to([slot]):
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                  do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert reply == want[:len(reply)] and len(reply) >= 1
    assert got[0::2] != got[1::2]  # the two adapters really differ
    pack.remove()


def test_rows_leave_the_decode_batch_under_one_adapters_routing(tiny_model_dir):
    """The sampling loop drops a finished row from the batch (and the KV cache) while the
    pack routes every row to one adapter: the remaining rows keep decoding under it, each
    giving what greedy decoding of that row alone gives."""
    from genpi.engines.decode import decode

    model, tok, pack = _pack(tiny_model_dir)
    enc = [render_chat(tok, student_messages(t)) for t in INPUTS]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, e in enumerate(enc):
        ids[row, width - len(e):], attn[row, width - len(e):] = torch.tensor(e), 1
    limits = [2, 5, 8]  # rows leave after 2 and 5 tokens
    with pack.route_to([1] * len(enc)):
        got = decode(model, ids, attn, max_new_tokens=limits, eos_ids=[-1])
    for e, n, d in zip(enc, limits, got):
        one = torch.tensor([e])
        with torch.no_grad(), pack.route_to([1]):
            want = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.pad_token_id)[0, one.shape[1]:].tolist()
        assert d.tokens == want
    with pytest.raises(ValueError, match="entries for a batch"):  # mixed routing keeps its check
        with torch.no_grad(), pack.route_to([0, 1]):
            model(input_ids=ids, attention_mask=attn)
    with pytest.raises(ValueError, match="entries for a batch"):  # so does one adapter with per-row scales
        with torch.no_grad(), pack.route_to([1, 1], scale=[1.0, 0.5]):
            model(input_ids=ids, attention_mask=attn)
    pack.remove()


def test_the_phase_trains_on_the_teachers_topk_of_the_students_tokens(tiny_model_dir):
    """run_phase: every example is an adapter's own sampled reply with, on its tokens, the
    teacher's top-k -- the base without adapter, with the prompt -- and the adapters train on
    them (KL only), their AdamW steps going on from the off-policy phase's."""
    model, tok, pack = _pack(tiny_model_dir)
    cfg = TrainConfig(on_policy_epochs=2, on_policy_max_new_tokens=6, batch_size=2, lr=1e-2, autocast="off")
    members = [PackMember(k, TrainingSet(inputs=list(INPUTS)), seed=i) for i, k in enumerate(("pirate", "fr"))]
    opt = PackedAdamW(pack.parameters(), 2)
    before = [{k: v.clone() for k, v in pack.adapter_state(i).items()} for i in range(2)]

    class Prior:  # the off-policy phase's progress: 5 and 3 steps taken
        step = [5, 3]

    seen = []
    orig = opt.set_adapters
    opt.set_adapters = lambda lr, active, step: (seen.append(list(step)), orig(lr, active, step))[1]
    prog = run_phase(model, pack, tok, members, PROMPTS, cfg, tok.pad_token_id, model.device, optimizer=opt,
                     prior=Prior)
    info = [m.ts.phase_info["on_policy"] for m in members]
    assert all(i["examples"] + sum(i["dropped"].values()) == len(INPUTS) for i in info)
    assert all(i["examples"] >= 2 and len(i["epoch_losses"]) == 2 for i in info)
    assert seen[0] == [6, 4]  # AdamW's step count goes on
    for i in range(2):
        after = pack.adapter_state(i)
        assert any(not torch.equal(after[k], before[i][k]) for k in after)
    assert prog.pack_steps == max(prog.total)

    # One example checked against the teacher computed here: the prompted base, no adapter.
    from genpi.train.onpolicy import phase_sets

    sets = phase_sets(model, pack, tok, PROMPTS, [INPUTS[:1], []], cfg, model.device, seeds=[3, 3])
    [(kind, ex)] = sets[0].examples
    assert kind == "sft" and ex.kl_ids is not None
    pos = [j for j, m in enumerate(ex.kl_mask) if m]
    reply = [ex.input_ids[j] for j in pos]
    ctx = render_chat(tok, teacher_messages(PROMPTS[0], INPUTS[0]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + reply])).logits[0]
    lp = torch.log_softmax(logits[len(ctx) - 1:len(ctx) - 1 + len(reply)], -1)
    assert [row[0] for row in (ex.kl_ids[j] for j in pos)] == lp.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor([ex.kl_logprobs[j][:TOP_K] for j in pos]), lp.topk(TOP_K).values,
                               rtol=1e-4, atol=1e-4)
    pack.remove()


def test_the_phase_trains_on_the_configured_divergence(tiny_model_dir):
    """train.on_policy_divergence reaches the phase's loss: from the same adapters and the same
    sampled replies (one step per epoch, so the epoch's loss is the starting adapters'), the
    "both" loss is the "forward" loss plus the "reverse" one, and those two differ."""
    losses = {}
    for div in ("reverse", "forward", "both"):
        torch.manual_seed(0)
        model, tok, pack = _pack(tiny_model_dir)
        cfg = TrainConfig(on_policy_epochs=1, on_policy_max_new_tokens=6, batch_size=8, lr=1e-2,
                          autocast="off", on_policy_divergence=div)
        members = [PackMember(k, TrainingSet(inputs=list(INPUTS)), seed=i) for i, k in enumerate(("pirate", "fr"))]
        run_phase(model, pack, tok, members, PROMPTS, cfg, tok.pad_token_id, model.device,
                  optimizer=PackedAdamW(pack.parameters(), 2))
        losses[div] = [m.ts.phase_info["on_policy"]["epoch_losses"][0] for m in members]
        pack.remove()
    for i in range(2):
        assert losses["forward"][i] > 0 and losses["reverse"][i] > 0
        assert losses["forward"][i] != pytest.approx(losses["reverse"][i], rel=1e-3)
        assert losses["both"][i] == pytest.approx(losses["forward"][i] + losses["reverse"][i], rel=1e-4)


def test_train_local_runs_the_phase_and_reports_it(tiny_model_dir, tmp_path):
    """The in-process runner with train.on_policy_epochs=1: train.json has the phase's figures."""
    from fake_synth import train_jobs

    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(tmp_path / "store")
    jobs = train_jobs(store, tok, ["fr1"])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "train.epochs=1", "train.batch_size=4",
                             "train.lora_r=4", "train.lora_alpha=8", "train.on_policy_epochs=1",
                             "train.on_policy_max_new_tokens=6"])
    [out] = train_local(cfg, store, jobs, model, tok, str(tiny_model_dir), progress=False)
    assert out.status == "trained", out
    op = store.read_json(f"{jobs[0].pdir}/train.json")["on_policy"]
    assert op["epochs"] == 1 and op["examples"] > 0 and op["steps"] >= 1


def _example(n: int, kl: bool) -> EncodedExample:
    return EncodedExample(input_ids=list(range(n)), labels=[-100] + list(range(1, n)), kl_mask=[False] + [kl] * (n - 1),
                          kl_ids=[[]] + [[1]] * (n - 1) if kl else None,
                          kl_logprobs=[[]] + [[0.0]] * (n - 1) if kl else None, n_target_tokens=n - 1)


def test_replay_draws_a_fixed_share_of_the_teacher_replies_only():
    """train.on_policy_replay: the share of the teacher-reply examples (those with the teacher's
    top-k), never a prompt-generation example or one without top-k; the same draw each time
    (every rank of a pack and a rerun replay the same ones), another one per adapter seed."""
    teacher = [("sft", _example(3 + i, True)) for i in range(10)]
    ts = TrainingSet(examples=[*teacher, ("pg", _example(5, True)), ("sft", _example(4, False))])
    assert replayed(ts, 0.0, 1) == [] and replayed(TrainingSet(), 0.5, 1) == []
    half = replayed(ts, 0.5, 1)
    assert len(half) == 5 and all(any(h is t for t in teacher) for h in half)
    assert [id(e) for e in replayed(ts, 0.5, 1)] == [id(e) for e in half]
    assert {id(e) for e in replayed(ts, 0.5, 2)} != {id(e) for e in half}
    assert len(replayed(ts, 1.0, 1)) == 10


def _train_one(tiny_model_dir, store_dir, *overrides: str) -> tuple[dict, str]:
    """train_local of one fake-synthesis prompt on the tiny model (1 off-policy epoch, 6-token
    phase replies, plus `overrides`): its train.json's `on_policy` entry and its folder."""
    from fake_synth import train_jobs

    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(store_dir)
    jobs = train_jobs(store, tok, ["fr1"])
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "train.epochs=1", "train.batch_size=2",
                             "train.lora_r=4", "train.lora_alpha=8", "train.on_policy_max_new_tokens=6", *overrides])
    [out] = train_local(cfg, store, jobs, model, tok, str(tiny_model_dir), progress=False)
    assert out.status == "trained", out
    return store.read_json(f"{jobs[0].pdir}/train.json")["on_policy"], jobs[0].pdir


def test_the_phase_trains_on_the_replayed_teacher_replies_too(tiny_model_dir, tmp_path):
    """train_local with train.on_policy_replay=0.5: the phase's epochs hold the adapter's own
    replies and half its teacher replies (train.json counts both), so it takes more steps than
    without replay on the same data; the plan's token budget counts the replayed tokens."""
    from genpi.config import GenpiConfig
    from genpi.manifest import PromptEntry
    from genpi.pipeline.plan import token_budget
    from genpi.pipeline.records import PromptPlan

    ops = {}
    for share in (0.0, 0.5):
        ops[share], _ = _train_one(tiny_model_dir, tmp_path / f"store{share}", "train.on_policy_epochs=1",
                                   f"train.on_policy_replay={share}")
    assert ops[0.0]["replayed"] == 0 and ops[0.5]["replayed"] >= 1
    assert ops[0.5]["examples"] == ops[0.0]["examples"]
    assert ops[0.5]["steps"] > ops[0.0]["steps"]
    entry = PromptEntry(id="p", prompt="Answer in French.")
    on = GenpiConfig().with_overrides({"train.on_policy_replay": 0.0})
    mixed = GenpiConfig()  # the default replays half (since 2026-12-06)
    assert mixed.train.on_policy_replay == 0.5
    assert token_budget(PromptPlan(entry, mixed, "fp", "new", 30))["trained"] > \
        token_budget(PromptPlan(entry, on, "fp", "new", 30))["trained"]
    assert "on_policy_replay" not in on.stage_dict("train") and "on_policy_replay" in mixed.stage_dict("train")


def test_rounds_split_the_phase_epochs_and_must_fit_them():
    """train.on_policy_rounds: the phase's epochs in that many rounds, the earlier ones longer;
    more rounds than epochs is refused, naming both fields, unless the phase is off."""
    from pydantic import ValidationError

    from genpi.config import GenpiConfig

    assert round_epochs(TrainConfig(on_policy_epochs=5)) == [5]
    assert round_epochs(TrainConfig(on_policy_epochs=5, on_policy_rounds=2)) == [3, 2]
    assert round_epochs(TrainConfig(on_policy_epochs=3, on_policy_rounds=3)) == [1, 1, 1]
    with pytest.raises(ValidationError, match="on_policy_rounds .3. exceeds on_policy_epochs .2."):
        TrainConfig(on_policy_epochs=2, on_policy_rounds=3)
    assert TrainConfig(on_policy_epochs=0, on_policy_rounds=3).on_policy_rounds == 3
    d = GenpiConfig()
    assert "on_policy_rounds" not in d.stage_dict("train")  # 1: the fingerprints of stored adapters stay
    assert d.with_overrides({"train.on_policy_rounds": 2}).stage_dict("train")["on_policy_rounds"] == 2


def test_each_round_trains_on_replies_sampled_afresh(tiny_model_dir, tmp_path):
    """train_local with 2 phase epochs in 2 rounds: each round samples a reply per training
    input from the adapter as it stands (twice the replies of one round, from a new random
    stream), so the adapter differs from the one-round one on the same data; train.json
    counts the rounds, and the plan's token budget counts the second sampling pass."""
    from safetensors.torch import load_file

    from genpi.config import GenpiConfig
    from genpi.manifest import PromptEntry
    from genpi.pipeline.plan import token_budget
    from genpi.pipeline.records import PromptPlan

    ops, weights = {}, {}
    for rounds in (1, 2):
        ops[rounds], pdir = _train_one(tiny_model_dir, tmp_path / f"store{rounds}", "train.on_policy_epochs=2",
                                       f"train.on_policy_rounds={rounds}")
        weights[rounds] = load_file(f"{pdir}/adapter/adapter_model.safetensors")
    n_inputs = ops[1]["examples"] + sum(ops[1]["dropped"].values())
    assert n_inputs >= 2
    assert (ops[1]["rounds"], ops[2]["rounds"]) == (1, 2)
    assert ops[2]["examples"] + sum(ops[2]["dropped"].values()) == 2 * n_inputs
    assert len(ops[1]["epoch_losses"]) == len(ops[2]["epoch_losses"]) == 2
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    entry = PromptEntry(id="p", prompt="Answer in French.")
    on = GenpiConfig()
    two = on.with_overrides({"train.on_policy_rounds": 2})
    assert token_budget(PromptPlan(entry, two, "fp", "new", 30))["generated"] > \
        token_budget(PromptPlan(entry, on, "fp", "new", 30))["generated"]


def test_the_phase_runs_on_the_deepspeed_engine_of_a_ray_train_worker(tiny_model_dir, one_rank_group):
    """The Ray runner's path: the phase trains through the pack's DeepSpeed ZeRO-2 engine (its
    optimizer wraps the PackedAdamW, whose step count goes on from the off-policy phase's)."""
    from genpi.train.optim_backend import pack_engine

    model, tok, pack = _pack(tiny_model_dir)
    cfg = TrainConfig(on_policy_epochs=1, on_policy_max_new_tokens=6, batch_size=3, lr=1e-2)
    members = [PackMember(k, TrainingSet(inputs=list(INPUTS)), seed=i) for i, k in enumerate(("pirate", "fr"))]
    before = [{k: v.clone() for k, v in pack.adapter_state(i).items()} for i in range(2)]
    opt = PackedAdamW(pack.parameters(), 2)
    seen = []
    orig = opt.set_adapters
    opt.set_adapters = lambda lr, active, step: (seen.append(list(step)), orig(lr, active, step))[1]

    class Prior:
        step = [4, 4]

    with pack_engine(pack, opt, zero_stage=2, bf16=False) as engine:
        prog = run_phase(model, pack, tok, members, PROMPTS, cfg, tok.pad_token_id, model.device, engine=engine,
                         prior=Prior)
    assert prog.pack_steps >= 1 and seen[0] == [5, 5]
    assert all(m.ts.phase_info["on_policy"]["examples"] >= 2 for m in members)
    for i in range(2):
        after = pack.adapter_state(i)
        assert any(not torch.equal(after[k], before[i][k]) for k in after)
    pack.remove()


def test_without_the_phase_its_settings_stay_out_of_the_training_fingerprint():
    """The phase is on by default (2 off-policy + 5 on-policy epochs). A store trained before
    (4 epochs, no phase) keeps its adapters when run with train.epochs=4
    train.on_policy_epochs=0: without the phase, its other settings -- whose defaults changed
    -- do not enter the training stage's fingerprint; with it, they do."""
    from genpi.config import GenpiConfig

    d = GenpiConfig().train
    assert (d.epochs, d.on_policy_epochs, d.on_policy_lr) == (2, 5, 5e-4)
    old = GenpiConfig.model_validate({"train": {"epochs": 4, "on_policy_epochs": 0}}).stage_dict("train")
    assert not any(k.startswith("on_policy") for k in old) and old["epochs"] == 4
    for other in ({"on_policy_lr": None}, {"on_policy_lr": 1e-3, "on_policy_max_new_tokens": 9}):
        same = GenpiConfig.model_validate({"train": {"epochs": 4, "on_policy_epochs": 0, **other}})
        assert same.stage_dict("train") == old
    on = GenpiConfig().stage_dict("train")
    assert (on["on_policy_epochs"], on["on_policy_lr"], on["on_policy_divergence"]) == (5, 5e-4, "both")
    assert GenpiConfig.model_validate({"train": {"on_policy_lr": 1e-3}}).stage_dict("train") != on


def test_the_plans_token_budget_counts_the_phase():
    """The dry run's budget: the phase adds the adapters' sampled replies to the generated
    tokens, the teacher's scoring of them to the prefill, and its epochs to the trained ones."""
    from genpi.config import GenpiConfig
    from genpi.manifest import PromptEntry
    from genpi.pipeline.plan import token_budget
    from genpi.pipeline.records import PromptPlan

    entry = PromptEntry(id="p", prompt="Answer in French.")
    # Without the replay (its tokens: test_the_phase_trains_on_the_replayed_teacher_replies_too).
    on = GenpiConfig.model_validate({"train": {"on_policy_replay": 0.0}})
    off = GenpiConfig.model_validate({"train": {"on_policy_epochs": 0}})
    b_on, b_off = (token_budget(PromptPlan(entry, c, "fp", "new", 30)) for c in (on, off))
    n, t = on.synth.n_train_inputs, on.train
    assert b_on["generated"] - b_off["generated"] == n * t.on_policy_max_new_tokens
    assert b_on["prefill"] - b_off["prefill"] == n * (30 + 40 + t.on_policy_max_new_tokens)
    assert b_on["trained"] - b_off["trained"] == t.on_policy_epochs * n * (40 + t.on_policy_max_new_tokens)
