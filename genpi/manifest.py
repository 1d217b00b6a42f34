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
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from genpi.chat import valid_id
from genpi.checks import CHECK_CLASSES, CHECK_TYPES, Check
from genpi.config import typed_overrides
from genpi.yamlio import Scalar, YamlLoader, plain, typed

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")

# Ids become directory names and OpenAI `model` names: keep them to a portable charset.


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
        if not valid_id(v):
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
            doc = _json_loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{src}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}")
            return []
        return _split_document(src, _typed_document(doc), None, problems)
    try:
        doc = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
        node = yaml.compose(text, Loader=YamlLoader)  # noqa: S506 - for line numbers
    except yaml.YAMLError as e:
        problems.append(f"{src}: {_yaml_error(e)}")
        return []
    return _split_document(src, _typed_document(doc), node, problems)


def _json_loads(text: str) -> Any:
    # Numbers keep their text, as YAML's do: `"id": 2024` reaches the string field as "2024".
    return json.loads(text, parse_int=lambda t: Scalar(t, int(t)), parse_float=lambda t: Scalar(t, float(t)))


def _typed_document(doc: Any) -> Any:
    """The loaded document with scalars typed for the fields they feed (see genpi.yamlio)."""
    if isinstance(doc, list):
        return [_typed_entry(item) for item in doc]
    if isinstance(doc, dict) and "prompts" in doc and "prompt" not in doc and "id" not in doc:
        return {k: [_typed_entry(e) for e in v] if isinstance(v, list) else typed(v) for k, v in _items(doc)}
    return _typed_entry(doc)


def _typed_entry(item: Any) -> Any:
    if not isinstance(item, dict):
        return typed(item)
    out = typed(item, PromptEntry)
    overrides = dict(_items(item)).get("overrides")
    if isinstance(overrides, dict):  # typed for the config fields they set, not as Any
        out["overrides"] = typed_overrides(overrides)
    return out


def _items(d: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return [(plain(k), v) for k, v in d.items()]


def _read_jsonl(src: str, text: str, problems: list[str]) -> list[_Raw]:
    raws = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, and editors count only \n.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = _json_loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{src}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}")
            continue
        raws.append(_Raw(src, len(raws) + 1, _typed_entry(obj), lineno, jsonl=True))
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
    if len(loc) >= 3 and loc[0] == "checks" and isinstance(loc[1], int) and loc[2] in CHECK_CLASSES:
        model = CHECK_CLASSES[loc.pop(2)]
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
