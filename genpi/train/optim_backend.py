"""What steps a pack's optimizer: a DeepSpeed ZeRO engine, or plain torch on one CPU worker.

Used by the Ray runner (:mod:`genpi.train.trainer`); DeepSpeed is imported only where an
engine is built.
"""
from __future__ import annotations

import contextlib
import os


def deepspeed_config(zero_stage: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,  # unused: batches are built by the pack loop
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        # Clipping is per adapter, inside PackedAdamW (on the averaged, partitioned gradients).
        "gradient_clipping": 0.0,
        # A torch optimizer: a DeepSpeed "optimizer" section would compile an extension.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


@contextlib.contextmanager
def pack_engine(pack, opt, zero_stage: int, bf16: bool):
    """The DeepSpeed engine of one pack, destroyed when the block ends.

    ``deepspeed.initialize`` registers forward hooks on the module it is given and
    broadcasts all its parameters; given the whole model, every pack would add hooks to
    the shared base (keeping every finished engine and its optimizer state reachable) and
    re-send the frozen base. It gets a module holding only the pack's LoRA parameters
    (the same Parameter objects the model uses; we never call the engine's forward)."""
    import deepspeed
    import torch

    if zero_stage not in (0, 1, 2):  # bind_zero and the adapter export need whole parameters
        raise ValueError(f"ZeRO stage {zero_stage} is not supported for packed training (0, 1 or 2)")
    holder = torch.nn.Module()
    holder.lora = torch.nn.ParameterList(pack.parameters())
    engine, *_ = deepspeed.initialize(model=holder, model_parameters=pack.parameters(), optimizer=opt,
                                      config=deepspeed_config(zero_stage, bf16))
    try:
        if zero_stage > 0:
            opt.bind_zero(pack.parameters())
        yield engine
    finally:
        # Removes ZeRO's gradient hooks from the LoRA parameters and its _hp_mapping links.
        engine.destroy()


def uses_deepspeed(world: int, bf16: bool) -> bool:
    """Whether a pack trains through a DeepSpeed engine. With several workers ZeRO partitions
    the optimizer state and averages gradients; with bf16 parameters (GPUs) DeepSpeed keeps
    the fp32 master weights. One worker with fp32 parameters gains neither, and DeepSpeed's
    gradient buckets and copies made the French job's training 155 tokens/s against 191
    in one process with the plain optimizer (2 CPU cores)."""
    return world > 1 or bf16


@contextlib.contextmanager
def pack_optimizer(pack, opt, zero_stage: int, world: int, bf16: bool):
    """The pack's DeepSpeed engine (:func:`pack_engine`), or None where it trains plainly."""
    if not uses_deepspeed(world, bf16):
        yield None
        return
    with pack_engine(pack, opt, zero_stage, bf16) as engine:
        yield engine


PLAIN_STATE = "pack_state.pt"


def save_plain(d: str, pack, opt) -> None:
    """A plainly trained pack's checkpoint: its LoRA stacks and PackedAdamW's state."""
    import torch

    torch.save({"params": [p.detach().cpu() for p in pack.parameters()], "optimizer": opt.state_dict()},
               os.path.join(d, PLAIN_STATE))


def load_plain(d: str, pack, opt) -> None:
    import torch

    state = torch.load(os.path.join(d, PLAIN_STATE), map_location="cpu", weights_only=True)
    params = list(pack.parameters())
    if len(params) != len(state["params"]):
        raise ValueError(f"checkpoint {d} holds {len(state['params'])} LoRA tensors, the pack has {len(params)}")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
