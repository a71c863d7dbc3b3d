"""Observing layer inputs (activation amax for static fp8 scales, LLM.int8 outlier statistics) and running
stateful models (delayed-scaling amax histories) over an evaluation stream.

:func:`observe_inputs` wraps the chosen linear layers of a *copy* of the model in recorders and runs the
copy on some batches under ``nnx.jit``; per layer it returns, with ``X`` the ``(M, K)`` input rows of one call:

* ``amax = max over calls of max |X|`` (the static fp8 activation amax);
* the per-call outlier fraction ``f = |{k : max_m |X_mk| > threshold}| / K`` (LLM.int8's flagged feature
  dims), averaged and maxed over calls.

The original model is not modified.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.eval.perplexity import PerplexityResult, _window_nll_sums, calibration_windows, make_windows
from jaxquant.nn.layers import Stat
from jaxquant.nn.swap import _candidates, get_submodule, is_linear, is_quantized_layer, module_path, set_submodule

__all__ = ["InputStats", "calibration_batches", "observe_inputs", "stateful_perplexity"]


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What :func:`observe_inputs` measured at one layer's input.

    Attributes:
      amax: ``max |x|`` over every observed call.
      calls: number of observed calls.
      outlier_fraction_mean: mean over calls of the fraction of input feature dims with ``max_rows |x| >
        threshold``.
      outlier_fraction_max: the largest such per-call fraction.
      in_features: K.
    """

    amax: float
    calls: int
    outlier_fraction_mean: float
    outlier_fraction_max: float
    in_features: int


class _Recorder(nnx.Module):
    """Wraps a layer; records input statistics in :class:`Stat` variables, then calls the layer."""

    def __init__(self, inner: nnx.Module, threshold: float):
        self.inner = inner
        self.threshold = float(threshold)
        self.rec_amax = Stat(jnp.zeros((), jnp.float32))
        self.rec_calls = Stat(jnp.zeros((), jnp.int32))
        self.rec_frac_sum = Stat(jnp.zeros((), jnp.float32))
        self.rec_frac_max = Stat(jnp.zeros((), jnp.float32))
        self.rec_k = Stat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, *args: Any, **kw: Any) -> jax.Array:
        colmax = jnp.max(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0)
        frac = jnp.mean((colmax > self.threshold).astype(jnp.float32))
        self.rec_amax[...] = jnp.maximum(self.rec_amax[...], jnp.max(colmax))
        self.rec_calls[...] = self.rec_calls[...] + 1
        self.rec_frac_sum[...] = self.rec_frac_sum[...] + frac
        self.rec_frac_max[...] = jnp.maximum(self.rec_frac_max[...], frac)
        self.rec_k[...] = jnp.asarray(x.shape[-1], jnp.int32)
        return self.inner(x, *args, **kw)


def _default_call(model: nnx.Module, batch: Any) -> Any:
    return model(batch)


def observe_inputs(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    paths: str = r".*",
    threshold: float = 6.0,
    call: Callable[[nnx.Module, Any], Any] = _default_call,
) -> dict[str, InputStats]:
    """Input statistics of the linear layers (float or :mod:`jaxquant.nn` layers) whose module path fully
    matches ``paths``, measured by running ``call(model_copy, batch)`` for each batch.

    Args:
      model: any NNX model (not modified: a copy is observed).
      batches: model inputs, e.g. ``(B, T)`` token arrays for a language model.
      paths: regex over module paths (e.g. ``r"layers/\\d+/(attn|mlp)/\\w+_proj"``).
      threshold: LLM.int8's outlier magnitude for the flagged-dims fraction.
      call: how to run the model on a batch (default ``model(batch)``); its output is discarded.

    Returns:
      ``{module_path: InputStats}`` in model order.

    Raises:
      ValueError: no layer matches ``paths``, or ``batches`` is empty.
    """
    rx = re.compile(paths)
    copy = nnx.clone(model)
    chosen = [
        (p, m) for p, m in _candidates(copy) if (is_linear(m) or is_quantized_layer(m)) and rx.fullmatch(module_path(p))
    ]
    if not chosen:
        raise ValueError(f"observe_inputs: no linear layer path matches {paths!r}")
    for p, m in chosen:
        set_submodule(copy, p, _Recorder(m, threshold))

    @nnx.jit
    def step(m: nnx.Module, batch: Any) -> None:
        call(m, batch)

    n = 0
    for batch in batches:
        step(copy, batch)
        n += 1
    if n == 0:
        raise ValueError("observe_inputs: no batches given")
    out = {}
    for p, _ in chosen:
        r = get_submodule(copy, p)
        calls = int(r.rec_calls[...])
        out[module_path(p)] = InputStats(
            amax=float(r.rec_amax[...]),
            calls=calls,
            outlier_fraction_mean=float(r.rec_frac_sum[...]) / calls if calls else float("nan"),
            outlier_fraction_max=float(r.rec_frac_max[...]),
            in_features=int(r.rec_k[...]),
        )
    return out


def calibration_batches(
    tokens: Any, *, n_windows: int = 8, seq_len: int = 512, batch_size: int = 4, seed: int = 0
) -> list[jax.Array]:
    """``n_windows`` random windows of a calibration token stream
    (:func:`jaxquant.eval.calibration_windows`, reproducible for a seed), in ``(batch_size, seq_len)`` batches
    (the last one may be smaller)."""
    if tokens is None:
        raise ValueError("calibration tokens are needed (1-D token ids of the calibration split)")
    w = calibration_windows(np.asarray(tokens), n_windows, seq_len, seed)
    return [jnp.asarray(w[i : i + batch_size]) for i in range(0, len(w), batch_size)]


def stateful_perplexity(
    model: nnx.Module,
    tokens: Any,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity with the protocol of :func:`jaxquant.eval.perplexity` (same windows, same batches, same
    float64 host sums), but the model runs under ``nnx.jit`` **in place**, so its :class:`Stat` state (e.g.
    :class:`Fp8Linear`'s delayed amax history, outlier counters) is carried from batch to batch and is left
    updated in ``model``.

    A last partial batch is run as it is (smaller shape, one more compilation) rather than padded, so that no
    padding copy enters a history.
    """
    from tqdm.auto import tqdm

    windows = make_windows(np.asarray(tokens), seq_len, max_windows)
    n_windows = windows.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    @nnx.jit
    def step(m: nnx.Module, batch: jax.Array) -> jax.Array:
        return _window_nll_sums(m(batch), batch)

    total = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=n_windows, unit="win", desc="perplexity", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, n_windows, batch_size):
            batch = jnp.asarray(windows[start : start + batch_size])
            sums = np.asarray(step(model, batch), dtype=np.float64)
            if not np.all(np.isfinite(sums)):
                raise FloatingPointError("the model produced non-finite log-likelihoods (NaN/inf logits?)")
            total += float(sums.sum())
            bar.update(batch.shape[0])
    finally:
        bar.close()
    n_tokens = n_windows * (seq_len - 1)
    nll = total / n_tokens
    return PerplexityResult(
        ppl=math.exp(nll) if nll < 700 else float("inf"),
        nll=nll,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
    )
