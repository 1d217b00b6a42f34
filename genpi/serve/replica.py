"""The model replica of the CPU serving path (Ray Serve deployment `GenpiAdapters`): one base
model and up to serve.max_adapters_per_replica PEFT adapters, multiplexed per replica."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from genpi.config import GenpiConfig
from genpi.serve import openai as oa
from genpi.serve.adapters import AdapterRef


@serve.deployment
class GenpiAdapters:
    """One base model; adapters multiplexed per replica with LRU eviction (Ray Serve's)."""

    def __init__(self, config: dict[str, Any]):
        from genpi.serve.backend import AdapterBackend

        self.cfg = GenpiConfig.model_validate(config)
        self.backend = AdapterBackend(self.cfg)
        # One worker thread owns the model: requests queue here in arrival order and the
        # event loop stays free to route, stream and load.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genpi-model")

        async def load(key: str):
            ref = AdapterRef.from_key(key)
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.backend.load, ref)

        # Configured per deployment, hence wrapped here rather than as a class decorator
        # (Ray Serve detects multiplexing wired up at init time).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters_per_replica)(load)

    async def ready(self) -> dict[str, Any]:
        attached = await asyncio.get_running_loop().run_in_executor(self.pool, self.backend.attached)
        return {"base": self.backend.base_name, "adapters_loaded": attached}

    async def _handle(self):
        key = serve.get_multiplexed_model_id()
        return await self.get_adapter(key) if key else None

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = oa.ChatCompletionRequest.model_validate(payload)
        handle = await self._handle()
        out = await asyncio.get_running_loop().run_in_executor(self.pool, self.backend.generate, req, handle)
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens, "tokens_saved": handle.tokens_saved if handle else 0}

    async def stream(self, payload: dict[str, Any]):
        req = oa.ChatCompletionRequest.model_validate(payload)
        handle = await self._handle()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def work():
            try:
                return self.backend.stream(req, handle, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)  # after every delta (FIFO)

        yield {"event": "start", "tokens_saved": handle.tokens_saved if handle else 0}
        fut = loop.run_in_executor(self.pool, work)
        while (delta := await queue.get()) is not None:
            yield {"delta": delta}
        out = await fut
        yield {"event": "end", "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
               "completion_tokens": out.completion_tokens}
