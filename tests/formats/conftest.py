"""Fixtures for the format tests: the real SmolLM2 Q4_1 GGUF (fetched once into the cache), a tiny random
llama model whose widths are multiples of 256 (so every K-quant applies), and its GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf ($JAXQUANT_GGUF overrides the cache)."""
    env = os.environ.get("JAXQUANT_GGUF")
    if env:
        return Path(env)
    from jaxquant.eval import assets

    return Path(assets.model_path())


@pytest.fixture(scope="session")
def smollm_reader(gguf_path):
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def smollm_float(gguf_path):
    """(config, float params, tokenizer) of the real model (gguf-py dequantized)."""
    from jaxquant.models import load_gguf

    return load_gguf(gguf_path)


@pytest.fixture(scope="session")
def tiny_config():
    from jaxquant.models import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=512,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_style="adjacent",
        tie_embeddings=True,
        max_seq_len=128,
    )


def random_params(config, seed: int = 0) -> dict:
    from jaxquant.models.llama import param_shapes, unflatten_params

    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path.endswith("scale"):
            flat[path] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            flat[path] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return unflatten_params(flat)


@pytest.fixture(scope="session")
def make_params():
    """``make_params(config, seed=0)``: random float params for a config."""
    return random_params


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return random_params(tiny_config)
