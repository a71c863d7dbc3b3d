"""Swap the linear layers of any Flax NNX model for quantized layers, by path rules."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from jaxquant.core.qarray import QArray, Scheme
from jaxquant.nn.layers import Int8OutlierLinear, QLinear, linear_parts, variable_value
from jaxquant.schemes import LLMInt8Scheme

__all__ = ["is_linear", "module_path", "quantize_model"]

LayerRule = tuple[str, Scheme | Callable[[Any], nnx.Module] | None]


def module_path(path: tuple[Any, ...]) -> str:
    """``('layers', 0, 'attn', 'q_proj')`` -> ``"layers/0/attn/q_proj"``."""
    return "/".join(str(p) for p in path)


def is_linear(module: Any) -> bool:
    """True for an ``nnx.Linear``-like module: a ``kernel`` variable holding a float 2-D array."""
    k = getattr(module, "kernel", None)
    if not isinstance(k, nnx.Variable):
        return False
    v = variable_value(k)
    return not isinstance(v, QArray) and getattr(v, "ndim", 0) == 2


def _build(rule: Scheme | Callable[[Any], nnx.Module], module: Any) -> nnx.Module:
    if isinstance(rule, LLMInt8Scheme):
        kernel, bias = linear_parts(module)
        return Int8OutlierLinear(kernel, bias, threshold=rule.threshold, granularity=rule.granularity)
    if isinstance(rule, Scheme):
        return QLinear.from_linear(module, rule)
    if callable(rule):
        return rule(module)
    raise TypeError(f"a rule's target must be a Scheme, a layer factory or None, got {type(rule).__name__}")


def quantize_model(model: nnx.Module, rules: Sequence[LayerRule], *, strict: bool = False) -> nnx.Module:
    """Replace matching linear layers of an NNX model **in place** and return it.

    Args:
      model: any ``nnx.Module``; its linear layers are the submodules with a 2-D float ``kernel`` variable
        (``nnx.Linear``, :class:`jaxquant.models.llama.Linear`, a user's own).
      rules: ordered ``[(module_path_regex, target), ...]``; paths look like ``layers/3/attn/q_proj``. The first
        rule whose regex fully matches a linear layer's path decides: a :class:`~jaxquant.Scheme` gives a
        :class:`QLinear` (an :class:`~jaxquant.LLMInt8Scheme` gives an :class:`Int8OutlierLinear`), a callable
        ``factory(linear_module) -> module`` builds any layer (e.g. ``lambda m: Fp8Linear.from_linear(m,
        act_mode="delayed")``), ``None`` keeps the layer.
      strict: raise ``ValueError`` instead of warning when a rule matched no linear layer.

    Raises:
      ValueError: a regex is invalid, or (strict) a rule matched nothing.
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise TypeError(f"rules[{i}] must be a (module_path_regex, target) pair, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1], rule[0]))
        except (re.error, TypeError) as e:
            raise ValueError(f"rules[{i}]: invalid regex {rule[0]!r}: {e}") from None
    used = [False] * len(compiled)
    targets = []
    for path, module in nnx.iter_graph(model):
        if not path or not isinstance(module, nnx.Module) or not is_linear(module):
            continue
        p = module_path(path)
        for i, (rx, target, _) in enumerate(compiled):
            if rx.fullmatch(p):
                used[i] = True
                if target is not None:
                    targets.append((path, target, module))
                break
    for path, target, module in targets:
        try:
            new = _build(target, module)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{module_path(path)}: {e}") from None
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    unused = [pat for (_, _, pat), u in zip(compiled, used) if not u]
    if unused:
        msg = f"quantize_model: rule(s) matched no linear layer: {unused}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return model
