"""Boundary tests of the vLLM engine (vLLM cannot run on this CPU machine).

The `vllm` module is replaced by a recording stand-in at the narrowest boundary (the four
names the engine imports), so these tests check exactly our side: the token ids, sampling
parameters and LoRA requests we hand to vLLM, and how vLLM's outputs become Completions.
The real thing runs on a GPU machine (see README, "What has run on a GPU")."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from genpi.engines.base import ChatRequest
from genpi.engines.hf import HFEngine


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]


@dataclass
class FakeLLM:
    kwargs: dict
    calls: list = field(default_factory=list)
    script: list = field(default_factory=list)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, params, lora_request))
        return [self.script.pop(0)(p) for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    made = {}

    def llm(**kwargs):
        made["llm"] = FakeLLM(kwargs)
        return made["llm"]

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LoRARequest:
        def __init__(self, name, lora_int_id, lora_path):
            self.args = (name, lora_int_id, lora_path)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = llm, SamplingParams
    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_request)
    return made


def test_engine_options_boundary(fake_vllm, smollm_tokenizer):
    from genpi.engines.vllm import VLLMEngine

    VLLMEngine("/models/x", smollm_tokenizer, top_k_logprobs=100, enable_lora=True, max_lora_rank=32, max_loras=4)
    kw = fake_vllm["llm"].kwargs
    assert kw["model"] == "/models/x" and kw["enable_prefix_caching"] is True
    assert kw["max_logprobs"] >= 100, "vLLM refuses more logprobs than max_logprobs"
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras"]) == (True, 32, 4)


def test_requests_translate_to_the_same_tokens_as_the_hf_engine_boundary(fake_vllm, smollm_tokenizer, tiny_llama):
    from genpi.engines.vllm import VLLMEngine

    eng = VLLMEngine("/m", smollm_tokenizer, top_k_logprobs=5, enable_lora=True)  # it adds an adapter below
    hf = HFEngine(tiny_llama(vocab_size=len(smollm_tokenizer)), smollm_tokenizer)
    msgs = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"}]
    for prefix in (None, "1. How do I"):
        prompt, params, lora = eng.translate(ChatRequest(msgs, max_new_tokens=7, temperature=0.8, top_p=0.9,
                                                         top_k_logprobs=5, seed=3, assistant_prefix=prefix))
        # Same chat template, same continuation of a pre-filled reply: same tokens as HF.
        assert prompt["prompt_token_ids"] == hf.render(msgs, prefix)
        assert params == {"max_tokens": 7, "temperature": 0.8, "top_p": 0.9, "seed": 3,
                          "stop_token_ids": [smollm_tokenizer.eos_token_id], "skip_special_tokens": True,
                          "logprobs": 5}
        assert lora is None
    _, greedy, _ = eng.translate(ChatRequest(msgs, temperature=0.0, top_p=0.5))
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and "logprobs" not in greedy
    with pytest.raises(ValueError, match="unknown adapter 'pirate'"):
        eng.translate(ChatRequest(msgs, adapter="pirate"))
    eng.add_adapter("pirate", "/store/prompts/pirate/fp/adapter")
    _, _, lora = eng.translate(ChatRequest(msgs, adapter="pirate"))
    assert lora == ("pirate", 1, "/store/prompts/pirate/fp/adapter")


def test_outputs_become_completions_with_ranked_topk_boundary(fake_vllm, smollm_tokenizer):
    from genpi.engines.vllm import VLLMEngine

    eng = VLLMEngine("/m", smollm_tokenizer, top_k_logprobs=2, enable_lora=True)  # it adds an adapter below
    eos = smollm_tokenizer.eos_token_id
    # Position 2 sampled token 9 outside the top-2: vLLM adds it (rank 7); we keep the top-2 by rank.
    logprobs = [
        {5: Logprob(-0.1, 1), 6: Logprob(-2.5, 2)},
        {9: Logprob(-4.0, 7), 7: Logprob(-0.3, 1), 8: Logprob(-1.9, 2)},
        {eos: Logprob(-0.01, 1), 4: Logprob(-5.0, 2)},
    ]
    eng.llm.script = [
        lambda p: FakeRequestOutput(p["prompt_token_ids"], [FakeCompletionOutput(" Arr! ", [5, 9, eos], "stop", logprobs)]),
        lambda p: FakeRequestOutput(p["prompt_token_ids"], [FakeCompletionOutput("cut", [5, 7], "length", None)]),
    ]
    eng.add_adapter("pirate", "/a")
    reqs = [ChatRequest([{"role": "user", "content": "Hi"}], top_k_logprobs=2, tag={"i": 0}, adapter="pirate"),
            ChatRequest([{"role": "user", "content": "Yo"}], tag={"i": 1})]
    a, b = eng.generate(reqs)
    _, params, loras = eng.llm.calls[0]
    assert [lr.args if lr else None for lr in loras] == [("pirate", 1, "/a"), None]
    assert params[0].kw["logprobs"] == 2 and "logprobs" not in params[1].kw
    assert (a.text, a.token_ids, a.finish_reason, a.tag) == ("Arr!", [5, 9, eos], "stop", {"i": 0})
    assert a.topk_ids == [[5, 6], [7, 8], [eos, 4]]
    assert a.topk_logprobs == [[-0.1, -2.5], [-0.3, -1.9], [-0.01, -5.0]]
    assert a.prompt_tokens == len(eng.render(reqs[0].messages))
    assert (b.finish_reason, b.topk_ids, b.tag) == ("length", None, {"i": 1})


# ---- engine settings from the config (issue 14, defect 8) --------------------------------
# These build the engine through `from_config` / `make_engine` on the tiny model folder (a real
# HF config and tokenizer on disk), with `vllm` faked as above: they check every keyword we
# hand to vLLM's `LLM(...)`, which vLLM 0.29 reads as EngineArgs.


def _vllm_cfg(tiny_overrides, *extra):
    from genpi.config import load_config

    return load_config(None, [*tiny_overrides, "engine.kind=vllm", *extra])


def test_from_config_passes_revision_context_dtype_and_no_lora_for_synthesis_mock_vllm(
        fake_vllm, tiny_overrides, tiny_model_dir):
    from genpi.engines import make_engine

    cfg = _vllm_cfg(tiny_overrides, "model.revision=v1.2", "model.dtype=bfloat16", "model.max_context=1024",
                    "engine.top_k_logprobs=50", "synth.seed=7")
    eng = make_engine(cfg)  # synthesis: base model only
    assert fake_vllm["llm"].kwargs == {
        "model": str(tiny_model_dir.resolve()),
        # The weights and the tokenizer vLLM loads are the pinned revision of a hub model.
        "revision": "v1.2", "tokenizer_revision": "v1.2",
        "max_model_len": 1024,  # model.max_context
        "dtype": "bfloat16",
        "max_logprobs": 50, "logprobs_mode": "raw_logprobs",
        "enable_prefix_caching": True, "gpu_memory_utilization": 0.85, "seed": 7,
        "enable_lora": False,  # synthesis never loads an adapter
    }
    assert eng.batch_size == cfg.engine.batch_size


def test_from_config_context_is_the_models_own_limit_without_max_context_mock_vllm(
        fake_vllm, tiny_overrides):
    from genpi.engines.vllm import VLLMEngine

    # The tiny model's max_position_embeddings is 2048: the same limit planning checks against.
    VLLMEngine.from_config(_vllm_cfg(tiny_overrides))
    assert fake_vllm["llm"].kwargs["max_model_len"] == 2048
    # max_context above the model's own limit: still the model's limit.
    VLLMEngine.from_config(_vllm_cfg(tiny_overrides, "model.max_context=100000"))
    assert fake_vllm["llm"].kwargs["max_model_len"] == 2048


def test_from_config_enables_lora_for_an_adapter_engine_mock_vllm(fake_vllm, tiny_overrides):
    from genpi.engines import make_engine

    cfg = _vllm_cfg(tiny_overrides, "serve.max_lora_rank=32", "serve.max_adapters_per_replica=3",
                    "train.lora_r=32", "engine.top_k_logprobs=100")
    eng = make_engine(cfg, adapters=True)
    kw = fake_vllm["llm"].kwargs
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras"]) == (True, 32, 3)
    assert kw["max_logprobs"] == 100
    eng.add_adapter("pirate", "/store/prompts/pirate/fp/adapter")  # accepted: LoRA is on


def test_lora_rank_above_max_lora_rank_is_refused_mock_vllm(fake_vllm, tiny_overrides, tmp_path, smollm_tokenizer):
    from genpi.config import ConfigError
    from genpi.engines.vllm import VLLMEngine

    cfg = _vllm_cfg(tiny_overrides, "train.lora_r=128", "serve.max_lora_rank=64")
    with pytest.raises(ConfigError, match=r"train\.lora_r \(128\).*serve\.max_lora_rank \(64\)"):
        VLLMEngine.from_config(cfg, adapters=True)
    assert "llm" not in fake_vllm, "refused before vLLM was started"
    VLLMEngine.from_config(cfg)  # synthesis loads no adapter: nothing to refuse
    # An adapter on disk whose rank exceeds the engine's limit (a manifest entry may override
    # train.lora_r) is refused when it is added, not when vLLM fails mid-batch.
    eng = VLLMEngine("/m", smollm_tokenizer, enable_lora=True, max_lora_rank=64)
    (tmp_path / "adapter_config.json").write_text('{"r": 128, "peft_type": "LORA"}')
    with pytest.raises(ValueError, match=r"rank 128 .*serve\.max_lora_rank \(64\)"):
        eng.add_adapter("big", str(tmp_path))
    assert "big" not in eng.adapters


def test_adapters_need_an_engine_built_with_lora_mock_vllm(fake_vllm, smollm_tokenizer):
    from genpi.engines.vllm import VLLMEngine

    eng = VLLMEngine("/m", smollm_tokenizer)
    with pytest.raises(ValueError, match="without LoRA"):
        eng.add_adapter("pirate", "/a")


def test_engine_refuses_a_lora_rank_vllm_does_not_allow_mock_vllm(fake_vllm, smollm_tokenizer):
    from genpi.engines.vllm import VLLMEngine

    with pytest.raises(ValueError, match=r"max_lora_rank must be one of vLLM's allowed ranks .* not 48"):
        VLLMEngine("/m", smollm_tokenizer, enable_lora=True, max_lora_rank=48)
    assert "llm" not in fake_vllm
