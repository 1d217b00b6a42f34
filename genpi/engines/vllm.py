"""vLLM engine (GPU only): the same ChatRequest -> Completion interface as the HF engine.

The chat template is applied here with the model's own tokenizer (exactly as HFEngine
does), and vLLM receives token ids: both engines see the same tokens, including the
`assistant_prefix` continuation. Prefix caching is on, so the prompt shared by every
request of a prompt (the system message) is computed once. Top-k log-probabilities are
vLLM's raw log-probabilities (before temperature), like the HF engine's, and a LoRA
adapter is chosen per request by name.

Engine settings come from the config (`from_config`): the resolved base model at
`model.revision` (weights and tokenizer), `model.dtype`, and the same context limit planning
checks prompts against (`model.max_context`, capped by the model's own
max_position_embeddings). LoRA is switched on only for an engine that will run adapters
(evaluation): synthesis runs the bare base, and vLLM with `enable_lora` reserves GPU memory
for `max_loras` adapters of `max_lora_rank` and runs the LoRA kernels on every batch.

`vllm` is imported inside the engine: genpi works without it, and the translation between
our requests and vLLM's objects is tested without a GPU (tests/test_vllm_boundary.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from genpi.config import VLLM_LORA_RANKS, ConfigError
from genpi.engines.base import ChatRequest, Completion, render_chat


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, *, top_k_logprobs: int = 100, batch_size: int = 256,
                 enable_lora: bool = False, max_lora_rank: int = 64, max_loras: int = 8,
                 dtype: str = "auto", revision: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, llm_kwargs: dict[str, Any] | None = None):
        # Checked here, not only in the config: vLLM refuses any other rank, and it would
        # say so only after starting its engine (tens of seconds on a GPU).
        if enable_lora and max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of vLLM's allowed ranks {list(VLLM_LORA_RANKS)}, "
                             f"not {max_lora_rank}")
        from vllm import LLM

        self.tok = tokenizer
        self.batch_size = batch_size  # rows per call the synthesis stages hand over
        self.eos_ids = sorted({tokenizer.eos_token_id} - {None})
        self.adapters: dict[str, tuple[int, str]] = {}  # name -> (vLLM's int id, path)
        self.enable_lora, self.max_lora_rank = enable_lora, max_lora_rank
        kwargs = dict(
            model=model_path,
            dtype=dtype,
            enable_prefix_caching=True,
            # vLLM refuses more log-probabilities than this per position; the KL term needs k.
            max_logprobs=max(top_k_logprobs, 20),
            # Raw log-probabilities (before temperature/top-p), the teacher distribution the
            # KL term wants, as HFEngine records them.
            logprobs_mode="raw_logprobs",
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            # Stated either way: an engine without LoRA refuses adapters (add_adapter).
            enable_lora=enable_lora,
        )
        if revision:
            # The tokenizer vLLM detokenizes with is pinned with the weights, as load_tokenizer pins ours.
            kwargs.update(revision=revision, tokenizer_revision=revision)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if enable_lora:
            kwargs.update(max_lora_rank=max_lora_rank, max_loras=max_loras)
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)

    @classmethod
    def from_config(cls, cfg, *, adapters: bool = False) -> "VLLMEngine":
        """The engine for `cfg` on the resolved base model. `adapters=True` for an engine that
        runs LoRA adapters (evaluation); synthesis only runs the base, so LoRA stays off."""
        from transformers import AutoConfig

        from genpi.models import context_limit, load_tokenizer, resolve_model

        if adapters and cfg.train.lora_r > cfg.serve.max_lora_rank:
            fits = next((r for r in VLLM_LORA_RANKS if r >= cfg.train.lora_r), None)
            raise ConfigError(
                f"train.lora_r ({cfg.train.lora_r}) exceeds serve.max_lora_rank ({cfg.serve.max_lora_rank}): "
                "vLLM refuses an adapter whose rank is above the engine's max_lora_rank; "
                + (f"set serve.max_lora_rank={fits} or lower train.lora_r" if fits else
                   f"lower train.lora_r to at most {max(VLLM_LORA_RANKS)}"))
        path = resolve_model(cfg.model).path
        # The same limit planning checked every prompt against (pipeline/plan.py), so genpi and
        # vLLM agree on how long a request may be; vLLM's start-up check that the KV cache
        # holds one full-length sequence then uses this figure too.
        context = context_limit(AutoConfig.from_pretrained(path, revision=cfg.model.revision), cfg.model)
        s = cfg.serve
        return cls(path, load_tokenizer(cfg.model),
                   top_k_logprobs=cfg.engine.top_k_logprobs, batch_size=cfg.engine.batch_size,
                   dtype=cfg.model.dtype, revision=cfg.model.revision, max_model_len=context,
                   enable_lora=adapters, max_lora_rank=s.max_lora_rank, max_loras=s.max_adapters_per_replica,
                   seed=cfg.synth.seed)

    def add_adapter(self, name: str, path: str) -> None:
        if not self.enable_lora:
            raise ValueError(f"adapter '{name}': this vLLM engine was built without LoRA "
                             "(build it with from_config(cfg, adapters=True))")
        # A manifest entry may override train.lora_r, so the rank on disk is checked too;
        # vLLM would otherwise fail the whole batch that first uses the adapter.
        conf = Path(path) / "adapter_config.json"
        rank = json.loads(conf.read_text(encoding="utf-8")).get("r") if conf.is_file() else None
        if rank is not None and rank > self.max_lora_rank:
            raise ValueError(f"adapter '{name}' ({path}) has LoRA rank {rank} (train.lora_r), above "
                             f"serve.max_lora_rank ({self.max_lora_rank}) this vLLM engine was built with")
        self.adapters[name] = (len(self.adapters) + 1, path)

    # ------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], assistant_prefix: str | None = None) -> list[int]:
        return render_chat(self.tok, messages, assistant_prefix)

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.render(messages))

    def translate(self, req: ChatRequest) -> tuple[dict, dict, Any]:
        """(prompt, SamplingParams kwargs, LoRARequest args or None) for one request."""
        prompt = {"prompt_token_ids": self.render(req.messages, req.assistant_prefix)}
        params: dict[str, Any] = dict(
            max_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p if req.temperature > 0 else 1.0,
            seed=req.seed,
            stop_token_ids=self.eos_ids,
            # Special tokens stay out of the text; the token ids keep the end-of-turn id
            # vLLM stopped on, which the trainer learns to stop on.
            skip_special_tokens=True,
        )
        if req.top_k_logprobs:
            params["logprobs"] = req.top_k_logprobs
        lora = None
        if req.adapter is not None:
            if req.adapter not in self.adapters:
                raise ValueError(f"unknown adapter '{req.adapter}' (add it with add_adapter first)")
            lora_id, path = self.adapters[req.adapter]
            lora = (req.adapter, lora_id, path)
        return prompt, params, lora

    def generate(self, requests: list[ChatRequest], progress: Callable[[int], None] | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        prompts, params, loras = [], [], []
        for r in requests:
            p, kw, lora = self.translate(r)
            prompts.append(p)
            params.append(SamplingParams(**kw))
            loras.append(LoRARequest(*lora) if lora else None)
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        results = [self.completion(r, o) for r, o in zip(requests, outs)]
        if progress:
            progress(len(results))
        return results

    def completion(self, req: ChatRequest, out) -> Completion:
        """vLLM's RequestOutput -> Completion (token ids end with the eos id when it stopped)."""
        c = out.outputs[0]
        toks = list(c.token_ids)
        finish = "stop" if c.finish_reason == "stop" else "length"
        comp = Completion(text=c.text.strip(), token_ids=toks, finish_reason=finish,
                          prompt_tokens=len(out.prompt_token_ids), tag=req.tag)
        if req.top_k_logprobs and c.logprobs is not None:
            ids, lps = [], []
            for pos in c.logprobs:
                # Each position holds the top-k plus the sampled token when it is not among
                # them; order by rank and keep k, as the HF engine records them.
                ranked = sorted(pos.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))
                top = ranked[: req.top_k_logprobs]
                ids.append([int(t) for t, _ in top])
                lps.append([float(lp.logprob) for _, lp in top])
            comp.topk_ids, comp.topk_logprobs = ids[: len(toks)], lps[: len(toks)]
        return comp
