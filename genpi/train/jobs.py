"""Training jobs, Ray-free: which prompts to train, in which packs, and where results go.

A :class:`TrainJob` is one prompt to train; both runners take a list of them and return
one :class:`TrainOutcome` per job, in job order:

- :func:`train_local` (here): packs trained one after another in this process on a model
  that is already loaded (``genpi internalize``, benchmarks);
- :func:`genpi.train.trainer.train_many`: the same packs on Ray Train workers with DeepSpeed.

Both go through the same steps -- :func:`prepare_jobs` (skip what is trained, fail only the
prompt whose data is broken), :func:`plan_packs`, :func:`genpi.train.packed.train_pack` (the
only training loop: one adapter is a pack of one) and :func:`write_pack` -- so an adapter
is the same file whichever runner trained it.
"""
from __future__ import annotations

import logging
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any

from genpi.config import GenpiConfig

log = logging.getLogger(__name__)

# Written last for each prompt (after train.json): its presence means "trained".
ADAPTER_FILE = "adapter/adapter_model.safetensors"


@dataclass
class TrainJob:
    prompt_id: str
    pdir: str  # the prompt's folder in the store: adapter/ and train.json go here
    prompt: str
    # The folder holding synth/, when it is not pdir: several adapters trained from one
    # synthesis (the quality benchmark's loss settings) each need their own pdir.
    data_dir: str | None = None

    @property
    def synth_dir(self) -> str:
        return self.data_dir or self.pdir


@dataclass
class TrainOutcome:
    prompt_id: str
    pdir: str
    status: str  # trained | skipped | failed
    error: str | None = None
    pack: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def plan_packs(tokens: dict[str, int], pack_size: int) -> list[list[str]]:
    """Group prompts into ceil(n / pack_size) packs of at most pack_size with balanced tokens.

    Longest-processing-time greedy: the largest remaining prompt goes to the pack with the
    fewest tokens that still has room. A pack's step cost is the sum of its active
    adapters' batches, so its duration follows its total tokens; balanced packs finish at
    a steady pace (adapters get published evenly through the run)."""
    if pack_size < 1:
        raise ValueError("pack_size must be >= 1")
    if not tokens:
        return []
    n_packs = -(-len(tokens) // pack_size)
    packs: list[list[str]] = [[] for _ in range(n_packs)]
    load = [0] * n_packs
    for key in sorted(tokens, key=lambda k: (-tokens[k], k)):
        open_packs = [i for i in range(n_packs) if len(packs[i]) < pack_size]
        i = min(open_packs, key=lambda j: (load[j], j))
        packs[i].append(key)
        load[i] += tokens[key]
    return packs


def prepare_jobs(cfg: GenpiConfig, store, tok, jobs: list[TrainJob]):
    """(training sets by prompt id, outcomes for skipped/failed jobs). Broken data fails one prompt only."""
    from genpi.synth.pipeline import load_synth
    from genpi.train.loop import build_examples

    sets, outcomes = {}, []
    for job in jobs:
        if store.exists(f"{job.pdir}/{ADAPTER_FILE}"):
            outcomes.append(TrainOutcome(job.prompt_id, job.pdir, "skipped"))
            continue
        try:
            ts = build_examples(tok, load_synth(store, job.synth_dir), job.prompt, cfg.train)
            if not ts.examples:
                raise ValueError(f"no usable training examples (dropped: {dict(ts.dropped)})")
            sets[job.prompt_id] = ts
        except Exception as e:  # one prompt's broken data must not stop the others
            outcomes.append(TrainOutcome(job.prompt_id, job.pdir, "failed", error=f"{type(e).__name__}: {e}"))
            log.error("%s: cannot train: %s", job.prompt_id, e)
    return sets, outcomes


def peak_memory() -> dict[str, float]:
    import torch

    from genpi.procmem import peak_rss_mb

    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def write_pack(store, pack, prog, members, jobs: list[TrainJob], base_model_name: str | None,
               pack_index: int, run: dict[str, Any]) -> dict[str, dict]:
    """Write every adapter of a finished pack: ``<pdir>/train.json``, then ``<pdir>/adapter``
    (standard PEFT folder, atomic through ``store.put_dir``), each published as soon as its
    pack ends. ``run`` describes where it ran (workers, ZeRO stage, memory, resume point).
    Returns each prompt's train.json content by prompt id."""
    from genpi.train.packed import adapter_stats

    out = {}
    for i, (m, job) in enumerate(zip(members, jobs)):
        stats = adapter_stats(prog, i, m)
        stats.update(pack=pack_index, pack_size=len(members), pack_seconds=prog.seconds, pack_tokens=prog.tokens,
                     tokens_per_s=prog.tokens / max(prog.seconds, 1e-9), **run)
        with tempfile.TemporaryDirectory(prefix="genpi-adapter-") as tmp:
            pack.export_peft(i, tmp, base_model_name=base_model_name)
            store.write_json(f"{job.pdir}/train.json", stats)
            store.put_dir(tmp, f"{job.pdir}/adapter")  # last: the adapter file marks "trained"
        out[m.key] = stats
    return out


def train_local(cfg: GenpiConfig, store, jobs: list[TrainJob], model, tok, base_model_name: str,
                progress: bool = True) -> list[TrainOutcome]:
    """Train one adapter per job in this process, packs of ``train.pack_size`` (no Ray, no
    DeepSpeed), on ``model`` (already loaded; left as it was). One outcome per job, in job
    order: skipped (adapter already in the store), trained, or failed (its data is broken,
    or its pack raised -- the other packs go on)."""
    sets, done = prepare_jobs(cfg, store, tok, jobs)
    packs = plan_packs({k: ts.tokens() for k, ts in sets.items()}, cfg.train.pack_size)
    by_id = {j.prompt_id: j for j in jobs}
    outcomes = {o.prompt_id: o for o in done}
    for p, keys in enumerate(packs):
        pack_jobs = [by_id[k] for k in keys]
        try:
            stats = _train_pack_here(cfg, store, pack_jobs, [sets[k] for k in keys], model, tok, base_model_name,
                                     p, len(packs), progress)
        except Exception as e:  # a pack that fails (out of memory, NaN...) fails its own prompts only
            error = f"{type(e).__name__}: {e}"
            log.error("pack %d/%d (%s) failed: %s\n%s", p + 1, len(packs), ", ".join(keys), error,
                      traceback.format_exc())
            outcomes.update({j.prompt_id: TrainOutcome(j.prompt_id, j.pdir, "failed", error=error, pack=p)
                             for j in pack_jobs})
            continue
        outcomes.update({j.prompt_id: TrainOutcome(j.prompt_id, j.pdir, "trained", pack=p, stats=stats[j.prompt_id])
                         for j in pack_jobs})
    return [outcomes[j.prompt_id] for j in jobs]


def _train_pack_here(cfg: GenpiConfig, store, jobs: list[TrainJob], sets, model, tok, base_model_name: str,
                     pack_index: int, n_packs: int, progress: bool) -> dict[str, dict]:
    from tqdm.auto import tqdm

    from genpi.train import precision
    from genpi.train.multilora import PackedLora
    from genpi.train.packed import PackedAdamW, PackMember, member_batches, train_pack

    tc = cfg.train
    members = [PackMember(j.prompt_id, ts, seed=tc.seed) for j, ts in zip(jobs, sets)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]  # PackedLora freezes the base
    pack = PackedLora(model, len(members), tc.lora_r, tc.lora_alpha, tc.target_modules, tc.lora_dropout,
                      seeds=[m.seed for m in members])
    name = jobs[0].prompt_id if len(jobs) == 1 else f"pack {pack_index + 1}/{n_packs} ({len(jobs)} prompts)"
    steps = max(len(member_batches(m.ts, tc)) for m in members)  # fewer if every adapter stops early
    try:
        opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=tc.grad_clip)
        with tqdm(total=steps, desc=f"{name}: training", unit="step", leave=False, disable=not progress) as bar:
            def on_step(pr) -> None:
                last = [h[-1]["loss"] for h in pr.history if h]  # each adapter's latest step
                bar.set_postfix(loss=f"{sum(last) / len(last):.3f}",
                                tokens_s=f"{pr.tokens / max(pr.seconds, 1e-9):.0f}",
                                done=f"{sum(pr.done)}/{len(pr.done)}")
                bar.update(1)

            prog = train_pack(model, pack, members, tc, pad, optimizer=opt, on_step=on_step)
        if tc.on_policy_epochs:
            from genpi.train.onpolicy import run_phase

            run_phase(model, pack, tok, members, [j.prompt for j in jobs], tc, pad, model.device, optimizer=opt,
                      prior=prog)
        stats = write_pack(store, pack, prog, members, jobs, base_model_name, pack_index,
                           {"workers": 1, "zero_stage": None, "worker_memory": [peak_memory()],
                            "resumed_at_pack_step": None, "precision": precision.describe(tc.autocast, model.device)})
        log.info("pack %d/%d trained: %s (%.0f tokens/s)", pack_index + 1, n_packs,
                 ", ".join(f"{k}: {s['stop_reason']}" + (f", kept epoch {s['chosen_epoch']} (held-out KL)"
                                                          if s["val_inputs"] else "") for k, s in stats.items()),
                 prog.tokens / max(prog.seconds, 1e-9))
        return stats
    finally:
        # Leave the shared base model as it was for the next pack and for evaluation.
        pack.remove()
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
