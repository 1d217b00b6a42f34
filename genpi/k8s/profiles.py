"""The inputs of the manifests, all package data: deployment profiles (profiles.yaml), the
genpi config of each profile (configs/*.yaml), the default prompts (prompts/), and the
versions of genpi and of the Ray it pins (package metadata, so nothing copies pyproject).

Pod sizes are computed here from the profile's genpi config (`cluster` and `serve` sections)
and the profile's shape (actors per pod, memory per CPU), so there is one source for them.
"""
from __future__ import annotations

import functools
import math
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field

from genpi.config import GenpiConfig, load_config

# Package data is read beside this file: pip installs wheels unzipped, so this is a real
# folder in a checkout and in site-packages alike.
DATA = Path(__file__).resolve().parent
CONFIGS = DATA / "configs"
DEFAULT_PROMPTS = DATA / "prompts"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadSize(_Strict):
    cpu: str
    memory: str


class WorkerShape(_Strict):
    actors_per_pod: int = Field(ge=1)
    extra_cpus: float = Field(ge=0)
    memory_gib_per_cpu: float = Field(gt=0)


class ObjectStore(_Strict):
    # Ray refuses an object store above 80% of the node's memory.
    fraction: float = Field(gt=0, le=0.8)
    shm_headroom_mib: int = Field(ge=0)


class Profile(_Strict):
    config: str
    head: HeadSize
    worker: WorkerShape
    max_workers: int = Field(ge=1)
    idle_timeout_s: int = Field(ge=0)
    ttl_s: int = Field(ge=1)
    deadline_s: int = Field(ge=1)
    image_tag_suffix: str = ""
    endpoint: str | None = None


class Profiles(_Strict):
    image: str
    base_profile: str
    overlays: list[str]
    object_store: ObjectStore
    job_env_vars: dict[str, str]
    profiles: dict[str, Profile]


@functools.lru_cache(maxsize=1)
def profiles() -> Profiles:
    path = DATA / "profiles.yaml"
    try:
        p = Profiles.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    missing = {p.base_profile, *p.overlays} - set(p.profiles)
    if missing:
        raise ValueError(f"{path}: no profile named {', '.join(sorted(missing))}")
    return p


def profile(name: str) -> Profile:
    return profiles().profiles[name]


# ---------------------------------------------------------------------------------------------
# Versions, from the installed package's metadata


@functools.lru_cache(maxsize=1)
def genpi_version() -> str:
    try:
        return metadata.version("genpi")
    except metadata.PackageNotFoundError:
        raise RuntimeError("genpi is not installed (pip install .): the image tag and the Ray version "
                           "come from its package metadata") from None


@functools.lru_cache(maxsize=1)
def ray_version() -> str:
    """The Ray version genpi pins (`ray[...]==X` in its requirements), for `rayVersion`."""
    genpi_version()  # the same clear error when genpi is not installed
    for req in metadata.requires("genpi") or []:
        if "extra ==" in req:  # the gpu extra repeats the pin; the core requirement decides
            continue
        m = re.match(r"^\s*ray\s*(\[[^\]]*\])?\s*==\s*([^\s;,]+)", req)
        if m:
            return m.group(2)
    raise RuntimeError("genpi's package metadata pins no Ray version (ray==X in its dependencies)")


def image_tag(name: str) -> str:
    return genpi_version() + profile(name).image_tag_suffix


def image(name: str) -> str:
    return f"{profiles().image}:{image_tag(name)}"


# ---------------------------------------------------------------------------------------------
# The genpi config of a profile; `configs` maps a config name to a file that replaces the
# packaged one (`genpi k8s --config gpu=my-gpu.yaml`).


def config_path(name: str, configs: Mapping[str, Path] | None = None) -> Path:
    """The genpi config file profile `name` runs with."""
    cname = profile(name).config
    return Path(configs[cname]) if configs and cname in configs else CONFIGS / f"{cname}.yaml"


def config_names() -> list[str]:
    return sorted({p.config for p in profiles().profiles.values()})


def profile_config(name: str, configs: Mapping[str, Path] | None = None) -> GenpiConfig:
    return load_config(config_path(name, configs))


def config_text(name: str, configs: Mapping[str, Path] | None = None) -> str:
    return config_path(name, configs).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Pod sizes from the config


def _cpu(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{round(n * 1000)}m"


def _memory(gib: float) -> str:
    mib = round(gib * 1024)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def memory_mib(quantity: str) -> int:
    """MiB in a Kubernetes memory quantity written the way profiles and _memory write it (Gi, Mi)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", quantity)
    if not m:
        raise ValueError(f"memory '{quantity}': write it in Gi or Mi (e.g. 8Gi, 6144Mi)")
    return round(float(m.group(1)) * (1024 if m.group(2) == "Gi" else 1))


def object_store(memory: str) -> tuple[int, str]:
    """(object-store-memory in bytes, /dev/shm sizeLimit) of a pod whose memory limit is
    `memory`: one number for both, so the object store always fits in /dev/shm (profiles.yaml)."""
    o = profiles().object_store
    mib = int(memory_mib(memory) * o.fraction)
    return mib * 1024 * 1024, f"{mib + o.shm_headroom_mib}Mi"


def actor_size(cfg: GenpiConfig) -> tuple[float, float]:
    """(CPUs, GPUs) of the largest actor the config asks for: engine actors (synthesis and
    evaluation), Ray Train workers, Serve model replicas."""
    c, s = cfg.cluster, cfg.serve
    # None means "every CPU of the largest node" (the local default): on a cluster that scales
    # from zero there is no node to measure yet, and a pod must be sized from its actors.
    unset = [f"cluster.{k}" for k in ("cpus_per_engine_actor", "cpus_per_train_worker") if getattr(c, k) is None]
    if unset:
        raise ValueError(f"{' and '.join(unset)} not set (the default, every CPU of the largest node, "
                         "only suits a local Ray): a deployment config must give the CPUs per actor, "
                         "from which the worker pods are sized")
    cpus = max(c.cpus_per_engine_actor, c.cpus_per_train_worker, s.cpus_per_replica)
    gpus = max(c.gpus_per_engine_actor, c.gpus_per_train_worker, s.gpus_per_replica)
    return cpus, gpus


def head_size(name: str) -> dict[str, str]:
    return profile(name).head.model_dump()


def worker_size(name: str, cfg: GenpiConfig) -> dict[str, str]:
    """Requests (= limits) of a worker pod of profile `name` running config `cfg`."""
    p = profile(name)
    try:
        cpus, gpus = actor_size(cfg)
    except ValueError as e:
        raise ValueError(f"profile {name} (config {p.config}): {e}") from None
    w = p.worker
    pod_cpus = w.actors_per_pod * cpus + w.extra_cpus
    if pod_cpus <= 0:
        raise ValueError(f"profile {name}: its config asks for actors of 0 CPUs and extra_cpus is 0")
    # Most actors one stage runs at once; the worker group must be able to hold them all.
    most = max(cfg.cluster.synth_actors, cfg.cluster.train_workers, cfg.serve.max_replicas)
    if p.max_workers * w.actors_per_pod < most:
        raise ValueError(f"profile {name}: max_workers {p.max_workers} x actors_per_pod {w.actors_per_pod} "
                         f"pods cannot hold the {most} actors its config ({p.config}) runs at once")
    size = {"cpu": _cpu(pod_cpus), "memory": _memory(pod_cpus * w.memory_gib_per_cpu)}
    n_gpus = math.ceil(w.actors_per_pod * gpus)
    if n_gpus:
        size["nvidia.com/gpu"] = str(n_gpus)
    return size


def job_runtime_env() -> dict[str, Any]:
    """The RayJob's runtime env: env vars only; the code is in the image, so no working_dir."""
    return {"env_vars": dict(profiles().job_env_vars)}
