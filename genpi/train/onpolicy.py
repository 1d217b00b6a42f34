"""The on-policy distillation phase (train.on_policy_epochs): the adapter learns on its own replies.

Off-policy training (SFT + KL on the teacher's replies) shows the student only the teacher's
tokens; at inference it conditions on its own, and its mistakes compound (the "Plants,
bonjour." loops of the French adapter). On-policy distillation (GKD, OPCD) trains on the
student's own samples, scored by the teacher. After a pack's off-policy epochs:

1. each adapter samples a reply to every one of its training inputs, without the prompt
   (batches of one adapter's rows, decoded by the engine's KV-cached loop);
2. the teacher -- the same frozen base, no adapter, the prompt in the system slot -- runs
   one forward over each (prompt, input, student reply) and gives its top-k log-probabilities
   on the student's tokens;
3. the adapter trains `on_policy_epochs` more epochs on the KL over those rows (and, with
   train.on_policy_replay, a share of the off-policy teacher replies: :func:`replayed`) chosen by
   train.on_policy_divergence: reverse KL(student || teacher)
   (:func:`genpi.train.losses.topk_reverse_kl`), forward, or their sum (the default since
   2026-12-05: ahead of reverse alone on the French example), on the same optimizer
   (its AdamW moments and step count go on), with its own warm-up and cosine schedule;
4. with train.on_policy_rounds above 1, steps 1-3 repeat: the phase's epochs are split into
   rounds, each on replies sampled afresh from the adapter as the last round left it.

Both sides share the training process's model, so no engine, store round trip or second
copy of the base is needed. Every rank of a data-parallel pack samples the same replies
(same weights, same seed), so they build the same examples and their collectives match.
The phase's data is made fresh each run (a restarted worker redoes the phase from the
off-policy phase's end). Held-out validation (train.val_inputs) chooses among the
off-policy epochs only; the on-policy epochs always run to the end.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Sequence

import torch

from genpi.chat import student_messages, teacher_messages
from genpi.config import TrainConfig
from genpi.train import precision
from genpi.train.data import EncodedExample, ExampleTooLong, encode_chat, end_of_turn_token
from genpi.train.loop import TrainingSet

log = logging.getLogger(__name__)

# Rows per batched generate (as engine.batch_size) and per teacher forward (its logits over
# the vocabulary are the memory: 8 x ~100 positions x 49k x 4 bytes ~ 160 MB for SmolLM2);
# the teacher's top-k is the synthesis engine's default (engine.top_k_logprobs).
BATCH = 32
TEACHER_BATCH = 8
TOP_K = 100


def _batches(keys: Sequence, lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices in batches of at most `size` that share one key, shortest first within a key
    (less padding): a batch never mixes adapters or prompts, so an adapter's phase data does
    not depend on the pack it trains in."""
    out: list[list[int]] = []
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], lengths[i])):
        if out and len(out[-1]) < size and keys[out[-1][0]] == keys[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _render(tok, messages: list[dict]) -> list[int]:
    from genpi.engines.base import render_chat

    return render_chat(tok, messages)


@torch.no_grad()
def sample_replies(model, pack, tok, items: list[tuple[int, str]], cfg: TrainConfig, device,
                   seeds: Sequence[int]) -> list[list[int]]:
    """Token ids of the reply adapter `slot` samples to `input` (no prompt), per (slot, input);
    each ends at the end-of-turn token or at train.on_policy_max_new_tokens.

    Batches hold one adapter's rows each and decode with the engine's loop
    (genpi.engines.decode), where a finished reply leaves the batch: `model.generate` kept
    decoding every row to the longest reply of its batch. Slot s samples from its own random
    stream, seeded with seeds[s], so its replies do not depend on the pack it is in."""
    from genpi.engines.decode import decode

    eot, _ = end_of_turn_token(tok)
    stops = sorted({eot, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    encoded = [_render(tok, student_messages(text)) for _, text in items]
    chunks = _batches([slot for slot, _ in items], [len(e) for e in encoded], BATCH)
    out: list[list[int]] = [[] for _ in items]
    for n, chunk in enumerate(chunks):
        slot = items[chunk[0]][0]
        if n == 0 or items[chunks[n - 1][0]][0] != slot:
            torch.manual_seed(seeds[slot])  # the slot's own stream; every rank samples the same replies
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: generation continues at the right edge
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attn[row, width - len(encoded[i]):] = 1
        # fp32: under autocast every decoding step would cast the whole base to bf16 again.
        with pack.route_to([slot] * len(chunk)):
            replies = decode(model, ids.to(device), attn.to(device), max_new_tokens=cfg.on_policy_max_new_tokens,
                             eos_ids=stops, temperature=cfg.on_policy_temperature, top_p=1.0)
        for i, r in zip(chunk, replies):
            out[i] = r.tokens  # ends with the stop id when stopped
    return out


@torch.no_grad()
def teacher_topk(model, pack, tok, items: list[tuple[str, str, list[int]]], cfg: TrainConfig,
                 device) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The teacher's (base with the prompt) top-k ids and log-probabilities at each token of
    each (prompt, input, reply ids): row j is its distribution for reply token j."""
    ctx = [_render(tok, teacher_messages(prompt, text)) for prompt, text, _ in items]
    out: list = [None] * len(items)
    # One prompt's rows per batch: an adapter's data is the same, to the last bit, whatever
    # pack it trains in.
    for chunk in _batches([prompt for prompt, _, _ in items], [len(c) + len(it[2]) for c, it in zip(ctx, items)],
                          TEACHER_BATCH):
        seqs = [ctx[i] + items[i][2] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: positions are those of the unpadded sequence
            ids[row, :len(s)] = torch.tensor(s)
            attn[row, :len(s)] = 1
        # Every row on the base (-1): the teacher is the model without any adapter.
        first = min(len(ctx[i]) for i in chunk) - 1  # logits only from the first reply position on
        with pack.route_to([-1] * len(chunk)), precision.autocast(cfg.autocast, device):
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                           logits_to_keep=torch.arange(first, width, device=device)).logits
        for row, i in enumerate(chunk):
            n_ctx, n = len(ctx[i]) - 1 - first, len(items[i][2])
            lp = torch.log_softmax(logits[row, n_ctx:n_ctx + n].float(), dim=-1)
            v, k = lp.topk(TOP_K, dim=-1)
            out[i] = (k.cpu().tolist(), v.cpu().tolist())
    return out


def phase_sets(model, pack, tok, prompts: Sequence[str], inputs: Sequence[Sequence[str]], cfg: TrainConfig,
               device, seeds: Sequence[int]) -> list[TrainingSet]:
    """The phase's training set per slot: its own replies (sampled from seeds[slot]'s stream)
    with the teacher's top-k on them."""
    was_training = model.training
    model.eval()  # sampling and scoring: no dropout
    try:
        items = [(slot, text) for slot, texts in enumerate(inputs) for text in texts]
        replies = sample_replies(model, pack, tok, items, cfg, device, seeds)
        rows = teacher_topk(model, pack, tok, [(prompts[s], t, r) for (s, t), r in zip(items, replies)], cfg, device)
    finally:
        model.train(was_training)
    eot, _ = end_of_turn_token(tok)
    stops = {eot, tok.eos_token_id}
    sets = [TrainingSet() for _ in inputs]
    for (slot, text), reply, (k_ids, k_lps) in zip(items, replies, rows):
        content = [t for t in reply if t not in stops]
        words = tok.decode(content, skip_special_tokens=True).strip()
        if not words:
            sets[slot].dropped["on_policy_empty_reply"] += 1
            continue
        turn = {"role": "assistant", "content": words, "token_ids": reply, "topk_ids": k_ids, "topk_logprobs": k_lps}
        try:
            sets[slot].examples.append(("sft", encode_chat(tok, [*student_messages(text), turn], cfg.max_length)))
        except ExampleTooLong:
            sets[slot].dropped["on_policy_too_long"] += 1
        except ValueError:  # sampled ids that do not re-encode to their own text
            sets[slot].dropped["on_policy_unencodable"] += 1
    return sets


def replayed(ts: TrainingSet, share: float, seed: int) -> list[tuple[str, EncodedExample]]:
    """train.on_policy_replay: that share (rounded) of the off-policy teacher-reply examples of
    `ts` (prompt-generation ones excluded: the phase trains no hard labels), a fixed draw seeded
    per adapter, so every rank and a rerun replay the same ones. They carry the teacher's top-k
    on the teacher's own tokens: the prefixes the evaluation's KL is scored on."""
    teacher = [ex for ex in ts.examples if ex[0] == "sft" and ex[1].kl_ids is not None]
    n = round(share * len(teacher))
    if n <= 0:
        return []
    return [teacher[i] for i in sorted(random.Random(f"genpi-replay:{seed}").sample(range(len(teacher)), n))]


def phase_config(cfg: TrainConfig, epochs: int | None = None) -> TrainConfig:
    """The phase's training settings (one round's `epochs`; default all of the phase's): KL
    only (the student's own tokens are no SFT target), its learning rate, no validation or
    early stopping."""
    return cfg.model_copy(update={"epochs": epochs or cfg.on_policy_epochs, "w_sft": 0.0, "w_pg": 0.0, "w_kl": 1.0,
                                  "lr": cfg.on_policy_lr or cfg.lr, "val_inputs": 0, "early_stop_patience": None,
                                  # the student's own replies: every one is scored, none dropped
                                  "kl_min_dependence": 0.0})


def round_epochs(cfg: TrainConfig) -> list[int]:
    """train.on_policy_rounds: the phase's epochs per round, the earlier rounds one more where
    they do not divide evenly (5 epochs in 2 rounds: 3 + 2)."""
    rounds = min(cfg.on_policy_rounds, cfg.on_policy_epochs)
    return [cfg.on_policy_epochs // rounds + (r < cfg.on_policy_epochs % rounds) for r in range(rounds)]


def run_phase(model, pack, tok, members, prompts: Sequence[str], cfg: TrainConfig, pad_id: int, device, *,
              optimizer=None, engine=None, rank: int = 0, world: int = 1, micro_batch: int | None = None,
              prior=None, on_step=None):
    """The on-policy phase for a pack whose off-policy phase ended with progress `prior`;
    returns the last round's PackProgress (None when train.on_policy_epochs is 0). Each round
    (train.on_policy_rounds) samples fresh replies from the adapters as they stand and trains
    its share of the epochs on them, with its own warm-up and cosine schedule on the same
    optimizer. Each member's train.json gets an `on_policy` entry (examples, dropped, epoch
    losses, seconds, summed over the rounds)."""
    from genpi.train.packed import PackMember, train_pack

    if cfg.on_policy_epochs <= 0:
        return None
    replay = [replayed(m.ts, cfg.on_policy_replay, cfg.seed * 7919 + m.seed) for m in members]
    offset = list(prior.step) if prior is not None else [0] * len(members)
    info = [{"epochs": cfg.on_policy_epochs, "rounds": 0, "examples": 0, "replayed": len(r), "dropped": Counter(),
             "steps": 0, "epoch_losses": [], "sample_and_score_seconds": 0.0, "train_seconds": 0.0} for r in replay]
    prog, per_round = None, round_epochs(cfg)
    for r, epochs in enumerate(per_round):
        t0 = time.time()
        # Round 0's streams are the ones a single round always used: rounds=1 trains the same adapter.
        sets = phase_sets(model, pack, tok, prompts, [m.ts.inputs for m in members], cfg, device,
                          seeds=[cfg.seed * 7919 + 17 + 1_000_003 * m.seed + 7_777_777 * r for m in members])
        made = time.time() - t0
        own = [len(ts.examples) for ts in sets]
        for ts, extra in zip(sets, replay):
            ts.examples.extend(extra)
        phase_members = [PackMember(m.key, ts, seed=m.seed) for m, ts in zip(members, sets)]
        prog = train_pack(model, pack, phase_members, phase_config(cfg, epochs), pad_id, optimizer=optimizer,
                          engine=engine, rank=rank, world=world, micro_batch=micro_batch, on_step=on_step,
                          divergence=cfg.on_policy_divergence, step_offset=offset)
        offset = [o + s for o, s in zip(offset, prog.step)]
        for i, ts in enumerate(sets):
            d = info[i]
            d["rounds"] += 1
            d["examples"] += own[i]
            d["dropped"].update(ts.dropped)
            d["steps"] += prog.step[i]
            d["epoch_losses"] += prog.epoch_losses[i]
            d["sample_and_score_seconds"] += made
            d["train_seconds"] += prog.seconds
        log.info("on-policy phase, round %d/%d: %d replies sampled and scored in %.0f s, %d steps in %.0f s",
                 r + 1, len(per_round), sum(own), made, prog.pack_steps, prog.seconds)
    for m, d in zip(members, info):
        m.ts.phase_info["on_policy"] = {**d, "dropped": dict(d["dropped"]),
                                        "sample_and_score_seconds": round(d["sample_and_score_seconds"], 2),
                                        "train_seconds": round(d["train_seconds"], 2)}
    return prog
