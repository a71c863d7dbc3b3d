"""SPECs of the activation-quantizing layers (``jaxquant eval --scheme SPEC``), registered through
:data:`jaxquant.specs._EXTENSIONS`.

All act on the linear layers of the transformer blocks (``layers/N/attn/{q,k,v,o}_proj``,
``layers/N/mlp/{gate,up,down}_proj``); embeddings, norms and the tied output head stay float.

* ``int8-absmax-w8a8``, ``int8-vectorwise-w8a8``: LLM.int8()'s two naive baselines (parameter rules with an
  :class:`~jaxquant.LLMInt8Scheme` without the outlier split: per-tensor / per-channel-and-token absmax).
  ``llm-int8`` itself is a built-in SPEC of :mod:`jaxquant.specs` (same scheme, threshold 6).
* ``fp8-{e4m3,e5m2}-w8a8[-token|-static|-delayed]``: :class:`~jaxquant.nn.Fp8Linear` swaps, fp8 weights with
  per-output-channel scales; activations per tensor, dynamic (default), dynamic per token (``-token``),
  static from calibration (``-static``: ``amax = max |x|`` over the calibration batches, per layer) or delayed
  (``-delayed``: amax history of 16 calls, warmed on the calibration batches; under ``jaxquant eval``, which
  runs each batch as a pure function, the warmed history stays as it is; :func:`~jaxquant.nn.stateful_perplexity`
  carries it on).
* ``ternary-ptq``: :class:`~jaxquant.nn.BitLinear` swaps (BitNet b1.58 absmean ternary weights, int8 per-token
  activations) applied post-training to a float model: expected to collapse (the motivation for QAT).

Options (``evaluate(..., options=...)``) of the calibrated ones: ``calib_windows`` (8), ``calib_seq_len``
(512), ``calib_batch_size`` (4), ``seed`` (0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from jaxquant.nn.layers import BitLinear, Fp8Linear
from jaxquant.nn.observe import calibration_batches, observe_inputs
from jaxquant.nn.swap import path_aware, quantize_model
from jaxquant.schemes import LLMInt8Scheme
from jaxquant.specs import BLOCK_LINEARS, Spec

__all__ = ["BLOCK_MODULES", "SPECS", "calibrate_batches"]

#: regex of the block linear layers' module paths (:data:`jaxquant.specs.BLOCK_LINEARS` without ``/kernel``)
BLOCK_MODULES = r"layers/\d+/(attn|mlp)/\w+_proj"

_OPTION_KEYS = ("calib_windows", "calib_seq_len", "calib_batch_size", "seed")


def calibrate_batches(calib_tokens: Any, options: dict[str, Any], spec_name: str) -> list[Any]:
    """The calibration batches of a SPEC from its options (see the module docstring)."""
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(f"SPEC {spec_name!r}: unknown option(s) {unknown}; valid: {list(_OPTION_KEYS)}")
    if calib_tokens is None:
        raise ValueError(f"SPEC {spec_name!r} is calibrated and needs calibration tokens")
    return calibration_batches(
        calib_tokens,
        n_windows=int(options.get("calib_windows", 8)),
        seq_len=int(options.get("calib_seq_len", 512)),
        batch_size=int(options.get("calib_batch_size", 4)),
        seed=int(options.get("seed", 0)),
    )


def _swap(model: nnx.Module, factory: Callable[..., nnx.Module]) -> nnx.Module:
    return quantize_model(nnx.clone(model), [(BLOCK_MODULES, factory)], strict=True)


def _fp8_builder(fmt: str, mode: str, act_granularity: str, name: str) -> Callable[..., nnx.Module]:
    def build_model(model: nnx.Module, calib_tokens: Any, options: dict[str, Any]) -> nnx.Module:
        options = dict(options or {})
        if mode == "dynamic":
            if options:
                raise ValueError(f"SPEC {name!r} takes no options, got {sorted(options)}")
            return _swap(model, lambda m: Fp8Linear.from_linear(m, fmt=fmt, act_granularity=act_granularity))
        batches = calibrate_batches(calib_tokens, options, name)
        if mode == "static":
            stats = observe_inputs(model, batches, paths=BLOCK_MODULES)

            @path_aware
            def factory(m: Any, path: str) -> nnx.Module:
                amax = stats[path].amax
                if not amax > 0:
                    raise ValueError(f"calibration saw only zero inputs at {path}; cannot set a static scale")
                return Fp8Linear.from_linear(m, fmt=fmt, act_mode="static", act_amax=amax)

            return _swap(model, factory)
        qmodel = _swap(model, lambda m: Fp8Linear.from_linear(m, fmt=fmt, act_mode="delayed"))

        @nnx.jit
        def warm(m: nnx.Module, batch: Any) -> None:
            m(batch)

        for b in batches:
            warm(qmodel, b)
        return qmodel

    return build_model


def _ternary_builder(model: nnx.Module, calib_tokens: Any, options: dict[str, Any]) -> nnx.Module:
    if options:
        raise ValueError(f"SPEC 'ternary-ptq' takes no options, got {sorted(options)}")
    return _swap(model, lambda m: BitLinear.from_linear(m))


def _fp8_specs() -> dict[str, Spec]:
    out = {}
    for fmt in ("e4m3", "e5m2"):
        base = f"fp8-{fmt}-w8a8"
        variants = {
            "": ("dynamic", "tensor", "activations dynamic per tensor"),
            "-token": ("dynamic", "token", "activations dynamic per token"),
            "-static": ("static", "tensor", "activations static per tensor (calibrated amax)"),
            "-delayed": ("delayed", "tensor", "activations delayed scaling (amax history of 16 calls)"),
        }
        for suffix, (mode, gran, what) in variants.items():
            name = base + suffix
            desc = f"fp8 {fmt} W8A8 layers: weights per output channel, {what}"
            out[name] = Spec(name, desc, build_model=_fp8_builder(fmt, mode, gran, name))
    return out


SPECS: dict[str, Spec] = {
    "int8-absmax-w8a8": Spec(
        "int8-absmax-w8a8",
        "int8 W8A8, absmax per tensor for weights and activations, no outlier split (naive baseline)",
        ((BLOCK_LINEARS, LLMInt8Scheme(threshold=None, granularity="tensor")),),
    ),
    "int8-vectorwise-w8a8": Spec(
        "int8-vectorwise-w8a8",
        "int8 W8A8, absmax per output channel and per token, no outlier split (LLM.int8 baseline)",
        ((BLOCK_LINEARS, LLMInt8Scheme(threshold=None, granularity="channel")),),
    ),
    **_fp8_specs(),
    "ternary-ptq": Spec(
        "ternary-ptq",
        "BitLinear layers: BitNet b1.58 ternary absmean weights, int8 per-token activations, post-training",
        build_model=_ternary_builder,
    ),
}
