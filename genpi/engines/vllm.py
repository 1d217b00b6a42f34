"""vLLM engine (GPU only): the same ChatRequest -> Completion interface as the HF engine.

The chat template is applied here with the model's own tokenizer (exactly as HFEngine
does), and vLLM receives token ids: both engines see the same tokens, including the
`assistant_prefix` continuation. Prefix caching is on, so the prompt shared by every
request of a prompt (the system message) is computed once. Top-k log-probabilities are
vLLM's raw log-probabilities (before temperature), like the HF engine's, and a LoRA
adapter is chosen per request by name.

`vllm` is imported inside the engine: genpi works without it, and the translation between
our requests and vLLM's objects is tested without a GPU (tests/test_vllm_boundary.py).
"""
from __future__ import annotations

from typing import Any, Callable

from genpi.engines.base import ChatRequest, Completion, render_chat


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, *, top_k_logprobs: int = 100, batch_size: int = 256,
                 enable_lora: bool = False, max_lora_rank: int = 64, max_loras: int = 8,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.85, seed: int = 0,
                 llm_kwargs: dict[str, Any] | None = None):
        from vllm import LLM

        self.tok = tokenizer
        self.batch_size = batch_size  # rows per call the synthesis stages hand over
        self.eos_ids = sorted({tokenizer.eos_token_id} - {None})
        self.adapters: dict[str, tuple[int, str]] = {}  # name -> (vLLM's int id, path)
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
        )
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
        kwargs.update(llm_kwargs or {})
        self.llm = LLM(**kwargs)

    @classmethod
    def from_config(cls, cfg) -> "VLLMEngine":
        from genpi.models import load_tokenizer, resolve_model

        return cls(resolve_model(cfg.model).path, load_tokenizer(cfg.model),
                   top_k_logprobs=cfg.engine.top_k_logprobs, batch_size=cfg.engine.batch_size,
                   dtype="auto" if cfg.model.dtype == "auto" else cfg.model.dtype,
                   max_lora_rank=cfg.serve.max_lora_rank, max_loras=cfg.serve.max_adapters_per_replica,
                   seed=cfg.synth.seed)

    def add_adapter(self, name: str, path: str) -> None:
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
