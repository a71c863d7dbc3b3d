"""Perplexity protocol on toy models whose answer is known analytically, and calibration windows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.eval.perplexity import PerplexityResult, calibration_windows, encode, make_windows, perplexity

V = 37


def _uniform(tokens: jax.Array) -> jax.Array:
    return jnp.zeros((*tokens.shape, V), jnp.float32)


def _oracle(tokens: jax.Array) -> jax.Array:
    """Puts (almost) all mass on the true next token."""
    nxt = jnp.roll(tokens, -1, axis=1)
    return 60.0 * jax.nn.one_hot(nxt, V, dtype=jnp.bfloat16)


def _stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.int32)


def test_uniform_logits_give_ppl_equal_to_vocab_size() -> None:
    res = perplexity(_uniform, tokens=_stream(1000), seq_len=64, batch_size=4, progress=False)
    assert isinstance(res, PerplexityResult)
    assert res.ppl == pytest.approx(V, rel=1e-5)
    assert res.nll == pytest.approx(math.log(V), rel=1e-6)
    assert (res.n_windows, res.n_tokens, res.seq_len) == (15, 15 * 63, 64)
    assert res.seconds > 0


def test_oracle_logits_give_ppl_one() -> None:
    res = perplexity(_oracle, tokens=_stream(512), seq_len=32, batch_size=3, progress=False)
    assert res.ppl == pytest.approx(1.0, abs=1e-6)


def test_fixed_distribution_matches_numpy_on_predicted_tokens_only() -> None:
    """A context-free model with log-probs lp: nll = mean of -lp[token] over tokens 1..T-1 of each window."""
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(V))).astype(np.float32)
    logits_fn = lambda t: jnp.broadcast_to(jnp.asarray(lp) + 3.0, (*t.shape, V))  # shift: softmax-invariant
    toks = _stream(1000, seed=2)
    seq_len = 50
    for max_windows, batch_size in [(None, 1), (None, 7), (5, 2)]:
        res = perplexity(
            logits_fn,
            tokens=toks,
            seq_len=seq_len,
            batch_size=batch_size,
            max_windows=max_windows,
            progress=False,
        )
        n = 20 if max_windows is None else max_windows
        wins = toks[: n * seq_len].reshape(n, seq_len)
        expected = float(np.mean(-lp[wins[:, 1:]].astype(np.float64)))
        assert res.n_windows == n
        assert res.n_tokens == n * (seq_len - 1)
        assert res.nll == pytest.approx(expected, rel=1e-5)
        assert res.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_params_are_passed_as_arguments_and_one_shape_is_compiled() -> None:
    traces: list[tuple[int, ...]] = []

    def logits_fn(params, tokens):
        traces.append(tuple(tokens.shape))
        return jnp.broadcast_to(params["bias"], (*tokens.shape, V))

    bias = jnp.zeros((V,), jnp.float32).at[3].set(2.0)
    toks = _stream(10 * 16, seed=3)
    res = perplexity(logits_fn, tokens=toks, params={"bias": bias}, seq_len=16, batch_size=4, progress=False)
    assert traces == [(4, 16)]  # 10 windows in batches of 4: the last batch is padded, not recompiled
    closed = perplexity(lambda t: logits_fn({"bias": bias}, t), tokens=toks, seq_len=16, progress=False)
    assert res.nll == pytest.approx(closed.nll, rel=1e-6)


def test_text_with_tokenizer_strips_bos_and_counts_windows() -> None:
    class CharTokenizer:
        bos_id = 0

        def encode(self, s: str) -> list[int]:
            return [0] + [1 + (ord(c) % (V - 1)) for c in s]  # always adds BOS

    text = "abcdefghij" * 21  # 210 chars -> 210 tokens after removing BOS -> 6 windows of 32 (+18 dropped)
    assert encode(text, CharTokenizer()).shape == (210,)
    res = perplexity(_uniform, text, tokenizer=CharTokenizer(), seq_len=32, batch_size=8, progress=False)
    assert res.n_windows == 6
    res = perplexity(_uniform, text, tokenizer=CharTokenizer(), seq_len=32, max_windows=2, progress=False)
    assert res.n_windows == 2


def test_encode_passes_add_bos_false_when_supported() -> None:
    class Tok:
        bos_id = 99

        def encode(self, s: str, *, add_bos: bool | None = None) -> list[int]:
            return ([99] if add_bos is not False else []) + [5] * len(s)

    assert encode("abc", Tok()).tolist() == [5, 5, 5]


def test_too_short_text_raises() -> None:
    with pytest.raises(ValueError, match=r"text has 20 tokens, fewer than seq_len=32"):
        perplexity(_uniform, tokens=_stream(20), seq_len=32, progress=False)
    with pytest.raises(ValueError, match=r"text has 5 tokens, fewer than seq_len=8"):
        calibration_windows(np.arange(5), n=2, seq_len=8)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        perplexity(_uniform, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(_uniform, "some text", progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(np.arange(10), seq_len=1)
    with pytest.raises(ValueError, match="max_windows"):
        make_windows(np.arange(10), seq_len=2, max_windows=0)


def test_make_windows_drops_partial_tail() -> None:
    w = make_windows(np.arange(1050), seq_len=100)
    assert w.shape == (10, 100) and w.dtype == np.int32
    np.testing.assert_array_equal(w[3], np.arange(300, 400))
    assert make_windows(np.arange(1050), seq_len=100, max_windows=3).shape == (3, 100)
    assert make_windows(np.arange(1050), seq_len=100, max_windows=50).shape == (10, 100)


def test_non_finite_logits_raise() -> None:
    bad = lambda t: jnp.full((*t.shape, V), jnp.nan)
    with pytest.raises(FloatingPointError):
        perplexity(bad, tokens=_stream(100), seq_len=10, progress=False)


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    perplexity(_uniform, tokens=_stream(200), seq_len=20, batch_size=5, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "perplexity" in err
    perplexity(_uniform, tokens=_stream(200), seq_len=20, batch_size=5, progress=False)
    assert capsys.readouterr().err == ""


def test_calibration_windows_are_seeded_slices() -> None:
    toks = np.arange(10_000, dtype=np.int32)
    a = calibration_windows(toks, n=16, seq_len=128, seed=0)
    b = calibration_windows(toks, n=16, seq_len=128, seed=0)
    c = calibration_windows(toks, n=16, seq_len=128, seed=1)
    assert a.shape == (16, 128) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for row in a:  # each window is a contiguous slice of the stream
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 128))
        assert 0 <= row[0] <= 10_000 - 128
    # a stream of exactly seq_len tokens has one possible window
    np.testing.assert_array_equal(calibration_windows(toks[:128], n=3, seq_len=128), np.tile(toks[:128], (3, 1)))
