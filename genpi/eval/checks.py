"""Run a manifest's declared checks (regex, JSON, language, ...) on one model reply.

Replies come from small models mid-training, so anything can arrive: empty strings,
half-written JSON, walls of code. A check answers True or False and never raises on a
reply; only a programming error (an unknown check class) raises.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Iterable

from genpi.manifest import (
    Check,
    EndsWithCheck,
    JsonCheck,
    LanguageCheck,
    MaxLengthCheck,
    RegexCheck,
    StartsWithCheck,
)

log = logging.getLogger(__name__)

# A whole reply wrapped in one ``` fence (optionally ```json): the JSON is what is inside.
_FENCED = re.compile(r"^```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
# Fenced blocks (or an unterminated fence running to the end), inline code and URLs say
# nothing about the natural language a reply is written in.
_NOT_PROSE = re.compile(r"```.*?(```|\Z)|`[^`\n]*`|https?://\S+", re.DOTALL)
_MIN_LETTERS = 3
# Labels the detector may use for a language the manifest names otherwise.
_LANG_ALIASES = {"nb": "no"}


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


@functools.lru_cache(maxsize=1)
def _identifier() -> Any:
    """py3langid's identifier with normalised probabilities (needed for min_confidence).

    Imported lazily: loading the model takes about a second and most commands never need it.
    """
    from py3langid import langid  # noqa: PLC0415

    cls = langid.LanguageIdentifier
    # py3langid renamed its constructor between releases; the module-level default has raw
    # scores only, so it is the last resort (confidence then unknown).
    for factory in ("from_model_file", "from_pickled_model"):
        if hasattr(cls, factory):
            return getattr(cls, factory)(langid.MODEL_FILE, norm_probs=True)
    return None


def detect_language(text: str) -> tuple[str, float | None]:
    """(language code, probability or None if this py3langid cannot tell) for `text`."""
    ident = _identifier()
    if ident is None:
        import py3langid  # noqa: PLC0415

        return str(py3langid.classify(text)[0]), None
    lang, prob = ident.classify(text)
    return str(lang), float(prob)


@functools.lru_cache(maxsize=1)
def supported_languages() -> frozenset[str]:
    """Codes the detector can return (empty if py3langid is unavailable, so nothing is refused)."""
    try:
        ident = _identifier()
        if ident is None:
            from py3langid import langid  # noqa: PLC0415

            ident = langid._get_identifier()  # noqa: SLF001 - the only way to reach its labels
        labels = set(ident.nb_classes)
    except Exception:  # noqa: BLE001 - a missing or changed detector must not block manifest loading
        return frozenset()
    return frozenset(labels | {alias for alias, target in _LANG_ALIASES.items() if target in labels})
