"""The end of a run: report files (JSON for machines, Markdown and HTML for people) and a
console summary sized for hundreds of prompts: totals, the failures, where the report is."""
from __future__ import annotations

import logging

from genpi.store import Store

log = logging.getLogger(__name__)

MAX_FAILURE_LINES = 20


def finish_report(store: Store, run, manifest: str, seconds: float, started_at: float) -> int:
    """Write the run report, print the summary; the exit status (0 all published/unchanged, 1 some failed)."""
    from genpi.eval.report import write_run_report

    outcomes = run.outcomes()
    counts = {s: sum(o.status == s for o in outcomes) for s in ("published", "skipped", "failed")}
    extra = {"started_at": started_at, "store": store.uri, "manifest": str(manifest), "counts": counts,
             "stages": run.stage_seconds}
    run_dir, text = write_run_report(store, run.plans, outcomes, seconds, run_id=run.id, extra=extra)
    if len(outcomes) <= MAX_FAILURE_LINES:
        print(text)
    report = f"{run_dir}/report.md"
    try:
        from genpi.eval.html_report import write_html_report

        report = write_html_report(store, run_dir, store.read_json(f"{run_dir}/report.json"))
    except Exception as e:  # the page is for people; its failure must not fail the run
        log.warning("HTML report not written: %s", e)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed[:MAX_FAILURE_LINES]:
        print(f"FAILED {o.id} ({o.failed_stage}): {o.error}")
    if len(failed) > MAX_FAILURE_LINES:
        print(f"... and {len(failed) - MAX_FAILURE_LINES} more failures (see the report)")
    print(f"report: {report}")
    print(f"{counts['published']} published, {counts['skipped']} unchanged, {counts['failed']} failed "
          f"in {seconds / 60:.1f} min", flush=True)
    return 0 if counts["failed"] == 0 else 1
