"""Credentials never travel in a Ray runtime_env (issue 14, defect 6).

runtime_env env_vars are shown by the dashboard, by `ray list runtime-envs --detail` and in
Ray's logs; docs/deploy.md promises credentials only in a Secret. Workers read them from
their own environment (the pod's Secret; here the Ray head's environment) or from a
credentials file whose path is forwarded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from genpi.store import SECRET_ENV, Store, worker_env

sys.path.insert(0, str(Path(__file__).parent))
from test_internalize_many import PROMPTS, SMALL, _free_port  # noqa: E402
from test_internalize_many import write_manifest as write_manifest_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "internalize_many.py"


def _secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {"AWS_ACCESS_KEY_ID": f"AKIAGENPI{tag.upper()}", "AWS_SECRET_ACCESS_KEY": f"genpi-secret-{tag}",
            "AWS_SESSION_TOKEN": f"genpi-session-token-{tag}", "HF_TOKEN": f"hf_genpi_{tag}"}


def test_worker_env_forwards_settings_never_credentials(monkeypatch, tmp_path):
    secrets = _secrets()
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "GENPI_CACHE": str(tmp_path / "cache")}
    for k, v in {**secrets, **settings}.items():
        monkeypatch.setenv(k, v)
    env = worker_env()
    assert env == {**{k: v for k, v in env.items() if k not in settings}, **settings}
    assert set(secrets) <= set(SECRET_ENV)
    text = json.dumps(env)
    for k, v in secrets.items():
        assert k not in env and v not in text, k


def _start_head(env: dict[str, str], tmp: str) -> tuple[subprocess.Popen, str, str]:
    port, dash = _free_port(), _free_port()
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=2).status_code == 200:
                return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "the Ray head did not start"
        time.sleep(1)


def _stop_head(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _everything_ray_recorded(dash: str) -> str:
    """Every runtime_env the cluster knows of, as text: the runtime-env agent's table
    (`ray list runtime-envs --detail`), and those of every job, task and actor (the dashboard)."""
    from ray.util import state

    parts = [state.list_runtime_envs(address=dash, detail=True, limit=10000, raise_on_missing_output=False),
             state.list_jobs(address=dash, detail=True, limit=10000, raise_on_missing_output=False),
             state.list_tasks(address=dash, detail=True, limit=10000, raise_on_missing_output=False),
             state.list_actors(address=dash, detail=True, limit=10000, raise_on_missing_output=False)]
    return json.dumps(parts, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o))


# A Ray head with its dashboard, then the whole job on the tiny model: ~2-3 min on 2 busy cores.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_batch_job_on_s3_puts_no_secret_in_any_runtime_env(s3_server, tmp_path, tiny_model_dir):
    secrets = _secrets()
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *SECRET_ENV)}
    base.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    # Every process has the environment of a KubeRay pod: the credentials from the Secret,
    # the endpoint from a ConfigMap. The head's workers inherit it, as a worker pod's do.
    pod_env = {**base, **secrets, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    head, address, dash = _start_head(pod_env, tmp)
    try:
        manifest = write_manifest_file(tmp_path / "prompts.yaml", {"pirate": PROMPTS["pirate"]})
        driver_env = {**pod_env, "RAY_ADDRESS": address}
        r = subprocess.run([sys.executable, str(JOB), "--manifest", str(manifest), "--store", "s3://genpi-test/store",
                            f"model.name={tiny_model_dir}", *SMALL], env=driver_env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=720)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        recorded = _everything_ray_recorded(dash)
        # The inspection sees the job's runtime envs: the forwarded endpoint is in them.
        assert s3_server in recorded, "no runtime_env with the forwarded settings was found"
        logs = [p for p in Path(tmp).rglob("*") if p.is_file()]
        assert logs
        for name, value in secrets.items():
            assert value not in recorded, f"{name} is in a runtime_env"
            leaked = [str(p) for p in logs if value.encode() in p.read_bytes()]
            assert not leaked, f"{name} written to Ray's files: {leaked[:5]}"
    finally:
        _stop_head(head)
    # Workers wrote the store with the credentials from their own environment.
    os.environ.update({**secrets, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"})
    s3 = Store("s3://genpi-test/store", create=False)  # the s3_server fixture restores the environment
    pdir = s3.prompt_dir("pirate", s3.registry()["pirate"]["fingerprint"])
    for rel in ("DONE", "adapter/adapter_model.safetensors", "synth/to_be.parquet"):
        assert s3.exists(f"{pdir}/{rel}"), rel
