"""cluster/local-cluster.sh: a head and two worker nodes on 127.0.0.1, the real batch job
submitted with `ray job submit` and cluster/runtime_env.yaml, and every process stopped.

The head has no CPUs for tasks, so every actor and task of the job ran on the two worker
nodes. Ports are picked free by the script and its Ray folder is private, so this runs
beside the test session's own local Ray without touching it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from genpi.store import Store

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-cluster.sh"
TINY = ["synth.n_train_inputs=4", "synth.n_heldout_inputs=2", "synth.max_input_rounds=1",
        "synth.reply_max_new_tokens=12", "synth.roleplay_conversations=0", "synth.n_pg_examples=2",
        "train.epochs=1", "train.batch_size=2", "eval.max_new_tokens=8", "eval.latency_repeats=1",
        "engine.top_k_logprobs=5"]


def _run(command: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHON": sys.executable,
           # The job's processes reuse the test session's model cache and compiled extensions.
           "GENPI_CACHE": os.environ.get("GENPI_CACHE", str(REPO / ".cache" / "genpi")),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(["bash", str(SCRIPT), "--workers", "2", "--", *command], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script's trap must get to stop the cluster.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=90)
        pytest.fail(f"local-cluster.sh ran past {timeout} s; its output:\n{(stdout + stderr)[-4000:]}")
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    text = out.stdout + out.stderr
    m = re.search(r"temp folder (/tmp/genpi-ray\.\w+)", text)
    assert m, text[-3000:]
    return out, m.group(1)


def _assert_all_stopped(tmp: str, text: str) -> None:
    assert "3 nodes up on 127.0.0.1" in text, text[-3000:]
    deadline = time.time() + 10
    while True:
        left = subprocess.run(["pgrep", "-f", "--", tmp], capture_output=True, text=True).stdout.split()
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes of the local cluster still running: {left}"
    assert not Path(tmp).exists(), f"{tmp} was not removed"


def test_local_cluster_stops_everything_when_the_command_fails():
    out, tmp = _run(["bash", "-c", 'test -n "$RAY_DASHBOARD_ADDRESS" && exit 3'], timeout=150)
    assert out.returncode == 3, (out.stdout + out.stderr)[-3000:]
    _assert_all_stopped(tmp, out.stdout + out.stderr)


@pytest.mark.slow
def test_local_cluster_runs_the_batch_job_across_worker_nodes(tmp_path):
    store = tmp_path / "store"
    job = ["python", "jobs/internalize_many.py", "--manifest", "examples/prompts/french.yaml",
           "--config", "cluster/configs/cpu-dev.yaml", "--store", str(store), *TINY]
    out, tmp = _run(["bash", "-c", 'exec ray job submit --address "$RAY_DASHBOARD_ADDRESS" '
                                   '--runtime-env cluster/runtime_env.yaml -- "$@"', "submit", *job], timeout=480)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "succeeded" in text
    registry = Store(store, create=False).registry()
    assert "french" in registry, registry
    fp = registry["french"]["fingerprint"] if isinstance(registry["french"], dict) else registry["french"]
    pdir = store / "prompts" / "french" / fp
    assert (pdir / "DONE").is_file() and (pdir / "adapter" / "adapter_config.json").is_file()
    _assert_all_stopped(tmp, text)
