"""The Ray Serve app (CPU path): a FastAPI ingress calling multiplexed adapter replicas.

    HTTP -> GenpiIngress (parse, validate, resolve `model` through the registry, metrics)
         -> GenpiAdapters  (one base model + up to serve.max_adapters_per_replica PEFT
                            adapters, loaded on first use, least recently used evicted)

The ingress sends each request with `multiplexed_model_id = "<id>@<fingerprint>"`, so Ray
Serve routes it to a replica that already holds that adapter when there is one, and a
republished adapter (new fingerprint) is a new key that no replica has cached.

Build it with `build_app({"config": <GenpiConfig as a dict>})` (the import path in the
config `genpi serve --print-config` writes).
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the routes (as a string it became a required query parameter under Serve).
import asyncio
import logging
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from genpi.config import GenpiConfig
from genpi.serve import openai as oa
from genpi.serve.adapters import AdapterRef, AdapterRegistry
from genpi.serve.replica import GenpiAdapters
from genpi.serve.config import INGRESS, MODEL, app_args_config, base_model_name, deployment_options
from genpi.serve.openai import ApiError

log = logging.getLogger("genpi.serve")

api = FastAPI(title="genpi", description="OpenAI-compatible chat completions from internalized prompts")


def _api_error(e: BaseException) -> ApiError | None:
    """The ApiError inside `e`: Ray wraps a replica's exception (RayTaskError, `.cause`)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, ApiError) and hasattr(e, "status"):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Unknown routes and wrong methods in OpenAI's error shape too.
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                    type="invalid_request_error", code="not_found" if exc.status_code == 404 else None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # Only path/query parameters are validated by FastAPI (bodies are parsed by genpi).
    first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
    field = ".".join(str(p) for p in first["loc"])
    return _error_response(ApiError(400, f"field '{field}': {first['msg']}", param=field, code="invalid_field"))


class _Stats:
    """Per-model counters of this ingress replica for /genpi/stats (Prometheus has the rest)."""

    def __init__(self):
        self.by_model: dict[str, dict[str, Any]] = {}

    def record(self, model: str, ok: bool, seconds: float, prompt_tokens: int = 0, saved: int = 0) -> None:
        s = self.by_model.setdefault(model, {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                             "prompt_tokens_saved": 0, "latencies": deque(maxlen=2000)})
        s["requests"] += 1
        s["errors"] += 0 if ok else 1
        s["prompt_tokens"] += prompt_tokens
        s["prompt_tokens_saved"] += saved
        s["latencies"].append(seconds)

    def report(self) -> dict[str, Any]:
        out = {}
        for model, s in self.by_model.items():
            lat = sorted(s["latencies"])
            pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
            out[model] = {k: v for k, v in s.items() if k != "latencies"} | {"latency_ms_p50": pct(0.5),
                                                                              "latency_ms_p95": pct(0.95)}
        return out


@serve.deployment
@serve.ingress(api)
class GenpiIngress:
    def __init__(self, adapters, config: dict[str, Any]):
        from genpi.store import Store

        self.cfg = GenpiConfig.model_validate(config)
        self.adapters = adapters
        self.registry = AdapterRegistry(Store(self.cfg.store), self.cfg.serve.registry_refresh_s)
        self.base_name = base_model_name(self.cfg)
        self.stats = _Stats()
        tags = ("model",)
        # Ray Serve's own metrics already count requests and latency per deployment; these
        # add the adapter (`model`) dimension and the product's figure, input tokens saved.
        self.m_requests = metrics.Counter("genpi_requests", "Chat completion requests per model and status",
                                          tag_keys=("model", "status"))
        self.m_latency = metrics.Histogram("genpi_request_latency_ms", "End-to-end latency per model (ms)",
                                           boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                           tag_keys=tags)
        self.m_prompt = metrics.Counter("genpi_prompt_tokens", "Input tokens processed per model", tag_keys=tags)
        self.m_saved = metrics.Counter("genpi_prompt_tokens_saved",
                                       "Input tokens not sent because the adapter carries the prompt", tag_keys=tags)

    def _record(self, model: str, status: int, t0: float, prompt_tokens: int = 0, saved: int = 0) -> None:
        # Unknown/hostile ids are counted under one label: a client must not mint metric series.
        label = model if status < 400 or status >= 500 else "(rejected)"
        dt = time.perf_counter() - t0
        self.stats.record(label, status < 400, dt, prompt_tokens, saved)
        try:  # metrics must never fail a request that has been answered
            self.m_requests.inc(tags={"model": label, "status": str(status)})
            if status < 400:
                self.m_latency.observe(dt * 1000, tags={"model": label})
                if prompt_tokens > 0:
                    self.m_prompt.inc(prompt_tokens, tags={"model": label})
                # A counter only goes up: a prompt shorter than the chat template's default
                # system prompt (SmolLM2 sends one when there is none) saves a negative count,
                # which the response and /genpi/stats report and Prometheus counts as 0.
                if saved > 0:
                    self.m_saved.inc(saved, tags={"model": label})
        except Exception:  # noqa: BLE001
            log.exception("recording metrics failed")

    # ---- health ---------------------------------------------------------------------
    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        try:
            info = await asyncio.wait_for(self.adapters.ready.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return _error_response(ApiError(503, f"model replicas are not ready: {type(e).__name__}: {e}",
                                            type="server_error", code="not_ready"))
        return {"status": "ready", **info}

    @api.get("/genpi/stats")
    async def stats_report(self):
        return {"models": self.stats.report()}

    # ---- models -----------------------------------------------------------------------
    def _card(self, model_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        meta = {k: entry[k] for k in ("fingerprint", "kl_ratio") if k in entry}
        return oa.model_card(model_id, entry.get("published_at", 0), "genpi", root=self.base_name, genpi=meta)

    @api.get("/v1/models")
    async def models(self):
        published = await asyncio.to_thread(self.registry.published)
        data = [oa.model_card(self.base_name, 0, "genpi", root=self.base_name, genpi={"base": True})]
        data += [self._card(i, e) for i, e in published if i != self.base_name]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        if model_id == self.base_name:
            return oa.model_card(self.base_name, 0, "genpi", root=self.base_name, genpi={"base": True})
        try:
            ref = await asyncio.to_thread(self.registry.resolve, model_id)
        except ApiError as e:
            return _error_response(e)
        return self._card(ref.id, self.registry.entries()[ref.id])

    # ---- chat ---------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        t0 = time.perf_counter()
        model = "(rejected)"
        try:
            req = oa.parse_chat_request(await request.body())
            model = req.model
            req.new_tokens(self.cfg.serve.max_new_tokens)  # a 400 here, not inside a replica
            if req.model == self.base_name:  # the base wins over an adapter of the same name
                ref, handle = None, self.adapters
            else:
                ref = await asyncio.to_thread(self.registry.resolve, req.model)
                handle = self.adapters.options(multiplexed_model_id=ref.key)
            payload = req.model_dump(mode="json")
            if req.stream:
                return await self._stream(req, ref, handle, payload, t0)
            out = await handle.generate.remote(payload)
        except Exception as e:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            err = _api_error(e) or ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            if err.status >= 500:
                log.exception("request for model %r failed", model[:80])
            self._record(model, err.status, t0)
            return _error_response(err)
        genpi = self._genpi_meta(ref, out, req)
        self._record(req.model, 200, t0, out["prompt_tokens"], genpi.get("prompt_tokens_saved", 0))
        return oa.chat_completion(oa.completion_id(), req.model, out["text"], out["finish_reason"],
                                  out["prompt_tokens"], out["completion_tokens"], genpi)

    @staticmethod
    def _genpi_meta(ref: AdapterRef | None, out: dict[str, Any], req: oa.ChatCompletionRequest) -> dict[str, Any]:
        if ref is None:
            return {"adapter": None}
        return {"adapter": ref.id, "fingerprint": ref.fingerprint, "prompt_tokens_saved": out["tokens_saved"],
                "strength": 1.0 if req.strength is None else req.strength}

    async def _stream(self, req, ref, handle, payload, t0):
        gen = handle.options(stream=True).stream.remote(payload)
        # The first item arrives once the adapter is loaded: errors before it (unknown or
        # unpublished adapter, bad request) still get a proper HTTP status, not a broken stream.
        first = await gen.__anext__()
        cid, created = oa.completion_id(), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            status = 200
            end: dict[str, Any] = {}
            try:
                yield oa.sse(oa.chunk(cid, req.model, created, {"role": "assistant", "content": ""}))
                async for item in gen:
                    if "delta" in item:
                        yield oa.sse(oa.chunk(cid, req.model, created, {"content": item["delta"]}))
                    else:
                        end = item
                genpi = self._genpi_meta(ref, {"tokens_saved": first["tokens_saved"]}, req)
                yield oa.sse(oa.chunk(cid, req.model, created, {}, end["finish_reason"], genpi=genpi))
                if include_usage:
                    u = oa.usage(end["prompt_tokens"], end["completion_tokens"])
                    yield oa.sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                  "model": req.model, "choices": [], "usage": u})
                yield oa.sse("[DONE]")
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in-stream
                status = 500
                log.exception("stream for model %r failed", req.model)
                err = _api_error(e) or ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                yield oa.sse(err.body())
            finally:
                saved = self._genpi_meta(ref, {"tokens_saved": first["tokens_saved"]}, req).get("prompt_tokens_saved", 0)
                self._record(req.model, status, t0, end.get("prompt_tokens", 0), saved if status == 200 else 0)

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict[str, Any]):
    """Application builder for `serve run`/`serve deploy`: args = {"config": GenpiConfig dict}."""
    from genpi.config import ConfigError, _validate

    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        raise ConfigError("serve app args: expected {'config': <genpi config mapping>}")
    cfg = _validate(args["config"], "serve app args 'config'")
    config = app_args_config(cfg)
    opts = deployment_options(cfg)
    model = GenpiAdapters.options(name=MODEL, **opts[MODEL]).bind(config)
    return GenpiIngress.options(name=INGRESS, **opts[INGRESS]).bind(model, config)
