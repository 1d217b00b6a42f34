"""OpenAI-compatible request/response shapes and errors for /v1/chat/completions.

Kept free of Ray and torch so the ingress, the tests and any client-side tool can use it.
Only the fields genpi acts on are modelled; other OpenAI fields (user, metadata, store, ...)
are accepted and ignored, as many clients send them by default. Fields whose meaning genpi
cannot honour (response_format other than text, logit_bias, the penalties, n > 1, tools,
logprobs, audio) are refused with a 400 naming the field rather than silently answering
something else. Types are strict (`"stream": "yes"` and `"max_tokens": "8"` are 400s, not
coerced): a client that sends a string where a number belongs has a bug we should show.

genpi extension: `strength` (0..1) scales the adapter ("prompt strength": 0 = the bare
base, 1 = the full adapter, in between a partly internalized prompt).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genpi.chat import valid_id

# A model id is a prompt id (genpi.chat's id rule: ids are directory names, so it is also
# the path-safety rule); a fingerprint names a folder under it.
FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Below this a sampling temperature divides logits into inf/NaN (a 1e-45 temperature
# crashed sampling); vLLM also treats temperatures under 1e-2 specially. 0 means greedy.
MIN_TEMPERATURE = 0.01
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's seed range; torch.manual_seed refuses beyond 64 bits
MAX_STOP = 4  # OpenAI's limit on stop sequences


def _safe(text: str) -> str:
    # A message may quote client input; a lone surrogate in it could not be encoded as UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, _safe(message), param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        # Crosses Ray process boundaries (replica -> ingress) with its fields intact.
        return (type(self), (self.status, self.message, self.param, self.type, self.code))


def check_model_id(model_id: str) -> None:
    """400 for an id the manifest could not have produced: it never reaches a path."""
    if not valid_id(model_id):
        # repr() so control characters and URL tricks are visible, and truncated so a
        # hostile megabyte id is not echoed back.
        raise ApiError(
            400,
            f"model {model_id[:80]!r} is not a valid model id: ids are 1-128 letters, digits, '.', '_' "
            "or '-', start with a letter or digit and contain no '..'",
            param="model", code="invalid_model_id",
        )


def _no_surrogates(v: str) -> str:
    # JSON may escape a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode it.
    if _SURROGATE.search(v):
        raise ValueError("contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid text")
    return v


Text = Annotated[str, AfterValidator(_no_surrogates)]


class _Strict(BaseModel):
    # strict: no string -> number/bool coercion; extra="ignore": unknown OpenAI fields pass.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ChatMessage(_Strict):
    # `developer` is OpenAI's newer name for the system role (o1 and later): the same
    # instructions, so it is rendered as a system message (the chat template knows no other).
    role: Literal["system", "user", "assistant"]
    content: Text

    @field_validator("role", mode="before")
    @classmethod
    def _developer(cls, v: Any) -> Any:
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        # OpenAI also allows a list of content parts; text parts are joined, others refused.
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} is not a text part; only text is supported")
                texts.append(part["text"])
            return "".join(texts)
        return v


class StreamOptions(_Strict):
    include_usage: bool = False


def _refuse(field: str, why: str):
    raise ValueError(f"'{field}' is not supported by this server: {why}")


class ChatCompletionRequest(_Strict):
    model: Text = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    # OpenAI's default is 1.0 (sampling); send 0 for greedy, deterministic replies.
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    # Text at which the reply ends (not included), as OpenAI: a string or up to 4 strings.
    stop: list[Text] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # genpi extension: scale the adapter, 0 = base model, 1 = full adapter.
    strength: float | None = Field(default=None, ge=0, le=1)
    # Refused unless they ask for the default behaviour (see the validators below).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; got {v!r}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # a list from here on (no union in error locations)

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, stops: list[str] | None) -> list[str] | None:
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed; got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops or None

    # Each of these is an OpenAI feature genpi does not implement: answering anyway would
    # silently give something else than what was asked. Their default values are accepted.
    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: Any, info) -> None:
        if v:
            _refuse(info.field_name, "tool calls are not supported")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any, info) -> None:
        if v is not None and v != "none":
            _refuse(info.field_name, "tool calls are not supported (only 'none')")

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any, info) -> None:
        if v not in (None, False, 0):
            _refuse(info.field_name, "logprobs are not returned")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: Any) -> None:
        if v not in (None, {}):
            _refuse("logit_bias", "token biases are not applied")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: Any, info) -> None:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != 0):
            _refuse(info.field_name, "only 0 (no penalty) is supported")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: Any) -> None:
        if v is not None and v != {"type": "text"}:
            _refuse("response_format", "only {'type': 'text'} is supported (no JSON mode or schema)")

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v: Any) -> None:
        if v is not None:
            _refuse("audio", "replies are text only")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: Any) -> None:
        if v is not None and v != ["text"]:
            _refuse("modalities", "replies are text only (['text'])")

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            # As OpenAI: the option only means something for a stream.
            raise ApiError(400, "field 'stream_options': only allowed when 'stream' is true",
                           param="stream_options", code="invalid_field")
        return self

    def new_tokens(self, limit: int) -> int:
        """The requested reply length, at most the server's limit (an error beyond it)."""
        want = self.max_completion_tokens or self.max_tokens or limit
        if want > limit:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{field}={want} exceeds this server's limit of {limit} (serve.max_new_tokens)",
                           param=field, code="max_tokens_too_large")
        return want

    def chat_messages(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


def check_context(prompt_tokens: int, new_tokens: int, context: int, explicit: bool) -> int:
    """The reply length to generate, or a 400 when prompt + reply cannot fit the context.

    An explicit max_tokens that does not fit is refused (as OpenAI); without one, the reply
    gets what is left of the context (up to `new_tokens`), and only a prompt that leaves no
    room at all is refused."""
    room = context - prompt_tokens
    if room < 1 or (explicit and new_tokens > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + new_tokens} tokens ({prompt_tokens} in the messages, {new_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages", code="context_length_exceeded")
    return min(new_tokens, room)


def parse_chat_request(raw: bytes | str | dict) -> ChatCompletionRequest:
    """Parse and validate a request body; a bad body is a 400 naming the first field at fault."""
    if isinstance(raw, (bytes, str)):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", param=None, code="invalid_json") from None
        except RecursionError:  # e.g. 100k nested arrays: Python's parser gives up (was a 500)
            raise ApiError(400, "the request body is nested too deeply", param=None, code="invalid_json") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", param=None, code="invalid_body")
    try:
        return ChatCompletionRequest.model_validate(data)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", param=None, code="invalid_body") from None
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "is required"
        more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        raise ApiError(400, f"field '{field}': {msg}{more}", param=field, code="invalid_field") from None


# ---------------------------------------------------------------------------- responses
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, genpi: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if genpi:
        out["genpi"] = genpi  # extension: adapter fingerprint, input tokens saved, strength
    return out


def chunk(cid: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, genpi: dict[str, Any] | None = None,
          include_usage: bool = False) -> dict[str, Any]:
    """One stream chunk; delta=None is the final usage-only chunk (no choices).

    With stream_options.include_usage every chunk has "usage" (null until the last), as OpenAI."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if usage_ is not None or include_usage:
        out["usage"] = usage_
    if genpi:
        out["genpi"] = genpi
    return out


class StopText:
    """Cuts a reply at the first of the request's stop sequences (the stop text excluded),
    also when it spans streamed deltas: text that may be the start of a stop sequence is
    held back until the next delta shows whether it is."""

    def __init__(self, stops: list[str] | None):
        self.stops, self.held, self.stopped = stops or [], "", False

    def feed(self, delta: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else delta
        text = self.held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    @classmethod
    def cut(cls, text: str, stops: list[str] | None) -> tuple[str, bool]:
        s = cls(stops)
        out = s.feed(text) + s.flush()
        return out, s.stopped


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event; the stream ends with `data: [DONE]` as OpenAI's does."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def model_card(model_id: str, created: float, owned_by: str, **meta: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by, **meta}
