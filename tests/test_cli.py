"""Bad input never ends in a traceback: the CLI exits with status 2 and one message that
names the problem (the file, the field or the key), before any work is done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genpi.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc == 2, f"exit status {rc}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in the error message:\n{err}"


def write_entries(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def assert_no_work(store: Path) -> None:
    assert not (store / "prompts").exists(), "an invalid run must not start any prompt"


# --- manifest problems --------------------------------------------------------------------
@pytest.mark.parametrize(
    "entries, needles",
    [
        ([{"id": "a", "prompt": "   "}], ["manifest.yaml", "id=a", "field 'prompt'", "must not be empty"]),
        ([{"id": "a", "prompt": ""}], ["field 'prompt'", "must not be empty"]),
        ([{"id": "a", "seed_inputs": ["hello there friend"]}], ["id=a", "field 'prompt'", "required field is missing"]),
        (
            [{"id": "a", "prompt": "Be brief."}, {"id": "a", "prompt": "Be long."}],
            ["entry 2", "field 'id'", "duplicate id", "first defined at"],
        ),
    ],
    ids=["blank-prompt", "empty-prompt", "missing-prompt", "duplicate-ids"],
)
def test_bad_manifest_entries(capsys, tmp_path, store, entries, needles):
    manifest = write_entries(tmp_path / "manifest.yaml", entries)
    assert_clean_error(*run_cli(capsys, "internalize", manifest, "--store", store), *needles)
    assert_no_work(store)


def test_non_utf8_manifest(capsys, tmp_path, store):
    manifest = tmp_path / "latin1.yaml"
    manifest.write_bytes("- id: cafe\n  prompt: Réponds en français.\n".encode("latin-1"))
    assert_clean_error(*run_cli(capsys, "internalize", manifest, "--store", store),
                       "latin1.yaml", "not valid UTF-8", "line 2")
    assert_no_work(store)


def test_missing_manifest(capsys, tmp_path, store):
    missing = tmp_path / "nope.yaml"
    assert_clean_error(*run_cli(capsys, "internalize", missing, "--store", store), str(missing), "not found")


def test_prompt_longer_than_context(capsys, tmp_path, store, tiny_overrides):
    # Context 320 leaves 320 - 12 (reply) - 128 = 180 tokens for the prompt: ~400 are too many.
    long_prompt = "Always answer in the style of a very formal butler, with great care. " * 30
    manifest = write_entries(tmp_path / "manifest.yaml", [{"id": "butler", "prompt": long_prompt}])
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, *tiny_overrides, "model.max_context=320")
    assert_clean_error(rc, out, err, "id=butler", "field 'prompt'", "tokens long", "limit of 180")
    assert_no_work(store)


def test_context_too_small_for_any_prompt(capsys, tmp_path, store, tiny_overrides):
    # 64 tokens cannot hold a 12-token reply and a 128-token input: the context is the problem,
    # not the (short) prompt, and the message says so instead of "a limit of -76 tokens".
    manifest = write_entries(tmp_path / "manifest.yaml", [{"id": "short", "prompt": "Be brief."}])
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, *tiny_overrides, "model.max_context=64")
    assert_clean_error(rc, out, err, "model.max_context", "64 tokens", "synth.reply_max_new_tokens")
    assert "-76" not in err
    assert_no_work(store)


# --- config problems ----------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_entries(tmp_path / "manifest.yaml", [{"id": "a", "prompt": "Be brief."}])


def test_unknown_override_key(capsys, manifest, store):
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, "train.epoch=3")
    assert_clean_error(rc, out, err, "command line", "unknown config key 'train.epoch'", "epochs")
    assert_no_work(store)


def test_unknown_key_in_config_file(capsys, tmp_path, manifest, store):
    config = tmp_path / "genpi.yaml"
    config.write_text("train:\n  epoch: 3\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, "--config", config)
    assert_clean_error(rc, out, err, str(config), "unknown config key 'train.epoch'")
    assert_no_work(store)


def test_unknown_key_in_prompt_overrides(capsys, tmp_path, store):
    manifest = write_entries(tmp_path / "manifest.yaml",
                             [{"id": "a", "prompt": "Be brief.", "overrides": {"train.epoch": 3}}])
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store)
    assert_clean_error(rc, out, err, "id=a", "field 'overrides'", "train.epoch")


def test_missing_config_file(capsys, tmp_path, manifest, store):
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, "--config", tmp_path / "none.yaml")
    assert_clean_error(rc, out, err, "none.yaml", "config file not found")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.epochs", ["'train.epochs'", "not of the form key.sub=value"]),
        ("train.epochs=many", ["field 'train.epochs'", "integer"]),
        ("train.lr=-1", ["field 'train.lr'", "greater than 0"]),
    ],
    ids=["no-equals", "not-an-int", "out-of-range"],
)
def test_invalid_override(capsys, manifest, store, override, needles):
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, override)
    assert_clean_error(rc, out, err, *needles)


def test_model_path_missing(capsys, manifest, store):
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, "model.name=/nonexistent/model")
    assert_clean_error(rc, out, err, "model.name", "/nonexistent/model", "does not exist")
    assert_no_work(store)


def test_model_folder_without_config(capsys, tmp_path, manifest, store):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, f"model.name={folder}")
    assert_clean_error(rc, out, err, "model.name", "config.json")


# --- commands on what is (not) published ----------------------------------------------------
def test_chat_unknown_id_on_empty_store(capsys, store):
    rc, out, err = run_cli(capsys, "chat", "unknown-id", "hi", "--store", store)
    assert_clean_error(rc, out, err, "no published adapter", "unknown-id", "published: none")


def test_eval_unknown_id_on_empty_store(capsys, store):
    rc, out, err = run_cli(capsys, "eval", "unknown-id", "--store", store)
    assert_clean_error(rc, out, err, "no published adapter", "unknown-id")


@pytest.mark.parametrize("command", [["inspect"], ["chat", "a", "hi"], ["eval", "a"]])
def test_store_with_unknown_protocol(capsys, command):
    rc, out, err = run_cli(capsys, *command, "--store", "nosuchproto://bucket/genpi")
    assert_clean_error(rc, out, err, "store", "nosuchproto://bucket/genpi", "nosuchproto")


def test_inspect_empty_store(capsys, store):
    rc, out, err = run_cli(capsys, "inspect", "--store", store)
    assert rc == 0 and "nothing published" in out


def test_overrides_after_options_are_accepted(capsys, manifest, store):
    # Overrides may follow options (`internalize m.yaml --store s key=value`): still validated.
    rc, out, err = run_cli(capsys, "internalize", manifest, "--store", store, "train.epochs=2", "train.epoch=3")
    assert_clean_error(rc, out, err, "unknown config key 'train.epoch'")


def test_unknown_option_is_a_usage_error(capsys, manifest):
    rc, out, err = run_cli(capsys, "internalize", manifest, "--bogus")
    assert_clean_error(rc, out, err, "unrecognized arguments", "--bogus")


# --- the real entry point, as a user runs it -----------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["internalize", "{tmp}/missing.yaml"], "manifest file or directory not found"),
        (["internalize", "{manifest}", "train.epoch=3"], "unknown config key 'train.epoch'"),
        (["chat", "unknown-id", "hi"], "no published adapter"),
    ],
    ids=["missing-manifest", "unknown-key", "chat-unknown-id"],
)
def test_subprocess_errors_have_no_traceback(tmp_path, manifest, argv, needle):
    argv = [a.format(tmp=tmp_path, manifest=manifest) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "genpi.cli", *argv, "--store", str(tmp_path / "store")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert proc.stderr.strip().startswith("genpi ")  # one message, nothing else
