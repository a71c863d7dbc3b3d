"""KV-cache generation: cache correctness against the full forward pass, left padding, EOS, sampling, KV-cache
quantization, compile-once, the ``jaxquant generate`` CLI, and (one test) float vs int8 SmolLM2.

Tolerances: on tiny float32 models the incremental (prefill + decode) logits equal the full-sequence forward
logits to 1e-4 absolute (logits of magnitude ~4; observed ~2e-6: the decode attention sums over the whole
cache, whose masked slots add exact zeros, so only the summation order differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import cli_generate
from jaxquant.cli import main
from jaxquant.generate import (
    _generate_jit,
    cached_forward,
    decode_step,
    generate,
    generate_tokens,
    init_cache,
    left_pad,
    prefill,
    quantize_kv,
    sample_logits,
)
from jaxquant.models import Llama, LlamaConfig, forward, param_shapes, unflatten_params, with_params
from jaxquant.specs import BLOCK_LINEARS

ATOL = 1e-4
V = 61


def _cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, rope_theta=1e4)
    base.update(kw)
    return LlamaConfig(**base)


@functools.cache
def _cached_model(seed: int, scale: float, kw: tuple) -> Llama:
    c = _cfg(**dict(kw))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(c).items():
        if path.endswith("scale"):
            flat[path] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            flat[path] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return with_params(Llama(c), unflatten_params(flat))


def _model(seed: int = 0, scale: float = 0.2, **kw) -> Llama:
    """A tiny model with random weights and non-trivial norms (built once per arguments: shared compiles)."""
    return _cached_model(seed, scale, tuple(sorted(kw.items())))


def _seq(b: int, t: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _incremental_logits(model: Llama, seq: jax.Array, t0: int, kv_quant=None) -> jax.Array:
    """Logits of every position: prefill of ``seq[:, :t0]``, then one decode step per remaining token."""
    B, T = seq.shape
    cache = init_cache(model.config, B, T + 3, kv_quant)
    lg, cache = prefill(model, seq[:, :t0], cache, all_logits=True)
    out = [lg]
    for t in range(t0, T):
        step, cache = decode_step(model, seq[:, t], cache, t)
        out.append(step[:, None])
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # GQA (4 query heads, 2 kv heads), half-split RoPE, untied head
        {"rope_style": "adjacent", "tie_embeddings": True, "n_layers": 1},
        {"n_kv_heads": 4, "head_dim_override": 12, "n_layers": 1},  # MHA, head_dim != dim / n_heads
    ],
)
def test_incremental_decode_equals_full_forward(kw) -> None:
    m = _model(**kw)
    seq = _seq(2, 12)
    full = np.asarray(forward(m, seq))
    inc = np.asarray(_incremental_logits(m, seq, t0=5))
    np.testing.assert_allclose(inc, full, atol=ATOL, rtol=0)
    assert np.abs(full).max() > 1.0  # the tolerance is small against the logits' scale
    if not kw:  # the generation-path full pass is the same function too
        np.testing.assert_allclose(np.asarray(cached_forward(m, seq)), full, atol=ATOL, rtol=0)


def test_quantized_weights_incremental_equals_full_forward() -> None:
    from jaxquant.models import model_params

    m = _model(n_layers=1)
    seq = _seq(2, 10, seed=3)
    qm = with_params(m, jq.quantize_params(model_params(m), [(BLOCK_LINEARS, jq.IntScheme(4, 16))], strict=True))
    full = np.asarray(forward(qm, seq))
    np.testing.assert_allclose(np.asarray(_incremental_logits(qm, seq, t0=4)), full, atol=ATOL, rtol=0)
    # LLM.int8 with its outlier split picks the float feature columns over all rows of a call (as bitsandbytes
    # does), so a token's output depends on the other tokens processed with it: incremental != full pass
    qm = with_params(m, jq.quantize_params(model_params(m), [(BLOCK_LINEARS, jq.LLMInt8Scheme())], strict=True))
    full = np.asarray(forward(qm, seq))
    err = np.abs(np.asarray(_incremental_logits(qm, seq, t0=4)) - full).max()
    assert err < 0.02 * np.abs(full).max()


@pytest.mark.parametrize("kv_quant", ["int8", "fp8"])
def test_quantized_kv_cache(kv_quant: str) -> None:
    m = _model()
    seq = _seq(2, 12)
    ref = np.asarray(cached_forward(m, seq, kv_quant=kv_quant))
    # incremental == full pass with the same cache quantization
    np.testing.assert_allclose(np.asarray(_incremental_logits(m, seq, 5, kv_quant)), ref, atol=ATOL, rtol=0)
    # and close to the float model (int8 per-vector scales: within a few % of the logit range; fp8 looser)
    full = np.asarray(forward(m, seq))
    err = np.abs(ref - full).max() / np.abs(full).max()
    assert 0 < err < (0.05 if kv_quant == "int8" else 0.15), err
    c = init_cache(m.config, 2, 16, kv_quant)
    assert c.k[0].dtype == (jnp.int8 if kv_quant == "int8" else jnp.float8_e4m3fn)
    # codes (1 byte) + one float32 scale per (token, kv head) vs float32 values
    assert c.nbytes == 2 * 2 * 2 * 16 * 2 * (8 * 1 + 4)
    assert init_cache(m.config, 2, 16).nbytes == 2 * 2 * 2 * 16 * 2 * 8 * 4


def test_quantize_kv_error_bounds() -> None:
    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 64)) * jnp.array([1e-3, 1.0, 50.0])[:, None, None, None]
    x = x.at[0, 0, 0].set(0.0)  # an all-zero vector
    for kind, rel in (("int8", 0.5 / 127), ("fp8", 2.0**-4)):
        codes, scale = jax.jit(quantize_kv, static_argnums=1)(x, kind)
        deq = np.asarray(codes.astype(jnp.float32) * scale[..., None])
        xs = np.asarray(x)
        amax = np.abs(xs).max(-1, keepdims=True)
        if kind == "int8":
            assert np.all(np.abs(deq - xs) <= rel * amax * (1 + 1e-6))
        else:  # e4m3: 3 mantissa bits (relative error <= 2^-4) above the subnormal range
            assert np.all(np.abs(deq - xs) <= rel * np.abs(xs) + amax * 2.0**-9 / 448 * 8)
        assert np.all(np.asarray(scale)[0, 0, 0] == 1.0) and np.all(deq[0, 0, 0] == 0.0)


#: prompts of three lengths; the tests below share one model structure and these shapes (one compile each)
PROMPTS = [[5, 9, 13, 2, 40], [7, 8], [1, 2, 3, 4, 5, 6, 7]]
NEW = 8


def test_left_padded_batch_matches_single_sequences() -> None:
    m = _model()
    batch = generate(m, PROMPTS, max_new_tokens=NEW)
    for b, p in enumerate(PROMPTS):
        alone = generate(m, [p], max_new_tokens=NEW)
        assert batch.tokens[b].tolist() == alone.tokens[0].tolist(), b
    # the last-position logits of the most padded row agree with the unpadded pass (to the stated tolerance)
    tokens, pad = left_pad(PROMPTS)
    assert pad.tolist() == [2, 5, 0] and tokens[1].tolist() == [0] * 5 + [7, 8]
    lg, _ = prefill(m, tokens, init_cache(m.config, 3, 7), pad)
    ref = forward(m, jnp.asarray([PROMPTS[1]]))[0, -1]
    np.testing.assert_allclose(np.asarray(lg[1]), np.asarray(ref), atol=ATOL, rtol=0)


def test_greedy_tokens_are_the_argmax_of_the_full_forward() -> None:
    m = _model(seed=4, tie_embeddings=True, n_layers=1)
    p = [3, 14, 15, 9, 26]
    out = generate(m, [p], max_new_tokens=10).tokens[0].tolist()
    # causal model: one pass over prompt + continuation gives every step's next-token logits
    logits = forward(m, jnp.asarray([p + out]))[0]
    assert out == [int(t) for t in jnp.argmax(logits[len(p) - 1 : -1], axis=-1)]


def test_eos_stops_rows_independently() -> None:
    m = _model()
    free = generate(m, PROMPTS, max_new_tokens=NEW)
    row0 = free.tokens[0].tolist()
    eos = row0[3]  # row 0 will stop at its 4th new token (or earlier, if that token came before)
    k0 = row0.index(eos)
    out = generate(m, PROMPTS, max_new_tokens=NEW, eos_id=eos, pad_id=-1)
    assert out.finished[0] and out.lengths[0] == k0 + 1
    assert out.tokens[0, : k0 + 1].tolist() == row0[: k0 + 1] and set(out.tokens[0, k0 + 1 :].tolist()) == {-1}
    assert out.sequences()[0] == row0[: k0 + 1]
    for b in (1, 2):  # the other rows are unaffected by row 0 stopping
        row = free.tokens[b].tolist()
        k = row.index(eos) + 1 if eos in row else NEW
        assert out.lengths[b] == k and out.finished[b] == (eos in row) and out.tokens[b, :k].tolist() == row[:k]
    # several stop ids; the loop ends when every row has stopped
    first = [int(t) for t in free.tokens[:, 0]]
    out = generate(m, PROMPTS, max_new_tokens=NEW, eos_id=first)
    assert out.lengths.tolist() == [1, 1, 1] and out.finished.all()


def test_sampling_is_seeded_and_filters_work() -> None:
    m = _model(scale=0.05)  # flat-ish distributions: sampling differs from greedy
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
    a = generate(m, PROMPTS, seed=7, **kw).tokens
    assert np.array_equal(a, generate(m, PROMPTS, seed=7, **kw).tokens)
    assert not np.array_equal(a, generate(m, PROMPTS, seed=8, **kw).tokens)
    greedy = generate(m, PROMPTS, max_new_tokens=NEW).tokens
    assert not np.array_equal(a, greedy)
    # a vanishing nucleus or top_k=1 leaves only the most likely token: greedy
    assert np.array_equal(generate(m, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=3).tokens, greedy)
    assert np.array_equal(generate(m, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_k=1, seed=3).tokens, greedy)


def test_sample_logits_support() -> None:
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    key = jax.random.key(0)
    sample = jax.jit(sample_logits, static_argnames="greedy")
    s = np.asarray(sample(logits, key, 1.0, 0.7, 0))  # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
    assert set(s.tolist()) == {0, 1} and abs((s == 0).mean() - 0.5 / 0.8) < 0.03
    s = np.asarray(sample(logits, key, 1.0, 1.0, 3))
    assert set(s.tolist()) == {0, 1, 2}
    s = np.asarray(sample(logits, key, 1.0, 1.0, 0))
    assert set(s.tolist()) == {0, 1, 2, 3} and abs((s == 3).mean() - 0.05) < 0.02
    assert np.asarray(sample_logits(logits[:2], key, greedy=True)).tolist() == [0, 0]


def test_compiled_once_per_shape() -> None:
    m = _model(n_layers=1)
    before = _generate_jit._cache_size()
    generate(m, [[1, 2, 3]], max_new_tokens=9)
    generate(m, [[4, 5, 6]], max_new_tokens=9, eos_id=4)  # other prompt, eos id: same program
    tokens, pad = left_pad([[1, 2, 3]])
    out, n, _ = generate_tokens(m, tokens, pad, max_new_tokens=9, n_steps=2)  # fewer steps: same program
    assert int(n[0]) == 2 and np.all(np.asarray(out)[0, 2:] == 0)
    assert _generate_jit._cache_size() == before + 1
    generate(m, [[1, 2, 3]], max_new_tokens=9, temperature=0.5)  # sampling is another (static) program
    generate(m, [[1, 2, 3]], max_new_tokens=9, temperature=0.9, top_p=0.5, seed=1)  # ... compiled once
    assert _generate_jit._cache_size() == before + 2


def test_dequant_in_loop_keeps_weights_quantized_in_the_loop() -> None:
    """With ``dequant_in_loop`` no float copy of a quantized kernel is carried through the while loop."""
    from flax import nnx

    from jaxquant.generate import _eos_array
    from jaxquant.models import model_params

    m = _model(n_layers=1)
    qm = with_params(m, jq.quantize_params(model_params(m), [(BLOCK_LINEARS, jq.IntScheme(8))], strict=True))
    graphdef, state = nnx.split(qm)
    args = (graphdef, state, jnp.ones((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), jax.random.key(0))
    args += (jnp.float32(0), jnp.float32(1), jnp.int32(0), _eos_array([]), jnp.int32(0), jnp.int32(3))
    hlo = _generate_jit.lower(*args, max_new_tokens=3, greedy=True, kv_quant=None, dequant_in_loop=True)
    hlo = hlo.compile().as_text()
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert loops, "no while loop in the compiled generation"
    # gate/up kernels are (32, 48): as int8 codes s8[32,48]; dequantized they would be f32[32,48]
    assert not any("f32[32,48]" in line for line in loops), loops[0][:300]
    assert any("s8[32,48]" in line for line in loops)


def test_bfloat16_model_generates() -> None:
    m = _model(dtype="bfloat16", n_layers=1)
    seq = _seq(2, 9)
    c = init_cache(m.config, 2, 12)
    assert c.k[0].dtype == jnp.bfloat16
    full = np.asarray(forward(m, seq))
    inc = np.asarray(_incremental_logits(m, seq, 4))
    assert np.abs(inc - full).max() < 0.05 * np.abs(full).max()


def test_argument_errors() -> None:
    m = _model(n_layers=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="kv_quant"):
        generate(m, [[1]], max_new_tokens=2, kv_quant="int4")
    with pytest.raises(ValueError, match="empty prompt"):
        generate(m, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts"):
        generate(m, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="shorter than the longest"):
        generate(m, [[1, 2, 3]], max_new_tokens=2, prompt_len=2)
    with pytest.raises(ValueError, match="outside the cache"):
        decode_step(m, jnp.array([1]), init_cache(m.config, 1, 4), 4)
    with pytest.raises(ValueError, match="does not fit"):
        prefill(m, jnp.ones((1, 5), jnp.int32), init_cache(m.config, 1, 4))
    # a flat list of ids is one prompt
    assert generate(m, [1, 2, 3], max_new_tokens=2).tokens.shape == (1, 2)


# ---------------------------------------------------------------------------------------------------------
# CLI (a tiny model and a stub tokenizer in place of the download)
# ---------------------------------------------------------------------------------------------------------


class _StubTokenizer:
    eos_id = 2
    bos_id = None

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(ch) % (V - 3)) for ch in text]

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return None


@pytest.fixture
def tiny_cli(monkeypatch):
    m = _model(n_layers=1)
    monkeypatch.setattr(cli_generate, "_load", lambda name: (m, _StubTokenizer(), None))
    return m


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxquant: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_generate_prints_text(tiny_cli, capsys) -> None:
    import json

    assert main(["generate", "--scheme", "int8", "--prompt", "hello", "--max-new-tokens", "6", "--no-stop"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("hello") and len(cap.out.strip()) == len("hello") + 6
    assert "6 new tokens" in cap.err
    args = ["generate", "--prompt", "ab", "--prompt", "abcd", "--max-new-tokens", "4", "--json", "--kv-cache", "fp8"]
    assert main([*args, "--temperature", "0.8", "--seed", "3"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["scheme"] == "fp32" and rep["kv_cache"] == "fp8" and len(rep["results"]) == 2
    assert all(len(r["tokens"]) <= 4 for r in rep["results"])


def test_cli_generate_errors(tiny_cli, capsys) -> None:
    assert main(["generate", "--scheme", "int9", "--prompt", "x"]) == 2
    assert "int9" in _err(capsys)
    assert main(["generate", "--prompt", "  "]) == 2
    assert "empty" in _err(capsys)
    assert main(["generate", "--prompt", "x", "--chat"]) == 2
    assert "ChatML" in _err(capsys)
    for bad in (["--max-new-tokens", "0"], ["--top-p", "1.5"], ["--temperature", "-1"], ["--kv-cache", "int4"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--prompt", "x", *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_cli_generate_missing_model(capsys, tmp_path) -> None:
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in _err(capsys)


# ---------------------------------------------------------------------------------------------------------
# The real model (one test)
# ---------------------------------------------------------------------------------------------------------

#: fixed before measuring; over six prompts (README/report) 4 give 32 identical tokens, "The capital of France
#: is" diverges at token 20 and a poem request at token 5 (int8 rounding flips a near-tie)
SMOLLM_PROMPT = (
    "<|im_start|>user\nExplain what a neural network is in one paragraph.<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.slow
def test_smollm2_greedy_float_and_int8_identical_for_32_tokens() -> None:
    from jaxquant.eval import assets
    from jaxquant.eval.harness import quantize_model
    from jaxquant.models import load_model
    from jaxquant.specs import parse_spec

    model, tok = load_model(assets.model_path())
    prompt = tok.encode(SMOLLM_PROMPT)
    ref = generate(model, [prompt], max_new_tokens=32).tokens[0]
    q8, _ = quantize_model(model, parse_spec("int8"))
    got = generate(q8, [prompt], max_new_tokens=32).tokens[0]
    same = int(np.argmax(ref != got)) if (ref != got).any() else 32
    assert same == 32, f"float and int8 agree on {same} of 32 tokens: {tok.decode(ref)!r} vs {tok.decode(got)!r}"
    assert "neural network" in tok.decode(ref)
