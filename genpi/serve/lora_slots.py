"""LoRA adapters stacked for batched serving: read a PEFT folder, hold adapters in slots.

`LoraSlots` keeps up to `capacity` adapters in one genpi.train.multilora.PackedLora over the
base model (slot = stacked A/B row), loaded on first use, least recently used idle slot
evicted; a slot a running row uses is never evicted, so a row keeps its weights until it
finishes. Used by genpi.serve.batching's model thread.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class AdapterWeights:
    """One PEFT LoRA adapter read into memory: per module name (A [r, in], B [out, r])."""
    r: int
    scaling: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_peft_adapter(path: str, module_names: set[str]) -> AdapterWeights:
    """Read a PEFT adapter folder; refuse what the stacked layer cannot compute exactly."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                   if cfg.get(k)]
    if unsupported:
        raise ValueError(f"adapter {path}: {', '.join(unsupported)} not supported by the batched CPU server")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    state = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or name not in module_names:
            raise ValueError(f"adapter {path}: weight {key} has no place in the batched LoRA layer")
        tensors.setdefault(name, {})[kind[0]] = t
    return AdapterWeights(r, scaling, {n: (ab["A"], ab["B"]) for n, ab in tensors.items()})


class LoraSlots:
    """Adapters stacked in a PackedLora on `model`: key -> slot, LRU, refcounts of running rows.

    Only the model thread changes it; `keys()` is safe from any thread."""

    def __init__(self, model, capacity: int, weights: Callable[[str], AdapterWeights]):
        from genpi.train.multilora import target_names

        self.model, self.capacity, self._weights = model, capacity, weights
        self.module_names = set(target_names(model, "all-linear"))
        self.pack = None  # built on the first adapter, at its rank (grown for a larger one)
        self._slot: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self._scaling: dict[int, float] = {}
        self._users: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.unwanted: set[str] = set()  # keys the multiplexer dropped: evicted first
        self.hits = self.loads = self.evictions = 0  # acquire() outcomes, for stats()

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._slot)

    def stats(self) -> dict[str, int]:
        return {"slot_hits": self.hits, "slot_loads": self.loads, "slot_evictions": self.evictions,
                "slots_used": len(self._slot), "slots": self.capacity}

    def acquire(self, key: str) -> int | None:
        """The slot holding `key` (loaded now if needed), or None when every slot is in use."""
        if key in self._slot:
            self.hits += 1
            self._slot.move_to_end(key)
            self._users[key] += 1
            return self._slot[key]
        used = set(self._slot.values())
        free = next((s for s in range(self.capacity) if s not in used), None)
        if free is None:
            idle = [k for k in self._slot if not self._users[k]]
            if not idle:
                return None
            victim = next((k for k in idle if k in self.unwanted), idle[0])
            with self._lock:
                free = self._slot.pop(victim)
            self.evictions += 1
            log.info("adapter %s evicted from slot %d", victim, free)
        w = self._weights(key)
        self._install(free, w)
        with self._lock:
            self._slot[key] = free
        self._users[key] += 1
        self.loads += 1
        log.info("adapter %s loaded into slot %d (r=%d)", key, free, w.r)
        return free

    def release(self, key: str) -> None:
        self._users[key] -= 1

    @torch.no_grad()
    def _install(self, slot: int, w: AdapterWeights) -> None:
        from genpi.train.multilora import PackedLora

        if self.pack is None or w.r > self.pack.r:
            old = self.pack
            old_modules = dict(old.modules) if old is not None else {}
            if old is not None:
                old.remove()  # (empties old.modules)
            # Slots of a smaller rank are zero-padded: the extra rank rows add exactly zero.
            self.pack = PackedLora(self.model, self.capacity, w.r, alpha=w.r, seeds=[0] * self.capacity)
            for m in self.pack.modules.values():
                m.lora_A.zero_()
                m.lora_B.zero_()
            if old is not None:
                for name, m in self.pack.modules.items():
                    o = old_modules[name]
                    m.lora_A[:, : old.r].copy_(o.lora_A)
                    m.lora_B[:, :, : old.r].copy_(o.lora_B)
        for name, m in self.pack.modules.items():
            m.lora_A[slot].zero_()
            m.lora_B[slot].zero_()
            if name in w.tensors:  # a module the adapter does not target keeps zeros
                a, b = w.tensors[name]
                m.lora_A[slot, : w.r].copy_(a)
                m.lora_B[slot, :, : w.r].copy_(b)
        self._scaling[slot] = w.scaling

    def route(self, rows: list):
        """Route a forward over `rows`: each row's slot, scaled by alpha/r x strength."""
        if self.pack is None or all(r.slot is None for r in rows):
            return contextlib.nullcontext()
        index = [r.slot if r.slot is not None else -1 for r in rows]
        scale = [self._scaling[r.slot] * r.strength if r.slot is not None else 0.0 for r in rows]
        return self.pack.route_to(index, scale)
