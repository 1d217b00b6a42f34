"""The HTML run report: written through a real Store, parsed back with the stdlib HTML parser."""
from __future__ import annotations

import base64
import os
import shutil
from html.parser import HTMLParser

import pytest

from genpi.eval.html_report import write_html_report
from genpi.eval.result import EvalResult
from genpi.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = 'CUDA out of memory <script>alert("x")</script> & more'


def _eval(kl, agree, saved, share, leak=0.1, checks=None):
    """The eval record as report.json embeds it (EvalResult.to_json)."""
    return EvalResult(
        prompt_id="x", n_heldout=8,
        metrics={"kl": {"teacher": 0.0, "base": 1.2, "adapter": 0.3, "ratio": kl},
                 "agreement": {"teacher": 1.0, "base": 0.2, "adapter": 0.7, "ratio": agree}},
        checks={name: {"teacher": 1.0, "base": 0.0, "adapter": r, "ratio": r} for name, r in (checks or {}).items()},
        efficiency={"input_tokens_saved_per_request": saved, "input_tokens_with_prompt": None if saved is None else saved + 20,
                    "input_tokens_without_prompt": 20, "input_tokens_saved_share": share},
        leak=None if leak is None else {"adapter": leak, "base": 0.0, "teacher": 0.9}).to_json()


def _old_eval(kl, saved, share, checks):
    """An evaluation as report.json files written before the typed record hold it: checks
    as "check:NAME" under metrics (such reports stay readable)."""
    metrics = {"kl": {"teacher": 0.0, "base": 1.2, "adapter": 0.3, "ratio": kl, "tokens": 40},
               "agreement": {"teacher": 1.0, "base": 0.2, "adapter": 0.7, "ratio": 0.4}}
    for name, r in checks.items():
        metrics[f"check:{name}"] = {"teacher": 1.0, "base": 0.0, "adapter": r, "ratio": r}
    return {"prompt_id": "x", "n_heldout": 8, "metrics": metrics,
            "efficiency": {"input_tokens_saved_per_request": saved, "input_tokens_with_prompt": saved + 20,
                           "input_tokens_without_prompt": 20, "input_tokens_saved_share": share},
            "leak": {"adapter": 0.1, "base": 0.0, "teacher": 0.9}, "samples": [], "leak_samples": []}


def _prompt(pid, status, ev, tokens, seconds=None, error=None, stage=None):
    return {"id": pid, "status": status, "fingerprint": "f" * 16, "error": error, "failed_stage": stage,
            "prompt_tokens": tokens, "seconds": seconds if seconds is not None else {}, "eval": ev}


def make_report():
    none_metrics = _eval(None, None, None, None, leak=None)
    del none_metrics["leak"]
    prompts = [
        _prompt("french", "published", _eval(0.8123, 0.654, 412.0, 0.9312, checks={"lang": 0.75}), 430,
                {"synth": 12.5, "train": 60.25, "eval": 8.0}),
        _prompt("pirate", "published", _eval(1.05, 0.9, 200.4, 0.8, checks={"arr": 0.5, "len": -0.2}), 215,
                {"synth": 10.0, "train": 40.0, "eval": 6.0}),
        _prompt("json-only", "published", _eval(-0.1, 0.3, 95.0, 0.61), 110, {"synth": 5.0, "train": 20.0}),
        _prompt("old", "skipped", _old_eval(0.5, 50.0, 0.5, checks={"tone": 0.25}), 60),
        _prompt("<b>bad</b>", "failed", None, 300, {"synth": 3.0}, error=EVIL, stage="train"),
        _prompt("empty", "published", none_metrics, None, {"synth": 1.0, "train": 2.0, "eval": 0.5}),
    ]
    return {"run_id": "20250101-120000-abc123", "started_at": 1735732800.0, "seconds": 3723.0,
            "store": "/tmp/store", "manifest": "examples/prompts",
            "counts": {"published": 4, "skipped": 1, "failed": 1},
            "stages": {"synth": 31.5, "train": 122.25, "eval": 14.5}, "prompts": prompts}


class Page(HTMLParser):
    """Table rows (cell texts), <img> sources, script bodies and notes of a page."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.header, self.imgs, self.scripts, self.notes, self.starttags = [], [], [], [], [], []
        self._cell = self._row = self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.starttags.append(tag)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "script" or (tag == "p" and a.get("class") == "note"):
            self._in, self._cell = tag, []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            if self.header:
                self.rows.append(self._row)
            else:
                self.header = self._row
        elif tag in ("script", "p") and self._in == tag:
            (self.scripts if tag == "script" else self.notes).append("".join(self._cell))
            self._in = self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_full_report(tmp_path):
    store = Store(tmp_path / "store")
    run_dir = store.path("runs", "r1")
    report = make_report()
    path = write_html_report(store, run_dir, report)
    assert path == f"{run_dir}/report.html"
    text = open(path, encoding="utf-8").read()
    page = Page(text)

    # One row per prompt, in order, with its status and formatted numbers.
    col = {h.strip(): i for i, h in enumerate(page.header)}
    assert len(page.rows) == 6
    rows = {r[col["id"]]: r for r in page.rows}
    assert list(rows) == [p["id"] for p in report["prompts"]]
    assert [r[col["status"]] for r in page.rows] == [p["status"] for p in report["prompts"]]
    fr = rows["french"]
    assert (fr[col["KL ratio"]], fr[col["agreement ratio"]]) == ("0.81", "0.65")
    assert fr[col["check ratios"]] == "lang 0.75"
    assert (fr[col["tokens saved / request"]], fr[col["saved share"]]) == ("412", "93%")
    assert (fr[col["leak (adapter)"]], fr[col["prompt tokens"]]) == ("0.10", "430")
    assert (fr[col["synth s"]], fr[col["train s"]], fr[col["eval s"]]) == ("12.5", "60.2", "8.0")
    assert rows["pirate"][col["check ratios"]] == "arr 0.50, len -0.20"
    assert rows["json-only"][col["KL ratio"]] == "-0.10" and rows["json-only"][col["eval s"]] == "n/a"
    assert rows["empty"][col["KL ratio"]] == rows["empty"][col["leak (adapter)"]] == "n/a"
    assert rows["empty"][col["check ratios"]] == "-"
    old = rows["old"]  # a report written before the typed eval record
    assert (old[col["KL ratio"]], old[col["agreement ratio"]], old[col["check ratios"]]) == ("0.50", "0.40", "tone 0.25")
    assert (old[col["tokens saved / request"]], old[col["saved share"]]) == ("50", "50%")
    failed = rows["<b>bad</b>"]
    assert failed[col["error"]] == "[train] " + EVIL and failed[col["KL ratio"]] == "n/a"
    assert all(r[col["error"]] == "" for pid, r in rows.items() if pid != "<b>bad</b>")

    # User text is escaped: it is data, never markup; the only script is the page's own sorter.
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "<b>bad" not in text and "b" not in page.starttags
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]
    assert "20250101-120000-abc123" in text and "2025-01-01 12:00:00 UTC" in text and "1h 02m 03s" in text

    # Three embedded PNGs, identical to the files written next to the page.
    assert len(page.imgs) == 3 and not page.notes
    for src, name in zip(page.imgs, ("ratios", "tokens_saved", "stage_times")):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
        with open(f"{run_dir}/{name}.png", "rb") as f:
            assert f.read() == png
    assert sorted(os.listdir(run_dir)) == ["ratios.png", "report.html", "stage_times.png", "tokens_saved.png"]

    if os.environ.get("GENPI_REPORT_EXAMPLE"):  # keep one example set for people to look at
        shutil.copytree(run_dir, os.environ["GENPI_REPORT_EXAMPLE"], dirs_exist_ok=True)


@pytest.mark.parametrize("with_stages", [False, True])
def test_all_failed_report_has_notes_instead_of_plots(tmp_path, with_stages):
    store = Store(tmp_path / "store")
    run_dir = store.path("runs", "r2")
    prompts = [_prompt(f"p{i}", "failed", None, 100 + i, error=f"boom {i}", stage="synth") for i in range(3)]
    report = {"run_id": "r2", "started_at": None, "seconds": None, "store": "s", "manifest": "m",
              "counts": {"published": 0, "skipped": 0, "failed": 3},
              "stages": {"synth": 4.0, "train": None} if with_stages else {}, "prompts": prompts}
    page = Page(open(write_html_report(store, run_dir, report), encoding="utf-8").read())
    assert [r[1] for r in page.rows] == ["failed"] * 3
    assert [r[-1] for r in page.rows] == [f"[synth] boom {i}" for i in range(3)]
    files = sorted(os.listdir(run_dir))
    if with_stages:  # the stage bar chart still has something to show
        assert len(page.imgs) == 1 and len(page.notes) == 2
        assert files == ["report.html", "stage_times.png"]
    else:
        assert not page.imgs and len(page.notes) == 3
        assert files == ["report.html"]
    assert all("no plot" in n for n in page.notes)
    assert page.notes[0].startswith("Internalization ratios") and "no evaluated prompts" in page.notes[0]
