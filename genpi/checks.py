"""Declared checks (regex, JSON, language, ...): what a manifest may declare, and how a reply is judged.

Schema and behaviour live side by side so that adding a check type is one edit in one file.
Replies come from small models mid-training, so anything can arrive: empty strings,
half-written JSON, walls of code. A check answers True or False and never raises on a
reply; only a programming error (an unknown check class) raises.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

log = logging.getLogger(__name__)

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_LANG_RE = re.compile(r"[a-z]{2,3}")
# A whole reply wrapped in one ``` fence (optionally ```json): the JSON is what is inside.
_FENCED = re.compile(r"^```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
# Fenced blocks (or an unterminated fence running to the end), inline code and URLs say
# nothing about the natural language a reply is written in.
_NOT_PROSE = re.compile(r"```.*?(```|\Z)|`[^`\n]*`|https?://\S+", re.DOTALL)
_MIN_LETTERS = 3
# Labels the detector may use for a language the manifest names otherwise (py3langid 0.3
# has both "nb" and "no" for Norwegian, 0.4 only "no").
_LANG_ALIASES = {"nb": "no"}


# --------------------------------------------------------------------------- schemas


class _CheckBase(BaseModel):
    # An unknown key is almost always a typo that would silently do nothing: refuse it.
    model_config = ConfigDict(extra="forbid")

    # A stable name keys the check's results in eval.json; None means derived from the check.
    name: str | None = Field(default=None, min_length=1)

    def default_name(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @property
    def display_name(self) -> str:
        return self.name or self.default_name()


def _flag_bits(flags: str) -> int:
    bits = 0
    for ch in flags:
        bits |= _REGEX_FLAGS.get(ch, 0)  # unknown letters are reported by RegexCheck._known_flags
    return bits


class RegexCheck(_CheckBase):
    """Passes when `re.search(pattern, reply)` finds a match (or finds none, with negate)."""

    type: Literal["regex"] = "regex"
    # flags before pattern: field validators run in declaration order, and pattern's needs flags.
    flags: str = ""
    pattern: str = Field(min_length=1)
    negate: bool = False

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, v: str) -> str:
        bad = sorted(set(v) - set(_REGEX_FLAGS))
        if bad:
            raise ValueError(f"unknown regex flag(s) {''.join(bad)!r}; use any of 'i', 'm', 's', 'x'")
        return v

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str, info: ValidationInfo) -> str:
        # A field (not model) validator, so a bad pattern is reported next to other errors in the check.
        try:
            re.compile(v, _flag_bits(info.data.get("flags", "")))
        except re.error as e:
            raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern, _flag_bits(self.flags))  # `re` caches compiled patterns

    def default_name(self) -> str:
        return f"{'not ' if self.negate else ''}regex:{self.pattern}"


class JsonCheck(_CheckBase):
    """Passes when the reply is a JSON object (``` fences and whitespace around it allowed)."""

    type: Literal["json"] = "json"
    required_keys: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    def default_name(self) -> str:
        return "json" + (f"+keys:{','.join(self.required_keys)}" if self.required_keys else "")


class LanguageCheck(_CheckBase):
    """Passes when py3langid identifies the reply's language as `lang`."""

    type: Literal["language"] = "language"
    lang: str
    # None: the most likely language must be `lang`; otherwise its probability must reach this too.
    min_confidence: float | None = Field(default=None, gt=0, le=1)

    @field_validator("lang")
    @classmethod
    def _iso_code(cls, v: str) -> str:
        code = v.strip().lower()
        if not _LANG_RE.fullmatch(code):
            raise ValueError(f"must be an ISO 639-1 language code such as 'fr' or 'de'; got {v!r}")
        # Fail at load time, not after hours of training, if the detector cannot say this language.
        known = supported_languages()
        if known and code not in known:
            raise ValueError(f"language {code!r} is not one py3langid can detect")
        return code

    def default_name(self) -> str:
        return f"language={self.lang}"


class _AffixCheck(_CheckBase):
    text: str = Field(min_length=1)
    case_sensitive: bool = False


class StartsWithCheck(_AffixCheck):
    """Passes when the reply, stripped of surrounding whitespace, starts with `text`."""

    type: Literal["starts_with"] = "starts_with"

    def default_name(self) -> str:
        return f"starts_with:{self.text}"


class EndsWithCheck(_AffixCheck):
    """Passes when the reply, stripped of surrounding whitespace, ends with `text`."""

    type: Literal["ends_with"] = "ends_with"

    def default_name(self) -> str:
        return f"ends_with:{self.text}"


class MaxLengthCheck(_CheckBase):
    """Passes when the stripped reply has at most `max_chars` characters and `max_words` words."""

    type: Literal["max_length"] = "max_length"
    max_chars: int | None = Field(default=None, gt=0)
    max_words: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> "MaxLengthCheck":
        if self.max_chars is None and self.max_words is None:
            raise ValueError("set max_chars, max_words or both")
        return self

    def default_name(self) -> str:
        parts = []
        if self.max_chars is not None:
            parts.append(f"{self.max_chars} chars")
        if self.max_words is not None:
            parts.append(f"{self.max_words} words")
        return "max_length:" + ",".join(parts)


Check = Annotated[
    Union[RegexCheck, JsonCheck, LanguageCheck, StartsWithCheck, EndsWithCheck, MaxLengthCheck],
    Field(discriminator="type"),
]
# The `type` tag -> its class (manifest errors name the fields of the class a check claims to be).
CHECK_CLASSES: dict[str, type[_CheckBase]] = {
    cls.model_fields["type"].default: cls
    for cls in (RegexCheck, JsonCheck, LanguageCheck, StartsWithCheck, EndsWithCheck, MaxLengthCheck)
}
CHECK_TYPES: tuple[str, ...] = tuple(CHECK_CLASSES)


# --------------------------------------------------------------------------- behaviour


def check_name(check: Check) -> str:
    """The check's `name`, or one derived from it such as "language=fr"."""
    return check.display_name


def run_checks(checks: Iterable[Check], text: str) -> dict[str, bool]:
    """{check name: passed} for every check on one reply."""
    return {check_name(c): run_check(c, text) for c in checks}


def run_check(check: Check, text: str) -> bool:
    """Whether `text` passes `check`; False (never an exception) for any malformed reply."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    handler = _HANDLERS.get(type(check))
    if handler is None:
        raise TypeError(f"unknown check type {type(check).__name__}")
    try:
        return bool(handler(check, text))
    except Exception:  # noqa: BLE001 - a reply must never crash an evaluation run
        log.warning("check %r raised on a reply; counting it as failed", check_name(check), exc_info=True)
        return False


def _regex(check: RegexCheck, text: str) -> bool:
    found = check.compiled().search(text) is not None
    return found != check.negate


def _json(check: JsonCheck, text: str) -> bool:
    body = text.strip()
    fenced = _FENCED.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
        return False
    return isinstance(value, dict) and all(k in value for k in check.required_keys)


def _language(check: LanguageCheck, text: str) -> bool:
    prose = _NOT_PROSE.sub(" ", text)
    prose = " ".join(prose.split())
    # Two letters cannot be told apart from any language: a near-empty reply fails.
    if sum(ch.isalpha() for ch in prose) < _MIN_LETTERS:
        return False
    lang, confidence = detect_language(prose)
    want = _LANG_ALIASES.get(check.lang, check.lang)
    if _LANG_ALIASES.get(lang, lang) != want:
        return False
    return check.min_confidence is None or (confidence is not None and confidence >= check.min_confidence)


def _affix(text: str, affix: str, case_sensitive: bool, at_start: bool) -> bool:
    body = text.strip()
    if not case_sensitive:
        body, affix = body.casefold(), affix.casefold()
    return body.startswith(affix) if at_start else body.endswith(affix)


def _starts_with(check: StartsWithCheck, text: str) -> bool:
    return _affix(text, check.text, check.case_sensitive, at_start=True)


def _ends_with(check: EndsWithCheck, text: str) -> bool:
    return _affix(text, check.text, check.case_sensitive, at_start=False)


def _max_length(check: MaxLengthCheck, text: str) -> bool:
    body = text.strip()
    if check.max_chars is not None and len(body) > check.max_chars:
        return False
    return check.max_words is None or len(body.split()) <= check.max_words


_HANDLERS: dict[type, Any] = {
    RegexCheck: _regex,
    JsonCheck: _json,
    LanguageCheck: _language,
    StartsWithCheck: _starts_with,
    EndsWithCheck: _ends_with,
    MaxLengthCheck: _max_length,
}


# --------------------------------------------------------------------------- language detection
# Only py3langid's top-level `rank` is used (public in 0.3 and 0.4): its identifier class,
# model file and constructors changed between those releases, `rank` did not.


def _ranked(text: str) -> list[tuple[str, float]]:
    """Every language py3langid knows with its probability for `text`, most likely first.

    `rank` gives raw naive-Bayes log scores; their softmax is the probability that
    py3langid's own `norm_probs=True` reports, computed here so that no private API is needed.
    Imported lazily: loading the model takes about a second and most commands never need it.
    """
    import py3langid  # noqa: PLC0415

    ranked = [(str(lang), float(score)) for lang, score in py3langid.rank(text)]
    scores = [s for _, s in ranked]
    if scores and all(0.0 <= s <= 1.0 for s in scores) and abs(sum(scores) - 1.0) < 1e-3:
        return ranked  # already probabilities (a release that normalises by default)
    top = max(scores, default=0.0)
    weights = [math.exp(s - top) for s in scores]  # shifted by the maximum: no overflow
    total = sum(weights) or 1.0
    return [(lang, w / total) for (lang, _), w in zip(ranked, weights)]


def detect_language(text: str) -> tuple[str, float | None]:
    """(language code, probability) for `text`; ("", None) if the detector knows no language."""
    ranked = _ranked(text)
    return ranked[0] if ranked else ("", None)


@functools.lru_cache(maxsize=1)
def supported_languages() -> frozenset[str]:
    """Codes the detector can return (empty if py3langid is unavailable, so nothing is refused)."""
    try:
        labels = {lang for lang, _ in _ranked("")}
    except Exception:  # noqa: BLE001 - a missing or changed detector must not block manifest loading
        return frozenset()
    return frozenset(labels | {alias for alias, target in _LANG_ALIASES.items() if target in labels})
