"""Sharded QArrays and models on a device mesh, with JAX's own SPMD machinery (``Mesh``, ``NamedSharding``,
``jax.jit`` in/out shardings, ``shard_map`` for the explicit collectives).

Layout (Megatron-style tensor parallelism over the mesh axis ``model``, data parallelism over ``data``)::

    q/k/v_proj, gate/up_proj, lm_head   column-parallel: output features split   ("out")
    o_proj, down_proj                   row-parallel:    input features split    ("in")
    embedding, norm scales              replicated
    tokens, activations, logits         batch split over ``data``

A QArray is sharded *consistently*: every field is split along the axis that corresponds to the same logical
axis of the weight, so each device holds whole groups and the scales/zeros of exactly its codes.

* Column-parallel (``dim="out"``): grouped/channel int, fp8, cast, LLM.int8 and ternary layouts keep the output
  axis last in ``data``, ``scale`` and ``zero`` (``(K_packed, N)``, ``(G, N)``, ``(N,)``): that axis is split.
  NF4 stores the weight output-channel-major as one flat array (bitsandbytes layout), so the flat ``data`` and
  ``absmax`` arrays are split along their only axis, which is again a split by output channels. K-major
  LLM.int8 / fp8 codes (``layout="nk"``, ``data`` ``(N, K)``) are split along axis 0.
* Row-parallel (``dim="in"``): the packed rows of ``data`` and the group rows of ``scale``/``zero`` (``(G, N)``)
  are split along axis 0 when the input features per device are a whole number of groups
  (``K / devices % group_size == 0``); per-channel scales (``(N,)``) are replicated. K-major codes are split
  along axis 1.

A field that cannot be split evenly is replicated (always correct, just less memory-efficient). Under ``jax.jit``
the XLA SPMD partitioner then runs ``quantize``/``qdot``/the model on these shardings: column-parallel products
need no communication; row-parallel ones end in an all-reduce of the partial sums, whose summation order
differs from one device's dot, so their results agree with the unsharded ones to float32 rounding.

GPTQ: the Hessian ``H = sum_t x_t x_t^T`` of data-parallel calibration batches is a ``psum`` of per-device
``X_i^T X_i`` (:func:`sharded_xtx`, :func:`accumulate_sharded`); the weight can then be quantized
column-parallel (:func:`gptq_column_parallel`): GPTQ treats output columns independently given ``H``, so each
device runs GPTQ on its own columns with the replicated ``H`` and no further communication.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.core.qarray import QArray

__all__ = [
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "accumulate_sharded",
    "array_spec",
    "ensure_host_devices",
    "gptq_column_parallel",
    "gptq_column_parallel_with_stats",
    "make_mesh",
    "param_dims",
    "param_shardings",
    "parse_mesh",
    "qarray_shardings",
    "qarray_specs",
    "quantize_params_sharded",
    "quantize_sharded",
    "shard_model",
    "shard_params",
    "sharded_forward",
    "sharded_xtx",
]

#: kernels split along output features (paths in :func:`jaxquant.models.model_params` layout)
COLUMN_PARALLEL = r"(layers/\d+/(attn/[qkv]_proj|mlp/(gate|up)_proj)/kernel|lm_head/kernel)"
#: kernels split along input features
ROW_PARALLEL = r"layers/\d+/(attn/o_proj|mlp/down_proj)/kernel"


# ---------------------------------------------------------------------------------------------------------
# meshes
# ---------------------------------------------------------------------------------------------------------


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; ``"8"`` is ``{"model": 8}``.

    Raises ``ValueError`` for malformed specs, repeated names or non-positive sizes.
    """
    spec = spec.strip()
    if re.fullmatch(r"\d+", spec):
        spec = f"model={spec}"
    out: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
        if not m:
            raise ValueError(f"mesh {spec!r}: expected NAME=SIZE[,NAME=SIZE...] (e.g. data=2,model=4), got {part!r}")
        name, size = m.group(1), int(m.group(2))
        if size < 1:
            raise ValueError(f"mesh {spec!r}: axis {name} must have size >= 1")
        if name in out:
            raise ValueError(f"mesh {spec!r}: axis {name} given twice")
        out[name] = size
    return out


def make_mesh(spec: str | Mapping[str, int], devices: Any = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` from ``"data=2,model=4"`` (or a dict) over ``devices`` (default: all).

    The product of the sizes must equal the number of devices used (the first ``prod`` devices are taken).
    """
    axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    devs = list(jax.devices() if devices is None else devices)
    n = int(np.prod(list(axes.values())))
    if n > len(devs):
        raise ValueError(
            f"mesh {axes} needs {n} devices, {len(devs)} available "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)"
        )
    arr = np.array(devs[:n], dtype=object).reshape(tuple(axes.values()))
    types = getattr(jax.sharding, "AxisType", None)
    if types is not None:
        return Mesh(arr, tuple(axes), axis_types=(types.Auto,) * len(axes))
    return Mesh(arr, tuple(axes))  # pragma: no cover - older jax


def _size(mesh: Mesh, axis: str | None) -> int:
    return 1 if axis is None or axis not in mesh.shape else int(mesh.shape[axis])


# ---------------------------------------------------------------------------------------------------------
# QArray and array specs
# ---------------------------------------------------------------------------------------------------------


def array_spec(shape: tuple[int, ...], mesh: Mesh, axis: str | None, dim: str | None) -> P:
    """PartitionSpec of a float ``(K, N)`` kernel (or any array): ``dim="out"`` splits the last axis, ``"in"``
    the first, ``None`` replicates; an axis that does not divide evenly is replicated."""
    n = _size(mesh, axis)
    if dim is None or n == 1 or len(shape) == 0:
        return P()
    ax = len(shape) - 1 if dim == "out" else 0
    if shape[ax] % n:
        return P()
    spec = [None] * len(shape)
    spec[ax] = axis
    return P(*spec)


def qarray_specs(q: QArray, mesh: Mesh, axis: str | None = "model", dim: str | None = "out") -> QArray:
    """A QArray-shaped pytree of :class:`PartitionSpec` for ``q``'s fields (see the module docstring).

    ``q`` may hold arrays or ``ShapeDtypeStruct`` s (e.g. from ``jax.eval_shape``).
    """
    from jaxquant.schemes.nf4 import NF4Scheme

    if dim not in ("out", "in", None):
        raise ValueError(f"dim must be 'out', 'in' or None, got {dim!r}")
    n = _size(mesh, axis)
    if len(q.shape) != 2 or dim is None or n == 1:
        return jax.tree.map(lambda _: P(), q)
    k, nout = q.shape

    if isinstance(q.scheme, NF4Scheme):

        def nf4_spec(path, leaf):
            top = path[0].name if hasattr(path[0], "name") else None
            if dim == "out" and top in ("data", "scale") and leaf.ndim == 1 and nout % n == 0:
                if leaf.shape[0] % n == 0 and (k * nout) % (n * q.scheme.block_size) == 0:
                    return P(axis)
            return P()

        return jax.tree_util.tree_map_with_path(nf4_spec, q)

    group = getattr(q.scheme, "group_size", None) if getattr(q.scheme, "granularity", None) == "group" else None

    kmajor = getattr(q.scheme, "layout", "kn") == "nk"  # data (N, K): the output axis first

    def spec(path, leaf):
        top = path[0].name if hasattr(path[0], "name") else None
        if top == "aux" or leaf.ndim == 0:
            return P()
        if kmajor and top == "data":
            ax = 0 if dim == "out" else 1
            return P(*[axis if i == ax else None for i in range(2)]) if leaf.shape[ax] % n == 0 else P()
        if dim == "out":
            if leaf.shape[-1] == nout and nout % n == 0 and top in ("data", "scale", "zero"):
                return P(*([None] * (leaf.ndim - 1)), axis)
            return P()
        # row-parallel: whole groups per device
        if leaf.ndim != 2 or k % n or leaf.shape[0] % n or leaf.shape[0] == 1:
            return P()
        if group is not None and (k // n) % group:
            return P()
        return P(axis, None)

    return jax.tree_util.tree_map_with_path(spec, q)


def qarray_shardings(q: QArray, mesh: Mesh, axis: str | None = "model", dim: str | None = "out") -> QArray:
    """:func:`qarray_specs` as :class:`NamedSharding` s on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), qarray_specs(q, mesh, axis, dim))


def quantize_sharded(
    w: jax.Array, scheme: Any, mesh: Mesh, *, axis: str | None = "model", dim: str | None = "out"
) -> QArray:
    """``jaxquant.quantize(w, scheme)`` compiled with ``w`` split along ``dim`` and the QArray's fields split
    consistently (:func:`qarray_shardings`) as ``out_shardings``. Each device quantizes its own slice."""
    from jaxquant.core.api import _quantize_compiled
    from jaxquant.core.validate import check_weight

    w = check_weight(w)
    scheme._check_shape(tuple(w.shape))
    abstract = jax.eval_shape(lambda x: scheme._quantize(x), jax.ShapeDtypeStruct(w.shape, w.dtype))
    out_sh = qarray_shardings(abstract, mesh, axis, dim)
    in_sh = NamedSharding(mesh, array_spec(tuple(w.shape), mesh, axis, dim))
    fn = jax.jit(lambda x: _quantize_compiled(x, scheme), in_shardings=in_sh, out_shardings=out_sh)
    return fn(jax.device_put(w, in_sh))


# ---------------------------------------------------------------------------------------------------------
# model parameters
# ---------------------------------------------------------------------------------------------------------


def param_dims(path: str) -> str | None:
    """``"out"``, ``"in"`` or ``None`` (replicated) for a :func:`jaxquant.models.model_params` path."""
    if re.fullmatch(COLUMN_PARALLEL, path):
        return "out"
    if re.fullmatch(ROW_PARALLEL, path):
        return "in"
    return None


def param_shardings(params: Any, mesh: Mesh, *, axis: str | None = "model") -> Any:
    """A pytree of :class:`NamedSharding` matching ``params`` (nested dict of arrays and QArrays)."""
    from jaxquant.models.llama import param_path

    def one(path, leaf):
        p = param_path(path)
        d = param_dims(p)
        if isinstance(leaf, QArray):
            return qarray_shardings(leaf, mesh, axis, d)
        return NamedSharding(mesh, array_spec(tuple(leaf.shape), mesh, axis, d))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QArray))


def shard_params(params: Any, mesh: Mesh, *, axis: str | None = "model") -> Any:
    """``params`` placed on ``mesh`` with :func:`param_shardings` (``jax.device_put``)."""
    sh = param_shardings(params, mesh, axis=axis)
    flat_sh = jax.tree.leaves(sh)
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [jax.device_put(x, s) for x, s in zip(leaves, flat_sh)])


def shard_model(model: Any, mesh: Mesh, *, axis: str | None = "model") -> Any:
    """A copy of a :class:`~jaxquant.models.Llama` (float or quantized kernels) with its parameters sharded."""
    from jaxquant.models.llama import model_params, with_params

    return with_params(model, shard_params(model_params(model), mesh, axis=axis))


def sharded_forward(model: Any, mesh: Mesh, *, data_axis: str | None = "data") -> Any:
    """``fn(tokens) -> logits``: the model's forward compiled with its parameters' shardings as
    ``in_shardings`` and the batch split over ``data_axis`` (tokens in, logits out; replicated when the mesh has
    no such axis). ``model`` should come from :func:`shard_model`."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    d = data_axis if data_axis in mesh.shape else None
    tok_sh = NamedSharding(mesh, P(d, None))
    out_sh = NamedSharding(mesh, P(d, None, None))

    @functools.partial(jax.jit, in_shardings=(state_sh, tok_sh), out_shardings=out_sh)
    def fn(st, tokens):
        return nnx.merge(graphdef, st)(tokens)

    def call(tokens: Any) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if d is not None and tokens.shape[0] % _size(mesh, d):
            raise ValueError(f"batch {tokens.shape[0]} is not divisible by the {d!r} axis ({_size(mesh, d)})")
        return fn(state, jax.device_put(tokens, tok_sh))

    return call


# ---------------------------------------------------------------------------------------------------------
# GPTQ: data-parallel Hessians, column-parallel quantization
# ---------------------------------------------------------------------------------------------------------


def _shard_map(f, mesh, in_specs, out_specs, *, check: bool = True):
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check)  # pragma: no cover


def sharded_xtx(x: jax.Array, mesh: Mesh, *, axis: str = "data") -> jax.Array:
    """``X^T X`` (float32, HIGHEST precision) of tokens ``x`` ``(T, K)`` split over ``axis``: each device
    multiplies its rows, then one ``psum`` (all-reduce of a ``K x K`` matrix). Equals the single-device product
    up to the order of the per-device partial sums."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[0] % _size(mesh, axis):
        raise ValueError(f"sharded_xtx: x must be (tokens, K) with tokens divisible by {_size(mesh, axis)}")

    def local(xi):
        return jax.lax.psum(jnp.dot(xi.T, xi, precision=jax.lax.Precision.HIGHEST), axis)

    f = jax.jit(_shard_map(local, mesh, in_specs=P(axis, None), out_specs=P()))
    return f(jax.device_put(x, NamedSharding(mesh, P(axis, None))))


def accumulate_sharded(stats: Any, x: jax.Array, mesh: Mesh, *, axis: str = "data", weights: Any = None) -> Any:
    """:func:`jaxquant.calibrate.accumulate` for a calibration batch ``x`` ``(B, T, K)`` split over ``axis``.

    Each device accumulates its windows; ``xtx``, ``abs_sum``, ``weight_sum``, ``count`` are ``psum`` med and
    ``absmax`` ``pmax`` ed, then added to ``stats`` (replicated).
    """
    from jaxquant.calibrate import InputStats, accumulate

    x = jnp.asarray(x)
    k = x.shape[-1]
    if x.shape[0] % _size(mesh, axis):
        raise ValueError(f"accumulate_sharded: batch {x.shape[0]} not divisible by {_size(mesh, axis)}")
    c = jnp.ones(x.shape[:-1], jnp.float32) if weights is None else jnp.broadcast_to(weights, x.shape[:-1])
    spec_x = P(axis, *([None] * (x.ndim - 1)))
    spec_c = P(axis, *([None] * (c.ndim - 1)))

    def local(xi, ci):
        s = accumulate(InputStats.zeros(k), xi, ci)
        return InputStats(
            jax.lax.psum(s.xtx, axis),
            jax.lax.psum(s.abs_sum, axis),
            jax.lax.pmax(s.absmax, axis),
            jax.lax.psum(s.weight_sum, axis),
            jax.lax.psum(s.count, axis),
        )

    out_specs = InputStats(P(), P(), P(), P(), P())
    f = jax.jit(_shard_map(local, mesh, in_specs=(spec_x, spec_c), out_specs=out_specs))
    part = f(jax.device_put(x, NamedSharding(mesh, spec_x)), jax.device_put(c, NamedSharding(mesh, spec_c)))
    return stats.merge(part)


def gptq_column_parallel(
    w: jax.Array, h: jax.Array, scheme: Any, mesh: Mesh, *, axis: str = "model", **gptq_kw: Any
) -> QArray:
    """GPTQ with the kernel's output columns split over ``axis`` and ``h`` replicated (no communication).

    Each device runs :func:`jaxquant.algorithms.gptq_core.gptq` on its ``N / devices`` columns; the result is a
    QArray sharded as :func:`qarray_shardings` ``(dim="out")``, bit-identical to one device's. Needs ``N``
    divisible by the axis size and no ``g_idx`` (use ``static_groups=True`` with ``act_order``).
    """
    q, _ = gptq_column_parallel_with_stats(w, h, scheme, mesh, axis=axis, with_stats=False, **gptq_kw)
    return q


def gptq_column_parallel_with_stats(
    w: jax.Array,
    h: jax.Array,
    scheme: Any,
    mesh: Mesh,
    *,
    axis: str = "model",
    group_params: tuple[Any, Any] | None = None,
    **gptq_kw: Any,
) -> tuple[QArray, Any]:
    """:func:`gptq_column_parallel` returning :class:`~jaxquant.algorithms.gptq_core.GPTQStats` too.

    ``group_params`` (``(scale, zero)`` in the QArray layout, e.g. from a clip search) are split with their
    columns. The losses ``tr(E^T H E)`` are sums over columns: each device's share is ``psum`` med (so they equal
    the one-device values up to summation order); the damping depends on ``H`` only.
    """
    from jaxquant.algorithms.gptq_core import GPTQStats, gptq_with_stats

    w = jnp.asarray(w)
    h = jnp.asarray(h, jnp.float32)
    n = _size(mesh, axis)
    if w.ndim != 2 or w.shape[1] % n:
        raise ValueError(f"gptq_column_parallel: output features {w.shape[-1]} not divisible by {n} devices")
    if gptq_kw.get("act_order") and not gptq_kw.get("static_groups") and getattr(scheme, "granularity", "") == "group":
        raise ValueError("gptq_column_parallel: act_order with dynamic groups needs g_idx; use static_groups=True")
    gp: tuple[Any, ...] = ()
    gp_specs: tuple[Any, ...] = ()
    if group_params is not None:
        gp = tuple(jnp.asarray(x) for x in group_params if x is not None)
        gp_specs = tuple(P(*([None] * (x.ndim - 1)), axis) for x in gp)

    def local(wi, hi, *gpi):
        params = None
        if gpi:
            params = (gpi[0], gpi[1] if len(gpi) > 1 else None)
        q, st = gptq_with_stats(wi, hi, scheme, group_params=params, **gptq_kw)
        st = GPTQStats(
            jax.lax.psum(st.loss, axis), jax.lax.psum(st.rtn_loss, axis), jax.lax.psum(st.ref, axis), st.damp
        )
        return _fields(q), st

    full = jax.eval_shape(lambda x, y: gptq_with_stats(x, y, scheme, **gptq_kw)[0], w, h)
    out_specs = (_fields(qarray_specs(full, mesh, axis, "out")), GPTQStats(P(), P(), P(), P()))
    in_specs = (P(None, axis), P(), *gp_specs)
    # check=False: GPTQ's lax.cond mixes per-device (varying) and replicated values, which is fine here
    f = jax.jit(_shard_map(local, mesh, in_specs, out_specs, check=False))
    args = [jax.device_put(w, NamedSharding(mesh, P(None, axis))), jax.device_put(h, NamedSharding(mesh, P()))]
    args += [jax.device_put(x, NamedSharding(mesh, sp)) for x, sp in zip(gp, gp_specs)]
    (data, scale, zero, aux), stats = f(*args)
    q = QArray(data=data, scale=scale, zero=zero, aux=aux, scheme=full.scheme, shape=full.shape, dtype=full.dtype)
    return q, stats


def _fields(q: QArray) -> tuple[Any, Any, Any, Any]:
    return (q.data, q.scale, q.zero, q.aux)


def quantize_params_sharded(params: Any, rules: Any, mesh: Mesh, *, axis: str | None = "model") -> Any:
    """:func:`jaxquant.quantize_params` with every matched kernel quantized by :func:`quantize_sharded` on
    ``mesh`` (split per :func:`param_dims`); unmatched leaves are placed with :func:`param_shardings`.

    The QArrays are bit-identical to :func:`jaxquant.quantize_params`' (each device quantizes whole groups of
    its slice); they come back sharded. Raises ``ValueError`` if a rule matches no floating leaf.
    """
    from jaxquant.models.llama import param_path
    from jaxquant.transform import _compile_rules

    compiled = _compile_rules(rules)
    used = [False] * len(compiled)

    def visit(path, leaf):
        if isinstance(leaf, QArray) or not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            return leaf
        p = param_path(path)
        d = param_dims(p)
        for i, (rx, scheme, _) in enumerate(compiled):
            if rx.fullmatch(p):
                used[i] = True
                if scheme is not None:
                    try:
                        return quantize_sharded(leaf, scheme, mesh, axis=axis, dim=d)
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"{p}: {e}") from None
                break
        return jax.device_put(leaf, NamedSharding(mesh, array_spec(tuple(leaf.shape), mesh, axis, d)))

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, QArray))
    unused = [pat for (_, _, pat), u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(f"quantize_params_sharded: rule(s) matched no floating leaf: {unused}")
    return out


def ensure_host_devices(n: int) -> None:
    """Ask XLA for ``n`` virtual CPU devices (``--xla_force_host_platform_device_count``) unless ``XLA_FLAGS``
    already sets a count. Works only before JAX starts its backends (the first computation or
    ``jax.devices()``); the CLI calls it before loading anything. No effect on GPU device counts."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
