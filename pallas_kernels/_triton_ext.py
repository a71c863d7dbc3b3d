"""An fp8 dot for Pallas-Triton kernels that Hopper runs on its fp8 tensor cores (``wgmma``).

JAX's Pallas Triton lowering emits ``tt.dot`` without ``maxNumImpreciseAcc``. For fp8 operands Triton 3.x then
does not use Hopper's fp8 ``wgmma``: it converts both tiles to float16 and issues ``mma.sync`` (sm_90 code of the
128x128x64 W8A8 tile: ``HMMA.16816.F32``, 1344 instructions per K-loop trip). Native Triton sets the attribute to
``2**30`` for fp8 dots on sm_90 (``max_num_imprecise_acc_default``), and so does XLA's own Triton GEMM emitter
for fp8 ("what cuBLAS does"); with it the same tile compiles to ``QGMMA`` (fp8 ``wgmma``), 422 instructions per
trip (compiled on the CPU with PyPI Triton 3.9).

:func:`fp8_dot` is ``acc + a @ b`` (float32) for fp8 ``a`` / ``b`` as its own primitive, lowered for Pallas-Triton
by a rule that sets the attribute: ``max_num_imprecise_acc`` K elements are summed in the tensor core's reduced
precision accumulator before each addition to the float32 accumulator (``2**30``: never promoted within one dot,
as cuBLAS' fast accumulation; a value equal to the K step promotes once per step). Everywhere else (XLA, the
Pallas interpreter) it is ``acc + lax.dot_general(a, b, preferred_element_type=float32)``.

The rule is registered in JAX's private Pallas-Triton rule table (``jax._src.pallas.triton.lowering``); if a JAX
version lacks it, :data:`AVAILABLE` is ``False`` with the reason in :data:`UNAVAILABLE_REASON`, and :func:`fp8_dot`
binds plain ``dot_general`` (the ``mma.sync`` code, still correct).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

__all__ = ["AVAILABLE", "DEFAULT_IMPRECISE_ACC", "UNAVAILABLE_REASON", "fp8_dot"]

#: native Triton's default for fp8 dots on sm_90 (never promote within one dot)
DEFAULT_IMPRECISE_ACC = 2**30

_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))

fp8_dot_p = jex_core.Primitive("jaxquant_fp8_dot")


def _check(a, b, acc, transpose_b: bool) -> None:
    want = "(N, K)" if transpose_b else "(K, N)"
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1 if transpose_b else 0]:
        raise ValueError(f"fp8_dot: a {a.shape} and b {b.shape} must be (M, K) and {want}")
    if jnp.dtype(a.dtype) not in _FP8 or jnp.dtype(b.dtype) not in _FP8:
        raise ValueError(f"fp8_dot: a and b must be float8_e4m3fn/float8_e5m2, got {a.dtype} and {b.dtype}")
    out = (a.shape[0], b.shape[0 if transpose_b else 1])
    if tuple(acc.shape) != out or jnp.dtype(acc.dtype) != jnp.dtype(jnp.float32):
        raise ValueError(f"fp8_dot: acc must be float32 {out}, got {acc.dtype} {tuple(acc.shape)}")


def _abstract_eval(a, b, acc, *, max_num_imprecise_acc, transpose_b):
    del a, b, max_num_imprecise_acc, transpose_b  # checked by fp8_dot, the only place that binds it
    return jax.core.ShapedArray(acc.shape, jnp.float32)


def _reference(a, b, acc, *, max_num_imprecise_acc, transpose_b):
    del max_num_imprecise_acc
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


fp8_dot_p.def_abstract_eval(_abstract_eval)
fp8_dot_p.def_impl(_reference)
mlir.register_lowering(fp8_dot_p, mlir.lower_fun(_reference, multiple_results=False))


def _register_triton_rule() -> str:
    """Register the Pallas-Triton lowering; returns ``""`` or why it could not be registered."""
    try:
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tl
    except ImportError as e:  # pragma: no cover - depends on the JAX build
        return f"JAX's Pallas-Triton lowering is not importable: {e}"
    if not isinstance(getattr(tl, "triton_lowering_rules", None), dict):  # pragma: no cover
        return "jax._src.pallas.triton.lowering.triton_lowering_rules is missing in this JAX version"

    def rule(ctx, a, b, acc, *, max_num_imprecise_acc, transpose_b):
        del ctx
        if transpose_b:  # a K-major (N, K) tile: the transpose is a shared-memory view, no data moves
            b = tt_dialect.trans(b, (1, 0))
        n = int(max_num_imprecise_acc)
        try:
            return tt_dialect.dot(a, b, acc, max_num_imprecise_acc=n)
        except TypeError:  # a dialect builder without the keyword: the same attribute, set on the op itself
            from jax._src.lib.mlir import ir

            out = tt_dialect.dot(a, b, acc)
            out.owner.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), n)
            return out

    tl.triton_lowering_rules[fp8_dot_p] = rule
    return ""


UNAVAILABLE_REASON: str = _register_triton_rule()
AVAILABLE: bool = not UNAVAILABLE_REASON


def fp8_dot(
    a: jax.Array,
    b: jax.Array,
    acc: jax.Array,
    *,
    max_num_imprecise_acc: int = DEFAULT_IMPRECISE_ACC,
    transpose_b: bool = False,
) -> jax.Array:
    """``acc + a @ b`` in float32 for fp8 tiles ``a (M, K)``, ``b (K, N)`` inside a Pallas kernel (or anywhere);
    with ``transpose_b`` ``b`` is given as ``(N, K)`` (K-major, the layout Hopper's fp8 ``wgmma`` reads: a
    ``(K, N)`` tile would be transposed byte by byte through shared memory in every K step).

    On the Pallas-Triton path the dot carries ``maxNumImpreciseAcc = max_num_imprecise_acc`` so that sm_90 issues
    fp8 ``wgmma`` (see the module docstring); elsewhere a float32-accumulating ``dot_general``.

    Raises ``ValueError`` for non-fp8 operands, non-contracting shapes, or a non-float32 accumulator, and for
    ``max_num_imprecise_acc < 1``.
    """
    _check(a, b, acc, transpose_b)
    if not isinstance(max_num_imprecise_acc, int) or max_num_imprecise_acc < 1:
        raise ValueError(f"fp8_dot: max_num_imprecise_acc must be an int >= 1, got {max_num_imprecise_acc!r}")
    if not AVAILABLE:
        return _reference(a, b, acc, max_num_imprecise_acc=max_num_imprecise_acc, transpose_b=transpose_b)
    return fp8_dot_p.bind(a, b, acc, max_num_imprecise_acc=max_num_imprecise_acc, transpose_b=bool(transpose_b))
