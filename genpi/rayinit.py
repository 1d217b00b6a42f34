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
