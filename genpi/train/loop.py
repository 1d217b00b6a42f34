"""Training data for one adapter: examples, batches, micro-batches, the learning-rate schedule.

No training loop lives here: every adapter trains in :func:`genpi.train.packed.train_pack`
(one adapter is a pack of one). Examples come in two kinds, batched separately so each
batch has one kind of target:
- "sft": input without the prompt -> the teacher's reply tokens; CE (L_SFT) on them and,
  where the teacher's top-k was recorded, KL(teacher || student) (L_KL) on the same positions;
- "pg": input, AS-IS and TO-BE -> the prompt (verbatim or paraphrased) + the reason (L_PG).
The loss is w_sft*L_SFT + w_pg*L_PG + w_kl*L_KL, each a per-token mean
(:func:`genpi.train.losses.joint_loss`).
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from genpi.chat import student_messages
from genpi.config import TrainConfig
from genpi.train.data import EncodedExample, ExampleTooLong, encode_chat, pg_messages

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    examples: list[tuple[str, EncodedExample]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    # Held-out validation (train.val_inputs): one example per validation input -- its greedy
    # teacher reply with the teacher's top-k, scored by genpi.train.validation. No example
    # built from those inputs is in `examples`. `val_info` goes into train.json.
    val: list[EncodedExample] = field(default_factory=list)
    val_info: dict = field(default_factory=dict)
    # The training inputs (held-out ones excluded), for the on-policy phase (genpi.train.onpolicy),
    # and what that phase reports into train.json.
    inputs: list[str] = field(default_factory=list)
    phase_info: dict = field(default_factory=dict)

    def tokens(self) -> int:
        return sum(len(ex) for _, ex in self.examples)


def build_examples(tok, synth: dict, prompt: str, cfg: TrainConfig) -> TrainingSet:
    """Encode the synthesized data of one prompt; drop (and count) what cannot be used.
    With train.val_inputs, some inputs are held out first (:func:`_hold_out`)."""
    out = TrainingSet()
    held_idx, held_text = _hold_out(tok, synth, prompt, cfg, out)

    def held(r: dict) -> bool:
        # By text too: an input that synthesis wrote twice must not leak through its twin.
        if r["input_idx"] in held_idx or r["input"] in held_text:
            out.val_info["val_held_out_examples"] += 1
            return True
        return False

    # A role-play conversation starts with the greedy teacher reply to its input and goes on
    # for more turns: it replaces that single-turn example (the first turn is the same).
    convs = {c["input_idx"]: c for c in synth.get("conversations") or [] if c["agent_turns"] > 1}
    for r in synth["to_be"]:  # greedy and sampled replies; a conversation replaces its greedy one
        if held(r):
            continue
        if r["sample"] == 0:
            out.inputs.append(r["input"])
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
            if held(r):
                continue
            msgs = pg_messages(r["input"], r["text"], greedy.get(r["input_idx"], ""), target, reasons.get(i, ""))
            try:
                out.examples.append(("pg", encode_chat(tok, msgs, cfg.pg_max_length)))
            except ExampleTooLong as e:
                # Never cut the prompt: a PG example that does not fit is dropped and counted.
                out.dropped["pg_too_long"] += 1
                log.warning("prompt-generation example dropped: %s", e)
    return out


def _hold_out(tok, synth: dict, prompt: str, cfg: TrainConfig, out: TrainingSet) -> tuple[set[int], set[str]]:
    """Choose train.val_inputs validation inputs among those whose greedy teacher reply has
    top-k rows and encodes; put their examples in ``out.val``; return (indices, texts) held out.

    The choice is seeded by train.seed and the prompt: every rank, and a rerun, holds out the
    same inputs. A prompt with fewer than val_inputs + 1 usable inputs (training needs one)
    trains on all of them, without validation; ``out.val_info`` says so."""
    n = cfg.val_inputs
    if n <= 0:
        return set(), set()
    usable: dict[int, tuple[str, EncodedExample]] = {}
    for r in synth["to_be"]:
        if r["sample"] != 0 or r.get("topk_ids") is None or not r["text"].strip():
            continue
        try:
            ex = encode_chat(tok, [*student_messages(r["input"]), _message({"role": "assistant", **r})],
                             cfg.max_length)
        except ValueError:  # too long or unencodable: counted when the training examples are built
            continue
        if ex.kl_ids is not None and any(ex.kl_mask):
            usable[r["input_idx"]] = (r["input"], ex)
    if len(usable) < n + 1:
        note = (f"{len(usable)} usable inputs (greedy teacher reply with top-k) for train.val_inputs={n}, "
                f"{n + 1} needed: trained without validation")
        out.val_info = {"val_off": note}
        log.warning("%s", note)
        return set(), set()
    chosen = sorted(random.Random(f"genpi-val:{cfg.seed}:{prompt}").sample(sorted(usable), n))
    out.val = [usable[i][1] for i in chosen]
    out.val_info = {"val_held_out_examples": 0}
    return set(chosen), {usable[i][0] for i in chosen}


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


def micro_batches(items: list, max_tokens: int, length: Callable[[Any], int] = len) -> list[list]:
    """Consecutive groups whose padded size (count x longest) stays within `max_tokens`;
    an item longer than that is a group of its own (examples are never cut). `length` reads
    an item's token count (the packed loop's items are (slot, kind, example) tuples)."""
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


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_ratio * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def lora_config(cfg: TrainConfig):
    """The adapter that PackedLora trains, as a PEFT config: for the plain-PEFT references
    the parity tests and benchmarks compare the packed path with."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
