"""OpenAI-compatible request/response shapes and errors for /v1/chat/completions.

Kept free of Ray and torch so the ingress, the tests and any client-side tool can use it.
Only the fields genpi acts on are modelled; other OpenAI fields (user, logit_bias, ...)
are accepted and ignored, as many clients send them by default. Fields whose meaning
genpi cannot honour (n > 1, tools, logprobs) are refused with a 400 naming the field
rather than silently answering something else.

genpi extension: `strength` (0..1) scales the adapter ("prompt strength": 0 = the bare
base, 1 = the full adapter, in between a partly internalized prompt).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from genpi.chat import valid_id

# A model id is a prompt id (genpi.chat's id rule: ids are directory names, so it is also
# the path-safety rule); a fingerprint names a folder under it.
FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,64}")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

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


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str

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


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    # OpenAI's default is 1.0 (sampling); send 0 for greedy, deterministic replies.
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # genpi extension: scale the adapter, 0 = base model, 1 = full adapter.
    strength: float | None = Field(default=None, ge=0, le=1)
    tools: Any = None
    logprobs: bool | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tool calls are not supported by this server")
        return None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    def new_tokens(self, limit: int) -> int:
        """The requested reply length, at most the server's limit (an error beyond it)."""
        want = self.max_completion_tokens or self.max_tokens or limit
        if want > limit:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{field}={want} exceeds this server's limit of {limit} (serve.max_new_tokens)",
                           param=field, code="max_tokens_too_large")
        return want


def parse_chat_request(raw: bytes | str | dict) -> ChatCompletionRequest:
    """Parse and validate a request body; a bad body is a 400 naming the first field at fault."""
    if isinstance(raw, (bytes, str)):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", param=None, code="invalid_json") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", param=None, code="invalid_body")
    try:
        return ChatCompletionRequest.model_validate(data)
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


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, genpi: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_ is not None:
        out["usage"] = usage_
    if genpi:
        out["genpi"] = genpi
    return out


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event; the stream ends with `data: [DONE]` as OpenAI's does."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def model_card(model_id: str, created: float, owned_by: str, **meta: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by, **meta}
