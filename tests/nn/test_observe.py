"""observe_inputs (activation amax, outlier fractions) and stateful_perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.eval import perplexity
from jaxquant.nn import Fp8Linear, calibration_batches, observe_inputs, quantize_model, stateful_perplexity


class TwoLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(8, 16, rngs=rngs)
        self.b = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.b(jax.nn.relu(self.a(x)))


def test_observe_inputs_matches_hand_computation() -> None:
    model = TwoLayer(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3)]
    batches[1][:, 2] = 9.0  # one feature dim above 6 in the second call only
    stats = observe_inputs(model, [jnp.asarray(b) for b in batches])
    assert list(stats) == ["a", "b"]
    a = stats["a"]
    assert a.calls == 3 and a.in_features == 8
    assert a.amax == pytest.approx(max(float(np.abs(b).max()) for b in batches))
    fr = [float(np.mean(np.abs(b).max(0) > 6.0)) for b in batches]
    assert a.outlier_fraction_mean == pytest.approx(np.mean(fr)) and a.outlier_fraction_max == pytest.approx(max(fr))
    h = [np.maximum(np.asarray(model.a(jnp.asarray(b))), 0) for b in batches]
    assert stats["b"].amax == pytest.approx(max(float(v.max()) for v in h), rel=1e-6)
    assert isinstance(model.a, nnx.Linear)  # the model itself is not modified
    assert list(observe_inputs(model, [jnp.asarray(batches[0])], paths="b")) == ["b"]
    with pytest.raises(ValueError, match="no linear layer path matches"):
        observe_inputs(model, [jnp.asarray(batches[0])], paths="c")
    with pytest.raises(ValueError, match="no batches"):
        observe_inputs(model, [])


def test_calibration_batches() -> None:
    toks = np.arange(1000)
    b = calibration_batches(toks, n_windows=5, seq_len=16, batch_size=2, seed=3)
    assert [x.shape for x in b] == [(2, 16), (2, 16), (1, 16)]
    assert all(np.all(np.diff(np.asarray(x), axis=1) == 1) for x in b)  # contiguous windows
    with pytest.raises(ValueError, match="calibration tokens are needed"):
        calibration_batches(None)


def test_stateful_perplexity_equals_perplexity_and_carries_state(tiny_llama, tokens) -> None:
    graphdef, state = nnx.split(tiny_llama)
    ref = perplexity(lambda s, t: nnx.merge(graphdef, s)(t), tokens=tokens, params=state, seq_len=64,
                     max_windows=6, batch_size=2, progress=False)  # fmt: skip
    got = stateful_perplexity(tiny_llama, tokens, seq_len=64, max_windows=6, batch_size=2, progress=False)
    assert got.n_tokens == ref.n_tokens == 6 * 63
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-5)

    delayed = quantize_model(
        nnx.clone(tiny_llama), [(r".*_proj", lambda m: Fp8Linear.from_linear(m, act_mode="delayed"))]
    )
    stateful_perplexity(delayed, tokens, seq_len=64, max_windows=5, batch_size=2, progress=False)
    hist = np.asarray(delayed.layers[0].attn.q_proj.amax_history[...])
    assert np.count_nonzero(hist) == 3  # batches of 2, 2 and 1 windows: three calls recorded
