"""Mixed bit widths to a target size: per-tensor sensitivities and an exact budgeted allocator (pure parts).

Problem. Every quantizable tensor ``t`` (a block linear kernel ``W_t`` of shape ``(K, N)``) can be stored with one
of a few candidate :class:`Setting` s (``bits`` in {2, 3, 4, 5, 6, 8}, ``group_size`` in {32, 64, 128}, integer
zero point by default). Setting ``j`` costs ``c_tj`` bytes -- the real :attr:`QArray.nbytes`: packed codes plus
fp16 scales plus zero points -- and causes the calibration-weighted output error

    e_tj = tr(E^T H_t E),     E = W_t - dequantize(quantize(W_t, setting j)),     H_t = sum_t c_t x x^T / sum_t c_t

with ``H_t`` the (token-weighted, mean) second moment of the tensor's input captured by :mod:`jaxquant.calibrate`
(the GPTQ Hessian up to a factor 2): ``e_tj`` is the mean squared error of the layer's output per token.
(:func:`rtn_costs`). :func:`fisher_costs` gives the alternative ``e_tj = sum F_t * E^2`` with ``F_t`` the empirical
diagonal Fisher of the model's loss, which puts all layers on the scale of the loss (measured the better allocator on
SmolLM2; see the README).
Given a target average ``bpw`` over the tensors, the allocator solves the multiple-choice knapsack

    minimise  sum_t e_{t, j_t}      subject to   sum_t c_{t, j_t} <= B = floor(bpw * sum_t numel_t / 8)

Solver (:func:`solve`). Costs are taken relative to each tensor's cheapest setting (``d_tj = c_tj - min_j c_tj``,
budget ``B' = B - sum_t min_j c_tj``), rounded *up* to a unit ``u = ceil(B' / resolution)`` bytes, and an exact
dynamic programme over the ``floor(B'/u) + 1`` budget levels finds the minimum-error choice. Rounding costs up
and the budget down makes every DP solution feasible in exact bytes, so the budget is never exceeded; when
``B' <= resolution`` the unit is 1 byte and the DP is exactly optimal. A fix-up pass then spends the bytes the
rounding left over: it repeatedly applies the single-tensor change with the largest error decrease that still
fits the exact remaining budget. Ties are broken by the lowest tensor and setting index, so the result is
deterministic.

The plan (:class:`MixedPlan`) is plain data with a JSON form (saved in checkpoint metadata by
``jaxquant quantize``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.api import quantize
from jaxquant.schemes.rtn import IntScheme

__all__ = [
    "DEFAULT_SETTINGS",
    "MixedPlan",
    "PlanEntry",
    "Setting",
    "TensorCosts",
    "allocate",
    "budget_bytes",
    "fisher_costs",
    "rtn_costs",
    "solve",
]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, order=True)
class Setting:
    """One candidate storage setting of a tensor: an RTN/GPTQ-compatible :class:`IntScheme` (fp16 scales).

    ``name`` uses the SPEC grammar: ``int4-g128-asym`` (zero point) or ``int4-g128`` (symmetric).
    """

    bits: int
    group_size: int | None
    symmetric: bool = False

    def __post_init__(self):
        self.scheme  # validates  # noqa: B018

    @functools.cached_property
    def scheme(self) -> IntScheme:
        return IntScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def name(self) -> str:
        g = "" if self.group_size is None else f"-g{self.group_size}"
        return f"int{self.bits}{g}{'' if self.symmetric else '-asym'}"

    @classmethod
    def from_name(cls, name: str) -> Setting:
        m = re.fullmatch(r"int(?P<b>[2-8])(?:-g(?P<g>\d+))?(?P<asym>-asym)?", name)
        if m is None:
            raise ValueError(f"not a mixed-bits setting name: {name!r} (expected e.g. int4-g128-asym)")
        return cls(int(m["b"]), int(m["g"]) if m["g"] else None, not m["asym"])


#: the default candidates: bits {2,3,4,5,6,8} x groups {128, 64, 32}, integer zero point (asymmetric)
DEFAULT_SETTINGS: tuple[Setting, ...] = tuple(Setting(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (128, 64, 32))


@dataclasses.dataclass(frozen=True)
class TensorCosts:
    """Candidate costs of one tensor: bytes and calibration output error per setting.

    Attributes:
      path: the tensor's parameter path (``layers/3/mlp/down_proj/kernel``).
      numel: number of weights.
      settings: the candidates, in a fixed order.
      nbytes: real stored bytes of each candidate (:attr:`QArray.nbytes`).
      errors: ``tr(E^T H E)`` of each candidate (>= 0, finite).
      ref: ``tr(W^T H W)``, the output energy (``errors / ref`` is the relative output error).
    """

    path: str
    numel: int
    settings: tuple[Setting, ...]
    nbytes: tuple[int, ...]
    errors: tuple[float, ...]
    ref: float = float("nan")

    def __post_init__(self):
        n = len(self.settings)
        if n == 0 or len(self.nbytes) != n or len(self.errors) != n:
            raise ValueError(f"TensorCosts {self.path}: need one nbytes and one error per setting (>= 1 setting)")
        if any(int(b) != b or b < 0 for b in self.nbytes):
            raise ValueError(f"TensorCosts {self.path}: nbytes must be non-negative integers")
        if not all(math.isfinite(e) and e >= 0 for e in self.errors):
            raise ValueError(f"TensorCosts {self.path}: errors must be finite and >= 0, got {self.errors}")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """The chosen setting of one tensor."""

    path: str
    setting: Setting
    numel: int
    nbytes: int
    error: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)


@dataclasses.dataclass(frozen=True)
class MixedPlan:
    """One setting per tensor, chosen to a byte budget.

    Attributes:
      target_bpw: the requested average bits per weight (over the planned tensors, scales and zeros included).
      budget_bytes: ``floor(target_bpw * numel / 8)``; ``total_bytes <= budget_bytes`` always.
      entries: the tensors in their original order.
      method: how the tensors are quantized with the plan (``rtn`` or ``gptq``); the errors are RTN's.
    """

    target_bpw: float
    budget_bytes: int
    entries: tuple[PlanEntry, ...]
    method: str = "rtn"

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.numel, 1)

    @property
    def total_error(self) -> float:
        return float(sum(e.error for e in self.entries))

    def schemes(self) -> dict[str, IntScheme]:
        """``{path: IntScheme}`` of the plan."""
        return {e.path: e.setting.scheme for e in self.entries}

    def rules(self) -> list[tuple[str, IntScheme]]:
        """Exact-path rules for :func:`jaxquant.quantize_params`."""
        return [(re.escape(e.path), e.setting.scheme) for e in self.entries]

    def histogram(self) -> dict[str, int]:
        """``{setting name: number of tensors}``, most bits first."""
        out: dict[str, int] = {}
        for e in sorted(self.entries, key=lambda e: (-e.setting.bits, e.setting.group_size or 0)):
            out[e.setting.name] = out.get(e.setting.name, 0) + 1
        return out

    def table(self) -> str:
        """The plan as a text table: tensor, setting, bpw, error share; then the totals."""
        tot = self.total_error
        w = max([len("tensor"), *(len(e.path) for e in self.entries)])
        lines = [f"{'tensor':<{w}}  {'setting':<15} {'bpw':>6} {'error share':>11}"]
        for e in self.entries:
            share = e.error / tot if tot > 0 else 0.0
            lines.append(f"{e.path:<{w}}  {e.setting.name:<15} {e.bits_per_weight:>6.3f} {100 * share:>10.2f}%")
        hist = ", ".join(f"{k} x{v}" for k, v in self.histogram().items())
        lines.append(
            f"{len(self.entries)} tensors, {self.total_bytes:,} bytes of {self.budget_bytes:,} budget: "
            f"{self.bits_per_weight:.4f} bpw (target {self.target_bpw:g}), method {self.method}; {hist}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (:meth:`from_json` inverts it exactly)."""
        return {
            "format": "jaxquant-mixed-plan-1",
            "target_bpw": self.target_bpw,
            "budget_bytes": self.budget_bytes,
            "method": self.method,
            "bits_per_weight": self.bits_per_weight,
            "entries": [
                {"path": e.path, "setting": e.setting.name, "numel": e.numel, "nbytes": e.nbytes, "error": e.error}
                for e in self.entries
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MixedPlan:
        if not isinstance(d, dict) or d.get("format") != "jaxquant-mixed-plan-1":
            raise ValueError("not a jaxquant mixed-bits plan (format jaxquant-mixed-plan-1)")
        entries = tuple(
            PlanEntry(e["path"], Setting.from_name(e["setting"]), int(e["numel"]), int(e["nbytes"]), float(e["error"]))
            for e in d["entries"]
        )
        return cls(float(d["target_bpw"]), int(d["budget_bytes"]), entries, str(d.get("method", "rtn")))


# ---------------------------------------------------------------------------------------------------------
# sensitivities
# ---------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=2)
def _rtn_error(w: jax.Array, h: jax.Array, scheme: IntScheme) -> jax.Array:
    from jaxquant.algorithms.awq import fake_quant  # awq imports gptq; keep this module light to import

    w = w.astype(jnp.float32)
    e = w - fake_quant(w, scheme)  # = dequantize(quantize(w)) without packing (tested equal)
    return jnp.sum(e * jnp.dot(h, e, precision=_HI))


@functools.lru_cache(maxsize=1024)
def _nbytes(shape: tuple[int, ...], dtype: str, scheme: IntScheme) -> int:
    """Real ``QArray.nbytes`` of ``quantize(w, scheme)`` for a ``w`` of this shape (from the abstract QArray)."""
    q = jax.eval_shape(scheme._quantize, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return int(q.nbytes)


@jax.jit
def _energy(w: jax.Array, h: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    return jnp.sum(w * jnp.dot(h, w, precision=_HI))


@functools.partial(jax.jit, static_argnums=2)
def _fisher_error(w: jax.Array, f: jax.Array, scheme: IntScheme) -> jax.Array:
    from jaxquant.algorithms.awq import fake_quant

    w = w.astype(jnp.float32)
    e = w - fake_quant(w, scheme)
    return jnp.sum(f * e * e)


def fisher_costs(path: str, w: Any, f: Any, settings: Sequence[Setting] = DEFAULT_SETTINGS) -> TensorCosts:
    """Like :func:`rtn_costs` with the diagonal-Fisher error ``sum_kn F_kn E_kn^2`` (``f`` of ``w``'s shape).

    ``F_kn = sum_i (d loss_i / d W_kn)^2`` over calibration windows ``i`` (the empirical Fisher, as SqueezeLLM):
    ``e / 2`` estimates the increase of the summed loss when ``W`` becomes ``W - E``, so errors of different
    layers are on one scale -- unlike ``tr(E^T H E)``, which measures each layer's own output.
    """
    w = jnp.asarray(w)
    f = jnp.asarray(f, jnp.float32)
    if w.ndim != 2 or f.shape != w.shape:
        raise ValueError(
            f"fisher_costs {path}: need a (K, N) kernel and a Fisher of the same shape, got {w.shape}, {f.shape}"
        )
    if not settings:
        raise ValueError("fisher_costs: no settings")
    quantize(w, settings[0].scheme)
    nbytes = [_nbytes(tuple(w.shape), str(w.dtype), s.scheme) for s in settings]
    errors = [max(float(_fisher_error(w, f, s.scheme)), 0.0) for s in settings]
    ref = float(jnp.sum(f * w.astype(jnp.float32) ** 2))
    return TensorCosts(path, int(w.size), tuple(settings), tuple(nbytes), tuple(errors), ref)


def rtn_costs(path: str, w: Any, h: Any, settings: Sequence[Setting] = DEFAULT_SETTINGS) -> TensorCosts:
    """Bytes (real ``QArray.nbytes``) and output error ``tr(E^T H E)`` of round-to-nearest for every setting.

    Args:
      path: the tensor's name (kept in the result).
      w: ``(K, N)`` float kernel.
      h: ``(K, K)`` input second moment (e.g. :attr:`jaxquant.calibrate.InputStats.hessian`).
      settings: the candidates.
    """
    w = jnp.asarray(w)
    h = jnp.asarray(h, jnp.float32)
    if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"rtn_costs {path}: need a (K, N) kernel and a (K, K) H, got {w.shape} and {h.shape}")
    if not settings:
        raise ValueError("rtn_costs: no settings")
    quantize(w, settings[0].scheme)  # validates (finite values, shape) once, with a clear message
    nbytes, errors = [], []
    for s in settings:
        err = _rtn_error(w, h, s.scheme)
        nbytes.append(_nbytes(tuple(w.shape), str(w.dtype), s.scheme))
        errors.append(max(float(err), 0.0))  # H is PSD; a tiny negative is float rounding
    return TensorCosts(path, int(w.size), tuple(settings), tuple(nbytes), tuple(errors), float(_energy(w, h)))


# ---------------------------------------------------------------------------------------------------------
# the allocator
# ---------------------------------------------------------------------------------------------------------


def budget_bytes(target_bpw: float, numel: int) -> int:
    """``floor(target_bpw * numel / 8)`` computed without float surprises (4.5 bpw of 8 weights = 4 bytes)."""
    if isinstance(target_bpw, bool) or not isinstance(target_bpw, int | float) or not target_bpw > 0:
        raise ValueError(f"target bits/weight must be a positive number, got {target_bpw!r}")
    if not math.isfinite(target_bpw):
        raise ValueError(f"target bits/weight must be finite, got {target_bpw!r}")
    from fractions import Fraction

    return int(Fraction(str(float(target_bpw))) * numel // 8)


def solve(nbytes: Any, errors: Any, budget: int, *, resolution: int = 100_000) -> np.ndarray:
    """Choose one option per item minimising the summed error with summed bytes ``<= budget``.

    Args:
      nbytes: ``(T, C)`` non-negative integer costs (``C`` options per item; pad missing options with a cost
        above the budget).
      errors: ``(T, C)`` finite non-negative errors.
      budget: the byte budget.
      resolution: budget levels of the dynamic programme (above the spare budget ``B'``, see the module
        docstring, the result is exactly optimal; below, optimal for the costs rounded up to ``B'/resolution``
        bytes, then improved by the fix-up pass). Memory is ``T * (resolution + 1)`` bytes.

    Returns:
      ``(T,)`` int array of the chosen option per item (deterministic: ties go to the lowest index).

    Raises:
      ValueError: infeasible (even the cheapest option of every item exceeds the budget) or bad input.
    """
    c = np.asarray(nbytes)
    e = np.asarray(errors, dtype=np.float64)
    if c.ndim != 2 or e.shape != c.shape or c.shape[1] < 1:
        raise ValueError(f"solve: nbytes and errors must both be (T, C) with C >= 1, got {c.shape} and {e.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("solve: nbytes must be integers")
        c = c.astype(np.int64)
    c = c.astype(np.int64)
    if np.any(c < 0) or not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("solve: nbytes must be >= 0 and errors finite and >= 0")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"solve: resolution must be a positive int, got {resolution!r}")
    T, C = c.shape
    if T == 0:
        return np.zeros((0,), np.int64)
    budget = int(budget)
    cmin = c.min(axis=1)
    spare = budget - int(cmin.sum())
    if spare < 0:
        raise ValueError(
            f"the budget of {budget:,} bytes is below the cheapest plan ({int(cmin.sum()):,} bytes): "
            "lower no further than the smallest candidate setting allows"
        )
    d = c - cmin[:, None]  # extra bytes over each item's cheapest option
    unit = max(1, -(-spare // resolution))
    levels = spare // unit  # DP budget in units; sum(ceil(d/unit)) <= levels  =>  sum(d) <= spare
    du = -(-d // unit)
    allowed = du <= levels
    f = np.zeros(levels + 1, np.float64)  # f[b] = least error of the items so far with extra cost <= b units
    choice = np.zeros((T, levels + 1), np.uint8 if C < 256 else np.int32)
    for t in range(T):
        new = np.full(levels + 1, np.inf)
        arg = np.zeros(levels + 1, choice.dtype)
        for j in range(C):
            if not allowed[t, j]:
                continue
            k = int(du[t, j])
            cand = np.full(levels + 1, np.inf)
            cand[k:] = f[: levels + 1 - k] + e[t, j]
            better = cand < new  # strict: the first (lowest) index wins ties
            new = np.where(better, cand, new)
            arg = np.where(better, j, arg)
        f = new
        choice[t] = arg
    pick = np.zeros(T, np.int64)
    b = levels
    for t in range(T - 1, -1, -1):
        j = int(choice[t, b])
        pick[t] = j
        b -= int(du[t, j])
    return _fix_up(c, e, pick, budget)


def _fix_up(c: np.ndarray, e: np.ndarray, pick: np.ndarray, budget: int) -> np.ndarray:
    """Spend the bytes left by rounding: best single-item improvement that fits, until none does."""
    T = c.shape[0]
    rows = np.arange(T)
    for _ in range(8 * T * c.shape[1]):
        left = budget - int(c[rows, pick].sum())
        gain = e[rows, pick][:, None] - e  # error decrease of switching item t to option j
        fits = (c - c[rows, pick][:, None]) <= left
        gain = np.where(fits & (gain > 0), gain, 0.0)
        if not np.any(gain > 0):
            break
        t, j = np.unravel_index(int(np.argmax(gain)), gain.shape)  # first maximum: lowest (t, j)
        pick = pick.copy()
        pick[t] = j
    assert int(c[rows, pick].sum()) <= budget
    return pick


def allocate(
    costs: Sequence[TensorCosts], target_bpw: float, *, resolution: int = 100_000, method: str = "rtn"
) -> MixedPlan:
    """The least-error plan whose average bits/weight over ``costs``' tensors is at most ``target_bpw``.

    Bytes are the candidates' real :attr:`QArray.nbytes` (scales and zeros included), so
    ``plan.bits_per_weight <= target_bpw`` always. See :func:`solve` for the solver and ``resolution``.

    Raises:
      ValueError: no tensors, or the target is below the cheapest plan.
    """
    costs = list(costs)
    if not costs:
        raise ValueError("allocate: no tensors")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"allocate: method must be 'rtn' or 'gptq', got {method!r}")
    numel = sum(t.numel for t in costs)
    budget = budget_bytes(target_bpw, numel)
    C = max(len(t.settings) for t in costs)
    big = budget + 1  # padding for tensors with fewer candidates: never affordable
    nb = np.full((len(costs), C), big, np.int64)
    er = np.zeros((len(costs), C), np.float64)
    for i, t in enumerate(costs):
        nb[i, : len(t.settings)] = t.nbytes
        er[i, : len(t.settings)] = t.errors
    try:
        pick = solve(nb, er, budget, resolution=resolution)
    except ValueError as e:
        cheapest = 8.0 * sum(min(t.nbytes) for t in costs) / numel
        msg = f"target {target_bpw:g} bits/weight is below the cheapest plan ({cheapest:.3f}): {e}"
        raise ValueError(msg) from None
    entries = tuple(
        PlanEntry(t.path, t.settings[j], t.numel, int(t.nbytes[j]), float(t.errors[j]))
        for t, j in zip(costs, pick.tolist())
    )
    plan = MixedPlan(float(target_bpw), budget, entries, method)
    assert plan.total_bytes <= budget
    return plan
