"""A self-contained HTML run report for people, usable at hundreds of prompts.

The page reads top to bottom: counts (buttons that filter the table by status), the failures
first (each linked to its row), a one-line distribution of each headline figure, the table of
every prompt (in run order; a click on a header sorts by that column) and three plots, all
distributions so they stay readable at 300+ prompts.

`write_html_report(store, run_dir, report)` writes `<run_dir>/report.html` (inline CSS and JS,
the plots embedded as base64 PNGs, no external resource: the one file opens anywhere, offline)
and the plots next to it as `ratios.png`, `tokens_saved.png` and `stage_times.png`. A plot with
nothing to show is replaced by a text note (and its PNG is not written). matplotlib is imported
only when a plot is drawn.
"""
from __future__ import annotations

import base64
import io
import time
from collections import Counter
from html import escape

from genpi.eval.fmt import fmt
from genpi.eval.report import perplexity_flag
from genpi.eval.result import EvalResult

STAGES = ("synth", "train", "eval")
STATUS_COLOURS = {"published": "#2e7d32", "skipped": "#757575", "failed": "#c62828"}
# Up to this many prompts the time plot has one stacked bar per prompt; beyond, a histogram.
MAX_PROMPT_BARS = 40
# A failure's error in the list at the top is cut here (its row in the table has all of it).
FAILURE_CHARS = 300
PLOTS = (("ratios", "Internalization ratios", "no evaluated prompts"),
         ("tokens_saved", "Input tokens saved per request", "no evaluated prompts"),
         ("stage_times", "Time per stage", "no stage times recorded"))

# Colours by class, not per cell: at 300 rows an inline style per row is most of the page.
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} .meta{color:#555;margin:.2em 0}
.counts button{margin-right:.6em;padding:.1em .7em;border:2px solid transparent;border-radius:1em;color:#fff;
cursor:pointer;font:inherit;background:#1565c0} .counts button.on{border-color:#222}
.s-published{background:#2e7d32!important} .s-skipped{background:#757575!important}
.s-failed{background:#c62828!important}
ol.failures{font-size:.9em} ol.failures .stage{color:#c62828;font-weight:600} ul.stats{font-size:.9em;color:#333}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th:after{content:" \\2195";color:#aaa} td.t{text-align:left} tr:nth-child(even){background:#fafafa}
td.status{color:#fff;font-weight:600;text-align:center;background:#1565c0}
td.err{color:#c62828;text-align:left;max-width:40em} tr.hide{display:none}
.note{color:#777;font-style:italic;border:1px dashed #bbb;padding:1em;margin:1em 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} figure{margin:1em 0}
"""
# Click a header to sort by that column (numbers by their data-v value, n/a last; a second
# click reverses). Click a status button to show only that status (again: show every row).
SORT_JS = """
document.querySelectorAll('th[data-sort]').forEach(th=>th.onclick=()=>{const tb=th.closest('table').tBodies[0];
const key=r=>{const c=r.cells[th.cellIndex];if(th.dataset.sort!=='num')return c.textContent;
return c.dataset.v===''?-Infinity:parseFloat(c.dataset.v)};const d=th.dataset.d=th.dataset.d==='1'?'-1':'1';
[...tb.rows].sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*d}).forEach(r=>tb.appendChild(r))});
document.querySelectorAll('button[data-f]').forEach(b=>b.onclick=()=>{const on=!b.classList.contains('on');
document.querySelectorAll('button[data-f]').forEach(x=>x.classList.toggle('on',on&&x===b));
document.querySelectorAll('#prompts tbody tr').forEach(r=>r.classList.toggle('hide',on&&r.dataset.s!==b.dataset.f))});
"""


def _get(d, *keys):
    """d[k1][k2]... or None when any level is missing or None."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _eval(p: dict) -> EvalResult | None:
    """A report.json prompt's evaluation as the typed record (report.json files written
    before the record existed included)."""
    ev = p.get("eval") if isinstance(p, dict) else None
    return EvalResult.model_validate(ev) if ev else None


def _duration(s) -> str:
    if s is None:
        return "n/a"
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}h {m:02d}m {s % 60:02d}s" if h else f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _label(s: str) -> str:
    """User text as a matplotlib label: no mathtext ($...$) interpretation."""
    return str(s).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_ratios(prompts: list[dict]) -> bytes | None:
    """Histogram of KL and check internalization ratios over the evaluated prompts."""
    evaluated = [ev for p in prompts if p.get("status") in ("published", "skipped") and (ev := _eval(p))]
    series = {"KL ratio": [ev.metrics.kl.ratio for ev in evaluated],
              "check ratios": [r for ev in evaluated for r in ev.check_ratios().values()]}
    series = {k: [v for v in vs if v is not None] for k, vs in series.items()}
    series = {k: vs for k, vs in series.items() if vs}
    if not series:
        return None
    import numpy as np

    allv = [v for vs in series.values() for v in vs]
    bins = np.linspace(min(0.0, min(allv)), max(1.0, max(allv)), 21)
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    ax.hist(list(series.values()), bins=bins, color=["#1565c0", "#ef6c00"][:len(series)],
            label=[f"{name} (n={len(vs)})" for name, vs in series.items()])
    top = ax.get_ylim()[1] * 1.15  # headroom for the labels of the two reference lines
    ax.set_ylim(top=top)
    for x, txt in ((0, "base "), (1, "teacher ")):
        ax.axvline(x, color="#555", ls="--", lw=1)
        ax.text(x, top * 0.98, txt, color="#555", va="top", ha="right")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="internalization ratio (0 = base without prompt, 1 = teacher with prompt)",
           ylabel="prompts", title="Internalization ratios of published/skipped prompts")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _png(fig)


def plot_tokens_saved(prompts: list[dict]) -> bytes | None:
    """Scatter: input tokens saved per request against the prompt's length in tokens."""
    saved = [ev.efficiency.input_tokens_saved_per_request if (ev := _eval(p)) else None for p in prompts]
    pts = [(p.get("prompt_tokens"), s, p.get("status")) for p, s in zip(prompts, saved)]
    pts = [pt for pt in pts if pt[0] is not None and pt[1] is not None]
    if not pts:
        return None
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    for status in sorted({s for *_, s in pts}, key=str):
        xs = [x for x, _, s in pts if s == status]
        ys = [y for _, y, s in pts if s == status]
        ax.scatter(xs, ys, color=STATUS_COLOURS.get(status, "#1565c0"), label=_label(status), s=30)
    top = max(max(x for x, *_ in pts), max(y for _, y, _ in pts), 1)
    ax.plot([0, top], [0, top], color="#999", ls="--", lw=1, label="saved = prompt length")
    ax.set(xlabel="prompt length (tokens)", ylabel="input tokens saved per request",
           title="Input tokens saved per request vs prompt length")
    ax.legend()
    return _png(fig)


def plot_stage_times(report: dict) -> bytes | None:
    """Bar chart of the run's wall time per stage; plus the time per prompt and stage: a stacked
    bar per prompt up to MAX_PROMPT_BARS prompts, beyond that a histogram per stage."""
    stages = {k: v for k, v in (report.get("stages") or {}).items() if v is not None}
    names = list(dict.fromkeys([*STAGES, *stages]))
    prompts = report.get("prompts") or []
    per_prompt = [p for p in prompts if any(v is not None for v in (p.get("seconds") or {}).values())]
    names = [n for n in names if n in stages or any(_get(p, "seconds", n) is not None for p in per_prompt)]
    bars = bool(per_prompt) and len(prompts) <= MAX_PROMPT_BARS
    hist = bool(per_prompt) and not bars
    if not stages and not per_prompt:
        return None
    colours = dict(zip(names, ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#5d4037")))
    ncols = int(bool(stages)) + int(bool(per_prompt))
    fig = _figure(4 + 6 * bool(per_prompt) + 0.1 * len(per_prompt) * bars, 4)
    axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[1, 3] if ncols == 2 else None)[0]
    if stages:
        ax = axes[0]
        keys = [n for n in names if n in stages]
        rects = ax.bar([_label(k) for k in keys], [stages[k] for k in keys], color=[colours[k] for k in keys])
        ax.bar_label(rects, labels=[_duration(stages[k]) for k in keys], fontsize=8)
        ax.set(ylabel="seconds", title="Run wall time per stage")
    if bars:
        ax = axes[-1]
        ids = [_label(p.get("id", "?")) for p in per_prompt]
        bottom = [0.0] * len(per_prompt)
        for n in names:
            vals = [_get(p, "seconds", n) or 0.0 for p in per_prompt]
            ax.bar(range(len(ids)), vals, bottom=bottom, color=colours[n], label=_label(n))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(ids)), ids, rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="seconds", title="Time per prompt and stage")
        ax.legend()
    if hist:
        ax = axes[-1]
        series = {n: [v for p in per_prompt if (v := _get(p, "seconds", n)) is not None] for n in names}
        series = {n: vs for n, vs in series.items() if vs}
        import numpy as np

        allv = [v for vs in series.values() for v in vs]
        bins = np.linspace(min(allv), max(allv) + 1e-9, 41)  # shared bins: stages compare by position
        for n, vs in series.items():  # overlaid, see-through: stages of different lengths stay apart
            ax.hist(vs, bins=bins, color=colours[n], alpha=0.55, histtype="stepfilled",
                    label=f"{_label(n)} (n={len(vs)})")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="seconds per prompt", ylabel="prompts",
               title=f"Time per prompt and stage ({len(per_prompt)} prompts)")
        ax.legend()
    return _png(fig)


def _degenerate(metrics) -> float | None:
    return metrics.degenerate.adapter if metrics.degenerate is not None else None


def _stats(prompts: list[dict]) -> list[str]:
    """One line per headline figure: how it is distributed over the prompts that have it."""
    import statistics

    evs = [ev for p in prompts if (ev := _eval(p))]
    human = [ev.human for ev in evs if ev.human is not None]
    series = {"KL ratio": [ev.metrics.kl.ratio for ev in evs],
              "agreement ratio": [ev.metrics.agreement.ratio for ev in evs],
              "check ratios": [r for ev in evs for r in ev.check_ratios().values()],
              "human-written inputs: KL ratio": [h.metrics.kl.ratio for h in human],
              "human-written inputs: check ratios": [r for h in human for r in h.check_ratios().values()],
              "degenerate replies of the adapter, held-out": [_degenerate(ev.metrics) for ev in evs],
              "degenerate replies of the adapter, human-written": [_degenerate(h.metrics) for h in human],
              "plain-text perplexity ratio (adapter / base)": [ev.plain_text.ratio for ev in evs if ev.plain_text],
              "input tokens saved / request": [ev.efficiency.input_tokens_saved_per_request for ev in evs],
              **{f"{s} s per prompt": [_get(p, "seconds", s) for p in prompts] for s in STAGES}}
    out = []
    for name, vs in series.items():
        vs = sorted(v for v in vs if v is not None)
        if vs:
            out.append(f"<li>{escape(name)}: median {fmt(statistics.median(vs))}, "
                       f"10% {fmt(vs[len(vs) // 10])}, 90% {fmt(vs[(9 * len(vs)) // 10])}, "
                       f"min {fmt(vs[0])}, max {fmt(vs[-1])} (n={len(vs)})</li>")
    return out


def _flags(prompts: list[dict]) -> list[str]:
    """Adapters that raise plain-text perplexity above the flag (issue 16, "do no harm"), each
    linked to its row; a <ul>, as the numbered list is the failures'."""
    flagged = [(i, f) for i, p in enumerate(prompts) if (ev := _eval(p)) and (f := perplexity_flag(ev))]
    if not flagged:
        return []
    return [f'<h2 id="flags">Flagged: harm where the prompt does not apply ({len(flagged)})</h2>', '<ul class="flags">',
            *(f'<li><a href="#r{i}">{escape(f)}</a></li>' for i, f in flagged), "</ul>"]


def _error(p: dict) -> str:
    err = p.get("error") or ""
    return f"[{p['failed_stage']}] {err}" if err and p.get("failed_stage") else err


def _status_class(status: str) -> str:
    return f" s-{status}" if status in STATUS_COLOURS else ""


def _row(i: int, p: dict) -> str:
    ev, status = _eval(p), str(p.get("status", ""))
    checks = ev.check_ratios() if ev else {}
    secs = p.get("seconds") or {}

    def num(x, digits=2, pct=False):
        return f'<td data-v="{"" if x is None else x}">{fmt(x, digits, pct)}</td>'

    cells = [
        f'<td class="t">{escape(str(p.get("id", "")))}</td>',
        f'<td class="status{_status_class(status)}">{escape(status)}</td>',
        num(p.get("prompt_tokens"), 0),
        num(ev.metrics.kl.ratio if ev else None),
        num(ev.metrics.agreement.ratio if ev else None),
        '<td class="t">' + (", ".join(f"{escape(k)} {fmt(v)}" for k, v in checks.items()) or "-") + "</td>",
        num(ev.efficiency.input_tokens_saved_per_request if ev else None, 0),
        num(ev.efficiency.input_tokens_saved_share if ev else None, pct=True),
        num(ev.leak.adapter if ev and ev.leak else None),
        *(num(secs.get(s), 1) for s in STAGES),
        f'<td class="err">{escape(_error(p))}</td>',
    ]
    return f'<tr id="r{i}" data-s="{escape(status)}">' + "".join(cells) + "</tr>"


def _failures(prompts: list[dict]) -> list[str]:
    """The failures, first on the page: each with its stage and error, linked to its row."""
    failed = [(i, p) for i, p in enumerate(prompts) if p.get("status") == "failed"]
    if not failed:
        return []
    items = []
    for i, p in failed:
        err = str(p.get("error") or "")
        err = err if len(err) <= FAILURE_CHARS else err[:FAILURE_CHARS] + "..."
        items.append(f'<li><a href="#r{i}">{escape(str(p.get("id", "")))}</a> '
                     f'<span class="stage">[{escape(str(p.get("failed_stage") or "?"))}]</span> {escape(err)}</li>')
    return [f'<h2 id="failures">Failures ({len(failed)})</h2>', '<ol class="failures">', *items, "</ol>"]


# The table's columns: header text and how a click sorts it.
HEADER = [("id", "text"), ("status", "text"), ("prompt tokens", "num"), ("KL ratio", "num"),
          ("agreement ratio", "num"), ("check ratios", "text"), ("tokens saved / request", "num"),
          ("saved share", "num"), ("leak (adapter)", "num"), *((f"{s} s", "num") for s in STAGES),
          ("error", "text")]


def render_html(report: dict, plots: dict[str, bytes | None]) -> str:
    prompts = report.get("prompts") or []
    # Counted from the rows themselves, so each button's count is what it shows.
    counts = Counter(str(p.get("status", "")) for p in prompts)
    started = report.get("started_at")
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started is not None else "n/a"
    run_id = escape(str(report.get("run_id", "")))
    figures = []
    for name, title, why in PLOTS:
        png = plots.get(name)
        if png:
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            figures.append(f'<figure><img alt="{escape(title)}" src="{src}"></figure>')
        else:
            figures.append(f'<p class="note">{escape(title)}: no plot ({why}).</p>')
    stats = _stats(prompts)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>genpi run {run_id}</title><style>{CSS}</style></head><body>",
        f"<h1>genpi run {run_id}</h1>",
        f'<p class="meta">started {date} &middot; duration {_duration(report.get("seconds"))}'
        f' &middot; store {escape(str(report.get("store", "")))}'
        f' &middot; manifest {escape(str(report.get("manifest", "")))}</p>',
        f'<p class="counts">{len(prompts)} prompts; show only: ' + "".join(
            f'<button type="button" data-f="{s}" class="s-{s}">{counts.get(s, 0)} {s}</button>'
            for s in STATUS_COLOURS) + "</p>",
        *_failures(prompts),
        *_flags(prompts),
        *(['<h2>Distributions</h2><ul class="stats">', *stats, "</ul>"] if stats else []),
        "<h2>Prompts</h2>",
        '<table id="prompts"><thead><tr>'
        + "".join(f'<th data-sort="{kind}">{escape(h)}</th>' for h, kind in HEADER) + "</tr></thead><tbody>",
        *(_row(i, p) for i, p in enumerate(prompts)),
        "</tbody></table>",
        "<h2>Plots</h2>", *figures,
        f"<script>{SORT_JS}</script>", "</body></html>", ""])


def write_html_report(store, run_dir: str, report: dict) -> str:
    """Write <run_dir>/report.html and its plots' PNGs through `store`; return the page's path."""
    prompts = report.get("prompts") or []
    plots = {"ratios": plot_ratios(prompts), "tokens_saved": plot_tokens_saved(prompts),
             "stage_times": plot_stage_times(report)}
    for name, png in plots.items():
        if png:
            store.write_bytes(f"{run_dir}/{name}.png", png)
    path = f"{run_dir}/report.html"
    store.write_bytes(path, render_html(report, plots).encode("utf-8"))
    return path
