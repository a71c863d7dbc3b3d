"""Shared fixtures of the algorithms tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """An HF folder: random 2-block Llama with SmolLM2's tokenizer and vocabulary, plus a plain-text file."""
    from jaxquant.eval import assets, text
    from jaxquant.models import Llama, LlamaConfig, flat_params, model_params, save_hf_checkpoint, unflatten_params
    from jaxquant.models import with_params as wp
    from jaxquant.models.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(assets.model_path())
    cfg = LlamaConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, tie_embeddings=True)
    m = Llama(cfg)
    p = flat_params(model_params(m))
    rng = np.random.default_rng(0)
    for k, v in p.items():
        if k.endswith("kernel"):
            p[k] = jnp.asarray(rng.standard_normal(v.shape) / np.sqrt(v.shape[0]), jnp.float32)
    m = wp(m, unflatten_params(p))
    root = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(m, None, root / "model", tokenizer=tok)
    (root / "text.txt").write_text(text.eval_text()[:40_000])
    return root
