"""Serving configs as plain data, built from one GenpiConfig: Ray Serve (CPU path) and Ray Serve LLM (GPU path).

Nothing here imports Ray or vLLM (ray.serve.llm fails to import without vllm), so the
translation is testable on any machine, and the generated YAML runs with `serve deploy`.

`serve_config(cfg)` returns the dict `serve deploy` reads (and, as is, the `serveConfigV2`
of a KubeRay RayService): one application whose import path builds the app from the same
GenpiConfig (passed in `args.config`), with each deployment's autoscaling and resources
spelled out so an operator can read and edit them in the YAML. The deployment options in
the file win over the ones the builder sets, as Ray Serve documents.

backend=hf: genpi.serve.app:build_app (FastAPI ingress -> multiplexed transformers+PEFT replicas).
backend=vllm: ray.serve.llm:build_openai_app with the LLMConfig of `llm_config`.

How the store maps to Ray Serve LLM's dynamic LoRA loading
----------------------------------------------------------
Ray Serve LLM loads an adapter named `<base id>:<lora id>` from
`<dynamic_lora_loading_path>/<lora id>/` (adapter_config.json + weights) and lists those
subfolders for /v1/models; the path must be on S3, GCS or Azure. The genpi store keeps
adapters under `prompts/<id>/<fingerprint>/adapter/`, so `genpi.serve.adapters.export_lora_layout`
copies each published adapter to `lora_export_uri(cfg)/<id>/`. Run it after publishing
(`genpi serve --export-lora`); `genpi serve` with backend=vllm runs it before starting.

Differences from the CPU path, stated rather than hidden: clients name an adapter
`<base model name>:<prompt id>`; a replica caches an adapter by name on its disk, so a
republished adapter reaches a replica only when that replica is replaced (or evicts it).
"""
from __future__ import annotations

import os
from typing import Any

from genpi.config import ConfigError, GenpiConfig

APP_NAME = "genpi"
INGRESS = "GenpiIngress"
MODEL = "GenpiAdapters"

REMOTE_PREFIXES = ("s3://", "gs://", "abfss://", "azure://")
# vLLM cannot read the GGUF-converted cache folder of another machine: the embedded
# default is served from its hub id on a GPU cluster.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_name(cfg: GenpiConfig) -> str:
    """The `model` name that selects the bare base: serve.base_model_name, else derived."""
    if cfg.serve.base_model_name:
        return cfg.serve.base_model_name
    from genpi.models import EMBEDDED, EMBEDDED_NAME

    name = cfg.model.name
    if name == EMBEDDED:
        return EMBEDDED_NAME
    # A local folder is named by its last component; a hub id keeps its org/name form.
    return os.path.basename(name.rstrip("/")) if os.path.exists(os.path.expanduser(name)) else name


# ---- Ray Serve (CPU path) ---------------------------------------------------------------
def autoscaling(cfg: GenpiConfig) -> dict[str, Any]:
    s = cfg.serve
    delays = {k: v for k, v in (("upscale_delay_s", s.upscale_delay_s), ("downscale_delay_s", s.downscale_delay_s))
              if v is not None}  # unset: Ray Serve's own defaults, and the YAML stays short
    return {
        "min_replicas": s.min_replicas,
        "initial_replicas": max(s.min_replicas, 1),
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        **delays,
    }


def deployment_options(cfg: GenpiConfig) -> dict[str, dict[str, Any]]:
    """Per-deployment options, shared by the YAML and the in-process builder."""
    s = cfg.serve
    model_actor: dict[str, Any] = {"num_cpus": s.cpus_per_replica}
    if s.gpus_per_replica:
        model_actor["num_gpus"] = s.gpus_per_replica
    return {
        INGRESS: {
            # The ingress scales with the same signal; it only parses and forwards, so it
            # may take many more requests at once than a model replica.
            "autoscaling_config": {**autoscaling(cfg), "target_ongoing_requests": s.target_ongoing_requests * 4},
            "max_ongoing_requests": s.max_ongoing_requests * 4,
            "ray_actor_options": {"num_cpus": s.cpus_per_ingress},
        },
        MODEL: {
            "autoscaling_config": autoscaling(cfg),
            "max_ongoing_requests": s.max_ongoing_requests,
            "ray_actor_options": model_actor,
        },
    }


def app_args_config(cfg: GenpiConfig) -> dict[str, Any]:
    """The part of the config the app reads (store, base model, serve); the rest stays default."""
    return cfg.model_dump(mode="json", include={"store", "model", "serve"})


# ---- Ray Serve LLM (GPU path) -----------------------------------------------------------
def lora_export_uri(cfg: GenpiConfig) -> str:
    return (cfg.serve.lora_export_uri or f"{cfg.store.rstrip('/')}/serve-lora").rstrip("/")


def model_source(cfg: GenpiConfig) -> str:
    from genpi.models import EMBEDDED

    return EMBEDDED_HUB_ID if cfg.model.name == EMBEDDED else cfg.model.name


def llm_config(cfg: GenpiConfig) -> dict[str, Any]:
    """The LLMConfig (as a dict) for ray.serve.llm, from genpi's serve/model settings."""
    s = cfg.serve
    uri = lora_export_uri(cfg)
    if not uri.startswith(REMOTE_PREFIXES):
        field = "serve.lora_export_uri" if s.lora_export_uri else "store"
        raise ConfigError(
            f"{field}: Ray Serve LLM loads LoRA adapters only from {', '.join(REMOTE_PREFIXES)} URIs; "
            f"got '{uri}' (set serve.lora_export_uri to a bucket path, or use serve.backend=hf)"
        )
    engine_kwargs: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": s.max_adapters_per_replica,  # adapters in one batch on the GPU
        "max_lora_rank": s.max_lora_rank,
        "max_cpu_loras": max(s.max_cpu_loras, s.max_adapters_per_replica),  # vLLM requires >= max_loras
        "enable_prefix_caching": s.enable_prefix_caching,
    }
    if cfg.model.dtype != "auto":
        engine_kwargs["dtype"] = cfg.model.dtype
    if cfg.model.max_context:
        engine_kwargs["max_model_len"] = cfg.model.max_context
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": base_model_name(cfg), "model_source": model_source(cfg)},
        "lora_config": {"dynamic_lora_loading_path": uri, "max_num_adapters_per_replica": s.max_adapters_per_replica},
        "engine_kwargs": engine_kwargs,
        # Ray Serve LLM's default is a fixed replica count that never scales: always set it.
        "deployment_config": {"autoscaling_config": autoscaling(cfg), "max_ongoing_requests": s.max_ongoing_requests},
    }
    if cfg.model.revision:
        out["engine_kwargs"]["revision"] = cfg.model.revision
    return out


def llm_app_config(cfg: GenpiConfig) -> dict[str, Any]:
    return {"name": APP_NAME, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [llm_config(cfg)]}}


# ---- the whole file ---------------------------------------------------------------------
def serve_config(cfg: GenpiConfig) -> dict[str, Any]:
    """The whole Serve config (applications + http_options) for `serve deploy` / KubeRay."""
    s = cfg.serve
    if s.backend == "vllm":
        app = llm_app_config(cfg)
    else:
        app = {
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "genpi.serve.app:build_app",
            "args": {"config": app_args_config(cfg)},
            "deployments": [{"name": name, **opts} for name, opts in deployment_options(cfg).items()],
        }
    return {"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port}, "applications": [app]}


def serve_config_yaml(cfg: GenpiConfig) -> str:
    import yaml

    head = ("# Ray Serve config generated by `genpi serve --print-config`; run it with\n"
            "#   serve deploy this.yaml   (or: serve run this.yaml)\n")
    return head + yaml.safe_dump(serve_config(cfg), sort_keys=False)
