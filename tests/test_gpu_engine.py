"""GPU check of the transformers engine (``pytest -m gpu``; bench/gpu_check.sh runs it): the
top-k log-probabilities it records while generating in bf16 on CUDA are the top-k of the
log-softmax of the raw logits at each generated position (temperature 1, whatever the
sampling temperature), the teacher distribution the KL term is trained on.

Needs torch and transformers only: a random-weight Llama and a byte-level chat tokenizer
(bench/common.py) (no hub, no GGUF). Skips with the reason where there is no CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import tiny_tokenizer  # noqa: E402  (the byte-level chat tokenizer the benches use)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    from genpi.engines.hf import HFEngine

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    # initializer_range 0.2: logits spread enough that the top-k is well separated in bf16.
    conf = LlamaConfig(vocab_size=len(tok) + 5, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                       initializer_range=0.2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda"):
        model = LlamaForCausalLM(conf).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return HFEngine(model, tok, batch_size=4)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_engine_topk_is_the_log_softmax_of_raw_logits(engine, temperature):
    from genpi.engines.base import ChatRequest

    k = 5
    questions = ["How do I boil an egg?", "Name three rivers.", "Why is the sky blue today?", "Hi"]
    reqs = [ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                        max_new_tokens=12, temperature=temperature, top_k_logprobs=k, seed=3) for q in questions]
    outs = engine.generate(reqs)
    checked = 0
    for req, out in zip(reqs, outs):
        assert out.topk_ids is not None and len(out.topk_ids) == len(out.token_ids) > 0
        # Re-score prompt + generated tokens in one forward (no padding, no cache): the raw
        # logits at the position before each generated token.
        prompt = engine.render(req.messages)
        ids = torch.tensor([prompt + out.token_ids], device="cuda")
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        ref = torch.log_softmax(logits, dim=-1)
        for step, (got_ids, got_lps) in enumerate(zip(out.topk_ids, out.topk_logprobs)):
            got_ids_t = torch.tensor(got_ids, device="cuda")
            got_lps_t = torch.tensor(got_lps, device="cuda")
            assert len(got_ids) == k and bool((got_lps_t[:-1] >= got_lps_t[1:]).all())
            # Values: the log-softmax of the raw logits at those ids (bf16 forward of a
            # batched, padded, cached generation vs one unpadded forward: bf16 tolerance).
            torch.testing.assert_close(got_lps_t, ref[step, got_ids_t], rtol=0, atol=0.15)
            # The ids are the top k of that distribution (up to near-ties at the k-th place).
            kth = ref[step].topk(k).values[-1]
            assert bool((ref[step, got_ids_t] >= kth - 0.15).all())
            assert abs(float(got_lps_t.exp().sum()) - float(ref[step].topk(k).values.exp().sum())) < 0.05
            if temperature == 0.0:  # greedy: the generated token is the top-1 (ties aside)
                assert float(ref[step, out.token_ids[step]]) >= float(ref[step].max()) - 0.15
            checked += 1
    assert checked >= 8
