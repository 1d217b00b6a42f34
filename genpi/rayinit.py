"""The one place genpi starts or joins Ray (pipeline runner, Ray Train driver, Serve app)."""
from __future__ import annotations

from typing import Any

from genpi.config import ClusterConfig


def ensure_ray(cluster: ClusterConfig, **kwargs: Any) -> None:
    """Join `cluster.address`, else RAY_ADDRESS (set by `ray job submit`), else start a local
    Ray; a no-op when Ray is already initialized (a test's cluster, a notebook's)."""
    import os

    import ray

    if not ray.is_initialized():
        if not (cluster.address or os.environ.get("RAY_ADDRESS")):
            # A local Ray's processes inherit this one's environment (raylet, then each worker).
            os.environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
        ray.init(address=cluster.address, include_dashboard=False, **kwargs)


# Ray Train (v2) runs the train function on a second thread of the worker process, and glibc
# gives that thread its own malloc arena, whose 64 MB heaps are mapped and unmapped as the
# step's activations come and go: the same fp32 SmolLM2 training step took 1.3x as long on a
# second thread as on the main thread of one process (2.5x the page faults), and 1.05-1.1x
# with one arena (MALLOC_ARENA_MAX=1; bench/thread_malloc.py); README command 1's training
# ran at 127 tokens/s in its worker against 160-171 in one process. One arena for every
# thread of a local Ray's processes; a value already in the environment is kept. The KubeRay
# pods get the same value in their environment (genpi.k8s.builders).
MALLOC_ARENA_MAX = "1"


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
