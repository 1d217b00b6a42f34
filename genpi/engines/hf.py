"""transformers engine: batched, left-padded generation on CPU or GPU.

Requests are grouped by their sampling settings and adapter, sorted by length inside a
group (less padding), and run `batch_size` at a time. Top-k log-probabilities come from
the raw logits (temperature 1), which is the teacher distribution the KL term wants even
when the tokens themselves were sampled at another temperature.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from genpi.engines.base import ChatRequest, Completion, render_chat


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_config(cls, cfg) -> "HFEngine":
        from genpi.models import load_model

        model, tok, _ = load_model(cfg.model)
        return cls(model, tok, cfg.engine.batch_size)

    # ------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], assistant_prefix: str | None = None) -> list[int]:
        return render_chat(self.tok, messages, assistant_prefix)

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.render(messages))

    def generate(
        self, requests: list[ChatRequest], progress: Callable[[int], None] | None = None
    ) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        encoded = [self.render(r.messages, r.assistant_prefix) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampling_key(), []).append(i)
        for key, idxs in groups.items():
            idxs.sort(key=lambda i: len(encoded[i]))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                outs = self._generate_batch([requests[i] for i in chunk], [encoded[i] for i in chunk])
                for i, out in zip(chunk, outs):
                    out.tag = requests[i].tag
                    results[i] = out
                if progress:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    @contextlib.contextmanager
    def _adapter(self, name: str | None):
        """Select a loaded PEFT adapter, or run the bare base model when name is None."""
        if not hasattr(self.model, "peft_config"):
            if name is not None:
                raise ValueError(f"adapter '{name}' requested but the engine's model has no adapters")
            yield
            return
        if name is None:
            with self.model.disable_adapter():
                yield
        else:
            if name not in self.model.peft_config:
                raise ValueError(f"unknown adapter '{name}'")
            self.model.set_adapter(name)
            yield

    @torch.no_grad()
    def _generate_batch(self, reqs: list[ChatRequest], ids: list[list[int]]) -> list[Completion]:
        r0 = reqs[0]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):  # left padding: generation continues from the right edge
            input_ids[row, width - len(x) :] = torch.tensor(x)
            attn[row, width - len(x) :] = 1
        sample = r0.temperature > 0
        if r0.seed is not None:
            torch.manual_seed(r0.seed)
        kwargs = dict(
            max_new_tokens=r0.max_new_tokens,
            do_sample=sample,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            output_logits=r0.top_k_logprobs > 0,
        )
        if sample:
            kwargs.update(temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with self._adapter(r0.adapter):
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device), **kwargs
            )
        gen = out.sequences[:, width:].cpu()
        topk_vals = topk_idx = None
        if r0.top_k_logprobs > 0:
            # [steps, B, V] raw logits -> top-k of log-softmax, one step at a time to bound memory.
            vals, idx = [], []
            for step_logits in out.logits:
                lp = torch.log_softmax(step_logits.float(), dim=-1)
                v, i = lp.topk(r0.top_k_logprobs, dim=-1)
                vals.append(v.cpu())
                idx.append(i.cpu())
            topk_vals = torch.stack(vals, dim=1)  # [B, steps, k]
            topk_idx = torch.stack(idx, dim=1)
        eos = set(self.eos_ids)
        completions = []
        for row in range(len(reqs)):
            toks = gen[row].tolist()
            n, finish = len(toks), "length"
            for j, t in enumerate(toks):
                if t in eos:
                    n, finish = j + 1, "stop"  # keep the end-of-turn id: the trainer learns to stop
                    break
            toks = toks[:n]
            text = self.tok.decode([t for t in toks if t not in eos], skip_special_tokens=True)
            c = Completion(text=text.strip(), token_ids=toks, finish_reason=finish, prompt_tokens=len(ids[row]))
            if topk_idx is not None:
                c.topk_ids = topk_idx[row, :n].tolist()
                c.topk_logprobs = topk_vals[row, :n].tolist()
            completions.append(c)
        return completions
