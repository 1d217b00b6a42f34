"""Console and reports at 300 prompts: the plan, the synthesis summary and the end-of-run summary
stay a screenful (totals, failures up to a cap and how many more, where the report is); the HTML
report puts the failures first, keeps every prompt in a sortable, filterable table and shows
distributions. The prompts are the real S-IFEval manifest of ../shared (read in place)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from genpi.config import load_config
from genpi.eval.result import EvalResult
from genpi.manifest import load_manifest
from genpi.pipeline.plan import MAX_ODD_LINES, format_plan
from genpi.pipeline.records import PromptPlan
from genpi.pipeline.run import Run
from genpi.pipeline.summary import MAX_FAILURE_LINES, finish_report
from genpi.store import Store
from genpi.synth.pipeline import MAX_SUMMARY_LINES, format_summaries

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "manifests" / "s-ifeval-300.jsonl"
MAX_CONSOLE_LINES = 40
STAGE_ERRORS = {  # how each stage's failures read in a real run (one with a traceback)
    "synth": "inputs: ValueError: no usable inputs after 3 rounds (wanted 48)",
    "train": "RuntimeError: injected training failure\nTraceback (most recent call last):\n  File \"x.py\", line 1",
    "eval": "ContextLengthError: prompt + input exceed the model context " + "x" * 400,
}


@pytest.fixture(scope="module")
def entries():
    if not MANIFEST.exists():
        pytest.skip(f"{MANIFEST} is absent (the real 300-prompt manifest lives in ../shared, outside the project)")
    es = load_manifest(MANIFEST)
    assert len(es) == 300
    return es


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, [])


def make_plans(entries, cfg, status="new"):
    # Prompt lengths from the words (the tokenizer is not what is tested here).
    return [PromptPlan(e, cfg, f"{i:016x}", status, prompt_tokens=len(e.prompt.split()) * 4 // 3)
            for i, e in enumerate(entries)]


def make_eval(pid, rng, checks):
    kl, agree = rng.uniform(-0.2, 1.1), rng.uniform(0, 1)
    return EvalResult(
        prompt_id=pid, n_heldout=8,
        metrics={"kl": {"teacher": 0.0, "base": 1.2, "adapter": 1.2 * (1 - kl), "ratio": kl},
                 "agreement": {"teacher": 1.0, "base": 0.2, "adapter": 0.5, "ratio": agree}},
        checks={name: {"teacher": 1.0, "base": 0.0, "adapter": r, "ratio": r}
                for name, r in ((c, rng.uniform(0, 1)) for c in checks)},
        efficiency={"input_tokens_saved_per_request": 40.0, "input_tokens_with_prompt": 60.0,
                    "input_tokens_without_prompt": 20.0, "input_tokens_saved_share": 0.66},
        leak={"adapter": rng.uniform(0, 0.3), "base": 0.0, "teacher": 0.9})


def make_run(entries, cfg, n_failed):
    """A finished 300-prompt run as genpi.pipeline.run leaves it: n_failed prompts failed at the
    three stages in turn, a few unchanged (skipped), the rest published with their evaluation."""
    rng = random.Random(0)
    run = Run(make_plans(entries, cfg))
    failed = set(rng.sample(range(len(entries)), n_failed))
    for i, e in enumerate(entries):
        o = run.out[e.id]
        o.seconds = {"synth": round(rng.uniform(1, 4), 2)}
        if i in failed:
            stage = ("synth", "train", "eval")[len([j for j in failed if j < i]) % 3]
            if stage != "synth":
                o.seconds["train"] = round(rng.uniform(5, 9), 2)
            run.fail(e.id, stage, STAGE_ERRORS[stage])
            continue
        o.seconds.update(train=round(rng.uniform(5, 9), 2), eval=round(rng.uniform(0.5, 2), 2))
        o.eval = make_eval(e.id, rng, ["check"] * bool(e.checks))
        o.status = "skipped" if i % 50 == 0 else "published"
    run.stage_seconds = {"synth": 600.0, "train": 1500.0, "eval": 300.0}
    return run, [e.id for i, e in enumerate(entries) if i in failed]


class Page(HTMLParser):
    """The page's elements checked for nesting, plus what the tests read: headers, rows, the
    failure list, buttons, images and scripts, each with its position in the page."""
    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self, text):
        super().__init__()
        self.stack, self.problems, self.pos = [], [], {}
        self.ths, self.rows, self.failures, self.buttons, self.imgs, self.scripts = [], [], [], [], [], []
        self._text = None
        self.feed(text)
        self.close()
        if self.stack:
            self.problems.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        self.pos.setdefault(f"{tag}#{a.get('id')}" if a.get("id") else tag, self.getpos())
        if tag == "th":
            self.ths.append(a)
            self._text = []
        elif tag == "tr" and "data-s" in a:
            self.rows.append({"id": a["id"], "status": a["data-s"], "cells": [], "v": []})
        elif tag == "td":
            self._text = []
            self.rows[-1]["v"].append(a.get("data-v"))
        elif tag == "li" and self.stack[-2:-1] == ["ol"]:
            self._text = []
        elif tag == "button":
            self.buttons.append(a)
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "script":
            self._text = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if self._text is None:
            return
        text, self._text = "".join(self._text), None if tag in ("th", "td", "li", "script") else self._text
        if tag == "th":
            self.ths[-1]["text"] = text
        elif tag == "td":
            self.rows[-1]["cells"].append(text)
        elif tag == "li":
            self.failures.append(text)
        elif tag == "script":
            self.scripts.append(text)

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


@pytest.mark.parametrize("n_failed", [15, 60])  # 5% (all named), then more than the console names
def test_run_summary_and_html_report_at_300_prompts(entries, cfg, tmp_path, capsys, n_failed):
    store = Store(tmp_path / "store")
    run, failed_ids = make_run(entries, cfg, n_failed)
    capsys.readouterr()
    rc = finish_report(store, run, str(MANIFEST), 2400.0, started_at=1735732800.0)
    assert rc == 1
    out = capsys.readouterr().out
    lines = out.strip().splitlines()

    # The console: bounded, one line per failure up to the cap, the rest counted, the report named.
    assert len(lines) <= MAX_CONSOLE_LINES, out
    assert len(lines) == min(n_failed, MAX_FAILURE_LINES) + (n_failed > MAX_FAILURE_LINES) + 2
    named = [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]
    assert named == failed_ids[:MAX_FAILURE_LINES]
    assert all(len(ln) <= 260 for ln in lines) and "Traceback" not in out
    if n_failed > MAX_FAILURE_LINES:
        assert f"... and {n_failed - MAX_FAILURE_LINES} more failures" in out
    else:
        assert "more failures" not in out
    path = lines[-2].removeprefix("report: ")
    assert lines[-2].startswith("report: ") and path.endswith("/report.html") and os.path.isfile(path)
    n_skipped = sum(o.status == "skipped" for o in run.outcomes())
    per_stage = f"synth {-(-n_failed // 3)}, train {(n_failed + 1) // 3}, eval {n_failed // 3}"
    assert lines[-1] == (f"{300 - n_failed - n_skipped} published, {n_skipped} unchanged, {n_failed} failed "
                         f"({per_stage}) in 40.0 min")

    # The Markdown report has every prompt, the failures before the table.
    md = open(path.replace(".html", ".md"), encoding="utf-8").read()
    assert md.index(f"**{failed_ids[-1]} failed**") < md.index("| prompt | status |")
    assert all(f"| {e.id} |" in md for e in entries)

    # The HTML report: well formed, failures first, every prompt in a sortable, filterable table.
    text = open(path, encoding="utf-8").read()
    size = len(text.encode())
    print(f"report.html at 300 prompts ({n_failed} failed): {size / 1024:.0f} KiB")
    assert size < 1_000_000
    page = Page(text)
    assert not page.problems, page.problems[:5]
    assert page.pos["h2#failures"] < page.pos["table#prompts"]
    assert len(page.failures) == n_failed
    assert [f.split()[0] for f in page.failures] == failed_ids
    stages = {o.id: o.failed_stage for o in run.outcomes()}
    assert all(f.split()[1] == f"[{stages[f.split()[0]]}]" for f in page.failures)
    assert all(len(f) < 400 for f in page.failures)  # the long error is cut in the list ...
    assert [r["cells"][0] for r in page.rows] == [e.id for e in entries]  # ... every prompt, in run order
    assert all(r["cells"][1] == r["status"] for r in page.rows)
    row = next(r for r in page.rows if stages[r["cells"][0]] == "eval")
    assert row["cells"][-1] == "[eval] " + STAGE_ERRORS["eval"]  # ... and whole in its row
    assert len(page.ths) == 13 and all(th.get("data-sort") in ("num", "text") for th in page.ths)
    assert {b.get("data-f") for b in page.buttons} == {"published", "skipped", "failed"}
    counts = {b["data-f"]: b for b in page.buttons}
    assert counts["failed"]["class"] == "s-failed"
    (script,) = page.scripts
    assert "th[data-sort]" in script and ".sort(" in script and "data-f" in script and "dataset.s" in script
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched: the page works offline
    # Distributions: a line per figure, and the three plots (the time plot a histogram at 300).
    for name in ("KL ratio", "check ratios", "synth s per prompt", "train s per prompt", "eval s per prompt"):
        assert re.search(rf"<li>{name}: median -?\d", text), name
    assert len(page.imgs) == 3 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert sorted(os.listdir(os.path.dirname(path))) == [
        "ratios.png", "report.html", "report.json", "report.md", "stage_times.png", "tokens_saved.png"]


# A minimal DOM for the page's script: what it touches of headers, buttons and rows, and no more.
DOM_JS = r"""
const page = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const classes = () => { const s = new Set(); return {contains: c => s.has(c),
  toggle: (c, on) => on ? s.add(c) : s.delete(c)}; };
const rows = page.rows.map(r => ({dataset: {s: r.status}, classList: classes(),
  cells: r.cells.map((t, i) => ({textContent: t, dataset: r.v[i] === null ? {} : {v: r.v[i]}}))}));
const tbody = {rows, appendChild(r) { rows.splice(rows.indexOf(r), 1); rows.push(r); }};
const table = {tBodies: [tbody]};
const ths = page.ths.map((a, i) => ({cellIndex: i, dataset: {sort: a['data-sort']}, closest: () => table}));
const buttons = page.buttons.map(b => ({dataset: {f: b['data-f']}, classList: classes()}));
global.document = {querySelectorAll: sel => sel === 'th[data-sort]' ? ths : sel === 'button[data-f]' ? buttons
  : sel === '#prompts tbody tr' ? rows : []};
eval(page.script);
const ids = () => rows.map(r => r.cells[0].textContent);
const col = name => page.ths.findIndex(a => a.text === name);
const out = {};
ths[col('KL ratio')].onclick(); out.kl_up = rows.map(r => r.cells[col('KL ratio')].dataset.v);
ths[col('KL ratio')].onclick(); out.kl_down = rows.map(r => r.cells[col('KL ratio')].dataset.v);
ths[col('id')].onclick(); out.by_id = ids();
const failed = buttons.find(b => b.dataset.f === 'failed');
failed.onclick(); out.shown = rows.filter(r => !r.classList.contains('hide')).map(r => r.dataset.s);
failed.onclick(); out.shown_again = rows.filter(r => !r.classList.contains('hide')).length;
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (runs the page's script)")
def test_html_table_sorts_and_filters_in_the_page_script(entries, cfg, tmp_path):
    """The page's own script, run by node over the page's 300 rows: a header click sorts by that
    column (numbers numerically, n/a first, a second click reverses), a status button filters."""
    store = Store(tmp_path / "store")
    run, failed_ids = make_run(entries, cfg, 15)
    finish_report(store, run, str(MANIFEST), 60.0, started_at=0.0)
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == "report.html"]
    page = Page(open(path, encoding="utf-8").read())
    data = {"rows": page.rows, "ths": page.ths, "buttons": page.buttons, "script": page.scripts[0]}
    res = subprocess.run(["node", "-e", DOM_JS], input=json.dumps(data), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    kl = [float(v) for v in out["kl_up"] if v]
    assert out["kl_up"][:15] == [""] * 15 and kl == sorted(kl) and len(kl) == 285
    assert out["kl_down"] == out["kl_up"][::-1]
    assert out["by_id"] == sorted(e.id for e in entries)
    assert out["shown"] == ["failed"] * 15 and out["shown_again"] == 300


def test_plan_at_300_prompts_shows_totals_and_the_odd_ones_out(entries, cfg):
    plans = make_plans(entries, cfg, status="unchanged")
    for i in (7, 150, 299):
        plans[i].status = "changed"
    plans[42].status = "new"
    plans[99].entry = plans[99].entry.model_copy(update={"overrides": {"train": {"epochs": 3}}})
    text = format_plan(plans)
    lines = text.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, text
    assert lines[0] == "plan: 300 prompts: 1 new, 3 changed, 296 unchanged"
    assert lines[-1].startswith("estimated budget for 4 prompts:")
    odd = {ln.split()[0]: ln for ln in lines[2:-2]}
    assert set(odd) == {entries[i].id for i in (7, 42, 99, 150, 299)}
    assert odd[entries[99].id].endswith("[own settings: train]") and "nothing to do" in odd[entries[99].id]
    assert odd[entries[7].id].endswith("[changed]") and "trained tokens" in odd[entries[7].id]
    assert lines[1].startswith("  prompt tokens: min ") and "not listed" in lines[-2]

    # Every prompt new: nothing stands out, so the plan is four lines.
    text = format_plan(make_plans(entries, cfg, status="new"), force=False)
    assert len(text.splitlines()) == 4 and "300 new" in text and "budget for 300 prompts" in text

    # More odd ones than the cap: the cap, then how many more.
    plans = make_plans(entries, cfg, status="unchanged")
    for p in plans[:100]:
        p.status = "changed"
    lines = format_plan(plans, force=True).splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES and "(--force: every prompt is redone)" in lines[0]
    assert f"  ... and {100 - MAX_ODD_LINES} more that differ from the rest" in lines
    assert "budget for 300 prompts" in lines[-1]


def _synth_results(entries, n_failed, low):
    results = {}
    for i, e in enumerate(entries):
        if i < n_failed:
            results[e.id] = {"error": STAGE_ERRORS["train" if i % 2 else "synth"]}
            continue
        inputs = {"kept": 48, "wanted": 48, "dropped": {"duplicate": 2, "empty": 1},
                  "below_diversity_target": i in low}
        results[e.id] = {"summary": {"inputs": inputs, "to_be_replies": 160,
                                     "conversations": {"count": 16, "agent_turns": 40}},
                         **({"skipped": True} if i % 10 == 0 else {})}
    return results


@pytest.mark.parametrize("n_failed", [15, 45])
def test_synthesis_summary_at_300_prompts(entries, n_failed):
    results = _synth_results(entries, n_failed, low={100, 200, 250})
    text = format_summaries(results)
    lines = text.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, text
    n_ok = 300 - n_failed
    reused = sum(1 for i in range(n_failed, 300) if i % 10 == 0)
    assert lines[0] == f"synthesis: 300 prompts: {n_ok - reused} done, {reused} reused, {n_failed} failed"
    assert f"inputs kept {48 * n_ok:,}/{48 * n_ok:,} (dropped {3 * n_ok:,}); replies {160 * n_ok:,}" in lines[1]
    assert f"conversations {16 * n_ok:,} with {40 * n_ok:,} agent turns" in lines[1]
    low = sorted(entries[i].id for i in (100, 200, 250))
    assert f"  3 below the input diversity target: {', '.join(low)}" in lines
    failed = sorted(e.id for e in entries[:n_failed])
    named = [ln.split()[1].rstrip(":") for ln in lines if ln.startswith("  FAILED ")]
    assert named == failed[:MAX_SUMMARY_LINES] and "Traceback" not in text
    assert (f"  ... and {n_failed - MAX_SUMMARY_LINES} more failures (every one is in the run report)" in lines) \
        == (n_failed > MAX_SUMMARY_LINES)
    assert "synth/summary.json" in lines[-1]

    # A handful of prompts keep the table, one line each.
    few = dict(list(results.items())[:5])
    assert len(format_summaries(few).splitlines()) == 6
