"""A tiny random Llama and token streams for the layer/SPEC tests (no download)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxquant.models import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny_llama() -> Llama:
    """A 2-block random Llama (dim 64), with a few large embedding features so that LLM.int8 outliers exist."""
    model = Llama(TINY, rngs=nnx.Rngs(0))
    emb = np.array(model.embed.embedding[...])
    emb *= 40.0
    emb[:, [3, 17]] *= 10.0
    model.embed.embedding[...] = emb
    return model


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """A 1-D token stream of 4096 ids."""
    return np.random.default_rng(0).integers(0, TINY.vocab_size, 4096).astype(np.int32)
