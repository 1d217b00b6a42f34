"""Train many prompts' adapters: token-balanced packs, Ray Train workers, DeepSpeed ZeRO.

The Ray runner of :mod:`genpi.train.jobs` (whose :func:`~genpi.train.jobs.train_local` runs
the same packs in-process). Driver (:func:`train_many`): reads each prompt's synthesized
data, drops (and reports as failed) prompts whose data cannot be used, skips prompts whose
adapter is already in the store, groups the rest into token-balanced packs
(:func:`~genpi.train.jobs.plan_packs`) and runs one ``TorchTrainer``. Workers load the base once, then train the packs one after another, all
workers on the same pack (data parallel within a pack -- see the module README section in
the report / bench for the measurement behind that choice). When a pack finishes, rank 0
writes each adapter (``<pdir>/adapter``, atomic) and ``<pdir>/train.json`` at once
(:func:`~genpi.train.jobs.write_pack`, as the local runner does).

Checkpoints go through Ray Train (``ray.train.report``): DeepSpeed's checkpoint of the
trainable parameters only (``exclude_frozen_parameters``: the LoRA stacks, the optimizer
partitions) plus ``progress.json`` (pack index and per-adapter progress). The frozen base is
never in a checkpoint. A worker failure restarts the workers (``FailureConfig``) and they
continue from the last checkpoint with the same result as an uninterrupted run.

Each pack gets its own DeepSpeed engine (:func:`~genpi.train.optim_backend.pack_engine`) over a module that holds only
the pack's LoRA parameters: DeepSpeed's hooks and its broadcast at initialize never touch
the shared frozen base, and the engine is destroyed when its pack ends, so a finished
pack's optimizer state is freed. ZeRO stages 0-2 only (the config refuses 3).

One worker with fp32 LoRA parameters (the CPU) trains without DeepSpeed
(:func:`~genpi.train.optim_backend.uses_deepspeed`): ZeRO has nothing to shard there, and its gradient buckets cost
about a fifth of a CPU step. Its checkpoint is then the LoRA stacks and the optimizer's
state in one torch file (:mod:`genpi.train.optim_backend`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from dataclasses import asdict

from genpi.config import GenpiConfig
from genpi.train.optim_backend import load_plain, pack_optimizer, save_plain
from genpi.train.placement import controller_failure_limit, split_cpus, train_resource_problem
from genpi.train.jobs import ADAPTER_FILE, TrainJob, TrainOutcome, peak_memory, plan_packs, prepare_jobs, write_pack

log = logging.getLogger(__name__)

# A pack's failure, per prompt of the pack, next to its artifacts (read by the driver).
TRAIN_ERROR = "train_error.json"


class InjectedWorkerFailure(RuntimeError):
    """The resume test's simulated worker crash: Ray Train must restart the workers (a pack's
    own errors are caught and fail only that pack)."""


def _progress(line: str) -> None:
    """One progress line to the driver's log. Not print(): Ray Train replaces print in its
    workers with a function that writes to stdout and also logs the line, so every line
    reached the driver twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ensure_torch_extensions_dir() -> str:
    """DeepSpeed compiles a small CPU extension once: keep it in genpi's cache, not ~/.cache."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = os.environ.get("GENPI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "genpi")
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(root, "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]


# ---- the Ray Train worker ------------------------------------------------------------------
def _worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from genpi.models import load_model
    from genpi.store import Store
    from genpi.train.packed import PackProgress
    from genpi.train.validation import load_best

    cfg = GenpiConfig.model_validate(config["cfg"])
    store = Store(config["store_uri"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    from genpi.rayinit import use_assigned_cpus

    threads = use_assigned_cpus()
    model, tok, resolved = load_model(cfg.model)  # once per worker, shared by every pack
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packs: list[list[dict]] = config["packs"]

    start_pack, resume_dir, progress = 0, None, None
    ckpt = ray.train.get_checkpoint()
    ckpt_ctx = ckpt.as_directory() if ckpt else None
    if ckpt_ctx is not None:
        resume_dir = ckpt_ctx.__enter__()
        with open(os.path.join(resume_dir, "progress.json")) as f:
            saved = json.load(f)
        start_pack = saved["pack"]
        progress = PackProgress(**saved["progress"]) if saved["progress"] else None
        load_best(progress, resume_dir)  # the best epochs' weights (held-out KL), when saved
    total_steps = [0]

    for p in range(start_pack, len(packs)):
        jobs = [TrainJob(**j) for j in packs[p]]
        try:
            _train_one_pack(model, tok, resolved, store, cfg, jobs, p, packs, rank, world, threads, device, pad,
                            config, total_steps, resume_dir if p == start_pack else None,
                            progress if p == start_pack else None)
        except InjectedWorkerFailure:
            raise
        except Exception as e:
            # A pack that fails on every rank alike (its data, a numerical error) fails only its own
            # prompts: the next pack goes on. Ranks that disagree (a collective failed) cannot go on
            # together: Ray Train restarts them from the last checkpoint instead.
            if world > 1 and isinstance(e, dist.DistError):
                raise
            error = f"{type(e).__name__}: {e}"
            log.error("pack %d/%d failed: %s\n%s", p + 1, len(packs), error, traceback.format_exc())
            if rank == 0:
                for j in jobs:
                    store.write_json(f"{j.pdir}/{TRAIN_ERROR}", {"error": error, "pack": p,
                                                                  "traceback": traceback.format_exc()})
        # The pack's end is a checkpoint too: a restart goes on with the next pack.
        _checkpoint(None, p + 1, None, {"pack": p + 1, "pack_steps": 0})
    if ckpt_ctx is not None:
        ckpt_ctx.__exit__(None, None, None)


def _train_one_pack(model, tok, resolved, store, cfg, jobs, p, packs, rank, world, threads, device, pad, config,
                    total_steps, resume_dir, progress) -> None:
    """Train pack `p` and (rank 0) write its adapters; its LoRA layers leave the base, even on error."""
    import torch
    import torch.distributed as dist

    from genpi.synth.pipeline import load_synth
    from genpi.train import precision
    from genpi.train.loop import build_examples
    from genpi.train.multilora import PackedLora
    from genpi.train.packed import PackedAdamW, PackMember

    # Every rank reads the data itself (no large objects through Ray); the driver already checked it.
    members = [PackMember(j.prompt_id, build_examples(tok, load_synth(store, j.synth_dir), j.prompt, cfg.train),
                          seed=cfg.train.seed) for j in jobs]
    pack = PackedLora(model, len(members), cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.target_modules,
                      cfg.train.lora_dropout, seeds=[m.seed for m in members])
    try:
        opt = PackedAdamW(pack.parameters(), len(members), max_grad_norm=cfg.train.grad_clip)
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        with pack_optimizer(pack, opt, cfg.train.zero_stage, world, bf16) as engine:
            if config.get("fail_prompt") in {j.prompt_id for j in jobs}:
                raise RuntimeError(f"injected training failure for {config['fail_prompt']} (test hook)")
            prog, resumed_at = _train_pack_on(engine, opt, model, pack, members, cfg, pad, rank, world, p, packs,
                                              config, total_steps, resume_dir, progress)
            if cfg.train.on_policy_epochs:
                from genpi.train.onpolicy import run_phase

                if rank == 0:
                    _progress(f"[train] pack {p + 1}/{len(packs)}: on-policy phase "
                              f"({cfg.train.on_policy_epochs} epochs on the adapters' own replies)")
                run_phase(model, pack, tok, members, [j.prompt for j in jobs], cfg.train, pad, device, engine=engine,
                          optimizer=None if engine is not None else opt, rank=rank, world=world,
                          micro_batch=config.get("micro_batch"), prior=prog)
            # Every rank's peak memory, gathered as one tensor on the parameters' device (an
            # object collective would go through the host, which NCCL cannot do).
            mine = peak_memory()
            mem_t = torch.tensor([mine["peak_rss_mb"], mine.get("peak_cuda_mb", -1.0)], device=device)
            gathered = [torch.zeros_like(mem_t) for _ in range(world)]
            dist.all_gather(gathered, mem_t) if world > 1 else gathered.__setitem__(0, mem_t)
            mem = [{"peak_rss_mb": float(t[0]), **({"peak_cuda_mb": float(t[1])} if t[1] >= 0 else {})}
                   for t in gathered]
            if rank == 0:
                stats = write_pack(store, pack, prog, members, jobs, resolved.path, p,
                                   {"workers": world, "zero_stage": cfg.train.zero_stage if engine is not None else None,
                                    "deepspeed": engine is not None, "worker_memory": mem,
                                    "threads_per_worker": threads, "resumed_at_pack_step": resumed_at,
                                    "precision": precision.describe(cfg.train.autocast, device)})
                for key, st in stats.items():
                    log.info("pack %d/%d: %s trained (%s)", p + 1, len(packs), key, st["stop_reason"])
            if world > 1:
                dist.barrier()
        del engine, opt  # nothing of a finished pack outlives it
    finally:
        pack.remove()


def _train_pack_on(engine, opt, model, pack, members, cfg, pad, rank, world, p, packs, config, total_steps,
                   resume_dir, progress):
    """Train one pack on its engine, or plainly on ``opt`` when the engine is None (resuming
    from ``resume_dir`` when given); (progress, resumed_at)."""
    from genpi.train.packed import PackProgress, train_pack

    fail_after = config.get("fail_after_steps")
    prog, resumed_at = None, None
    if resume_dir is not None and progress is not None:
        if engine is not None:
            engine.load_checkpoint(resume_dir, tag="pack", load_module_strict=False,
                                   load_lr_scheduler_states=False)
        else:
            load_plain(resume_dir, pack, opt)
        prog, resumed_at = progress, progress.pack_steps

    def on_step(pr: PackProgress) -> None:
        total_steps[0] += 1
        if rank == 0 and (pr.pack_steps % 10 == 0 or all(pr.done)):
            # Long work shows progress: a line per 10 steps reaches the driver's log.
            _progress(f"[train] pack {p + 1}/{len(packs)}: step {pr.pack_steps}/{max(pr.total)}, "
                      f"{sum(pr.done)}/{len(pr.done)} adapters done, "
                      f"{pr.tokens / max(pr.seconds, 1e-9):.0f} tokens/s")
        if pr.pack_steps % cfg.train.checkpoint_every_steps == 0 and not all(pr.done):
            _checkpoint(engine.save_checkpoint if engine is not None else None, p, pr,
                        {"pack_steps": pr.pack_steps, "pack": p}, plain=None if engine is not None else (pack, opt))
            if fail_after is not None and total_steps[0] >= fail_after:
                marker = config["fail_marker"]
                if not os.path.exists(marker):  # fail once, after the checkpoint (resume test)
                    open(marker, "w").close()
                    raise InjectedWorkerFailure(f"injected failure after pack step {pr.pack_steps}")

    return train_pack(model, pack, members, cfg.train, pad, engine=engine,
                      optimizer=opt if engine is None else None, rank=rank, world=world,
                      micro_batch=config.get("micro_batch"), progress=prog, on_step=on_step), resumed_at


def _checkpoint(save_engine, pack_index: int, prog, metrics: dict, plain=None) -> None:
    """Report a checkpoint: trainable state only (never the frozen base) + progress.json.
    ``save_engine``: a DeepSpeed engine's save_checkpoint; ``plain``: (pack, optimizer) of a
    pack trained without one; neither at a pack's end."""
    import ray.train

    from genpi.train.validation import save_best

    with tempfile.TemporaryDirectory(prefix="genpi-ckpt-") as d:
        if save_engine is not None:
            save_engine(d, tag="pack", exclude_frozen_parameters=True)
        elif plain is not None and ray.train.get_context().get_world_rank() == 0:
            save_plain(d, *plain)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(d, "progress.json"), "w") as f:
                json.dump({"pack": pack_index, "progress": prog.to_dict() if prog else None}, f)
            save_best(prog, d)  # every rank holds the same copies
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _arrow_fs(store):
    """The store's own fsspec filesystem (s3fs, gcsfs, ...) for Ray Train's checkpoints, so they
    reach the store with exactly the credentials and endpoint the store uses."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(store.fs))


# ---- the driver ----------------------------------------------------------------------------
def _state_api_available() -> bool:
    import ray
    from ray.util.state import list_nodes

    try:
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10)
        return True
    except Exception:  # no dashboard (genpi's local clusters), or it does not answer
        return False


def _trainer_class():
    """Ray Train's TorchTrainer, less its PlacementGroupCleaner where it cannot work.

    That detached actor asks Ray's State API every second whether the train controller is
    alive, to remove the placement group of a controller that died. Without the dashboard
    (genpi's local clusters start none) every ask fails and logs "Failed to query Ray Train
    Controller actor state" (134 lines in one local run, burying the job's progress) -- and
    it can never see a dead controller there, so it protects nothing. Kept wherever the
    State API answers (KubeRay clusters)."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if _state_api_available():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def train_many(cfg: GenpiConfig, store_uri: str, jobs: list[TrainJob], *, run_name: str | None = None,
               storage_path: str | None = None, max_failures: int = 1,
               _fail_after_steps: int | None = None, _fail_prompt: str | None = None,
               _micro_batch: int | None = None,
               _collective_timeout_s: int = 1800) -> list[TrainOutcome]:
    """Train one adapter per job, packed, on Ray Train; one outcome per job, in job order.

    ``storage_path`` (Ray Train's checkpoints and results) defaults to ``<store>/runs/train``,
    so a job's checkpoints live next to its artifacts on a cluster's shared store.
    ``_fail_after_steps`` injects one worker failure after that many steps and ``_fail_prompt``
    an error in the pack holding that prompt (tests only);
    ``_collective_timeout_s`` turns ranks that wait on each other forever into an error."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from genpi.models import load_tokenizer
    from genpi.store import Store, worker_env

    ensure_torch_extensions_dir()
    # Ray Train's controller polls its workers every 2 s by default, and a run ends only at the
    # poll after the workers finished: measured 3.8 s from the last worker's return to fit()
    # returning, per wave. A poll is one small remote call, so 0.5 s costs nothing here; Ray
    # Train hands the variable on to its controller (a value the user set is kept).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cfg.cluster.gpus_per_train_worker == 0 else "cuda")
    store = Store(store_uri)
    tok = load_tokenizer(cfg.model)
    sets, done = prepare_jobs(cfg, store, tok, jobs)
    by_id = {j.prompt_id: j for j in jobs}
    packs = plan_packs({k: ts.tokens() for k, ts in sets.items()}, cfg.train.pack_size)
    pack_of = {k: i for i, pack in enumerate(packs) for k in pack}
    error = None
    if packs:
        import ray

        from genpi.rayinit import actor_cpus, ensure_ray

        ensure_ray(cfg.cluster)
        cpus = cfg.cluster.cpus_per_train_worker
        if cpus is None and cfg.cluster.train_workers > 1:  # all must fit: split the nodes' CPUs
            cpus = split_cpus([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")],
                              cfg.cluster.train_workers)
        run_name = run_name or f"train-{int(time.time())}"
        gpu = cfg.cluster.gpus_per_train_worker > 0
        problem = None if cfg.cluster.resource_wait_s else train_resource_problem(
            [n["Resources"] for n in ray.nodes() if n.get("Alive")], cfg.cluster.train_workers,
            actor_cpus(cpus), cfg.cluster.gpus_per_train_worker)
        if problem:  # "check once": fail now rather than wait for workers that cannot start
            packs, error = [], f"ResourceError: {problem}"
            log.error("%s", problem)
    if packs:
        for k in pack_of:  # an earlier run's pack failure says nothing about this run
            if store.exists(f"{by_id[k].pdir}/{TRAIN_ERROR}"):
                store.remove(f"{by_id[k].pdir}/{TRAIN_ERROR}")
        scratch = tempfile.mkdtemp(prefix="genpi-train-")
        trainer = _trainer_class()(
            _worker,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "store_uri": store_uri,
                "packs": [[asdict(by_id[k]) for k in pack] for pack in packs],
                "fail_after_steps": _fail_after_steps,
                "fail_prompt": _fail_prompt,
                "fail_marker": os.path.join(scratch, "failed-once"),
                "micro_batch": _micro_batch,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.cluster.train_workers, use_gpu=gpu,
                resources_per_worker={"CPU": actor_cpus(cpus),
                                      **({"GPU": cfg.cluster.gpus_per_train_worker} if gpu else {})}),
            # On GPUs every collective is on CUDA tensors (NCCL); gloo for CPU tensors anyway,
            # so a host tensor reaching a collective is slow rather than fatal.
            torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if gpu else "gloo",
                                     timeout_s=_collective_timeout_s),
            run_config=RunConfig(name=run_name, storage_path=storage_path or store.path("runs", "train"),
                                 storage_filesystem=None if (storage_path or store.local) else _arrow_fs(store),
                                 failure_config=FailureConfig(
                                     max_failures=max_failures,
                                     controller_failure_limit=controller_failure_limit(cfg.cluster.resource_wait_s)),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 worker_runtime_env={"env_vars": {**worker_env(), **{
                                     k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")
                                     if k in os.environ}}}),
        )
        try:
            trainer.fit()
        except Exception as e:  # packs that finished are published; the rest are reported failed
            error = f"{type(e).__name__}: {e}"
            log.error("training run failed: %s\n%s", error, traceback.format_exc())
    outcomes = {o.prompt_id: o for o in done}
    for k in sets:
        j = by_id[k]
        if store.exists(f"{j.pdir}/{ADAPTER_FILE}") and store.exists(f"{j.pdir}/train.json"):
            outcomes[k] = TrainOutcome(k, j.pdir, "trained", pack=pack_of[k], stats=store.read_json(f"{j.pdir}/train.json"))
        elif store.exists(f"{j.pdir}/{TRAIN_ERROR}"):  # its pack failed; the other packs went on
            outcomes[k] = TrainOutcome(k, j.pdir, "failed", error=store.read_json(f"{j.pdir}/{TRAIN_ERROR}")["error"],
                                       pack=pack_of[k])
        else:
            outcomes[k] = TrainOutcome(k, j.pdir, "failed", error=error or "pack did not finish", pack=pack_of[k])
    return [outcomes[j.prompt_id] for j in jobs]
