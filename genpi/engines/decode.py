"""The transformers engine's decoding loop: a KV-cached loop that drops finished rows.

Why not ``model.generate``: on 2 CPU cores it spent a third of its time sorting the whole
vocabulary for top-p and drawing one exponential per vocabulary entry for the sample
(``aten::sort`` + ``aten::exponential_``, profiled on the synthesis passes), kept decoding
rows that had already ended (a reply batch ends with the longest reply: on the French
prompt the replies averaged 28 of 64 tokens), kept every step's full-vocabulary logits
until the end, and ran the output layer over every prompt position. Here:

- top-p is HF's rule (keep a token while the probability mass strictly above it is below
  ``top_p``) computed on the top ``CANDIDATES`` tokens, whose mass almost always covers
  the nucleus; a row whose nucleus is wider is sorted whole, so the kept set is exact;
- a row leaves the batch (and the cache) at its end-of-turn token;
- the top-k log-probabilities of the raw logits (temperature 1: the teacher distribution
  the KL term wants) are taken at each step;
- the prefill computes the logits of the last position only.

Greedy decoding gives the tokens ``model.generate`` gives (tests/test_decode.py); sampling
draws from the same distribution, with another random stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Tokens considered for top-p before falling back to a full sort: topk(1024) over SmolLM2's
# 49152 logits for 32 rows took 15 ms here, a full sort 102 ms.
CANDIDATES = 1024


@dataclass
class Decoded:
    tokens: list[int] = field(default_factory=list)  # ends with the end-of-turn id when stopped
    finish_reason: str = "length"
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


def nucleus(scores: torch.Tensor, top_p: float,
            candidates: int = CANDIDATES) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each row's top-p nucleus of temperature-scaled logits [B, V], as groups of
    (rows [b], token ids [b, n], renormalized probabilities [b, n]; 0 outside the nucleus)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    n = min(candidates, scores.shape[-1])
    vals, ids = scores.topk(n, dim=-1)  # descending
    probs = (vals - lse).exp()
    # The token after the candidates is in the nucleus when the candidates' mass is below
    # top_p: only those rows (rare) are sorted whole.
    wide = probs.sum(-1) < top_p
    if n == scores.shape[-1]:  # the candidates are the whole vocabulary
        wide = torch.zeros_like(wide)
    groups = []
    for sel, full in ((~wide, False), (wide, True)):
        rows = sel.nonzero().flatten()
        if len(rows) == 0:
            continue
        if full:
            v, i = scores[rows].sort(dim=-1, descending=True)
            p = (v - lse[rows]).exp()
        else:
            i, p = ids[rows], probs[rows]
        above = p.cumsum(-1) - p  # the mass strictly more probable than each token
        kept = torch.where(above < top_p, p, 0.0)
        groups.append((rows, i, kept / kept.sum(-1, keepdim=True)))
    return groups


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from fp32 logits [B, V]: argmax when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
    tok = torch.empty(len(scores), dtype=torch.long, device=scores.device)
    for rows, ids, probs in nucleus(scores, top_p):
        tok[rows] = ids.gather(1, torch.multinomial(probs, 1)).squeeze(1)
    return tok


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int | list[int],
           eos_ids: list[int], temperature: float = 0.0, top_p: float = 1.0, top_k_logprobs: int = 0) -> list[Decoded]:
    """Continue each left-padded row of ``input_ids`` [B, W] until an id of ``eos_ids`` or
    ``max_new_tokens`` (one limit for all rows, or one per row: requests with different
    limits share a batch); one :class:`Decoded` per row. Sampling uses torch's global generator."""
    from transformers import DynamicCache

    out = [Decoded() for _ in range(len(input_ids))]
    limits = [max_new_tokens] * len(input_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(input_ids):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(input_ids)} rows")
    if len(input_ids) == 0 or max(limits) <= 0:
        return out
    mask = attention_mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    pos = pos[:, -1:]
    rows = list(range(len(input_ids)))  # the original row of each row still decoding
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    for step in range(max(limits)):
        tok = next_tokens(logits, temperature, top_p)
        # One device-to-host copy per step: on a GPU each copy waits for the queued work. With
        # four of them (top-k values, ids, tokens, stops) this loop ran at 0.74-0.87x
        # model.generate for synthesis on an H200 (2026-12-04); this version is not yet
        # measured there. fp64 holds every token id and every fp32 log-prob exactly.
        parts = [tok[:, None].double(), torch.isin(tok, eos)[:, None].double()]
        if top_k_logprobs:
            v, i = torch.log_softmax(logits, -1).topk(top_k_logprobs, dim=-1)
            parts += [v.double(), i.double()]
        host = torch.cat(parts, 1).cpu()
        if top_k_logprobs:
            for r, vr, ir in zip(rows, host[:, 2:2 + top_k_logprobs].tolist(),
                                 host[:, 2 + top_k_logprobs:].long().tolist()):
                out[r].topk_logprobs.append(vr)
                out[r].topk_ids.append(ir)
        ended = []
        for r, t, e in zip(rows, host[:, 0].long().tolist(), host[:, 1].bool().tolist()):
            out[r].tokens.append(t)
            if e:
                out[r].finish_reason = "stop"
            ended.append(e or len(out[r].tokens) >= limits[r])
        if any(ended):
            kept = [j for j, e in enumerate(ended) if not e]
            if not kept:
                break
            keep = torch.tensor(kept, dtype=torch.long, device=tok.device)
            cache.batch_select_indices(keep)
            rows = [rows[j] for j in kept]
            tok, mask, pos = tok[keep], mask[keep], pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], 1)
        pos = pos + 1
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    return out
