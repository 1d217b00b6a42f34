"""Behaviour on the embedded SmolLM2-135M-Instruct (real weights, CPU).

The default suite checks the prompted teacher on SmolLM2 (under a minute); the minutes-long
ones are marked slow (`pytest -m slow`): input synthesis (~2 min on 2 busy cores), a small
internalization (~5 min) and the README acceptance run (the French example with the
default config). The pipeline itself is covered on the tiny model in the default suite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genpi.config import load_config
from genpi.store import Store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm(smollm_tokenizer):
    from genpi.engines.hf import HFEngine

    return HFEngine.from_config(load_config(None, ["engine.batch_size=8"]))


FRENCH = "You are a helpful assistant. Always answer in French, whatever language the user writes in."
QUESTIONS = ["What is the capital of Japan?", "Why is the sky blue?", "How do I make tea?",
             "What is a good name for a cat?", "How many legs does a spider have?", "What is rain?"]


def test_teacher_follows_the_prompt_and_records_topk(smollm):
    """The prompt (in the system slot) changes the model's language; top-k rows align with tokens."""
    from genpi.engines.base import ChatRequest
    from genpi.checks import detect_language
    from genpi.synth.replies import student_messages, teacher_messages

    reqs = [ChatRequest(teacher_messages(FRENCH, q), 40, top_k_logprobs=5) for q in QUESTIONS]
    reqs += [ChatRequest(student_messages(q), 40) for q in QUESTIONS]
    outs = smollm.generate(reqs)
    fr_teacher = sum(detect_language(o.text)[0] == "fr" for o in outs[: len(QUESTIONS)])
    fr_base = sum(detect_language(o.text)[0] == "fr" for o in outs[len(QUESTIONS):])
    assert fr_teacher >= 2 and fr_base == 0, (fr_teacher, fr_base)
    for o in outs[: len(QUESTIONS)]:
        assert len(o.topk_ids) == len(o.token_ids)
        # Greedy: the chosen token is the teacher's top-1 at every step.
        assert all(row[0] == t for row, t in zip(o.topk_ids, o.token_ids))


# ~2 min on 2 busy cores (CI, 2026-12-02: 110 s).
@pytest.mark.slow
def test_input_synthesis_gives_usable_distinct_inputs(smollm, tmp_path):
    from genpi.manifest import PromptEntry
    from genpi.store import Store
    from genpi.synth.pipeline import synthesize

    cfg = load_config(None, ["synth.n_train_inputs=10", "synth.n_heldout_inputs=4", "synth.max_input_rounds=1",
                             "synth.input_max_new_tokens=80", "synth.reply_max_new_tokens=16", "synth.n_pg_examples=2",
                             "synth.reason_max_new_tokens=16"])
    entry = PromptEntry(id="fr", prompt=FRENCH, seed_inputs=QUESTIONS[:4])
    store = Store(tmp_path)
    summary = synthesize(smollm, entry, cfg, store, store.prompt_dir("fr", "x"))
    rows = store.read_parquet(store.prompt_dir("fr", "x") + "/synth/inputs.parquet")
    train = {r["input"].lower() for r in rows if r["split"] == "train"}
    held = {r["input"].lower() for r in rows if r["split"] == "heldout"}
    assert len(held) == 4 and len(train) >= 8 and not (train & held)
    assert summary["inputs"]["kept"] >= 12
    reasons = store.read_parquet(store.prompt_dir("fr", "x") + "/synth/reasons.parquet")
    # Each reason is the pre-filled opening plus what the model wrote after it.
    assert all(r["reason"].startswith("The second answer") for r in reasons)
    assert sum(len(r["reason"].split()) > 6 for r in reasons) >= len(reasons) // 2, reasons


# ~5 min on 2 busy cores (CI, 2026-12-02: 326 s, the suite's slowest).
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_small_internalization_moves_the_adapter_towards_the_teacher(tmp_path):
    """A few minutes of the real pipeline on SmolLM2: the adapter without the prompt is
    closer to the teacher than the base is (KL ratio > 0) and the adapter is published."""
    from genpi import cli

    manifest = tmp_path / "fr.yaml"
    manifest.write_text(
        "id: fr\nprompt: " + json.dumps(FRENCH) + "\nseed_inputs: " + json.dumps(QUESTIONS)
        + "\nchecks:\n  - {type: language, lang: fr}\n"
    )
    store = tmp_path / "store"
    rc = cli.main(["internalize", str(manifest), "--store", str(store),
                   "synth.n_train_inputs=24", "synth.n_heldout_inputs=6", "synth.max_input_rounds=2",
                   "synth.reply_max_new_tokens=32", "synth.n_pg_examples=4", "synth.reason_max_new_tokens=24",
                   "train.epochs=2", "train.lr=1e-3", "eval.max_new_tokens=32", "eval.leak_max_new_tokens=48",
                   # role-play is covered by tests/test_roleplay.py and test_synth_ray.py
                   "eval.latency_repeats=1", "synth.roleplay_conversations=0"])
    assert rc == 0
    reg = Store(store, create=False).registry()
    ev = json.loads((store / "prompts" / "fr" / reg["fr"]["fingerprint"] / "eval.json").read_text())
    kl = ev["metrics"]["kl"]
    assert kl["adapter"] < kl["base"] and kl["ratio"] > 0.1, kl
    assert ev["efficiency"]["input_tokens_saved_per_request"] > 0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_acceptance_french(tmp_path):
    """README command 1: the French example with the default config reaches the targets
    (language-check ratio >= 0.9, KL ratio >= 0.6 on held-out inputs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "genpi.cli", "internalize", "examples/prompts/french.yaml",
                           "--store", str(store)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reg = Store(store, create=False).registry()
    ev = json.loads((store / "prompts" / "french" / reg["french"]["fingerprint"] / "eval.json").read_text())
    assert ev["checks"]["language=fr"]["ratio"] >= 0.9, ev["checks"]
    assert ev["metrics"]["kl"]["ratio"] >= 0.6, ev["metrics"]
