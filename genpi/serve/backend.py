"""One base model with several named PEFT adapters: attach, release, generate, stream.

This is the CPU path's model holder, used by the Ray Serve replica (genpi/serve/app.py)
and usable on its own (bench, tests). It knows nothing of Ray.

Correctness first: every use of the model (attach, generate, delete) holds one lock, so
two requests for different adapters on one replica can never see each other's adapter
(PEFT's active adapter is model-wide state). Generation is batch 1 per request; the
non-streaming path is exactly the library's `HFEngine.generate`, so a served reply equals
the library's own generation with that adapter.

Eviction: Ray Serve's multiplexer drops its least recently used handle and calls its
`__del__` (sometimes twice, and the garbage collector may call it once more). Releasing
only marks the key unwanted, without the lock (a `__del__` run by the garbage collector
inside a locked section must not deadlock); the weights are deleted at the next locked
operation. A request that obtained a handle just before its eviction re-attaches the
adapter for its own generation rather than failing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from genpi.chat import prompt_tokens_saved
from genpi.config import GenpiConfig
from genpi.engines.base import ChatRequest, Completion
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


class AdapterBackend:
    def __init__(self, cfg: GenpiConfig, store: Store | None = None):
        from genpi.engines.hf import HFEngine
        from genpi.models import load_model

        self.cfg = cfg
        self.store = store or Store(cfg.store)
        self.registry = AdapterRegistry(self.store, cfg.serve.registry_refresh_s)
        cache = cfg.serve.adapter_cache_dir or str(cfg.model.resolved_cache_dir() / "serve-adapters")
        self.files = AdapterFiles(self.store, cache)
        self.base, self.tok, self.resolved = load_model(cfg.model)
        self.model = self.base  # becomes a PeftModel wrapping the base on the first attach
        self.engine = HFEngine(self.model, self.tok, batch_size=1)
        self.base_name = base_model_name(cfg)
        self.lock = threading.RLock()
        self._attached: dict[str, str] = {}  # key -> PEFT adapter name
        self._paths: dict[str, str] = {}  # key -> local adapter folder (to re-attach)
        self._wanted: set[str] = set()  # keys the multiplexer (or a caller) still holds

    # ---- adapters -------------------------------------------------------------------
    @staticmethod
    def _peft_name(key: str) -> str:
        # PEFT names become module-dict keys, which may not contain '.'; ids may.
        return "a_" + hashlib.sha1(key.encode()).hexdigest()[:16]

    def load(self, ref: AdapterRef) -> AdapterHandle:
        """Attach the adapter (blocking: file copy + weight load) and return its handle."""
        path = self.files.local_dir(ref)
        spec = self.files.spec(ref)
        if spec.get("model") and spec["model"] != self.resolved.identity:
            log.warning("adapter %s was trained on base %s but this server serves %s",
                        ref.key, spec["model"], self.resolved.identity)
        saved = prompt_tokens_saved(self.engine.count_prompt_tokens, spec["entry"]["prompt"])
        with self.lock:
            self._wanted.add(ref.key)
            self._paths[ref.key] = path
            self._collect()
            self._attach(ref.key)
        log.info("adapter %s loaded from %s (%d prompt tokens saved per request)", ref.key, path, saved)
        return AdapterHandle(self, ref, saved)

    def release(self, key: str) -> None:
        # No lock here (see the module docstring): a set update is atomic under the GIL.
        self._wanted.discard(key)

    def attached(self) -> list[str]:
        with self.lock:
            self._collect()
            return sorted(self._attached)

    def _attach(self, key: str) -> str:
        name = self._attached.get(key)
        if name is not None:
            return name
        from peft import PeftModel

        name = self._peft_name(key)
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, self._paths[key], adapter_name=name)
            self.model.eval()
            self.engine.model = self.model
        else:
            self.model.load_adapter(self._paths[key], adapter_name=name)
        self._attached[key] = name
        return name

    def _collect(self, keep: str | None = None) -> None:
        """Delete the weights of every attached adapter nobody holds any more."""
        for key in [k for k in self._attached if k not in self._wanted and k != keep]:
            self.model.delete_adapter(self._attached.pop(key))
            log.info("adapter %s unloaded", key)

    # ---- generation ---------------------------------------------------------------
    @contextlib.contextmanager
    def _selected(self, handle: AdapterHandle | None, strength: float | None):
        """Under the lock: the adapter (scaled by `strength`) or the bare base is active."""
        with self.lock:
            self._collect(keep=handle.ref.key if handle else None)
            if handle is None or strength == 0:
                yield None
                return
            if handle.ref.key not in self._paths:
                raise ApiError(500, f"adapter {handle.ref.key} was never loaded on this replica", type="server_error")
            name = self._attach(handle.ref.key)  # re-attaches if it was evicted meanwhile
            try:
                if strength is None or strength == 1:
                    yield name
                else:
                    from peft.helpers import rescale_adapter_scale

                    self.model.set_adapter(name)
                    with rescale_adapter_scale(self.model, float(strength)):
                        yield name
            finally:
                self._collect()

    def _chat_request(self, req: ChatCompletionRequest, adapter: str | None) -> ChatRequest:
        return ChatRequest(
            messages=[m.model_dump() for m in req.messages],
            max_new_tokens=req.new_tokens(self.cfg.serve.max_new_tokens),
            temperature=req.temperature,
            top_p=req.top_p,
            adapter=adapter,
            seed=req.seed,
        )

    def generate(self, req: ChatCompletionRequest, handle: AdapterHandle | None) -> Generated:
        with self._selected(handle, req.strength) as name:
            out: Completion = self.engine.generate([self._chat_request(req, name)])[0]
        return Generated(out.text, out.finish_reason, out.prompt_tokens, len(out.token_ids))

    def stream(self, req: ChatCompletionRequest, handle: AdapterHandle | None,
               emit: Callable[[str], None]) -> Generated:
        """Generate like `generate`, calling `emit(delta)` as text appears.

        The deltas concatenate to exactly the text `generate` returns: the same kwargs as
        HFEngine, the same decoding (special tokens skipped, surrounding whitespace
        stripped), trailing whitespace and partial UTF-8 characters held back until the
        next token shows whether they belong to the reply.
        """
        import torch
        from transformers.generation.streamers import BaseStreamer

        tok, eos = self.tok, set(self.engine.eos_ids)
        state: dict[str, Any] = {"ids": [], "sent": "", "prompt_seen": False, "stopped": False}

        def flush(final: bool) -> None:
            text = tok.decode([t for t in state["ids"] if t not in eos], skip_special_tokens=True).strip()
            if not final and text.endswith("\ufffd"):
                return  # an incomplete multi-byte character: wait for its next token
            if text.startswith(state["sent"]) and len(text) > len(state["sent"]):
                emit(text[len(state["sent"]):])
                state["sent"] = text
            elif not text.startswith(state["sent"]):
                log.warning("stream decoding changed already-sent text; the rest is sent as is")

        class _Tokens(BaseStreamer):
            def put(self, value):
                if not state["prompt_seen"]:  # generate() first hands over the prompt ids
                    state["prompt_seen"] = True
                    return
                for t in value.reshape(-1).tolist():
                    if state["stopped"]:
                        return
                    state["ids"].append(t)
                    if t in eos:
                        state["stopped"] = True
                flush(final=False)

            def end(self):
                pass

        with self._selected(handle, req.strength) as name:
            creq = self._chat_request(req, name)
            ids = self.engine.render(creq.messages)
            sample = creq.temperature > 0
            kwargs: dict[str, Any] = dict(max_new_tokens=creq.max_new_tokens, do_sample=sample,
                                          pad_token_id=self.engine.pad_id, eos_token_id=self.engine.eos_ids)
            if sample:
                kwargs.update(temperature=creq.temperature, top_p=creq.top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if creq.seed is not None:
                torch.manual_seed(creq.seed)
            x = torch.tensor([ids], device=self.engine.device)
            with self._active(name), torch.no_grad():
                self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=_Tokens(), **kwargs)
        flush(final=True)
        finish = "stop" if state["stopped"] else "length"
        return Generated(state["sent"], finish, len(ids), len(state["ids"]))

    @contextlib.contextmanager
    def _active(self, name: str | None):
        # As HFEngine: the named adapter, or the base with every adapter disabled.
        if not hasattr(self.model, "peft_config"):
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield
