"""QLoRA: an NF4 (double-quant) base with adapters; a few steps on a tiny random model reduce the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import Llama, LlamaConfig
from jaxquant.nn import LoRA, QLinear, quantize_model
from jaxquant.qlora import QLoRAConfig, finetune, lm_loss, qlora_model, train_batches, weight_memory

CFG = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, tie_embeddings=True)


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(CFG, rngs=nnx.Rngs(0))


def _stream(n: int = 8192, seed: int = 0) -> np.ndarray:
    """A learnable stream: a fixed random permutation cycle, i.e. token t is always followed by perm[t]."""
    perm = np.random.default_rng(seed).permutation(CFG.vocab_size)
    out = np.empty(n, np.int32)
    out[0] = 0
    for i in range(1, n):
        out[i] = perm[out[i - 1]]
    return out


def test_qlora_model_structure_and_start_equal_to_base(model) -> None:
    cfg = QLoRAConfig(rank=4, targets=r"layers/\d+/attn/(q|v)_proj")
    q = qlora_model(model, cfg)
    loras = [p for p, m in nnx.iter_graph(q) if isinstance(m, LoRA)]
    assert len(loras) == 2 * 2
    bases = [m for _, m in nnx.iter_graph(q) if isinstance(m, QLinear)]
    assert len(bases) == 2 * 7 and all(b.kernel.get_value().scheme == jq.NF4Scheme(double_quant=True) for b in bases)
    assert type(model.layers[0].attn.q_proj).__name__ == "Linear"  # the float model is untouched
    # B = 0: the adapted model is exactly the quantized base
    base_only = quantize_model(nnx.clone(model), [(r"layers/\d+/(attn|mlp)/\w+_proj", cfg.scheme)])
    tokens = jnp.asarray(_stream(32)[None])
    np.testing.assert_array_equal(np.asarray(q(tokens)), np.asarray(base_only(tokens)))
    mem = weight_memory(q)
    assert mem.adapter_bytes == 2 * 4 * ((64 + 64) + (64 + 32)) * 4  # rank 4 on q (64->64) and v (64->32), f32
    assert mem.base_bytes < 0.5 * mem.float_bytes


def test_finetune_reduces_loss_and_only_adapters_change(model) -> None:
    cfg = QLoRAConfig(rank=8, alpha=16.0, steps=20, lr=3e-3, warmup_steps=3, seq_len=32, batch_size=4)
    q = qlora_model(model, cfg)
    frozen = {
        "/".join(map(str, p)): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(q, nnx.Not(nnx.LoRAParam))))[0]
    }
    toks = _stream()
    res = finetune(q, toks[:6144], cfg, eval_tokens=toks[6144:], eval_seq_len=32, eval_windows=4, progress=False)
    assert len(res.losses) == 20 and res.tokens_seen == 20 * 4 * 32
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.1
    assert res.ppl_after < res.ppl_before
    after = {
        "/".join(map(str, p)): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(q, nnx.Not(nnx.LoRAParam))))[0]
    }
    assert frozen.keys() == after.keys()
    for k in frozen:  # NF4 codes, double-quant absmax, embedding and norms: bit-identical
        assert frozen[k].tobytes() == after[k].tobytes(), k
    assert res.trainable_params == sum(
        m.rank * (m.in_features + m.out_features) for _, m in nnx.iter_graph(q) if isinstance(m, LoRA)
    )
    assert res.memory.optimizer_bytes >= 2 * res.memory.adapter_bytes
    assert res.memory.weight_bytes == res.memory.base_bytes + res.memory.adapter_bytes
    assert np.isfinite(float(lm_loss(q, jnp.asarray(toks[:64].reshape(2, 32)))))


def test_train_batches_cover_windows_in_shuffled_epochs() -> None:
    toks = np.arange(100)
    it = train_batches(toks, seq_len=10, batch_size=5, seed=1)
    epoch = np.concatenate([next(it), next(it)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 100, 10))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(train_batches(toks, seq_len=50, batch_size=3))


def test_config_errors(model) -> None:
    with pytest.raises(ValueError, match="weight-only base scheme"):
        QLoRAConfig(scheme=jq.LLMInt8Scheme())
    with pytest.raises(ValueError, match="steps"):
        QLoRAConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        QLoRAConfig(lr=-1.0)
    with pytest.raises(ValueError, match="no linear layer matches both"):
        qlora_model(model, QLoRAConfig(targets="encoder/.*"))
    with pytest.raises(ValueError, match="invalid targets regex"):
        qlora_model(model, QLoRAConfig(targets="(("))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        finetune(quantize_model(nnx.clone(model), [(r".*_proj", jq.NF4Scheme())]), _stream(), QLoRAConfig())
