"""Swap the linear layers of any Flax NNX model for quantized layers, by module-path rules."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from jaxquant.core.qarray import QArray, Scheme
from jaxquant.nn.layers import LAYER_CLASSES, Int8OutlierLinear, QLinear, variable_value
from jaxquant.schemes import LLMInt8Scheme

__all__ = [
    "get_submodule",
    "is_linear",
    "is_quantized_layer",
    "linear_paths",
    "module_path",
    "path_aware",
    "quantize_model",
    "set_submodule",
]

LayerFactory = Callable[..., nnx.Module]
LayerRule = tuple[str, Scheme | LayerFactory | None]


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


def is_quantized_layer(module: Any) -> bool:
    """True for a layer of :mod:`jaxquant.nn` (QLinear, Int8OutlierLinear, Fp8Linear, BitLinear, LoRA)."""
    return LAYER_CLASSES.get(type(module).__name__) is type(module)


def path_aware(factory: Callable[[Any, str], nnx.Module]) -> Callable[[Any, str], nnx.Module]:
    """Mark a layer factory as taking ``(module, path)`` instead of ``(module)`` in :func:`quantize_model` rules
    (for per-layer settings, e.g. a calibrated static activation amax per path)."""
    factory._jaxquant_path_aware = True  # type: ignore[attr-defined]
    return factory


def get_submodule(model: nnx.Module, path: Sequence[Any]) -> Any:
    """The submodule at a module path (attribute names and list indices)."""
    node: Any = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def set_submodule(model: nnx.Module, path: Sequence[Any], new: Any) -> None:
    """Replace the submodule at ``path`` (non-empty) by ``new``."""
    if not path:
        raise ValueError("set_submodule: the root module cannot be replaced in place")
    parent = get_submodule(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _candidates(model: nnx.Module) -> list[tuple[tuple[Any, ...], Any]]:
    """Modules with a ``kernel`` attribute (float, quantized or malformed), outermost first, not nested in an
    already quantized layer."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    quantized: list[tuple[Any, ...]] = []
    for path, node in nnx.iter_graph(model):
        if not path or not isinstance(node, nnx.Module):
            continue
        path = tuple(path)
        if any(path[: len(q)] == q for q in quantized):
            continue
        if is_quantized_layer(node):
            quantized.append(path)
            out.append((path, node))
        elif hasattr(node, "kernel"):
            out.append((path, node))
    return out


def linear_paths(model: nnx.Module) -> list[str]:
    """Module paths of every float linear layer of ``model`` (what :func:`quantize_model` rules match)."""
    return [module_path(p) for p, m in _candidates(model) if is_linear(m)]


def _check_target(i: int, target: Any) -> None:
    if target is None or isinstance(target, Scheme) or callable(target):
        return
    raise TypeError(
        f"rules[{i}]: the target must be a jaxquant Scheme, a layer factory (module -> nnx.Module) or None, "
        f"got {type(target).__name__}"
    )


def _build(target: Scheme | LayerFactory, module: Any, path: str) -> nnx.Module:
    if isinstance(target, LLMInt8Scheme):
        return Int8OutlierLinear.from_linear(module, **Int8OutlierLinear.scheme_options(target))
    if isinstance(target, Scheme):
        return QLinear.from_linear(module, target)
    new = target(module, path) if getattr(target, "_jaxquant_path_aware", False) else target(module)
    if not isinstance(new, nnx.Module):
        raise TypeError(f"the layer factory returned {type(new).__name__}, not an nnx.Module")
    return new


def quantize_model(model: nnx.Module, rules: Sequence[LayerRule], *, strict: bool = False) -> nnx.Module:
    """Replace matching linear layers of an NNX model **in place** and return it (``nnx.clone`` it first to
    keep the original).

    Args:
      model: any ``nnx.Module``; its linear layers are the submodules with a 2-D float ``kernel`` variable
        (``nnx.Linear``, :class:`jaxquant.models.llama.Linear`, a user's own).
      rules: ordered ``[(module_path_regex, target), ...]``; paths look like ``layers/3/attn/q_proj`` (see
        :func:`linear_paths`). The first rule whose regex fully matches a linear layer's path decides: a
        :class:`~jaxquant.Scheme` gives a :class:`QLinear` (an :class:`~jaxquant.LLMInt8Scheme` gives an
        :class:`Int8OutlierLinear`), a callable ``factory(linear_module) -> module`` builds any layer (e.g.
        ``lambda m: Fp8Linear.from_linear(m, act_mode="delayed")``; decorate it with :func:`path_aware` to get
        ``(module, path)``), ``None`` keeps the layer. Everything else is left untouched.
      strict: raise ``ValueError`` instead of warning when a rule matched no linear layer.

    Raises:
      TypeError: a malformed rule or target.
      ValueError: an invalid regex; a rule with a target matching a module whose ``kernel`` is not a 2-D float
        array (e.g. a convolution or an embedding); a layer that cannot be quantized (the message names its
        path); or (strict) a rule that matched nothing.

    Warns:
      UserWarning: a rule matched no linear layer (the message lists non-linear modules it did match), or
        matched layers that are already quantized (they are left as they are).
    """
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise TypeError("rules must be a list of (module_path_regex, target) pairs")
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise TypeError(f"rules[{i}] must be a (module_path_regex, target) pair, got {rule!r}")
        _check_target(i, rule[1])
        try:
            compiled.append((re.compile(rule[0]), rule[1], rule[0]))
        except (re.error, TypeError) as e:
            raise ValueError(f"rules[{i}]: invalid regex {rule[0]!r}: {e}") from None
    used = [False] * len(compiled)
    already: dict[int, list[str]] = {}
    targets = []
    for path, module in _candidates(model):
        p = module_path(path)
        for i, (rx, target, _) in enumerate(compiled):
            if not rx.fullmatch(p):
                continue
            if is_quantized_layer(module):
                already.setdefault(i, []).append(p)
            elif not is_linear(module):
                if target is not None:
                    k = variable_value(module.kernel) if isinstance(module.kernel, nnx.Variable) else module.kernel
                    what = f"shape {tuple(getattr(k, 'shape', ()))}, dtype {getattr(k, 'dtype', type(k).__name__)}"
                    raise ValueError(
                        f"rules[{i}] ({compiled[i][2]!r}) matches {p} ({type(module).__name__}), whose kernel is not "
                        f"a 2-D float (in, out) array ({what}); only linear layers can be swapped — narrow the regex"
                    )
                used[i] = True  # a keep-rule (None) for a module with a kernel, e.g. a convolution: it did its job
            else:
                used[i] = True
                if target is not None:
                    targets.append((path, target, module))
            break
    for path, target, module in targets:
        p = module_path(path)
        try:
            new = _build(target, module, p)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{p}: {e}") from None
        set_submodule(model, path, new)
    for i, paths in already.items():
        warnings.warn(
            f"quantize_model: rule {compiled[i][2]!r} matched already quantized layers, left as they are: "
            f"{paths[:4]}{' ...' if len(paths) > 4 else ''}",
            UserWarning,
            stacklevel=2,
        )
    unused = [(i, pat) for i, ((_, _, pat), u) in enumerate(zip(compiled, used)) if not u and i not in already]
    if unused:
        hints = []
        for i, pat in unused:
            others = [
                module_path(tuple(p))
                for p, node in nnx.iter_graph(model)
                if p and isinstance(node, nnx.Module) and compiled[i][0].fullmatch(module_path(tuple(p)))
            ]
            hint = f" (it matches only non-linear modules: {others[:3]})" if others else ""
            hints.append(f"{pat!r}{hint}")
        lin = linear_paths(model)
        msg = (
            f"quantize_model: rule(s) matched no linear layer: {', '.join(hints)}; "
            f"linear layer paths look like {lin[:2] if lin else '(the model has none)'}"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return model
