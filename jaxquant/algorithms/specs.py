"""SPECs of the calibrated methods (registered in :data:`jaxquant.specs._EXTENSIONS`).

Grammar: ``gptq-int{bits}[-g{group}][-asym]`` and ``awq-int{bits}[-g{group}][-asym]`` (any bits 2..8; no
``-g``: per output channel), plus ``smoothquant-int8-w8a8``. Listed: see :data:`SPECS`.

Options (``jaxquant quantize``/``eval`` flags, or the ``options`` dict of
:func:`jaxquant.eval.harness.quantize_model`); an option that does not apply to a method is an error:

==================  ==========================================================  ================
option              meaning                                                     applies to
==================  ==========================================================  ================
``calib_samples``   calibration windows (default 128; SmoothQuant 64); alias    all
                    ``calib_windows``
``calib_seq_len``   tokens per window (512)                                     all
``act_order``       GPTQ: quantize rows by decreasing ``diag(H)`` (on)          gptq
``sequential``      inputs from the quantized blocks before (on)                gptq, awq
``damp``            GPTQ damping, fraction of ``mean(diag(H))`` (0.01)          gptq
``progress``        progress bars (on)                                          all
``log``             callable receiving one summary line per run                 all
==================  ==========================================================  ================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxquant.algorithms.awq import AWQConfig, awq_model
from jaxquant.algorithms.gptq import GPTQConfig, gptq_model
from jaxquant.algorithms.smoothquant import W8A8, SmoothQuantConfig, smoothquant_model
from jaxquant.schemes.rtn import IntScheme
from jaxquant.specs import Spec

__all__ = ["AWQ_DEFAULTS", "GPTQ_DEFAULTS", "SPECS", "check_options", "parse"]

#: recipe defaults of the GPTQ SPECs (measured in the README: "GPTQ vs RTN on SmolLM2")
GPTQ_DEFAULTS: dict[str, Any] = dict(
    n_samples=128,
    seq_len=512,
    damp=0.01,
    act_order=True,
    static_groups=True,
    sequential=True,
    true_sequential=True,
    first_token_weight=20.0,
    clip_search=True,
)

#: recipe defaults of the AWQ SPECs
AWQ_DEFAULTS: dict[str, Any] = dict(n_samples=128, seq_len=512, sequential=True, first_token_weight=20.0)

_RE = re.compile(r"(?P<method>gptq|awq)-int(?P<bits>[2-8])(?:-g(?P<g>\d+))?(?P<asym>-asym)?")

_COMMON = ("calib_samples", "calib_seq_len", "progress", "log")
_ALLOWED = {
    "gptq": (*_COMMON, "act_order", "sequential", "damp", "clip_search"),
    "awq": (*_COMMON, "sequential"),
    "smoothquant": _COMMON,
}


def _options(method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate user options for ``method``; returns only the ones given (``None`` values dropped)."""
    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    if "calib_windows" in opts:  # the name other SPECs (jaxquant.nn) use for the same thing
        opts.setdefault("calib_samples", opts.pop("calib_windows"))
    bad = sorted(set(opts) - set(_ALLOWED[method]))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise ValueError(f"option(s) {flags} do not apply to {method} SPECs (valid: {', '.join(_ALLOWED[method])})")
    for k in ("calib_samples", "calib_seq_len"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int | np.integer) or opts[k] < 1):
            raise ValueError(f"{k} must be a positive integer, got {opts[k]!r}")
    if "calib_seq_len" in opts and opts["calib_seq_len"] < 2:
        raise ValueError(f"calib_seq_len must be at least 2, got {opts['calib_seq_len']}")
    for k in ("act_order", "sequential", "clip_search", "progress"):
        if k in opts and not isinstance(opts[k], bool):
            raise ValueError(f"{k} must be true or false, got {opts[k]!r}")
    if "damp" in opts:
        d = opts["damp"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1e6 or d != d:
            raise ValueError(f"damp must be a number >= 0 (a fraction of mean(diag(H)), e.g. 0.01), got {d!r}")
    if "log" in opts and not callable(opts["log"]):
        raise ValueError("log must be a callable taking one string")
    return opts


def _window_opts(opts: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_samples": int(opts.get("calib_samples", defaults["n_samples"])),
        "seq_len": int(opts.get("calib_seq_len", defaults["seq_len"])),
    }


def _gptq_build(scheme: IntScheme) -> Callable[..., Any]:
    def build(model: Any, calib_tokens: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        opts = _options("gptq", options)
        kw = {**GPTQ_DEFAULTS, **_window_opts(opts, GPTQ_DEFAULTS)}
        for k in ("act_order", "sequential", "damp", "clip_search"):
            if k in opts:
                kw[k] = type(GPTQ_DEFAULTS[k])(opts[k])
        config = GPTQConfig(scheme=scheme, **kw)
        params, records = gptq_model(model, calib_tokens, config, progress=opts.get("progress", True))
        if "log" in opts:
            gains = [r.gain for r in records]
            secs = sum(r.seconds for r in records)
            opts["log"](
                f"gptq {scheme.describe()}: {len(records)} GPTQ calls, calibration error vs RTN: median "
                f"{np.median(gains):.2f}x lower (min {min(gains):.2f}x), time in GPTQ {secs:.1f} s"
            )
        return params

    return build


def _awq_build(scheme: IntScheme) -> Callable[..., Any]:
    def build(model: Any, calib_tokens: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        opts = _options("awq", options)
        kw = {**AWQ_DEFAULTS, **_window_opts(opts, AWQ_DEFAULTS)}
        if "sequential" in opts:
            kw["sequential"] = bool(opts["sequential"])
        config = AWQConfig(scheme=scheme, **kw)
        params, records = awq_model(model, calib_tokens, config, progress=opts.get("progress", True))
        if "log" in opts:
            alphas = [r.alpha for r in records]
            gain = np.median([r.rtn_loss / max(r.final_loss, 1e-30) for r in records])
            opts["log"](
                f"awq {scheme.describe()}: {len(records)} scale searches, median alpha {np.median(alphas):.2f}, "
                f"calibration error vs RTN: median {gain:.2f}x lower"
            )
        return params

    return build


def _smoothquant_build(model: Any, calib_tokens: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    opts = _options("smoothquant", options)
    kw = _window_opts(opts, {"n_samples": 64, "seq_len": 512})
    cfg = SmoothQuantConfig(scheme=W8A8, **kw)
    return smoothquant_model(model, calib_tokens, cfg, progress=opts.get("progress", True))


def _method(name: str) -> str | None:
    if name == "smoothquant-int8-w8a8":
        return "smoothquant"
    m = _RE.fullmatch(name)
    return None if m is None else m["method"]


def check_options(name: str, options: dict[str, Any] | None) -> bool:
    """Validate ``options`` for one of our SPECs before any work starts (the CLI calls it before loading).

    Returns False if ``name`` is not a GPTQ/AWQ/SmoothQuant SPEC (nothing checked), True if the options are valid.

    Raises:
      ValueError: an option that does not apply to the method, or a bad value.
    """
    method = _method(name)
    if method is None:
        return False
    _options(method, options)
    return True


def parse(name: str) -> Spec | None:
    """The :class:`~jaxquant.specs.Spec` for a GPTQ/AWQ/SmoothQuant SPEC name, or ``None`` if not one of ours.

    Raises:
      ValueError: the name matches the grammar but describes an invalid scheme (e.g. ``-g0``).
    """
    if name == "smoothquant-int8-w8a8":
        return Spec(
            name,
            "SmoothQuant (alpha 0.5, folded into norms / v / up) + int8 W8A8 (per-channel W, per-token x)",
            build=_smoothquant_build,
        )
    m = _RE.fullmatch(name)
    if m is None:
        return None
    method, bits = m["method"], int(m["bits"])
    g = int(m["g"]) if m["g"] else None
    try:
        scheme = IntScheme(bits=bits, group_size=g, symmetric=not m["asym"])
    except ValueError as e:
        raise ValueError(f"SPEC {name!r}: {e}") from None
    if method == "gptq":
        d = GPTQ_DEFAULTS
        desc = (
            f"GPTQ {scheme.describe()}, fp16 scales: act-order, static groups from a clip search, true-sequential, "
            f"first token x{d['first_token_weight']:g} in H, {d['n_samples']}x{d['seq_len']} calibration tokens"
        )
        return Spec(name, desc, build=_gptq_build(scheme))
    d = AWQ_DEFAULTS
    desc = (
        f"AWQ {scheme.describe()}, fp16 scales: scale search (20 alphas) folded into norms / v / up, clip search, "
        f"first token x{d['first_token_weight']:g}, {d['n_samples']}x{d['seq_len']} calibration tokens"
    )
    return Spec(name, desc, build=_awq_build(scheme))


#: the listed SPECs (``jaxquant schemes``)
SPECS: dict[str, Spec] = {
    n: parse(n)
    for n in (
        "gptq-int4-g128",
        "gptq-int4-g128-asym",
        "gptq-int3-g128-asym",
        "gptq-int4-g64-asym",
        "awq-int4-g128-asym",
        "awq-int3-g128-asym",
        "smoothquant-int8-w8a8",
    )
}
