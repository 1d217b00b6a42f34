"""What the benchmarks share: the models they run on and the record of where they ran.

Every result carries `environment()`, so a later run can be compared like for like.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def build_model(model_name: str, device: str):
    """(model, tokenizer): the embedded SmolLM2-135M (fp32 on CPU), or on a GPU a random-weight
    model of Qwen2-0.5B's shape in bf16 with the SmolLM2 tokenizer (throughput does not depend
    on the weights, and no checkpoint can be downloaded where the GPU runs)."""
    import torch

    from genpi.config import ModelConfig
    from genpi.models import load_model, load_tokenizer

    if model_name == "embedded":
        model, tok, _ = load_model(ModelConfig(device=device))
        return model, tok
    if model_name != "qwen2-0.5b-random":
        raise ValueError(f"--model: expected 'embedded' or 'qwen2-0.5b-random', got {model_name!r}")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(ModelConfig())
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_name() -> str:
    """The results file's name: the GPU model where there is one, else the CPU and its cores."""
    gpu = gpu_name()
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("genpi", "torch", "transformers", "peft", "ray", "deepspeed", "vllm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "machine": machine_name(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "versions": versions,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
