"""Generation engines behind one interface (see base.py)."""
from genpi.engines.base import ChatRequest, Completion, Engine

__all__ = ["ChatRequest", "Completion", "Engine", "make_engine"]


def make_engine(cfg, *, adapters: bool = False) -> Engine:
    """The engine `cfg.engine.kind` names, on the configured base model (loaded here).

    `adapters=True` for an engine that will run LoRA adapters (evaluation): vLLM then starts
    with LoRA on; synthesis runs only the base and leaves it off. The transformers engine
    runs whatever PEFT adapters its model holds, so the flag changes nothing there."""
    if cfg.engine.kind == "vllm":
        from genpi.engines.vllm import VLLMEngine

        return VLLMEngine.from_config(cfg, adapters=adapters)
    from genpi.engines.hf import HFEngine

    return HFEngine.from_config(cfg)
