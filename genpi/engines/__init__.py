"""Generation engines behind one interface (see base.py)."""
from genpi.engines.base import ChatRequest, Completion, Engine

__all__ = ["ChatRequest", "Completion", "Engine", "make_engine"]


def make_engine(cfg) -> Engine:
    """The engine `cfg.engine.kind` names, on the configured base model (loaded here)."""
    if cfg.engine.kind == "vllm":
        from genpi.engines.vllm import VLLMEngine

        return VLLMEngine.from_config(cfg)
    from genpi.engines.hf import HFEngine

    return HFEngine.from_config(cfg)
