"""GGUF loading: the real SmolLM2-135M against an independent float64 numpy forward, greedy decoding,
HF conversion, int8 QArray kernels; synthetic GGUF files for the loader's mapping and its errors."""

from __future__ import annotations

import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.models import (
    Llama,
    LlamaConfig,
    convert_rope_style,
    flat_params,
    forward,
    load_gguf,
    load_hf_model,
    load_model,
    model_params,
    param_shapes,
    save_hf_checkpoint,
    unflatten_params,
    with_params,
)

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed the Iron Lady, it was constructed as the centerpiece of the 1889 World's Fair."
)


# ---------------------------------------------------------------------------------------------------------
# An independent float64 reference: reads the GGUF with gguf-py, adjacent-pair RoPE via complex numbers
# ---------------------------------------------------------------------------------------------------------


def _reference_logits(path, tokens: np.ndarray) -> np.ndarray:
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    tensors = {t.name: t for t in r.tensors}

    def w(name: str) -> np.ndarray:  # numpy (out, in) float64
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)

    n_layers = meta["llama.block_count"]
    n_heads = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    eps = meta["llama.attention.layer_norm_rms_epsilon"]
    theta = meta["llama.rope.freq_base"]
    emb = w("token_embd.weight")
    dim = emb.shape[1]
    hd = dim // n_heads
    T = len(tokens)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    rot = np.exp(1j * ang)[:, None, :]

    def rope(x):  # (T, H, hd), consecutive pairs are (real, imag)
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    causal = np.tril(np.ones((T, T), bool))
    x = emb[tokens]
    for i in range(n_layers):
        h = rms(x, w(f"blk.{i}.attn_norm.weight"))
        q = rope((h @ w(f"blk.{i}.attn_q.weight").T).reshape(T, n_heads, hd))
        k = rope((h @ w(f"blk.{i}.attn_k.weight").T).reshape(T, n_kv, hd))
        v = (h @ w(f"blk.{i}.attn_v.weight").T).reshape(T, n_kv, hd)
        k = np.repeat(k, n_heads // n_kv, axis=1)
        v = np.repeat(v, n_heads // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p, v).reshape(T, dim)
        x = x + o @ w(f"blk.{i}.attn_output.weight").T
        h = rms(x, w(f"blk.{i}.ffn_norm.weight"))
        g = h @ w(f"blk.{i}.ffn_gate.weight").T
        u = h @ w(f"blk.{i}.ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ w(f"blk.{i}.ffn_down.weight").T
    x = rms(x, w("output_norm.weight"))
    head = w("output.weight") if "output.weight" in tensors else emb
    return x @ head.T


@pytest.fixture(scope="module")
def tokens64(tokenizer) -> np.ndarray:
    ids = tokenizer.encode(PARAGRAPH)
    assert len(ids) >= 64
    return np.asarray(ids[:64], np.int32)


@pytest.fixture(scope="module")
def logits64(smollm_model, tokens64) -> np.ndarray:
    return np.asarray(forward(smollm_model, jnp.asarray(tokens64[None])))[0]


@pytest.mark.slow
def test_config_read_from_metadata(smollm) -> None:
    config, params, _ = smollm
    assert config == LlamaConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        norm_eps=1e-5,
        rope_theta=1e5,
        rope_style="adjacent",
        tie_embeddings=True,
        max_seq_len=8192,
    )
    flat = flat_params(params)
    assert set(flat) == set(param_shapes(config))
    assert all(v.dtype == np.float32 for v in flat.values())
    assert flat["layers/0/mlp/down_proj/kernel"].shape == (1536, 576)


@pytest.mark.slow
def test_logits_match_float64_numpy_reference(gguf_path, tokens64, logits64) -> None:
    ref = _reference_logits(gguf_path, tokens64)
    assert logits64.shape == ref.shape == (64, 49152)
    err = np.abs(logits64 - ref).max()
    assert err <= 1e-3, err


@pytest.mark.slow
def test_greedy_continuation_is_sensible(smollm_model, tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is")
    n, steps = len(prompt), 6
    # fixed shape: one compile; attention is causal, so the padding is inert
    buf = np.full((1, 64), tokenizer.eos_id, np.int32)
    buf[0, :n] = prompt
    for t in range(n, n + steps):
        logits = forward(smollm_model, jnp.asarray(buf))
        buf[0, t] = int(jnp.argmax(logits[0, t - 1]))
    text = tokenizer.decode(buf[0, n : n + steps].tolist())
    assert "Paris" in text, text


@pytest.mark.slow
def test_hf_conversion_gives_identical_logits(smollm, tokenizer, tmp_path, tokens64, logits64) -> None:
    config, params, _ = smollm
    folder = save_hf_checkpoint(params, config, tmp_path / "smollm2-hf", tokenizer=tokenizer)
    model, tok = load_model(folder)
    assert model.config.rope_style == "half"
    assert model.config == config.replace(rope_style="half")
    assert tok.encode(PARAGRAPH) == tokenizer.encode(PARAGRAPH)
    out = np.asarray(forward(model, jnp.asarray(tokens64[None])))[0]
    err = np.abs(out - logits64).max()
    assert err <= 1e-4, err
    # the HF q kernel is the un-permuted GGUF one
    hf_q = np.asarray(model_params(model)["layers"][3]["attn"]["q_proj"]["kernel"])
    gg_q = params["layers"][3]["attn"]["q_proj"]["kernel"]
    assert not np.array_equal(hf_q, gg_q)
    np.testing.assert_array_equal(
        convert_rope_style(params, config, "half")[1]["layers"][3]["attn"]["q_proj"]["kernel"], hf_q
    )


@pytest.mark.slow
def test_int8_qarray_kernels_close_to_float(smollm_model, tokens64, logits64) -> None:
    rule = re.compile(r".*layers/\d+/(attn|mlp)/\w+_proj/kernel")
    scheme = jq.IntScheme(bits=8)
    flat = flat_params(model_params(smollm_model))
    qflat = {k: (jq.quantize(v, scheme) if rule.fullmatch(k) else v) for k, v in flat.items()}
    assert sum(isinstance(v, jq.QArray) for v in qflat.values()) == 7 * 30
    qmodel = with_params(smollm_model, unflatten_params(qflat))
    out = np.asarray(forward(qmodel, jnp.asarray(tokens64[None])))[0]
    assert np.all(np.isfinite(out))
    # measured: relative L2 0.035, top-1 agreement 60/64, KL(float || int8) 0.0035 nats per token
    rel = np.linalg.norm(out - logits64) / np.linalg.norm(logits64)
    assert 0 < rel < 0.06, rel
    agree = np.mean(out.argmax(-1) == logits64.argmax(-1))
    assert agree >= 0.85, agree
    lp = jax.nn.log_softmax(jnp.asarray(logits64))
    lq = jax.nn.log_softmax(jnp.asarray(out))
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))
    assert kl < 0.01, kl


# ---------------------------------------------------------------------------------------------------------
# Synthetic GGUF files
# ---------------------------------------------------------------------------------------------------------


def _tiny() -> tuple[LlamaConfig, dict]:
    c = LlamaConfig(
        vocab_size=40,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=96,
        rope_theta=5e4,
        norm_eps=1e-6,
    )
    rng = np.random.default_rng(0)
    flat = {
        k: ((1.0 if k.endswith("scale") else 0.0) + 0.2 * rng.standard_normal(s)).astype(np.float32)
        for k, s in param_shapes(c).items()
    }
    return c, unflatten_params(flat)


_GGUF_NAMES = {
    "attn_norm/scale": "attn_norm",
    "attn/q_proj/kernel": "attn_q",
    "attn/k_proj/kernel": "attn_k",
    "attn/v_proj/kernel": "attn_v",
    "attn/o_proj/kernel": "attn_output",
    "mlp_norm/scale": "ffn_norm",
    "mlp/gate_proj/kernel": "ffn_gate",
    "mlp/up_proj/kernel": "ffn_up",
    "mlp/down_proj/kernel": "ffn_down",
}


def _write_gguf(path, c: LlamaConfig, params: dict, *, arch: str = "llama", q8: tuple[str, ...] = ()) -> None:
    """Write a tiny llama GGUF the way llama.cpp's converter lays it out (q/k permuted, (out, in) weights)."""
    _, adj = convert_rope_style(params, c, "adjacent")
    flat = flat_params(adj)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    for k, v in flat.items():
        if k == "embed/embedding":
            name, arr = "token_embd.weight", v
        elif k == "norm/scale":
            name, arr = "output_norm.weight", v
        elif k == "lm_head/kernel":
            name, arr = "output.weight", v.T
        else:
            i, rest = re.fullmatch(r"layers/(\d+)/(.+)", k).groups()
            name = f"blk.{i}.{_GGUF_NAMES[rest]}.weight"
            arr = v.T if rest.endswith("kernel") else v
        arr = np.ascontiguousarray(arr, np.float32)
        if name in q8:
            w.add_tensor(
                name,
                gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_gguf_round_trip(tmp_path) -> None:
    c, p = _tiny()
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, c, p, q8=("blk.1.ffn_up.weight",))
    c2, p2, tok = load_gguf(path)
    assert tok is None
    assert c2 == c.replace(rope_style="adjacent")
    f1, f2 = flat_params(convert_rope_style(p, c, "adjacent")[1]), flat_params(p2)
    for k in f1:
        if k == "layers/1/mlp/up_proj/kernel":
            q = gguf.quants.quantize(np.ascontiguousarray(f1[k].T), gguf.GGMLQuantizationType.Q8_0)
            want = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).T
            np.testing.assert_array_equal(f2[k], want)
            assert not np.array_equal(f2[k], f1[k])
        else:
            np.testing.assert_array_equal(f2[k], f1[k])
    # same model as the HF-layout original, up to the Q8_0 tensor
    f3 = flat_params(p)
    f3["layers/1/mlp/up_proj/kernel"] = f2["layers/1/mlp/up_proj/kernel"]
    toks = jnp.asarray([[1, 5, 39, 7, 7, 0, 22]], jnp.int32)
    ref = np.asarray(Llama.from_params(c, unflatten_params(f3))(toks))
    model, _ = load_model(path)
    np.testing.assert_allclose(np.asarray(model(toks)), ref, atol=1e-5)


@pytest.mark.slow
def test_gguf_errors(tmp_path, gguf_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="not a file"):
        load_gguf(tmp_path)

    head = tmp_path / "head1000.gguf"
    with open(gguf_path, "rb") as f:
        head.write_bytes(f.read(1000))
    with pytest.raises(ValueError, match=r"head1000\.gguf.*(corrupt or truncated|truncated)"):
        load_gguf(head)

    c, p = _tiny()
    full = tmp_path / "full.gguf"
    _write_gguf(full, c, p)
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        load_gguf(cut)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(data[:10])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(tiny)

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.gguf is not a GGUF file"):
        load_gguf(garbage)

    other = tmp_path / "gpt2.gguf"
    _write_gguf(other, c, p, arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture is 'gpt2'.*only 'llama'"):
        load_gguf(other)


def test_gguf_missing_tensor(tmp_path) -> None:
    c, p = _tiny()
    flat = flat_params(p)
    path = tmp_path / "partial.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_tensor("token_embd.weight", flat["embed/embedding"])
    w.add_tensor("output_norm.weight", flat["norm/scale"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"partial\.gguf: missing tensors"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError):
        load_hf_model(tmp_path / "nothing")


def test_jax_default_device_arrays(tmp_path) -> None:
    """Loaded params become JAX arrays inside the model (not numpy)."""
    c, p = _tiny()
    path = tmp_path / "t.gguf"
    _write_gguf(path, c, p)
    model, _ = load_model(path)
    leaves = jax.tree.leaves(model_params(model))
    assert all(isinstance(x, jax.Array) for x in leaves)
