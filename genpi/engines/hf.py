"""transformers engine: batched, left-padded generation on CPU or GPU.

Requests are grouped by their sampling settings and adapter, sorted by length inside a
group (less padding), and run at most `batch_size` rows and `max_batch_tokens` tokens (rows x
(longest prompt + most new tokens), which bounds the KV cache) at a time through
:func:`genpi.engines.decode.decode` (rows leave the batch as they end). Top-k log-probabilities come from
the raw logits (temperature 1), which is the teacher distribution the KL term wants even
when the tokens themselves were sampled at another temperature.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from genpi.engines.base import ChatRequest, Completion, render_chat
from genpi.engines.decode import decode


class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 16, max_batch_tokens: int | None = None):
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
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
        return cls.for_model(model, tok, cfg)

    @classmethod
    def for_model(cls, model, tokenizer, cfg) -> "HFEngine":
        """An engine over an already loaded model, sized by `cfg.engine`."""
        return cls(model, tokenizer, cfg.engine.batch_size, cfg.engine.max_batch_tokens)

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
            # Not split by max_new_tokens: each row of a batch stops at its own limit.
            groups.setdefault((r.adapter, r.temperature, r.top_p, r.top_k_logprobs), []).append(i)
        for key, idxs in groups.items():
            idxs.sort(key=lambda i: len(encoded[i]))
            for chunk in self._chunks(idxs, encoded, requests):
                outs = self._generate_batch([requests[i] for i in chunk], [encoded[i] for i in chunk])
                for i, out in zip(chunk, outs):
                    out.tag = requests[i].tag
                    results[i] = out
                if progress:
                    progress(len(chunk))
        return results  # type: ignore[return-value]

    def _chunks(self, idxs: list[int], encoded: list[list[int]], requests: list[ChatRequest]) -> list[list[int]]:
        """`idxs` (sorted by prompt length) cut into decoding batches of at most batch_size rows
        and max_batch_tokens tokens, counting every row at the batch's widest (left padding)."""
        chunks, cur, new = [], [], 0
        for i in idxs:
            new_i = max(new, requests[i].max_new_tokens)
            over = self.max_batch_tokens is not None and \
                (len(cur) + 1) * (len(encoded[i]) + new_i) > self.max_batch_tokens
            if cur and (len(cur) == self.batch_size or over):
                chunks.append(cur)
                cur, new_i = [], requests[i].max_new_tokens
            cur.append(i)
            new = new_i
        return chunks + [cur] if cur else chunks

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
        if r0.seed is not None:
            torch.manual_seed(r0.seed)
        with self._adapter(r0.adapter):
            rows = decode(self.model, input_ids.to(self.device), attn.to(self.device),
                          max_new_tokens=[r.max_new_tokens for r in reqs], eos_ids=self.eos_ids,
                          temperature=r0.temperature,
                          top_p=r0.top_p, top_k_logprobs=r0.top_k_logprobs)
        eos = set(self.eos_ids)
        completions = []
        for row, d in zip(ids, rows):
            # The end-of-turn id stays in token_ids: the trainer learns to stop.
            text = self.tok.decode([t for t in d.tokens if t not in eos], skip_special_tokens=True)
            c = Completion(text=text.strip(), token_ids=d.tokens, finish_reason=d.finish_reason,
                           prompt_tokens=len(row))
            if r0.top_k_logprobs > 0:
                c.topk_ids, c.topk_logprobs = d.topk_ids, d.topk_logprobs
            completions.append(c)
        return completions
