"""Human-readable evaluation summaries and run reports (Markdown + JSON)."""
from __future__ import annotations

import time
import uuid
from dataclasses import fields

from genpi.eval.fmt import fmt
from genpi.eval.metrics import PERPLEXITY_FLAG_RATIO
from genpi.eval.result import EvalResult


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cells(ev: EvalResult | None) -> dict[str, str]:
    """The headline figures of one prompt's evaluation as table cells ("n/a" where missing)."""
    checks = ev.check_ratios() if ev else {}
    human = ev.human if ev else None
    ppl = ev.plain_text if ev else None
    deg = [ev.metrics.degenerate if ev else None, human.metrics.degenerate if human else None]
    return {"kl": fmt(ev.metrics.kl.ratio if ev else None),
            "agreement": fmt(ev.metrics.agreement.ratio if ev else None),
            "checks": ", ".join(f"{name}={fmt(r)}" for name, r in checks.items()) or "-",
            "human_kl": fmt(human.metrics.kl.ratio if human else None),
            "human_checks": ", ".join(f"{name}={fmt(r)}" for name, r in human.check_ratios().items()) or "-"
            if human else "n/a",
            # The adapter's degenerate-reply rate on held-out / human-written inputs.
            "degenerate": " / ".join(fmt(d.adapter if d else None, pct=True) for d in deg),
            "ppl": "n/a" if ppl is None else fmt(ppl.ratio) + (" FLAGGED" if ppl.flagged else ""),
            "saved": fmt(ev.efficiency.input_tokens_saved_per_request if ev else None, 0),
            "leak": fmt(ev.leak.adapter if ev and ev.leak else None)}


def _score_table(metrics, checks) -> str:
    """teacher / base / adapter / ratio per score of one input set (Metrics and its checks)."""
    scores = {"kl": metrics.kl, "agreement": metrics.agreement,
              **{f"check {name}": m for name, m in checks.items()}}
    if metrics.degenerate is not None:
        scores["degenerate replies"] = metrics.degenerate
    rows = [[name, fmt(m.teacher, 3), fmt(m.base, 3), fmt(m.adapter, 3), fmt(m.ratio),
             "lower" if name in ("kl", "degenerate replies") else "higher"] for name, m in scores.items()]
    return _table(["metric", "teacher (prompt)", "base (no prompt)", "adapter (no prompt)", "internalization ratio",
                   "better"], rows)


def perplexity_flag(ev: EvalResult) -> str | None:
    """A sentence for a report when the adapter raises plain-text perplexity too much, else None."""
    p = ev.plain_text
    if p is None or not p.flagged:
        return None
    return (f"{ev.prompt_id}: the adapter raises the perplexity of plain English text by "
            f"{fmt(p.ratio - 1, pct=True)} (base {p.base:.2f}, adapter {p.adapter:.2f}; flagged above "
            f"{fmt(PERPLEXITY_FLAG_RATIO - 1, pct=True)})")


def _ms(lat) -> str:
    return "n/a" if lat is None else f"{1000 * lat.prefill_s:.0f} ms"


def _s(lat) -> str:
    return "n/a" if lat is None else f"{lat.generate_s:.2f} s"


def format_eval(ev: EvalResult) -> str:
    """The evaluation of one prompt as a Markdown section."""
    eff = ev.efficiency
    gflops = "n/a" if eff.prefill_flops_saved_per_request is None else f"{eff.prefill_flops_saved_per_request / 1e9:.1f}"
    lat_p, lat_a = eff.latency_with_prompt, eff.latency_adapter_without_prompt
    out = [
        f"### {ev.prompt_id} ({ev.n_heldout} held-out inputs)",
        "",
        _score_table(ev.metrics, ev.checks),
        "",
    ]
    if ev.human is not None:
        out += [f"Human-written inputs ({ev.human.n_inputs}, not written by the input generator):", "",
                _score_table(ev.human.metrics, ev.human.checks), ""]
    out += [
        f"- input tokens per request: {fmt(eff.input_tokens_with_prompt, 0)} with the prompt, "
        f"{fmt(eff.input_tokens_without_prompt, 0)} with the adapter "
        f"(saved {fmt(eff.input_tokens_saved_per_request, 0)}, {fmt(eff.input_tokens_saved_share, pct=True)}; "
        f"~{gflops} GFLOPs of prefill)",
        f"- latency (batch 1): prefill {_ms(lat_p)} with the prompt vs {_ms(lat_a)} with the adapter "
        f"({fmt(eff.prefill_speedup)}x); 16 tokens {_s(lat_p)} vs {_s(lat_a)} ({fmt(eff.generate_speedup)}x)",
    ]
    if ev.leak is not None:
        lk = ev.leak
        out.append(
            f"- leak score (share of the prompt recited when asked for it): adapter {fmt(lk.adapter)}, "
            f"base {fmt(lk.base)}, teacher with the prompt {fmt(lk.teacher)}"
        )
    if ev.plain_text is not None:
        p = ev.plain_text
        out.append(f"- plain-text perplexity (no prompt, {p.tokens} tokens of general English): adapter "
                   f"{p.adapter:.2f} vs base {p.base:.2f}, ratio {fmt(p.ratio)}"
                   + (f" **FLAGGED: above {fmt(PERPLEXITY_FLAG_RATIO)}**" if p.flagged else ""))
    for label, samples in (("held-out", ev.samples), ("human-written", ev.human.samples if ev.human else [])):
        if samples:
            s = samples[0]
            out += ["", f"Example {label} input: {s.input!r}"]
            for k in ("teacher", "base", "adapter"):
                out.append(f"- {k}: {getattr(s, k)[:200]!r}")
    return "\n".join(out)


def _outcome_json(outcome) -> dict:
    """A PromptOutcome as report.json keeps it (the eval record as eval.json holds it)."""
    row = {f.name: getattr(outcome, f.name) for f in fields(outcome)}
    row["eval"] = outcome.eval.to_json() if outcome.eval is not None else None
    return row


def write_run_report(store, plans, outcomes, seconds: float, run_id: str | None = None,
                     extra: dict | None = None) -> tuple[str, str]:
    """Write <store>/runs/<run id>/report.{json,md}; return (run dir, Markdown text).

    `plans` are genpi.pipeline.records.PromptPlan, `outcomes` PromptOutcome (`.eval` an
    EvalResult or None). `extra` goes into report.json (the batch job adds stage times and
    prompt lengths)."""
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = store.path("runs", run_id)
    rows = []
    for r in outcomes:
        c = _cells(r.eval)
        rows.append([r.id, r.status, c["kl"], c["agreement"], c["checks"], c["human_kl"], c["human_checks"],
                     c["degenerate"], c["ppl"], c["saved"], c["leak"],
                     fmt(sum(r.seconds.values()), 0) if r.seconds else "-"])
    n_failed = sum(r.status == "failed" for r in outcomes)
    md = [
        f"# genpi run {run_id}",
        "",
        f"{len(outcomes)} prompts: {sum(r.status == 'published' for r in outcomes)} published, "
        f"{sum(r.status == 'skipped' for r in outcomes)} unchanged (skipped), {n_failed} failed; "
        f"{seconds / 60:.1f} min in all.",
    ]
    # The failures first: at hundreds of prompts they would be lost below the table.
    for r in outcomes:
        if r.error:
            stage = f" (stage: {r.failed_stage})" if r.failed_stage else ""
            md += ["", f"**{r.id} failed**: {r.error}{stage}"]
    flags = [f for r in outcomes if r.eval is not None and (f := perplexity_flag(r.eval))]
    if flags:
        md += ["", "Adapters that harm the model where their prompt does not apply:", *(f"- {f}" for f in flags)]
    md += [
        "",
        _table(["prompt", "status", "KL ratio", "agreement ratio", "check ratios", "human KL ratio",
                "human check ratios", "degenerate (held-out / human)", "plain-text ppl ratio",
                "tokens saved/request", "leak", "seconds"], rows),
        "",
        "Ratios are (adapter - base) / (teacher - base): 1 = as if prompted, 0 = as the bare model; the first on the "
        "synthesized held-out inputs, the human ones on the human-written inputs. Degenerate: the adapter's share of "
        f"replies a repeated phrase fills. Plain-text ppl ratio: adapter / base perplexity of general English; "
        f"above {fmt(PERPLEXITY_FLAG_RATIO)} is FLAGGED.",
    ]
    for r in outcomes:
        if r.eval is not None:
            md += ["", format_eval(r.eval)]
    text = "\n".join(md)
    store.write_json(f"{run_dir}/report.json", {
        "run_id": run_id, "seconds": seconds,
        "prompts": [_outcome_json(r) for r in outcomes],
        "plan": [{"id": p.id, "fingerprint": p.fingerprint, "status": p.status} for p in plans],
        **(extra or {}),
    })
    store.write_bytes(f"{run_dir}/report.md", text.encode())
    return run_dir, text


def format_inspect(store) -> str:
    reg = store.registry()
    if not reg:
        return f"nothing published in {store.uri}"
    rows = []
    for pid, entry in sorted(reg.items()):
        fp = entry["fingerprint"]
        c = _cells(EvalResult.read(store, store.prompt_dir(pid, fp)))
        published = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("published_at", 0)))
        rows.append([pid, fp, published, c["kl"], c["checks"], c["human_kl"], c["ppl"], c["saved"], c["leak"]])
    return f"published in {store.uri}:\n\n" + _table(
        ["prompt", "fingerprint", "published", "KL ratio", "check ratios", "human KL ratio", "plain-text ppl ratio",
         "tokens saved/request", "leak"], rows)
