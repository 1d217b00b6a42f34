"""Human-readable plans, evaluation summaries and run reports (Markdown + JSON)."""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict


def _f(x, digits: int = 2, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_plan(plans) -> None:
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.status] = counts.get(p.status, 0) + 1
    print("plan: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for p in plans:
        print(f"  {p.id:<24} {p.status:<10} fingerprint {p.fingerprint}")


def format_eval(ev: dict) -> str:
    """The evaluation of one prompt as a Markdown section."""
    rows = []
    for name, m in ev["metrics"].items():
        better = "lower" if name == "kl" else "higher"
        rows.append([name, _f(m["teacher"], 3), _f(m["base"], 3), _f(m["adapter"], 3), _f(m["ratio"]), better])
    eff = ev["efficiency"]
    out = [
        f"### {ev['prompt_id']} ({ev['n_heldout']} held-out inputs)",
        "",
        _table(["metric", "teacher (prompt)", "base (no prompt)", "adapter (no prompt)", "internalization ratio", "better"], rows),
        "",
        f"- input tokens per request: {_f(eff['input_tokens_with_prompt'], 0)} with the prompt, "
        f"{_f(eff['input_tokens_without_prompt'], 0)} with the adapter "
        f"(saved {_f(eff['input_tokens_saved_per_request'], 0)}, {_f(eff['input_tokens_saved_share'], pct=True)}; "
        f"~{eff['prefill_flops_saved_per_request'] / 1e9:.1f} GFLOPs of prefill)",
        f"- latency (batch 1): prefill {1000 * eff['latency_with_prompt']['prefill_s']:.0f} ms with the prompt vs "
        f"{1000 * eff['latency_adapter_without_prompt']['prefill_s']:.0f} ms with the adapter "
        f"({_f(eff['prefill_speedup'])}x); 16 tokens {eff['latency_with_prompt']['generate_s']:.2f} s vs "
        f"{eff['latency_adapter_without_prompt']['generate_s']:.2f} s ({_f(eff['generate_speedup'])}x)",
    ]
    if ev.get("leak"):
        lk = ev["leak"]
        out.append(
            f"- leak score (share of the prompt recited when asked for it): adapter {_f(lk['adapter'])}, "
            f"base {_f(lk['base'])}, teacher with the prompt {_f(lk['teacher'])}"
        )
    if ev.get("samples"):
        s = ev["samples"][0]
        out += ["", f"Example held-out input: {s['input']!r}"]
        for k in ("teacher", "base", "adapter"):
            out.append(f"- {k}: {s[k][:200]!r}")
    return "\n".join(out)


def write_run_report(store, plans, results, seconds: float, run_id: str | None = None,
                     extra: dict | None = None) -> tuple[str, str]:
    """Write <store>/runs/<run id>/report.{json,md}; return (run dir, Markdown text).
    `extra` goes into report.json (the batch job adds stage times and prompt lengths)."""
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = store.path("runs", run_id)
    rows = []
    for r in results:
        ev = r.eval or {}
        m = ev.get("metrics", {})
        checks = [f"{k[6:]}={_f(v['ratio'])}" for k, v in m.items() if k.startswith("check:")]
        rows.append([
            r.id, r.status, _f(m.get("kl", {}).get("ratio")), _f(m.get("agreement", {}).get("ratio")),
            ", ".join(checks) or "-",
            _f(ev.get("efficiency", {}).get("input_tokens_saved_per_request"), 0),
            _f(ev.get("leak", {}).get("adapter")),
            _f(sum(r.seconds.values()), 0) if r.seconds else "-",
        ])
    n_failed = sum(r.status == "failed" for r in results)
    md = [
        f"# genpi run {run_id}",
        "",
        f"{len(results)} prompts: {sum(r.status == 'published' for r in results)} published, "
        f"{sum(r.status == 'skipped' for r in results)} unchanged (skipped), {n_failed} failed; "
        f"{seconds / 60:.1f} min in all.",
        "",
        _table(["prompt", "status", "KL ratio", "agreement ratio", "check ratios", "tokens saved/request",
                "leak", "seconds"], rows),
        "",
        "Ratios are (adapter - base) / (teacher - base) on held-out inputs: 1 = as if prompted, 0 = as the bare model.",
    ]
    for r in results:
        if r.error:
            md += ["", f"**{r.id} failed**: {r.error}"]
    for r in results:
        if r.eval:
            md += ["", format_eval(r.eval)]
    text = "\n".join(md)
    store.write_json(f"{run_dir}/report.json", {
        "run_id": run_id, "seconds": seconds,
        "prompts": [{**asdict(r), "status": r.status} for r in results],
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
        pdir = store.prompt_dir(pid, fp)
        ev = store.read_json(f"{pdir}/eval.json") if store.exists(f"{pdir}/eval.json") else {}
        m = ev.get("metrics", {})
        checks = [f"{k[6:]}={_f(v['ratio'])}" for k, v in m.items() if k.startswith("check:")]
        rows.append([
            pid, fp, time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("published_at", 0))),
            _f(m.get("kl", {}).get("ratio")), ", ".join(checks) or "-",
            _f(ev.get("efficiency", {}).get("input_tokens_saved_per_request"), 0), _f(ev.get("leak", {}).get("adapter")),
        ])
    return f"published in {store.uri}:\n\n" + _table(
        ["prompt", "fingerprint", "published", "KL ratio", "check ratios", "tokens saved/request", "leak"], rows)
