"""The one place genpi starts or joins Ray (pipeline runner, Ray Train driver, Serve app)."""
from __future__ import annotations

from typing import Any

from genpi.config import ClusterConfig


def ensure_ray(cluster: ClusterConfig, **kwargs: Any) -> None:
    """Join `cluster.address`, else RAY_ADDRESS (set by `ray job submit`), else start a local
    Ray; a no-op when Ray is already initialized (a test's cluster, a notebook's)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cluster.address, include_dashboard=False, **kwargs)


def node_cpus() -> float:
    """CPUs of the largest alive node of the joined Ray cluster (0 when it has none)."""
    import ray

    return max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def actor_cpus(value: float | None) -> float:
    """CPUs to give one engine actor or training worker: `value` when the config sets one,
    else every CPU of the largest node (at least 1: a cluster scaling from zero has no
    worker node yet, and its configs set explicit sizes)."""
    if value is not None:
        return value
    return max(1.0, node_cpus())


def use_assigned_cpus() -> int:
    """Inside a Ray actor or task: run torch with as many threads as CPUs Ray assigned it
    (capped by the cores this process may use), and return that number.

    Ray sets OMP_NUM_THREADS from the assigned CPUs only when the environment has none:
    an image or pod that sets OMP_NUM_THREADS=1 would otherwise leave a 4-CPU engine actor
    on one thread. Ray's logical CPUs can exceed the cores (a test cluster, an overcommitted
    node), and more threads than cores only makes each step wait for the others."""
    import math
    import os

    import ray
    import torch

    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(math.floor(assigned), cores))
    torch.set_num_threads(threads)
    return threads
