"""Evaluate one adapter on its prompt's held-out inputs (the EvalResult that becomes eval.json).

Three systems answer every held-out input greedily: the teacher (base model, adapter
disabled, prompt in the system slot), the base (no prompt) and the adapter (no prompt).
KL is measured on the teacher's own replies over the full vocabulary, so the teacher's
score is 0 by construction and the KL ratio is 1 - KL(T||A) / KL(T||B).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from genpi.chat import student_messages, teacher_messages
from genpi.config import GenpiConfig
from genpi.engines.base import ChatRequest
from genpi.engines.hf import HFEngine
from genpi.checks import check_name, run_check
from genpi.eval.efficiency import compare
from genpi.eval.metrics import agreement, internalization_ratio, leak_score, mean
from genpi.eval.result import EvalResult, Efficiency, KLMetric, Leak, LeakSample, Metric, Metrics, Sample
from genpi.manifest import PromptEntry
from genpi.train.data import collate, encode_chat

SYSTEMS = ("teacher", "base", "adapter")


def _reply_logprobs(model, tok, convs: list[list[dict]], batch_size: int) -> list[torch.Tensor]:
    """Log-softmax rows [n_reply_tokens, V] at the labelled (reply) positions of each conversation."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[torch.Tensor] = []
    for i in range(0, len(convs), batch_size):
        exs = [encode_chat(tok, c, max_length=1 << 20) for c in convs[i : i + batch_size]]
        batch = collate(exs, pad)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"]
        for b in range(len(exs)):
            pos = (labels[b, 1:] != -100).nonzero().squeeze(-1)  # logits at t predict token t+1
            out.append(torch.log_softmax(logits[b, pos].float(), dim=-1).cpu())
    return out


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher.exp() * (teacher - student)).sum(-1)


def _scored(s: dict[str, float | None]) -> Metric:
    """{teacher, base, adapter} scores with their internalization ratio."""
    return Metric(**s, ratio=internalization_ratio(s["adapter"], s["base"], s["teacher"]))


def evaluate(peft_model, tok, entry: PromptEntry, heldout: list[str], adapter_name: str,
             cfg: GenpiConfig) -> EvalResult:
    """`peft_model` is the base with the adapter loaded under `adapter_name`."""
    return evaluate_many(peft_model, tok, entry, heldout, [adapter_name], cfg)[adapter_name]


def evaluate_many(peft_model, tok, entry: PromptEntry, heldout: list[str], adapter_names: list[str],
                  cfg: GenpiConfig) -> dict[str, EvalResult]:
    """Evaluate several adapters of one prompt (e.g. trained with different losses) against
    one set of teacher and base replies: {adapter name: its eval.json record}.

    The teacher and base replies, their log-probabilities and the prompted latency do not
    depend on the adapter, so they are computed once; each adapter's result is what
    `evaluate` would give it alone."""
    if not adapter_names or len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"evaluate_many needs distinct adapter names, got {adapter_names!r}")
    ec = cfg.eval
    engine = HFEngine(peft_model, tok, cfg.engine.batch_size)
    reqs = []
    for i, x in enumerate(heldout):
        reqs.append(ChatRequest(teacher_messages(entry.prompt, x), ec.max_new_tokens, tag=("teacher", i)))
        reqs.append(ChatRequest(student_messages(x), ec.max_new_tokens, tag=("base", i)))
        for a in adapter_names:
            reqs.append(ChatRequest(student_messages(x), ec.max_new_tokens, adapter=a, tag=(("adapter", a), i)))
    for j, probe in enumerate(ec.leak_probes):
        n_leak = ec.leak_max_new_tokens
        reqs.append(ChatRequest(teacher_messages(entry.prompt, probe), n_leak, tag=("leak_teacher", j)))
        reqs.append(ChatRequest(student_messages(probe), n_leak, tag=("leak_base", j)))
        for a in adapter_names:
            reqs.append(ChatRequest(student_messages(probe), n_leak, adapter=a, tag=(("leak_adapter", a), j)))
    with tqdm(total=len(reqs), desc=f"{entry.id}: eval replies", unit="req", leave=False) as bar:
        outs = engine.generate(reqs, progress=bar.update)
    replies: dict = {}
    for c in outs:
        replies.setdefault(c.tag[0], {})[c.tag[1]] = c
    n = len(heldout)

    # KL on the teacher's own replies (those that produced at least one token).
    keep = [i for i in range(n) if replies["teacher"][i].text.strip()]
    def conv(msgs, i):
        t = replies["teacher"][i]
        return [*msgs, {"role": "assistant", "content": t.text, "token_ids": t.token_ids}]
    t_conv = [conv(teacher_messages(entry.prompt, heldout[i]), i) for i in keep]
    s_conv = [conv(student_messages(heldout[i]), i) for i in keep]
    bs = max(1, cfg.engine.batch_size // 2)
    if keep:
        with peft_model.disable_adapter():
            lp_t = _reply_logprobs(peft_model, tok, t_conv, bs)
            lp_b = _reply_logprobs(peft_model, tok, s_conv, bs)
        kl_b = torch.cat([_kl_rows(t, b) for t, b in zip(lp_t, lp_b)])

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
        text = {"teacher": [replies["teacher"][i].text for i in range(n)],
                "base": [replies["base"][i].text for i in range(n)],
                "adapter": [replies[("adapter", a)][i].text for i in range(n)]}
        if keep:
            peft_model.set_adapter(a)
            lp_a = _reply_logprobs(peft_model, tok, s_conv, bs)
            kl_a = torch.cat([_kl_rows(t, x) for t, x in zip(lp_t, lp_a)])
            base_kl, adapter_kl = float(kl_b.mean()), float(kl_a.mean())
            kl = KLMetric(teacher=0.0, base=base_kl, adapter=adapter_kl, tokens=int(kl_b.numel()),
                          ratio=internalization_ratio(adapter_kl, base_kl, 0.0))
        else:
            # The teacher said nothing on any held-out input: there is no distribution to match.
            kl = KLMetric(teacher=0.0, tokens=0)
        agree = _scored({s: mean([agreement(text[s][i], text["teacher"][i]) for i in range(n)]) for s in SYSTEMS})
        checks = {check_name(c): _scored({s: mean([float(run_check(c, t)) for t in text[s]]) for s in SYSTEMS})
                  for c in entry.checks}
        leak_key = {"teacher": "leak_teacher", "base": "leak_base", "adapter": ("leak_adapter", a)}
        leak = Leak(**{
            s: max(leak_score(replies[leak_key[s]][j].text, entry.prompt) for j in range(len(ec.leak_probes)))
            for s in SYSTEMS
        }) if ec.leak_probes else None
        results[a] = EvalResult(
            prompt_id=entry.id,
            n_heldout=n,
            metrics=Metrics(kl=kl, agreement=agree),
            checks=checks,
            efficiency=efficiency.model_copy(deep=True),  # a record of its own per adapter
            leak=leak,
            samples=[Sample(input=heldout[i], **{s: text[s][i] for s in SYSTEMS}) for i in range(min(5, n))],
            leak_samples=[LeakSample(probe=p, adapter=replies[("leak_adapter", a)][j].text)
                          for j, p in enumerate(ec.leak_probes)],
        )
    return results
