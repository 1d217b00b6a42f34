"""Held-out KL per prompt (train.val_inputs): score each adapter after every epoch, keep its best.

:func:`genpi.train.loop.build_examples` holds a few inputs of each prompt out of training
(``TrainingSet.val``: their greedy teacher replies with the teacher's top-k). After each
epoch of an adapter, :func:`score` gives its mean per-token top-k KL to the teacher on them
-- the loss's KL, without gradient, in eval mode, all adapters whose epoch ended in one
batched pass (per-row adapter index). :func:`record` keeps a host copy of an adapter's LoRA
weights whenever its KL is the lowest so far; :func:`restore_best` puts them back when the
pack ends, before the adapters are written. Early stopping reads the same KL
(:func:`genpi.train.packed._end_epoch`).

Ranks: each scores its share (rank::world) of the examples and the sums are all-reduced on
the parameters' device, so every rank gets the same numbers and takes the same decisions;
every rank scores at the same pack steps (the plans are the same), so the collectives match.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from genpi.config import TrainConfig
from genpi.train import precision
from genpi.train.data import EncodedExample, collate
from genpi.train.loop import micro_batches
from genpi.train.losses import topk_kl

log = logging.getLogger(__name__)

# Next to progress.json in a Ray Train checkpoint: the best epochs' weights survive a restart.
BEST_WEIGHTS_FILE = "best_weights.pt"


@torch.no_grad()
def example_kl(model, pack, items: list[tuple[int, EncodedExample]], cfg: TrainConfig, pad_id: int, device,
               rank: int = 0, world: int = 1) -> torch.Tensor:
    """Per item (slot, example): (sum of the per-token top-k KL(teacher || student), its KL
    tokens), as a [len(items), 2] float64 tensor on the host. Slot -1 is the base model with
    no adapter. Every item must carry teacher rows. In eval mode, without gradient; each rank
    scores its share (rank::world) and the rows are all-reduced, so every rank gets them all."""
    was_training = model.training
    model.eval()  # no LoRA/base dropout: the score of the weights, not of a noisy pass
    try:
        with torch.device(device):  # every tensor the collective sees on the parameters' device
            sums = torch.zeros(len(items), 2, dtype=torch.float64, device=device)
            # Similar lengths together (less padding); the rows go back to their items' places.
            mine = sorted(range(rank, len(items), world), key=lambda j: len(items[j][1]))
            for chunk in micro_batches(mine, cfg.max_batch_tokens, length=lambda j: len(items[j][1])):
                batch = {n: t.to(device) for n, t in collate([items[j][1] for j in chunk], pad_id).items()}
                slots = [items[j][0] for j in chunk]
                mask = batch["kl_mask"]
                # Logits only from the position before the first teacher row (as the training step).
                start = max(0, int(mask.any(0).nonzero()[0]) - 1)
                # All on the base: no routing at all (the wrapped layers add nothing).
                route = pack.route_to(slots) if max(slots) >= 0 else contextlib.nullcontext()
                with route, precision.autocast(cfg.autocast, device):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   logits_to_keep=torch.arange(start, mask.shape[1], device=device)).logits
                logits = logits.float()
                sl = slice(start, None)
                kl, n = topk_kl(logits, batch["kl_ids"][:, sl], batch["kl_logprobs"][:, sl], mask[:, sl])
                sums[torch.tensor(chunk, device=device)] = torch.stack([kl.double(), n.double()], dim=1)
            if world > 1:
                torch.distributed.all_reduce(sums)
    finally:
        model.train(was_training)
    return sums.cpu()


def score(model, pack, vals: dict[int, list[EncodedExample]], cfg: TrainConfig, pad_id: int, device,
          rank: int = 0, world: int = 1) -> dict[int, float]:
    """Mean per-token top-k KL(teacher || student) of adapter slot i on ``vals[i]``, per slot."""
    items = [(slot, ex) for slot in sorted(vals) for ex in vals[slot]]
    rows = example_kl(model, pack, items, cfg, pad_id, device, rank, world)
    out = {}
    for slot in vals:
        mine = rows[torch.tensor([s == slot for s, _ in items], dtype=torch.bool)].sum(0)
        out[slot] = float(mine[0] / mine[1]) if mine[1] > 0 else math.nan
    return out


def record(prog, pack, i: int, kl: float) -> None:
    """Adapter i's epoch ended with validation KL ``kl``: log it; if it is the lowest so far,
    that epoch becomes the best and its weights are copied to the host."""
    prog.val_kl[i].append(kl)
    best = prog.best_epoch[i]
    if math.isfinite(kl) and (best is None or kl < prog.val_kl[i][best - 1]):
        prog.best_epoch[i] = len(prog.val_kl[i])  # 1-based, as train.json's chosen_epoch
        prog.best_weights[i] = {name: p[i].detach().to("cpu", copy=True) for name, p in pack.named_parameters()}


@torch.no_grad()
def restore_best(pack, prog) -> None:
    """Every adapter with a best epoch gets that epoch's weights back (the pack has ended:
    no optimizer step may overwrite them, as ZeRO's copy of its fp32 partitions would)."""
    for i, state in prog.best_weights.items():
        for name, p in pack.named_parameters():
            p[i].copy_(state[name])


def forget_unsaved(prog) -> None:
    """A resumed pack whose checkpoint lacks the best weights (one written before they were
    saved) restarts its best-epoch record from the resumed epoch: its KL history stays, and
    the best is then chosen among the epochs that end after the resume."""
    for i, best in enumerate(prog.best_epoch):
        if best is not None and i not in prog.best_weights:
            log.warning("adapter %d: best-epoch weights (epoch %d) not in the checkpoint; the choice "
                        "restarts from the resumed epoch", i, best)
            prog.best_epoch[i] = None


def save_best(prog, folder: str) -> None:
    """The best weights into a checkpoint folder (one file; nothing when there are none)."""
    if prog is not None and prog.best_weights:
        torch.save(prog.best_weights, os.path.join(folder, BEST_WEIGHTS_FILE))


def load_best(prog, folder: str) -> None:
    path = os.path.join(folder, BEST_WEIGHTS_FILE)
    if prog is not None and os.path.exists(path):
        prog.best_weights = torch.load(path, map_location="cpu", weights_only=True)
