"""Prompt dependence (train.kl_min_dependence): the KL budget goes to replies the prompt changes.

Some synthesized inputs get the same teacher reply with and without the prompt (a greeting,
a question the prompt has nothing to say about). Their KL term teaches the adapter nothing
about the prompt, yet takes a share of every step's per-token mean. Before training, each
example's teacher rows are scored by the base model alone (no adapter, no prompt: the
student's input), as the mean per-token top-k KL(teacher || base) over its reply tokens --
the same KL the loss uses, so 0 means the prompt changes nothing the student could learn.
An example below the threshold keeps its SFT term and leaves the KL term (its KL mask is
cleared, so it counts no KL tokens either).

The base's score does not depend on the adapters' weights, so a resumed or restarted pack
computes the same drops; every rank computes them all (:func:`genpi.train.validation.example_kl`
all-reduces the rows) and takes the same decisions.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time

from genpi.config import TrainConfig
from genpi.train.data import EncodedExample

log = logging.getLogger(__name__)

INFO_KEY = "kl_dependence"


def has_teacher_rows(ex: EncodedExample) -> bool:
    return ex.kl_ids is not None and any(ex.kl_mask[1:])


def apply(model, pack, members, cfg: TrainConfig, pad_id: int, device, rank: int = 0, world: int = 1) -> None:
    """Score every member's SFT examples by the base and clear the KL mask of those under
    cfg.kl_min_dependence; each member's train.json gets the scores' spread and the drops.
    A member already done (its TrainingSet carries the report) is left as it is."""
    from genpi.train.validation import example_kl

    todo = [m for m in members if INFO_KEY not in m.ts.phase_info]
    if cfg.kl_min_dependence <= 0 or cfg.w_kl <= 0 or not todo:
        return
    t0 = time.time()
    where = [(mi, ei) for mi, m in enumerate(todo) for ei, (kind, ex) in enumerate(m.ts.examples)
             if kind == "sft" and has_teacher_rows(ex)]
    rows = example_kl(model, pack, [(-1, todo[mi].ts.examples[ei][1]) for mi, ei in where], cfg, pad_id, device,
                      rank, world)
    scores: dict[int, list[float]] = {mi: [] for mi in range(len(todo))}
    for (mi, ei), (kl_sum, n) in zip(where, rows.tolist()):
        dep = kl_sum / n
        scores[mi].append(dep)
        if dep < cfg.kl_min_dependence:
            kind, ex = todo[mi].ts.examples[ei]
            todo[mi].ts.examples[ei] = (kind, dataclasses.replace(ex, kl_mask=[False] * len(ex.kl_mask)))
    seconds = time.time() - t0
    for mi, m in enumerate(todo):
        vals = scores[mi]
        dropped = sum(v < cfg.kl_min_dependence for v in vals)
        deciles = statistics.quantiles(vals, n=10, method="inclusive") if len(vals) > 1 else vals * 9
        m.ts.phase_info[INFO_KEY] = {
            "min": cfg.kl_min_dependence, "scored": len(vals), "dropped_from_kl": dropped,
            **({f"p{10 * (i + 1)}": round(deciles[i], 5) for i in (0, 4, 8)} if vals else {}),
            "seconds": round(seconds, 2)}
        if rank == 0:
            log.info("%s: %d of %d examples' teacher replies barely depend on the prompt (KL to the base "
                     "< %g nats/token): dropped from the KL term", m.key, dropped, len(vals), cfg.kl_min_dependence)
