"""Many LoRA adapters on one frozen base, trained or run together in one forward.

PEFT can *serve* several adapters in one batch (``adapter_names=``), but that path is
inference-only and loops over adapters in Python. Here every targeted ``nn.Linear`` is
wrapped by a :class:`PackedLoraLinear` that holds the stacked weights of K adapters,
``lora_A`` [K, r, in] and ``lora_B`` [K, out, r], and adds to each sample its own
adapter's update::

    y[b] = W x[b] + (alpha / r) * B[idx[b]] @ A[idx[b]] @ x[b]

with one gather of the sample's A/B rows and two batched matmuls per layer -- the cost
grows with the batch, not with K. ``idx[b] = -1`` means "no adapter" (the base model,
e.g. the teacher). The per-sample index is set for a whole forward with
:meth:`PackedLora.route`.

Each adapter slot exports to a standard PEFT folder (adapter_config.json +
adapter_model.safetensors with PEFT's key names), loadable unchanged by PEFT and vLLM.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PEFT's "all-linear" leaves out the output layer; so do we (by name, as PEFT does).
_OUTPUT_LAYERS = ("lm_head",)


class _Route:
    """The per-sample adapter index shared by every wrapped layer of one model."""

    def __init__(self) -> None:
        self.index: Tensor | None = None
        self.any_base = False
        # The adapter every sample uses, when they all use one (a pack of one, a batch of one
        # adapter's samples): two plain matmuls instead of per-sample gathers and bmm.
        self.single: int | None = None
        # Serving only: a per-sample factor replacing alpha/r (adapters of different alpha/r
        # share one stack, and a `strength` scales one row); 0 for rows on the base.
        self.scale: Tensor | None = None


class PackedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, n_adapters: int, r: int, alpha: float, dropout: float, route: _Route):
        super().__init__()
        self.base = base
        self.r, self.scaling, self.route = r, alpha / r, route
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        idx = self.route.index
        if idx is None:
            return y
        n = x.shape[0]
        k = self.route.single
        # One adapter for every row (no per-row scale) needs no per-row index: a decoding loop
        # may drop finished rows from the batch (genpi.engines.decode) under the same routing.
        if (k is None or self.route.scale is not None) and idx.shape[0] != n:
            raise ValueError(f"adapter index has {idx.shape[0]} entries for a batch of {n}")
        h_in = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmuls cast their inputs themselves; a cast here would only
            # copy the activations to fp32 for autocast to copy them back to bf16.
            h_in = h_in.to(self.lora_A.dtype)
        if k is not None:  # measured on SmolLM2 training: the gathers and bmm cost as much as the base
            up = F.linear(F.linear(h_in, self.lora_A[k]), self.lora_B[k]).reshape(n, -1, self.lora_B.shape[1])
        else:
            safe = idx.clamp_min(0)
            a = self.lora_A.index_select(0, safe)  # [B, r, in]: this sample's A
            b = self.lora_B.index_select(0, safe)  # [B, out, r]
            h = torch.bmm(h_in.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))
            up = torch.bmm(h, b.transpose(1, 2))  # [B, T, out]
        if self.route.scale is not None:
            return y + (up * self.route.scale.to(up.dtype).view(n, 1, 1)).view_as(y).to(y.dtype)
        if self.route.any_base:  # samples routed to the base get no update
            up = up * (idx >= 0).to(up.dtype).view(n, 1, 1)
        return y + (up * self.scaling).view_as(y).to(y.dtype)


def target_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the Linear modules to wrap: 'all-linear' = every Linear but the output
    layer (PEFT's meaning); a list = Linears whose last name component is in it."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            if leaf not in _OUTPUT_LAYERS:
                out.append(name)
        elif leaf in target_modules:
            out.append(name)
    if not out:
        raise ValueError(f"no Linear module matches target_modules={target_modules!r}")
    return out


class PackedLora:
    """K LoRA adapters attached in place to ``model`` (frozen); :meth:`remove` restores it."""

    def __init__(self, model: nn.Module, n_adapters: int, r: int, alpha: float,
                 target_modules: str | Sequence[str] = "all-linear", dropout: float = 0.0,
                 seeds: Sequence[int] | None = None):
        if n_adapters < 1:
            raise ValueError("a pack needs at least one adapter")
        self.model, self.n_adapters, self.r, self.alpha, self.dropout = model, n_adapters, r, alpha, dropout
        self.route = _Route()
        for p in model.parameters():
            p.requires_grad_(False)
        self.modules: dict[str, PackedLoraLinear] = {}
        for name in target_names(model, target_modules):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = PackedLoraLinear(getattr(parent, leaf), n_adapters, r, alpha, dropout, self.route)
            setattr(parent, leaf, wrapped)
            self.modules[name] = wrapped
        for k, seed in enumerate(seeds if seeds is not None else range(n_adapters)):
            self.init_adapter(k, seed)

    # ---- parameters ---------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Stacked LoRA parameters, in a fixed order (module order, A then B)."""
        return [(f"{n}.{w}", getattr(m, w)) for n, m in self.modules.items() for w in ("lora_A", "lora_B")]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def n_params_per_adapter(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    @torch.no_grad()
    def init_adapter(self, k: int, seed: int) -> None:
        """PEFT's default init for slot k (A ~ kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in)), B = 0),
        drawn from a generator seeded by ``seed`` alone: an adapter gets the same start
        whatever pack, slot or device it is trained in."""
        gen = torch.Generator().manual_seed(int(seed))
        for m in self.modules.values():
            bound = 1.0 / math.sqrt(m.lora_A.shape[-1])
            a = torch.empty(m.lora_A.shape[1:]).uniform_(-bound, bound, generator=gen)
            m.lora_A[k].copy_(a)
            m.lora_B[k].zero_()

    @contextlib.contextmanager
    def route_to(self, index: Tensor | Sequence[int], scale: Tensor | Sequence[float] | None = None) -> Iterator[None]:
        """Run forwards inside this block with sample b using adapter ``index[b]`` (-1 = base).

        ``scale[b]``, when given, multiplies sample b's update instead of alpha/r (serving:
        per-adapter alpha/r times the request's strength; the caller gives 0 to base rows)."""
        dev = next(iter(self.modules.values())).lora_A.device
        idx = torch.as_tensor(index, dtype=torch.long, device=dev)
        if idx.numel() and int(idx.max()) >= self.n_adapters:
            raise ValueError(f"adapter index {int(idx.max())} out of range for a pack of {self.n_adapters}")
        prev = (self.route.index, self.route.any_base, self.route.scale, self.route.single)
        # Host syncs once per forward (not per layer): to skip the masking when no sample is on
        # the base, and to take the one-adapter path when every sample is on the same adapter.
        self.route.index, self.route.any_base = idx, bool((idx < 0).any())
        first = int(idx[0]) if idx.numel() else -1
        self.route.single = first if first >= 0 and bool((idx == first).all()) else None
        self.route.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32, device=dev)
        try:
            yield
        finally:
            self.route.index, self.route.any_base, self.route.scale, self.route.single = prev

    # ---- one adapter in and out ---------------------------------------------------------
    def adapter_state(self, k: int) -> dict[str, Tensor]:
        """Adapter k's weights with PEFT's key names (what adapter_model.safetensors holds)."""
        out = {}
        for name, m in self.modules.items():
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A[k].detach().float().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B[k].detach().float().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_adapter_state(self, k: int, state: dict[str, Tensor]) -> None:
        for name, m in self.modules.items():
            for w in ("lora_A", "lora_B"):
                key = f"base_model.model.{name}.{w}.weight"
                if key not in state:
                    raise KeyError(f"adapter state lacks {key}")
                getattr(m, w)[k].copy_(state[key])

    def export_peft(self, k: int, out_dir: str, base_model_name: str | None = None) -> None:
        """Write slot k as a standard PEFT adapter folder."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        # An explicit list of module names (not "all-linear"): every loader, vLLM included,
        # reads it the same way.
        leaves = sorted({n.rsplit(".", 1)[-1] for n in self.modules})
        cfg = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=leaves,
                         task_type="CAUSAL_LM", base_model_name_or_path=base_model_name)
        cfg.save_pretrained(out_dir)
        save_file(self.adapter_state(k), os.path.join(out_dir, "adapter_model.safetensors"),
                  metadata={"format": "pt"})

    def load_peft(self, k: int, adapter_dir: str) -> None:
        """Load a PEFT adapter folder (same r and targets) into slot k."""
        from safetensors.torch import load_file

        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        if cfg.get("r") != self.r or float(cfg.get("lora_alpha")) != float(self.alpha):
            raise ValueError(f"{adapter_dir}: r/alpha {cfg.get('r')}/{cfg.get('lora_alpha')} "
                             f"differ from the pack's {self.r}/{self.alpha}")
        self.load_adapter_state(k, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))

    def remove(self) -> nn.Module:
        """Put the original Linear modules back; the model is as it was before."""
        for name, m in self.modules.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, leaf, m.base)
        self.modules = {}
        return self.model
