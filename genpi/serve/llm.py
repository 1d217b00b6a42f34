"""GPU path: the same OpenAI API served by Ray Serve LLM (vLLM with LoRA), from the same config.

Everything here is plain data; nothing imports vllm or ray.serve.llm (which fails without
vllm), so the translation is testable on any machine and the generated YAML runs with
`serve deploy` on a GPU cluster that has `pip install -e ".[gpu]"`.

How the store maps to Ray Serve LLM's dynamic LoRA loading
----------------------------------------------------------
Ray Serve LLM loads an adapter named `<base id>:<lora id>` from
`<dynamic_lora_loading_path>/<lora id>/` (adapter_config.json + weights) and lists those
subfolders for /v1/models; the path must be on S3, GCS or Azure. The genpi store keeps
adapters under `prompts/<id>/<fingerprint>/adapter/`, so `export_lora_layout` copies each
published adapter to `<serve.lora_export_uri or <store>/serve-lora>/<id>/`, weights first
and adapter_config.json last (Ray Serve LLM skips a folder without its config, so a
half-copied adapter is never listed). Run it after publishing (`genpi serve
--export-lora`); `genpi serve` with backend=vllm runs it before starting.

Differences from the CPU path, stated rather than hidden: clients name an adapter
`<base model name>:<prompt id>`; a replica caches an adapter by name on its disk, so a
republished adapter reaches a replica only when that replica is replaced (or evicts it).
"""
from __future__ import annotations

import logging
from typing import Any

from genpi.config import ConfigError, GenpiConfig

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("s3://", "gs://", "abfss://", "azure://")
# vLLM cannot read the GGUF-converted cache folder of another machine: the embedded
# default is served from its hub id on a GPU cluster.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def lora_export_uri(cfg: GenpiConfig) -> str:
    return (cfg.serve.lora_export_uri or f"{cfg.store.rstrip('/')}/serve-lora").rstrip("/")


def model_source(cfg: GenpiConfig) -> str:
    from genpi.models import EMBEDDED

    return EMBEDDED_HUB_ID if cfg.model.name == EMBEDDED else cfg.model.name


def llm_config(cfg: GenpiConfig) -> dict[str, Any]:
    """The LLMConfig (as a dict) for ray.serve.llm, from genpi's serve/model settings."""
    from genpi.serve.backend import base_model_name
    from genpi.serve.deploy import autoscaling

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
    from genpi.serve.deploy import APP_NAME

    return {"name": APP_NAME, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [llm_config(cfg)]}}


def export_lora_layout(cfg: GenpiConfig) -> dict[str, str]:
    """Copy every published adapter to `<export uri>/<id>/`; returns id -> fingerprint copied.

    An id whose exported copy already has the published fingerprint (recorded in
    `<id>/genpi.json`) is skipped, so running it after every publish is cheap.
    """
    from genpi.store import Store

    from genpi.serve.adapters import AdapterRegistry

    store = Store(cfg.store)
    dest = Store(lora_export_uri(cfg))
    done: dict[str, str] = {}
    for model_id, entry in AdapterRegistry(store, 0).published():
        fp = entry["fingerprint"]
        marker = dest.path(model_id, "genpi.json")
        if dest.exists(marker) and dest.read_json(marker).get("fingerprint") == fp:
            continue
        src = f"{store.prompt_dir(model_id, fp)}/adapter"
        names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(src, detail=False))
        # adapter_config.json last: Ray Serve LLM ignores a folder until its config exists.
        for name in sorted(names, key=lambda n: n == "adapter_config.json"):
            with store.fs.open(f"{src}/{name}", "rb") as f:
                dest.write_bytes(dest.path(model_id, name), f.read())
        dest.write_json(marker, {"fingerprint": fp})
        done[model_id] = fp
        log.info("exported adapter %s (%s) to %s", model_id, fp, dest.path(model_id))
    return done
