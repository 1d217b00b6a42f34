"""Generation engines behind one interface (see base.py)."""
from genpi.engines.base import ChatRequest, Completion, Engine

__all__ = ["ChatRequest", "Completion", "Engine"]
