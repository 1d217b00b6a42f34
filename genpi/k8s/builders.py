"""Builders of the KubeRay documents: RayJob (batch internalization), RayService (serving),
RayCluster (interactive), the genpi-config and genpi-prompts ConfigMaps, and the overlays'
patches. Pure functions of a profile name, its genpi config and the prompts; no I/O but the
package data `profiles` reads, no Ray import.

Credentials are never written: every pod reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(and AWS_SESSION_TOKEN when present) from the Secret `genpi-s3` (secretKeyRef) that the
operator creates with kubectl; Ray workers read them there, not from a runtime_env.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from genpi.config import GenpiConfig
from genpi.rayinit import MALLOC_ARENA_MAX
import genpi.k8s.profiles as P

APP_DIR = "/home/ray/genpi"            # where cluster/Dockerfile puts the repository's jobs/ and cluster/
CONFIG_MOUNT = "/etc/genpi/config"     # genpi-config ConfigMap: genpi.yaml
PROMPTS_MOUNT = "/etc/genpi/prompts"   # genpi-prompts ConfigMap: one manifest file per key
S3_SECRET = "genpi-s3"                 # kubectl create secret generic genpi-s3 --from-literal=...
S3_ENDPOINT_CONFIGMAP = "genpi-s3-endpoint"  # optional: AWS_ENDPOINT_URL for S3-compatible stores
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AUTOSCALER_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
SUBMITTER_RESOURCES = {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
GPU = "nvidia.com/gpu"
GPU_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the NVIDIA GPU operator's node label
# Where each kind keeps its RayCluster spec, and the names of the three Ray resources.
CLUSTER_PATHS = {"RayJob": "/spec/rayClusterSpec", "RayService": "/spec/rayClusterConfig", "RayCluster": "/spec"}
NAMES = {"RayJob": "genpi-internalize", "RayService": "genpi-serve", "RayCluster": "genpi-interactive"}
KUSTOMIZATION = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}


def entrypoint(cfg: GenpiConfig) -> str:
    """The RayJob entrypoint. The store comes from the config file (its `store` key).

    With serve.backend=vllm the published adapters must also be copied to Ray Serve LLM's
    layout; cluster/internalize_and_export.sh does both (no shell syntax in the entrypoint:
    KubeRay's submitter runs it inside its own shell command line).
    """
    args = f"--manifest {PROMPTS_MOUNT} --config {CONFIG_MOUNT}/genpi.yaml"
    if cfg.serve.backend == "vllm":
        return f"bash {APP_DIR}/cluster/internalize_and_export.sh {args}"
    return f"python {APP_DIR}/jobs/internalize_many.py {args}"


def serve_config_v2(cfg: GenpiConfig) -> str:
    # The function behind `genpi serve --print-config`: local and cluster serving cannot drift.
    from genpi.serve.config import serve_config

    return yaml.safe_dump(serve_config(cfg), sort_keys=False)


def _resources(size: dict[str, str]) -> dict[str, Any]:
    return {"requests": dict(size), "limits": dict(size)}


def _env() -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": k}}} for k in SECRET_KEYS
    ]
    # Temporary credentials: workers read the session token here too (it never travels in
    # a runtime_env), so the Secret may hold one; optional, as long-lived keys have none.
    env.append({"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": S3_SECRET, "key": "AWS_SESSION_TOKEN", "optional": True}}})
    env.append({"name": "AWS_ENDPOINT_URL", "valueFrom": {"configMapKeyRef": {
        "name": S3_ENDPOINT_CONFIGMAP, "key": "AWS_ENDPOINT_URL", "optional": True}}})
    env.append({"name": "GENPI_CACHE", "value": "/home/ray/.cache/genpi"})
    # One glibc malloc arena for every thread, as genpi gives a local Ray (genpi.rayinit):
    # Ray Train runs the train function on a second thread, which otherwise trains 1.2-1.3x
    # slower on a CPU worker (bench/thread_malloc.py). Set on GPU pods too (not measured there:
    # their training tensors are not host memory).
    env.append({"name": "MALLOC_ARENA_MAX", "value": MALLOC_ARENA_MAX})
    return env


DSHM = 2  # index of the /dev/shm volume in _volumes(), for the overlays' patches


def _volumes(memory: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    _, shm = P.object_store(memory)
    volumes = [
        {"name": "genpi-config", "configMap": {"name": "genpi-config"}},
        {"name": "genpi-prompts", "configMap": {"name": "genpi-prompts"}},
        # Ray's object store lives in /dev/shm (the container default, 64 MiB, is far too
        # small): sized with rayStartParams object-store-memory from the pod's memory.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    mounts = [
        {"name": "genpi-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "genpi-prompts", "mountPath": PROMPTS_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def _object_store_memory(size: dict[str, str]) -> str:
    return str(P.object_store(size["memory"])[0])


def _pod(container: str, image: str, size: dict[str, str], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    volumes, mounts = _volumes(size["memory"])
    c: dict[str, Any] = {
        "name": container,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": _resources(size),
        "env": _env(),
        "volumeMounts": mounts,
    }
    if ports:
        c["ports"] = ports
    return {"spec": {"containers": [c], "volumes": volumes}}


def ray_cluster_spec(name: str, cfg: GenpiConfig) -> dict[str, Any]:
    """The RayCluster spec shared by the RayJob, the RayService and the interactive RayCluster
    (the base profile's; overlays patch it). GPUs are added by the GPU overlay only, so that
    the base stays runnable on a CPU dev cluster."""
    p, image = P.profile(name), P.image(name)
    worker_size = {k: v for k, v in P.worker_size(name, cfg).items() if k != GPU}
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    return {
        "rayVersion": P.ray_version(),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": p.idle_timeout_s,
            "resources": copy.deepcopy(AUTOSCALER_RESOURCES),
        },
        "headGroupSpec": {
            # num-cpus 0: no task or actor lands on the head; the job driver and the Serve
            # controller still run there, the work goes to the worker group.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                               "object-store-memory": _object_store_memory(P.head_size(name))},
            "template": _pod("ray-head", image, P.head_size(name), head_ports),
        },
        "workerGroupSpecs": [{
            "groupName": "workers",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": p.max_workers,
            "rayStartParams": {"object-store-memory": _object_store_memory(worker_size)},
            "template": _pod("ray-worker", image, worker_size),
        }],
    }


def _meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "genpi", "app.kubernetes.io/component": component}}


def rayjob(name: str, cfg: GenpiConfig) -> dict[str, Any]:
    p = P.profile(name)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(NAMES["RayJob"], "internalize"),
        "spec": {
            "entrypoint": entrypoint(cfg),
            "runtimeEnvYAML": yaml.safe_dump(P.job_runtime_env(), sort_keys=False),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": p.ttl_s,
            "activeDeadlineSeconds": p.deadline_s,
            "backoffLimit": 0,
            "submitterPodTemplate": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "ray-job-submitter", "image": P.image(name), "imagePullPolicy": "IfNotPresent",
                "resources": copy.deepcopy(SUBMITTER_RESOURCES)}]}},
            "rayClusterSpec": ray_cluster_spec(name, cfg),
        },
    }


def rayservice(name: str, cfg: GenpiConfig) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(NAMES["RayService"], "serve"),
        "spec": {"serveConfigV2": serve_config_v2(cfg), "rayClusterConfig": ray_cluster_spec(name, cfg)},
    }


def raycluster(name: str, cfg: GenpiConfig) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(NAMES["RayCluster"], "interactive"),
            "spec": ray_cluster_spec(name, cfg)}


def config_map(name: str, data: dict[str, str], component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, component), "data": data}


def base_files(cfg: GenpiConfig, config_text: str, prompts: dict[str, str]) -> dict[str, Any]:
    """{file name: document(s)} of k8s/base, for the base profile's config and the prompts."""
    name = P.profiles().base_profile
    files: dict[str, Any] = {
        "rayjob.yaml": rayjob(name, cfg),
        "rayservice.yaml": rayservice(name, cfg),
        "raycluster.yaml": raycluster(name, cfg),
        "configmaps.yaml": [config_map("genpi-config", {"genpi.yaml": config_text}, "config"),
                            config_map("genpi-prompts", prompts, "prompts")],
    }
    files["kustomization.yaml"] = {**KUSTOMIZATION, "resources": list(files)}
    return files


# ---------------------------------------------------------------------------------------------
# Overlays: JSON 6902 patches on the CRDs (whose lists kustomize cannot merge by key)


def _cluster_ops(name: str, cfg: GenpiConfig) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per kind, the ops that turn the base cluster spec into the profile's."""
    p, worker, head, out = P.profile(name), P.worker_size(name, cfg), P.head_size(name), []
    for kind, base in CLUSTER_PATHS.items():
        h, w = f"{base}/headGroupSpec", f"{base}/workerGroupSpecs/0"
        ops = [
            {"op": "replace", "path": f"{base}/autoscalerOptions/idleTimeoutSeconds", "value": p.idle_timeout_s},
            {"op": "replace", "path": f"{w}/maxReplicas", "value": p.max_workers},
        ]
        # Each pod's memory, and its object store and /dev/shm sized from it.
        for group, size in ((h, head), (w, worker)):
            ops += [
                {"op": "replace", "path": f"{group}/template/spec/containers/0/resources", "value": _resources(size)},
                {"op": "replace", "path": f"{group}/rayStartParams/object-store-memory",
                 "value": _object_store_memory(size)},
                {"op": "replace", "path": f"{group}/template/spec/volumes/{DSHM}/emptyDir/sizeLimit",
                 "value": P.object_store(size["memory"])[1]},
            ]
        if GPU in worker:
            ops += [
                {"op": "replace", "path": f"{w}/groupName", "value": "gpu-workers"},
                {"op": "add", "path": f"{w}/template/spec/tolerations", "value": GPU_TOLERATIONS},
                {"op": "add", "path": f"{w}/template/spec/nodeSelector", "value": GPU_NODE_SELECTOR},
            ]
        out.append((kind, ops))
    return out


def overlay_files(name: str, cfg: GenpiConfig, config_text: str) -> dict[str, Any]:
    """{file name: content (dict or list)} of k8s/overlays/<name>."""
    p = P.profile(name)
    files: dict[str, Any] = {}
    patches: list[dict[str, Any]] = []
    for kind, ops in _cluster_ops(name, cfg):
        if kind == "RayJob":
            ops = [*ops,
                   {"op": "replace", "path": "/spec/entrypoint", "value": entrypoint(cfg)},
                   {"op": "replace", "path": "/spec/ttlSecondsAfterFinished", "value": p.ttl_s},
                   {"op": "replace", "path": "/spec/activeDeadlineSeconds", "value": p.deadline_s}]
        if kind == "RayService":
            ops = [*ops, {"op": "replace", "path": "/spec/serveConfigV2", "value": serve_config_v2(cfg)}]
        fname = f"{kind.lower()}-patch.yaml"
        files[fname] = ops
        patches.append({"path": fname, "target": {"group": "ray.io", "version": "v1", "kind": kind,
                                                  "name": NAMES[kind]}})
    # Strategic merge on the ConfigMap (a map: kustomize merges it key by key).
    files["genpi-config-patch.yaml"] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "genpi-config"},
                                        "data": {"genpi.yaml": config_text}}
    patches.append({"path": "genpi-config-patch.yaml"})
    resources = ["../../base"]
    if p.endpoint:
        files["s3-endpoint.yaml"] = config_map(S3_ENDPOINT_CONFIGMAP, {"AWS_ENDPOINT_URL": p.endpoint}, "store")
        resources.append("s3-endpoint.yaml")
    image = P.profiles().image
    files["kustomization.yaml"] = {**KUSTOMIZATION, "resources": resources, "patches": patches,
                                   "images": [{"name": image, "newName": image, "newTag": P.image_tag(name)}]}
    return files
