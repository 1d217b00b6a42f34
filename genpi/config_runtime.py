"""Where and how genpi runs: the Ray cluster's resources per stage (`ClusterConfig`) and the
serving app (`ServeConfig`), parts of the one `genpi.config.GenpiConfig` (which re-exports
them). They never enter a fingerprint: they change where work runs, not what it produces.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# vLLM 0.29's LoRAConfig.max_lora_rank is a Literal of these values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class _Strict(BaseModel):
    # An unknown key is almost always a typo that would silently do nothing: refuse it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(_Strict):
    """Resources per stage on a Ray cluster; the defaults fit a local run of the embedded model."""
    # Ray address: None = connect to RAY_ADDRESS or start a local Ray.
    address: str | None = None
    synth_actors: int = Field(default=1, ge=1)
    # CPUs per engine actor / training worker; None = every CPU of the largest node
    # (genpi.rayinit.actor_cpus). Ray runs an actor with as many threads as CPUs it was
    # given, so the local default uses the whole machine; cluster configs set numbers.
    cpus_per_engine_actor: float | None = Field(default=None, ge=0)
    gpus_per_engine_actor: float = Field(default=0, ge=0)
    train_workers: int = Field(default=1, ge=1)
    cpus_per_train_worker: float | None = Field(default=None, ge=0)
    gpus_per_train_worker: float = Field(default=0, ge=0)
    # How long a stage waits for the resources it asks for to appear (an autoscaling
    # cluster adds GPU nodes on demand) before failing with what is missing; 0 = check once.
    resource_wait_s: float = Field(default=0, ge=0)
    # Prompts per wave: each wave is synthesized, trained, evaluated and published before the
    # next starts, so the first adapters are served early and a late failure holds back no
    # earlier wave. The first wave has wave_prompts; each later one wave_growth times the one
    # before, up to max_wave_prompts (or wave_prompts if larger): every wave pays fixed costs
    # (engine actors loading the model, Ray Train starting its workers: ~38 s on 2 CPU cores,
    # a minute or more with vLLM on GPUs), so a small first wave gives a quick first adapter
    # and few, large waves after it keep those costs a small share (growth 4: 300 prompts in
    # 2 waves, 32 and 268, where doubling made 3). A remainder smaller than the wave it would
    # have made joins the wave before, so the last may hold up to twice max_wave_prompts.
    # Large enough to fill the engine actors and training packs; an execution setting, never content.
    wave_prompts: int = Field(default=32, ge=1)
    wave_growth: int = Field(default=4, ge=1)
    max_wave_prompts: int = Field(default=256, ge=1)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    backend: Literal["hf", "vllm"] = "hf"
    # Adapters held per replica (LRU beyond this); with vLLM also max_loras.
    max_adapters_per_replica: int = Field(default=8, ge=1)
    # vLLM accepts only these ranks (vllm.config.lora.MaxLoRARanks); a LoRA rank above it is refused at load.
    max_lora_rank: int = Field(default=64, gt=0)
    max_cpu_loras: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=256, gt=0)
    # Autoscaling on ongoing requests (Ray Serve LLM never scales unless this is set).
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4, gt=0)
    # How long the load must stay above (below) the target before a replica is added
    # (removed); None = Ray Serve's defaults (30 s up, 600 s down).
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)
    cpus_per_replica: float = Field(default=1, ge=0)
    gpus_per_replica: float = Field(default=0, ge=0)
    # Requests one model replica accepts at once (queued beyond this in the proxy/router).
    # With vLLM this caps the batch the engine can form: 256 is vLLM's default max_num_seqs,
    # so a replica can fill its batch (Ray Serve LLM's own default, 1e9, is unbounded). It must
    # stay well above target_ongoing_requests, which is what the autoscaler scales on: requests
    # beyond the target are the backlog it sees (the CPU app decodes up to max_batch_size
    # requests together per replica; the rest wait in the replica's queue, counted the same way).
    max_ongoing_requests: int = Field(default=256, ge=1)
    # CPU app: requests decoded together in one batch per replica (mixed adapters; continuous
    # batching admits new ones between decoding steps). 1 = one request at a time.
    max_batch_size: int = Field(default=16, ge=1)
    # The ingress (HTTP parsing, registry lookups) is light: a fraction of a CPU per replica.
    cpus_per_ingress: float = Field(default=0.25, ge=0)
    # The `model` name that selects the bare base; None = derived from model.name
    # (the embedded model is "SmolLM2-135M-Instruct", a local folder its folder name).
    base_model_name: str | None = None
    # How stale the served registry may be: a publish is visible within this many seconds.
    registry_refresh_s: float = Field(default=2.0, ge=0)
    # Local copies of adapters from a remote store; None = <model cache>/serve-adapters.
    adapter_cache_dir: str | None = None
    # GPU path (backend=vllm): vLLM prefix caching, and a store URI (s3://, gs://) holding
    # the adapters in Ray Serve LLM's <path>/<id>/ layout (None = <store>/serve-lora).
    enable_prefix_caching: bool = True
    lora_export_uri: str | None = None
    # Largest request body the ingress reads (a 413 beyond it, before any parsing): 1 MiB
    # holds a 128k-token conversation; a client cannot make the ingress buffer more.
    max_request_bytes: int = Field(default=1 << 20, ge=1024)

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of vLLM's allowed ranks {list(VLLM_LORA_RANKS)}, not {v}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.max_ongoing_requests <= self.target_ongoing_requests:
            # The autoscaler adds replicas only for requests beyond the target; a replica that
            # admits no more than the target never shows a backlog, so it would never scale.
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be above "
                             f"target_ongoing_requests ({self.target_ongoing_requests}), or the autoscaler never "
                             "sees a backlog to scale on")
        return self
