"""The Ray Serve app (CPU path): a FastAPI ingress calling multiplexed adapter replicas.

    HTTP -> GenpiIngress (parse, validate, resolve `model` through the registry, metrics)
         -> GenpiAdapters  (one base model + up to serve.max_adapters_per_replica PEFT
                            adapters, loaded on first use, least recently used evicted)

The ingress sends each request with `multiplexed_model_id = "<id>@<fingerprint>"`, so Ray
Serve routes it to a replica that already holds that adapter when there is one, and a
republished adapter (new fingerprint) is a new key that no replica has cached.

The ingress refuses what a replica must never see (bad fields, a body over serve.max_request_bytes,
a prompt that cannot fit the model's context) and resolves the reply length once: the
payload a replica receives has `max_tokens` set (the most tokens to generate) and `stop`
as a list of strings or null. Errors are answered in OpenAI's shape; a replica that dies
mid-request is a 503 (retryable), and no error body carries a traceback, path or actor id.

Build it with `build_app({"config": <GenpiConfig as a dict>})` (the import path in the
config `genpi serve --print-config` writes).
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the routes (as a string it became a required query parameter under Serve).
import asyncio
import logging
import threading
import time
import uuid
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
from genpi.serve.adapters import AdapterRef, AdapterRegistry, adapter_id
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


def _replica_gone(e: BaseException) -> bool:
    """A model replica (or its node) died or is unavailable: retryable, not a client error."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    gone = (RayActorError, WorkerCrashedError, NodeDiedError, BackPressureError, DeploymentUnavailableError,
            ReplicaUnavailableError)
    for _ in range(5):  # Ray may wrap the cause (RayTaskError.cause)
        if e is None:
            return False
        if isinstance(e, gone):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


def _to_api_error(e: BaseException, model: str) -> ApiError:
    """Every failure as an OpenAI-shaped error. Only ApiErrors (written for clients) are
    shown as they are; anything else is logged here with a reference and answered without
    its text, which may hold a traceback, file paths or actor ids."""
    err = _api_error(e)
    if err is not None:
        return err
    if _replica_gone(e):
        log.warning("request for model %r: the model replica is gone (%s); answered 503", model[:80], type(e).__name__)
        return ApiError(503, "the model replica serving this request stopped or is unavailable; retry the request",
                        type="server_error", code="replica_unavailable")
    ref = uuid.uuid4().hex[:12]
    log.error("request for model %r failed (reference %s)", model[:80], ref, exc_info=e)
    return ApiError(500, f"internal server error (reference {ref}); the details are in the server log",
                    type="server_error", code="internal_error")


def _error_response(e: ApiError) -> JSONResponse:
    # 503 is retryable: say when (the OpenAI client retries 5xx on its own).
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` (declared or streamed)."""
    too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       param=None, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():  # a chunked body has no Content-Length
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


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


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    # Anything a route did not answer itself: OpenAI's shape, no traceback in the body.
    return _error_response(_to_api_error(exc, "(unknown)"))


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
        from transformers import AutoConfig

        from genpi.models import context_limit, load_tokenizer, resolve_model
        from genpi.store import Store

        self.cfg = GenpiConfig.model_validate(config)
        # The ingress counts prompt tokens itself (same tokenizer and chat template as the
        # replicas), so a prompt that cannot fit the context is a 400 before it reaches, and
        # queues on, a model replica. The tokenizer is shared by the request threads: its
        # Rust object must not be used from two threads at once, hence the lock.
        self.tok = load_tokenizer(self.cfg.model)
        resolved = resolve_model(self.cfg.model)
        self.context = context_limit(AutoConfig.from_pretrained(resolved.path, revision=self.cfg.model.revision),
                                     self.cfg.model)
        self.tok_lock = threading.Lock()
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
            # Only the exception's class: its text may name actors, nodes and paths.
            return _error_response(ApiError(503, f"model replicas are not ready ({type(e).__name__})",
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
        name = adapter_id(model_id, self.base_name)
        if name is None:
            return oa.model_card(self.base_name, 0, "genpi", root=self.base_name, genpi={"base": True})
        try:
            ref = await asyncio.to_thread(self.registry.resolve, name)
        except ApiError as e:
            return _error_response(e)
        return self._card(model_id, self.registry.entries()[ref.id])

    def _count_prompt(self, messages: list[dict[str, str]]) -> int:
        from genpi.engines.base import render_chat

        with self.tok_lock:
            return len(render_chat(self.tok, messages))

    # ---- chat ---------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        t0 = time.perf_counter()
        model = "(rejected)"
        try:
            req = oa.parse_chat_request(await _read_body(request, self.cfg.serve.max_request_bytes))
            model = req.model
            new = req.new_tokens(self.cfg.serve.max_new_tokens)  # a 400 here, not inside a replica
            explicit = req.max_completion_tokens is not None or req.max_tokens is not None
            prompt = await asyncio.to_thread(self._count_prompt, req.chat_messages())
            new = oa.check_context(prompt, new, self.context, explicit)
            name = adapter_id(req.model, self.base_name)  # the base wins over an adapter of the same name
            if name is None:
                ref, handle = None, self.adapters
            else:
                ref = await asyncio.to_thread(self.registry.resolve, name)
                handle = self.adapters.options(multiplexed_model_id=ref.key)
            # The replica generates exactly `new` tokens at most (resolved here once) and
            # receives `stop` as a list; see the module docstring for what it must honour.
            payload = req.model_dump(mode="json") | {"max_tokens": new, "max_completion_tokens": None}
            if req.stream:
                return await self._stream(req, ref, handle, payload, t0)
            call = handle.generate.remote(payload)
            try:
                out = await call
            except asyncio.CancelledError:  # the client went away: stop the replica's work too
                call.cancel()
                raise
        except Exception as e:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            err = _to_api_error(e, model)
            self._record(model, err.status, t0)
            return _error_response(err)
        genpi = self._genpi_meta(ref, out, req)
        self._record(req.model, 200, t0, out["prompt_tokens"], genpi.get("prompt_tokens_saved", 0))
        text, stopped = oa.StopText.cut(out["text"], req.stop)
        return oa.chat_completion(oa.completion_id(), req.model, text, "stop" if stopped else out["finish_reason"],
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

        def piece(delta, finish=None, **kw):
            return oa.sse(oa.chunk(cid, req.model, created, delta, finish, include_usage=include_usage, **kw))

        async def events():
            status, done = 200, False
            end: dict[str, Any] = {}
            stop = oa.StopText(req.stop)
            try:
                yield piece({"role": "assistant", "content": ""})
                # Text after a stop sequence is dropped; the stream is still read to its end
                # for the usage figures (the replica stops early once it honours `stop`).
                async for item in gen:
                    if "delta" in item:
                        if text := stop.feed(item["delta"]):
                            yield piece({"content": text})
                    else:
                        end = item
                if text := stop.flush():
                    yield piece({"content": text})
                genpi = self._genpi_meta(ref, {"tokens_saved": first["tokens_saved"]}, req)
                yield piece({}, "stop" if stop.stopped else end["finish_reason"], genpi=genpi)
                if include_usage:
                    yield piece(None, usage_=oa.usage(end["prompt_tokens"], end["completion_tokens"]))
                yield oa.sse("[DONE]")
                done = True
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in-stream
                err = _to_api_error(e, req.model)
                status = err.status
                # OpenAI's in-stream error event (the client raises it as an APIError), then
                # [DONE], so a client reading to the end does not wait for more.
                yield oa.sse(err.body())
                yield oa.sse("[DONE]")
                done = True
            finally:
                if not done:  # the client disconnected: cancel the replica's stream
                    gen.cancel()
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
