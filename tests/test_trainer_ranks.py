"""Packed training on several ranks and packs: every rank runs the same number of backward
passes, a finished pack's DeepSpeed engine is freed, workers use the CPUs Ray gave them."""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from genpi.config import TrainConfig, load_config
from genpi.store import Store
from genpi.train.multilora import PackedLora
from genpi.train.packed import PackedAdamW, PackMember, member_batches, pack_step, train_pack
from genpi.rayinit import use_assigned_cpus
from genpi.train.placement import split_cpus
from genpi.train.optim_backend import pack_engine

from fake_synth import train_jobs
from test_packed_train import PAD, _training_set

# fp32 (train.autocast=off): these equalities are exact only in fp32; bf16 matmuls round
# differently with the batch's shape (tests/test_precision.py covers the autocast).
CFG = TrainConfig(lora_r=4, lora_alpha=8, epochs=1, batch_size=3, lr=5e-3, grad_clip=0.05, autocast="off")


def _step_samples(n_sft: int = 3, n_pg: int = 2):
    """One step of two adapters: 5 samples, so 2 ranks get 3 and 2 of them."""
    ts = [_training_set(0, n_sft, 0), _training_set(1, 0, n_pg)]
    return [(i, kind, ex) for i, t in enumerate(ts) for kind, ex in t.examples]


@pytest.mark.parametrize("split", [dict(micro_batch=1), dict(max_batch_tokens=24)])
def test_every_rank_runs_as_many_backward_passes_and_the_sum_is_the_one_rank_gradient(
        tiny_llama, monkeypatch, single_thread_torch, split):
    """Rank 0 of 2 has more micro-batches than rank 1 (by count or by token budget); both
    must run the same number of backward passes (ZeRO-2 communicates on each), and the
    ranks' gradients (each scaled by `world`, then averaged as DeepSpeed does) must add up
    to the single-rank gradient: the padding passes change nothing."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: None)  # sums only logged
    cfg = CFG.model_copy(update={k: v for k, v in split.items() if k != "micro_batch"})
    samples = _step_samples()

    def run(rank, world):
        model = tiny_llama(seed=0)
        pack = PackedLora(model, 2, cfg.lora_r, cfg.lora_alpha, seeds=[1, 2])
        calls = []

        def backward(loss, last):
            calls.append(last)
            loss.backward()

        pack_step(model, pack, samples, cfg, PAD, "cpu", rank, world, split.get("micro_batch"), backward)
        return calls, [p.grad.clone() for p in pack.parameters()]

    (c0, g0), (c1, g1) = run(0, 2), run(1, 2)
    assert len(c0) == len(c1) >= 2 and c0 == c1 and c0[-1] and not any(c0[:-1])
    _, alone = run(0, 1)
    for a, b, want in zip(g0, g1, alone):
        torch.testing.assert_close((a + b) / 2, want, rtol=1e-5, atol=1e-7)


def test_split_cpus_fits_every_worker():
    assert split_cpus([2.0], 1) == 2.0  # one worker: the whole node
    assert split_cpus([4.0], 2) == 2.0  # two on one node: half each
    assert split_cpus([16.0, 16.0, 0.0], 2) == 16.0  # one per node
    assert split_cpus([0.0], 2) == 1.0  # scaling from zero: no worker node yet
    assert split_cpus([3.0], 2) == 1.0


def test_worker_threads_follow_the_cpus_ray_assigned(ray_local):
    """A container that sets OMP_NUM_THREADS=1 would leave a 2-CPU worker on one thread."""
    @ray_local.remote(num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    def probe():
        import torch

        before = torch.get_num_threads()
        return before, use_assigned_cpus(), torch.get_num_threads()

    before, got, after = ray_local.get(probe.remote())
    assert before == 1 and got == after == 2


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            st = obj.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_four_packs_in_sequence_free_each_engine(tiny_llama, one_rank_group, single_thread_torch):
    """4 packs, one DeepSpeed ZeRO-2 engine each, on one shared base (as a worker runs them):
    no hook stays on the base, every finished pack's optimizer is freed, and the memory held
    after the last pack equals that after the first."""
    model = tiny_llama(seed=0)
    hooks_before = _hooks(model)
    optimizers, memory = [], []
    for p in range(4):
        members = [PackMember(f"p{p}-{i}", _training_set(10 * p + i, 3, 1), seed=p * 2 + i) for i in range(2)]
        pack = PackedLora(model, 2, CFG.lora_r, CFG.lora_alpha, seeds=[m.seed for m in members])
        opt = PackedAdamW(pack.parameters(), 2, max_grad_norm=CFG.grad_clip)
        with pack_engine(pack, opt, zero_stage=2, bf16=False) as engine:
            prog = train_pack(model, pack, members, CFG, PAD, engine=engine)
            assert prog.step == [len(member_batches(m.ts, CFG)) for m in members]
            optimizers.append(weakref.ref(opt))
        pack.remove()
        del engine, opt, pack, prog
        memory.append(_live_tensor_bytes())
        assert _hooks(model) == hooks_before, f"pack {p} left hooks on the base model"
    assert [ref() is None for ref in optimizers] == [True] * 4
    assert abs(memory[-1] - memory[0]) <= 4096, memory


TRAIN = ["train.autocast=off", "train.epochs=1", "train.batch_size=3", "train.lora_r=4", "train.lora_alpha=8",
         "train.pack_size=1", "train.zero_stage=2", "train.lr=1e-2", "cluster.cpus_per_train_worker=1"]


# Before the fix the ranks' collectives diverge and wait on each other: the 60 s collective
# timeout turns that into a worker error (no restart: max_failures=0); the thread timeout is
# the last resort (Ray's blocking wait does not let pytest's signal through).
@pytest.mark.timeout(600, method="thread")
def test_two_workers_with_unequal_micro_batches_equal_one_worker(ray_local, tiny_model_dir, smollm_tokenizer,
                                                                  tmp_path, capfd):
    """Ray Train, 2 CPU workers, ZeRO-2, one sequence per micro-batch and 3 per step: rank 0
    runs 2 micro-batches where rank 1 runs 1. The run finishes, and its adapters equal those
    of one in-process worker on the same data, the default's on-policy phase included; Ray's console stays free of the Placement
    Group Cleaner's "Failed to query" flood."""
    from safetensors.torch import load_file

    from genpi.models import load_model
    from genpi.train.jobs import train_local
    from genpi.train.trainer import train_many

    cfg = load_config(None, [*TRAIN, f"model.name={tiny_model_dir}", "cluster.train_workers=2"])
    results = {}
    store = Store(tmp_path / "two")
    jobs = train_jobs(store, smollm_tokenizer, ["x", "y"])
    outcomes = train_many(cfg, store.uri, jobs, run_name="ranks", _micro_batch=1, max_failures=0,
                          _collective_timeout_s=60)
    assert [o.status for o in outcomes] == ["trained", "trained"], outcomes
    assert outcomes[0].stats["workers"] == 2 and outcomes[0].stats["threads_per_worker"] == 1
    results["two"] = [load_file(f"{j.pdir}/adapter/adapter_model.safetensors") for j in jobs]
    phases = {"two": [store.read_json(f"{j.pdir}/train.json")["on_policy"] for j in jobs]}

    store = Store(tmp_path / "one")
    jobs = train_jobs(store, smollm_tokenizer, ["x", "y"])
    model, tok, resolved = load_model(cfg.model)
    outcomes = train_local(cfg, store, jobs, model, tok, resolved.path, progress=False)
    assert [o.status for o in outcomes] == ["trained", "trained"], outcomes
    results["one"] = [load_file(f"{j.pdir}/adapter/adapter_model.safetensors") for j in jobs]
    phases["one"] = [store.read_json(f"{j.pdir}/train.json")["on_policy"] for j in jobs]
    # The default's on-policy phase ran in both (sampling, teacher scoring and reverse-KL steps
    # on every rank with the same seeds), on the same replies: the parity covers it.
    for two, one in zip(phases["two"], phases["one"]):
        assert one["examples"] > 0 and one["steps"] > 0
        assert (two["examples"], two["steps"], two["dropped"]) == (one["examples"], one["steps"], one["dropped"])
    for two, one in zip(results["two"], results["one"]):
        assert two.keys() == one.keys()
        assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    assert "Failed to query Ray Train Controller actor state" not in capfd.readouterr().err


_ARENA_PROBE = """
import os, ray
from genpi.config import GenpiConfig
from genpi.rayinit import ensure_ray
ensure_ray(GenpiConfig().cluster, num_cpus=1)
@ray.remote(num_cpus=1)
def probe():
    return os.environ.get("MALLOC_ARENA_MAX")
print("ARENA", ray.get(probe.remote()))
ray.shutdown()
"""


@pytest.mark.parametrize("preset, want", [(None, "1"), ("4", "4")])
def test_a_local_ray_gives_its_workers_one_malloc_arena(preset, want):
    """Ray Train runs the train function on a second thread, whose own glibc arena made the
    same step 1.3x slower (bench/thread_malloc.py): a local Ray started by genpi hands its
    processes MALLOC_ARENA_MAX=1, and a value the user set is kept."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "RAY_ADDRESS")}
    if preset:
        env["MALLOC_ARENA_MAX"] = preset
    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert f"ARENA {want}" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
