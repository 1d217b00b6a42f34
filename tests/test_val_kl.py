"""Held-out KL per prompt (train.val_inputs): a few inputs per prompt are kept out of training,
each adapter is scored on them after every epoch, the adapter written is its best epoch's,
and early stopping reads that KL.

Real torch on tiny random models. Where a test needs the KL to rise or fall on cue, it keeps
the real scoring pass and replaces only the numbers it returns (named "scripted")."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from genpi.config import ModelConfig, TrainConfig, load_config
from genpi.models import load_model
from genpi.store import Store
from genpi.train import validation
from genpi.train.data import collate
from genpi.train.jobs import TrainJob, train_local
from genpi.train.loop import build_examples, make_batches
from genpi.train.losses import topk_kl
from genpi.train.multilora import PackedLora
from genpi.train.packed import PackedAdamW, PackMember, PackProgress, adapter_stats, member_batches, train_pack

from fake_synth import REPLIES, train_jobs, write_synth
from test_packed_train import CFG, MEMBERS, PAD, _training_set

PROMPT = "Always answer in French."
WORDS = ["zebra", "violin", "harbour", "quartz", "meadow", "lantern"]

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---- which examples are held out ---------------------------------------------------------
def _turn(tok, rnd, text: str, topk: bool = True) -> dict:
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    turn = {"text": text, "token_ids": ids, "finish_reason": "stop", "topk_ids": None, "topk_logprobs": None}
    if topk:
        turn["topk_ids"] = [[t, *rnd.sample(range(1000, 2000), 3)] for t in ids]
        turn["topk_logprobs"] = [[-0.3, -2.0, -2.5, -3.0] for _ in ids]
    return turn


def _synth(tok, no_topk=()) -> dict:
    """Synthesis of one prompt with every kind of example an input gives: a greedy and a
    sampled teacher reply, a prompt-generation example, and (first 3 inputs) a role-played
    conversation that starts from it. Each input names a word no other input uses."""
    rnd = random.Random(0)
    inputs = [f"Tell me about the {w}." for w in WORDS]
    to_be, as_is, convs = [], [], []
    for i, x in enumerate(inputs):
        for s in (0, 1):
            turn = _turn(tok, rnd, REPLIES[(i + s) % len(REPLIES)], topk=not (s == 0 and i in no_topk))
            to_be.append({"input_idx": i, "input": x, "sample": s, **turn})
        as_is.append({"input_idx": i, "input": x, "sample": 0, **_turn(tok, rnd, "Hello.", topk=False)})
        if i < 3:
            greedy = to_be[-2]
            second = _turn(tok, rnd, REPLIES[-1])
            convs.append({"input_idx": i, "agent_turns": 2, "messages": [
                {"role": "user", "content": x},
                {"role": "assistant", "content": greedy["text"], "token_ids": greedy["token_ids"],
                 "topk_ids": greedy["topk_ids"], "topk_logprobs": greedy["topk_logprobs"]},
                {"role": "user", "content": f"And what else about the {WORDS[i]}?"},
                {"role": "assistant", "content": second["text"], "token_ids": second["token_ids"],
                 "topk_ids": second["topk_ids"], "topk_logprobs": second["topk_logprobs"]}]})
    return {"inputs": [{"input": x, "split": "train"} for x in inputs], "to_be": to_be, "as_is": as_is,
            "reasons": [{"input_idx": i, "reason": "French."} for i in range(len(inputs))],
            "conversations": convs, "paraphrase": None}


def _words(tok, examples) -> set[str]:
    return {w for ex in examples for w in WORDS if w in tok.decode(ex.input_ids)}


def test_validation_inputs_and_all_their_examples_stay_out_of_training(smollm_tokenizer):
    tok, synth = smollm_tokenizer, _synth(smollm_tokenizer)
    ts = build_examples(tok, synth, PROMPT, TrainConfig(val_inputs=2))
    held = _words(tok, ts.val)
    assert len(ts.val) == len(held) == 2
    assert all(ex.kl_ids is not None and any(ex.kl_mask) for ex in ts.val)  # scored on the teacher's top-k
    # Nothing of a held-out input is trained on: replies, conversations, prompt generation.
    assert not held & _words(tok, [ex for _, ex in ts.examples])
    for kind in ("sft", "pg"):
        assert _words(tok, [ex for k, ex in ts.examples if k == kind]) == set(WORDS) - held
    off = build_examples(tok, synth, PROMPT, TrainConfig())
    assert ts.val_info == {"val_held_out_examples": 6}  # per input: 2 replies, 1 PG example
    assert len(off.examples) == len(ts.examples) + 6 and not off.val and off.val_info == {}

    # The same inputs every time (every rank, every rerun); another seed or prompt, others.
    again = build_examples(tok, synth, PROMPT, TrainConfig(val_inputs=2))
    assert [ex.input_ids for ex in again.val] == [ex.input_ids for ex in ts.val]
    by_seed = {frozenset(_words(tok, build_examples(tok, synth, PROMPT, TrainConfig(val_inputs=2, seed=s)).val))
               for s in range(6)}
    by_prompt = {frozenset(_words(tok, build_examples(tok, synth, f"{PROMPT} {s}", TrainConfig(val_inputs=2)).val))
                 for s in range(6)}
    assert len(by_seed) > 1 and len(by_prompt) > 1


def test_too_few_usable_inputs_train_without_validation(smollm_tokenizer):
    """An input whose greedy reply has no teacher top-k cannot be scored: it is never held
    out, and a prompt left with fewer than val_inputs + 1 usable inputs trains on all."""
    tok = smollm_tokenizer
    synth = _synth(tok, no_topk={0})
    for seed in range(5):
        assert WORDS[0] not in _words(tok, build_examples(tok, synth, PROMPT, TrainConfig(val_inputs=4, seed=seed)).val)
    short = build_examples(tok, synth, PROMPT, TrainConfig(val_inputs=5))
    off = build_examples(tok, synth, PROMPT, TrainConfig())
    assert short.val == [] and short.val_info["val_off"].startswith("5 usable inputs")
    assert [(k, ex.input_ids) for k, ex in short.examples] == [(k, ex.input_ids) for k, ex in off.examples]


# ---- scoring -----------------------------------------------------------------------------
def _val(seed: int, n: int = 3):
    return [ex for _, ex in _training_set(seed, n, 0).examples if ex.kl_ids is not None]


def test_score_is_each_adapters_mean_topk_kl_split_over_ranks_as_over_one(tiny_llama, monkeypatch):
    """The score is adapter i's per-token mean top-k KL on its own examples (as the loss
    computes it), in eval mode and without gradient, whatever the chunking; on 2 ranks each
    scores its share, both make exactly one collective (on the parameters' device, even a
    rank with nothing to score), and the sums give the one-rank numbers."""
    model = tiny_llama(seed=0)
    pack = PackedLora(model, 3, CFG.lora_r, CFG.lora_alpha, seeds=[1, 2, 3])
    with torch.no_grad():
        for p in pack.parameters():
            p.normal_(std=0.2)  # B = 0 would make every adapter the base model
    vals = {0: _val(5, 6), 2: _val(6, 3)}
    model.train()
    got = validation.score(model, pack, vals, CFG, PAD, "cpu")
    assert model.training and all(p.grad is None for p in pack.parameters())
    assert set(got) == {0, 2}
    for slot, exs in vals.items():
        batch = collate(exs, PAD)
        model.eval()
        with torch.no_grad(), pack.route_to([slot] * len(exs)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl, n = topk_kl(logits, batch["kl_ids"], batch["kl_logprobs"], batch["kl_mask"])
        assert got[slot] == pytest.approx(float(kl.sum() / n.sum()), rel=1e-5)
    assert got[0] != pytest.approx(got[2], rel=1e-3)
    chunked = validation.score(model, pack, vals, CFG.model_copy(update={"max_batch_tokens": 24}), PAD, "cpu")
    assert chunked == pytest.approx(got, rel=1e-6)

    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: seen.append(t.clone()))
    for rank in (0, 1):
        validation.score(model, pack, vals, CFG, PAD, "cpu", rank=rank, world=2)
    assert len(seen) == 2 and all(t.device == pack.parameters()[0].device for t in seen)
    total = seen[0] + seen[1]  # one row per example, in the order of `vals`
    slots = torch.tensor([s for s in sorted(vals) for _ in vals[s]])
    assert {s: float(total[slots == s, 0].sum() / total[slots == s, 1].sum()) for s in vals} == \
        pytest.approx(got, rel=1e-6)
    seen.clear()
    validation.score(model, pack, {0: _val(5, 1)}, CFG, PAD, "cpu", rank=1, world=2)  # nothing to score
    assert len(seen) == 1 and float(seen[0].abs().sum()) == 0.0


# ---- the pack: best epoch, early stopping, resume ----------------------------------------
REAL_SCORE, REAL_RECORD = validation.score, validation.record


class Scripted:
    """The real score, then the KL values a test scripts, per slot and epoch."""

    def __init__(self, monkeypatch, script: dict[int, list[float]]):
        self.script, self.calls = script, {i: 0 for i in script}
        self.snapshots: dict[int, list[dict]] = {i: [] for i in script}  # weights at each epoch's end
        real_score, real_record = REAL_SCORE, REAL_RECORD  # never an earlier Scripted's

        def score(model, pack, vals, *args, **kwargs):
            real = real_score(model, pack, vals, *args, **kwargs)
            assert set(real) == set(vals)
            for i in vals:
                real[i] = self.script[i][self.calls[i]]
                self.calls[i] += 1
            return real

        def record(prog, pack, i, kl):
            # adapter_state may alias the live float32 parameters on the CPU: copy.
            self.snapshots[i].append({k: v.clone() for k, v in pack.adapter_state(i).items()})
            real_record(prog, pack, i, kl)

        monkeypatch.setattr(validation, "score", score)
        monkeypatch.setattr(validation, "record", record)


def _members(with_val=(0, 1)):
    out = []
    for i, (key, n_sft, n_pg) in enumerate(MEMBERS):
        ts = _training_set(i, n_sft, n_pg)
        if i in with_val:
            ts.val = _val(50 + i)
        out.append(PackMember(key, ts, seed=100 + i))
    return out


def _train(tiny_llama, members, cfg, **kwargs):
    model = tiny_llama(seed=0)
    pack = PackedLora(model, len(members), cfg.lora_r, cfg.lora_alpha, seeds=[m.seed for m in members])
    opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.grad_clip)
    return pack, opt, train_pack(model, pack, members, cfg, PAD, optimizer=opt, **kwargs)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_val_kl_stops_one_adapter_early_and_the_pack_goes_on(tiny_llama, monkeypatch):
    """Scripted KL: adapter 0 gets worse after epoch 1 (patience 1: it stops after epoch 2
    and ends with its epoch-1 weights), adapter 1 improves every epoch (all 4 epochs, its
    last weights). Adapter 2 has no validation: it trains exactly as alone, without any."""
    cfg = CFG.model_copy(update={"epochs": 4, "early_stop_patience": 1})
    members = _members()
    scripted = Scripted(monkeypatch, {0: [2.0, 2.5], 1: [3.0, 2.0, 1.5, 1.0]})
    pack, _, prog = _train(tiny_llama, members, cfg)
    totals = [len(member_batches(m.ts, cfg)) for m in members]
    epoch = len(make_batches(members[0].ts, cfg.batch_size, cfg.seed, 0))
    assert prog.stop_reason[:2] == ["early_stop(epoch 2, val_kl)", "finished"]
    assert prog.step[0] == 2 * epoch < totals[0] and prog.step[1] == totals[1]
    assert prog.val_kl[:2] == [[2.0, 2.5], [3.0, 2.0, 1.5, 1.0]] and prog.best_epoch[:2] == [1, 4]
    assert _equal(pack.adapter_state(0), scripted.snapshots[0][0])
    assert not _equal(pack.adapter_state(0), scripted.snapshots[0][1])  # epoch 2 did change it
    assert _equal(pack.adapter_state(1), scripted.snapshots[1][-1])
    stats = [adapter_stats(prog, i, m) for i, m in enumerate(members)]
    assert [(s["chosen_epoch"], s["val_inputs"], s["val_kl"]) for s in stats] == [
        (1, 2, [2.0, 2.5]), (4, 2, [3.0, 2.0, 1.5, 1.0]), (len(prog.epoch_losses[2]), 0, [])]
    monkeypatch.undo()  # adapter 2 alone, with no validation code able to run

    def refuse(*a, **k):
        raise AssertionError("validation ran for a pack without validation examples")

    monkeypatch.setattr(validation, "score", refuse)
    monkeypatch.setattr(validation, "record", refuse)
    alone, _, alone_prog = _train(tiny_llama, members[2:], cfg)
    # Close, not bit-equal: alone, every row is on one adapter (plain matmuls), in the pack
    # rows of several adapters share a batch (per-row bmm), which rounds differently.
    got, want = pack.adapter_state(2), alone.adapter_state(0)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert prog.stop_reason[2] == alone_prog.stop_reason[0]
    assert prog.epoch_losses[2] == pytest.approx(alone_prog.epoch_losses[0], rel=1e-6)


class Interrupt(Exception):
    pass


def test_a_resumed_pack_keeps_its_best_epoch_from_before_the_interruption(tiny_llama, monkeypatch, tmp_path):
    """Checkpoint mid-epoch 2 (progress.json round trip, best weights saved beside it, LoRA and
    optimizer state), then resume in a new pack: the same adapters, KL history and chosen
    epochs as without the interruption. A checkpoint without the best weights restarts the
    choice from the resumed epoch."""
    cfg = CFG.model_copy(update={"epochs": 3})
    members = _members()[:2]
    script = {0: [1.0, 2.0, 3.0], 1: [3.0, 2.0, 1.0]}  # adapter 0's best is before the interruption
    Scripted(monkeypatch, script)
    whole, _, whole_prog = _train(tiny_llama, members, cfg)
    assert whole_prog.best_epoch == [1, 3]

    at = len(make_batches(members[0].ts, cfg.batch_size, cfg.seed, 0)) + 1
    for saved_best in (True, False):
        scripted = Scripted(monkeypatch, script)
        ckpt = {}

        def on_step(pr):
            if pr.pack_steps == at:
                ckpt["progress"] = json.loads(json.dumps(pr.to_dict()))
                if saved_best:
                    validation.save_best(pr, str(tmp_path))
                ckpt["lora"] = [p.detach().clone() for p in pack.parameters()]
                raise Interrupt

        model = tiny_llama(seed=0)
        pack = PackedLora(model, 2, cfg.lora_r, cfg.lora_alpha, seeds=[m.seed for m in members])
        opt = PackedAdamW(pack.parameters(), 2, max_grad_norm=cfg.grad_clip)
        with pytest.raises(Interrupt):
            train_pack(model, pack, members, cfg, PAD, optimizer=opt, on_step=on_step)
        assert ckpt["progress"]["best_epoch"][0] == 1 and "best_weights" not in ckpt["progress"]
        opt_state = opt.state_dict()

        model = tiny_llama(seed=0)
        pack = PackedLora(model, 2, cfg.lora_r, cfg.lora_alpha, seeds=[0, 0])
        with torch.no_grad():
            for p, saved in zip(pack.parameters(), ckpt["lora"]):
                p.copy_(saved)
        opt = PackedAdamW(pack.parameters(), 2, max_grad_norm=cfg.grad_clip)
        opt.load_state_dict(opt_state)
        prog = PackProgress(**ckpt["progress"])
        if saved_best:
            validation.load_best(prog, str(tmp_path))
        prog = train_pack(model, pack, members, cfg, PAD, optimizer=opt, progress=prog)
        assert prog.val_kl == whole_prog.val_kl and scripted.calls == {0: 3, 1: 3}  # none scored twice
        if saved_best:
            assert prog.best_epoch == [1, 3]
            for i in range(2):
                assert _equal(pack.adapter_state(i), whole.adapter_state(i))
        else:  # adapter 0's epoch-1 weights are gone: the best of epochs 2 and 3 instead
            assert prog.best_epoch == [2, 3] and _equal(pack.adapter_state(1), whole.adapter_state(1))
            assert not _equal(pack.adapter_state(0), whole.adapter_state(0))


def test_progress_saved_before_held_out_kl_still_resumes():
    old = PackProgress.start([4, 6]).to_dict()
    for key in ("val_kl", "best_epoch"):
        old.pop(key)
    prog = PackProgress(**json.loads(json.dumps(old)))
    assert prog.val_kl == [[], []] and prog.best_epoch == [None, None] and prog.best_weights == {}


# ---- through the runner: train.json, the file written ------------------------------------
def _job(store, tok, pid: str, n: int) -> TrainJob:
    pdir = store.prompt_dir(pid, "fp0")
    write_synth(store, pdir, tok, seed=sum(map(ord, pid)), n=n)
    return TrainJob(pid, pdir, f"{PROMPT} ({pid})")


def _cfg(tiny_model_dir, *extra):
    # fp32: the stored val_kl is compared with a fresh fp32 forward. No on-policy phase: the
    # held-out KL chooses among the off-policy epochs, and the tests compare the adapter
    # written with those epochs' weights (the phase would train on from the chosen one).
    return load_config(None, [f"model.name={tiny_model_dir}", "train.autocast=off", "train.batch_size=2", "train.lora_r=4",
                              "train.lora_alpha=8", "train.lr=5e-3", "train.on_policy_epochs=0", *extra])


def test_the_adapter_written_is_the_best_epochs_and_train_json_says_which(tiny_model_dir, tmp_path, monkeypatch):
    """Scripted KL falls then rises: the adapter file holds the epoch-2 weights, not the last;
    train.json reports the KL per epoch, the chosen epoch and the inputs held out."""
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(tmp_path / "store")
    job = _job(store, tok, "a", n=6)
    scripted = Scripted(monkeypatch, {0: [3.0, 1.0, 2.0, 4.0]})
    [out] = train_local(_cfg(tiny_model_dir, "train.epochs=4", "train.val_inputs=2"), store, [job], model, tok,
                        str(tiny_model_dir), progress=False)
    assert out.status == "trained", out
    st = store.read_json(f"{job.pdir}/train.json")
    assert st["val_kl"] == [3.0, 1.0, 2.0, 4.0] and st["chosen_epoch"] == 2 and st["val_inputs"] == 2
    assert st["stop_reason"] == "finished" and st["steps"] == st["planned_steps"]
    # 6 inputs, one greedy reply each, a PG example for input 0 only (maybe held out)
    assert st["examples"]["sft"] == 4 and st["val_held_out_examples"] == 2 + ("pg" not in st["examples"])
    written = load_file(f"{job.pdir}/adapter/adapter_model.safetensors")
    assert _equal(written, scripted.snapshots[0][1]) and not _equal(written, scripted.snapshots[0][3])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_val_kl_in_train_json_is_the_written_adapters_kl(tiny_model_dir, tmp_path):
    """Unscripted: the KL train.json gives for the chosen epoch is the top-k KL of the adapter
    file on the held-out examples, and the chosen epoch is the lowest."""
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    store = Store(tmp_path / "store")
    job = _job(store, tok, "b", n=6)
    cfg = _cfg(tiny_model_dir, "train.epochs=3", "train.val_inputs=2", "train.lr=2e-2")
    [out] = train_local(cfg, store, [job], model, tok, str(tiny_model_dir), progress=False)
    st = out.stats
    assert len(st["val_kl"]) == 3 and len(set(st["val_kl"])) == 3  # the scores see the weights
    assert st["chosen_epoch"] == 1 + min(range(3), key=st["val_kl"].__getitem__)
    from genpi.synth.pipeline import load_synth

    val = build_examples(tok, load_synth(store, job.pdir), job.prompt, cfg.train).val
    pack = PackedLora(model, 1, 4, 8)
    try:
        pack.load_peft(0, f"{job.pdir}/adapter")
        batch = collate(val, tok.pad_token_id)
        with torch.no_grad(), pack.route_to([0] * len(val)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl, n = topk_kl(logits, batch["kl_ids"], batch["kl_logprobs"], batch["kl_mask"])
    finally:
        pack.remove()
    assert float(kl.sum() / n.sum()) == pytest.approx(st["val_kl"][st["chosen_epoch"] - 1], rel=1e-4)


def test_val_inputs_zero_or_a_prompt_too_small_trains_as_without_validation(tiny_model_dir, tmp_path, monkeypatch):
    """val_inputs=0 runs no validation code (it would fail here) and chosen_epoch is the last;
    a prompt too small for its val_inputs falls back to that same training, bit for bit,
    and train.json says why."""
    def refuse(*a, **k):
        raise AssertionError("validation ran with val_inputs=0")

    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    written, stats = {}, {}
    for val_inputs in (0, 4):
        store = Store(tmp_path / f"v{val_inputs}")
        jobs = [_job(store, tok, pid, n=4) for pid in ("x", "y")]
        with monkeypatch.context() as m:
            if val_inputs == 0:
                m.setattr(validation, "score", refuse)
                m.setattr(validation, "record", refuse)
            outs = train_local(_cfg(tiny_model_dir, "train.epochs=2", "train.pack_size=2",
                                    f"train.val_inputs={val_inputs}"), store, jobs, model, tok,
                               str(tiny_model_dir), progress=False)
        assert [o.status for o in outs] == ["trained", "trained"], outs
        written[val_inputs] = [load_file(f"{j.pdir}/adapter/adapter_model.safetensors") for j in jobs]
        stats[val_inputs] = [o.stats for o in outs]
    for st in stats[0]:
        assert (st["val_inputs"], st["val_kl"], st["chosen_epoch"]) == (0, [], 2) and "val_off" not in st
    for st in stats[4]:
        assert st["val_inputs"] == 0 and st["val_off"].startswith("4 usable inputs")
    for a, b, sa, sb in zip(written[0], written[4], stats[0], stats[4]):
        assert _equal(a, b) and sa["epoch_losses"] == sb["epoch_losses"]


# ---- Ray Train: two ranks, a restart ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_two_workers_restarted_choose_and_write_the_epochs_one_process_does(ray_local, tiny_model_dir,
                                                                            smollm_tokenizer, tmp_path):
    """Ray Train, 2 CPU workers, ZeRO-2, a worker failure after the checkpoint at pack step 4
    (epoch 2 ended): the restarted workers read the best weights from the checkpoint. At this
    learning rate prompt x's held-out KL is lowest after epoch 2 of 3 (y's after epoch 3), and
    the run reports and writes what one in-process worker does."""
    from genpi.train.trainer import train_many

    cfg = _cfg(tiny_model_dir, "train.epochs=3", "train.batch_size=3", "train.lr=5e-2", "train.val_inputs=1",
               "train.pack_size=2", "train.zero_stage=2", "train.checkpoint_every_steps=2",
               "cluster.train_workers=2", "cluster.cpus_per_train_worker=1")
    store = Store(tmp_path / "ray")
    jobs = train_jobs(store, smollm_tokenizer, ["x", "y"])
    ray_out = train_many(cfg, store.uri, jobs, run_name="val", _fail_after_steps=3)
    assert [o.status for o in ray_out] == ["trained", "trained"], ray_out
    assert ray_out[0].stats["resumed_at_pack_step"] == 4 and ray_out[0].stats["workers"] == 2

    local_store = Store(tmp_path / "local")
    local_jobs = train_jobs(local_store, smollm_tokenizer, ["x", "y"])
    model, tok, resolved = load_model(cfg.model)
    local_out = train_local(cfg, local_store, local_jobs, model, tok, resolved.path, progress=False)
    assert [o.stats["chosen_epoch"] for o in local_out] == [2, 3]  # a best epoch before the last
    for r, lo, rj, lj in zip(ray_out, local_out, jobs, local_jobs):
        assert r.stats["chosen_epoch"] == lo.stats["chosen_epoch"] and r.stats["val_inputs"] == 1
        assert r.stats["val_kl"] == pytest.approx(lo.stats["val_kl"], rel=1e-4)
        got, want = (load_file(f"{j.pdir}/adapter/adapter_model.safetensors") for j in (rj, lj))
        assert got.keys() == want.keys()
        # lr 5e-2 (10x test_trainer_ranks') grows ZeRO-2's summation-order differences to ~2e-6;
        # the steps of one epoch move them by ~1e-2.
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5)
