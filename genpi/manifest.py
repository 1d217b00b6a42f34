"""The prompt manifest: which system prompts to internalize, and how to judge the result.

A manifest is a YAML, JSON or JSONL file, or a directory of them. Each entry names one
prompt (its `id` becomes a directory name and an API model name), optional seed inputs
for synthesis, optional checks the evaluation runs on replies, and optional config
overrides. Every problem in every file is collected before one `ManifestError` is raised,
so a user fixes a broken manifest in one pass instead of one error per run.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")

# Ids become directory names and OpenAI `model` names: keep them to a portable charset.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: `$` accepts a final "\n"
_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_LANG_RE = re.compile(r"[a-z]{2,3}")


class ManifestError(ValueError):
    """One or more manifest problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Survives pickling (Ray ships exceptions between processes) with `problems` intact.
        return (type(self), (self.problems,))


class _Strict(BaseModel):
    # An unknown key is almost always a typo that would silently do nothing: refuse it.
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- checks


class _CheckBase(_Strict):
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
        from genpi.eval.checks import supported_languages  # lazy: loads the langid model

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
_CHECK_CLASSES: dict[str, type[_CheckBase]] = {
    cls.model_fields["type"].default: cls
    for cls in (RegexCheck, JsonCheck, LanguageCheck, StartsWithCheck, EndsWithCheck, MaxLengthCheck)
}
CHECK_TYPES: tuple[str, ...] = tuple(_CHECK_CLASSES)


# --------------------------------------------------------------------------- entries


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


_NonBlank = Annotated[str, AfterValidator(_non_blank)]


class PromptEntry(_Strict):
    id: str
    # Kept verbatim (never stripped): the exact text is what the teacher sees and what is fingerprinted.
    prompt: _NonBlank
    seed_inputs: list[_NonBlank] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    # Config overrides for this prompt only: dotted ("train.epochs": 3) or nested dicts.
    overrides: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None

    # Where the entry was read ("file: entry N (id=x)"), for later error messages. Private so
    # that it never enters model_dump() and hence never changes a fingerprint.
    _origin: str | None = PrivateAttr(default=None)

    @property
    def origin(self) -> str | None:
        return self._origin

    def __eq__(self, other: object) -> bool:
        # pydantic compares private attributes too; where an entry was read is not what it is.
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable model, as pydantic's default

    @field_validator("id")
    @classmethod
    def _portable_id(cls, v: str) -> str:
        if not _ID_RE.fullmatch(v) or ".." in v:
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', start with a letter "
                f"or digit and contain no '..' (it becomes a directory name and an API model name); got {v!r}"
            )
        return v

    @field_validator("checks")
    @classmethod
    def _unique_check_names(cls, v: list[Any]) -> list[Any]:
        # Results are keyed by check name; two checks with one name would overwrite each other.
        seen: dict[str, int] = {}
        for i, check in enumerate(v):
            name = check.display_name
            if name in seen:
                raise ValueError(
                    f"checks[{seen[name]}] and checks[{i}] have the same name {name!r}; give one a distinct 'name'"
                )
            seen[name] = i
        return v


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:  # a list, not a set: YAML keys may be unhashable (the base class reports those)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


class _Raw:
    """One unvalidated entry and where it came from."""

    def __init__(self, source: str, index: int, data: Any, line: int | None, jsonl: bool):
        self.source, self.index, self.data, self.line, self.jsonl = source, index, data, line, jsonl

    def label(self) -> str:
        ident = self.data.get("id") if isinstance(self.data, dict) else None
        shown = f"id={ident[:80]}" if isinstance(ident, str) else None
        if self.jsonl:
            where = f"line {self.line}"
            extra = [shown] if shown else []
        else:
            where = f"entry {self.index}"
            extra = [p for p in (shown, f"line {self.line}" if self.line else None) if p]
        return f"{self.source}: {where}" + (f" ({', '.join(extra)})" if extra else "")


def load_manifest(
    path: str | os.PathLike[str],
    validate_overrides: Callable[[dict[str, Any]], None] | None = None,
) -> list[PromptEntry]:
    """Read and validate a manifest file or directory; raise ManifestError listing every problem.

    `validate_overrides(overrides)` (e.g. `lambda o: cfg.with_overrides(o)`) may raise
    ValueError for a bad per-prompt override; it becomes a problem on field 'overrides'.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f
            for f in p.iterdir()
            if f.is_file() and f.suffix.lower() in MANIFEST_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            raise ManifestError([f"{p}: directory holds no manifest files ({', '.join(MANIFEST_SUFFIXES)})"])
    elif p.is_file():
        files = [p]
    else:
        raise ManifestError([f"{p}: manifest file or directory not found"])

    problems: list[str] = []
    entries: list[PromptEntry] = []
    first_seen: dict[str, _Raw] = {}  # casefolded id -> first entry with it, across all files
    for f in files:  # file by file, so that problems come out in file order
        for raw in _read_file(f, problems):
            entry_problems: list[str] = []
            entry = _validate_entry(raw, validate_overrides, entry_problems)
            problems.extend(entry_problems)
            if _is_duplicate(raw, first_seen, problems):
                continue
            if entry is not None and not entry_problems:
                entries.append(entry)

    if not problems and not entries:
        problems.append(f"{p}: manifest holds no prompts")
    if problems:
        raise ManifestError(problems)
    return entries


def _is_duplicate(raw: _Raw, first_seen: dict[str, _Raw], problems: list[str]) -> bool:
    ident = raw.data.get("id") if isinstance(raw.data, dict) else None
    if not isinstance(ident, str) or not ident:
        return False
    # Case-insensitive: 'French' and 'french' would share a directory on macOS and Windows.
    key = ident.casefold()
    other = first_seen.setdefault(key, raw)
    if other is raw:
        return False
    first_id = other.data["id"]
    what = "duplicate id" if first_id == ident else f"id differs only in letter case from {first_id!r}"
    problems.append(f"{raw.label()}: field 'id': {what}; first defined at {other.label()}")
    return True


def validate_prompt_lengths(
    entries: Iterable[PromptEntry],
    count_tokens: Callable[[str], int],
    max_tokens: int,
    source: str = "manifest",
) -> list[str]:
    """Problems (one line each) for prompts longer than `max_tokens` by `count_tokens`."""
    problems = []
    for entry in entries:
        n = count_tokens(entry.prompt)
        if n > max_tokens:
            where = entry._origin or f"{source}: id={entry.id}"
            problems.append(
                f"{where}: field 'prompt': prompt '{entry.id}' is {n} tokens long, "
                f"more than the limit of {max_tokens}"
            )
    return problems


def _read_file(f: Path, problems: list[str]) -> list[_Raw]:
    src = str(f)
    try:
        data = f.read_bytes()
    except OSError as e:
        problems.append(f"{src}: cannot read: {e.strerror or e}")
        return []
    try:
        # Plain "utf-8", not "utf-8-sig": the latter reports offsets relative to after a BOM.
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(
            f"{src}: not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
            "save the file as UTF-8"
        )
        return []
    if not text.strip():
        problems.append(f"{src}: file is empty")
        return []
    if f.suffix.lower() == ".jsonl":
        return _read_jsonl(src, text, problems)
    if f.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{src}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}")
            return []
        return _split_document(src, doc, None, problems)
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        problems.append(f"{src}: {_yaml_error(e)}")
        return []
    return _split_document(src, doc, node, problems)


def _read_jsonl(src: str, text: str, problems: list[str]) -> list[_Raw]:
    raws = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, and editors count only \n.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{src}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}")
            continue
        raws.append(_Raw(src, len(raws) + 1, obj, lineno, jsonl=True))
    return raws  # never silently empty: the text is not blank, so each line parsed or was reported


def _split_document(src: str, doc: Any, node: yaml.Node | None, problems: list[str]) -> list[_Raw]:
    """A document is one entry mapping, a list of them, or {prompts: [...]}."""
    items_node = node
    if isinstance(doc, dict) and "prompts" in doc and "prompt" not in doc and "id" not in doc:
        extra = sorted(str(k) for k in doc if k != "prompts")
        if extra:
            problems.append(f"{src}: unknown top-level key(s) {', '.join(extra)}; expected only 'prompts'")
        items_node = _mapping_value(node, "prompts")
        doc = doc["prompts"]
        if not isinstance(doc, list):
            problems.append(f"{src}: 'prompts' must be a list of prompt entries, got {_kind(doc)}")
            return []
    elif isinstance(doc, dict):
        return [_Raw(src, 1, doc, _line(node), jsonl=False)]
    elif doc is None:
        problems.append(f"{src}: file is empty")
        return []
    elif not isinstance(doc, list):
        problems.append(
            f"{src}: expected a prompt entry (a mapping with 'id' and 'prompt'), a list of them, "
            f"or {{prompts: [...]}}; got {_kind(doc)}"
        )
        return []
    if not doc:
        problems.append(f"{src}: file holds no prompts")
        return []
    children = items_node.value if isinstance(items_node, yaml.SequenceNode) else [None] * len(doc)
    return [_Raw(src, i + 1, item, _line(node), jsonl=False) for i, (item, node) in enumerate(zip(doc, children))]


def _validate_entry(
    raw: _Raw, validate_overrides: Callable[[dict[str, Any]], None] | None, problems: list[str]
) -> PromptEntry | None:
    label = raw.label()
    if not isinstance(raw.data, dict):
        problems.append(f"{label}: expected a mapping with 'id' and 'prompt', got {_kind(raw.data)}")
        return None
    entry: PromptEntry | None = None
    try:
        entry = PromptEntry.model_validate(raw.data)
        entry._origin = label
    except ValidationError as e:
        problems.extend(f"{label}: {_describe(err)}" for err in e.errors())
    overrides = raw.data.get("overrides")
    if validate_overrides is not None and isinstance(overrides, dict) and overrides:
        try:
            validate_overrides(overrides)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            problems.append(f"{label}: field 'overrides': {msg}")
        except (ValueError, TypeError, KeyError) as e:
            msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            problems.append(f"{label}: field 'overrides': {msg or type(e).__name__}")
    return entry


def _describe(err: Any) -> str:
    """One pydantic error as "field 'checks[1].pattern': message" in the user's vocabulary."""
    loc = list(err["loc"])
    model: type[BaseModel] = PromptEntry
    # A discriminated union puts the tag in the location ('checks', 0, 'regex', 'pattern'): drop it.
    if len(loc) >= 3 and loc[0] == "checks" and isinstance(loc[1], int) and loc[2] in _CHECK_CLASSES:
        model = _CHECK_CLASSES[loc.pop(2)]
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = f"unknown key (allowed: {', '.join(model.model_fields)})"
    elif kind == "union_tag_invalid":
        msg = f"unknown check type {err['input'].get('type')!r}; use one of {', '.join(CHECK_TYPES)}"
    elif kind == "union_tag_not_found":
        msg = f"a check needs a 'type': one of {', '.join(CHECK_TYPES)}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"field '{field}': {msg}" if field else msg


def _mapping_value(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                return v
    return None


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}invalid YAML: {problem}" + (f" ({context})" if context else "")


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
