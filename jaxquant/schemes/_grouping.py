"""Shared helpers for schemes whose statistics run along the input axis of a (K, N) kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["expand_rows", "group_view", "num_groups", "round_scale_up"]


def num_groups(k: int, group_size: int) -> int:
    """``ceil(k / group_size)``: the last group may be shorter (as GPTQ's ``g_idx = i // g``)."""
    return -(-k // group_size)


def group_view(w: jax.Array, group_size: int) -> jax.Array:
    """Reshape a (K, N) array to (G, g, N), padding a short last group by repeating its last row.

    Repeating an element of the same group leaves min, max and absmax of that group unchanged.
    """
    k = w.shape[0]
    g = num_groups(k, group_size)
    pad = g * group_size - k
    if pad:
        w = jnp.concatenate([w, jnp.repeat(w[-1:], pad, axis=0)], axis=0)
    return w.reshape(g, group_size, *w.shape[1:])


def expand_rows(per_group: jax.Array, group_size: int, k: int) -> jax.Array:
    """Broadcast (G, N) per-group values to (K, N) rows."""
    return jnp.repeat(per_group, group_size, axis=0, total_repeat_length=num_groups(k, group_size) * group_size)[:k]


def round_scale_up(s: jax.Array, dtype) -> jax.Array:
    """Cast positive float32 scales to ``dtype`` rounding *up*, so that ``x / s_stored`` never exceeds the
    code range because of the narrower storage format."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return s.astype(dtype)
    # the barrier stops XLA from folding the f32 -> f16 -> f32 round trip away (xla_allow_excess_precision)
    st = jax.lax.optimization_barrier(s.astype(dtype))
    low = st.astype(jnp.float32) < s
    bumped = jnp.nextafter(st, jnp.asarray(np.inf, dtype))
    return jnp.where(low, bumped, st)
