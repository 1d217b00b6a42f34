"""`ray job stop` stops the serve job with SIGTERM: the Serve app must go with it (issue 14,
defect 7). The entry point runs as a real process joined to a Ray head, as a submitted job's
driver is; the app is checked from outside (HTTP, and serve.status() from another driver).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_credentials import _stop_head  # noqa: E402
from test_internalize_many import _free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _start_head(env: dict[str, str], tmp: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", f"--temp-dir={tmp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True).returncode:
        assert proc.poll() is None and time.time() < deadline, "the Ray head did not start"
        time.sleep(1)
    return proc, address


def _driver(address: str, env: dict[str, str], code: str) -> str:
    """Run `code` in another driver joined to the cluster; its stdout."""
    code = f"import ray; from ray import serve; ray.init(address={address!r}, logging_level='ERROR')\n{code}"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _serve_apps(address: str, env: dict[str, str]) -> str:
    """The Serve applications on the cluster, as seen by another driver."""
    out = _driver(address, env, "print('APPS', sorted(serve.status().applications))")
    return next(line for line in out.splitlines() if line.startswith("APPS"))


# Serve already running on the cluster (a shared cluster, or one whose Serve an earlier job
# started): the job's app joins it, and outlives a driver that dies without deleting it.
OTHER_APP = """
serve.start(http_options={"host": "127.0.0.1", "port": %d})
@serve.deployment(ray_actor_options={"num_cpus": 0})
def other(request):
    return "other"
serve.run(other.bind(), name="other", route_prefix="/other")
"""


# A Ray head, then the app on the tiny model, in separate processes: ~1-2 min on 2 busy cores.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_deletes_the_serve_app(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    head, address = _start_head(env, tmp)
    port = _free_port()
    job = None
    try:
        _driver(address, env, OTHER_APP % port)
        job = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "serve.py"), "--store", str(tmp_path / "store"),
             f"model.name={tiny_model_dir}", "serve.host=127.0.0.1", f"serve.port={port}",
             "serve.cpus_per_replica=0.5", "serve.cpus_per_ingress=0.1"],
            env={**env, "RAY_ADDRESS": address}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
        reader.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        # Up: the entry point says so once serve.run has returned (the app is RUNNING).
        while not any(line.startswith("serving on") for line in list(lines)):
            assert job.poll() is None or reader.is_alive(), "".join(lines)[-3000:]
            assert time.time() < deadline, "the app never came up:\n" + "".join(lines)[-3000:]
            time.sleep(1)
        assert httpx.get(f"{url}/ready", timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200

        job.send_signal(signal.SIGTERM)  # what `ray job stop` sends to the entry point
        job.wait(120)
        reader.join(30)
        out = "".join(lines)
        deadline = time.time() + 60
        while True:
            try:
                status = httpx.get(f"{url}/v1/models", timeout=5).status_code
            except httpx.HTTPError:
                status = None  # nothing listens any more (Serve itself was shut down)
            if status != 200:
                break
            assert time.time() < deadline, "the app still answers after the job was stopped:\n" + out[-3000:]
            time.sleep(1)
        # Only genpi's app is deleted: another team's app on the shared cluster keeps running
        # (serve.shutdown() would have removed it too).
        apps = _serve_apps(address, env)
        assert "'genpi'" not in apps and "'other'" in apps, apps
        # Stopped as asked, app deleted: exit 0 (what `serve run` does after Ctrl-C).
        assert job.returncode == 0, out[-3000:]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        _stop_head(head)
