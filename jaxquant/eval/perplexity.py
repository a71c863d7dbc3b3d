"""Perplexity with the standard non-overlapping-window protocol, and calibration windows.

Protocol (:func:`perplexity`):

1. tokenize the whole evaluation text in one call (no BOS token is added; a leading BOS that the tokenizer
   adds itself is removed, see :func:`encode`);
2. cut the token stream into consecutive, non-overlapping windows of ``seq_len`` tokens, dropping the last
   partial window (``max_windows`` keeps only the first windows, for quick runs);
3. run the model on each window; position ``t`` predicts token ``t + 1``, so each window contributes the
   ``seq_len - 1`` predictions of tokens ``1 .. seq_len - 1`` from their prefix;
4. perplexity = ``exp(mean negative log-likelihood over all predicted tokens of all windows)``.

The log-softmax is computed in float32 inside one jitted function together with the model forward pass;
window sums are accumulated in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PerplexityResult", "calibration_windows", "encode", "make_windows", "perplexity"]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
      ppl: perplexity, ``exp(nll)``.
      nll: mean negative log-likelihood per predicted token (nats).
      n_tokens: number of predicted tokens, ``n_windows * (seq_len - 1)``.
      n_windows: number of windows evaluated.
      seq_len: window length in tokens.
      seconds: wall time of the evaluation loop (including compilation, excluding tokenization).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Evaluated tokens (``n_windows * seq_len``) per second of wall time."""
        return self.n_windows * self.seq_len / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"ppl {self.ppl:.4f} (nll {self.nll:.4f}, {self.n_windows} windows x {self.seq_len} tokens, "
            f"{self.n_tokens} predicted, {self.seconds:.1f} s)"
        )


def _bos_id(tokenizer: Any) -> int | None:
    for attr in ("bos_id", "bos_token_id"):
        val = getattr(tokenizer, attr, None)
        if isinstance(val, int | np.integer):
            return int(val)
    return None


def _no_bos_kwargs(tokenizer: Any) -> dict[str, bool]:
    """Keyword arguments that ask ``tokenizer.encode`` not to add special tokens, if it takes any."""
    try:
        names = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("add_bos", "add_special_tokens"):
        if name in names:
            return {name: False}
    return {}


def encode(text: str, tokenizer: Any) -> np.ndarray:
    """Tokenize ``text`` into a 1-D int32 array, without a BOS token.

    Args:
      text: the text.
      tokenizer: any object with ``.encode(str)`` returning a list of ints (or an object with ``.ids``, as
        Hugging Face ``tokenizers`` do). If ``encode`` takes an ``add_bos`` or ``add_special_tokens`` keyword,
        it is passed ``False``; if the tokenizer exposes ``bos_id`` / ``bos_token_id`` and the result still
        starts with that token, the token is removed.
    """
    out = tokenizer.encode(text, **_no_bos_kwargs(tokenizer))
    ids = getattr(out, "ids", out)
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bos = _bos_id(tokenizer)
    if bos is not None and arr.size and arr[0] == bos:
        arr = arr[1:]
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("tokenizer returned ids outside the int32 range")
    return arr.astype(np.int32)


def _too_short(n: int, seq_len: int) -> ValueError:
    return ValueError(f"text has {n} tokens, fewer than seq_len={seq_len}; use a longer text or a smaller seq_len")


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Cut a token stream into non-overlapping windows ``(n_windows, seq_len)``, dropping the partial tail.

    Args:
      tokens: 1-D token ids.
      seq_len: window length (at least 2: a window must predict something).
      max_windows: keep only the first ``max_windows`` windows (``None``: all).

    Raises:
      ValueError: fewer than ``seq_len`` tokens, ``seq_len < 2`` or ``max_windows < 1``.
    """
    tokens = np.asarray(tokens).reshape(-1)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 (or None), got {max_windows}")
    n = tokens.size // seq_len
    if n == 0:
        raise _too_short(tokens.size, seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def calibration_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n`` random windows of ``seq_len`` tokens from a calibration token stream, shape ``(n, seq_len)``.

    Window starts are drawn uniformly (with replacement) from ``[0, len(tokens) - seq_len]`` with
    ``numpy.random.default_rng(seed)``: the same arguments always give the same windows.

    Raises:
      ValueError: fewer than ``seq_len`` tokens, or ``n < 1``.
    """
    tokens = np.asarray(tokens).reshape(-1)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if tokens.size < seq_len:
        raise _too_short(tokens.size, seq_len)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, tokens.size - seq_len + 1, size=n)
    return np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int32)


def _window_nll_sums(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-window sum of ``-log p(tokens[:, t+1] | tokens[:, :t+1])`` over ``t = 0 .. T-2``, in float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(lse - picked, axis=-1)


def perplexity(
    logits_fn: Callable[..., Any],
    text: str | None = None,
    *,
    tokenizer: Any = None,
    tokens: np.ndarray | None = None,
    params: Any = None,
    seq_len: int = 512,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a language model on a text, with non-overlapping windows (see the module docstring).

    Args:
      logits_fn: the model forward pass, ``logits_fn(tokens) -> logits`` with tokens ``(B, T)`` int32 and
        logits ``(B, T, V)``; or, when ``params`` is given, ``logits_fn(params, tokens)``. Passing the weights
        as ``params`` (rather than closing over them) keeps them out of the compiled program as constants,
        which matters for real models.
      text: the evaluation text (needs ``tokenizer``). Exactly one of ``text`` and ``tokens`` must be given.
      tokenizer: object with ``.encode(str) -> list[int]`` (see :func:`encode`).
      tokens: an already tokenized 1-D stream instead of ``text``.
      params: optional pytree passed as the first argument of ``logits_fn``.
      seq_len: window length in tokens.
      batch_size: windows per forward call. The last batch is padded with copies of its last window (their
        results are ignored), so only one shape is ever compiled.
      max_windows: evaluate only the first ``max_windows`` windows (``None``: all).
      progress: show a tqdm progress bar on stderr.

    Returns:
      A :class:`PerplexityResult`.

    Raises:
      ValueError: the text is shorter than one window, or the arguments are inconsistent.
    """
    if (text is None) == (tokens is None):
        raise ValueError("give exactly one of text= (with tokenizer=) or tokens=")
    if text is not None:
        if tokenizer is None:
            raise ValueError("text= needs tokenizer=")
        tokens = encode(text, tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    windows = make_windows(np.asarray(tokens), seq_len, max_windows)
    n_windows = windows.shape[0]
    batch_size = min(batch_size, n_windows)

    if params is None:

        def step(_params: Any, batch: jax.Array) -> jax.Array:
            return _window_nll_sums(logits_fn(batch), batch)

    else:

        def step(params: Any, batch: jax.Array) -> jax.Array:
            return _window_nll_sums(logits_fn(params, batch), batch)

    step_jit = jax.jit(step)

    from tqdm.auto import tqdm

    total = 0.0
    done = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_windows, unit="win", desc="perplexity", disable=not progress, file=sys.stderr)

    def consume(out: jax.Array, n_real: int) -> None:
        nonlocal total, done
        sums = np.asarray(out, dtype=np.float64)[:n_real]
        if not np.all(np.isfinite(sums)):
            bar.close()
            raise FloatingPointError("the model produced non-finite log-likelihoods (NaN/inf logits?)")
        total += float(sums.sum())
        done += n_real
        bar.update(n_real)
        bar.set_postfix(ppl=f"{math.exp(min(total / (done * (seq_len - 1)), 700.0)):.3f}")

    pending: tuple[jax.Array, int] | None = None
    try:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size]
            n_real = batch.shape[0]
            if n_real < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n_real, axis=0)])
            out = step_jit(params, jnp.asarray(batch))  # dispatched asynchronously
            if pending is not None:
                consume(*pending)
            pending = (out, n_real)
        if pending is not None:
            consume(*pending)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    n_tokens = n_windows * (seq_len - 1)
    nll = total / n_tokens
    ppl = math.exp(nll) if nll < 700 else float("inf")
    return PerplexityResult(ppl=ppl, nll=nll, n_tokens=n_tokens, n_windows=n_windows, seq_len=seq_len, seconds=seconds)
