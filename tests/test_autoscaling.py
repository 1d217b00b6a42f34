"""Scaling from zero: the batch job on a Ray cluster whose head has no CPU and whose worker
group starts at 0 nodes (as the KubeRay manifests are), with Ray's fake multi-node autoscaler
(the provider behind `ray.cluster_utils.AutoscalingCluster`: each "node" is a raylet process
on this machine). The job must create demand the autoscaler sees, get nodes, and finish.

`AutoscalingCluster` itself is not used: its start and shutdown run `ray stop --force`, which
would kill every Ray process on this machine (other runs' clusters included), and its base
config file is not in the wheel. This cluster runs in its own temp dir (so no other
`ray.init()` finds it) on a free port, and teardown ends only the processes it started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "internalize_many.py"
VENV_BIN = Path(sys.executable).parent

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_cluster_config(gcs_address: str) -> dict:
    """The fake provider's cluster config (Ray's fake_multi_node/example.yaml, which the wheel
    lacks): worker nodes of 1 or 2 CPUs, none at the start."""
    unsupported = {"auth": {"ssh_user": "ubuntu"}, "docker": {}, "initialization_commands": [], "setup_commands": [],
                   "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                   "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
                   "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}
    return {
        "cluster_name": "genpi-scale-from-zero",
        "max_workers": 3,
        # Fake nodes are started in-process by the provider: nothing to ssh into or update.
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            # Engine actors ask for 1 CPU (the autoscaler picks the node type they fill best),
            # the training worker for 2: a 2-CPU node can only have been added for training.
            "cpu1": {"resources": {"CPU": 1, "object_store_memory": 150 * 1024**2}, "node_config": {},
                     "min_workers": 0, "max_workers": 2},
            "cpu2": {"resources": {"CPU": 2, "object_store_memory": 150 * 1024**2}, "node_config": {},
                     "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        # Nodes stay while the job runs (stages come one after another); the test ends them.
        "idle_timeout_minutes": 5,
        **unsupported,
    }


def _end(procs) -> None:
    """SIGTERM, then SIGKILL, each process this test started (by pid, checked against its
    start time so that a reused pid is never hit)."""
    import psutil

    alive = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            alive.append(p)
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=15)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def scale_from_zero(tmp_path):
    """A head with 0 CPUs and an autoscaler allowed 0-3 worker nodes of 1 CPU; yields its address."""
    import psutil
    import ray._private.services as services

    port = _free_port()
    address = f"{services.get_node_ip_address()}:{port}"
    # Short: Ray's unix socket paths live under it (107 characters at most).
    temp_dir = tempfile.mkdtemp(prefix="gp-as-", dir="/tmp")
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_fake_cluster_config(address)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), RAY_USAGE_STATS_ENABLED="0",
               # A `ray start` head turns token auth on when ~/.ray/auth_token exists, a client
               # connecting by address does not: one setting for the head, the job and the checks.
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
         f"--autoscaling-config={config}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
         "--object-store-memory=200000000", "--disable-usage-stats", "--block"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    started: dict[int, psutil.Process] = {head.pid: psutil.Process(head.pid)}

    def track() -> None:  # the head's processes and the fake nodes its autoscaler starts
        try:
            for c in psutil.Process(head.pid).children(recursive=True):
                started.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass

    try:
        deadline = time.time() + 120
        while not (Path(temp_dir) / "ray_current_cluster").exists():
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        track()
        yield {"address": address, "env": env, "track": track}
    finally:
        track()
        _end(list(started.values()))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _nodes(address: str, env: dict) -> list[dict]:
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print('NODES=' + json.dumps([{'alive': n['Alive'], 'cpu': n['Resources'].get('CPU', 0)} "
            "for n in ray.nodes()]))" % address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("NODES=")] or [r.stdout + r.stderr]
    return json.loads(line[len("NODES="):])


# The whole batch job (synthesis, Ray Train + DeepSpeed, evaluation) plus starting fake nodes:
# 2-4 min on 2 busy cores, hence `slow` (README: python -m pytest -m slow).
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_batch_job_gets_nodes_from_zero_and_finishes(scale_from_zero, tiny_model_dir, write_manifest,
                                                          tmp_path):
    cluster = scale_from_zero
    before = _nodes(cluster["address"], cluster["env"])
    assert [n["cpu"] for n in before if n["alive"]] == [0], before  # the head alone, with no CPU
    store = tmp_path / "store"
    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "cluster.synth_actors=1",
                 "cluster.cpus_per_engine_actor=1", "cluster.train_workers=1", "cluster.cpus_per_train_worker=2",
                 # Long enough for a fake node to start on a busy machine; what the k8s configs set is 600.
                 "cluster.resource_wait_s=240"]
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"])
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, str(JOB), "--manifest", str(write_manifest()), "--store",
                                str(store), *overrides], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            job.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pass
        finally:
            cluster["track"]()
            if job.poll() is None:
                job.kill()
    out = log_path.read_text(errors="replace")
    assert job.returncode == 0, out[-4000:]
    assert "1 published" in out, out[-4000:]
    after = _nodes(cluster["address"], cluster["env"])
    # Nodes were added for the engine actors (synthesis, evaluation) and for Ray Train's worker.
    assert sorted({n["cpu"] for n in after} - {0}) == [1, 2], f"worker nodes added: {after}"
    from genpi.store import Store

    assert set(Store(str(store), create=False).registry()) == {"pirate"}
