"""SPEC strings: short names for a whole-model quantization recipe (``jaxquant eval --scheme SPEC``).

A SPEC maps to path rules for :func:`jaxquant.quantize_params`. Unless a SPEC says otherwise it quantizes
**all linear layers of the transformer blocks** (``layers/N/attn/{q,k,v,o}_proj/kernel`` and
``layers/N/mlp/{gate,up,down}_proj/kernel``); token embeddings, norms and the (tied) output head stay float.

Integer SPECs follow one grammar: ``int{bits}[-g{group}][-asym|-minmax][-tensor]``, e.g. ``int4-g128`` (4-bit,
groups of 128 inputs, symmetric), ``int3-g128-asym`` (integer zero point), ``int4-g32-minmax`` (llama.cpp Q4_1
grid), ``int8`` (per output channel), ``int8-tensor``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

from jaxquant.core.qarray import Scheme
from jaxquant.schemes import CastScheme, FP8Scheme, IntScheme, LLMInt8Scheme, NF4Scheme, TernaryScheme

__all__ = ["BLOCK_LINEARS", "Spec", "UnknownSpecError", "list_specs", "parse_spec"]

#: regex of the block linear layers' kernels in :func:`jaxquant.models.model_params` paths
BLOCK_LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


class UnknownSpecError(ValueError):
    """A SPEC string that names no known recipe."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A named recipe: a one-line description plus either static ``rules`` for
    :func:`jaxquant.quantize_params`, a calibrated ``build`` or a layer-swapping ``build_model``.

    ``build(model, calib_tokens, options) -> params`` (for calibrated methods such as GPTQ/AWQ) gets the float
    model, a 1-D int array of calibration-split tokens and a dict of user options, and returns the quantized
    parameter dict (as :func:`jaxquant.models.model_params` would, with QArrays).

    ``build_model(model, calib_tokens, options) -> model`` (for recipes that change the module structure, e.g.
    swapping linears for :mod:`jaxquant.nn` W8A8 layers) returns a new model; it works on a copy
    (``nnx.clone``) and leaves ``model`` untouched. ``calib_tokens`` may be ``None`` when the recipe needs none.
    """

    name: str
    description: str
    rules: tuple[tuple[str, Scheme | None], ...] = ()
    build: Callable[..., Any] | None = None
    build_model: Callable[..., Any] | None = None

    @property
    def is_float(self) -> bool:
        return not self.rules and self.build is None and self.build_model is None


_FIXED: dict[str, tuple[str, Scheme | None]] = {
    "fp32": ("float32 weights, nothing quantized (the baseline)", None),
    "bf16": ("block linears stored in bfloat16", CastScheme("bfloat16")),
    "fp16": ("block linears stored in float16", CastScheme("float16")),
    "nf4": ("NF4, blocks of 64 along inputs, fp32 absmax (bitsandbytes/QLoRA layout)", NF4Scheme()),
    "nf4-dq": ("NF4 with double quantization of the absmax (QLoRA)", NF4Scheme(double_quant=True)),
    "fp8-e4m3": ("fp8 e4m3 weights, one fp32 scale per output channel", FP8Scheme("e4m3", "channel")),
    "fp8-e5m2": ("fp8 e5m2 weights, one fp32 scale per output channel", FP8Scheme("e5m2", "channel")),
    "fp8-e4m3-tensor": ("fp8 e4m3 weights, one fp32 scale per tensor", FP8Scheme("e4m3", "tensor")),
    "fp8-e4m3-nk": (
        "fp8 e4m3 weights, per-channel scales, codes stored K-major (N, K) for the GPU kernels (same results)",
        FP8Scheme("e4m3", "channel", layout="nk"),
    ),
    "llm-int8": (
        "LLM.int8(): int8 vector-wise weights and activations, |x|>6 feature dims in float",
        LLMInt8Scheme(threshold=6.0),
    ),
    "llm-int8-nk": (
        "LLM.int8() with the int8 codes stored K-major (N, K), the layout the GPU kernels read (same results)",
        LLMInt8Scheme(threshold=6.0, layout="nk"),
    ),
    "w8a8": ("int8 vector-wise weights and activations, no outlier split", LLMInt8Scheme(threshold=None)),
    "w8a8-tensor": (
        "int8 absmax per-tensor weights and activations (naive baseline)",
        LLMInt8Scheme(threshold=None, granularity="tensor"),
    ),
    "ternary": ("BitNet b1.58 absmean ternary weights, one scale per tensor, 2-bit packed", TernaryScheme()),
}

_INT_RE = re.compile(r"int(?P<bits>[2-8])(?:-g(?P<g>\d+))?(?P<kind>-asym|-minmax)?(?P<tensor>-tensor)?(?P<nk>-nk)?")

#: the integer SPECs listed by ``jaxquant schemes`` (any SPEC of the grammar is accepted)
_LISTED_INT = [
    "int8",
    "int8-tensor",
    "int4-g128",
    "int4-g128-asym",
    "int4-g128-nk",
    "int4-g64",
    "int4-g64-asym",
    "int4-g32-minmax",
    "int4-asym",
    "int3-g128",
    "int3-g128-asym",
    "int3-g64-asym",
    "int2-g64-asym",
]


def _int_spec(name: str) -> Spec | None:
    m = _INT_RE.fullmatch(name)
    if m is None:
        return None
    bits = int(m["bits"])
    g = int(m["g"]) if m["g"] else None
    kind = m["kind"] or ""
    if m["tensor"] and g is not None:
        raise UnknownSpecError(f"SPEC {name!r}: -tensor and -g{g} contradict each other")
    try:
        scheme = IntScheme(
            bits=bits,
            group_size=g,
            granularity="tensor" if m["tensor"] else None,
            symmetric=not kind,
            range="minmax" if kind == "-minmax" else "zeropoint",
            layout="nk" if m["nk"] else "kn",
        )
    except ValueError as e:
        raise UnknownSpecError(f"SPEC {name!r}: {e}") from None
    return Spec(name, f"RTN {scheme.describe()}, fp16 scales", ((BLOCK_LINEARS, scheme),))


#: modules that add SPECs: each exposes ``SPECS`` (a dict name -> Spec of listed SPECs) and may expose
#: ``parse(name) -> Spec | None`` for SPEC grammars; a module that is not importable is skipped
_EXTENSIONS: tuple[str, ...] = (
    "jaxquant.formats.specs",
    "jaxquant.nn.specs",
    "jaxquant.algorithms.specs",
    "jaxquant.algorithms.mixed_specs",
)


def _extensions() -> list[Any]:
    mods = []
    for modname in _EXTENSIONS:
        try:
            mods.append(importlib.import_module(modname))
        except ImportError:
            continue
    return mods


def parse_spec(name: str) -> Spec:
    """The :class:`Spec` for a SPEC string.

    Raises:
      UnknownSpecError: (a ``ValueError``) the name is not a known SPEC; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise UnknownSpecError(f"SPEC must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _FIXED:
        desc, scheme = _FIXED[key]
        return Spec(key, desc, () if scheme is None else ((BLOCK_LINEARS, scheme),))
    spec = _int_spec(key)
    for mod in _extensions():
        if spec is not None:
            break
        spec = getattr(mod, "SPECS", {}).get(key)
        if spec is None and hasattr(mod, "parse"):
            spec = mod.parse(key)
    if spec is None:
        raise UnknownSpecError(
            f"unknown scheme SPEC {name!r}; valid: {', '.join(list_specs())} "
            "(or any int{bits}[-g{group}][-asym|-minmax][-tensor]); run `jaxquant schemes` for descriptions"
        )
    return spec


def list_specs() -> list[str]:
    """Every listed SPEC name, float first."""
    names = ["fp32", "bf16", "fp16", *_LISTED_INT, *[k for k in _FIXED if k not in ("fp32", "bf16", "fp16")]]
    for mod in _extensions():
        names += [k for k in getattr(mod, "SPECS", {}) if k not in names]
    return names
