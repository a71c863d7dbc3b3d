"""QArray: a quantized array as a JAX pytree, and the :class:`Scheme` base class.

A QArray holds arrays (packed codes ``data``, ``scale``, optional ``zero`` and optional ``aux`` side arrays)
and static metadata (the scheme, the logical shape and the original dtype). Because the metadata is static
pytree aux data, a QArray passes through ``jax.jit``, ``jax.vmap``, ``jax.tree.map``, optax and orbax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QArray", "Scheme", "scheme_class"]

_SCHEMES: dict[str, type] = {}


def scheme_class(name: str) -> type:
    """The :class:`Scheme` subclass called ``name`` (every subclass registers itself when defined)."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme class {name!r}; known: {sorted(_SCHEMES)}") from None


class Scheme:
    """Base class of every quantization scheme.

    Subclasses are frozen, hashable dataclasses (so they can be static ``jax.jit`` arguments) that implement
    ``_quantize(w) -> QArray`` and ``_dequantize(q) -> jax.Array``. Use them through :func:`jaxquant.quantize`
    and :func:`jaxquant.dequantize`, which validate inputs first.
    """

    #: short name used in reports and SPEC strings
    kind: ClassVar[str] = "scheme"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _SCHEMES[cls.__name__] = cls

    def _quantize(self, w: jax.Array) -> QArray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dequantize(self, q: QArray) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if the scheme cannot quantize an array of this shape."""
        if len(shape) != 2:
            raise ValueError(
                f"{type(self).__name__} quantizes 2-D (in_features, out_features) kernels, got shape {shape}; "
                "reshape the weight to 2-D first"
            )

    def describe(self) -> str:
        """A one-line human description (defaults to the dataclass repr)."""
        return repr(self)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized array.

    Attributes:
      data: packed codes (layout defined by the scheme; see each scheme's docstring).
      scale: scales (per tensor, per output channel, per group or per block), or ``None``.
      zero: zero points / offsets for asymmetric schemes, else ``None``.
      aux: extra named arrays some schemes need (e.g. LLM.int8 outlier rows, NF4 double-quant state).
      scheme: the :class:`Scheme` that produced it (static).
      shape: logical shape of the dequantized array (static).
      dtype: name of the original floating dtype, restored by ``dequantize`` (static).
    """

    data: Any
    scale: Any
    zero: Any = None
    aux: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheme: Scheme | None = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"

    # -- pytree protocol -------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        GK = jax.tree_util.GetAttrKey
        children = (
            (GK("data"), self.data),
            (GK("scale"), self.scale),
            (GK("zero"), self.zero),
            (GK("aux"), self.aux),
        )
        return children, (self.scheme, self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, meta, children):
        scheme, shape, dtype = meta
        data, scale, zero, aux = children
        return cls(data=data, scale=scale, zero=zero, aux=aux, scheme=scheme, shape=shape, dtype=dtype)

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of logical elements (weights)."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Real storage in bytes: packed data + scales + zeros + every aux array."""
        total = 0
        for leaf in jax.tree.leaves((self.data, self.scale, self.zero, self.aux)):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        return int(total)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / size``: storage bits per logical weight, everything included."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def dequantize(self) -> jax.Array:
        """Same as :func:`jaxquant.dequantize`."""
        return self.scheme._dequantize(self)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, dtype={self.dtype}, scheme={self.scheme!r}, "
            f"bits_per_weight={self.bits_per_weight:.3f})"
        )


def as_float(w: Any) -> jax.Array:
    """Float32 view of ``w`` (already validated as floating)."""
    return jnp.asarray(w).astype(jnp.float32)
