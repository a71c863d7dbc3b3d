"""Storage orientation of the 8-bit weight schemes (:class:`~jaxquant.LLMInt8Scheme`, :class:`~jaxquant.FP8Scheme`)
and of :class:`~jaxquant.IntScheme`'s packed 2/4/8-bit codes.

A QArray always stands for a logical ``(K, N)`` kernel (``in_features, out_features``, as Flax stores it). Its
codes can be stored two ways, chosen by the scheme's ``layout`` field:

* ``"kn"`` (default): ``data`` is ``(K, N)``, the kernel's own orientation;
* ``"nk"``: ``data`` is ``(N, K)``, i.e. ``data = W_q^T``: each output column's ``K`` codes are contiguous
  ("K-major"). Hopper's 8-bit tensor-core instructions (int8 / fp8 ``wgmma``) and the int8 ``mma.sync`` read the
  weight operand K-major; with ``"kn"`` storage the GPU kernels either transpose each weight tile byte by byte
  through shared memory or need a transposed copy of the weight per call. bitsandbytes stores LLM.int8 weights
  this way (``CB``, out x in). For ``IntScheme`` the packed array is transposed, ``(N, packed rows)``: the int4
  kernel's dot then reads each weight tile from shared memory by ``ldmatrix`` instead of byte by byte.

Scales, zero points and every other field keep their shapes. Dequantization gives the same array bit for bit,
and so do the int8 products (exact) and the Pallas kernels (tested in interpret mode). Float32 dots over the
stored codes (fp8 W8A8's XLA path, :class:`~jaxquant.nn.Fp8Linear`) sum the same products, but XLA may order the
sums differently for a transposed operand: those agree to float32 rounding. Convert once, at quantization time
(``LLMInt8Scheme(layout="nk")``) or after loading (:func:`relayout`, an exact transpose of the codes), never per
call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.core.qarray import QArray

__all__ = ["LAYOUTS", "check_layout", "codes_kn", "dot_codes", "relayout"]

#: the storage orientations of a 2-D weight's codes (see the module docstring)
LAYOUTS = ("kn", "nk")


def check_layout(who: str, layout: Any) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS` (``who`` names the caller)."""
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {LAYOUTS}, got {layout!r}")


def codes_kn(data: jax.Array, layout: str) -> jax.Array:
    """The codes as a ``(K, N)`` array (a transpose for ``"nk"``; under ``jit`` XLA folds it into the consumer)."""
    return data.T if layout == "nk" else data


def dot_codes(x: jax.Array, data: jax.Array, layout: str, preferred_element_type: Any) -> jax.Array:
    """``x @ W_q`` for ``(M, K)`` activations and codes stored in ``layout``, contracting ``K`` in place (a
    ``dot_general`` on the stored array: no transposed copy of the weight)."""
    contract = 1 if layout == "nk" else 0
    return jax.lax.dot_general(
        x, data, (((x.ndim - 1,), (contract,)), ((), ())), preferred_element_type=preferred_element_type
    )


def _relayout_one(q: QArray, layout: str) -> QArray:
    current = getattr(q.scheme, "layout", None)
    if current is None or current == layout:
        return q
    can_store = getattr(q.scheme, "can_store", None)
    if can_store is not None and not can_store(layout):  # e.g. 3-bit IntScheme codes: a dense stream, kept as is
        return q
    if len(q.shape) != 2:
        raise ValueError(f"relayout: {type(q.scheme).__name__} QArray of shape {q.shape} is not a 2-D kernel")
    scheme = dataclasses.replace(q.scheme, layout=layout)
    return dataclasses.replace(q, data=jnp.transpose(q.data), scheme=scheme)


def relayout(tree: Any, layout: str) -> Any:
    """Store the codes of every QArray in ``tree`` (a QArray or any pytree) whose scheme has a ``layout`` field in
    ``layout`` (``"kn"`` or ``"nk"``; see the module docstring); other leaves, and QArrays whose scheme cannot store
    that layout (3/5/6/7-bit ``IntScheme`` codes), are returned as they are.

    The conversion is exact (a transpose of the codes; scales unchanged), so ``dequantize`` and ``qdot`` give the
    same results before and after. Do it once after loading a checkpoint, not per call. Raises ``ValueError`` for
    an unknown layout or a QArray that is not a 2-D kernel (e.g. an fp8 per-tensor 3-D array).
    """
    check_layout("relayout", layout)
    return jax.tree.map(
        lambda leaf: _relayout_one(leaf, layout) if isinstance(leaf, QArray) else leaf,
        tree,
        is_leaf=lambda leaf: isinstance(leaf, QArray),
    )
