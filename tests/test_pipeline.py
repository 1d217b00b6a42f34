"""The whole pipeline on a tiny random model: synthesis -> training -> evaluation -> publish,
through the real engine, losses, store and CLI. No mocks: every step runs real torch code
and writes real files, so each assertion below can fail on a real regression."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genpi.cli import main
from genpi.config import ModelConfig
from genpi.engines.base import ChatRequest
from genpi.engines.hf import HFEngine
from genpi.manifest import PromptEntry
from genpi.models import load_model
from genpi.store import Store
from genpi.synth.pipeline import COMPLETE
from genpi.synth.replies import student_messages, teacher_messages
from genpi.train.data import collate, encode_chat
from genpi.train.losses import IGNORE_INDEX, topk_kl

REPO = Path(__file__).resolve().parents[1]
PROMPT = "You are a pirate. Always answer like a pirate and say Arr."

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _tree(root: Path) -> dict[str, int]:
    """relative path -> mtime_ns of every file under root."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _fp_dirs(store: Path, prompt_id: str) -> list[Path]:
    d = store / "prompts" / prompt_id
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


def _load(tiny_model_dir):
    model, tok, _ = load_model(ModelConfig(name=str(tiny_model_dir)))
    return model, tok


# ------------------------------------------------------------------------------------------
def test_kl_zero_when_student_is_teacher_with_prompt(tiny_model_dir):
    """Engine top-k recording + encode_chat alignment + topk_kl together: the same model with
    the same system prompt must reproduce the teacher's recorded distribution exactly
    (KL ~ 0 at every reply token); without the prompt it must not."""
    model, tok = _load(tiny_model_dir)
    k = 5
    engine = HFEngine(model, tok, batch_size=4)
    # Inputs of different lengths in one batch: left padding must not change the distributions.
    inputs = ["Hi", "How do I make a cup of tea without a kettle?", "Why do cats purr?"]
    reqs = [ChatRequest(teacher_messages(PROMPT, x), max_new_tokens=12, top_k_logprobs=k) for x in inputs]
    # A sampled reply too: its top-k must still be the raw (temperature 1, no top-p) distribution.
    reqs.append(ChatRequest(teacher_messages(PROMPT, inputs[1]), max_new_tokens=12, top_k_logprobs=k,
                            temperature=0.7, top_p=0.9, seed=3))
    inputs = [*inputs, inputs[1]]
    outs = engine.generate(reqs)
    assert outs[-1].token_ids != outs[1].token_ids

    def encoded(messages, c):
        reply = {"role": "assistant", "content": c.text, "token_ids": c.token_ids,
                 "topk_ids": c.topk_ids, "topk_logprobs": c.topk_logprobs}
        return encode_chat(tok, [*messages, reply], max_length=4096)

    def per_sequence_kl(examples):
        batch = collate(examples, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl_sum, n = topk_kl(logits, batch["kl_ids"], batch["kl_logprobs"], batch["kl_mask"])
        return kl_sum, n, batch

    for c in outs:
        assert c.text and len(c.token_ids) == len(c.topk_ids) == len(c.topk_logprobs)
        assert all(len(row) == k for row in c.topk_ids)
    for c in outs[:-1]:
        # Greedy: the recorded top-1 is the token that was generated, at every position.
        assert [row[0] for row in c.topk_ids] == c.token_ids

    with_prompt = [encoded(teacher_messages(PROMPT, x), c) for x, c in zip(inputs, outs)]
    kl_sum, n, batch = per_sequence_kl(with_prompt)
    # KL rows sit exactly on the reply tokens that were generated.
    for b, (ex, c) in enumerate(zip(with_prompt, outs)):
        rows = batch["kl_mask"][b].nonzero().squeeze(-1)
        assert batch["input_ids"][b, rows].tolist() == c.token_ids
        assert (batch["labels"][b, rows] != IGNORE_INDEX).all()
    assert (n == torch.tensor([len(c.token_ids) for c in outs])).all()
    # Sum over a whole reply below 1e-4, so every single token's KL is below it too (KL >= 0).
    assert (kl_sum.abs() < 1e-4).all(), kl_sum

    without = [encoded(student_messages(x), c) for x, c in zip(inputs, outs)]
    kl_sum_b, n_b, _ = per_sequence_kl(without)
    assert (n_b == n).all()
    assert ((kl_sum_b / n_b) > 1e-2).all(), kl_sum_b / n_b


# ------------------------------------------------------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_internalize_end_to_end_tiny(tiny_overrides, tiny_model_dir, write_manifest, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    manifest = write_manifest(PROMPT)
    args = ["internalize", manifest, "--store", store, *tiny_overrides]

    rc, out, err = _cli(capsys, *args)
    assert rc == 0, out + err
    assert "1 published" in out
    [fpdir] = _fp_dirs(store, "pirate")
    fp = fpdir.name
    for rel in ("spec.json", "synth/inputs.parquet", "synth/to_be.parquet", "synth/as_is.parquet",
                "synth/reasons.parquet", "synth/_COMPLETE", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "eval.json", "DONE"):
        assert (fpdir / rel).is_file(), rel
    assert not (fpdir / "error.json").exists()
    registry = Store(store, create=False).registry()
    assert registry["pirate"]["fingerprint"] == fp
    spec = json.loads((fpdir / "spec.json").read_text())
    assert spec["entry"]["prompt"] == PROMPT and spec["fingerprint"] == fp

    # Training ran: LoRA B starts at zero, so a trained adapter has non-zero B matrices...
    weights = load_file(fpdir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    # ... and it loads with plain PEFT on the base model and changes its outputs.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
        peft_model = PeftModel.from_pretrained(base, str(fpdir / "adapter"))
        adapted_logits = peft_model(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-4

    ev = json.loads((fpdir / "eval.json").read_text())
    assert ev["prompt_id"] == "pirate" and ev["n_heldout"] == 2
    for metric in ("kl", "agreement"):
        assert {"teacher", "base", "adapter", "ratio"} <= set(ev["metrics"][metric]), metric
    assert {"teacher", "base", "adapter", "ratio"} <= set(ev["checks"]["arr"])
    assert ev["metrics"]["kl"]["teacher"] == 0.0 and ev["metrics"]["kl"]["base"] > 0
    assert {"input_tokens_with_prompt", "input_tokens_without_prompt", "input_tokens_saved_per_request",
            "prefill_flops_saved_per_request", "latency_with_prompt", "latency_adapter_without_prompt"} \
        <= set(ev["efficiency"])
    assert set(ev["leak"]) == {"teacher", "base", "adapter"}

    # The same command again does no work: skipped, and nothing under the prompt changes.
    before = _tree(fpdir)
    registry_mtime = (store / "registry" / "pirate.json").stat().st_mtime_ns
    rc, out, err = _cli(capsys, *args)
    assert rc == 0, out + err
    assert "unchanged" in out and "1 unchanged (skipped)" in out
    assert _tree(fpdir) == before
    assert (store / "registry" / "pirate.json").stat().st_mtime_ns == registry_mtime
    assert _fp_dirs(store, "pirate") == [fpdir]

    # A changed prompt is a new fingerprint, published beside the old one.
    rc, out, err = _cli(capsys, "internalize", write_manifest(PROMPT + " Never use more than ten words."),
                        "--store", store, *tiny_overrides)
    assert rc == 0, out + err
    assert "changed" in out
    dirs = _fp_dirs(store, "pirate")
    assert len(dirs) == 2 and fpdir in dirs
    [new_dir] = [d for d in dirs if d != fpdir]
    assert (new_dir / "DONE").is_file()
    assert Store(store, create=False).registry()["pirate"]["fingerprint"] == new_dir.name
    assert _tree(fpdir) == before

    rc, out, err = _cli(capsys, "inspect", "--store", store)
    assert rc == 0 and "pirate" in out and new_dir.name in out

    rc, out, err = _cli(capsys, "chat", "pirate", "How do I tie a knot?", "--store", store, "--max-new-tokens", "8")
    assert rc == 0, err
    assert out.strip(), "chat printed no reply"

    eval_path = new_dir / "eval.json"
    mtime = eval_path.stat().st_mtime_ns
    rc, out, err = _cli(capsys, "eval", "pirate", "--store", store)
    assert rc == 0, err
    assert eval_path.stat().st_mtime_ns > mtime
    assert "pirate" in out and "internalization ratio" in out
    again = json.loads(eval_path.read_text())
    assert again["metrics"].keys() == ev["metrics"].keys() and again["checks"].keys() == ev["checks"].keys()

    # --force redoes every stage of an unchanged prompt under the same fingerprint.
    # (write_manifest rewrote the manifest file with the changed prompt: new_dir is its fingerprint.)
    synth_file = new_dir / "synth" / "inputs.parquet"
    old_mtime = synth_file.stat().st_mtime_ns
    rc, out, err = _cli(capsys, "internalize", manifest, "--store", store, "--force", *tiny_overrides)
    assert rc == 0, out + err
    assert "1 published" in out
    assert synth_file.stat().st_mtime_ns > old_mtime and (new_dir / "DONE").is_file()


# ------------------------------------------------------------------------------------------
def test_resume_after_kill(tiny_overrides, write_manifest, tmp_path):
    """SIGKILL during training: nothing half-written is visible or published; the rerun keeps
    the finished synthesis (same files, same mtimes) and publishes exactly once."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "genpi.cli", "internalize", str(write_manifest(PROMPT)), "--store", str(store),
           *tiny_overrides, "train.epochs=12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log1 = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        marker = None
        while time.time() < deadline and proc.poll() is None:
            found = list((store / "prompts" / "pirate").glob(f"*/synth/{COMPLETE}")) if store.exists() else []
            if found:
                marker = found[0]
                break
            time.sleep(0.05)
        assert marker is not None, f"synthesis did not finish (rc={proc.poll()}):\n" + (tmp_path / "run1.log").read_text()
        time.sleep(1.0)  # into the training loop
        assert proc.poll() is None, "the run finished before it could be killed: raise train.epochs"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log1.close()

    fpdir = marker.parent.parent
    assert not (fpdir / "DONE").exists()
    adapter = fpdir / "adapter"
    if adapter.exists():  # only ever whole
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "pirate" not in Store(store, create=False).registry()
    synth_before = _tree(fpdir / "synth")
    assert {"inputs.parquet", "to_be.parquet", "as_is.parquet", "reasons.parquet", COMPLETE} <= set(synth_before)

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert _fp_dirs(store, "pirate") == [fpdir]
    assert _tree(fpdir / "synth") == synth_before, "the rerun redid finished synthesis"
    assert (fpdir / "DONE").is_file() and (fpdir / "adapter" / "adapter_model.safetensors").is_file()
    assert Store(store, create=False).registry()["pirate"]["fingerprint"] == fpdir.name
    reports = [json.loads(p.read_text()) for p in (store / "runs").glob("*/report.json")]
    published = [p for r in reports for p in r["prompts"] if p["id"] == "pirate" and p["status"] == "published"]
    assert len(published) == 1
    # Leftovers of the killed attempt never show up as artifacts.
    assert not list(fpdir.rglob("*.tmp-*"))


# ------------------------------------------------------------------------------------------
def test_eval_survives_teacher_replies_without_text(smollm_tokenizer, tiny_config, tiny_seeds):
    """A model whose greedy replies are only whitespace (a tied-embedding random model at
    initializer_range 0.02 echoes "\\n") must get an evaluation with KL n/a, not a crash."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from genpi.eval.run import evaluate
    from genpi.train.loop import lora_config

    tok = smollm_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )).eval()
    entry = PromptEntry(id="pirate", prompt=PROMPT, seed_inputs=tiny_seeds)
    peft_model = get_peft_model(model, lora_config(tiny_config.train), adapter_name="adapter")
    replies = HFEngine(peft_model, tok).generate([ChatRequest(teacher_messages(PROMPT, x), 8) for x in tiny_seeds[:2]])
    assert all(not c.text for c in replies)  # the situation under test
    ev = evaluate(peft_model, tok, entry, tiny_seeds[:2], "adapter", tiny_config)
    assert ev.metrics.kl.ratio is None


# ------------------------------------------------------------------------------------------
def test_long_agent_prompt_is_internalized_without_truncation(tiny_overrides, tmp_path, capsys):
    """The 1000+-token example prompt goes through every stage; its PG target keeps the whole
    prompt and the reason (the released GenPI code cut assistant turns at 512 tokens)."""
    from genpi.config import load_config
    from genpi.manifest import load_manifest
    from genpi.store import Store
    from genpi.synth.pipeline import load_synth
    from genpi.train.loop import build_examples
    from transformers import AutoTokenizer

    manifest = Path(__file__).resolve().parents[1] / "examples" / "prompts" / "shell_agent.yaml"
    [entry] = load_manifest(manifest)
    store = tmp_path / "store"
    rc, out, err = _cli(capsys, "internalize", manifest, "--store", store, *tiny_overrides)
    assert rc == 0, out + err
    [fpdir] = _fp_dirs(store, "shell_agent")
    assert (fpdir / "DONE").is_file()
    cfg = load_config(None, [o for o in tiny_overrides])
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    assert len(tok(entry.prompt)["input_ids"]) > 1000
    st = Store(store)
    ts = build_examples(tok, load_synth(st, str(fpdir)), entry.prompt, cfg.train)
    pg = [ex for kind, ex in ts.examples if kind == "pg"]
    assert pg and not ts.dropped.get("pg_too_long")
    target = tok.decode([t for t in pg[0].labels if t != -100])
    assert entry.prompt.strip()[-200:] in target and target.rstrip().endswith("<|im_end|>")
    # The long-prompt settings reach training: lr 2e-3 (the run left the default), the epochs
    # as the run set them (train.epochs=1, train.on_policy_epochs=1 in the tiny overrides).
    assert "long prompt: train.lr=0.002, train.on_policy_lr=0.001" in out and "epochs=" not in out
    spec = json.loads((fpdir / "spec.json").read_text())["config"]["train"]
    assert (spec["lr"], spec["epochs"], spec["on_policy_epochs"], spec["on_policy_lr"]) == (2e-3, 1, 1, 1e-3)
    history = json.loads((fpdir / "train.json").read_text())["history"]
    assert max(h["lr"] for h in history) == pytest.approx(2e-3, rel=0.05)
