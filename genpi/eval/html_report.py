"""A self-contained HTML run report for people: header, a table of every prompt and three plots.

`write_html_report(store, run_dir, report)` writes `<run_dir>/report.html` (inline CSS, the plots
embedded as base64 PNGs so the one file opens anywhere) and the plots next to it as
`ratios.png`, `tokens_saved.png` and `stage_times.png`. A plot with nothing to show is replaced by
a text note (and its PNG is not written). matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import base64
import io
import time
from html import escape

from genpi.eval.fmt import fmt
from genpi.eval.result import EvalResult

STAGES = ("synth", "train", "eval")
STATUS_COLOURS = {"published": "#2e7d32", "skipped": "#757575", "failed": "#c62828"}
PLOTS = (("ratios", "Internalization ratios", "no evaluated prompts"),
         ("tokens_saved", "Input tokens saved per request", "no evaluated prompts"),
         ("stage_times", "Time per stage", "no stage times recorded"))

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} .meta{color:#555;margin:.2em 0}
.counts span{display:inline-block;margin-right:1em;padding:.1em .6em;border-radius:1em;color:#fff}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th:after{content:" \\2195";color:#aaa} td.t{text-align:left} tr:nth-child(even){background:#fafafa}
td.status{color:#fff;font-weight:600;text-align:center} td.err{color:#c62828;text-align:left;max-width:40em}
.note{color:#777;font-style:italic;border:1px dashed #bbb;padding:1em;margin:1em 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} figure{margin:1em 0}
"""
# Click a header to sort by that column (numbers by their data-v value, n/a last).
SORT_JS = """
document.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{const tb=th.closest('table').tBodies[0];
const key=r=>{const c=r.cells[i];if(c.dataset.v===undefined)return c.textContent;
return c.dataset.v===''?-Infinity:parseFloat(c.dataset.v)};const d=th.dataset.d=th.dataset.d==='1'?'-1':'1';
[...tb.rows].sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*d}).forEach(r=>tb.appendChild(r))});
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
    """Bar chart of the run's wall time per stage; plus a stacked bar per prompt (<= 40 prompts)."""
    stages = {k: v for k, v in (report.get("stages") or {}).items() if v is not None}
    names = list(dict.fromkeys([*STAGES, *stages]))
    prompts = report.get("prompts") or []
    per_prompt = [p for p in prompts if any(v is not None for v in (p.get("seconds") or {}).values())]
    names = [n for n in names if n in stages or any(_get(p, "seconds", n) is not None for p in per_prompt)]
    show_prompts = bool(per_prompt) and len(prompts) <= 40
    if not stages and not show_prompts:
        return None
    colours = dict(zip(names, ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#5d4037")))
    ncols = int(bool(stages)) + int(show_prompts)
    fig = _figure(4 + 6 * show_prompts + 0.1 * len(per_prompt) * show_prompts, 4)
    axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[1, 3] if ncols == 2 else None)[0]
    if stages:
        ax = axes[0]
        keys = [n for n in names if n in stages]
        bars = ax.bar([_label(k) for k in keys], [stages[k] for k in keys], color=[colours[k] for k in keys])
        ax.bar_label(bars, labels=[_duration(stages[k]) for k in keys], fontsize=8)
        ax.set(ylabel="seconds", title="Run wall time per stage")
    if show_prompts:
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
    return _png(fig)


def _row(p: dict) -> str:
    ev, status = _eval(p), str(p.get("status", ""))
    checks = ev.check_ratios() if ev else {}
    secs = p.get("seconds") or {}

    def num(x, digits=2, pct=False):
        return f'<td data-v="{"" if x is None else x}">{fmt(x, digits, pct)}</td>'

    err = p.get("error") or ""
    if err and p.get("failed_stage"):
        err = f"[{p['failed_stage']}] {err}"
    cells = [
        f'<td class="t">{escape(str(p.get("id", "")))}</td>',
        f'<td class="status" style="background:{STATUS_COLOURS.get(status, "#1565c0")}">{escape(status)}</td>',
        num(p.get("prompt_tokens"), 0),
        num(ev.metrics.kl.ratio if ev else None),
        num(ev.metrics.agreement.ratio if ev else None),
        '<td class="t">' + (", ".join(f"{escape(k)} {fmt(v)}" for k, v in checks.items()) or "-") + "</td>",
        num(ev.efficiency.input_tokens_saved_per_request if ev else None, 0),
        num(ev.efficiency.input_tokens_saved_share if ev else None, pct=True),
        num(ev.leak.adapter if ev and ev.leak else None),
        *(num(secs.get(s), 1) for s in STAGES),
        f'<td class="err">{escape(err)}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def render_html(report: dict, plots: dict[str, bytes | None]) -> str:
    counts = report.get("counts") or {}
    started = report.get("started_at")
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started is not None else "n/a"
    run_id = escape(str(report.get("run_id", "")))
    header = ["id", "status", "prompt tokens", "KL ratio", "agreement ratio", "check ratios",
              "tokens saved / request", "saved share", "leak (adapter)",
              *(f"{s} s" for s in STAGES), "error"]
    figures = []
    for name, title, why in PLOTS:
        png = plots.get(name)
        if png:
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            figures.append(f'<figure><img alt="{escape(title)}" src="{src}"></figure>')
        else:
            figures.append(f'<p class="note">{escape(title)}: no plot ({why}).</p>')
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>genpi run {run_id}</title><style>{CSS}</style></head><body>",
        f"<h1>genpi run {run_id}</h1>",
        f'<p class="meta">started {date} &middot; duration {_duration(report.get("seconds"))}'
        f' &middot; store {escape(str(report.get("store", "")))}'
        f' &middot; manifest {escape(str(report.get("manifest", "")))}</p>',
        '<p class="counts">' + "".join(
            f'<span style="background:{c}">{counts.get(s, 0)} {s}</span>' for s, c in STATUS_COLOURS.items()) + "</p>",
        "<h2>Prompts</h2>",
        "<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>",
        *(_row(p) for p in report.get("prompts") or []),
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
