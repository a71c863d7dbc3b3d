"""SPECs of mixed bit widths (registered in :data:`jaxquant.specs._EXTENSIONS`).

Grammar: ``mixed-{bpw}[-rtn|-gptq]`` (e.g. ``mixed-4.5``, ``mixed-3.5-gptq``): the least-error choice of one
setting per block linear among int{2,3,4,5,6,8} x g{32,64,128} with zero points, at most ``bpw`` bits/weight on
average, scales and zeros included; errors from the diagonal Fisher (or tr(dW H dW^T), option ``proxy``); see
:mod:`jaxquant.algorithms.mixed_model`. ``mixed`` alone takes the target from the ``target_bpw`` option
(``jaxquant quantize --scheme mixed --target-bpw 4.5``).

Options (``jaxquant quantize`` flags, or the ``options`` dict of :func:`jaxquant.eval.harness.quantize_model`):

=================  =====================================================================
``target_bpw``     the target (needed with ``mixed``; must agree with ``mixed-{bpw}``)
``method``         ``rtn`` (default) or ``gptq`` (must agree with a ``-rtn``/``-gptq`` suffix)
``proxy``          sensitivity: ``fisher`` (default, diagonal Fisher) or ``hessian`` (tr(dW H dW^T))
``calib_samples``  calibration windows (128); alias ``calib_windows``
``calib_seq_len``  tokens per window (512)
``progress``       progress bars (on)
``log``            callable receiving summary lines
``plan_sink``      a list: the chosen :class:`~jaxquant.algorithms.mixed_bits.MixedPlan` is appended to it
=================  =====================================================================
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from jaxquant.specs import Spec

__all__ = ["SPECS", "check_options", "is_mixed", "parse"]

_RE = re.compile(r"mixed(?:-(?P<bpw>\d+(?:\.\d+)?))?(?:-(?P<method>rtn|gptq))?")
_ALLOWED = ("target_bpw", "method", "proxy", "calib_samples", "calib_seq_len", "progress", "log", "plan_sink")


def is_mixed(name: str) -> bool:
    """Whether ``name`` is a mixed-bits SPEC name (valid or not)."""
    return isinstance(name, str) and _RE.fullmatch(name.strip().lower()) is not None


def _resolve(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Validated options with ``target_bpw`` and ``method`` filled in from the name."""
    m = _RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a mixed-bits SPEC: {name!r}")
    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    if "calib_windows" in opts:
        opts.setdefault("calib_samples", opts.pop("calib_windows"))
    bad = sorted(set(opts) - set(_ALLOWED))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise ValueError(f"option(s) {flags} do not apply to mixed SPECs (valid: {', '.join(_ALLOWED)})")
    t = opts.get("target_bpw")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0):
        raise ValueError(f"--target-bpw must be a positive number, got {t!r}")
    if m["bpw"] is not None:
        named = float(m["bpw"])
        if t is not None and float(t) != named:
            raise ValueError(f"--target-bpw {t:g} contradicts SPEC {name!r}; give one of them")
        t = named
    if t is None:
        raise ValueError(f"SPEC {name!r} needs a target: --target-bpw N (e.g. 4.5) or a SPEC like mixed-4.5")
    if not 2 <= t <= 16:
        raise ValueError(f"target bits/weight must be in [2, 16] for mixed SPECs, got {t:g}")
    method = opts.get("method")
    if method is not None and method not in ("rtn", "gptq"):
        raise ValueError(f"--method must be rtn or gptq, got {method!r}")
    if m["method"] is not None:
        if method is not None and method != m["method"]:
            raise ValueError(f"--method {method} contradicts SPEC {name!r}")
        method = m["method"]
    opts["target_bpw"], opts["method"] = float(t), method or "rtn"
    for k in ("calib_samples", "calib_seq_len"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int | np.integer) or opts[k] < 1):
            raise ValueError(f"{k} must be a positive integer, got {opts[k]!r}")
    if opts.get("calib_seq_len", 2) < 2:
        raise ValueError(f"calib_seq_len must be at least 2, got {opts['calib_seq_len']}")
    if "progress" in opts and not isinstance(opts["progress"], bool):
        raise ValueError(f"progress must be true or false, got {opts['progress']!r}")
    if "log" in opts and not callable(opts["log"]):
        raise ValueError("log must be a callable taking one string")
    if opts.get("proxy", "fisher") not in ("fisher", "hessian"):
        raise ValueError(f"--proxy must be fisher or hessian, got {opts['proxy']!r}")
    if "plan_sink" in opts and not isinstance(opts["plan_sink"], list):
        raise ValueError("plan_sink must be a list")
    return opts


def check_options(name: str, options: dict[str, Any] | None) -> bool:
    """Validate ``options`` for a mixed SPEC before any work starts; False if ``name`` is not a mixed SPEC.

    Raises:
      ValueError: no target, contradicting target/method, an option that does not apply, or a bad value.
    """
    if not is_mixed(name):
        return False
    _resolve(name.strip().lower(), options)
    return True


def _build(name: str):
    def build(model: Any, calib_tokens: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        from jaxquant.algorithms.mixed_model import MixedConfig, mixed_model

        opts = _resolve(name, options)
        config = MixedConfig(
            target_bpw=opts["target_bpw"],
            method=opts["method"],
            proxy=opts.get("proxy", "fisher"),
            n_samples=int(opts.get("calib_samples", 128)),
            seq_len=int(opts.get("calib_seq_len", 512)),
        )
        params, plan = mixed_model(model, calib_tokens, config, progress=opts.get("progress", True))
        if "plan_sink" in opts:
            opts["plan_sink"].append(plan)
        if "log" in opts:
            hist = ", ".join(f"{k} x{v}" for k, v in plan.histogram().items())
            opts["log"](
                f"mixed {plan.method} to {plan.target_bpw:g} bpw: {plan.bits_per_weight:.4f} bpw "
                f"({plan.total_bytes:,} of {plan.budget_bytes:,} bytes); {hist}"
            )
        return params

    return build


def parse(name: str) -> Spec | None:
    """The :class:`~jaxquant.specs.Spec` for a mixed-bits SPEC name, or ``None`` if not one."""
    m = _RE.fullmatch(name)
    if m is None:
        return None
    target = f"{float(m['bpw']):g} bits/weight" if m["bpw"] else "--target-bpw bits/weight"
    method = {"gptq": "GPTQ", "rtn": "RTN", None: "RTN (or --method gptq)"}[m["method"]]
    desc = (
        f"mixed bit widths: per-tensor int2..8 x g32/64/128 asym chosen by Fisher-weighted error to <= {target} "
        f"(exact knapsack), {method}"
    )
    return Spec(name, desc, build=_build(name))


#: the listed SPECs (``jaxquant schemes``)
SPECS: dict[str, Spec] = {n: parse(n) for n in ("mixed-4.5", "mixed-3.5", "mixed-4.5-gptq")}
