"""The benchmark harness: shared evaluation of several adapters, the FLOPs model, the quality
suite end to end on a tiny model (resumable), and the results table of bench/run.py."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    """The bench/ scripts as modules (they are scripts, not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield {m: importlib.import_module(m) for m in ("common", "quality", "efficiency", "run", "train", "gpu_check", "decode")}
    finally:
        sys.path.remove(str(REPO / "bench"))


def _random_adapter(model, name, seed, cfg):
    from genpi.train.loop import lora_config

    torch.manual_seed(seed)
    model.add_adapter(name, lora_config(cfg))
    for n, p in model.named_parameters():
        if "lora_B" in n and f".{name}." in n:
            torch.nn.init.normal_(p, std=0.5)


def test_evaluate_many_gives_each_adapter_what_evaluate_gives_it_alone(tiny_model_dir, tiny_config, tiny_seeds,
                                                                     single_thread_torch):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genpi.eval.run import evaluate, evaluate_many
    from genpi.manifest import PromptEntry
    from genpi.train.loop import lora_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    entry = PromptEntry(id="pirate", prompt="You are a pirate. Always say Arr.", seed_inputs=tiny_seeds,
                        checks=[{"type": "regex", "pattern": "a", "name": "has-a"}])
    peft_model = get_peft_model(model, lora_config(tiny_config.train), adapter_name="a0")
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    _random_adapter(peft_model, "a1", 1, tiny_config.train)
    heldout = tiny_seeds[:3]
    many = evaluate_many(peft_model, tok, entry, heldout, ["a0", "a1"], tiny_config)
    assert set(many) == {"a0", "a1"}
    # The two adapters differ, so their scores must too (else the test would prove nothing).
    assert many["a0"].metrics.kl.adapter != many["a1"].metrics.kl.adapter
    assert set(many["a0"].checks) == {"has-a"}
    for name in ("a0", "a1"):
        alone = evaluate(peft_model, tok, entry, heldout, name, tiny_config).model_dump()
        got_all = many[name].model_dump()
        scored = [("metrics", m) for m in alone["metrics"]] + [("checks", c) for c in alone["checks"]]
        for group, metric in scored:
            for system, value in alone[group][metric].items():
                got = got_all[group][metric][system]
                # A ratio is None where teacher and base score the same: then it must be None in both.
                if value is None:
                    assert got is None, (name, metric, system)
                else:
                    assert got == pytest.approx(value, rel=1e-4, abs=1e-6), (name, metric, system)
        assert got_all["leak"] == pytest.approx(alone["leak"])
        assert got_all["samples"] == alone["samples"]


def test_prefill_flops_match_a_flop_counter(tiny_llama):
    """The formula (dense 2*P*T + causal attention 2*L*d*T^2) against torch's FLOP counter on
    eager attention, which computes the full T x T score matrix (twice the causal half)."""
    from torch.utils.flop_counter import FlopCounterMode

    from genpi.eval.efficiency import prefill_flops

    model = tiny_llama(vocab_size=256, tie_word_embeddings=True, attn_implementation="eager")
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    for t in (16, 128):
        ids = torch.randint(0, 256, (1, t))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=ids)
        counted = counter.get_total_flops()
        full_attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * t * t
        causal_estimate = prefill_flops(cfg, n_params, t)
        # Parameters the counter does not see as matmuls (norm weights) are <1% here.
        assert causal_estimate + full_attention / 2 == pytest.approx(counted, rel=0.03), t
    assert prefill_flops(cfg, n_params, 2048) > 2 * prefill_flops(cfg, n_params, 1024)  # super-linear


def test_efficiency_bench_on_a_tiny_model(bench, tiny_model_dir, single_thread_torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    res = bench["efficiency"].run("tiny", "cpu", buckets=(32, 256), repeats=1, new_tokens=2, model=model, tok=tok)
    short, long_ = res["buckets"]
    # (SmolLM2's template puts a default system message into a bare request, so a short
    # prompt saves less than its own length.)
    assert short["input_tokens_with_prompt"] >= 32 and short["input_tokens_without_prompt"] < short["input_tokens_with_prompt"]
    assert long_["input_tokens_with_prompt"] >= 256
    assert short["input_tokens_without_prompt"] == long_["input_tokens_without_prompt"]
    assert long_["ratio_input_tokens"] < short["ratio_input_tokens"] < 1
    assert long_["ratio_prefill_flops"] < long_["ratio_input_tokens"]  # attention makes long prompts dearer
    for r in res["buckets"]:
        assert r["latency_with_prompt"]["prefill_s"] > 0 and r["latency_adapter_without_prompt"]["generate_s"] > 0
    assert not hasattr(model, "peft_config")  # the adapter was removed again
    md = bench["efficiency"].table(res)
    assert md.count("\n") == 3 and "| 256 |" in md


def test_decode_bench_runs_both_arms_on_the_same_batch(bench, tiny_model_dir, single_thread_torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    res = bench["decode"].run(model, tok, 4, 6, "cpu", repeats=1)
    assert set(res) == {"synthesis", "evaluation"}
    for r in res.values():
        assert all(len(runs) == 1 and runs[0]["tokens"] > 0 for runs in r["arms"].values())
        assert r["ratio_loop_over_generate"] > 0
    greedy = res["evaluation"]["arms"]
    assert greedy["loop"][0]["tokens"] == greedy["generate"][0]["tokens"]  # the same greedy replies


def test_quality_suite_end_to_end_on_a_tiny_model_and_resumes(bench, tiny_model_dir, tmp_path, single_thread_torch):
    quality = bench["quality"]
    assert len(quality.load_suite(None)) >= 8
    kinds = {quality.KINDS[e.id] for e in quality.load_suite(None)}
    assert {"language", "persona", "format", "refusal policy", "few-shot classification"} <= kinds
    store = tmp_path / "store"
    args = dict(model=str(tiny_model_dir), store_root=store, prompts=["french", "sentiment"],
                setting_names=["joint", "kl_only"], overrides=TINY_OVERRIDES)
    res = quality.run(**args)
    assert set(res["prompts"]) == {"french", "sentiment"}
    for r in res["prompts"].values():
        assert set(r["settings"]) == {"joint", "kl_only"}
        assert r["tokens_saved_per_request"] > 0
        for s in r["settings"].values():
            assert "kl" in s["ratios"] and s["train_seconds"] > 0
    # Different losses give different adapters.
    fr = res["prompts"]["french"]["settings"]
    assert fr["joint"]["adapter_scores"]["kl"] != fr["kl_only"]["adapter_scores"]["kl"]
    summary = res["summary"]["per_setting"]
    assert set(summary) == {"joint", "kl_only"} and res["summary"]["best"] in {"joint", "kl_only", None}
    adapters = sorted(store.rglob("adapter_model.safetensors"))
    assert len(adapters) == 4
    evals = sorted(store.rglob("quality/eval-*.json"))
    assert len(evals) == 2
    before = {p: p.stat().st_mtime_ns for p in adapters + evals}
    again = quality.run(**args)  # resumes: nothing is synthesized, trained or evaluated again
    assert {p: p.stat().st_mtime_ns for p in adapters + evals} == before
    assert again["prompts"]["french"]["settings"]["joint"]["ratios"] == fr["joint"]["ratios"]
    assert again["prompts"]["french"]["settings"]["joint"]["checks"] == fr["joint"]["checks"]
    assert set(res["prompts"]["french"]["checks"]) == set(fr["joint"]["checks"]) == {"language=fr"}
    md = quality.table(res)
    assert "genpi joint (default)" in md and "| french | language |" in md
    fr_row = next(line for line in md.splitlines() if line.startswith("| french |"))
    assert "| language=fr " in fr_row  # the checks column: teacher / base / each setting


def test_quality_table_reads_results_written_before_the_typed_eval_record(bench):
    """bench/run.py --merge re-renders the committed quality results, whose checks are
    "check:NAME" entries among the metrics: the table still shows them."""
    res = json.loads((REPO / "bench" / "results" / "cpu-2core.json").read_text())["sections"]["quality"]["cpu"]["result"]
    fr = res["prompts"]["french"]
    assert "checks" not in fr and "check:language=fr" in fr["teacher_scores"]  # the old layout
    row = next(line for line in bench["quality"].table(res).splitlines() if line.startswith("| french |"))
    sets = list(res["settings"])
    want = [fr["teacher_scores"]["check:language=fr"], fr["base_scores"]["check:language=fr"],
            *(fr["settings"][s]["adapter_scores"]["check:language=fr"] for s in sets)]
    assert "language=fr " + " / ".join(f"{v:.2f}" for v in want) in row


def test_run_writes_results_and_readme_table_with_honest_gpu_rows(bench, tmp_path, monkeypatch):
    """bench/run.py end to end on its cheapest real section (efficiency, shrunk to one short
    bucket through the script's own flags), then the README block is replaced in place."""
    run = bench["run"]
    plan = run.sections(gpu=False)
    assert "gpu" not in {arm for arms in plan.values() for arm, _ in arms}
    monkeypatch.setattr(run, "sections", lambda gpu: {
        "efficiency": [("cpu", ["efficiency.py", "--device", "cpu", "--buckets", "16", "--repeats", "1"])]})
    out = tmp_path / "results"
    assert run.main(["--out", str(out)]) == 0
    machine = bench["common"].machine_name()
    res = json.loads((out / f"{machine}.json").read_text())
    eff = res["sections"]["efficiency"]["cpu"]
    assert eff["status"] == "measured" and eff["result"]["buckets"][0]["bucket_prompt_tokens"] == 16
    md = (out / f"{machine}.md").read_text()
    assert "GPU: not measured (no GPU on this machine)" in md
    assert "| training: adapters/hour | gpu | not measured (no GPU on this machine)" in md
    assert "quality: not run" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_BEGIN}\nold table\n{run.README_END}\nrest\n")
    run.update_readme(md, readme)
    text = readme.read_text()
    assert "old table" not in text and md in text and text.startswith("intro\n") and text.endswith("rest\n")


def test_genpi_bench_is_bench_run(capsys, monkeypatch, tmp_path):
    from pathlib import Path

    from genpi.cli import main

    # `genpi bench` runs the bench/run.py of the checkout it is started in; elsewhere it says so.
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--help"]) == 2
    assert "source checkout" in capsys.readouterr().err
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--only" in out and "--update-readme" in out
    assert main(["bench", "--only", "nonsense"]) == 2
    assert "unknown section" in capsys.readouterr().err


def test_run_says_no_gpu_only_where_none_was_detected(bench):
    """A GPU arm without a figure reads "no GPU on this machine" only when the run's
    environment found no GPU (torch.cuda), never from a constant."""
    run = bench["run"]
    env = bench["common"].environment()
    for gpu in (None, "NVIDIA H200"):
        res = {"environment": {**env, "gpu": gpu}, "sections": {}}
        md = run.markdown(res)
        assert ("no GPU on this machine" in md) == (gpu is None), gpu
        if gpu:
            assert "| training: adapters/hour | gpu | not measured (no GPU arm in this run)" in md


def test_train_bench_flops_count_the_output_layer_only_where_logits_are_kept(bench, tiny_llama, single_thread_torch):
    """bench/train.py's FLOPs model against torch's FLOP counter on one packed forward +
    backward with logits_to_keep, as the training loop runs it: the output layer is counted
    at the kept positions only. (Eager attention computes the full T x T scores where the
    model counts the causal half; the embeddings' output is made to need a gradient so the
    counter also sees the first layer's input gradient, which the model counts.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from genpi.config import TrainConfig
    from genpi.train.data import EncodedExample
    from genpi.train.multilora import PackedLora

    train = bench["train"]
    model = tiny_llama(vocab_size=256, tie_word_embeddings=True, attn_implementation="eager")
    cfg = TrainConfig(lora_r=4, lora_alpha=8)
    sizes, lora = train.model_sizes(model), train.lora_params_per_adapter(model, cfg)
    t, first = 40, 30  # the reply starts at 30: logits are kept from 29 on, 11 of 40 positions
    exs = [EncodedExample(list(range(1 + i, t + 1 + i)), [-100] * first + list(range(t - first)), [False] * t,
                          None, None, t - first) for i in range(2)]
    pack = PackedLora(model, 2, cfg.lora_r, cfg.lora_alpha)
    ids = torch.tensor([e.input_ids for e in exs])
    with FlopCounterMode(display=False) as counter:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with pack.route_to([0, 1]):
            logits = model(inputs_embeds=embeds, logits_to_keep=torch.arange(first - 1, t)).logits
        assert logits.shape[1] == t - first + 1
        logits.float().sum().backward()
    layers, d = sizes["layers"], sizes["hidden"]
    full_minus_causal = len(exs) * 3 * (4 * layers * d * t * t - 2 * layers * d * t * (t + 1))
    want = train.train_flops(sizes, lora, exs) + full_minus_causal
    assert counter.get_total_flops() == pytest.approx(want, rel=0.01)
    # Counting the output layer at every position (the former 4 x params per token) is far off here.
    every_position = want + len(exs) * 4 * sizes["head"] * (first - 1)
    assert counter.get_total_flops() != pytest.approx(every_position, rel=0.05)


def test_gpu_check_runs_without_cuda_and_says_what_it_skipped(tmp_path):
    """bench/gpu_check.sh end to end on a machine without CUDA: one JSON file, the GPU tests
    collected and each skipped with its reason, every GPU bench arm skipped with the reason,
    and none of the genpi modules it needs importing ray or vllm at import time."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.sh would run the GPU checks for minutes")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)], cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cuda"] is False and res["failed"] == []
    assert res["genpi_import_problems"] == {"fail_to_import": {}, "import_ray_or_vllm_at_import_time": {}}
    tests = res["tests"]
    assert tests["status"] == "skipped" and tests["counts"]["skipped"] == len(tests["tests"]) >= 8
    names = {c["test"].split("::")[1].split("[")[0] for c in tests["tests"]}
    assert {"test_packed_lora_matches_peft_in_bf16_outputs_and_gradients",
            "test_deepspeed_zero_over_nccl_in_bf16_equals_plain_packed_training",
            "test_several_packs_return_gpu_memory_to_the_baseline",
            "test_engine_topk_is_the_log_softmax_of_raw_logits"} <= names
    assert all("torch.cuda.is_available() is False" in c["reason"] for c in tests["tests"])
    assert set(res["bench"]) == {"train", "synth", "decode", "efficiency"}
    for arm in res["bench"].values():
        assert arm["status"] == "skipped" and "torch.cuda.is_available() is False" in arm["reason"]
    skipped = {s["what"] for s in res["skipped"]}
    assert {"bench train (GPU arm)", "bench synth (GPU arm)", "bench efficiency (GPU arm)"} <= skipped
    assert "skipped bench train (GPU arm)" in proc.stdout


# Slow: two whole jobs; 10 prompts alone took 11.5 min on 2 busy cores (evaluation ~35 s per
# prompt on the tiny model with SmolLM2's vocabulary, 1-3 min of Ray Train start per wave).
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_scale_bench_quick_end_to_end(tmp_path, tiny_model_dir):
    """bench/scale.py --quick as bench/run.py runs it: the batch job on 10 then 20 real prompts
    of the shared manifest (skipped, saying so, where it is absent), every figure present and
    consistent with the store it left, the growth and the targets computed, the table written."""
    import subprocess

    manifest = REPO.parent / "shared" / "manifests" / "s-ifeval-300.jsonl"
    if not manifest.exists():
        pytest.skip(f"{manifest} is absent (the shared manifests sit next to the checkout, never in it)")
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--quick", "--out", str(out),
                           "--work", str(work), "--model", str(tiny_model_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("scale-quick-*.json")
    res = json.loads(path.read_text())
    assert [r["n"] for r in res["runs"]] == [10, 20]
    for r in res["runs"]:
        assert r["returncode"] == 0 and r["published"] == r["n"] == r["counts"]["published"]
        assert 0 < r["first_published_s"] < r["wall_s"] and r["first_published_share"] < 1
        reg = [json.loads(p.read_text()) for p in (work / f"n{r['n']}" / "store" / "registry").glob("*.json")]
        assert len(reg) == r["n"]
        # Model time is below wall time, so the overhead is positive; no figure is made up.
        assert sum(r["model_seconds"].values()) < r["wall_s"] and r["overhead_s_per_prompt"] > 0
        assert r["model_seconds_source"] in ("report model_seconds", "estimated from stage records")
        assert 100 < r["driver_vmhwm_mb"] <= r["driver_peak_rss_mb"] + 1 <= r["process_tree_max_rss_mb"] + 1
        # spec.json, synth files, train.json, adapter files, eval.json, DONE at least.
        assert r["store_files_per_prompt"]["min"] >= 8
    g = res["growth"]
    assert (g["from_n"], g["to_n"], g["prompt_ratio"]) == (10, 20, 2.0) and g["time_ratio"] > 0.5
    assert [t["target"] for t in res["targets"]] == ["overhead_s_per_prompt", "driver_peak_rss_mb",
                                                     "first_published_share"]
    assert all(t["at_n"] == 20 and t["pass"] in (True, False) for t in res["targets"])
    assert "| 20 | 1 | 0 |" in proc.stdout and "Targets: " in proc.stdout


def test_kl_positions_splits_the_evaluations_kl_by_reply_position(tiny_model_dir, tiny_config, single_thread_torch):
    """bench/kl_positions.py: its bins add up to the evaluation's own KL (genpi.eval.run._kl on
    the same teacher replies), for the base and the adapter, and its total ratio is eval.json's."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genpi.chat import student_messages, teacher_messages
    from genpi.engines.base import ChatRequest
    from genpi.engines.hf import HFEngine
    from genpi.eval.metrics import internalization_ratio
    from genpi.eval.run import _kl
    from genpi.train.loop import lora_config

    sys.path.insert(0, str(REPO / "bench"))
    try:
        kl_positions = importlib.import_module("kl_positions")
    finally:
        sys.path.remove(str(REPO / "bench"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft_model = get_peft_model(model, lora_config(tiny_config.train), adapter_name="a")
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    prompt, inputs = "You are a pirate. Always say Arr.", ["hello there", "what is rain?", "tell me a story"]
    engine = HFEngine.for_model(peft_model, tok, tiny_config)
    with peft_model.disable_adapter():
        replies = sorted(engine.generate([ChatRequest(teacher_messages(prompt, x), 40, tag=i)
                                          for i, x in enumerate(inputs)]), key=lambda c: c.tag)
    res = kl_positions.score(peft_model, tok, prompt, inputs, replies)
    keep = [i for i, c in enumerate(replies) if c.text.strip()]
    assert res["n_inputs"] == len(keep) >= 2

    def conv(msgs, c):
        return [*msgs, {"role": "assistant", "content": c.text, "token_ids": c.token_ids}]
    n_tok, base, adapters = _kl(peft_model, tok, [conv(teacher_messages(prompt, inputs[i]), replies[i]) for i in keep],
                                [conv(student_messages(inputs[i]), replies[i]) for i in keep], ["a"], 16)
    total = res["total"]
    assert total["tokens"] == n_tok == sum(r["tokens"] for r in res["by_position"])
    assert len(res["by_position"]) >= 2  # replies long enough to fill more than one bin
    assert total["base"] / n_tok == pytest.approx(base, rel=1e-4)
    assert total["adapter"] / n_tok == pytest.approx(adapters["a"], rel=1e-4)
    assert total["ratio"] == pytest.approx(internalization_ratio(adapters["a"], base, 0.0), rel=1e-4)
    assert "| all |" in kl_positions.table(res)
    # The training's coarse-grained KL (top-k + a tail bucket) is at most the full KL, equal
    # to it when the top-k is the whole vocabulary.
    assert 0 < res["adapter_topk"] <= total["adapter"] * (1 + 1e-5) and 0 < res["teacher_tail_mass"] < 1
    full = kl_positions.score(peft_model, tok, prompt, inputs, replies, top_k=len(tok))
    assert full["adapter_topk"] == pytest.approx(total["adapter"], rel=1e-3)
