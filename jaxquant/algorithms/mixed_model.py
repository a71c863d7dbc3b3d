"""Mixed bit widths for a whole Llama model: sensitivities from one calibration pass, a plan, then RTN or GPTQ.

1. :func:`model_costs`: one float forward pass over the calibration windows (:func:`jaxquant.calibrate.run_blockwise`,
   not sequential) captures every block input's second moment ``H`` (position 0 weighted as in the GPTQ recipe,
   the attention sink); for every block linear and candidate :class:`~jaxquant.algorithms.mixed_bits.Setting`
   it records the real stored bytes and the RTN output error ``tr(E^T H E)``
   (:func:`~jaxquant.algorithms.mixed_bits.rtn_costs`).
2. :func:`~jaxquant.algorithms.mixed_bits.allocate`: the least-error plan within the byte budget of the target
   bits/weight (an exact dynamic programme; never over budget).
3. :func:`apply_plan`: round-to-nearest with each tensor's setting (``method="rtn"``), or GPTQ with each tensor's
   setting (``method="gptq"``: the GPTQ recipe of the ``gptq-*`` SPECs, one GPTQ call per linear since the settings
   of linears sharing an input may differ). The GPTQ plan is chosen from the RTN errors (GPTQ's own error for
   every candidate would cost 18 GPTQ runs per tensor).

Scope: the block linears (as every SPEC); the tied embedding / output head, norms stay float, so the bits/weight
are comparable with the uniform SPECs' (``jaxquant eval`` reports bits/weight over the quantized tensors).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.algorithms.mixed_bits import (
    DEFAULT_SETTINGS,
    MixedPlan,
    Setting,
    TensorCosts,
    allocate,
    fisher_costs,
    rtn_costs,
)
from jaxquant.calibrate import GROUPS, LINEARS, InputStats, run_blockwise
from jaxquant.models.llama import Llama, flat_params, model_params
from jaxquant.transform import quantize_params

_BLOCK_KERNEL = re.compile(r"layers/\d+/(attn|mlp)/\w+_proj/kernel")

__all__ = ["MixedConfig", "apply_plan", "cheapest_bpw", "fisher_diag", "mixed_model", "model_costs"]


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    """Options of :func:`mixed_model`.

    Attributes:
      target_bpw: average bits/weight over the block linears, scales and zeros included (the budget).
      method: ``"rtn"`` or ``"gptq"`` (how the planned settings are applied).
      proxy: the sensitivity, ``"fisher"`` (default: measured better on SmolLM2, see the README) or
        ``"hessian"`` (see :func:`model_costs`).
      settings: the candidate settings of every tensor.
      n_samples, seq_len, seed: calibration windows (:func:`jaxquant.algorithms.gptq.calibration_windows_for`).
      first_token_weight: weight of position 0 of each window in ``H`` (as the GPTQ recipe).
      batch_size: windows per compiled forward call.
      resolution: budget levels of the allocator's dynamic programme.
      damp, act_order, clip_search: GPTQ options (``method="gptq"``). ``damp``/``act_order`` as the ``gptq-*``
        SPECs; ``clip_search`` is off here, while the SPECs turned it on after the mixed-GPTQ numbers in the
        README were measured (without it).
    """

    target_bpw: float
    method: str = "rtn"
    proxy: str = "fisher"
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    first_token_weight: float = 20.0
    batch_size: int = 8
    resolution: int = 100_000
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = False

    def __post_init__(self):
        t = self.target_bpw
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < 64:
            raise ValueError(f"MixedConfig.target_bpw must be a number in (0, 64), got {t!r}")
        if self.proxy not in ("fisher", "hessian"):
            raise ValueError(f"MixedConfig.proxy must be 'fisher' or 'hessian', got {self.proxy!r}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"MixedConfig.method must be 'rtn' or 'gptq', got {self.method!r}")
        if not self.settings or not all(isinstance(s, Setting) for s in self.settings):
            raise TypeError("MixedConfig.settings must be a non-empty tuple of Setting")
        for name in ("n_samples", "seq_len", "batch_size", "resolution"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MixedConfig.{name} must be a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"MixedConfig.seq_len must be at least 2, got {self.seq_len}")
        if not (isinstance(self.first_token_weight, int | float) and self.first_token_weight >= 0):
            raise ValueError(f"MixedConfig.first_token_weight must be >= 0, got {self.first_token_weight!r}")


def cheapest_bpw(model: Llama, settings: tuple[Setting, ...] = DEFAULT_SETTINGS) -> float:
    """Bits/weight of the block linears when every tensor takes its cheapest setting (no data needed)."""
    from jaxquant.algorithms.mixed_bits import _nbytes

    total = numel = 0
    for layer in model_params(model)["layers"].values():
        flat = flat_params(layer)
        for g in GROUPS:
            for name in LINEARS[g]:
                w = flat[name]
                total += min(_nbytes(tuple(w.shape), str(w.dtype), s.scheme) for s in settings)
                numel += int(w.size)
    return 8.0 * total / max(numel, 1)


def fisher_diag(model: Llama, windows: Any, *, progress: bool = True) -> dict[str, jax.Array]:
    """Empirical diagonal Fisher ``F = sum_i (d loss_i / dW)^2`` of every block linear kernel.

    ``loss_i`` is window ``i``'s mean next-token NLL (tokens 2..T, as the perplexity); one backward pass per
    window. Returns ``{path: (K, N) float32}`` with paths as :func:`jaxquant.models.flat_params`.
    """
    from flax import nnx
    from tqdm.auto import tqdm

    from jaxquant.calibrate import _check_windows

    win = _check_windows(windows, model.config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def sq_grad(params, tok):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(tok[None])[0, :-1].astype(jnp.float32)
            lp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(lp, tok[1:, None], axis=-1))

        g = flat_params(nnx.to_pure_dict(jax.grad(loss)(params)))
        return {k: v.astype(jnp.float32) ** 2 for k, v in g.items() if _BLOCK_KERNEL.fullmatch(k)}

    acc: dict[str, jax.Array] | None = None
    for i in tqdm(range(win.shape[0]), desc="fisher", unit="window", disable=not progress, file=sys.stderr):
        g = sq_grad(params, jnp.asarray(win[i]))
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    assert acc is not None
    return acc


def _windows(calib_tokens: Any, config: MixedConfig) -> Any:
    from jaxquant.algorithms.gptq import calibration_windows_for

    return calibration_windows_for(calib_tokens, config.n_samples, config.seq_len, config.seed)


def model_costs(
    model: Llama,
    calib_tokens: Any,
    *,
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    first_token_weight: float = 20.0,
    batch_size: int = 8,
    proxy: str = "hessian",
    progress: bool = True,
) -> list[TensorCosts]:
    """Bytes and RTN output error of every candidate setting of every block linear (one float forward pass).

    Args:
      model: the float :class:`~jaxquant.models.Llama`.
      calib_tokens: 1-D calibration token stream or ready ``(n, seq_len)`` windows.
      settings: the candidates.
      n_samples, seq_len, seed: calibration windows drawn from ``calib_tokens``.
      first_token_weight: weight of position 0 in ``H``.
      batch_size: windows per compiled call.
      proxy: ``"hessian"``: each tensor's own output error ``tr(E^T H E)`` (one forward pass);
        ``"fisher"``: the diagonal-Fisher loss estimate ``sum F E^2`` (:func:`fisher_diag`, one backward pass per
        window), which puts the errors of all layers on the scale of the model's loss.
      progress: progress bar.

    Returns:
      One :class:`TensorCosts` per block linear, in the order layer, then :data:`jaxquant.calibrate.GROUPS`,
      then :data:`jaxquant.calibrate.LINEARS` (paths as in :func:`jaxquant.models.flat_params`).
    """
    from jaxquant.algorithms.gptq import calibration_windows_for, position_weights

    windows = calibration_windows_for(calib_tokens, n_samples, seq_len, seed)
    out: list[TensorCosts] = []
    if proxy == "fisher":
        fisher = fisher_diag(model, windows, progress=progress)
        flat = flat_params(model_params(model))
        for li in range(model.config.n_layers):
            for g in GROUPS:
                for name in LINEARS[g]:
                    path = f"layers/{li}/{name}"
                    out.append(fisher_costs(path, flat[path], fisher[path], settings))
        return out
    if proxy != "hessian":
        raise ValueError(f"model_costs: proxy must be 'hessian' or 'fisher', got {proxy!r}")

    def block_fn(li: int, sts: dict[str, InputStats], block: dict[str, Any]) -> dict[str, Any]:
        for g in GROUPS:
            h = sts[g].hessian
            for name in LINEARS[g]:
                out.append(rtn_costs(f"layers/{li}/{name}", block[name], h, settings))
        return block

    run_blockwise(
        model,
        windows,
        block_fn=block_fn,
        sequential=False,
        batch_size=batch_size,
        position_weights=position_weights(windows.shape[1], first_token_weight),
        progress=progress,
        desc="sensitivities",
    )
    return out


def apply_plan(
    model: Llama,
    plan: MixedPlan,
    calib_tokens: Any = None,
    config: MixedConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``model``'s block linears with the plan's settings; returns ``model_params``-style params.

    ``plan.method == "rtn"``: round-to-nearest (no calibration data needed). ``"gptq"``: true-sequential GPTQ
    with each tensor's own setting, options from ``config`` (``calib_tokens`` needed).
    """
    if not isinstance(plan, MixedPlan):
        raise TypeError(f"apply_plan: plan must be a MixedPlan, got {type(plan).__name__}")
    if plan.method == "rtn":
        return quantize_params(model_params(model), plan.rules(), strict=True)
    if calib_tokens is None:
        raise ValueError("apply_plan: method 'gptq' needs calibration tokens")
    config = config or MixedConfig(plan.target_bpw, method="gptq")
    from jaxquant.algorithms.awq import search_clip
    from jaxquant.algorithms.gptq import position_weights
    from jaxquant.algorithms.gptq_core import _static_params, gptq_with_stats

    schemes = plan.schemes()
    windows = _windows(calib_tokens, config)

    def group_fn(li: int, group: str, st: InputStats, block: dict[str, Any]) -> dict[str, Any]:
        h = st.hessian
        block = dict(block)
        for name in LINEARS[group]:
            scheme = schemes[f"layers/{li}/{name}"]
            w = jnp.asarray(block[name])
            gp = None
            if config.clip_search:
                wc, _ = search_clip(w, h, scheme)
                s, z = _static_params(wc, scheme)
                gp = (s[0], z[0]) if scheme.granularity == "channel" else (s, z)
            block[name], _ = gptq_with_stats(
                w,
                h,
                scheme,
                damp=config.damp,
                act_order=config.act_order,
                static_groups=True,
                group_params=gp,
                with_stats=False,
            )
        return block

    return run_blockwise(
        model,
        windows,
        group_fn=group_fn,
        sequential=True,
        true_sequential=True,
        batch_size=config.batch_size,
        position_weights=position_weights(windows.shape[1], config.first_token_weight),
        progress=progress,
        desc="mixed gptq",
    )


def mixed_model(
    model: Llama, calib_tokens: Any, config: MixedConfig, *, progress: bool = True
) -> tuple[dict[str, Any], MixedPlan]:
    """Sensitivities -> plan -> quantized params (see the module docstring). Returns ``(params, plan)``.

    Raises:
      ValueError: the target is below the cheapest plan of the candidate settings (e.g. < 2.2 bits/weight with
        the defaults), or bad options.
    """
    if not isinstance(config, MixedConfig):
        raise TypeError(f"mixed_model: config must be a MixedConfig, got {type(config).__name__}")
    lo = cheapest_bpw(model, config.settings)
    if config.target_bpw < lo:
        raise ValueError(
            f"target {config.target_bpw:g} bits/weight is below the cheapest plan of the candidate settings "
            f"({lo:.3f} bits/weight for this model)"
        )
    costs = model_costs(
        model,
        calib_tokens,
        settings=config.settings,
        n_samples=config.n_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        first_token_weight=config.first_token_weight,
        batch_size=config.batch_size,
        proxy=config.proxy,
        progress=progress,
    )
    plan = allocate(costs, config.target_bpw, resolution=config.resolution, method=config.method)
    return apply_plan(model, plan, calib_tokens, config, progress=progress), plan
