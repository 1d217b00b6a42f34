"""Evaluate one adapter on its prompt's held-out inputs (the EvalResult that becomes eval.json).

Three systems answer every held-out input greedily: the teacher (base model, adapter
disabled, prompt in the system slot), the base (no prompt) and the adapter (no prompt).
KL is measured on the teacher's own replies over the full vocabulary, so the teacher's
score is 0 by construction and the KL ratio is 1 - KL(T||A) / KL(T||B).

The same scores are computed on a second set the input generator did not write: everyday
user messages written by people (genpi/data/human_inputs.jsonl), because a small generator
writes narrow inputs and an adapter graded only on them looks better than it is. Every reply
of both sets is also checked for degeneration (a repeated n-gram filling it). And the
perplexity of plain English prose with the adapter vs the base (no prompt either way) shows
what the adapter costs where its prompt does not apply.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from genpi.chat import student_messages, teacher_messages
from genpi.config import GenpiConfig
from genpi.data import human_inputs, plain_text
from genpi.engines.base import ChatRequest
from genpi.engines.hf import HFEngine
from genpi.checks import check_name, run_check
from genpi.eval.efficiency import compare
from genpi.eval.metrics import (PERPLEXITY_FLAG_RATIO, agreement, internalization_ratio, is_degenerate,
                                leak_score, mean)
from genpi.eval.result import (EvalResult, Efficiency, InputSetEval, KLMetric, Leak, LeakSample, Metric, Metrics,
                               PlainTextPerplexity, Sample)
from genpi.manifest import PromptEntry
from genpi.train.data import collate, encode_chat

SYSTEMS = ("teacher", "base", "adapter")
# How many human-written inputs an evaluation scores when no config says (eval.human_max_inputs:
# 0 = none, None = all). The cap keeps the French example's evaluation within ~2 minutes of what
# it was on 2 CPU cores (measured: each input costs three greedy replies of eval.max_new_tokens,
# about 6 s per input for SmolLM2-135M there); the inputs are taken evenly spaced through the
# file, which lists the English ones first, so a capped set keeps every language group.
HUMAN_MAX_INPUTS: int | None = 20  # the default of eval.human_max_inputs
# Plain text is scored in windows of this many tokens (enough context for a perplexity that
# means something, small enough for one CPU forward), at most eval.plain_text_max_tokens in all.
PLAIN_TEXT_WINDOW = 512
PLAIN_TEXT_MAX_TOKENS = 2048  # the default of eval.plain_text_max_tokens
N_SAMPLES = 5
# Conversations per KL forward: each holds its reply tokens' full-vocabulary rows (16 x ~64
# tokens x 49k x 4 bytes = 200 MB on SmolLM2), whatever the engine's batch.
KL_BATCH = 16


def default_human_inputs(max_inputs: int | None = HUMAN_MAX_INPUTS) -> list[str]:
    """The human-written user messages the evaluation uses when none are given (None: all)."""
    if max_inputs == 0:
        return []
    texts = [r["text"] for r in human_inputs()]
    if max_inputs is None or max_inputs >= len(texts):
        return texts
    return [texts[i * len(texts) // max_inputs] for i in range(max_inputs)]


def _reply_logprobs(model, tok, convs: list[list[dict]]) -> list[torch.Tensor]:
    """Log-softmax rows [n_reply_tokens, V] at the labelled (reply) positions of each conversation."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    exs = [encode_chat(tok, c, max_length=1 << 20) for c in convs]
    batch = collate(exs, pad)
    labels = batch["labels"]
    positions = [(labels[b, 1:] != -100).nonzero().squeeze(-1) for b in range(len(exs))]  # t predicts t+1
    # The output layer only from the first scored position on (`logits_to_keep` keeps the last
    # positions; rows are right-padded): the prompt's positions are never scored, and their
    # full-vocabulary logits were a large share of these forwards (49k columns per position on
    # SmolLM2). The scored rows are the same numbers either way.
    width = labels.shape[1]
    first = min((int(p[0]) for p in positions if len(p)), default=width - 1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       logits_to_keep=width - first).logits
    return [torch.log_softmax(logits[b, pos - first].float(), dim=-1).cpu() for b, pos in enumerate(positions)]


def _kl_sum(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> float:
    return sum(float((t.exp() * (t - s)).sum()) for t, s in zip(teacher, student))


def _kl(peft_model, tok, t_conv, s_conv, adapter_names, bs) -> tuple[int, float, dict[str, float]]:
    """(teacher reply tokens, mean KL(T||base), {adapter: mean KL(T||adapter)}) over the
    conversations; batch by batch, so that only one batch's full-vocabulary rows are held."""
    n_tok, base, adapters = 0, 0.0, {a: 0.0 for a in adapter_names}
    # Similar lengths in one batch (less padding); the sums do not depend on the order.
    order = sorted(range(len(t_conv)), key=lambda i: sum(len(m["content"]) for m in t_conv[i]))
    t_conv, s_conv = [t_conv[i] for i in order], [s_conv[i] for i in order]
    for i in range(0, len(t_conv), bs):
        with peft_model.disable_adapter():
            lp_t = _reply_logprobs(peft_model, tok, t_conv[i : i + bs])
            base += _kl_sum(lp_t, _reply_logprobs(peft_model, tok, s_conv[i : i + bs]))
        for a in adapter_names:
            peft_model.set_adapter(a)
            adapters[a] += _kl_sum(lp_t, _reply_logprobs(peft_model, tok, s_conv[i : i + bs]))
        n_tok += sum(len(t) for t in lp_t)
    return n_tok, base / n_tok, {a: v / n_tok for a, v in adapters.items()}


def _scored(s: dict[str, float | None]) -> Metric:
    """{teacher, base, adapter} scores with their internalization ratio."""
    return Metric(**s, ratio=internalization_ratio(s["adapter"], s["base"], s["teacher"]))


def _score_set(peft_model, tok, entry: PromptEntry, inputs: list[str], replies: dict, adapter_names: list[str],
               bs: int, samples: list[int]) -> dict[str, tuple[Metrics, dict[str, Metric], list[Sample]]]:
    """Scores of one input set for each adapter: (metrics, checks, samples at the given indices).
    `replies[system][i]` is the Completion of "teacher", "base" or ("adapter", name) on input i."""
    n = len(inputs)
    # KL on the teacher's own replies (those that produced at least one token).
    keep = [i for i in range(n) if replies["teacher"][i].text.strip()]

    def conv(msgs, i):
        t = replies["teacher"][i]
        return [*msgs, {"role": "assistant", "content": t.text, "token_ids": t.token_ids}]
    if keep:
        t_conv = [conv(teacher_messages(entry.prompt, inputs[i]), i) for i in keep]
        s_conv = [conv(student_messages(inputs[i]), i) for i in keep]
        n_tok, base_kl, adapter_kl = _kl(peft_model, tok, t_conv, s_conv, adapter_names, bs)
    out = {}
    for a in adapter_names:
        text = {"teacher": [c.text for c in replies["teacher"]], "base": [c.text for c in replies["base"]],
                "adapter": [c.text for c in replies[("adapter", a)]]}
        if keep:
            kl = KLMetric(teacher=0.0, base=base_kl, adapter=adapter_kl[a], tokens=n_tok,
                          ratio=internalization_ratio(adapter_kl[a], base_kl, 0.0))
        else:
            # The teacher said nothing on any input: there is no distribution to match.
            kl = KLMetric(teacher=0.0, tokens=0)
        agree = _scored({s: mean([agreement(text[s][i], text["teacher"][i]) for i in range(n)]) for s in SYSTEMS})
        degenerate = Metric(**{s: mean([float(is_degenerate(t)) for t in text[s]]) for s in SYSTEMS})
        checks = {check_name(c): _scored({s: mean([float(run_check(c, t)) for t in text[s]]) for s in SYSTEMS})
                  for c in entry.checks}
        out[a] = (Metrics(kl=kl, agreement=agree, degenerate=degenerate), checks,
                  [Sample(input=inputs[i], **{s: text[s][i] for s in SYSTEMS}) for i in samples])
    return out


def _plain_text_nll(model, tok, windows: list[list[int]]) -> float:
    """Mean next-token negative log-likelihood over the windows (each scored on its own)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(w) - 1
    return total / count


def plain_text_perplexity(peft_model, tok, adapter_names: list[str],
                          max_tokens: int = PLAIN_TEXT_MAX_TOKENS) -> dict[str, PlainTextPerplexity]:
    """Perplexity of the shipped plain text with each adapter vs the base, no prompt either way."""
    ids = tok(plain_text(), add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [w for i in range(0, len(ids), PLAIN_TEXT_WINDOW) if len(w := ids[i : i + PLAIN_TEXT_WINDOW]) > 1]
    with peft_model.disable_adapter():
        base = math.exp(_plain_text_nll(peft_model, tok, windows))
    out = {}
    for a in adapter_names:
        peft_model.set_adapter(a)
        ppl = math.exp(_plain_text_nll(peft_model, tok, windows))
        out[a] = PlainTextPerplexity(base=base, adapter=ppl, ratio=ppl / base, tokens=sum(len(w) - 1 for w in windows),
                                     flagged=ppl / base > PERPLEXITY_FLAG_RATIO)
    return out


def evaluate(peft_model, tok, entry: PromptEntry, heldout: list[str], adapter_name: str,
             cfg: GenpiConfig, human: list[str] | None = None) -> EvalResult:
    """`peft_model` is the base with the adapter loaded under `adapter_name`."""
    return evaluate_many(peft_model, tok, entry, heldout, [adapter_name], cfg, human)[adapter_name]


def evaluate_many(peft_model, tok, entry: PromptEntry, heldout: list[str], adapter_names: list[str],
                  cfg: GenpiConfig, human: list[str] | None = None) -> dict[str, EvalResult]:
    """Evaluate several adapters of one prompt (e.g. trained with different losses) against
    one set of teacher and base replies: {adapter name: its eval.json record}.

    `human`: the human-written inputs (None: the shipped set, default_human_inputs(); []: none,
    and the record's `human` is None). Their replies have the held-out split's token limit.

    The teacher and base replies, their log-probabilities and the prompted latency do not
    depend on the adapter, so they are computed once; each adapter's result is what
    `evaluate` would give it alone."""
    if not adapter_names or len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"evaluate_many needs distinct adapter names, got {adapter_names!r}")
    ec = cfg.eval
    human = default_human_inputs(ec.human_max_inputs) if human is None else list(human)
    engine = HFEngine.for_model(peft_model, tok, cfg)
    # Every reply of every set in one generate call: the engine batches requests of the same
    # adapter together, so the human set fills batches rather than adding half-empty ones.
    sets = {"heldout": heldout, "human": human}
    reqs = []
    for name, inputs in sets.items():
        for i, x in enumerate(inputs):
            reqs.append(ChatRequest(teacher_messages(entry.prompt, x), ec.max_new_tokens, tag=(name, "teacher", i)))
            reqs.append(ChatRequest(student_messages(x), ec.max_new_tokens, tag=(name, "base", i)))
            for a in adapter_names:
                reqs.append(ChatRequest(student_messages(x), ec.max_new_tokens, adapter=a, tag=(name, ("adapter", a), i)))
    for j, probe in enumerate(ec.leak_probes):
        n_leak = ec.leak_max_new_tokens
        reqs.append(ChatRequest(teacher_messages(entry.prompt, probe), n_leak, tag=("leak", "teacher", j)))
        reqs.append(ChatRequest(student_messages(probe), n_leak, tag=("leak", "base", j)))
        for a in adapter_names:
            reqs.append(ChatRequest(student_messages(probe), n_leak, adapter=a, tag=("leak", ("adapter", a), j)))
    with tqdm(total=len(reqs), desc=f"{entry.id}: eval replies", unit="req", leave=False) as bar:
        outs = engine.generate(reqs, progress=bar.update)
    replies: dict = {name: {} for name in (*sets, "leak")}
    for c in outs:
        replies[c.tag[0]].setdefault(c.tag[1], {})[c.tag[2]] = c
    replies = {name: {s: [by_i[i] for i in range(len(by_i))] for s, by_i in r.items()} for name, r in replies.items()}
    n = len(heldout)
    bs = KL_BATCH
    scores = _score_set(peft_model, tok, entry, heldout, replies["heldout"], adapter_names, bs,
                        list(range(min(N_SAMPLES, n))))
    human_scores = _score_set(peft_model, tok, entry, human, replies["human"], adapter_names, bs,
                              list(range(len(human)))[:: max(1, len(human) // N_SAMPLES)][:N_SAMPLES]) if human else {}
    ppl = plain_text_perplexity(peft_model, tok, adapter_names, ec.plain_text_max_tokens) \
        if ec.plain_text_max_tokens else {}
    # Efficiency: what the request no longer sends, and what that costs in time. Every
    # adapter has the same shape, so the first one stands for all in the latency figures.
    with_prompt = [engine.count_prompt_tokens(teacher_messages(entry.prompt, x)) for x in heldout]
    without = [engine.count_prompt_tokens(student_messages(x)) for x in heldout]
    n_params = sum(p.numel() for p in peft_model.get_base_model().parameters())
    saved = mean([a - b for a, b in zip(with_prompt, without)])
    peft_model.set_adapter(adapter_names[0])
    cmp = compare(peft_model, with_prompt_ids=engine.render(teacher_messages(entry.prompt, heldout[0])),
                  without_ids=engine.render(student_messages(heldout[0])), n_params=n_params, new_tokens=16,
                  repeats=ec.latency_repeats, pad_id=engine.pad_id, base_ctx=peft_model.disable_adapter())
    efficiency = Efficiency(
        input_tokens_with_prompt=mean(with_prompt),
        input_tokens_without_prompt=mean(without),
        input_tokens_saved_per_request=saved,
        input_tokens_saved_share=saved / mean(with_prompt),
        prefill_flops_saved_per_request=cmp["prefill_flops_with_prompt"] - cmp["prefill_flops_without_prompt"],
        latency_with_prompt=cmp["latency_with_prompt"],
        latency_adapter_without_prompt=cmp["latency_adapter_without_prompt"],
        prefill_speedup=1 / max(cmp["ratio_prefill_s"], 1e-9),
        generate_speedup=1 / max(cmp["ratio_generate_s"], 1e-9),
    )

    results = {}
    for a in adapter_names:
        metrics, checks, samples = scores[a]
        leak = Leak(**{
            s: max(leak_score(c.text, entry.prompt) for c in replies["leak"][key])
            for s, key in (("teacher", "teacher"), ("base", "base"), ("adapter", ("adapter", a)))
        }) if ec.leak_probes else None
        results[a] = EvalResult(
            prompt_id=entry.id,
            n_heldout=n,
            metrics=metrics,
            checks=checks,
            efficiency=efficiency.model_copy(deep=True),  # a record of its own per adapter
            leak=leak,
            samples=samples,
            leak_samples=[LeakSample(probe=p, adapter=replies["leak"][("adapter", a)][j].text)
                          for j, p in enumerate(ec.leak_probes)],
            human=InputSetEval(n_inputs=len(human), metrics=human_scores[a][0], checks=human_scores[a][1],
                               samples=human_scores[a][2]) if human else None,
            plain_text=ppl.get(a),
        )
    return results
