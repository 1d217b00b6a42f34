"""The end of a run: report files (JSON for machines, Markdown and HTML for people) and a
console summary sized for hundreds of prompts: totals, the failures, where the report is."""
from __future__ import annotations

import logging
from collections import Counter

from genpi.pipeline.records import STAGES
from genpi.store import Store

log = logging.getLogger(__name__)

# The console names at most this many failures, one line each; the report has every one.
MAX_FAILURE_LINES = 20
# Runs this small print their whole Markdown report (a few lines per prompt); larger ones only
# the summary, so that the outcome is not buried under hundreds of lines.
MAX_PRINTED_REPORT = 5
# A failure's console line is cut here (a traceback or a long error must not flood the console).
ERROR_CHARS = 200


def one_line(error: str | None, limit: int = ERROR_CHARS) -> str:
    """An error as one console line: its first line, cut at `limit` characters."""
    first = (error or "").strip().splitlines()[0] if (error or "").strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def format_finish(outcomes, report: str, seconds: float) -> str:
    """The console summary of a finished run: the failures (at most MAX_FAILURE_LINES of them,
    then how many more), where the report is, and the totals, last so that they are seen."""
    counts = Counter(o.status for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    lines = [f"FAILED {o.id} ({o.failed_stage}): {one_line(o.error)}" for o in failed[:MAX_FAILURE_LINES]]
    if len(failed) > MAX_FAILURE_LINES:
        lines.append(f"... and {len(failed) - MAX_FAILURE_LINES} more failures (every one is in the report)")
    lines.append(f"report: {report}")
    by_stage = Counter(o.failed_stage or "?" for o in failed)
    stages = f" ({', '.join(f'{s} {n}' for s, n in by_stage.items())})" if failed else ""
    lines.append(f"{counts['published']} published, {counts['skipped']} unchanged, {counts['failed']} failed"
                 f"{stages} in {seconds / 60:.1f} min")
    return "\n".join(lines)


def run_figures(run, started_at: float) -> dict:
    """The scale figures of a run: the driver's peak memory (genpi.procmem), the
    seconds inside model calls per stage summed over prompts, and the seconds from the run's
    start to its first publish (None when it published nothing)."""
    from genpi.procmem import peak_rss_mb

    model = {s: round(sum(o.model_seconds.get(s, 0.0) for o in run.outcomes()), 2) for s in STAGES}
    first = run.first_published_at
    return {"driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "model_seconds": model,
            "first_published_s": round(first - started_at, 2) if first is not None else None}


def finish_report(store: Store, run, manifest: str, seconds: float, started_at: float) -> int:
    """Write the run report, print the summary; the exit status (0 all published/unchanged, 1 some failed)."""
    from genpi.eval.report import write_run_report

    outcomes = run.outcomes()
    counts = {s: sum(o.status == s for o in outcomes) for s in ("published", "skipped", "failed")}
    extra = {"started_at": started_at, "store": store.uri, "manifest": str(manifest), "counts": counts,
             "stages": run.stage_seconds, **run_figures(run, started_at)}
    run_dir, text = write_run_report(store, run.plans, outcomes, seconds, run_id=run.id, extra=extra)
    if len(outcomes) <= MAX_PRINTED_REPORT:
        print(text)
    report = f"{run_dir}/report.md"
    try:
        from genpi.eval.html_report import write_html_report

        report = write_html_report(store, run_dir, store.read_json(f"{run_dir}/report.json"))
    except Exception as e:  # the page is for people; its failure must not fail the run
        log.warning("HTML report not written: %s", e)
    print(format_finish(outcomes, report, seconds), flush=True)
    return 0 if counts["failed"] == 0 else 1
