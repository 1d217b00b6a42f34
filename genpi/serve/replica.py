"""The model replica of the CPU serving path (Ray Serve deployment `GenpiAdapters`): one base
model, many adapters, requests batched as they arrive (genpi.serve.backend / batching)."""
import asyncio
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from genpi.config import GenpiConfig
from genpi.serve import openai as oa
from genpi.serve.adapters import AdapterRef


@serve.deployment
class GenpiAdapters:
    """One base model; Ray Serve's multiplexer routes an adapter's requests to the replicas
    that already read it; the backend's model thread batches every request it is given."""

    def __init__(self, config: dict[str, Any], max_batch: int | None = None):
        from genpi.serve.backend import AdapterBackend

        self.cfg = GenpiConfig.model_validate(config)
        # max_batch=1: one request at a time (the bench's side-by-side arm).
        self.backend = AdapterBackend(self.cfg, max_batch=max_batch)
        # Adapter files are fetched and read here, never on the model thread, so a slow
        # download does not stall the batch.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="genpi-load")
        self.reads, self.read_s = 0, 0.0  # the multiplexer's misses: adapter files fetched and read
        # The latest reads as (adapter key, ms): a mean hides the slow tail of an object
        # store, and the key tells a first fetch from a re-read. Bounded: a replica lives long.
        self.read_log: deque[tuple[str, float]] = deque(maxlen=1024)

        async def load(key: str):
            ref = AdapterRef.from_key(key)
            t0 = time.perf_counter()
            handle = await asyncio.get_running_loop().run_in_executor(self.pool, self.backend.load, ref)
            dt = time.perf_counter() - t0
            self.reads, self.read_s = self.reads + 1, self.read_s + dt
            self.read_log.append((key, 1000 * dt))
            return handle

        # Configured per deployment, hence wrapped here rather than as a class decorator
        # (Ray Serve detects multiplexing wired up at init time).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters_per_replica)(load)

    async def ready(self) -> dict[str, Any]:
        return {"base": self.backend.base_name, "adapters_loaded": self.backend.attached()}

    async def stats(self) -> dict[str, Any]:
        """The batch's counters (rows admitted, cancelled, decoding steps, adapter slots) and the
        adapter reads of this replica: what tests and the bench measure. The p95 and the log
        cover the latest reads (`read_log`)."""
        ms = [m for _, m in self.read_log]
        p95 = statistics.quantiles(ms, n=20, method="inclusive")[-1] if len(ms) > 1 else (ms or [None])[0]
        return {**self.backend.batcher.stats(), "adapter_reads": self.reads,
                "adapter_read_ms_mean": 1000 * self.read_s / self.reads if self.reads else None,
                "adapter_read_ms_p95": p95, "adapter_read_log": list(self.read_log)}

    async def _handle(self):
        key = serve.get_multiplexed_model_id()
        return await self.get_adapter(key) if key else None

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = oa.ChatCompletionRequest.model_validate(payload)
        handle = await self._handle()
        row = self.backend.submit(req, handle)
        try:
            await asyncio.wrap_future(row.future)
        except asyncio.CancelledError:
            row.cancel()  # the client went away: its row leaves the batch at the next step
            raise
        out = self.backend.result(row)
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens, "tokens_saved": handle.tokens_saved if handle else 0}

    async def stream(self, payload: dict[str, Any]):
        req = oa.ChatCompletionRequest.model_validate(payload)
        handle = await self._handle()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(delta: str) -> None:  # on the model thread
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        yield {"event": "start", "tokens_saved": handle.tokens_saved if handle else 0}
        row = self.backend.submit(req, handle, emit)
        # After every delta (call_soon_threadsafe keeps order): the end marker.
        row.future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (delta := await queue.get()) is not None:
                yield {"delta": delta}
            row.future.result()  # raises the row's error, if any
        finally:
            row.cancel()  # a no-op once finished; drops the row when the client disconnected
        out = self.backend.result(row)
        yield {"event": "end", "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
               "completion_tokens": out.completion_tokens}
