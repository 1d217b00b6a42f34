"""The quality suite's figures (bench/quality.py): one prompt's from its EvalResults, the means
over prompts per setting, and the Markdown tables (bench/run.py renders them too).

Per setting and prompt, on each input set (the reference held-out split, the human-written set,
and for a setting with a synthesis of its own, its own held-out split): KL and agreement ratios,
each declared check (teacher / base / adapter / ratio) and their mean ratio, the degenerate-reply
share; once per setting: the leak score, the plain-text perplexity ratio and what training kept.
Results written before these figures existed (bench/results/*.json) still render: what they
lack shows as n/a.
"""
from __future__ import annotations

import statistics

from genpi.eval.fmt import fmt

# train.json fields worth a reader's eye per setting (the held-out KL arm's epoch choice).
TRAIN_FIELDS = ("steps", "planned_steps", "stop_reason", "chosen_epoch", "epoch_losses", "val_inputs", "val_kl",
                "val_off", "kl_dependence", "on_policy")
SETS = ("heldout", "human", "own_heldout")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def set_figures(n_inputs: int, metrics, checks: dict) -> dict:
    """One input set's figures of one adapter (metrics/checks of an EvalResult or its `human`)."""
    scored = {"kl": metrics.kl, "agreement": metrics.agreement}
    return {"n_inputs": n_inputs,
            "ratios": {m: v.ratio for m, v in scored.items()},
            "teacher_scores": {m: v.teacher for m, v in scored.items()},
            "base_scores": {m: v.base for m, v in scored.items()},
            "adapter_scores": {m: v.adapter for m, v in scored.items()},
            "checks": {c: v.model_dump() for c, v in checks.items()},
            "check_ratio": _mean([v.ratio for v in checks.values()]),
            # Share of degenerate replies per system (no ratio: the teacher is no target here).
            "degenerate": metrics.degenerate.model_dump() if metrics.degenerate else None}


def summarize_prompt(kind: str, prompt_tokens: int, evals: dict, own: dict, train: dict[str, dict],
                     synth: dict[str, dict]) -> dict:
    """One prompt's figures. `evals`: every setting's EvalResult on the reference held-out split
    (the first setting's synthesis) with the human set, leak and perplexity; `own`: the
    held-out-only EvalResult of each setting with a synthesis of its own; `train`: each
    setting's train.json; `synth`: each setting's {"dir", "diversity"} of its synthesis.
    The top-level scores and each setting's "ratios"/"adapter_scores"/"checks" are the
    reference held-out split's, as in results written before the other sets were kept."""
    first = next(iter(evals.values()))
    ref = set_figures(first.n_heldout, first.metrics, first.checks)
    out = {"kind": kind, "prompt_tokens": prompt_tokens, "n_heldout": first.n_heldout,
           "n_human": first.human.n_inputs if first.human else 0,
           "tokens_saved_per_request": first.efficiency.input_tokens_saved_per_request,
           "tokens_saved_share": first.efficiency.input_tokens_saved_share,
           "teacher_scores": ref["teacher_scores"], "base_scores": ref["base_scores"],
           "checks": {c: {"teacher": v["teacher"], "base": v["base"]} for c, v in ref["checks"].items()},
           "leak_teacher": first.leak.teacher if first.leak else None, "settings": {}}
    for s, ev in evals.items():
        held = set_figures(ev.n_heldout, ev.metrics, ev.checks)
        sample = (own[s] if s in own else ev).samples
        tj = train[s]
        out["settings"][s] = {
            "synthesis": "own" if s in own else "shared", "synth_dir": synth[s]["dir"],
            "synth_diversity": synth[s].get("diversity"), "synth_inputs": synth[s].get("inputs"),
            "ratios": held["ratios"], "adapter_scores": held["adapter_scores"],
            "checks": {c: {"adapter": v["adapter"], "ratio": v["ratio"]} for c, v in held["checks"].items()},
            "leak": ev.leak.adapter if ev.leak else None,
            "train_seconds": tj["pack_seconds"],
            "sample": sample[0].model_dump() if sample else None,
            "heldout": held,
            "human": set_figures(ev.human.n_inputs, ev.human.metrics, ev.human.checks) if ev.human else None,
            "own_heldout": set_figures(own[s].n_heldout, own[s].metrics, own[s].checks) if s in own else None,
            "plain_text": ev.plain_text.model_dump() if ev.plain_text else None,
            "train": {k: tj[k] for k in TRAIN_FIELDS if k in tj},
        }
    return out


def _set(row: dict, name: str) -> dict | None:
    """One setting's figures on an input set; results from before the per-set figures give
    the held-out split's from their top-level keys."""
    if name in row:
        return row[name]
    if name != "heldout":
        return None
    # Older still: each check's ratio among the metrics' as "check:NAME".
    checks = row.get("checks") or {m: {"ratio": v} for m, v in row["ratios"].items() if m.startswith("check:")}
    return {"ratios": row["ratios"], "check_ratio": _mean([c.get("ratio") for c in checks.values()]),
            "checks": checks, "degenerate": None}


def _aggregate(rows: list[dict], name: str) -> dict | None:
    figs = [f for f in (_set(r, name) for r in rows) if f is not None]
    if not figs:
        return None
    checks = [c.get("ratio") for f in figs for c in f["checks"].values()]
    return {"n_prompts": len(figs),
            "kl_ratio": _mean([f["ratios"].get("kl") for f in figs]),
            "agreement_ratio": _mean([f["ratios"].get("agreement") for f in figs]),
            # Over every check of every prompt, as the suite always averaged them.
            "check_ratio": _mean(checks), "n_check_ratios": len([c for c in checks if c is not None]),
            "degenerate": _mean([(f["degenerate"] or {}).get("adapter") for f in figs])}


def _kl(row: dict, name: str) -> float | None:
    f = _set(row, name)
    return f["ratios"].get("kl") if f else None


def summarize(results: dict[str, dict], chosen: dict[str, dict]) -> dict:
    """Mean figures per setting over prompts (a prompt whose teacher equals its base on a
    metric has no ratio there and is left out of that mean), each setting against the first
    (the baseline, the shipped default in the suite's runs) prompt by prompt, and the ranking
    by KL ratio: on the held-out split when every setting shares one synthesis, otherwise on
    the human-written set, the one set of inputs no setting generated."""
    names = list(chosen)
    rows = {s: [r["settings"][s] for r in results.values() if s in r["settings"]] for s in names}
    own = any(row.get("synthesis") == "own" for rs in rows.values() for row in rs)
    ranked_on = "human" if own else "heldout"
    base = names[0]
    per = {}
    for s in names:
        held = _aggregate(rows[s], "heldout") or {}
        per[s] = {"label": chosen[s]["label"],
                  "synthesis": "own" if any(r.get("synthesis") == "own" for r in rows[s]) else "shared",
                  # The reference held-out split's means under the names results always had.
                  **{k: held.get(k) for k in ("kl_ratio", "agreement_ratio", "check_ratio")},
                  "n_check_ratios": held.get("n_check_ratios", 0),
                  "leak": _mean([r["leak"] for r in rows[s]]),
                  **{name: _aggregate(rows[s], name) for name in SETS},
                  "plain_text_ratio": _mean([(r.get("plain_text") or {}).get("ratio") for r in rows[s]]),
                  "plain_text_flagged": sum(1 for r in rows[s] if (r.get("plain_text") or {}).get("flagged")),
                  "wins_kl": sum(1 for r in results.values() if _best(r["settings"], ranked_on) == s)}
        if s != base:
            per[s]["vs_baseline"] = {f"{name}_kl_ratio_delta": _mean([
                _kl(r["settings"][s], name) - _kl(r["settings"][base], name) for r in results.values()
                if s in r["settings"] and base in r["settings"]
                and None not in (_kl(r["settings"][s], name), _kl(r["settings"][base], name))])
                for name in ("heldout", "human")}
    score = {s: (per[s][ranked_on] or {}).get("kl_ratio") for s in per}
    ranked = sorted((s for s in per if score[s] is not None), key=lambda s: -score[s])
    return {"per_setting": per, "baseline": base, "ranked_on": ranked_on, "ranking_by_kl_ratio": ranked,
            "best": ranked[0] if ranked else None,
            "tokens_saved_share_mean": _mean([r["tokens_saved_share"] for r in results.values()])}


def _best(settings_: dict[str, dict], name: str) -> str | None:
    scored = [(_kl(v, name), s) for s, v in settings_.items() if _kl(v, name) is not None]
    return max(scored)[1] if scored else None


def _check_scores(r: dict, sets: list[str]) -> dict[str, list]:
    """{check name: [teacher, base, adapter of each setting]} of one prompt's figures."""
    if "checks" in r:
        return {c: [v["teacher"], v["base"], *(r["settings"][s]["checks"].get(c, {}).get("adapter") for s in sets)]
                for c, v in r["checks"].items()}
    # Results written before genpi's typed eval record (bench/results/*.json, kept by
    # bench/run.py --merge) list each check among the metrics as "check:NAME".
    old = [m for m in r["teacher_scores"] if m.startswith("check:")]
    return {m[len("check:"):]: [r["teacher_scores"][m], r["base_scores"][m],
                                *(r["settings"][s]["adapter_scores"].get(m) for s in sets)] for m in old}


def _pair(a: dict | None, b: dict | None, get) -> str:
    return f"{fmt(get(a) if a else None)} / {fmt(get(b) if b else None)}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _deg(f: dict) -> float | None:
    return (f.get("degenerate") or {}).get("adapter")


def _epoch(t: dict | None) -> str:
    if not t or "chosen_epoch" not in t:
        return "n/a"
    return f"{t['chosen_epoch']} of {len(t.get('epoch_losses') or [])}" + (" (val KL)" if t.get("val_inputs") else "")


def table(res: dict) -> str:
    """Markdown: one row per setting (means), one row per prompt (held-out KL ratio, checks and
    leak of every setting), then one row per prompt and setting with every measured figure."""
    sets = list(res["settings"])
    summary = res["summary"]
    per = summary["per_setting"]
    lines = ["| setting | synthesis | held-out KL ratio | held-out check ratio | held-out degenerate | "
             f"human KL ratio | human check ratio | human degenerate | leak | perplexity ratio | best KL on | "
             f"KL ratio vs {summary.get('baseline', sets[0])}, per prompt (held-out / human) |",
             "|" + "---|" * 12]
    for s in sets:
        p = per[s]
        vs = p.get("vs_baseline") or {}
        held = p.get("heldout") or {"kl_ratio": p["kl_ratio"], "check_ratio": p["check_ratio"],
                                    "n_check_ratios": p["n_check_ratios"]}
        human = p.get("human") or {}
        lines.append(f"| {p['label']} | {p.get('synthesis', 'shared')} | {fmt(held['kl_ratio'])} | "
                     f"{fmt(held['check_ratio'])} ({held['n_check_ratios']}) | {fmt(held.get('degenerate'))} | "
                     f"{fmt(human.get('kl_ratio'))} | {fmt(human.get('check_ratio'))} ({human.get('n_check_ratios', 0)}) | "
                     f"{fmt(human.get('degenerate'))} | {fmt(p['leak'])} | {fmt(p.get('plain_text_ratio'))} | "
                     f"{p['wins_kl']}/{len(res['prompts'])} prompts | "
                     + (f"{_signed(vs.get('heldout_kl_ratio_delta'))} / {_signed(vs.get('human_kl_ratio_delta'))} |"
                        if vs else "baseline |"))
    on = summary.get("ranked_on", "heldout")
    lines += ["", "Held-out: the first setting's synthesized held-out split, the same inputs for every setting. "
              "Human: the same human-written inputs for every setting. A setting with synthesis \"own\" "
              "trained on inputs of its own generation (its own held-out split's figures are in the JSON, "
              "`own_heldout`, and in the last column below), so it is compared on the human-written set first. "
              f"Best KL and the ranking are on the {'human-written set' if on == 'human' else 'held-out split'}. "
              "Degenerate: share of adapter replies a repeated n-gram fills; perplexity ratio: plain text, "
              "adapter / base."]
    lines += ["", "| prompt | kind | prompt tokens | tokens saved | "
              + " | ".join(f"KL ratio {s}" for s in sets) + " | checks (teacher / base / "
              + " / ".join(sets) + ") | leak (teacher / " + " / ".join(sets) + ") |",
              "|" + "---|" * (6 + len(sets))]
    for pid, r in res["prompts"].items():
        kl = " | ".join(fmt(r["settings"][s]["ratios"].get("kl")) for s in sets)
        checks = [f"{c} {' / '.join(fmt(v) for v in vals)}" for c, vals in _check_scores(r, sets).items()]
        leak = " / ".join([fmt(r["leak_teacher"])] + [fmt(r["settings"][s]["leak"]) for s in sets])
        lines.append(f"| {pid} | {r['kind']} | {r['prompt_tokens']} | {fmt(r['tokens_saved_share'], pct=True)} | "
                     f"{kl} | {'; '.join(checks) or '-'} | {leak} |")
    lines += ["", "| prompt / setting | KL ratio (held-out / human) | check ratio (held-out / human) | "
              "degenerate (held-out / human) | leak | perplexity ratio | epoch kept | own held-out KL ratio |",
              "|" + "---|" * 8]
    for pid, r in res["prompts"].items():
        for s in sets:
            row = r["settings"][s]
            held, human, own = _set(row, "heldout"), _set(row, "human"), _set(row, "own_heldout")
            lines.append(f"| {pid} / {s} | {_pair(held, human, lambda f: f['ratios'].get('kl'))} | "
                         f"{_pair(held, human, lambda f: f['check_ratio'])} | {_pair(held, human, _deg)} | "
                         f"{fmt(row['leak'])} | {fmt((row.get('plain_text') or {}).get('ratio'))} | "
                         f"{_epoch(row.get('train'))} | {fmt(own['ratios'].get('kl') if own else None)} |")
    return "\n".join(lines)
