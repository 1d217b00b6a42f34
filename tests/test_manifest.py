"""Manifest loading: every accepted shape, and a clear message for every kind of mistake."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from genpi.checks import JsonCheck, LanguageCheck, RegexCheck
from genpi.manifest import ManifestError, PromptEntry, load_manifest, validate_prompt_lengths

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == "\n".join(err.problems)  # one problem per line
    return err.problems


def only_problem(path: Path, **kwargs) -> str:
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- valid shapes


def test_single_mapping(tmp_path):
    f = write(
        tmp_path / "one.yaml",
        "id: french\nprompt: Always answer in French.\nseed_inputs: [Hi, 'How are you?']\n"
        "checks:\n  - {type: language, lang: fr}\n  - {type: regex, pattern: 'bonjour', flags: i}\n"
        "overrides: {train.epochs: 2}\ndescription: test\n",
    )
    [entry] = load_manifest(f)
    assert entry.id == "french"
    assert entry.prompt == "Always answer in French."
    assert entry.seed_inputs == ["Hi", "How are you?"]
    assert isinstance(entry.checks[0], LanguageCheck) and entry.checks[0].lang == "fr"
    assert isinstance(entry.checks[1], RegexCheck)
    assert entry.overrides == {"train.epochs": 2}
    assert entry.origin is not None and "one.yaml" in entry.origin


def test_defaults_and_prompt_kept_verbatim(tmp_path):
    f = write(tmp_path / "p.yaml", "id: a\nprompt: |\n  Line one.\n  Line two.\n")
    [entry] = load_manifest(f)
    assert entry.prompt == "Line one.\nLine two.\n"
    assert entry.seed_inputs == [] and entry.checks == [] and entry.overrides == {}
    assert entry.description is None
    # The load location is private: it must not leak into dumps (and hence fingerprints).
    assert "origin" not in entry.model_dump() and "_origin" not in entry.model_dump()
    # ... nor into equality: a JSON round trip (as through spec.json) gives an equal entry.
    assert PromptEntry.model_validate(entry.model_dump(mode="json")) == entry


def test_list_and_prompts_wrapper(tmp_path):
    listed = write(tmp_path / "list.yaml", "- {id: a, prompt: A}\n- {id: b, prompt: B}\n")
    wrapped = write(tmp_path / "wrapped.yml", "prompts:\n  - {id: c, prompt: C}\n  - {id: d, prompt: D}\n")
    assert [e.id for e in load_manifest(listed)] == ["a", "b"]
    assert [e.id for e in load_manifest(wrapped)] == ["c", "d"]


def test_nested_overrides_accepted(tmp_path):
    f = write(tmp_path / "p.yaml", "id: a\nprompt: A\noverrides:\n  train:\n    epochs: 4\n")
    assert load_manifest(f)[0].overrides == {"train": {"epochs": 4}}


def test_json_and_jsonl(tmp_path):
    j = write(tmp_path / "m.json", json.dumps({"prompts": [{"id": "a", "prompt": "A"}]}))
    lines = [
        json.dumps({"id": "b", "prompt": "B"}),
        "",
        json.dumps({"id": "c", "prompt": "C", "checks": [{"type": "json"}]}),
    ]
    jl = write(tmp_path / "m.jsonl", "\n".join(lines) + "\n")
    assert [e.id for e in load_manifest(j)] == ["a"]
    entries = load_manifest(jl)
    assert [e.id for e in entries] == ["b", "c"]
    assert isinstance(entries[1].checks[0], JsonCheck)


def test_directory_sorted_and_non_recursive(tmp_path):
    write(tmp_path / "b.yaml", "id: b\nprompt: B\n")
    write(tmp_path / "a.jsonl", json.dumps({"id": "a", "prompt": "A"}) + "\n")
    write(tmp_path / "notes.md", "not a manifest")
    write(tmp_path / ".hidden.yaml", "id: hidden\nprompt: H\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.yaml", "id: c\nprompt: C\n")
    assert [e.id for e in load_manifest(tmp_path)] == ["a", "b"]


def test_utf8_bom_is_tolerated(tmp_path):
    f = tmp_path / "bom.yaml"
    f.write_bytes("\ufeffid: a\nprompt: Réponds en français.\n".encode("utf-8"))
    assert load_manifest(f)[0].prompt == "Réponds en français."


# --------------------------------------------------------------------------- the shipped examples


def test_examples_load():
    entries = {e.id: e for e in load_manifest(EXAMPLES)}
    assert {"french", "pirate", "shell_agent"} <= set(entries)
    french = entries["french"]
    assert "French" in french.prompt and len(french.seed_inputs) >= 6
    assert any(isinstance(c, LanguageCheck) and c.lang == "fr" for c in french.checks)
    assert any(isinstance(c, RegexCheck) and "i" in c.flags for c in entries["pirate"].checks)
    shell = entries["shell_agent"]
    assert len(shell.prompt) > 5000
    assert any(isinstance(c, RegexCheck) and "```bash" in c.pattern for c in shell.checks)
    for entry in entries.values():
        assert entry.seed_inputs and entry.checks


def test_each_example_loads_alone():
    for name in ("french", "pirate", "shell_agent"):
        [entry] = load_manifest(EXAMPLES / f"{name}.yaml")
        assert entry.id == name


# --------------------------------------------------------------------------- entry errors


def test_empty_prompt(tmp_path):
    f = write(tmp_path / "x.yaml", "- {id: ok, prompt: fine}\n- id: french\n  prompt: '   '\n")
    msg = only_problem(f)
    assert msg.startswith(f"{f}: entry 2 (id=french, line 2): field 'prompt':")
    assert "must not be empty" in msg


def test_missing_prompt_and_missing_id(tmp_path):
    f = write(tmp_path / "x.yaml", "- {id: a}\n- {prompt: text}\n")
    problems = problems_of(f)
    assert any("entry 1 (id=a" in p and "field 'prompt'" in p and "required" in p for p in problems)
    assert any("entry 2 (line 2)" in p and "field 'id'" in p and "required" in p for p in problems)


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "a\\b", "..", ".hidden", "a..b", "", "x" * 129, "has space", "é", "abc\n", "a:b"]
)
def test_bad_ids(tmp_path, bad):
    f = write(tmp_path / "x.yaml", f"id: {json.dumps(bad)}\nprompt: A\n")
    msg = only_problem(f)
    assert "field 'id'" in msg and str(f) in msg
    assert "directory name" in msg


def test_good_ids():
    for good in ["a", "A1", "my-prompt_v2.1", "x" * 128]:
        assert PromptEntry(id=good, prompt="p").id == good


def test_empty_seed_input(tmp_path):
    f = write(tmp_path / "x.yaml", "id: a\nprompt: A\nseed_inputs: [ok, '  ']\n")
    assert "field 'seed_inputs[1]': must not be empty" in only_problem(f)


def test_unknown_key(tmp_path):
    f = write(tmp_path / "x.yaml", "id: a\nprompt: A\nseed_input: [typo]\n")
    msg = only_problem(f)
    assert "field 'seed_input'" in msg and "unknown key" in msg and "seed_inputs" in msg


def test_unknown_check_key(tmp_path):
    f = write(tmp_path / "x.yaml", "id: a\nprompt: A\nchecks:\n  - {type: language, lang: fr, confidence: 0.5}\n")
    msg = only_problem(f)
    assert "field 'checks[0].confidence'" in msg and "unknown key" in msg and "min_confidence" in msg


def test_bad_checks(tmp_path):
    f = write(
        tmp_path / "x.yaml",
        "id: a\nprompt: A\nchecks:\n"
        "  - {type: sentiment}\n"
        "  - {type: regex, pattern: '([a-z'}\n"
        "  - {type: regex, pattern: 'x', flags: q}\n"
        "  - {lang: fr}\n"
        "  - {type: language, lang: french}\n"
        "  - {type: max_length}\n"
        "  - {type: max_length, max_chars: 0}\n"
        "  - {type: starts_with, text: ''}\n",
    )
    problems = problems_of(f)
    joined = "\n".join(problems)
    assert all(p.startswith(f"{f}: entry 1 (id=a, line 1): field 'checks[") for p in problems), joined
    assert "checks[0]': unknown check type 'sentiment'" in joined
    assert "checks[1].pattern': invalid regular expression '([a-z'" in joined
    assert "checks[2].flags': unknown regex flag" in joined
    assert "checks[3]': a check needs a 'type'" in joined
    assert "checks[4].lang': must be an ISO 639-1" in joined
    assert "checks[5]': set max_chars, max_words or both" in joined
    assert "checks[6].max_chars'" in joined
    assert "checks[7].text'" in joined
    assert len(problems) == 8


def test_duplicate_check_names(tmp_path):
    f = write(tmp_path / "x.yaml", "id: a\nprompt: A\nchecks:\n  - {type: json}\n  - {type: json}\n")
    msg = only_problem(f)
    assert "field 'checks'" in msg and "'json'" in msg and "distinct 'name'" in msg


def test_entry_not_a_mapping(tmp_path):
    f = write(tmp_path / "x.yaml", "- just a string\n")
    msg = only_problem(f)
    assert msg.startswith(f"{f}: entry 1") and "expected a mapping" in msg


def test_jsonl_errors_name_line(tmp_path):
    f = write(
        tmp_path / "m.jsonl",
        json.dumps({"id": "a", "prompt": "A"}) + "\n\n{not json}\n" + json.dumps({"id": "b", "prompt": ""}) + "\n",
    )
    problems = problems_of(f)
    assert any(p.startswith(f"{f}: line 3: invalid JSON") for p in problems)
    assert any(p.startswith(f"{f}: line 4 (id=b): field 'prompt'") for p in problems)


def test_all_problems_collected_across_files(tmp_path):
    write(tmp_path / "a.yaml", "id: a\nprompt: ''\n")
    write(tmp_path / "b.yaml", "id: b\n")
    write(tmp_path / "c.yaml", "id: c\nprompt: fine\n")
    problems = problems_of(tmp_path)
    assert len(problems) == 2
    assert "a.yaml" in problems[0] and "b.yaml" in problems[1]


# --------------------------------------------------------------------------- duplicate ids


def test_duplicate_id_within_file(tmp_path):
    f = write(tmp_path / "x.yaml", "- {id: a, prompt: A}\n- {id: b, prompt: B}\n- {id: a, prompt: C}\n")
    msg = only_problem(f)
    assert msg.startswith(f"{f}: entry 3 (id=a, line 3): field 'id': duplicate id")
    assert f"first defined at {f}: entry 1 (id=a, line 1)" in msg


def test_duplicate_id_across_files(tmp_path):
    write(tmp_path / "a.yaml", "id: same\nprompt: A\n")
    write(tmp_path / "b.jsonl", json.dumps({"id": "same", "prompt": "B"}) + "\n")
    msg = only_problem(tmp_path)
    assert "b.jsonl: line 1 (id=same)" in msg and "a.yaml: entry 1 (id=same" in msg


def test_ids_differing_only_in_case_collide(tmp_path):
    f = write(tmp_path / "x.yaml", "- {id: French, prompt: A}\n- {id: french, prompt: B}\n")
    assert "letter case" in only_problem(f)


# --------------------------------------------------------------------------- file errors


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("id: a\nprompt: Réponds\n".encode("latin-1"))
    msg = only_problem(f)
    assert msg.startswith(str(f)) and "UTF-8" in msg and "offset 15" in msg and "line 2" in msg


def test_yaml_syntax_error(tmp_path):
    f = write(tmp_path / "bad.yaml", "id: a\nprompt: [unclosed\nseed_inputs: []\n")
    msg = only_problem(f)
    assert msg.startswith(f"{f}: line ") and "invalid YAML" in msg


def test_yaml_duplicate_key(tmp_path):
    f = write(tmp_path / "dup.yaml", "id: a\nprompt: one\nprompt: two\n")
    msg = only_problem(f)
    assert msg.startswith(f"{f}: line 3") and "duplicate key 'prompt'" in msg


def test_json_syntax_error(tmp_path):
    f = write(tmp_path / "bad.json", '{"id": "a",\n "prompt": }\n')
    msg = only_problem(f)
    assert msg.startswith(f"{f}: line 2") and "invalid JSON" in msg


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in only_problem(missing) and "not found" in only_problem(missing)


def test_empty_inputs(tmp_path):
    assert "empty" in only_problem(write(tmp_path / "e.yaml", ""))
    assert "empty" in only_problem(write(tmp_path / "c.yaml", "# only a comment\n"))
    assert "no prompts" in only_problem(write(tmp_path / "l.yaml", "[]\n"))
    assert "no prompts" in only_problem(write(tmp_path / "w.yaml", "prompts: []\n"))
    assert "empty" in only_problem(write(tmp_path / "j.jsonl", "\n\n"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert "no manifest files" in only_problem(empty_dir)


def test_wrong_top_level_shapes(tmp_path):
    assert "got str" in only_problem(write(tmp_path / "s.yaml", "just text\n"))
    assert "'prompts' must be a list" in only_problem(write(tmp_path / "p.yaml", "prompts: {id: a}\n"))
    msg = only_problem(write(tmp_path / "x.yaml", "prompts: [{id: a, prompt: A}]\nversion: 2\n"))
    assert "unknown top-level key(s) version" in msg


# --------------------------------------------------------------------------- overrides and lengths


def test_validate_overrides(tmp_path):
    f = write(
        tmp_path / "x.yaml",
        "- {id: good, prompt: A, overrides: {train.epochs: 2}}\n"
        "- {id: bad, prompt: B, overrides: {train.epoch: 2}}\n",
    )
    seen = []

    def validate(overrides):
        seen.append(overrides)
        for key in overrides:
            if key != "train.epochs":
                raise ValueError(f"unknown config key '{key}'\n(second line)")

    msg = only_problem(f, validate_overrides=validate)
    where = f"{f}: entry 2 (id=bad, line 2)"
    assert msg == f"{where}: field 'overrides': unknown config key 'train.epoch'; (second line)"
    assert seen == [{"train.epochs": 2}, {"train.epoch": 2}]


def test_validate_overrides_with_real_config(tmp_path):
    config = pytest.importorskip("genpi.config")
    f = write(tmp_path / "x.yaml", "id: a\nprompt: A\noverrides: {train: {epochs: 0}}\n")
    msg = only_problem(f, validate_overrides=lambda o: config.GenpiConfig().with_overrides(o))
    assert "entry 1 (id=a" in msg and "field 'overrides'" in msg and "epochs" in msg
    g = write(tmp_path / "y.yaml", "id: b\nprompt: B\noverrides: {train.epochs: 5}\n")
    assert load_manifest(g, validate_overrides=lambda o: config.GenpiConfig().with_overrides(o))


# --------------------------------------------------------------------------- values as written (YAML 1.2)


def test_string_fields_get_the_text_written(tmp_path):
    f = write(
        tmp_path / "x.yaml",
        "id: 0123\nprompt: 1.50\nseed_inputs: [yes, no, off, 007]\n"
        "checks:\n  - {type: language, lang: no}\n  - {type: starts_with, text: 007, name: 1.0}\n"
        "  - {type: json, required_keys: [01, true]}\n  - {type: max_length, max_chars: 010}\n"
        "description: null\n",
    )
    [entry] = load_manifest(f)
    assert entry.id == "0123" and entry.prompt == "1.50"
    assert entry.seed_inputs == ["yes", "no", "off", "007"]
    lang, starts, js, length = entry.checks
    assert lang.lang == "no" and (starts.text, starts.name) == ("007", "1.0")
    assert js.required_keys == ["01", "true"]
    assert length.max_chars == 10 and entry.description is None  # typed fields keep their types
    # JSON numbers keep their text as well (written by hand: json.dumps would write 1.5).
    j = write(tmp_path / "x.jsonl", '{"id": 2024, "prompt": "P", "checks": [{"type": "json", "name": 1.50}]}\n')
    [entry] = load_manifest(j)
    assert entry.id == "2024" and entry.checks[0].name == "1.50"


@pytest.mark.parametrize(
    "text",
    [
        "id: a\nprompt: A\noverrides: {train.pg_target: off, model.revision: 0123456, train.epochs: 2}\n",
        "id: a\nprompt: A\noverrides:\n  train: {pg_target: off, epochs: 2}\n  model:\n    revision: 0123456\n",
    ],
)
def test_overrides_get_the_text_written(tmp_path, text):
    config = pytest.importorskip("genpi.config")
    f = write(tmp_path / "x.yaml", text)
    [entry] = load_manifest(f, validate_overrides=lambda o: config.GenpiConfig().with_overrides(o))
    cfg = config.GenpiConfig().with_overrides(entry.overrides)
    assert cfg.train.pg_target == "off" and cfg.model.revision == "0123456" and cfg.train.epochs == 2
    # As stored (spec.json round trip): still the string.
    assert "0123456" in json.dumps(entry.model_dump(mode="json"))


def test_jsonl_overrides_and_norwegian_check(tmp_path):
    line = {"id": "nb", "prompt": "Svar på norsk.", "checks": [{"type": "language", "lang": "no"}],
            "overrides": {"model.revision": "0123456", "train.epochs": 3}}
    f = write(tmp_path / "m.jsonl", json.dumps(line) + "\n")
    [entry] = load_manifest(f)
    assert entry.checks[0].lang == "no" and entry.overrides == {"model.revision": "0123456", "train.epochs": 3}


def test_validate_prompt_lengths(tmp_path):
    f = write(tmp_path / "x.yaml", "- {id: short, prompt: one two}\n- {id: long, prompt: one two three four}\n")
    entries = load_manifest(f)
    count = lambda text: len(text.split())  # noqa: E731
    assert validate_prompt_lengths(entries, count, max_tokens=4) == []
    [problem] = validate_prompt_lengths(entries, count, max_tokens=3)
    assert "'long' is 4 tokens long, more than the limit of 3" in problem and str(f) in problem
    assert problem.startswith(f"{f}: entry 2 (id=long, line 2): field 'prompt'")
    # Entries built in code have no file: the given source names them.
    [problem] = validate_prompt_lengths([PromptEntry(id="x", prompt="a b c")], count, 2, source="cli")
    assert problem.startswith("cli: id=x") and "3 tokens" in problem


def test_manifest_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(ManifestError(["a: one", "b: two"])))
    assert err.problems == ["a: one", "b: two"] and str(err) == "a: one\nb: two"


def test_checks_validated_in_code():
    with pytest.raises(ValueError):
        RegexCheck(pattern="(")
    with pytest.raises(ValueError):
        LanguageCheck(lang="xx")
    assert LanguageCheck(lang="FR").lang == "fr"
