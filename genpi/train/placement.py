"""Where training workers go: their CPUs, whether the cluster can hold them, how long Ray
Train may wait for them (Ray-free)."""
from __future__ import annotations

import math
import os


def split_cpus(node_cpus: list[float], workers: int) -> float:
    """CPUs per training worker when the config leaves it unset: as many as possible while
    all `workers` still fit on the cluster's nodes (every CPU of the largest node for one
    worker; half of it for two workers on one node); at least 1 (a cluster scaling from
    zero has no worker node yet)."""
    for c in range(int(max(node_cpus, default=0)), 0, -1):
        if sum(int(n) // c for n in node_cpus) >= workers:
            return float(c)
    return 1.0


def train_resource_problem(node_res: list[dict], workers: int, cpus: float, gpus: float) -> str | None:
    """Why `workers` training workers of `cpus` CPU and `gpus` GPU each cannot all be placed on
    these nodes (Ray `Resources` dicts of the alive nodes), or None when they can."""
    fit = sum(min(int(r.get("CPU", 0) // cpus) if cpus else workers,
                  int(r.get("GPU", 0) // gpus) if gpus else workers) for r in node_res)
    if fit >= workers:
        return None
    return (f"training needs {workers} worker(s) with {cpus:g} CPU and {gpus:g} GPU each "
            f"(cluster.train_workers, cluster.cpus_per_train_worker, cluster.gpus_per_train_worker), but the "
            f"Ray cluster's nodes hold {fit}; on an autoscaling cluster set cluster.resource_wait_s to wait "
            "for new nodes")


def controller_failure_limit(resource_wait_s: float, start_timeout_s: float | None = None) -> int:
    """Ray Train's retries of a worker group that did not start (FailureConfig.controller_failure_limit).

    Ray Train waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) for the workers' placement
    group, then retries, by default forever: a job asking for workers the cluster can never
    hold would hang. Retry for about cluster.resource_wait_s (the time an autoscaler gets to
    add nodes) and then fail, as synthesis and evaluation do."""
    if start_timeout_s is None:
        start_timeout_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return math.ceil(resource_wait_s / max(start_timeout_s, 1e-9)) if resource_wait_s > 0 else 0
