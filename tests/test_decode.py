"""The transformers engine's decoding loop (genpi/engines/decode.py) against transformers'
own: greedy tokens equal ``model.generate``'s, the top-p nucleus equals HF's TopPLogitsWarper
(also where the nucleus is wider than the candidates), sampled tokens follow it, finished
rows leave the batch, and the recorded top-k is the log-softmax of the raw logits."""
from __future__ import annotations

import pytest
import torch

from genpi.engines.decode import decode, next_tokens, nucleus


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = max(map(len, rows))
    ids = torch.tensor([[pad] * (w - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (w - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 9, 17, 3, 44, 21, 8], [7, 7, 30], [100, 2, 66, 91, 12], [1, 2]]


def test_greedy_tokens_equal_model_generate(tiny_llama):
    model = tiny_llama(vocab_size=128, seed=1)
    ids, mask = _left_padded(PROMPTS, pad=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[:, ids.shape[1]:]
    # An end-of-turn id that the reference emits mid-way in some row (not all).
    eos = int(ref[0, 4])
    ref_eos = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    got = decode(model, ids, mask, max_new_tokens=12, eos_ids=[eos])
    stopped = 0
    for r, d in enumerate(got):
        if eos in ref_eos[r]:
            n = ref_eos[r].index(eos) + 1
            assert d.tokens == ref_eos[r][:n] and d.finish_reason == "stop"
            stopped += 1
        else:
            assert d.tokens == ref_eos[r] and d.finish_reason == "length" and len(d.tokens) == 12
    assert stopped >= 1


def test_finished_rows_leave_the_batch(tiny_llama):
    model = tiny_llama(vocab_size=128, seed=1)
    ids, mask = _left_padded(PROMPTS, pad=0)
    first = [d.tokens[0] for d in decode(model, ids, mask, max_new_tokens=1, eos_ids=[])]
    eos = first[0]  # row 0 (and any row starting alike) ends at its first token
    sizes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    try:
        got = decode(model, ids, mask, max_new_tokens=6, eos_ids=[eos])
    finally:
        hook.remove()
    ended = sum(1 for t in first if t == eos)
    assert got[0].tokens == [eos] and got[0].finish_reason == "stop"
    assert sizes[0] == len(PROMPTS) and sizes[1] == len(PROMPTS) - ended
    assert sizes == sorted(sizes, reverse=True)


def test_each_row_stops_at_its_own_limit(tiny_llama):
    """Requests with different max_new_tokens share a batch: each row ends at its own limit
    with the tokens a batch of that limit alone gives (greedy)."""
    model = tiny_llama(vocab_size=128, seed=1)
    ids, mask = _left_padded(PROMPTS, pad=0)
    limits = [3, 9, 1, 6]
    got = decode(model, ids, mask, max_new_tokens=limits, eos_ids=[])
    alone = decode(model, ids, mask, max_new_tokens=9, eos_ids=[])
    for d, a, n in zip(got, alone, limits):
        assert d.tokens == a.tokens[:n] and d.finish_reason == "length"
    with pytest.raises(ValueError, match="3 max_new_tokens for 4 rows"):
        decode(model, ids, mask, max_new_tokens=limits[:3], eos_ids=[])


def _hf_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    return torch.softmax(TopPLogitsWarper(top_p)(None, scores.clone()), -1)


def _dense(scores: torch.Tensor, top_p: float, candidates: int) -> torch.Tensor:
    out = torch.zeros_like(scores)
    for rows, ids, probs in nucleus(scores, top_p, candidates):
        out[rows.unsqueeze(1), ids] = probs
    return out


@pytest.mark.parametrize("candidates", [1024, 8], ids=["candidates-cover", "sorted-whole-rows"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_equals_transformers_top_p(candidates, top_p):
    g = torch.Generator().manual_seed(0)
    # Peaked and flat rows: with 8 candidates the flat ones need the whole-row path.
    scores = torch.cat([torch.randn(6, 300, generator=g) * 4, torch.randn(6, 300, generator=g) * 0.3])
    got, ref = _dense(scores, top_p, candidates), _hf_nucleus(scores, top_p)
    assert torch.equal(got > 0, ref > 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_sampled_tokens_follow_the_nucleus():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 50, generator=g) * 2).repeat(20000, 1)
    torch.manual_seed(0)
    tok = next_tokens(logits, temperature=0.8, top_p=0.9)
    expected = _hf_nucleus(logits[:1] / 0.8, 0.9)[0]
    freq = torch.bincount(tok, minlength=50).float() / len(tok)
    assert bool((freq[expected == 0] == 0).all())  # never outside the nucleus
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.012)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_topk_is_the_log_softmax_of_raw_logits(tiny_llama, temperature):
    """Batched, padded, cached and sampled at a temperature: the recorded top-k at each step
    is the top-k of the raw (temperature 1) log-softmax, as one unpadded forward gives it."""
    model = tiny_llama(vocab_size=128, seed=2)
    ids, mask = _left_padded(PROMPTS, pad=0)
    torch.manual_seed(3)
    got = decode(model, ids, mask, max_new_tokens=8, eos_ids=[], temperature=temperature, top_p=0.9,
                 top_k_logprobs=5)
    for prompt, d in zip(PROMPTS, got):
        assert len(d.tokens) == len(d.topk_ids) == len(d.topk_logprobs) == 8
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + d.tokens])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1).topk(5)
        torch.testing.assert_close(torch.tensor(d.topk_logprobs), ref.values, rtol=0, atol=1e-4)
        assert torch.equal(torch.tensor(d.topk_ids), ref.indices)
        if temperature == 0.0:
            assert d.tokens == ref.indices[:, 0].tolist()
