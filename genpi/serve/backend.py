"""One base model serving many LoRA adapters, with requests batched as they arrive.

This is the CPU path's model holder, used by the Ray Serve replica (genpi/serve/replica.py)
and usable on its own (bench, tests). It knows nothing of Ray.

Generation runs on one model thread (genpi.serve.batching.Batcher): requests for different
adapters, the bare base and any `strength` run in one batched forward, each row with its own
adapter slot and scale, so a reply does not depend on what else is in the batch (greedy: the
same tokens as the request alone, and as the library's HFEngine with PEFT). `max_batch=1`
keeps the one-request-at-a-time behaviour for side-by-side measurement.

Adapters: `load` reads an adapter's files and weights into memory (off the model thread;
the multiplexer calls it on first use); the model thread copies them into a slot of the
stacked LoRA layer when a request needs it, least recently used slot evicted beyond
serve.max_adapters_per_replica (never one a running request uses). Ray Serve's multiplexer
releases a handle (its `__del__`, maybe twice, maybe from the garbage collector): that only
marks the key as first to evict and drops its in-memory copy, without any lock.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from genpi.chat import prompt_tokens_saved
from genpi.config import GenpiConfig
from genpi.serve.adapters import AdapterFiles, AdapterRef, AdapterRegistry
from genpi.serve.config import base_model_name
from genpi.serve.openai import ApiError, ChatCompletionRequest
from genpi.store import Store

log = logging.getLogger(__name__)


@dataclass
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class AdapterHandle:
    """What the multiplexer caches per key; unloading it only marks the key unwanted."""

    def __init__(self, backend: "AdapterBackend", ref: AdapterRef, tokens_saved: int):
        self.backend, self.ref, self.tokens_saved = backend, ref, tokens_saved
        self._released = False

    def release(self) -> None:
        if not self._released:  # idempotent: Ray and the garbage collector may both call it
            self._released = True
            self.backend.release(self.ref.key)

    def __del__(self) -> None:
        self.release()


def _stop_list(req: ChatCompletionRequest) -> list[str]:
    # `stop` (OpenAI: a string or up to 4 strings) once the request model carries it.
    stop = getattr(req, "stop", None)
    if not stop:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]


class AdapterBackend:
    def __init__(self, cfg: GenpiConfig, store: Store | None = None, max_batch: int | None = None):
        from genpi.engines.hf import HFEngine
        from genpi.models import context_limit, load_model
        from genpi.serve.batching import Batcher
        from genpi.serve.lora_slots import LoraSlots

        self.cfg = cfg
        self.store = store or Store(cfg.store)
        self.registry = AdapterRegistry(self.store, cfg.serve.registry_refresh_s)
        cache = cfg.serve.adapter_cache_dir or str(cfg.model.resolved_cache_dir() / "serve-adapters")
        self.files = AdapterFiles(self.store, cache)
        self.base, self.tok, self.resolved = load_model(cfg.model)
        self.model = self.base
        # HFEngine only renders chats and counts tokens here (the library's one chat rule).
        self.engine = HFEngine(self.model, self.tok, batch_size=1)
        self.base_name = base_model_name(cfg)
        if max_batch is None:
            max_batch = cfg.serve.max_batch_size
        self._lock = threading.Lock()  # guards the dicts below (load runs off the model thread)
        self._paths: dict[str, str] = {}  # key -> local adapter folder
        self._weights: dict[str, Any] = {}  # key -> AdapterWeights read by `load`
        self.slots = LoraSlots(self.model, cfg.serve.max_adapters_per_replica, self._weights_for)
        self.batcher = Batcher(self.model, self.tok, self.engine.eos_ids, self.engine.pad_id, self.slots,
                               max_batch, context_limit(self.model, cfg.model))

    # ---- adapters -------------------------------------------------------------------
    def load(self, ref: AdapterRef) -> AdapterHandle:
        """Fetch and read the adapter (blocking: file copy + weight read) and return its handle."""
        from genpi.serve.lora_slots import read_peft_adapter

        path = self.files.local_dir(ref)
        spec = self.files.spec(ref)
        if spec.get("model") and spec["model"] != self.resolved.identity:
            log.warning("adapter %s was trained on base %s but this server serves %s",
                        ref.key, spec["model"], self.resolved.identity)
        try:
            weights = read_peft_adapter(path, self.slots.module_names)
        except ValueError as e:
            raise ApiError(500, f"adapter {ref.id} cannot be served: {e}", type="server_error") from None
        saved = prompt_tokens_saved(self.engine.count_prompt_tokens, spec["entry"]["prompt"])
        with self._lock:
            self._paths[ref.key] = path
            self._weights[ref.key] = weights
        self.slots.unwanted.discard(ref.key)
        log.info("adapter %s read from %s (%d prompt tokens saved per request)", ref.key, path, saved)
        return AdapterHandle(self, ref, saved)

    def release(self, key: str) -> None:
        # No lock (see the module docstring): atomic dict/set updates under the GIL.
        self.slots.unwanted.add(key)
        self._weights.pop(key, None)

    def _weights_for(self, key: str):
        """The adapter's weights for the model thread: read again if released meanwhile."""
        from genpi.serve.lora_slots import read_peft_adapter

        w = self._weights.get(key)
        if w is not None:
            return w
        path = self._paths.get(key)
        if path is None:
            raise ApiError(500, f"adapter {key} was never loaded on this replica", type="server_error")
        return read_peft_adapter(path, self.slots.module_names)

    def attached(self) -> list[str]:
        return self.slots.keys()

    # ---- generation ---------------------------------------------------------------
    def submit(self, req: ChatCompletionRequest, handle: AdapterHandle | None,
               emit: Callable[[str], None] | None = None):
        """Queue one request; returns its Row (`.future` resolves to it, `.cancel()` drops it)."""
        from genpi.serve.batching import Row

        ids = self.engine.render([m.model_dump() for m in req.messages])
        strength = 1.0 if req.strength is None else float(req.strength)
        key = handle.ref.key if handle is not None and strength > 0 else None
        if key is not None and key not in self._paths:
            raise ApiError(500, f"adapter {key} was never loaded on this replica", type="server_error")
        row = Row(prompt=ids, max_new_tokens=req.new_tokens(self.cfg.serve.max_new_tokens), key=key,
                  strength=strength, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                  stop=_stop_list(req), emit=emit)
        return self.batcher.submit(row)

    @staticmethod
    def result(row) -> Generated:
        return Generated(row.text, row.finish, len(row.prompt), len(row.out))

    def generate(self, req: ChatCompletionRequest, handle: AdapterHandle | None) -> Generated:
        return self.result(self.submit(req, handle).future.result())

    def stream(self, req: ChatCompletionRequest, handle: AdapterHandle | None,
               emit: Callable[[str], None]) -> Generated:
        """Generate like `generate`, calling `emit(delta)` (on the model thread) as text appears.

        The deltas concatenate to exactly the text `generate` returns: trailing whitespace,
        partial UTF-8 characters and a possible start of a stop sequence are held back until
        the next token shows whether they belong to the reply.
        """
        return self.result(self.submit(req, handle, emit).future.result())

    def close(self) -> None:
        self.batcher.close()
