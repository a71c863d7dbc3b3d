"""``qdot``: the one matmul entry point for float and quantized weights, and its kernel dispatch.

Backends, chosen per call at trace time:

* a fused Pallas (Triton) kernel from :mod:`pallas_kernels`, on a CUDA GPU, when one exists for the weight's
  scheme and layout (see :func:`explain_qdot` for why a call did or did not take it);
* the XLA path everywhere else: dequantize, then ``jnp.dot`` with float32 accumulation (or the scheme's own
  ``_qdot``, e.g. LLM.int8's outlier split). For integer and NF4 weights at large ``M`` the dequantization can be
  a Pallas kernel (:func:`qdot_dequant_dot`: the same weights and result), used by ``qdot`` only on devices whose
  measurements chose it (``pallas_kernels.tuning.DEQUANT_DOT``).

Both compute the same function: the kernels dequantize exactly as the schemes do (float32, then the activation
dtype) and accumulate in float32, so results differ only by summation order. Unsupported cases fall back to
XLA, never to an approximation.

The kernel mode is ``"auto"`` (kernels on GPU, except for shapes where the device's measurements in
:mod:`pallas_kernels.tuning` showed the XLA path faster, e.g. large ``M``; XLA elsewhere), ``"off"``
(always XLA), ``"interpret"`` (kernels through the Pallas interpreter on any backend: slow, for tests) or
``"on"`` (kernels on GPU, ignoring those limits, and an error instead of a fallback when the kernel cannot run:
for benchmarks). Set it with the environment variable
``JAXQUANT_KERNELS``, :func:`set_kernel_mode` or the :func:`kernel_mode` context manager. It is read when a
function is traced, so change it before ``jax.jit`` compiles.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxquant.core.api import dequantize
from jaxquant.core.qarray import QArray
from jaxquant.core.validate import is_concrete

__all__ = [
    "explain_qdot",
    "get_kernel_mode",
    "kernel_mode",
    "qdot",
    "qdot_dequant_dot",
    "qdot_fp8_w8a8",
    "qdot_ternary_a8",
    "set_kernel_mode",
]

_MODES = ("auto", "off", "interpret", "on")
_mode = os.environ.get("JAXQUANT_KERNELS", "auto")
if _mode not in _MODES:
    raise ValueError(f"JAXQUANT_KERNELS must be one of {_MODES}, got {_mode!r}")


def set_kernel_mode(mode: str) -> None:
    """Set the kernel mode (``"auto"``, ``"off"``, ``"interpret"``, ``"on"``); see the module docstring."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_kernel_mode() -> str:
    """The current kernel mode."""
    return _mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Temporarily set the kernel mode (``with kernel_mode("off"): ...``)."""
    old = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(old)


def qdot(x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """``x @ dequantize(w)`` through the fastest available backend.

    Args:
      x: activations ``(..., K)``.
      w: a float ``(K, N)`` kernel or a :class:`QArray` of logical shape ``(K, N)``.

    Returns:
      ``(..., N)`` in ``x``'s dtype, accumulated in float32.

    On a CUDA GPU, quantized weights with a fused Pallas kernel (2- to 8-bit integer weight-only, the dense 3/5/6/7
    bits as a GEMV up to 8 rows and a chunk dot above; NF4, LLM.int8, fp8, ternary) run through it
    (:func:`explain_qdot` says which); otherwise schemes may provide their own matmul (``scheme._qdot(x, q)``, e.g.
    LLM.int8's outlier split with an int8 x int8 -> int32 product), else the weight is dequantized and multiplied
    (the XLA path).
    """
    x = jnp.asarray(x)
    if not isinstance(w, QArray):
        w = jnp.asarray(w)
        if w.ndim != 2 or x.shape[-1] != w.shape[0]:
            raise ValueError(f"qdot: x {tuple(x.shape)} and w {tuple(w.shape)} do not contract (need w 2-D, K first)")
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"qdot: x {tuple(x.shape)} and QArray {w.shape} do not contract (need (K, N) with K = x.shape[-1])"
        )
    plan, why = _plan(x, w)
    if plan is not None:
        lead = x.shape[:-1]
        y = plan(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, w.shape[1])
    if _mode == "on":
        raise ValueError(f"qdot: kernel mode 'on' but no kernel runs this call: {why}")
    custom = getattr(w.scheme, "_qdot", None)
    if custom is not None:
        return custom(x, w)
    wd = _routed_dequant(x, w) if _routed_dequant_applies(x, w) else dequantize(w).astype(x.dtype)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def explain_qdot(x: jax.Array, w: QArray, device: str | None = None) -> str:
    """Which backend ``qdot(x, w)`` takes, and why (for logs and benchmarks): ``"kernel: <name> <config>"`` or
    ``"xla...: <reason>"``.

    Args:
      x: the activations (or anything with their ``shape`` and ``dtype``, e.g. ``jax.ShapeDtypeStruct``).
      w: the QArray.
      device: ``None``: this machine, now. A GPU's tuning key (``"h100"``, ``"h200"``; other names get the
        heuristics) to explain from any machine what ``qdot`` does on that GPU in the current kernel mode
        (``"auto"`` by default): its tuning table and M limits, the kernels' own limits. Nothing is compiled or run.
    """
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if device is None:
        return _explain(x, w)
    from pallas_kernels import tuning

    global _assume_gpu
    saved = _assume_gpu
    try:
        with tuning.as_device(device):
            _assume_gpu = True
            return _explain(x, w)
    finally:
        _assume_gpu = saved


def _explain(x, w: QArray) -> str:
    plan, why = _plan(x, w)
    if plan is not None:
        return f"kernel: {why}"
    if _routed_dequant_applies(x, w):
        return f"xla with the Pallas dequantization (measured faster here): {why}"
    return f"xla: {why}"


#: set by :func:`explain_qdot` with a ``device``: dispatch decisions as on a GPU (nothing is compiled or run)
_assume_gpu = False


def _gpu() -> bool:
    from pallas_kernels._common import gpu_available

    return _assume_gpu or gpu_available()


_INT_KERNEL = {4: "int4", 8: "int8w", 2: "int2w", 3: "int3w", 5: "int5w", 6: "int6w", 7: "int7w"}


def _routed_dequant_applies(x, w: QArray) -> bool:
    """Auto mode on a GPU, an integer or NF4 scheme, and a device whose measurements chose the Pallas dequantization for
    this ``M`` (``pallas_kernels.tuning.DEQUANT_DOT``)."""
    kernel = _dequant_kernel_name(w)
    if _mode != "auto" or kernel is None:
        return False
    from pallas_kernels import tuning

    m = math.prod(x.shape[:-1])
    return _gpu() and tuning.use_dequant_dot(kernel, m)


def _dequant_kernel_name(w: QArray) -> str | None:
    """The fused kernel's name in ``pallas_kernels.tuning`` for a scheme with a dequantization kernel, else None."""
    kind = getattr(w.scheme, "kind", None)
    if kind == "nf4":
        return "nf4"
    return _int_kernel_name(w) if kind == "int" and w.scheme.bits in _INT_KERNEL else None


def _routed_dequant(x, w: QArray) -> jax.Array:
    wd, _ = _dequant_kernel_weight(w, x.dtype, interpret=False)
    return wd if wd is not None else dequantize(w).astype(x.dtype)


# -------------------------------------------------------------------------------------------------
# kernel dispatch
# -------------------------------------------------------------------------------------------------
def _interpret() -> bool | None:
    """``False``: compile kernels for the GPU; ``True``: interpret them; ``None``: do not use kernels."""
    if _mode == "off":
        return None
    if _mode == "interpret":
        return True
    if _mode == "on":  # forced: compile for the GPU (fails loudly where there is none)
        return False
    return False if _gpu() else None


def _plan(x, w: QArray) -> tuple[Callable[[jax.Array], jax.Array] | None, str]:
    """A function of the 2-D activations that runs the kernel, or ``None`` with the reason."""
    interpret = _interpret()
    if interpret is None:
        return None, f"kernel mode {_mode!r} on backend {jax.default_backend()!r}"
    kind = getattr(w.scheme, "kind", None)
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        return None, f"no kernel for scheme kind {kind!r}"
    m = math.prod(x.shape[:-1])
    if m == 0:
        return None, "empty activations"
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return None, f"activation dtype {jnp.dtype(x.dtype).name}"
    return adapter(x, w, m, interpret)


def _int_adapter(x, w: QArray, m: int, interpret: bool):
    from pallas_kernels import int4_matmul as km
    from pallas_kernels import tuning

    s = w.scheme
    k, n = w.shape
    if s.bits not in _INT_KERNEL:
        return None, f"no {s.bits}-bit integer kernel"
    why = _act_order(w)
    if why:
        return None, why
    layout = _int_layout(w)
    name = _int_kernel_name(w)
    why = _check_limit(name, m, interpret)
    if why:
        return None, why
    # rows the storage cannot run are skipped (K-major codes: no interleave dot, no split-gemv)
    cfg = tuning.get_config(name, m, k, n, accept=lambda c: km.supported(layout, c, x.dtype, m) is None)
    why = km.supported(layout, cfg, x.dtype, m)
    if why:
        return None, why
    zero = w.zero if layout.mode != "sym" else None
    w_dtype = _w_round(w, x.dtype)

    def run(x2):
        return km.int_matmul(x2, w.data, w.scale, zero, layout=layout, config=cfg, w_dtype=w_dtype, interpret=interpret)

    return run, f"{name} {cfg}"


def _w_round(w: QArray, dtype) -> str | None:
    """The intermediate dtype the XLA path rounds a dequantized weight to before ``dtype`` (``None``: a no-op)."""
    d = jnp.dtype(w.dtype)
    return None if d in (jnp.dtype(jnp.float32), jnp.dtype(dtype)) else d.name


def _int_layout(w: QArray):
    """The integer kernels' static description of ``w``'s storage."""
    from pallas_kernels import int4_matmul as km

    s = w.scheme
    k, n = w.shape
    mode = "sym" if s.symmetric else s.range
    gs = s.group_size if s.granularity == "group" else None
    return km.IntLayout(bits=s.bits, mode=mode, k=k, n=n, group_size=gs, nk=s.layout == "nk")


def _int_kernel_name(w: QArray) -> str:
    """The tuning key of ``w``'s integer kernel: ``"int4"`` etc., ``"int4_nk"`` for K-major storage
    (``tuning.STORAGE_KEYS``)."""
    name = _INT_KERNEL[w.scheme.bits]
    return f"{name}_nk" if w.scheme.layout == "nk" else name


def _act_order(w: QArray) -> str | None:
    """Why the integer kernels cannot run ``w``: GPTQ act-order rows with their own group index (``aux["g_idx"]``;
    the kernels read group ``k // group_size``), or ``None``."""
    if isinstance(w.aux, dict) and w.aux.get("g_idx") is not None:
        return "act-order group index (aux['g_idx']): the integer kernels take group k // group_size"
    return None


def _nf4_operands(w: QArray):
    """``(layout, table operands, code values)`` of an NF4 QArray for the NF4 kernels: the operands after data and
    scale (the NF4 table, then with double quantization the absmax scales, offset and dynamic table)."""
    from jaxquant.core.formats import NF4_CODE
    from jaxquant.schemes.nf4 import DYNAMIC_CODE
    from pallas_kernels import nf4_matmul as km

    s = w.scheme
    k, n = w.shape
    layout = km.NF4Layout(k=k, n=n, block=s.block_size, double_quant=s.double_quant)
    dq = (w.aux["absmax_scale"], w.aux["absmax_offset"], DYNAMIC_CODE) if s.double_quant else ()
    return layout, (NF4_CODE, *dq), tuple(float(v) for v in NF4_CODE)


def _check_limit(name: str, m: int, interpret: bool, device: str | None = None) -> str | None:
    """Why the XLA path is taken for ``M`` rows on this device (it measured, or is estimated, faster there), or
    ``None``.

    Applies in "auto" mode only: "on" forces kernels (benchmarks), "interpret" is for tests.
    """
    from pallas_kernels import tuning

    if _mode != "auto" or interpret or tuning.use_kernel(name, m, device):
        return None
    limit = tuning.max_m(name, device)
    dev = device or tuning.device_key()
    if tuning.limit_measured(name, device):
        return f"M={m} above the tuned limit {limit} for {name} on {dev} (from measurements: tuning.LIMITS)"
    return f"M={m} above the estimated limit {limit} for {name} on {dev} (not measured there: tuning.ESTIMATED_LIMITS)"


def _nf4_adapter(x, w: QArray, m: int, interpret: bool):
    from pallas_kernels import nf4_matmul as km
    from pallas_kernels import tuning

    k, n = w.shape
    layout, tables, code_vals = _nf4_operands(w)
    why = _check_limit("nf4", m, interpret)
    if why:
        return None, why
    cfg = tuning.get_config("nf4", m, k, n)
    why = km.supported(layout, cfg, x.dtype)
    if why:
        return None, why
    w_dtype = _w_round(w, x.dtype)

    def run(x2):
        return km.nf4_matmul(
            x2,
            w.data,
            w.scale,
            *tables,
            layout=layout,
            config=cfg,
            code_vals=code_vals,
            w_dtype=w_dtype,
            interpret=interpret,
        )

    return run, f"nf4 {cfg}"


def _llm_int8_adapter(x, w: QArray, m: int, interpret: bool):
    from jaxquant.schemes.llm_int8 import _absmax_int8
    from pallas_kernels import int8_outlier_matmul as km
    from pallas_kernels import tuning

    s = w.scheme
    k, n = w.shape
    if s.outlier_rows:
        return None, "LLM.int8 with stored float16 outlier rows"
    why = _check_limit("int8_outlier", m, interpret)
    if why:
        return None, why
    cfg = tuning.get_config("int8_outlier", m, k, n)
    why = km.supported(k, n, cfg)
    if why:
        return None, why
    per_row = s.granularity == "channel"
    use_prepass = cfg.variant == "prepass" and m <= km.PREPASS_MAX_M

    def split(x2):
        """The activation split: ``(x_q, s_x, idx, count)``."""
        if use_prepass:  # the same split in one Pallas launch (bit-identical)
            return km.prepass(x2, s.threshold, per_row, interpret=interpret)
        # the activation split exactly as LLMInt8Scheme._qdot computes it
        xf = x2.astype(jnp.float32)
        if s.threshold is None:
            is_out = jnp.zeros((k,), bool)
            x_r = xf
        else:
            is_out = jnp.max(jnp.abs(xf), axis=0) > s.threshold
            x_r = xf - jnp.where(is_out[None, :], xf, 0.0)
        xq, sx = _absmax_int8(x_r, axis=1 if per_row else None)
        sx = jnp.broadcast_to(sx.reshape(-1), (x2.shape[0],))
        return (xq, sx, *km.outlier_indices(is_out))

    def run(x2):
        return km.int8_outlier_matmul(
            x2, *split(x2), w.data, jnp.broadcast_to(w.scale, (n,)), config=cfg, outliers=s.threshold is not None,
            w_layout=s.layout, interpret=interpret,
        )  # fmt: skip

    copy = cfg.variant == "kmajor" and s.layout == "kn"
    note = " (a K-major copy of the (K, N) weight per call: store it (N, K), jq.relayout(q, 'nk'))" if copy else ""
    return run, f"int8_outlier {cfg}{note}"


def _fp8_adapter(x, w: QArray, m: int, interpret: bool):
    from pallas_kernels import fp8_matmul as km
    from pallas_kernels import tuning

    k, n = w.shape
    why = _check_limit("fp8_w8a16", m, interpret)
    if why:
        return None, why
    cfg = tuning.get_config("fp8_w8a16", m, k, n)
    why = km.supported(w.data.dtype, cfg, x.dtype)
    if why:
        return None, why
    w_dtype = _w_round(w, x.dtype)

    def run(x2):
        return km.fp8_matmul(
            x2, w.data, w.scale, mode="w8a16", config=cfg, w_dtype=w_dtype, w_layout=w.scheme.layout,
            interpret=interpret,
        )  # fmt: skip

    return run, f"fp8_w8a16 {cfg}"


def _ternary_adapter(x, w: QArray, m: int, interpret: bool, mode: str = "w16"):
    from pallas_kernels import ternary_matmul as km
    from pallas_kernels import tuning

    s = w.scheme
    k, n = w.shape
    if s.packing != "2bit":
        return None, (
            f"ternary packing {s.packing!r} (kernels read 2-bit packing; "
            "jaxquant.schemes.ternary.repack(w, '2bit') converts it exactly)"
        )
    packing = "k" if s.granularity == "channel" else "n"
    name = "ternary" if mode == "w16" else "ternary_a8"
    why = _check_limit(name, m, interpret)
    if why:
        return None, why
    cfg = tuning.get_config(name, m, k, n, accept=lambda c: km.supported(k, n, packing, c, x.dtype, mode) is None)
    why = km.supported(k, n, packing, cfg, x.dtype, mode)
    if why:
        return None, why
    w_dtype = _w_round(w, x.dtype) if mode == "w16" else None

    def run(x2):
        return km.ternary_matmul(
            x2,
            w.data,
            w.scale,
            k=k,
            n=n,
            packing=packing,
            mode=mode,
            config=cfg,
            w_dtype=w_dtype,
            interpret=interpret,
        )

    return run, f"{name} {cfg}"


_ADAPTERS: dict[str, Callable] = {
    "int": _int_adapter,
    "nf4": _nf4_adapter,
    "llm_int8": _llm_int8_adapter,
    "fp8": _fp8_adapter,
    "ternary": _ternary_adapter,
}


# -------------------------------------------------------------------------------------------------
# matmuls that quantize the activations too (their own semantics, not x @ dequantize(w))
# -------------------------------------------------------------------------------------------------
def _check_2d(x, w: QArray, kind: str, fn: str) -> None:
    if not isinstance(w, QArray) or getattr(w.scheme, "kind", None) != kind:
        raise TypeError(f"{fn} needs a QArray of a {kind!r} scheme, got {type(w).__name__}")
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"{fn}: x {tuple(x.shape)} and QArray {w.shape} do not contract")


def qdot_fp8_w8a8(x: jax.Array, w: QArray, x_scale: jax.Array | float | None = None) -> jax.Array:
    """fp8 W8A8: activations quantized to the weight's fp8 format on the fly.

    ``q = fp8(clip(x / s_x, -FMAX, FMAX))``, ``y = (q @ w)_fp32 * s_x * s_w``: an approximation of
    ``x @ dequantize(w)`` (activation rounding to fp8), not the same function as ``qdot``. On GPU one fused Pallas
    kernel (the activation quantization happens per tile); elsewhere XLA.

    Args:
      x: activations ``(..., K)``.
      w: an fp8 QArray ``(K, N)`` (:class:`~jaxquant.FP8Scheme`, any granularity and layout).
      x_scale: the activation scales ``s_x``. ``None`` (default): per row (token), ``max_k |x[m, k]| / FMAX``
        (1 for an all-zero row). Else float32 scales to use as given: a scalar (per tensor, e.g. the dynamic
        per-tensor, calibrated static or delayed scale of :class:`~jaxquant.nn.Fp8Linear`) or one per row,
        shape ``x.shape[:-1]``; positive and finite (checked when concrete). Values beyond ``s_x * FMAX``
        saturate.
    """
    from pallas_kernels import fp8_matmul as km

    x = jnp.asarray(x)
    _check_2d(x, w, "fp8", "qdot_fp8_w8a8")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    sx = None
    if x_scale is not None:
        sx = jnp.asarray(x_scale, jnp.float32)
        if sx.shape not in ((), lead):
            raise ValueError(f"qdot_fp8_w8a8: x_scale must be a scalar or of shape {lead}, got {sx.shape}")
        if is_concrete(sx) and not bool(jnp.all(jnp.isfinite(sx) & (sx > 0))):
            raise ValueError("qdot_fp8_w8a8: x_scale must be positive and finite")
        sx = sx.reshape(-1) if sx.ndim else sx
    k, n = w.shape
    interpret = _interpret()
    y = None
    if interpret is not None:
        from pallas_kernels import tuning

        # (N, K) codes have their own tuning key: XLA's fp8 GEMM reads them without a transpose (tuning.STORAGE_KEYS)
        name = "fp8_w8a8_nk" if w.scheme.layout == "nk" else "fp8_w8a8"
        cfg = tuning.get_config(name, x2.shape[0], k, n)
        if km.supported(w.data.dtype, cfg, x.dtype) is None and not _check_limit(name, x2.shape[0], interpret):
            y = km.fp8_matmul(
                x2,
                w.data,
                w.scale,
                mode="w8a8",
                config=cfg,
                w_layout=w.scheme.layout,
                x_scale=sx,
                interpret=interpret,
            )
    if y is None:
        if _mode == "on":
            raise ValueError("qdot_fp8_w8a8: kernel mode 'on' but the kernel cannot run this call")
        y = km.fp8_matmul_reference(x2, w.data, w.scale, mode="w8a8", w_layout=w.scheme.layout, x_scale=sx)
    return y.reshape(*lead, n)


def _dequant_kernel_weight(w: QArray, dtype, interpret: bool) -> tuple[jax.Array | None, str]:
    """``dequantize(w).astype(dtype)`` by a Pallas dequantization kernel (bit-identical), or ``None`` and why not."""
    s = w.scheme
    kind = getattr(s, "kind", None)
    w_dtype = _w_round(w, dtype)
    if kind == "nf4":
        from pallas_kernels import nf4_matmul as nk

        layout, tables, code_vals = _nf4_operands(w)
        why = nk.dequantize_supported(layout)
        if why:
            return None, why
        return nk.nf4_dequantize(
            w.data,
            w.scale,
            *tables,
            layout=layout,
            out_dtype=dtype,
            code_vals=code_vals,
            w_dtype=w_dtype,
            interpret=interpret,
        ), ""
    if kind != "int" or s.bits not in _INT_KERNEL:
        return None, f"no dequantization kernel for {type(s).__name__}"
    why = _act_order(w)
    if why:
        return None, why
    from pallas_kernels import int4_matmul as km

    layout = _int_layout(w)
    why = km.dequantize_supported(layout)
    if why:
        return None, why
    zero = w.zero if layout.mode != "sym" else None
    return km.int_dequantize(
        w.data, w.scale, zero, layout=layout, out_dtype=dtype, w_dtype=w_dtype, interpret=interpret
    ), ""


def qdot_dequant_dot(x: jax.Array, w: QArray) -> jax.Array:
    """``qdot``'s XLA path with the weight dequantized by a Pallas kernel: the same weights, the same ``jnp.dot``,
    the same result bit for bit (for large ``M``, where the dense GEMM beats a fused kernel and the XLA
    dequantization is the slow part).

    Integer schemes (2/3/4/8-bit, sym / zero point / min-max, any group size with whole tiles) and NF4 (with or
    without double quantization, whole ``128 x 128`` tiles); elsewhere, on CPU
    or in kernel mode ``"off"`` the XLA dequantization (in mode ``"on"``: an error instead).
    """
    x = jnp.asarray(x)
    if not isinstance(w, QArray) or len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"qdot_dequant_dot: x {tuple(x.shape)} and w do not contract (need a (K, N) QArray)")
    interpret = _interpret()
    wd, why = (None, f"kernel mode {_mode!r}") if interpret is None else _dequant_kernel_weight(w, x.dtype, interpret)
    if wd is None:
        if _mode == "on":
            raise ValueError(f"qdot_dequant_dot: kernel mode 'on' but no dequantization kernel runs: {why}")
        wd = dequantize(w).astype(x.dtype)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def qdot_ternary_a8(x: jax.Array, w: QArray) -> jax.Array:
    """BitNet b1.58 W1.58A8: activations quantized per token to int8 (absmax), int8 x ternary -> int32.

    ``s_x[m] = max_k |x[m, k]| / 127``, ``q = clip(round(x / s_x), -127, 127)``,
    ``y = (q @ t)_int32 * s_x * s``: BitNet's inference product, not the same function as ``qdot``.
    On GPU a Pallas kernel (after an XLA quantization pre-pass); elsewhere XLA.
    """
    from pallas_kernels import ternary_matmul as km

    x = jnp.asarray(x)
    _check_2d(x, w, "ternary", "qdot_ternary_a8")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    k, n = w.shape
    interpret = _interpret()
    plan = None
    if interpret is not None:
        plan, _ = _ternary_adapter(x2, w, x2.shape[0], interpret, mode="a8")
    if plan is not None:
        y = plan(x2)
    else:
        if _mode == "on":
            raise ValueError("qdot_ternary_a8: kernel mode 'on' but the kernel cannot run this call")
        if w.scheme.packing != "2bit":
            from jaxquant.core.api import dequantize as _deq

            t = jnp.round(_deq(w).astype(jnp.float32) / w.scale).astype(jnp.int8)
            q, sx = km.quantize_activations(x2)
            acc = jnp.dot(q, t, preferred_element_type=jnp.int32)
            y = (acc.astype(jnp.float32) * sx[:, None] * jnp.broadcast_to(w.scale, (n,))[None, :]).astype(x.dtype)
        else:
            packing = "k" if w.scheme.granularity == "channel" else "n"
            y = km.ternary_matmul_reference(x2, w.data, w.scale, k=k, n=n, packing=packing, mode="a8")
    return y.reshape(*lead, n)
