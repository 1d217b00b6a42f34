"""Every benchmark that fits this machine, one after another, into one results file and table.

    python bench/run.py                     # all sections (about 3 h on 2 CPU cores)
    python bench/run.py --only efficiency,train
    python bench/run.py --update-readme     # also replace the table between the README's markers
    genpi bench ...                         # the same command

Sections, each a benchmark script run in its own process (a crash in one is recorded and
the others go on), each printing its figure next to its baseline measured in the same run:
  quality     bench/quality.py     8+ prompts x settings (losses, held-out KL epoch, diverse inputs):
                                   internalization ratios on held-out and human-written inputs, leak
  efficiency  bench/efficiency.py  tokens, prefill FLOPs, latency with vs without the prompt
  synth       bench/synth.py       batched role-play vs one call per conversation
  train       bench/train.py       packed multi-LoRA vs one adapter at a time with PEFT
  serve       bench/serve.py       adapter without prompt vs prompted base, over HTTP
  serve_autoscale  bench/serve_autoscale.py  load adds a replica, idle removes it (timeline)
  scale       bench/scale.py       the batch job over 50/100/300 real prompts (tiny model): its own
                                   overhead per prompt, first adapter, driver memory, growth (~15 min
                                   on 2 idle CPU cores: 300 prompts took 7.4 min)
GPU arms run when CUDA is present (torch.cuda.is_available()) and are written "not measured"
otherwise, saying why: no GPU on the machine that ran it, or no GPU arm for that section.
bench/gpu_check.sh runs the GPU arms with the GPU tests in one command. Results:
bench/results/<machine>.json (with the device, versions and configuration of each section)
and bench/results/<machine>.md (the table the README quotes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, environment  # noqa: E402

BENCH = REPO / "bench"
NOT_MEASURED_GPU = "not measured (no GPU on this machine)"
NO_GPU_ARM = "not measured (no GPU arm in this run)"
README_BEGIN, README_END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def sections(gpu: bool) -> dict[str, list[tuple[str, list[str]]]]:
    """{section: [(arm, argv of the script)]}; arms that need a GPU only where there is one."""
    cpu = {
        # The loss settings and the quality options (held-out KL epoch, diverse inputs), side by side.
        "quality": [("cpu", ["quality.py", "--settings", "joint,sft_pg,kl_only,val_kl,diverse"])],
        "efficiency": [("cpu", ["efficiency.py", "--device", "cpu"])],
        "synth": [("cpu", ["synth.py", "--conversations", "8", "--turns", "2", "--new-tokens", "16"])],
        "train": [("cpu", ["train.py", "--device", "cpu", "--threads", "2"])],
        "serve": [("cpu", ["serve.py", "--repeats", "2", "--max-tokens", "16"])],
        "serve_autoscale": [("cpu", ["serve_autoscale.py", "--quick"])],
        "scale": [("cpu", ["scale.py"])],
    }
    if gpu:
        cpu["efficiency"].append(("gpu", ["efficiency.py", "--device", "cuda"]))
        cpu["synth"].append(("gpu", ["synth.py", "--device", "cuda", "--model", "qwen2-0.5b-random",
                                     "--conversations", "64", "--turns", "3", "--new-tokens", "64"]))
        cpu["train"].append(("gpu", ["train.py", "--device", "cuda"]))
    return cpu


def run_arm(argv: list[str], log_dir: Path, name: str) -> dict:
    """Run one script with --out in a fresh folder; its one JSON file is the result."""
    with tempfile.TemporaryDirectory(prefix=f"genpi-bench-{name}-") as out:
        cmd = [sys.executable, str(BENCH / argv[0]), *argv[1:], "--out", out]
        log = log_dir / f"{name}.log"
        print(f"\n=== {name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.time()
        with open(log, "wb") as f:
            # The script's own output goes to the terminal and the log as it comes (progress
            # bars redraw with \r, so it is copied in chunks, not lines).
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            while chunk := os.read(proc.stdout.fileno(), 4096):  # type: ignore[union-attr]
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                f.write(chunk)
            rc = proc.wait()
        secs = time.time() - t0
        files = sorted(Path(out).glob("*.json"))
        if rc != 0 or not files:
            return {"status": "failed", "returncode": rc, "seconds": secs, "log": str(log)}
        return {"status": "measured", "seconds": secs, "command": " ".join(argv),
                "result": json.loads(files[-1].read_text())}


def _f(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def throughput_rows(res: dict) -> list[str]:
    rows = ["| benchmark | arm | figure | baseline | ratio |", "|---|---|---|---|---|"]
    secs = res["sections"]
    env = res["environment"]
    for arm in ("cpu", "gpu"):
        s = secs.get("synth", {}).get(arm)
        if s and s["status"] == "measured":
            r = s["result"]
            rows.append(f"| synthesis: role-play tokens/s ({r['model']}, {r['config']['conversations']} conversations) | {arm} "
                        f"| batched {r['arms']['batched']['tokens_per_s']} | one call per conversation "
                        f"{r['arms']['serial']['tokens_per_s']} | **{r['ratio_batched_over_serial']:.2f}x** |")
        else:
            rows.append(f"| synthesis: role-play tokens/s | {arm} | {_status(s, arm, env)} | | |")
        t = secs.get("train", {}).get(arm)
        if t and t["status"] == "measured":
            r = t["result"]
            extra = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            rows.append(f"| training: adapters/hour ({r['adapters']} adapters, {r['model']}) | {arm} "
                        f"| packed {r['packed']['adapters_per_hour']:.0f} ({r['packed']['tokens_per_s']:.0f} tokens/s{extra}) "
                        f"| PEFT one at a time {r['peft_one_by_one']['adapters_per_hour']:.0f} "
                        f"| **{r['ratio_adapters_per_hour']:.2f}x** |")
        else:
            rows.append(f"| training: adapters/hour | {arm} | {_status(t, arm, env)} | | |")
        v = secs.get("serve", {}).get(arm)
        if v and v["status"] == "measured":
            for kind, p in v["result"]["prompts"].items():
                a = p["arms"]
                rr = p["ratios_adapter_over_prompted"]
                rows.append(f"| serving: time to first token, {p['id']} ({p['prompt_tokens']}-token prompt) | {arm} "
                            f"| adapter, no prompt {a['adapter_no_prompt']['ttft_ms_p50']:.0f} ms "
                            f"| prompted base {a['prompted_base']['ttft_ms_p50']:.0f} ms | **{rr['ttft']:.2f}x** "
                            f"(input tokens {rr['input_tokens']:.2f}x) |")
        elif arm == "gpu":
            rows.append(f"| serving (vLLM multi-LoRA, prefix caching) | gpu | {_status(v, arm, env)} | | |")
        else:
            rows.append(f"| serving | {arm} | {_status(v, arm, env)} | | |")
    return rows


def _status(s: dict | None, arm: str, env: dict) -> str:
    """A section arm's cell when it has no figure. A missing GPU arm says "no GPU on this
    machine" only when the run detected none (environment()'s gpu, from torch.cuda)."""
    if s is None:
        if arm != "gpu":
            return "not run"
        return NOT_MEASURED_GPU if not env.get("gpu") else NO_GPU_ARM
    return f"failed (see {Path(s['log']).name})" if s["status"] == "failed" else s["status"]


def markdown(res: dict) -> str:
    env = res["environment"]
    gpu = env["gpu"] or "no GPU"
    v = env["versions"]
    lines = [f"Measured {env['measured_at']} on `{env['machine']}` ({env['cpu_cores']} CPU cores, {gpu}; "
             f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, ray {v['ray']}) by "
             f"`python bench/run.py`; raw figures in `bench/results/{env['machine']}.json`.", ""]
    q = res["sections"].get("quality", {}).get("cpu")
    lines.append("**Quality** (internalization ratio: 1 = as good as the prompted model, 0 = no better than "
                 "the model without the prompt; leak: share of the prompt recited under extraction probes)")
    lines.append("")
    if q and q["status"] == "measured":
        from quality import table as quality_table  # noqa: PLC0415

        r = q["result"]
        lines.append(quality_table(r))
        best = r["summary"]["best"]
        if best:
            lines += ["", f"Best loss setting by mean KL ratio on this run: **{r['settings'][best]['label']}**."]
    else:
        lines.append(f"quality: {_status(q, 'cpu', env)}")
    lines += ["", "**Efficiency** per prompt length (adapter without the prompt vs base with it, batch 1)", ""]
    for arm in ("cpu", "gpu"):
        e = res["sections"].get("efficiency", {}).get(arm)
        if e and e["status"] == "measured":
            from efficiency import table as efficiency_table  # noqa: PLC0415

            lines += [f"{arm.upper()} ({e['result']['model']}):", "", efficiency_table(e["result"]), ""]
        else:
            lines += [f"{arm.upper()}: {_status(e, arm, env)}", ""]
    lines += ["**Throughput** (each against its baseline, measured side by side in the same run)", ""]
    lines += throughput_rows(res)
    lines += ["", "**Scale** (the batch job over N real system prompts of S-IFEval on a tiny random model, so "
                  "that what is measured is the job itself; model time is subtracted for the overhead)", ""]
    s = res["sections"].get("scale", {}).get("cpu")
    if s and s["status"] == "measured":
        from scale import table as scale_table  # noqa: PLC0415

        lines.append(scale_table(s["result"]))
    else:
        lines.append(f"scale: {_status(s, 'cpu', env)}")
    return "\n".join(lines)


def update_readme(md: str, readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: markers {README_BEGIN} / {README_END} not found; add them where the table goes")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{md}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated sections (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of the existing results file that this run does not measure")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    plan = sections(gpu)
    chosen = args.only.split(",") if args.only else list(plan)
    unknown = set(chosen) - set(plan)
    if unknown:
        ap.error(f"--only: unknown section(s) {sorted(unknown)}; known: {', '.join(plan)}")
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{env['machine']}.json"
    res = {"environment": env, "sections": {}}
    if args.merge and path.exists():
        res["sections"] = json.loads(path.read_text()).get("sections", {})
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    for name in chosen:
        res["sections"][name] = {arm: run_arm(argv, log_dir, f"{name}-{arm}") for arm, argv in plan[name]}
        path.write_text(json.dumps(res, indent=2))  # after every section: a crash keeps what finished
    md = markdown(res)
    (args.out / f"{env['machine']}.md").write_text(md + "\n")
    print("\n" + md)
    print(f"\nwritten: {path} and {path.with_suffix('.md')}")
    if args.update_readme:
        update_readme(md)
        print("README.md table updated")
    failed = [f"{n}-{a}" for n, arms in res["sections"].items() for a, s in arms.items() if s["status"] != "measured"]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
